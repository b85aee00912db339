"""Decisions from pulled annotation rows, without a server: consensus, pending, disagreement, adjudication."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fvqa.annotation import tables
from fvqa.annotation.decide import apply, disagreements, summarize
from fvqa.errors import FvqaError
from fvqa.store import Workspace, now


def _ws(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    tables.ensure(ws)
    ws.insert("items", [dict(item_id=f"i{k}", source="metaclip", question="Q?", answer=f"A{k}", aliases=[f"A{k}"],
                             provenance="{}") for k in range(6)])
    ws.insert("tags", [dict(item_id=f"i{k}", knowledge_type="Nature", provenance="{}") for k in range(6)])
    return ws


def _round(ws: Workspace, name: str, kind: str, annotators: int) -> None:
    ws.insert("annotation_rounds", [dict(round=name, kind=kind, project_id=1, server_url="http://127.0.0.1:1",
                                         split="test", annotators=annotators, created_at=now())])


_next_id = iter(range(1, 10_000))


def _ann(ws: Workspace, rnd: str, item: str, who: str, verdict: str, answer: str | None = None,
         kt: str | None = None, search: str | None = None) -> None:
    row: dict[str, Any] = dict(round=rnd, annotation_id=next(_next_id), task_id=100, project_id=1, item_id=item,
                               annotator=who, verdict=verdict, answer=answer,
                               proposed_answer=f"A{item[1:]}", knowledge_type=kt, search_label=search)
    ws.insert("annotations", [row])


def test_apply_takes_consensus_skips_pending_and_disagreement(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    _round(ws, "r1", "review", 2)
    _ann(ws, "r1", "i0", "x", "keep", kt="Arts")
    _ann(ws, "r1", "i0", "y", "keep")  # no type given: does not contradict x's Arts
    _ann(ws, "r1", "i1", "x", "fix", "The Louvre")
    _ann(ws, "r1", "i1", "y", "fix", "louvre")  # same answer after normalisation
    _ann(ws, "r1", "i2", "x", "keep")  # only one of two annotators: pending
    _ann(ws, "r1", "i3", "x", "keep", kt="Arts")
    _ann(ws, "r1", "i3", "y", "keep", kt="Place")  # type disagreement
    _ann(ws, "r1", "i4", "x", "reject")
    _ann(ws, "r1", "i4", "y", "keep")
    _ann(ws, "r1", "i4", "y", "reject")  # y changed their mind: the later annotation counts
    assert apply(ws, "r1") == {"kept": 1, "fixed": 1, "rejected": 1, "pending": 1, "disagreement": 1, "applied": 3}
    gold = {r[0]: r[1:] for r in ws.execute("SELECT item_id, status, answer, aliases, knowledge_type FROM gold")}
    assert gold["i0"] == ("kept", "A0", None, "Arts")
    assert gold["i1"] == ("fixed", "The Louvre", ["The Louvre"], None)
    assert gold["i4"][0] == "rejected"
    shown = {r[0]: r[1:] for r in ws.execute("SELECT item_id, answer, knowledge_type FROM dataset")}
    assert "i4" not in shown and shown["i1"] == ("The Louvre", "Nature") and shown["i0"][1] == "Arts"
    assert [d["item_id"] for d in disagreements(ws, "r1")] == ["i3"]
    s = summarize(ws, "r1")
    assert s.by_annotator == {"x": 5, "y": 5} and s.annotated == 5


def test_adjudication_latest_wins_and_overrides_earlier_gold(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    _round(ws, "r1", "review", 1)
    _ann(ws, "r1", "i0", "x", "keep")
    apply(ws, "r1")
    _round(ws, "r1-adj", "adjudication", 1)
    _ann(ws, "r1-adj", "i0", "senior", "fix", "First try")
    _ann(ws, "r1-adj", "i0", "boss", "fix", "Final", search="text_search_required")
    assert apply(ws, "r1-adj") == {"fixed": 1, "applied": 1}
    status, answer, label, prov = ws.execute("SELECT status, answer, search_label, provenance FROM gold")[0]
    assert (status, answer, label) == ("fixed", "Final", "text_search_required")
    assert json.loads(prov)["round"] == "r1-adj"


def test_apply_without_rows_or_round_is_an_error(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    with pytest.raises(FvqaError, match="unknown round r9"):
        apply(ws, "r9")
    _round(ws, "r1", "review", 2)
    with pytest.raises(FvqaError, match="no pulled annotations: run `fvqa annotate pull --round r1`"):
        apply(ws, "r1")
