"""One hostile corpus through every door that reads files: each input is kept or rejected with the
code we expect (`fvqa.reasons`), and each door's counts add up (in == out + rejects).

The corpus mixes the image gate's files (`test_image_gate.HOSTILE`) with hostile records: wrong
types, a line nested 100,000 deep, a line that is not JSON or not an object, a missing answer, a
repeated id. Each door gets them in its own official format (InfoSeek jsonl, upstream parquet, a
LiveVQA-shaped benchmark jsonl, the search index's page corpus and image folder).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from support.pixel_embedder import PixelEmbedder
from test_image_gate import BAD, HOSTILE, VALID

from fvqa.config import InfoseekConfig, RunConfig
from fvqa.eval.benchmarks import load_benchmark
from fvqa.eval.config import BenchmarkSpec
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.import_upstream import import_upstream
from fvqa.pipelines.infoseek import InfoseekStage
from fvqa.reasons import codes_of
from fvqa.search.config import LocalConfig
from fvqa.search.local_index import build_index
from fvqa.store import Workspace

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError for a naive reader


def _lines(path: Path, records: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def _assert_codes(stage: str, got: dict[str, str], want: dict[str, str]) -> None:
    assert got == want
    assert set(got.values()) <= set(codes_of(stage))


def test_infoseek_door(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "images").mkdir(parents=True)
    for name, (data, _) in HOSTILE.items():
        (folder / "images" / f"{name}.jpg").write_bytes(data)

    def line(data_id: Any, image_id: Any = "valid", **over: Any) -> dict[str, Any]:
        return {"data_id": data_id, "image_id": image_id, "question": "Which city is this?", "answer": ["Paris"],
                "answer_eval": ["Paris"], "data_split": "val", **over}

    records: list[Any] = [line(name, name) for name in HOSTILE]
    records += [
        line("q-int", question=7),                            # line 6
        line("no-answer", answer=[]),                         # 7
        line("eval-bad", answer_eval=[{"range": "x"}]),       # 8
        line("path-id", image_id="../etc/passwd"),            # 9
        line("gone", image_id="not-there"),                   # 10
        line("valid"),                                        # 11: the id again
        "{not json",                                          # 12
        DEEP,                                                 # 13
        "[1, 2]",                                             # 14
    ]
    main = _lines(folder / "infoseek_val.jsonl", records)
    _lines(folder / "infoseek_val_qtype.jsonl",
           [{"data_id": r["data_id"], "question_type": "String"} for r in records if isinstance(r, dict)])
    config = RunConfig(workspace=tmp_path / "ws", infoseek=InfoseekConfig(jsonl=main, stratify=["question_type"], n=100))
    with Workspace(config.workspace) as ws:
        stats = execute_stage(InfoseekStage(), ws, config, Console(quiet=True))
        items = [r[0] for r in ws.execute("SELECT item_id FROM items")]
        rejects = dict(ws.execute("SELECT key, reason FROM rejects WHERE stage = 'infoseek'"))
    assert items == ["infoseek-valid"]
    _assert_codes("infoseek", rejects, {
        **{f"infoseek-{name}": code for name, code in BAD.items()},
        "infoseek_val.jsonl:6": "wrong_type", "infoseek-no-answer": "answer_missing",
        "infoseek-eval-bad": "malformed_answer_eval", "infoseek-path-id": "bad_image_id",
        "infoseek-gone": "image_missing", "infoseek_val.jsonl:11": "duplicate_id",
        "infoseek_val.jsonl:12": "malformed_json", "infoseek_val.jsonl:13": "malformed_json",
        "infoseek_val.jsonl:14": "wrong_type",  # JSON, but not an object
    })
    assert stats.n_in == stats.n_out + stats.n_rejected == len(records)


def test_import_upstream_door(tmp_path: Path) -> None:
    def row(data_id: Any, data: bytes = VALID, **over: Any) -> dict[str, Any]:
        return {"data_id": data_id, "prompt": [{"role": "user", "content": "<image>Which city is this?"}],
                "images": [{"bytes": data, "path": None}], "data_source": "fvqa_test",
                "reward_model": {"ground_truth": "Paris", "candidate_answers": "[]"}, **over}

    rows = [row(name, data) for name, (data, _) in HOSTILE.items()]
    rows += [row("no-q", prompt=[{"role": "system", "content": "hi"}]),
             row("no-gt", reward_model={"ground_truth": "", "candidate_answers": "[]"}),
             row("bad-cands", reward_model={"ground_truth": "Paris", "candidate_answers": "[oops"}),
             row("deep-cands", reward_model={"ground_truth": "Paris", "candidate_answers": DEEP}),
             row("no-bytes", images=[{"bytes": None, "path": "x.jpg"}])]
    src = tmp_path / "fvqa_test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    wrong = tmp_path / "fvqa_train.parquet"  # a column of another type: each row is a wrong_type reject
    pq.write_table(pa.Table.from_pylist([{**row("int-prompt"), "prompt": "just text"}]), wrong)
    with Workspace(tmp_path / "ws") as ws:
        counts = import_upstream(ws, src)
        counts_wrong = import_upstream(ws, wrong)
        items = [r[0] for r in ws.execute("SELECT item_id FROM items")]
        rejects = dict(ws.execute("SELECT key, reason FROM rejects WHERE stage = 'import'"))
    assert items == ["import-valid"]
    _assert_codes("import", rejects, {**BAD, "no-q": "no_question", "no-gt": "answer_missing",
                                      "bad-cands": "malformed_json", "deep-cands": "malformed_json",
                                      "no-bytes": "image_missing", "int-prompt": "wrong_type"})
    assert len(rows) == counts["imported"] + counts["rejected"] and counts_wrong["rejected"] == 1


def test_eval_loader_door(tmp_path: Path) -> None:
    for name, (data, _) in HOSTILE.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
    records: list[Any] = [{"id": n, "image": f"{n}.jpg", "question": "Which city?", "answer": "Paris"} for n in HOSTILE]
    records += [
        {"id": "q-list", "image": "valid.jpg", "question": ["Which city?"], "answer": "Paris"},
        {"id": "no-answer", "image": "valid.jpg", "question": "Which city?", "answer": ""},
        {"id": "no-file", "image": "missing.jpg", "question": "Which city?", "answer": "Paris"},
        {"id": "b64", "image": "x" * 300 + "!", "question": "Which city?", "answer": "Paris"},
        {"id": "bytes-str", "image": {"bytes": "abc"}, "question": "Which city?", "answer": "Paris"},
        {"id": "valid", "image": "valid.jpg", "question": "Which city?", "answer": "Paris"},  # the id again
        "{not json", DEEP,
        {"id": "meta-nested", "image": "valid.jpg", "question": "Which city?", "answer": "Paris",
         "topic": {"a": [[[[1]]]]}},  # a descriptive field must be a scalar too
    ]
    path = _lines(tmp_path / "live.jsonl", records)
    res = load_benchmark(BenchmarkSpec(name="live", kind="livevqa", path=path))
    assert [it.item_id for it in res.items] == ["valid"]
    _assert_codes("eval:live", {r.key: r.reason for r in res.rejects}, {
        **BAD, "q-list": "wrong_type", "no-answer": "field_missing", "no-file": "image_missing",
        "b64": "bad_image_reference", "bytes-str": "wrong_type", "valid": "duplicate_id",
        "line 12": "malformed_json", "line 13": "malformed_json", "meta-nested": "wrong_type"})
    assert res.n_rows == len(res.items) + len(res.rejects) == len(records)


def test_search_index_door(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name, (data, _) in HOSTILE.items():
        (images / f"{name}.jpg").write_bytes(data)
    (images / "notes.txt").write_text("not an image")
    (images / "orphan.jpg").write_bytes(VALID)  # decodes, but matches no page and has no title
    pages: list[Any] = [{"wikidata_id": n, "title": f"Page {n}", "text": f"All about {n}.",
                         "url": f"https://example.org/{n}"} for n in HOSTILE]
    pages += [{"wikidata_id": "untitled", "text": "No title here."}, {"wikidata_id": "valid", "title": "Again",
              "text": "A repeat."}, "{not json", DEEP, "[1]"]
    corpus = _lines(tmp_path / "pages.jsonl", pages)
    out = tmp_path / "index"
    stats = build_index(corpus, images, out, config=LocalConfig(clip_model="fvqa-tiny", clip_pretrained=None),
                        embedder=PixelEmbedder())  # type: ignore[arg-type]
    db = sqlite3.connect(out / "pages.sqlite")
    rejects = {(src, key): reason for src, key, reason in db.execute("SELECT source, key, reason FROM rejects")}
    n_pages = db.execute("SELECT count(*) FROM pages").fetchone()[0]
    kept = [r[0] for r in db.execute("SELECT source FROM images")]
    db.close()
    assert kept == ["valid.jpg"] and n_pages == len(HOSTILE)
    want = {("images", f"{n}.jpg"): code for n, code in BAD.items()}
    want |= {("images", "notes.txt"): "not_an_image_file", ("images", "orphan.jpg"): "no_title",
             ("pages", "pages.jsonl:6"): "page_unusable", ("pages", "valid"): "duplicate_id",
             ("pages", "pages.jsonl:8"): "malformed_json", ("pages", "pages.jsonl:9"): "malformed_json",
             ("pages", "pages.jsonl:10"): "wrong_type"}
    assert rejects == want and set(rejects.values()) <= set(codes_of("index"))
    assert len(pages) + len(HOSTILE) + 2 == n_pages + stats.images + sum(stats.rejected.values())
