"""Benchmark loaders on small files in the official formats: items, rejects with reasons, filters, --limit."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fvqa.demo.benchmarks import entities, image_of, write_demo_benchmarks
from fvqa.errors import ConfigError
from fvqa.eval.benchmarks import load_benchmark
from fvqa.eval.config import BenchmarkSpec


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fvqa.demo.world import make_world

    return make_world(tmp_path_factory.mktemp("bworld") / "w", seed=3, n_entities=6)


@pytest.fixture(scope="module")
def specs(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_demo_benchmarks(world, tmp_path_factory.mktemp("bench"), n=4, bad_rows=True)


def _reasons(res) -> dict[str, str]:
    return {r.key: r.reason for r in res.rejects}


def _details(res) -> dict[str, str]:
    return {r.key: f"{r.reason}: {r.detail}" for r in res.rejects}


def test_fvqa_upstream_parquet(specs: dict, world: Path) -> None:
    res = load_benchmark(BenchmarkSpec(**specs["fvqa"]))
    assert [it.item_id for it in res.items] == ["fvqa_0", "fvqa_1", "fvqa_2", "fvqa_3"]
    first = res.items[0]
    maker = entities(world)[0]["maker"]
    assert first.answer == maker and first.aliases == [maker]
    assert first.question.startswith("Who created this") and "<image>" not in first.question
    assert first.image == image_of(world, entities(world)[0])
    assert first.meta["search_label"] == "search_free" and first.image_url.endswith(".jpg")
    reasons = _reasons(res)
    assert reasons["fvqa_noanswer"] == "field_missing"
    assert "missing or empty ground_truth" in _details(res)["fvqa_noanswer"]
    assert reasons["fvqa_badimage"] == "image_format_unknown"
    assert res.n_rows == len(res.items) + len(res.rejects)


def test_infoseek_with_qtype_and_bad_rows(specs: dict) -> None:
    res = load_benchmark(BenchmarkSpec(**specs["infoseek"]))
    assert len(res.items) == 4
    assert {it.question_type for it in res.items} == {"string"}
    assert res.items[0].meta["split"] == "val_unseen_question"
    reasons = _details(res)
    assert any(r.startswith("malformed_json: ") for r in reasons.values())
    assert "image oven_missing not found" in reasons["infoseek_val_noimg"]
    assert "descending" in reasons["infoseek_val_badrange"] or "low <= high" in reasons["infoseek_val_badrange"]
    assert reasons["infoseek_val_notype"].startswith("no_question_type: ")


def test_infoseek_subset_file_keeps_listed_ids(specs: dict, tmp_path: Path) -> None:
    subset = tmp_path / "subset.txt"
    subset.write_text("infoseek_val_00001\ninfoseek_val_00003\n")
    res = load_benchmark(BenchmarkSpec(**specs["infoseek"], subset=subset))
    assert [it.item_id for it in res.items] == ["infoseek_val_00001", "infoseek_val_00003"]
    assert res.filtered["not in subset"] >= 2


def test_mmsearch_keeps_image_questions_only(specs: dict) -> None:
    res = load_benchmark(BenchmarkSpec(**specs["mmsearch"]))
    assert len(res.items) == 4 and res.filtered["text-only query (image_only)"] == 1
    assert _reasons(res)["mm_missing"] == "image_missing" and "image file not found" in _details(res)["mm_missing"]
    assert res.items[0].meta == {"area": "news", "subfield": "art"}


def test_simplevqa_english_only_and_base64_images(specs: dict, world: Path) -> None:
    res = load_benchmark(BenchmarkSpec(**specs["simplevqa"]))
    assert [it.item_id for it in res.items] == ["100", "101", "102", "103"]
    assert res.items[1].image == image_of(world, entities(world)[1])
    assert res.filtered["language is not EN"] == 1
    assert _reasons(res)["998"] == "bad_image_reference" and "base64" in _details(res)["998"]
    everything = load_benchmark(BenchmarkSpec(**specs["simplevqa"], language="all"))
    assert len(everything.items) == 5


def test_livevqa_and_limit_sampling_is_seeded(specs: dict) -> None:
    res = load_benchmark(BenchmarkSpec(**specs["livevqa"]))
    assert len(res.items) == 4 and "missing or empty query" in _details(res)["Culture_noq"]
    a = load_benchmark(BenchmarkSpec(**specs["livevqa"]), limit=2, seed=1)
    b = load_benchmark(BenchmarkSpec(**specs["livevqa"]), limit=2, seed=1)
    assert [it.item_id for it in a.items] == [it.item_id for it in b.items]
    assert len(a.items) == 2 and a.sampled_out == 2


def test_native_export_needs_images_and_filters_split(world: Path, tmp_path: Path) -> None:
    import hashlib

    e = entities(world)[0]
    data = image_of(world, e)
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "images" / sha[:2]).mkdir(parents=True)
    (tmp_path / "images" / sha[:2] / f"{sha}.jpg").write_bytes(data)
    rows = [
        {"item_id": "a", "question": "Who?", "answer": e["maker"], "aliases": ["IN"], "image_sha256": sha,
         "image_ext": "jpg", "split": "test", "knowledge_type": "Place", "search_label": "text_search_required"},
        {"item_id": "b", "question": "Who?", "answer": "x", "aliases": [], "image_sha256": sha, "image_ext": "jpg",
         "split": "train", "knowledge_type": "Place", "search_label": "search_free"},
        {"item_id": "c", "question": "Who?", "answer": "x", "aliases": [], "image_sha256": "0" * 64,
         "image_ext": "jpg", "split": "test", "knowledge_type": None, "search_label": None},
    ]
    path = tmp_path / "fvqa_items.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    res = load_benchmark(BenchmarkSpec(name="fvqa_native", kind="fvqa", path=path, image_dir=tmp_path / "images"))
    assert [it.item_id for it in res.items] == ["a"]
    assert res.items[0].aliases == [e["maker"], "IN"] and res.items[0].meta["knowledge_type"] == "Place"
    assert res.filtered["split is not test"] == 1
    assert _reasons(res)["c"] == "image_missing" and "not found under" in _details(res)["c"]


def test_missing_or_unsupported_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_benchmark(BenchmarkSpec(name="x", kind="livevqa", path=tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="unsupported"):
        load_benchmark(BenchmarkSpec(name="x", kind="livevqa", path=tmp_path / "x.csv"))
