"""Decisions from pulled annotation rows: agreement, disagreements, and merging into `gold`.

Works on the workspace alone (no server). An empty optional field (knowledge type, search need)
is a missing value: it neither agrees nor disagrees. When one annotator annotated an item more than
once, only their latest annotation counts: latest `updated_at` (else `created_at`), ties and rows
without a time broken by the higher annotation id. `pull` counts and reports those superseded rows.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fvqa.annotation import tables
from fvqa.annotation.agreement import field_agreement
from fvqa.answers import normalize_answer
from fvqa.errors import FvqaError
from fvqa.store import Workspace, now

STAGE = "annotate"
FIELDS = ("verdict", "answer", "knowledge_type", "search_label", "question", "aliases")


def _rows(ws: Workspace, round_name: str) -> list[dict[str, Any]]:
    cur = ws.con.execute("SELECT * FROM annotations WHERE round = ? ORDER BY annotation_id", [round_name])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def final_answer(row: dict[str, Any]) -> str:
    """The answer an annotation stands for, normalised: keep -> proposed, fix -> corrected."""
    if row["verdict"] == "reject":
        return "<rejected>"
    text = row["answer"] if row["verdict"] == "fix" else row["proposed_answer"]
    return normalize_answer(text or "")


def question_key(row: dict[str, Any]) -> str | None:
    """A question edit, whitespace-normalised (None: no edit, a missing value like an empty type)."""
    q = row.get("question")
    return " ".join(q.split()) if q else None


def aliases_key(row: dict[str, Any]) -> tuple[str, ...] | None:
    """An aliases edit as the set of normalised answers (order and spelling variants of one answer
    agree), or None for no edit. A rejected item's edits do not count."""
    a = row.get("aliases")
    if not a or row["verdict"] == "reject":
        return None
    return tuple(sorted({normalize_answer(x) for x in a}))


def _field(row: dict[str, Any], name: str) -> Any:
    if name == "answer":
        return final_answer(row)
    if name == "question":
        return None if row["verdict"] == "reject" else question_key(row)
    if name == "aliases":
        return aliases_key(row)
    return row[name]


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def latest_key(row: dict[str, Any]) -> tuple[bool, datetime, int]:
    """Sort key of annotations: the largest is the one that counts (see the module docstring)."""
    t = _time(row.get("updated_at")) or _time(row.get("created_at"))
    return (t is not None, t or datetime.min.replace(tzinfo=UTC), int(row["annotation_id"]))


def _latest_per_annotator(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    by_item: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in sorted(rows, key=latest_key):  # a later annotation by the same person wins
        by_item[r["item_id"]][r["annotator"]] = r
    return by_item


def superseded(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """Rows that do not count because their annotator annotated the item again, and how many of
    those differ from the annotation that counts (on any of FIELDS)."""
    latest = _latest_per_annotator(rows)
    old = [r for r in rows if latest[r["item_id"]][r["annotator"]] is not r]
    changed = [r for r in old if any(_field(r, f) != _field(latest[r["item_id"]][r["annotator"]], f)
                                     for f in FIELDS)]
    return len(old), len(changed)


@dataclass
class RoundSummary:
    """What `fvqa annotate status` shows for one round."""

    round: str
    kind: str
    tasks: int
    annotated: int
    pending: int
    by_annotator: dict[str, int]
    prefill: bool | None = None  # tasks pre-filled with pipeline values (agreement then runs high); None: unknown
    agreement: dict[str, tuple[str, float, int]] = field(default_factory=dict)
    disagreements: list[dict[str, Any]] = field(default_factory=list)


def disagreements(ws: Workspace, round_name: str) -> list[dict[str, Any]]:
    """Items whose annotators differ on any field (an empty optional field differs from nothing)."""
    out = []
    for item, per in sorted(_latest_per_annotator(_rows(ws, round_name)).items()):
        if len(per) < 2:
            continue
        fields = [f for f in FIELDS if len({v for r in per.values() if (v := _field(r, f)) is not None}) > 1]
        if fields:
            out.append({"item_id": item, "fields": fields,
                        "values": {a: {f: _field(r, f) for f in FIELDS} for a, r in per.items()}})
    return out


def summarize(ws: Workspace, round_name: str) -> RoundSummary:
    """Counts, agreement per field and disagreements of one round."""
    rnd = tables.round_row(ws, round_name)
    if rnd is None:
        raise FvqaError(f"unknown round {round_name}")
    rows = _rows(ws, round_name)
    per_item = _latest_per_annotator(rows)
    if rnd["kind"] == "manual":
        tasks = len({r["task_id"] for r in rows})
    else:
        tasks = ws.execute("SELECT count(*) FROM annotation_tasks WHERE round = ?", [round_name])[0][0]
    target = int(rnd["annotators"] or 1)
    done_items = sum(1 for per in per_item.values() if len(per) >= target)
    summary = RoundSummary(round=round_name, kind=rnd["kind"], tasks=int(tasks), annotated=len(per_item),
                           pending=max(int(tasks) - done_items, 0),
                           by_annotator=dict(Counter(r["annotator"] for r in rows)), prefill=rnd.get("prefill"))
    if rnd["kind"] != "manual":
        for f in FIELDS:
            # optional fields left empty are missing values (not a label of their own), as in apply()
            labels = {item: {a: v for a, r in per.items() if (v := _field(r, f)) is not None}
                      for item, per in per_item.items()}
            summary.agreement[f] = field_agreement(labels)
        summary.disagreements = disagreements(ws, round_name)
    return summary


def _consensus(values: list[Any]) -> tuple[bool, Any]:
    present = {v for v in values if v is not None}
    if len(present) > 1:
        return False, None
    return True, next(iter(present), None)


def apply(ws: Workspace, round_name: str) -> dict[str, int]:
    """Merge a pulled round into `gold` (with provenance): consensus items, or the adjudicator's word."""
    rnd = tables.round_row(ws, round_name)
    if rnd is None:
        raise FvqaError(f"unknown round {round_name}")
    tables.ensure(ws)  # gold.question, and annotation columns newer than the workspace
    rows = _rows(ws, round_name)
    if not rows:
        raise FvqaError(f"round {round_name} has no pulled annotations: run `fvqa annotate pull --round {round_name}`")
    if rnd["kind"] == "manual":
        return _apply_manual(ws, round_name, rows)
    target = 1 if rnd["kind"] == "adjudication" else int(rnd["annotators"] or 1)
    counts: Counter[str] = Counter()
    gold = []
    for item, per in _latest_per_annotator(rows).items():
        anns = list(per.values())
        if rnd["kind"] == "adjudication":
            anns = [max(anns, key=latest_key)]
        if len(anns) < target:
            counts["pending"] += 1
            continue
        agree_v, verdict = _consensus([r["verdict"] for r in anns])
        agree_a, _ = _consensus([final_answer(r) for r in anns])
        agree_k, kt = _consensus([r["knowledge_type"] for r in anns])
        agree_s, sl = _consensus([r["search_label"] for r in anns])
        agree_q, q_key = _consensus([_field(r, "question") for r in anns])
        agree_l, l_key = _consensus([_field(r, "aliases") for r in anns])
        if not (agree_v and agree_a and agree_k and agree_s and agree_q and agree_l):
            counts["disagreement"] += 1
            continue
        first = anns[0]
        answer = None if verdict == "reject" else (first["answer"] if verdict == "fix" else first["proposed_answer"])
        edits = _edits(anns, q_key, l_key)
        aliases = [answer] if verdict == "fix" else None
        if "aliases" in edits and answer is not None:  # the reviewed list, the answer first (as generated)
            aliases = list(dict.fromkeys([answer, *edits["aliases"]["value"]]))
        # an aliases edit changes what counts as correct, like a fixed answer (answer_eval goes stale)
        status = {"keep": "kept", "fix": "fixed", "reject": "rejected"}[verdict]
        if status == "kept" and "aliases" in edits:
            status = "fixed"
        counts[status] += 1
        for name in edits:
            counts[f"{name}_edited"] += 1
        gold.append(dict(
            item_id=item, status=status, answer=answer, aliases=aliases,
            question=edits["question"]["value"] if "question" in edits else None,
            knowledge_type=kt, search_label=sl, round=round_name,
            provenance=json.dumps({"stage": "annotate", "round": round_name, "kind": rnd["kind"],
                                   "prefill": rnd.get("prefill"),
                                   "annotators": sorted(per), "annotation_ids": [r["annotation_id"] for r in anns],
                                   "task_id": first["task_id"], "project_id": first["project_id"],
                                   "server": rnd["server_url"], "comments": [r["comment"] for r in anns if r["comment"]],
                                   "edits": edits, "time": now().isoformat()}, ensure_ascii=False)))
    missing = ws.keys("items", "item_id")
    rejects = [(STAGE, f"{round_name}/{g['item_id']}", "item_gone", "not applied")
               for g in gold if g["item_id"] not in missing]
    gold = [g for g in gold if g["item_id"] in missing]
    with ws.transaction():
        ws.insert("gold", gold, replace=True)
        ws.add_rejects(rejects)
    return dict(counts) | {"applied": len(gold)}


def _edits(anns: list[dict[str, Any]], q_key: str | None, l_key: tuple[str, ...] | None) -> dict[str, Any]:
    """The agreed question / aliases edits with who made them and the value they replace."""
    out: dict[str, Any] = {}
    if anns[0]["verdict"] == "reject":
        return out
    if q_key is not None:
        by = [r for r in anns if _field(r, "question") == q_key]
        out["question"] = {"value": by[0]["question"].strip(), "original": by[0].get("proposed_question"),
                           "annotators": sorted(r["annotator"] for r in by),
                           "annotation_ids": [r["annotation_id"] for r in by]}
    if l_key is not None:
        by = [r for r in anns if _field(r, "aliases") == l_key]
        out["aliases"] = {"value": list(by[0]["aliases"]), "original": _list(by[0].get("proposed_aliases")),
                          "annotators": sorted(r["annotator"] for r in by),
                          "annotation_ids": [r["annotation_id"] for r in by]}
    return out


def _list(value: Any) -> list[str] | None:
    return None if value is None else [str(v) for v in value]


def _apply_manual(ws: Workspace, round_name: str, rows: list[dict[str, Any]]) -> dict[str, int]:
    items, tags, gold = [], [], []
    for r in rows:
        prov = json.dumps({"stage": "annotate", "round": round_name, "annotator": r["annotator"],
                           "annotation_id": r["annotation_id"], "task_id": r["task_id"], "time": now().isoformat()})
        items.append(dict(item_id=r["item_id"], source="manual", question=r["question"], answer=r["answer"],
                          aliases=r["aliases"], image_sha256=r["image_sha256"],
                          provenance=json.dumps({"manual": json.loads(prov)})))
        tags.append(dict(item_id=r["item_id"], knowledge_type=r["knowledge_type"], confidence=1.0, provenance=prov))
        gold.append(dict(item_id=r["item_id"], status="manual", answer=r["answer"], aliases=r["aliases"],
                         knowledge_type=r["knowledge_type"], search_label=None, round=round_name, provenance=prov))
    with ws.transaction():
        ws.insert("items", items, replace=True)
        ws.insert("tags", tags, replace=True)
        ws.insert("gold", gold, replace=True)
    return {"manual": len(items), "applied": len(items)}
