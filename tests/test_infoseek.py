"""InfoSeek: official-format rows (numeric ranges, unicode) become items; bad input becomes rejects."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rich.console import Console

from fvqa.config import InfoseekConfig, RunConfig
from fvqa.formats.infoseek import aliases_of, check_answer_eval
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.infoseek import InfoseekStage
from fvqa.pipelines.sampling import balanced_sample
from fvqa.store import Workspace


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 64), (seed * 37 % 256, seed * 91 % 256, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def _row(i: int, **over: Any) -> dict[str, Any]:
    row = dict(data_id=f"infoseek_val_{i:08d}", image_id=f"oven_{i:08d}", question="Which city is this?",
               answer=["Paris"], answer_eval=["Paris", "Paris, France"], data_split="val")
    row.update(over)
    return row


def _write(folder: Path, lines: list[str | dict[str, Any] | bytes], kb: dict[str, tuple[str, str]],
           qtype: dict[str, str], images: dict[str, bytes]) -> Path:
    (folder / "images").mkdir(parents=True)
    main = folder / "infoseek_val.jsonl"
    with main.open("wb") as fh:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            fh.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    with (folder / "infoseek_val_withkb.jsonl").open("w", encoding="utf-8") as fh:
        for did, (eid, text) in kb.items():
            fh.write(json.dumps({"data_id": did, "entity_id": eid, "entity_text": text}, ensure_ascii=False) + "\n")
    with (folder / "infoseek_val_qtype.jsonl").open("w", encoding="utf-8") as fh:
        for did, qt in qtype.items():
            fh.write(json.dumps({"data_id": did, "question_type": qt}) + "\n")
    for image_id, data in images.items():
        (folder / "images" / f"{image_id}.jpg").write_bytes(data)
    return main


def _run(tmp_path: Path, main: Path, **cfg: Any) -> tuple[Any, Path]:
    config = RunConfig(workspace=tmp_path / "ws", infoseek=InfoseekConfig(jsonl=main, **cfg))
    with Workspace(config.workspace) as ws:
        stats = execute_stage(InfoseekStage(), ws, config, Console(quiet=True))
    return stats, config.workspace


def _query(root: Path, sql: str) -> list[tuple]:
    with Workspace(root) as ws:
        return ws.execute(sql)


def test_official_rows_with_numeric_ranges_unicode_and_bad_input(tmp_path: Path):
    rows: list[Any] = [
        _row(1),
        _row(2, question="Wie hoch ist dieser Turm in Zürich?", answer=["Prime Tower 東京"],
             answer_eval=["Prime Tower 東京", "Prime Tower"]),
        _row(3, question="How tall is this building in metres?", answer=["126"],
             answer_eval={"wikidata": 126.0, "range": [113.4, 138.6]}),
        _row(4, question="In what year was it built?", answer=["1889"],
             answer_eval=[{"wikidata": 1889, "range": [1889, 1889]}]),  # a list holding one dict
        '{"data_id": "infoseek_val_broken", "question": ',  # line 5: malformed
        _row(6),  # its image is missing
        _row(7, answer=[]),  # no answer
        _row(8, answer_eval={"wikidata": 5, "range": [9, 1]}),  # low > high
        b'{"data_id": "x", "question": "caf\xe9"}',  # line 9: latin-1, not UTF-8
        _row(10),  # an HTML page saved as .jpg
        _row(1),  # duplicate data_id
    ]
    kb = {f"infoseek_val_{i:08d}": (f"Q{i}", f"Entity {i}") for i in range(1, 11)}
    qt = {f"infoseek_val_{i:08d}": q for i, q in zip(range(1, 11), ["String", "String", "Numerical", "Time"] * 3,
                                                         strict=False)}
    images = {f"oven_{i:08d}": _jpeg(i) for i in (1, 2, 3, 4, 7, 8)}
    images["oven_00000010"] = b"<html>not found</html>"
    main = _write(tmp_path / "in", rows, kb, qt, images)
    stats, root = _run(tmp_path, main, stratify=["question_type"], n=100)

    items = {r[0]: r[1:] for r in _query(root, "SELECT item_id, question, answer, aliases, answer_eval, "
                                               "question_type, entity_id, entity_text, provenance FROM items")}
    assert set(items) == {f"infoseek-infoseek_val_{i:08d}" for i in (1, 2, 3, 4)}
    q2 = items["infoseek-infoseek_val_00000002"]
    assert q2[0] == "Wie hoch ist dieser Turm in Zürich?" and q2[1] == "Prime Tower 東京"
    assert q2[2] == ["Prime Tower 東京", "Prime Tower"] and "東京" in q2[3]
    q3 = items["infoseek-infoseek_val_00000003"]
    assert json.loads(q3[3]) == {"wikidata": 126.0, "range": [113.4, 138.6]} and q3[4] == "Numerical"
    assert q3[2] == ["126"]
    q4 = items["infoseek-infoseek_val_00000004"]
    assert json.loads(q4[3]) == [{"wikidata": 1889, "range": [1889, 1889]}] and q4[2] == ["1889"]
    assert q2[5:7] == ("Q2", "Entity 2")
    assert json.loads(q2[7])["infoseek"]["line"] == 2
    data_ids = dict(_query(root, "SELECT item_id, data_id FROM items"))  # InfoSeek's id: a column
    assert data_ids == {f"infoseek-infoseek_val_{i:08d}": f"infoseek_val_{i:08d}" for i in (1, 2, 3, 4)}

    rejects = {r[0]: (r[1], r[2]) for r in _query(root, "SELECT key, reason, detail FROM rejects")}
    assert rejects["infoseek_val.jsonl:5"][0] == "malformed_json" and "line 5" in rejects["infoseek_val.jsonl:5"][1]
    assert rejects["infoseek_val.jsonl:9"] == ("malformed_json", "line 9: not valid UTF-8 (byte 33)")
    assert rejects["infoseek-infoseek_val_00000006"][0] == "image_missing"
    assert "oven_00000006" in rejects["infoseek-infoseek_val_00000006"][1]
    assert rejects["infoseek-infoseek_val_00000007"][0] == "answer_missing"
    assert rejects["infoseek-infoseek_val_00000008"][0] == "malformed_answer_eval"
    assert "low <= high" in rejects["infoseek-infoseek_val_00000008"][1]
    assert rejects["infoseek-infoseek_val_00000010"][0] == "image_format_unknown"
    assert rejects["infoseek_val.jsonl:11"][0] == "duplicate_id"
    assert stats.n_in == 11 and stats.n_out == 4 and stats.n_rejected == 7

    again, _ = _run(tmp_path, main, stratify=["question_type"], n=100)  # resume: nothing new, nothing twice
    assert again.n_out == 0
    assert _query(root, "SELECT count(*) FROM rejects")[0][0] == 7


def test_sample_is_even_over_strata_capped_per_entity_and_seeded(tmp_path: Path):
    kinds = ["Place", "Nature", "Arts"]
    qtypes = ["String", "Numerical"]
    rows, kb, qt, images = [], {}, {}, {}
    for i in range(120):
        did = f"infoseek_val_{i:08d}"
        rows.append(_row(i))
        kb[did] = (f"Q{i // 2}", f"Entity {i // 2}")  # 2 questions per entity
        qt[did] = qtypes[i % 2] if i < 100 else "Time"  # Time is a small stratum (20 rows)
        images[f"oven_{i:08d}"] = _jpeg(i)
    folder = tmp_path / "in"
    main = _write(folder, rows, kb, qt, images)
    types = folder / "types.csv"
    types.write_text("entity_id,knowledge_type\n" + "".join(f"Q{e},{kinds[e % 3]}\n" for e in range(60)))
    stats, root = _run(tmp_path, main, n=27, per_entity=1, knowledge_types=types)
    got = _query(root, "SELECT i.question_type, i.entity_id, i.provenance FROM items i")
    assert len(got) == 27
    strata = Counter((q, json.loads(p)["infoseek"]["stratum"]["knowledge_type"]) for q, _, p in got)
    assert len(strata) == 9 and set(strata.values()) == {3}  # 3 question types x 3 knowledge types
    assert len({e for _, e, _ in got}) == 27  # at most one question per entity
    assert json.loads(got[0][2])["infoseek"]["stratum"]["source"] == "file types.csv"

    stats2, root2 = _run(tmp_path / "again", main, n=27, per_entity=1, knowledge_types=types)
    assert sorted(_query(root2, "SELECT item_id FROM items")) == sorted(_query(root, "SELECT item_id FROM items"))


def test_balanced_sampler_uses_small_strata_fully_and_is_order_independent():
    rows = [{"id": i, "k": "big"} for i in range(90)] + [{"id": 100 + i, "k": "small"} for i in range(5)]
    picked = balanced_sample(rows, 20, strata=["k"], seed=3)
    assert Counter(r["k"] for r in picked) == {"small": 5, "big": 15}
    assert balanced_sample(list(reversed(rows)), 20, strata=["k"], seed=3) == picked
    assert balanced_sample(rows, 20, strata=["k"], seed=4) != picked
    assert balanced_sample(rows, 0, strata=["k"]) == [] and balanced_sample([], 5) == []


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (["a", "b"], True), (None, True), ([], True), ({"wikidata": 3.5, "range": [3, 4]}, True),
        ([{"wikidata": 3.5, "range": [3, 4]}], True), ({"wikidata": 2}, True),
        ({"range": [1]}, False), ({"range": ["a", "b"]}, False), ([True], False), ({"foo": 1}, False),
    ],
)
def test_answer_eval_validation(value: Any, ok: bool):
    assert (check_answer_eval(value) is None) == ok


def test_aliases_keep_answers_first_and_format_numbers():
    assert aliases_of(["126"], {"wikidata": 126.0, "range": [1, 2]}) == ["126"]
    assert aliases_of(["3.5 m"], [{"wikidata": 3.5}]) == ["3.5 m", "3.5"]
    assert aliases_of(["Köln"], ["Köln", "Cologne", " "]) == ["Köln", "Cologne"]


def test_missing_configured_files_are_config_errors(tmp_path: Path):
    from fvqa.errors import ConfigError

    main = _write(tmp_path / "in", [_row(1)], {}, {}, {})
    with pytest.raises(ConfigError, match="infoseek.knowledge_types not found"):
        _run(tmp_path, main, knowledge_types=tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match="infoseek.image_dir not found"):
        _run(tmp_path, main, image_dir=tmp_path / "no-images")


def _strata_world(tmp_path: Path, missing: set[int]) -> Path:
    """60 rows, 3 question types x 20, one entity each; the images of `missing` rows are absent."""
    rows, kb, qt, images = [], {}, {}, {}
    for i in range(60):
        did = f"infoseek_val_{i:08d}"
        rows.append(_row(i))
        kb[did] = (f"Q{i}", f"Entity {i}")
        qt[did] = ("String", "Numerical", "Time")[i % 3]
        if i not in missing:
            images[f"oven_{i:08d}"] = _jpeg(i)
    return _write(tmp_path / "in", rows, kb, qt, images)


def test_rows_without_images_are_replaced_from_their_own_stratum(tmp_path: Path):
    """Issue 19: '7,000 asked, 6,985 delivered' -- a missing image no longer shrinks the sample."""
    missing = {i for i in range(60) if i % 3 == 0 and i < 30}  # 10 of the 20 "String" rows have no image
    main = _strata_world(tmp_path, missing)
    stats, root = _run(tmp_path, main, stratify=["question_type"], n=24, per_entity=1)
    got = Counter(q for (q,) in _query(root, "SELECT question_type FROM items"))
    assert got == {"String": 8, "Numerical": 8, "Time": 8}  # asked 24: delivered 24, still even
    refused = _query(root, "SELECT key, reason FROM rejects")
    assert refused and {r for _, r in refused} == {"image_missing"}
    assert {int(k.rsplit("_", 1)[1]) for k, _ in refused} <= missing
    assert stats.n_out == 24 and stats.extra["strata"] == {"Numerical": 8, "String": 8, "Time": 8}

    # asking for more than there are rows with images: all of them, and the stage says why not more
    stats, root = _run(tmp_path / "more", main, stratify=["question_type"], n=100, per_entity=1)
    assert _query(root, "SELECT count(*) FROM items")[0][0] == 50 and stats.n_out == 50
    assert any("asked 100, delivered 50" in note and "10 without a usable image" in note for note in stats.notes)


def test_a_killed_run_continues_to_the_same_sample_with_nothing_twice(tmp_path: Path, monkeypatch):
    main = _strata_world(tmp_path, missing={3, 4, 5})
    _, whole = _run(tmp_path / "whole", main, stratify=["question_type"], n=30, seed=7)
    expected = sorted(_query(whole, "SELECT item_id FROM items"))
    expected_rejects = sorted(_query(whole, "SELECT key, reason FROM rejects"))
    assert expected_rejects  # a replaced row is on the way

    import fvqa.pipelines.infoseek as stage_mod

    calls = {"n": 0}
    real = stage_mod.aliases_of

    def dies_on_the_20th(*args: Any) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(stage_mod, "aliases_of", dies_on_the_20th)
    config = RunConfig(workspace=tmp_path / "ws", batch_size=8,
                       infoseek=InfoseekConfig(jsonl=main, stratify=["question_type"], n=30, seed=7))
    with pytest.raises(KeyboardInterrupt), Workspace(config.workspace) as ws:
        execute_stage(InfoseekStage(), ws, config, Console(quiet=True))
    partial = _query(config.workspace, "SELECT count(*) FROM items")[0][0]
    assert 0 < partial < 30
    monkeypatch.setattr(stage_mod, "aliases_of", real)
    with Workspace(config.workspace) as ws:
        again = execute_stage(InfoseekStage(), ws, config, Console(quiet=True))
    assert again.n_out == 30 - partial  # only what was missing
    assert sorted(_query(config.workspace, "SELECT item_id FROM items")) == expected
    assert sorted(_query(config.workspace, "SELECT key, reason FROM rejects")) == expected_rejects

    _, other = _run(tmp_path / "seed8", main, stratify=["question_type"], n=30, seed=8)
    assert sorted(_query(other, "SELECT item_id FROM items")) != expected  # the seed picks the sample


@pytest.mark.parametrize("raw", [
    b'{"data_id": "a", "answer": ["x", 1, 2.5]}\n', b'{"a": 1, "a": 2}', b'{"a": 123456789012345678901234567890}',
    b'{"a": -9223372036854775809}', b'{"a": 1e400}', b'{"a": NaN}', b'{"a": "\\ud800"}', b'\xef\xbb\xbf{"a": 1}',
    b'{"a": "caf\xe9"}', b'{"a": "x\x01y"}', b'[1, 2]', b'"text"', b'   \r\n', b'\xc2\xa0\n', b'{"a": 1} x',
    b'{"a": ' + b'[' * 700 + b']' * 700 + b'}', b'{"a": ' + b'[' * 5000 + b']' * 5000 + b'}',
    b'{"q": "' + b'7' * 30 + b'"}', b'{"a": 0.1, "b": -0, "c": 5e-324}',
])
def test_the_fast_line_parser_gives_the_general_parsers_verdicts(raw: bytes):
    from fvqa.formats.jsonl import parse_line, parse_line_fast

    for line_no in (1, 2):
        fast, general = parse_line_fast(raw, line_no), parse_line(raw, line_no)
        assert repr(fast) == repr(general)  # repr: NaN != NaN, and int 1 == float 1.0 would hide a change


@pytest.mark.parametrize("shape_name", ["MainLine", "WithkbLine", "QtypeLine"])
def test_the_fast_shape_check_gives_pydantics_verdicts(shape_name: str):
    import fvqa.formats.infoseek as fmt
    from fvqa.formats.shape import shape_checker, validate

    shape = getattr(fmt, shape_name)
    values = [None, "s", "", 0, 7, -1, 2.5, True, False, [], ["a"], [1, 2.5, "x"], [True], [["a"]], [None],
              {}, {"wikidata": 3, "range": [1, 2]}, [{"x": 1}]]
    problem = shape_checker(shape)
    for name in shape.model_fields:
        for value in values:
            obj = {"data_id": "d1", name: value, "extra": {"ignored": [1]}}
            checked = validate(shape, obj)
            assert problem(obj) == (checked if isinstance(checked, tuple) else None), (name, value)
            if not isinstance(checked, tuple):  # accepted: the dict's values are the model's
                assert all(getattr(checked, f) == obj.get(f) for f in shape.model_fields)
