"""Per-cell numbers of a run from the workspace tables (shared by the report and lmms-eval outputs).

A cell is one (model, workflow, benchmark). Its accuracy is the mean primary score with a seeded
95% bootstrap interval; its search ratio is the paper's (calls made / maximum search steps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fvqa.eval.metrics import bootstrap_ci, breakdown, infoseek_final, search_usage, simplevqa_summary
from fvqa.store import Workspace


def scored_rows(ws: Workspace, run: str) -> list[dict[str, Any]]:
    """Predictions joined with their scores, one dict per item, in a stable order."""
    cur = ws.con.execute(
        "SELECT p.*, s.em, s.subem, s.official, s.official_name, s.judge, s.judge_grade, s.judge_reason, "
        "s.judge_error, s.judge_id, s.score, s.metric FROM eval_predictions p "
        "JOIN eval_scores s USING (run, model, benchmark, workflow, item_id) WHERE p.run = ? "
        "ORDER BY p.model, p.workflow, p.benchmark, p.item_id", [run])
    cols = [d[0] for d in cur.description]
    rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    for r in rows:
        r["meta"] = json.loads(r["meta"] or "{}")
    return rows


@dataclass
class Cell:
    model: str
    workflow: str
    benchmark: str
    kind: str
    n: int
    accuracy: float
    ci_lo: float
    ci_hi: float
    em: float
    subem: float
    official: float
    official_name: str
    judge: float | None
    search_ratio: float
    image_calls: int
    text_calls: int
    items_without_search: float
    correct_without_search: float
    judge_failures: int
    simplevqa: dict[str, float] | None = None
    infoseek_final: float | None = None  # harmonic mean of unseen-question and unseen-entity accuracy
    breakdowns: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def cells(rows: list[dict[str, Any]], n_resamples: int = 1000) -> list[Cell]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["workflow"], r["benchmark"]), []).append(r)
    out = []
    for (model, wf, bench), rs in groups.items():
        scores = [float(r["score"]) for r in rs]
        mean, lo, hi = bootstrap_ci(scores, n_resamples=n_resamples)
        img = [int(r["n_image_search"]) for r in rs]
        txt = [int(r["n_text_search"]) for r in rs]
        limits = [int(r["max_search"]) for r in rs]
        if sum(limits) > 0:
            usage = search_usage(img, txt, limits)
            ratio, without = usage.search_ratio, usage.items_without_search
        else:
            ratio, without = 0.0, 1.0
        judged = [r["judge"] for r in rs if r["judge"] is not None]
        cell = Cell(
            model=model, workflow=wf, benchmark=bench, kind=rs[0]["kind"], n=len(rs), accuracy=mean, ci_lo=lo,
            ci_hi=hi, em=_mean([r["em"] for r in rs]), subem=_mean([r["subem"] for r in rs]),
            official=_mean([r["official"] for r in rs]), official_name=rs[0]["official_name"],
            judge=_mean(judged) if len(judged) == len(rs) else None, search_ratio=ratio,
            image_calls=sum(img), text_calls=sum(txt), items_without_search=without,
            correct_without_search=sum(1 for r, i, t in zip(rs, img, txt, strict=True)
                                       if i + t == 0 and r["score"] >= 0.5) / len(rs),
            judge_failures=sum(1 for r in rs if r["judge_error"]),
        )
        if rs[0]["kind"] == "simplevqa" and all(r["judge_grade"] for r in rs):
            g = simplevqa_summary([r["judge_grade"] for r in rs])
            cell.simplevqa = {"correct": g.correct_rate, "correct_given_attempted": g.correct_given_attempted,
                              "f_score": g.f_score, "not_attempted": g.not_attempted / g.n}
        for key in ("knowledge_type", "search_label", "split", "question_type"):
            recs = [{"score": r["score"], key: r.get(key) or r["meta"].get(key)} for r in rs]
            if any(rec[key] for rec in recs):
                cell.breakdowns[key] = {g: (grp.n, grp.accuracy) for g, grp in breakdown(recs, key).items()}
        splits = cell.breakdowns.get("split", {})
        uq = [acc for g, (_, acc) in splits.items() if "unseen_question" in g]
        ue = [acc for g, (_, acc) in splits.items() if "unseen_entity" in g]
        if cell.kind == "infoseek" and uq and ue:
            cell.infoseek_final = infoseek_final(uq[0], ue[0])
        out.append(cell)
    return out


def averages(cs: list[Cell]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (model, workflow): unweighted mean accuracy and search ratio over benchmarks (as Table 1)."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in cs:
        groups.setdefault((c.model, c.workflow), []).append(c)
    return {k: {"accuracy": _mean([c.accuracy for c in v]), "search_ratio": _mean([c.search_ratio for c in v]),
                "n_benchmarks": float(len(v))} for k, v in groups.items()}
