"""Hostile records at every door: each one next to a good record, in the official file format, through the
real reader. The good record is kept, the bad one is a reject with a fixed reason code and a detail naming
the field, nothing raises, and the numbers add up (in == out + rejects).

Doors: the ``infoseek`` build stage (jsonl + companions), ``import_upstream`` (what ``fvqa
import-upstream`` calls; parquet), and ``load_benchmark`` (what ``fvqa eval`` calls; the five
benchmarks' files as ``fvqa/demo/benchmarks.py`` writes them). In a parquet file a column has one
type, so a wrong-typed ``prompt`` or ``reward_model`` is wrong for every row of its file: those cases
hold two hostile rows and no good one (``both``).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console

from fvqa.config import InfoseekConfig, RunConfig
from fvqa.errors import ConfigError
from fvqa.eval.benchmarks import load_benchmark
from fvqa.eval.config import BenchmarkSpec
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.import_upstream import import_upstream
from fvqa.pipelines.infoseek import InfoseekStage
from fvqa.store import Workspace

WRONG = "wrong_type"
DEEP = "[" * 100_000 + "]" * 100_000  # past any JSON parser's nesting limit
NESTED = "[" * 400 + "]" * 400  # parses, but is no string


def _jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 64), (seed * 37 % 256, 90, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def _jsonl(path: Path, lines: list[dict[str, Any] | str]) -> None:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))


# ------------------------------------------------------------------------------- infoseek stage

INFOSEEK_CASES = [
    # (main-line overrides or a raw line, qtype of the bad row, withkb entity_id of the bad row, reason, in detail)
    pytest.param({"question": 5}, "String", "Q2", WRONG, "question: expected a string, got integer 5",
                 id="question-int"),  # old: ArrowTypeError at commit
    pytest.param({"question": None}, "String", "Q2", "field_missing", "missing question",
                 id="question-null"),  # old: the same reject (a guard)
    pytest.param({"question": ["Which city?"]}, "String", "Q2", WRONG, "question: expected a string, got array",
                 id="question-list"),  # old: ArrowTypeError at commit
    pytest.param({"answer": [None]}, "String", "Q2", WRONG, "answer[0]:", id="answer-null-entry"),  # old: answer "None"
    pytest.param({"answer": [{"a": 1}]}, "String", "Q2", WRONG, "answer[0]: expected a string or number",
                 id="answer-dict-entry"),  # old: answer "{'a': 1}"
    pytest.param({"answer": True}, "String", "Q2", WRONG, "got boolean True", id="answer-bool"),  # old: kept, answer "True"
    pytest.param({"data_id": ["bad"]}, "String", "Q2", WRONG, "data_id: expected a string or integer id, got array",
                 id="data_id-list"),  # old: kept as item "infoseek-['bad']"
    pytest.param({"image_id": {"id": 1}}, "String", "Q2", WRONG, "image_id:", id="image_id-object"),
    pytest.param({}, [1], "Q2", WRONG, "infoseek_val_qtype.jsonl line 2: question_type: expected a string, got array",
                 id="question_type-unhashable"),  # old: TypeError (unhashable) while sampling
    pytest.param({}, "String", {"x": 1}, WRONG, "infoseek_val_withkb.jsonl line 2: entity_id:",
                 id="entity_id-unhashable"),  # old: TypeError (unhashable) in the per-entity cap
    pytest.param({"answer_eval": [{"wikidata": json.loads(NESTED), "range": [1, 2]}]}, "String", "Q2",
                 "malformed_answer_eval", "wikidata must be a number or string, got array",
                 id="answer_eval-nested-wikidata"),  # old: kept, alias "[[[...]]]"
    pytest.param('{"data_id": "bad", "question": ' + DEEP + "}", "String", "Q2", "malformed_json",
                 "JSON nested too deeply to read", id="deep-json-line"),  # old: the same reject (a guard)
    pytest.param({"question": json.loads(NESTED)}, "String", "Q2", WRONG, "question: expected a string, got array",
                 id="nested-question"),  # old: ArrowTypeError at commit
]


def _infoseek_files(folder: Path, bad: dict[str, Any] | str, qtype: Any, entity: Any) -> Path:
    (folder / "images").mkdir(parents=True)
    good = dict(data_id="good", image_id="img_good", question="Which city is this?", answer=["Paris"],
                answer_eval=["Paris"], data_split="val")
    bad_line = bad if isinstance(bad, str) else {**good, "data_id": "bad", "image_id": "img_bad", **bad}
    main = folder / "infoseek_val.jsonl"
    _jsonl(main, [good, bad_line])
    _jsonl(folder / "infoseek_val_qtype.jsonl", [{"data_id": "good", "question_type": "String"},
                                                 {"data_id": "bad", "question_type": qtype}])
    _jsonl(folder / "infoseek_val_withkb.jsonl", [{"data_id": "good", "entity_id": "Q1", "entity_text": "Paris"},
                                                  {"data_id": "bad", "entity_id": entity, "entity_text": "Lyon"}])
    for n, name in enumerate(("img_good", "img_bad")):
        (folder / "images" / f"{name}.jpg").write_bytes(_jpeg(n))
    return main


@pytest.mark.parametrize(("bad", "qtype", "entity", "reason", "detail"), INFOSEEK_CASES)
def test_infoseek_stage(tmp_path: Path, bad: Any, qtype: Any, entity: Any, reason: str, detail: str) -> None:
    main = _infoseek_files(tmp_path / "in", bad, qtype, entity)
    config = RunConfig(workspace=tmp_path / "ws",
                       infoseek=InfoseekConfig(jsonl=main, stratify=["question_type"], n=100))
    with Workspace(config.workspace) as ws:
        stats = execute_stage(InfoseekStage(), ws, config, Console(quiet=True))
        items = [r[0] for r in ws.execute("SELECT item_id FROM items")]
        rejects = ws.execute("SELECT reason, detail FROM rejects WHERE stage = 'infoseek'")
    assert items == ["infoseek-good"]
    assert len(rejects) == 1 and rejects[0][0] == reason and detail in rejects[0][1], rejects
    assert "line 2" in rejects[0][1]
    assert stats.n_in == 2 == stats.n_out + stats.n_rejected


def test_numeric_answers_are_text_not_rejects(tmp_path: Path) -> None:
    """InfoSeek files hold numeric answers as numbers too: a list of ints is an answer, not a wrong type."""
    main = _infoseek_files(tmp_path / "in", {"answer": [1889, 1890], "answer_eval": None}, "Time", "Q2")
    config = RunConfig(workspace=tmp_path / "ws",
                       infoseek=InfoseekConfig(jsonl=main, stratify=["question_type"], n=100))
    with Workspace(config.workspace) as ws:
        execute_stage(InfoseekStage(), ws, config, Console(quiet=True))
        assert dict(ws.execute("SELECT item_id, answer FROM items")) == {"infoseek-good": "Paris",
                                                                         "infoseek-bad": "1889"}


def test_image_pattern_with_an_unknown_field_is_a_one_line_config_error(tmp_path: Path) -> None:
    """Old: a KeyError ('ext') from the first image lookup, mid-build."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("infoseek:\n  image_pattern: '{image_id}.{ext}'\n")
    from fvqa.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "image_pattern" in str(err.value) and "{image_id}" in str(err.value)
    assert "Traceback" not in str(err.value)


# ------------------------------------------------------------------------------- import-upstream


def _upstream_row(data_id: Any = "good", **over: Any) -> dict[str, Any]:
    row = {
        "prompt": [{"content": "<image>Who made this?", "role": "user"}],
        "images": [{"bytes": _jpeg(1), "path": None}],
        "reward_model": {"candidate_answers": '["Ann", "Anne"]', "ground_truth": "Ann", "style": "rule"},
        "data_source": "mmsearch_r1/fvqa_test", "data_id": data_id, "image_urls": None,
        "category": "search_free",
    }
    row.update(over)
    return row


UPSTREAM_CASES = [
    # (the bad row's overrides, the good row's overrides, both rows hostile, reason, in detail)
    pytest.param({"prompt": "Who made this?"}, {}, True, WRONG, "prompt: expected a list of {role, content} messages",
                 id="prompt-string"),  # old: AttributeError ('str' has no .get)
    pytest.param({"prompt": [{"role": "user", "content": 5}]}, {}, True, WRONG,
                 "prompt[0].content: expected a string, got integer 5", id="prompt-content-int"),  # old: ArrowTypeError
    pytest.param({"prompt": []}, {}, False, "no_question", "", id="prompt-empty"),  # old: same (guard)
    pytest.param({"reward_model": "Ann"}, {}, True, WRONG, "reward_model: expected an object", id="reward-string"),
    pytest.param({"reward_model": {"ground_truth": ["Ann"], "candidate_answers": "[]", "style": "rule"}}, {}, True,
                 WRONG, "reward_model.ground_truth: expected a string, got array", id="ground_truth-list"),
    pytest.param({"reward_model": {"ground_truth": "Ann", "candidate_answers": 5, "style": "rule"}},
                 {"reward_model": {"ground_truth": "Ann", "candidate_answers": None, "style": "rule"}}, False, WRONG,
                 "reward_model.candidate_answers: expected a JSON list of strings (or a list), got integer 5",
                 id="candidates-int"),  # old: reject "candidate_answers is not a JSON list"
    pytest.param({"reward_model": {"ground_truth": "Ann", "candidate_answers": DEEP, "style": "rule"}}, {}, False,
                 "malformed_json", "nested too deeply", id="candidates-deep-json"),
    pytest.param({"reward_model": {"ground_truth": "Ann", "candidate_answers": "not json", "style": "rule"}}, {},
                 False, "malformed_json", "reward_model.candidate_answers", id="candidates-not-json"),
    pytest.param({"reward_model": {"ground_truth": "Ann", "candidate_answers": '"Ann"', "style": "rule"}}, {},
                 False, WRONG, "expected a JSON list, got string", id="candidates-json-string"),
    pytest.param({"images": [{"bytes": "abc", "path": None}]}, {"images": None}, False, WRONG,
                 "images[0].bytes: expected the image's bytes, got string 'abc'", id="image-bytes-string"),
    pytest.param({"images": [{"bytes": -1, "path": None}]}, {"images": None}, False, WRONG,
                 "images[0].bytes: expected the image's bytes, got integer -1", id="image-bytes-negative"),
    pytest.param({"images": "img.jpg"}, {"images": None}, False, WRONG, "images: expected a list", id="images-string"),
    pytest.param({"data_id": ["bad"]}, {"data_id": None}, False, WRONG, "data_id: expected a string or integer id",
                 id="data_id-list"),  # old: imported as item "import-['bad']"
]


@pytest.mark.parametrize(("bad", "good", "both", "reason", "detail"), UPSTREAM_CASES)
def test_import_upstream(tmp_path: Path, bad: dict[str, Any], good: dict[str, Any], both: bool, reason: str,
                         detail: str) -> None:
    rows = [{**_upstream_row("b1" if both else "good"), **(bad if both else good)}, {**_upstream_row("bad"), **bad}]
    src = tmp_path / "fvqa_test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    with Workspace(tmp_path / "ws") as ws:
        counts = import_upstream(ws, src)
        items = [r[0] for r in ws.execute("SELECT item_id FROM items")]
        rejects = ws.execute("SELECT reason, detail FROM rejects WHERE stage = 'import'")
    assert len(rows) == counts["imported"] + counts["skipped"] + counts["rejected"] == len(items) + len(rejects)
    if both:
        assert items == [] and len(rejects) == 2
    else:
        assert len(items) == 1 and items[0].startswith("import-") and "bad" not in items[0]
        assert len(rejects) == 1
    assert all(r[0] == reason and detail in r[1] for r in rejects), rejects


# ------------------------------------------------------------------------------- eval loaders


def _bench(tmp_path: Path, kind: str, bad: dict[str, Any] | str, *, good: dict[str, Any] | None = None,
           both: bool = False) -> BenchmarkSpec:
    """One good row and one hostile row in `kind`'s official format (as fvqa/demo/benchmarks.py)."""
    root = tmp_path / "bench"
    (root / "img").mkdir(parents=True)
    (root / "img" / "0.jpg").write_bytes(_jpeg(2))
    if kind == "fvqa":
        first = {**_upstream_row("fvqa_good"), **(bad if both else good or {})}
        rows = [first, {**_upstream_row("fvqa_bad"), **bad}]  # type: ignore[dict-item]
        pq.write_table(pa.Table.from_pylist(rows), root / "fvqa_test.parquet")
        return BenchmarkSpec(name="fvqa_test", kind="fvqa", path=root / "fvqa_test.parquet")
    if kind == "infoseek":
        (root / "img" / "oven_1.jpg").write_bytes(_jpeg(3))
        line = dict(data_id="good", image_id="oven_1", question="Who made this?", answer=["Ann"],
                    answer_eval=["Ann"], data_split="val_unseen_entity")
        bad_line = bad if isinstance(bad, str) else {**line, "data_id": "bad", **bad}
        _jsonl(root / "infoseek_val.jsonl", [line, bad_line])
        _jsonl(root / "infoseek_val_qtype.jsonl", [{"data_id": "good", "question_type": "String"},
                                                   {"data_id": "bad", "question_type": "String"}])
        return BenchmarkSpec(name="infoseek", kind="infoseek", path=root / "infoseek_val.jsonl",
                             image_dir=root / "img")
    if kind == "mmsearch":
        rec = {"sample_id": "good", "query": "Who made this?", "query_image": "img/0.jpg", "gt_answer": "Ann",
               "alternative_gt_answers": [], "area": "news", "subfield": "art"}
        (root / "mmsearch_end2end.json").write_text(json.dumps([rec, {**rec, "sample_id": "bad", **bad}]))
        return BenchmarkSpec(name="mmsearch", kind="mmsearch", path=root / "mmsearch_end2end.json")
    if kind == "simplevqa":
        rec = {"data_id": 100, "image": base64.b64encode(_jpeg(4)).decode(), "question": "Who made this?",
               "answer": "Ann", "language": "EN", "vqa_category": "art"}
        (root / "simplevqa.json").write_text(json.dumps([rec, {**rec, "data_id": 101, **bad}]))
        return BenchmarkSpec(name="simplevqa", kind="simplevqa", path=root / "simplevqa.json")
    rec = {"id": "good", "image": "img/0.jpg", "question": "Who made this?", "answer": ["Ann"], "topic": "culture"}
    _jsonl(root / "livevqa.jsonl", [rec, bad if isinstance(bad, str) else {**rec, "id": "bad", **bad}])
    return BenchmarkSpec(name="livevqa", kind="livevqa", path=root / "livevqa.jsonl")


EVAL_CASES = [
    # (benchmark, the bad row's overrides or raw line, reason, in detail)
    pytest.param("livevqa", {"image": {"bytes": "abc"}}, WRONG, "image.bytes: expected the image's bytes, got string",
                 id="livevqa-image-bytes-string"),  # old: TypeError (bytes("abc"))
    pytest.param("livevqa", {"image": {"bytes": -1}}, WRONG, "image.bytes: expected the image's bytes, got integer -1",
                 id="livevqa-image-bytes-negative"),  # old: ValueError (negative count)
    pytest.param("livevqa", {"image": {"bytes": 10**12}}, WRONG, "got integer 1000000000000",
                 id="livevqa-image-bytes-huge"),  # old: bytes(10**12): MemoryError (a terabyte); not run on old code
    pytest.param("livevqa", {"image": -1}, WRONG, "image: expected bytes, a path, base64 text or {bytes, path}",
                 id="livevqa-image-int"),  # old: reject "no image"
    pytest.param("livevqa", {"image": "img/missing.jpg"}, "image_missing", "image file not found",
                 id="livevqa-image-missing"),
    pytest.param("livevqa", {"question": ["Who?"]}, WRONG, "question: expected a string or number, got array",
                 id="livevqa-question-list"),  # old: reject "missing or empty question / query"
    pytest.param("livevqa", {"answer": [None]}, WRONG, "answer[0]: expected a string, got null",
                 id="livevqa-answer-null-entry"),  # old: reject "answer holds a NoneType, expected strings"
    pytest.param("livevqa", '{"id": "bad", "question": ' + DEEP + "}", "malformed_json", "nested too deeply",
                 id="livevqa-deep-json-line"),  # old: the same reject (a guard)
    pytest.param("mmsearch", {"query_image": {"bytes": "abc"}}, WRONG, "image.bytes:", id="mmsearch-image-bytes-string"),
    pytest.param("mmsearch", {"gt_answer": {"text": "Ann"}}, WRONG, "gt_answer: expected a string or number, got object",
                 id="mmsearch-answer-object"),  # old: reject "missing or empty gt_answer"
    pytest.param("simplevqa", {"language": ["EN"]}, WRONG, "language: expected a string or number, got array",
                 id="simplevqa-language-list"),  # old: silently filtered as "language is not EN"
    pytest.param("infoseek", {"question": 5}, WRONG, "question: expected a string, got integer 5",
                 id="infoseek-question-int"),  # old: kept, question "5"
    pytest.param("infoseek", {"data_id": ["bad"]}, WRONG, "data_id: expected a string or integer id, got array",
                 id="infoseek-data_id-list"),  # old: reject "missing or empty data_id"
    pytest.param("infoseek", {"question_type": [1]}, WRONG, "question_type: expected a string or number, got array",
                 id="infoseek-question_type-list"),  # old: reject "unknown InfoSeek question type '[1]'"
    pytest.param("fvqa", {"reward_model": {"ground_truth": "Ann", "candidate_answers": DEEP, "style": "rule"}},
                 "malformed_json", "reward_model.candidate_answers: JSON nested too deeply to read",
                 id="fvqa-candidates-deep-json"),  # old: reject "... is nested too deeply to read"
    pytest.param("fvqa", {"images": [{"bytes": "abc", "path": None}]}, WRONG, "images[0].bytes:",
                 id="fvqa-image-bytes-string"),  # whole column (both rows); old: TypeError
    pytest.param("fvqa", {"reward_model": "Ann"}, WRONG, "reward_model: expected an object",
                 id="fvqa-reward-string"),  # whole column (both rows); old: AttributeError ('str' has no .get)
    pytest.param("fvqa", {"prompt": []}, "no_question", "", id="fvqa-prompt-empty"),  # guard
]
_WHOLE_COLUMN = {"fvqa-image-bytes-string", "fvqa-reward-string"}


@pytest.mark.parametrize(("kind", "bad", "reason", "detail"), EVAL_CASES)
def test_eval_loaders(tmp_path: Path, request: pytest.FixtureRequest, kind: str, bad: Any, reason: str,
                      detail: str) -> None:
    both = request.node.callspec.id in _WHOLE_COLUMN
    res = load_benchmark(_bench(tmp_path, kind, bad, both=both))
    assert res.n_rows == 2 == len(res.items) + len(res.rejects) + sum(res.filtered.values())
    assert len(res.items) == (0 if both else 1) and len(res.rejects) == (2 if both else 1), res.rejects
    for rej in res.rejects:
        assert rej.reason.startswith(reason) and detail in rej.detail, rej
