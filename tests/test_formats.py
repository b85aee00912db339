"""fvqa.formats: the one JSONL reader (and its callers' bad-line outcomes), the one candidate-answer
rule and the one veRL row writer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fvqa.errors import ConfigError
from fvqa.formats.jsonl import BadLine, parse_jsonl, read_jsonl
from fvqa.formats.verl import AGENT_NAME, VERL_SCHEMA, candidate_answers, verl_row
from fvqa.store import Workspace

NESTED = "[" * 100_000 + "]" * 100_000


# ------------------------------------------------------------------------------------------- jsonl


def test_reader_yields_records_and_bad_lines_with_their_numbers(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + b'{"a": 1}\n'  # 1: a byte-order mark is ignored
        b"\n   \n"  # 2, 3: blank lines are skipped but counted
        b'{"a": \n'  # 4: not JSON
        b"[1, 2]\n"  # 5: JSON, but not an object
        b'{"a": "caf\xe9"}\n'  # 6: latin-1, not UTF-8
        + NESTED.encode() + b"\n"  # 7: nested too deeply (RecursionError) is a bad line, not a crash
        + '{"text": "one\u2028line\x85still"}\r\n'.encode()  # 8: U+2028 / NEL do not split a line
        + b'{"last": true}'  # 9: no final newline
    )
    got = list(read_jsonl(path))
    assert got[0] == (1, {"a": 1})
    bad = {r.line_no: r.reason for r in got if isinstance(r, BadLine)}
    assert set(bad) == {4, 5, 6, 7}
    assert "at column" in bad[4]
    assert bad[5] == "line is not a JSON object (got a JSON array)"
    assert bad[6] == "not valid UTF-8 (byte 10)"
    assert bad[7] == "JSON nested too deeply to read"
    assert got[-2] == (8, {"text": "one\u2028line\x85still"})
    assert got[-1] == (9, {"last": True})
    assert str(BadLine(4, "why")) == "line 4: why"


def test_parse_jsonl_takes_text_or_lines_and_streams() -> None:
    text = '{"a": 1}\n\nnope\n{"b": 2}\n'
    assert list(parse_jsonl(text)) == [(1, {"a": 1}), BadLine(3, "Expecting value at column 1"), (4, {"b": 2})]
    assert list(parse_jsonl(text.encode())) == list(parse_jsonl(text))

    def lines():
        yield b'{"first": 1}\n'
        raise AssertionError("read past the first record")

    assert next(parse_jsonl(lines())) == (1, {"first": 1})  # one line at a time, not the whole file


def test_callers_turn_bad_lines_into_one_line_errors(tmp_path: Path) -> None:
    from fvqa.pipelines.concepts import load_categories
    from fvqa.pipelines.split.leakage import read_benchmark

    cats = tmp_path / "cats.jsonl"
    cats.write_text('{"concept": "Eiffel Tower", "category": "Place"}\n"just a string"\n')
    with pytest.raises(ConfigError, match=r"cats\.jsonl:2: line is not a JSON object"):
        load_categories(cats)
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"question": "Who?"}\n' + NESTED + "\n")
    with pytest.raises(ConfigError, match="cannot read .*line 2: JSON nested too deeply"):
        read_benchmark(bench)


def test_benchmark_bad_lines_are_rejects_and_a_bad_subset_file_is_an_error(tmp_path: Path) -> None:
    from fvqa.eval.benchmarks import load_benchmark
    from fvqa.eval.config import BenchmarkSpec

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    path = tmp_path / "live.jsonl"
    path.write_text('{"id": "q1", "image": "a.png", "question": "What?", "answer": "red"}\n' + NESTED + "\n[]\n")
    res = load_benchmark(BenchmarkSpec(name="live", kind="livevqa", path=path))
    assert [it.item_id for it in res.items] == ["q1"]
    assert {(r.key, r.reason) for r in res.rejects} == {
        ("line 2", "malformed_json"),
        ("line 3", "wrong_type"),
    }
    assert res.n_rows == 3
    subset = tmp_path / "subset.jsonl"
    subset.write_text('{"id": "q1"}\n{"id": \n')
    with pytest.raises(ConfigError, match=r"subset file .*line 2"):
        load_benchmark(BenchmarkSpec(name="live", kind="livevqa", path=path, subset=subset))


# ---------------------------------------------------------------------------------- candidate rule


def test_candidate_rule_normalises_white_space_and_drops_empties_and_exact_duplicates() -> None:
    assert candidate_answers(["  Spain ", "Kingdom  of\tSpain", "", "   ", "Spain", None, True, 1492, 2.5, ["x"]]) == [
        "Spain", "Kingdom of Spain", "1492", "2.5"]
    assert candidate_answers([]) == [] and candidate_answers(None) == []
    # spellings that differ in case or punctuation are kept (upstream's lists hold them)
    assert candidate_answers(["Sakyamuni", "Sakya-muni", "sakyamuni"]) == ["Sakyamuni", "Sakya-muni", "sakyamuni"]


def test_upstream_shaped_lists_pass_the_rule_unchanged() -> None:
    """Upstream's lists (see ../shared/samples) hold the ground truth at any position, codes, flag emoji,
    diacritics and punctuation variants: clean lists of that shape come out exactly as they went in."""
    lists = [
        ("Norway", ["Kingdom of Norway", "NOR", "\U0001f1f3\U0001f1f4", "NO", "Norway"]),
        ("Gautama Buddha", ["Siddh\u0101rtha Gautama", "Gautama Buddha", "Sakyamuni", "Sakya-muni", "Buddha"]),
        ("1889", ["1889"]),
    ]
    for truth, cands in lists:
        assert candidate_answers(cands) == cands and truth in cands


def test_clean_aliases_is_the_same_rule_with_the_answer_first() -> None:
    from fvqa.textgen.qa import clean_aliases

    assert clean_aliases(" Eiffel Tower ", ["Tour Eiffel", "Eiffel  Tower", "", "eiffel tower"]) == [
        "Eiffel Tower", "Tour Eiffel", "eiffel tower"]
    assert clean_aliases("A", []) == candidate_answers(["A"])


# --------------------------------------------------------------------------------------- row writer


def test_released_and_training_rows_share_one_writer() -> None:
    common = dict(prompt="What is this?", images=[{"bytes": b"img", "path": None}], ground_truth="Zürich",
                  candidates=["Zürich", "Zurich"], data_source="mmsearch_r1/fvqa_train", data_id=None, item_id="i-1")
    released = verl_row(layout="released", image_urls=None, category="search_free", **common)
    assert list(released) == ["prompt", "images", "reward_model", "data_source", "image_urls", "data_id", "category"]
    assert released["prompt"] == [{"content": "What is this?", "role": "user"}]
    assert released["reward_model"] == {"candidate_answers": '["Z\\u00fcrich", "Zurich"]', "ground_truth": "Zürich",
                                        "style": "rule"}
    assert released["data_id"] == "i-1"  # no upstream id: the item id
    training = verl_row(layout="training", extra_info={"index": 3, "split": "train"}, **{**common, "data_id": "u7"})
    assert json.loads(training["reward_model"]["candidate_answers"]) == ["Zürich", "Zurich"]
    assert training["extra_info"] == {"item_id": "i-1", "index": 3, "split": "train", "data_id": "u7",
                                      "candidate_answers": ["Zürich", "Zurich"]}
    assert training["agent_name"] == AGENT_NAME and training["ability"] == "fvqa"
    assert set(training) <= set(VERL_SCHEMA.names)
    with pytest.raises(ValueError, match="unknown layout"):
        verl_row(layout="other", **common)  # type: ignore[arg-type]


def test_native_export_carries_data_id_to_evaluation(tmp_path: Path) -> None:
    """items.data_id goes out in the native export and comes back as EvalItem.data_id (replay key)."""
    from fvqa.eval.benchmarks import load_benchmark
    from fvqa.eval.config import BenchmarkSpec
    from fvqa.pipelines.export import export_all

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, format="PNG")
    with Workspace(tmp_path / "ws") as ws:
        sha = ws.put_image(buf.getvalue()).sha256
        ws.insert("items", [dict(item_id="import-u1", source="import", data_id="u1", question="What?", answer="Blue",
                                 aliases=["Blue"], image_sha256=sha),
                            dict(item_id="metaclip-c1", source="metaclip", question="Who?", answer="Red",
                                 aliases=["Red"], image_sha256=sha)])
        ws.insert("splits", [dict(item_id="import-u1", split="test"), dict(item_id="metaclip-c1", split="test")])
        [native] = export_all(ws, ["native"])["native"]
        images = ws.root / "images"
    assert pq.read_table(native).column("data_id").to_pylist() == ["u1", None]
    res = load_benchmark(BenchmarkSpec(name="fvqa", kind="fvqa", path=native, image_dir=images))
    assert {it.item_id: it.data_id for it in res.items} == {"import-u1": "u1", "metaclip-c1": None}
