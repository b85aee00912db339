"""`annotate pull` on hostile and odd Label Studio export shapes, without a server.

The export payloads are written here and handed to the same `rounds.pull` the CLI calls, through a
stand-in client that serves them (the real-server round trip is in test_annotation.py). Every bad
shape must end as a `rejects` row whose fixed reason names the field, or be handled as the legitimate
shape it is; never a traceback, never a silent drop; and the counts must add up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fvqa.annotation import cli, tables
from fvqa.annotation.client import LabelStudioClient
from fvqa.annotation.decide import apply, disagreements, summarize
from fvqa.annotation.rounds import pull
from fvqa.errors import FvqaError
from fvqa.store import Workspace, now

ROUND = "r1"


@dataclass
class _Conn:
    url: str = "http://127.0.0.1:9"


class ExportClient:
    """Serves a fixed export as Label Studio would (a parsed list, or raw bytes parsed like the client)."""

    def __init__(self, export: list[Any] | bytes, users: dict[int, str] | None = None) -> None:
        self.export, self.users, self.conn = export, users or {7: "ann7@fvqa.test", 8: "ann8@fvqa.test"}, _Conn()

    def project_exists(self, project_id: int) -> bool:
        return True

    def export_tasks(self, project_id: int) -> list[Any]:
        if isinstance(self.export, bytes):
            return LabelStudioClient._parse_export(project_id, self.export)
        return list(self.export)  # pull must not change what it reads (no deepcopy: some cases nest deeply)

    def user_emails(self, refresh: bool = False) -> dict[int, str]:
        return dict(self.users)

    def download(self, url: str) -> bytes:
        raise FvqaError(f"no downloads here: {url}")


def _ws(tmp_path: Path, n: int = 3) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    tables.ensure(ws)
    ws.insert("items", [dict(item_id=f"i{k}", source="metaclip", question="Q?", answer=f"A{k}", aliases=[f"A{k}"],
                             provenance="{}") for k in range(n)])
    ws.insert("annotation_rounds", [dict(round=ROUND, kind="review", project_id=1, server_url="http://127.0.0.1:9",
                                         split="test", annotators=2, created_at=now())])
    ws.insert("annotation_tasks", [dict(round=ROUND, item_id=f"i{k}", task_id=100 + k, project_id=1,
                                        pushed_at=now()) for k in range(n)])
    return ws


def _choice(name: str, *values: Any) -> dict[str, Any]:
    return {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": list(values)}}


def _text(name: str, value: Any) -> dict[str, Any]:
    return {"from_name": name, "to_name": "image", "type": "textarea", "value": {"text": value}}


def _ann(aid: Any, *result: dict[str, Any], user: Any = 7, **extra: Any) -> dict[str, Any]:
    return {"id": aid, "completed_by": user, "result": list(result), "was_cancelled": False, "lead_time": 3.5,
            "created_at": "2026-01-01T10:00:00.000000Z", "updated_at": "2026-01-01T10:00:00.000000Z", **extra}


def _task(tid: Any, item: Any, *annotations: Any, **extra: Any) -> dict[str, Any]:
    return {"id": tid, "data": {"item_id": item, "answer": f"A{str(item)[1:]}"}, "annotations": list(annotations),
            "predictions": [], **extra}


def _good() -> dict[str, Any]:
    """A well-formed task (item i0) every case carries next to the hostile one: it must still be stored."""
    return _task(100, "i0", _ann(1, _choice("verdict", "keep")))


def _deep(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


KEEP = _choice("verdict", "keep")

# (export entry for item i1 / task 101, the reject code it must produce, words its detail must hold)
HOSTILE: dict[str, tuple[Any, str, str]] = {
    "task is a string": ("task 101", "wrong_type", "task is not an object"),
    "task is a list": ([1, 2], "wrong_type", "task is not an object"),
    "task id null": (_task(None, "i1", _ann(2, KEEP)), "wrong_type", "task id is not an integer"),
    "task id a word": (_task("abc", "i1", _ann(2, KEEP)), "wrong_type", "task id is not an integer"),
    "task id a float": (_task(101.5, "i1", _ann(2, KEEP)), "wrong_type", "task id is not an integer"),
    "annotations missing": (_without(_task(101, "i1"), "annotations"), "field_missing", "task has no annotations list"),
    "annotations null": (_task(101, "i1") | {"annotations": None}, "wrong_type", "task annotations is not a list"),
    "annotations an object": (_task(101, "i1") | {"annotations": {"id": 2}}, "wrong_type", "task annotations is not a list"),
    "annotation a number": (_task(101, "i1", 42), "wrong_type", "annotation is not an object"),
    "annotation id null": (_task(101, "i1", _ann(None, KEEP)), "wrong_type", "annotation id is not an integer"),
    "annotation id a bool": (_task(101, "i1", _ann(True, KEEP)), "wrong_type", "annotation id is not an integer"),
    "annotation id beyond BIGINT": (_task(101, "i1", _ann(2**70, KEEP)), "wrong_type", "annotation id is not an integer"),
    "result missing": (_task(101, "i1", _without(_ann(2, KEEP), "result")), "field_missing", "annotation has no result list"),
    "result an object": (_task(101, "i1", _ann(2) | {"result": {"verdict": "keep"}}),
                         "wrong_type", "annotation result is not a list"),
    "result item a string": (_task(101, "i1", _ann(2, KEEP) | {"result": ["keep"]}), "wrong_type", "result item is not an object"),
    "result item without from_name": (_task(101, "i1", _ann(2, _without(KEEP, "from_name"))),
                                      "field_missing", "result item has no from_name"),
    "verdict without value": (_task(101, "i1", _ann(2, _without(KEEP, "value"))), "wrong_type", "verdict value is not an object"),
    "choices a string": (_task(101, "i1", _ann(2, KEEP | {"value": {"choices": "keep"}})),
                         "wrong_type", "verdict choices is not a list"),
    "choices empty": (_task(101, "i1", _ann(2, _choice("verdict"))), "field_missing", "annotation has no verdict"),
    "unknown choice label": (_task(101, "i1", _ann(2, _choice("verdict", "maybe"))), "unknown_value", "verdict: "),
    "choice a number": (_task(101, "i1", _ann(2, _choice("verdict", 1))), "unknown_value", "verdict: "),
    "two verdict regions": (_task(101, "i1", _ann(2, KEEP, _choice("verdict", "reject"))),
                            "multiple_values", "verdict: "),
    "answer text an object": (_task(101, "i1", _ann(2, _choice("verdict", "fix"), _text("answer", {"x": 1}))),
                              "wrong_type", "answer text is not a string or a list of strings"),
    "answer text huge": (_task(101, "i1", _ann(2, _choice("verdict", "fix"), _text("answer", "x" * 1_000_000))),
                         "too_long", "answer text: 1000000 characters"),
    "choices nested 50000 deep": (_task(101, "i1", _ann(2, _choice("verdict", _deep(50_000)))),
                                  "unknown_value", "verdict: "),
    "completed_by a name": (_task(101, "i1", _ann(2, KEEP, user="bob")), "wrong_type", "annotation completed_by is not a user id"),
    "completed_by object without id": (_task(101, "i1", _ann(2, KEEP, user={"email": "x@y"})),
                                       "wrong_type", "annotation completed_by is not a user id"),
    "completed_by negative": (_task(101, "i1", _ann(2, KEEP, user=-3)), "wrong_type", "annotation completed_by is not a user id"),
    "was_cancelled a word": (_task(101, "i1", _ann(2, KEEP, was_cancelled="yes")),
                             "wrong_type", "annotation was_cancelled is not a boolean"),
    "lead_time a word": (_task(101, "i1", _ann(2, KEEP, lead_time="fast")), "wrong_type", "annotation lead_time is not a number"),
    "lead_time beyond float": (_task(101, "i1", _ann(2, KEEP, lead_time=10**400)),
                               "wrong_type", "annotation lead_time is not a number"),
    "updated_at not a time": (_task(101, "i1", _ann(2, KEEP, updated_at="yesterday")),
                              "wrong_type", "annotation updated_at is not a timestamp"),
    "data missing": (_without(_task(101, "i1", _ann(2, KEEP)), "data"), "wrong_type", "task data is not an object"),
    "data a list": (_task(101, "i1", _ann(2, KEEP)) | {"data": ["i1"]}, "wrong_type", "task data is not an object"),
    "item id missing": (_task(101, "i1", _ann(2, KEEP)) | {"data": {"answer": "A1"}}, "field_missing", "task has no item_id in its data"),
    "item id a number": (_task(101, 1, _ann(2, KEEP)), "wrong_type", "task item_id is not a string"),
    "item id of another task": (_task(101, "i2", _ann(2, KEEP)), "item_id_mismatch", ""),
    "item gone from the workspace": (_task(150, "i9", _ann(2, KEEP)), "item_gone", ""),
    "proposed answer an object": (_task(101, "i1", _ann(2, KEEP)) | {"data": {"item_id": "i1", "answer": {}}},
                                  "wrong_type", "task answer is not a string"),
}


def _rejects(ws: Workspace) -> list[tuple[str, str, str]]:
    return sorted(ws.execute("SELECT key, reason, detail FROM rejects WHERE stage = 'annotate'"))


def _balanced(counts: dict[str, Any]) -> None:
    assert counts["annotations_in"] == counts["annotations"] + counts["annotations_rejected"] + counts["skipped"]
    assert counts["rejected"] == counts["tasks_rejected"] + counts["annotations_rejected"] + counts["tasks_deleted"]


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_shape_is_one_reject_naming_the_field(tmp_path: Path, case: str) -> None:
    entry, reason, words = HOSTILE[case]
    ws = _ws(tmp_path)
    # tasks 101/102 are re-exported unless the case replaced 101 (a task id the case broke counts as deleted)
    export = [_good(), entry, _task(102, "i2")]
    counts = pull(ws, ExportClient(export), ROUND)
    rejects = [r for r in _rejects(ws) if r[1] != "task_deleted"]
    assert [r[1] for r in rejects] == [reason], rejects
    assert words in rejects[0][2], rejects  # the detail names the field
    _balanced(counts)
    assert len(rejects[0][2]) <= 4000, "details stay bounded"
    assert counts["annotations"] == 1 and counts["reasons"][reason] == 1
    assert ws.execute("SELECT annotation_id, item_id, annotator FROM annotations") == [(1, "i0", "ann7@fvqa.test")]
    assert pull(ws, ExportClient(export), ROUND) == counts, "a re-pull replaces, never adds, rejects"
    assert len(_rejects(ws)) == counts["rejected"]


def test_legitimate_variants_are_stored_or_skipped_with_a_count(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    export = [
        _good(),
        _task("101", "i1", _ann("2", KEEP, user={"id": 8, "email": "ann8@fvqa.test"}),  # ids as strings, user expanded
              _ann(3, KEEP, user="7", was_cancelled=None, lead_time=None, created_at=None, updated_at=None),
              _ann(4, user=8, was_cancelled=True) | {"result": []}),  # skipped in the UI
        _task(102, "i2", _ann(5, KEEP, _choice("knowledge_type"), _text("comment", ["ok", "fine"]),
                              {"from_name": "other_tool", "value": {"rating": 4}},  # a control fvqa does not define
                              user={"id": 99, "email": "new@fvqa.test"}, extra_field={"anything": [1, 2]})),
    ]
    counts = pull(ws, ExportClient(export), ROUND)
    _balanced(counts)
    assert (counts["annotations_in"], counts["annotations"], counts["rejected"]) == (5, 4, 0)
    assert counts["skipped_reasons"] == {"cancelled in Label Studio": 1}
    rows = ws.execute("SELECT annotation_id, task_id, annotator, annotator_id, comment FROM annotations "
                      "ORDER BY annotation_id")
    assert rows == [(1, 100, "ann7@fvqa.test", 7, None), (2, 101, "ann8@fvqa.test", 8, None),
                    (3, 101, "ann7@fvqa.test", 7, None), (5, 102, "new@fvqa.test", 99, "ok\nfine")]


def test_duplicate_annotation_id_keeps_the_first_and_rejects_the_copy(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    export = [_good(), _task(101, "i1", _ann(1, _choice("verdict", "reject"), user=8)), _task(102, "i2")]
    counts = pull(ws, ExportClient(export), ROUND)
    _balanced(counts)
    assert ws.execute("SELECT annotation_id, item_id, verdict FROM annotations") == [(1, "i0", "keep")]
    assert [(r[0], r[1]) for r in _rejects(ws)] == [(f"{ROUND}/task 101/annotation 1", "duplicate_id")]
    assert "first seen in task 100" in _rejects(ws)[0][2]


def test_duplicate_task_id_is_one_reject_not_a_merge(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    export = [_good(), _task(100, "i0", _ann(9, _choice("verdict", "reject"), user=8)), _task(101, "i1"),
              _task(102, "i2")]
    counts = pull(ws, ExportClient(export), ROUND)
    _balanced(counts)
    assert counts["annotations"] == 1 and counts["tasks_rejected"] == 1
    assert [(r[0], r[1]) for r in _rejects(ws)] == [(f"{ROUND}/task 100", "duplicate_id")]


def test_anonymous_annotators_are_never_merged(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    export = [_task(100, "i0", _ann(1, KEEP, user=None), _without(_ann(2, _choice("verdict", "reject")), "completed_by")),
              _task(101, "i1", _ann(3, KEEP, user=None), _ann(4, KEEP, user=None))]
    counts = pull(ws, ExportClient(export), ROUND)
    assert counts["anonymous"] == 4 and counts["superseded"] == 0
    assert sorted(r[0] for r in ws.execute("SELECT DISTINCT annotator FROM annotations")) == [
        "anonymous:1", "anonymous:2", "anonymous:3", "anonymous:4"]
    assert [d["item_id"] for d in disagreements(ws, ROUND)] == ["i0"], "their disagreement is visible"
    s = summarize(ws, ROUND)
    assert s.annotated == 2 and s.agreement["verdict"][0] == "krippendorff_alpha"
    assert apply(ws, ROUND) == {"kept": 1, "disagreement": 1, "applied": 1}


def test_same_annotator_twice_latest_update_counts_and_is_reported(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    export = [_task(100, "i0",
                    _ann(1, KEEP, updated_at="2026-01-02T09:00:00Z"),
                    _ann(2, _choice("verdict", "reject"), updated_at="2026-01-01T09:00:00Z"),  # higher id, older
                    _ann(3, KEEP, user=8))]
    counts = pull(ws, ExportClient(export), ROUND)
    _balanced(counts)
    assert (counts["annotations"], counts["superseded"], counts["superseded_changed"]) == (3, 1, 1)
    assert ws.count("annotations") == 3, "the superseded annotation is kept as a row, not dropped"
    assert apply(ws, ROUND) == {"kept": 1, "applied": 1}


def test_deeply_nested_export_is_one_clear_error(tmp_path: Path) -> None:
    ws = _ws(tmp_path)
    payload = ('[{"id": 100, "data": {"item_id": "i0"}, "annotations": [{"id": 1, "result": '
               + "[" * 100_000 + "]" * 100_000 + "}]}]").encode()
    with pytest.raises(FvqaError, match="nested too deeply"):
        pull(ws, ExportClient(payload), ROUND)
    ok = json.dumps([_good()]).encode()
    assert pull(ws, ExportClient(ok), ROUND)["annotations"] == 1


def test_cli_pull_summary_adds_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = _ws(tmp_path)
    ws.close()
    export = [_good(), "junk", _task(101, "i1", _ann(2, _choice("verdict", "maybe")), _ann(3, KEEP, was_cancelled=True),
                                     _ann(4, KEEP, user=None))]
    monkeypatch.setattr(cli, "_client", lambda *a: ExportClient(export))
    res = CliRunner().invoke(cli.annotate_app, ["pull", "--round", ROUND, "--workspace", str(tmp_path / "ws")])
    assert res.exit_code == 0, res.output
    assert ("round r1: 3 tasks (1 rejected, 1 deleted in Label Studio); 4 annotations: 2 stored, 1 rejected, "
            "1 skipped") in res.output.replace("\n", " ").replace("  ", " ")
    for line in ("rejected 1: wrong_type", "rejected 1: unknown_value",
                 "rejected 1: task_deleted", "skipped 1: cancelled in Label Studio",
                 "1 stored annotations have no annotator"):
        assert line in res.output
