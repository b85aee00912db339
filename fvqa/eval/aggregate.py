"""Per-cell numbers of a run from the workspace tables (shared by the report and lmms-eval outputs).

A cell is one (model, workflow, benchmark). Its accuracy is the mean primary score with a seeded
95% bootstrap interval over the *scored* items. Search use has the paper's two definitions: the
search ratio (calls made / maximum search steps) and the share of items that searched at all;
`outcomes` splits the items as the paper's Fig. 4b (correct or wrong, with or without search). Items whose model call failed (stop_reason "error") or whose judge call
failed (no score) are not scored, not wrong: they are counted apart (`unscored`) and asked again
by the next `fvqa eval run` of the same run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fvqa.eval.metrics import bootstrap_ci, breakdown, infoseek_final, search_usage, simplevqa_summary
from fvqa.store import Workspace

MODEL_CALL_FAILED = "error"
"""stop_reason of a prediction whose model call failed: stored, never scored, generated again next run."""


NEWER_SCORE_COLUMNS = ("official_variants", "judge_fvqa", "judge_fvqa_id")


def scored_rows(ws: Workspace, run: str) -> list[dict[str, Any]]:
    """Scored predictions joined with their scores, one dict per item, in a stable order."""
    have = {r[0] for r in ws.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'eval_scores'")}
    # columns newer than a workspace's tables read as null (a read-only report never alters them)
    newer = ", ".join(f"s.{c}" if c in have else f"NULL AS {c}" for c in NEWER_SCORE_COLUMNS)
    cur = ws.con.execute(
        "SELECT p.*, s.em, s.subem, s.official, s.official_name, s.judge, s.judge_grade, s.judge_reason, "
        f"s.judge_error, s.judge_id, s.score, s.metric, {newer} "
        "FROM eval_predictions p "
        "JOIN eval_scores s USING (run, model, benchmark, workflow, item_id) WHERE p.run = ? "
        "AND p.stop_reason IS DISTINCT FROM ? AND s.score IS NOT NULL "
        "ORDER BY p.model, p.workflow, p.benchmark, p.item_id", [run, MODEL_CALL_FAILED])
    cols = [d[0] for d in cur.description]
    rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    for r in rows:
        r["meta"] = json.loads(r["meta"] or "{}")
        r["official_variants"] = json.loads(r["official_variants"]) if r.get("official_variants") else {}
    return rows


@dataclass
class Unscored:
    """Predictions of one cell that have no score: why, and how many."""

    model_failed: int = 0  # the model call failed (5xx after retries, timeout): generated again next run
    judge_failed: int = 0  # the judge call failed and the primary score needs it: judged again next run
    pending: int = 0  # predicted but not scored yet (e.g. the run was stopped before scoring)
    kind: str = ""  # the benchmark kind, so a cell with nothing scored can still be reported

    @property
    def total(self) -> int:
        return self.model_failed + self.judge_failed + self.pending


def unscored(ws: Workspace, run: str) -> dict[tuple[str, str, str], Unscored]:
    """Per (model, workflow, benchmark) with at least one unscored prediction: the counts by reason."""
    if "eval_predictions" not in ws.tables():
        return {}
    rows = ws.execute(
        "SELECT p.model, p.workflow, p.benchmark, any_value(p.kind), "
        "count(*) FILTER (WHERE p.stop_reason = ?), "
        "count(*) FILTER (WHERE p.stop_reason IS DISTINCT FROM ? AND s.item_id IS NOT NULL "
        "AND s.score IS NULL), "
        "count(*) FILTER (WHERE p.stop_reason IS DISTINCT FROM ? AND s.item_id IS NULL) "
        "FROM eval_predictions p LEFT JOIN eval_scores s USING (run, model, benchmark, workflow, item_id) "
        "WHERE p.run = ? GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", [*[MODEL_CALL_FAILED] * 3, run])
    return {(m, w, b): Unscored(int(a), int(j), int(p), kind) for m, w, b, kind, a, j, p in rows if a or j or p}


def unscored_note(counts: dict[tuple[str, str, str], Unscored]) -> str | None:
    """One sentence on what is not scored (None if everything is), for summaries and reports."""
    model = sum(u.model_failed for u in counts.values())
    judge = sum(u.judge_failed for u in counts.values())
    pending = sum(u.pending for u in counts.values())
    if not model + judge + pending:
        return None
    parts = [f"{n} {what}" for n, what in ((model, "model call failed"), (judge, "judge call failed"),
                                           (pending, "not scored yet")) if n]
    return (f"{model + judge + pending} predictions not scored ({', '.join(parts)}); accuracy is over the "
            "scored items only. Run `fvqa eval run` with the same config again to retry exactly these.")


_METRICS = ("accuracy", "ci_lo", "ci_hi", "em", "subem", "official", "judge", "search_ratio",
            "items_without_search", "correct_without_search", "search_any_ratio", "judge_fvqa")
OUTCOMES = ("correct_without_search", "correct_with_search", "wrong_without_search", "wrong_with_search")
"""The paper's Fig. 4b split of a cell's items (shares summing to 1)."""


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
    judge_failures: int  # scored items with a judge error (an unusable reply, judged 0; or a failed request
    # when the primary metric does not need the judge: that verdict is asked again next run)
    not_scored_model: int = 0  # predictions not scored: the model call failed
    not_scored_judge: int = 0  # predictions not scored: the judge call failed
    not_scored_pending: int = 0
    simplevqa: dict[str, float] | None = None
    infoseek_final: float | None = None  # harmonic mean of unseen-question and unseen-entity accuracy
    breakdowns: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)
    judge_fvqa: float | None = None  # fvqa's own judge beside a paper-style one (None: not run)
    variants: dict[str, float] = field(default_factory=dict)  # lenient variants of the official metric
    outcomes: dict[str, float] = field(default_factory=dict)  # OUTCOMES -> share of the cell's items

    @property
    def search_any_ratio(self) -> float:
        """The paper's other search measure: the share of items that made at least one search call."""
        return 1.0 - self.items_without_search

    @property
    def not_scored(self) -> int:
        return self.not_scored_model + self.not_scored_judge + self.not_scored_pending

    def to_dict(self) -> dict[str, Any]:
        """JSON record of the cell; with nothing scored (n=0) its metrics are null, not a misleading 0."""
        d = dict(self.__dict__, not_scored=self.not_scored, search_any_ratio=self.search_any_ratio)
        if self.n == 0:
            d.update(dict.fromkeys(_METRICS))
        return d


def _empty_cell(model: str, wf: str, bench: str, kind: str) -> Cell:
    """A cell whose every prediction is unscored (e.g. the model's endpoint was down for the whole run)."""
    return Cell(model=model, workflow=wf, benchmark=bench, kind=kind, n=0, accuracy=0.0, ci_lo=0.0, ci_hi=0.0,
                em=0.0, subem=0.0, official=0.0, official_name="", judge=None, search_ratio=0.0, image_calls=0,
                text_calls=0, items_without_search=0.0, correct_without_search=0.0, judge_failures=0)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def cells(rows: list[dict[str, Any]], n_resamples: int = 1000,
          unscored_counts: dict[tuple[str, str, str], Unscored] | None = None) -> list[Cell]:
    """One Cell per (model, workflow, benchmark) with a scored or an unscored prediction, in that order.

    `rows` are `scored_rows`; `unscored_counts` (from `unscored`) fills the not-scored fields and adds
    the cells where nothing is scored yet, with n=0, so a cell whose model was down is not dropped.
    """
    counts = unscored_counts or {}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["workflow"], r["benchmark"]), []).append(r)
    out = []
    for key in sorted(groups.keys() | counts.keys()):
        model, wf, bench = key
        rs = groups.get(key, [])
        u = counts.get(key)
        if not rs:
            assert u is not None
            cell = _empty_cell(model, wf, bench, u.kind)
            cell.not_scored_model, cell.not_scored_judge, cell.not_scored_pending = (
                u.model_failed, u.judge_failed, u.pending)
            out.append(cell)
            continue
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
            official=_mean([r["official"] for r in rs if r["official"] is not None]),
            official_name=rs[0]["official_name"],
            judge=_mean(judged) if len(judged) == len(rs) else None, search_ratio=ratio,
            image_calls=sum(img), text_calls=sum(txt), items_without_search=without,
            correct_without_search=sum(1 for r, i, t in zip(rs, img, txt, strict=True)
                                       if i + t == 0 and r["score"] >= 0.5) / len(rs),
            judge_failures=sum(1 for r in rs if r["judge_error"]),
        )
        fv = [r.get("judge_fvqa") for r in rs]
        cell.judge_fvqa = _mean([float(x) for x in fv]) if all(x is not None for x in fv) else None
        names = {n for r in rs for n in r.get("official_variants") or {}}
        cell.variants = {n: _mean([float((r.get("official_variants") or {}).get(n, 0.0)) for r in rs])
                         for n in sorted(names)}
        searched = [i + t > 0 for i, t in zip(img, txt, strict=True)]
        correct = [r["score"] >= 0.5 for r in rs]
        cell.outcomes = {
            name: sum(1 for c, s in zip(correct, searched, strict=True) if c == want_c and s == want_s) / len(rs)
            for name, want_c, want_s in zip(OUTCOMES, (True, True, False, False), (False, True, False, True),
                                            strict=True)}
        if u is not None:
            cell.not_scored_model, cell.not_scored_judge, cell.not_scored_pending = (
                u.model_failed, u.judge_failed, u.pending)
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
    """Per (model, workflow): unweighted mean accuracy and search ratio over benchmarks (as Table 1), over
    the cells with something scored (an empty cell has no accuracy, not 0%)."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in cs:
        if c.n == 0:
            continue
        groups.setdefault((c.model, c.workflow), []).append(c)
    return {k: {"accuracy": _mean([c.accuracy for c in v]), "search_ratio": _mean([c.search_ratio for c in v]),
                "n_benchmarks": float(len(v))} for k, v in groups.items()}
