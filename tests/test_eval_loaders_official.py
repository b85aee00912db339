"""Loaders on files in the real releases' layouts, and eval-config paths that resolve once.

LiveVQA Research-Preview ships ``qa.json`` (sample_id, query, query_image as the authors' absolute
path, gt_answer) with ``image/`` and ``qa_detailed.json`` beside it; InfoSeek's Human split ships
``infoseek_human.jsonl`` without answers, so its re-annotated answers come from a second file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from fvqa.demo.benchmarks import entities, image_of, write_demo_benchmarks
from fvqa.errors import ConfigError
from fvqa.eval.benchmarks import load_benchmark
from fvqa.eval.config import BenchmarkSpec, load_eval_config


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fvqa.demo.world import make_world

    return make_world(tmp_path_factory.mktemp("oworld") / "w", seed=5, n_entities=6)


def test_livevqa_research_preview_qa_json(world: Path, tmp_path: Path) -> None:
    root = tmp_path / "LiveVQA-Research-Preview"
    (root / "image").mkdir(parents=True)
    ents = entities(world)[:3]
    qa, details = [], []
    for i, e in enumerate(ents):
        (root / "image" / f"{i:03d}_{e['entity_id']}.jpg").write_bytes(image_of(world, e))
        qa.append({"sample_id": f"Movies_{i}_1", "query": f"Who made this {e['noun']}?",
                   "query_image": f"/mnt/nvme0/bench/image/{i:03d}_{e['entity_id']}.jpg", "gt_answer": e["maker"]})
        details.append({"sample_id": f"Movies_{i}_1", "topic": f"topic {i}", "context": "news text"})
    qa.append({"sample_id": "Movies_9_1", "query": "Q?", "query_image": "/mnt/nvme0/bench/image/gone.jpg",
               "gt_answer": "x"})
    qa.append({"sample_id": "Movies_8_1", "query": "Q?", "query_image": qa[0]["query_image"], "gt_answer": ""})
    (root / "qa.json").write_text(json.dumps(qa))
    (root / "qa_detailed.json").write_text(json.dumps(details))

    res = load_benchmark(BenchmarkSpec(name="livevqa", kind="livevqa", path=root / "qa.json"))
    assert [it.item_id for it in res.items] == ["Movies_0_1", "Movies_1_1", "Movies_2_1"]
    first = res.items[0]
    assert first.question == f"Who made this {ents[0]['noun']}?" and first.answer == ents[0]["maker"]
    assert first.image == image_of(world, ents[0]) and first.meta["topic"] == "topic 0"
    reasons = {r.key: (r.reason, r.detail) for r in res.rejects}
    assert reasons["Movies_9_1"][0] == "image_missing" and "gone.jpg" in reasons["Movies_9_1"][1]
    assert reasons["Movies_8_1"] == ("field_missing", "record 4: missing or empty gt_answer / answer")
    assert res.n_rows == 5 and len(res.items) + len(res.rejects) == res.n_rows


def _human_files(world: Path, root: Path) -> tuple[Path, Path]:
    images = root / "oven_images"
    images.mkdir(parents=True)
    ents = entities(world)[:3]
    lines = []
    for i, e in enumerate(ents):
        (images / f"oven_{e['entity_id']}.jpg").write_bytes(image_of(world, e))
        lines.append({"data_id": f"infoseek_human_{i:05d}", "image_id": f"oven_{e['entity_id']}",
                      "question": f"Who created this {e['noun']}?", "data_split": "human"})
    (root / "infoseek_human.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    answers = root / "human_answers.jsonl"
    answers.write_text(
        json.dumps({"data_id": "infoseek_human_00000", "answer": [ents[0]["maker"], "the maker"],
                    "question_type": "String"}) + "\n"
        + json.dumps({"data_id": "infoseek_human_00001", "answer": ["1890"],
                      "answer_eval": [{"wikidata": 1890, "range": [1889, 1891]}], "question_type": "Numerical"}) + "\n")
    return root / "infoseek_human.jsonl", answers


def test_infoseek_human_split_with_reannotated_answers(world: Path, tmp_path: Path) -> None:
    path, answers = _human_files(world, tmp_path / "infoseek")
    spec = BenchmarkSpec(name="infoseek_human", kind="infoseek", path=path, image_dir=path.parent / "oven_images",
                         answers=answers)
    res = load_benchmark(spec)
    by_id = {it.item_id: it for it in res.items}
    assert sorted(by_id) == ["infoseek_human_00000", "infoseek_human_00001"]
    assert by_id["infoseek_human_00000"].aliases[:2] == [entities(world)[0]["maker"], "the maker"]
    assert by_id["infoseek_human_00001"].question_type == "numerical"
    assert by_id["infoseek_human_00001"].answer_eval == [{"wikidata": 1890, "range": [1889, 1891]}]
    assert [(r.key, r.reason) for r in res.rejects] == [("infoseek_human_00002", "no_answer")]
    assert "re-annotated answers" in res.rejects[0].detail
    # without the answers file every Human line says what is missing, never a silent drop
    bare = load_benchmark(BenchmarkSpec(name="h", kind="infoseek", path=path, image_dir=path.parent / "oven_images"))
    assert not bare.items and {r.reason for r in bare.rejects} == {"no_answer"} and len(bare.rejects) == 3
    broken = tmp_path / "broken_answers.jsonl"
    broken.write_text('{"data_id": "infoseek_human_00000", "answer": \n')
    with pytest.raises(ConfigError, match="answers file .*line 1"):
        load_benchmark(BenchmarkSpec(name="h", kind="infoseek", path=path, answers=broken,
                                     image_dir=path.parent / "oven_images"))


def test_relative_and_absolute_config_give_the_same_items(world: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every relative path in an eval config resolves against the config's folder, exactly once."""
    bench = tmp_path / "data" / "bench"
    specs = write_demo_benchmarks(world, bench, n=3)
    conf_dir = tmp_path / "configs"
    conf_dir.mkdir()
    rel = {k: {key: (os.path.relpath(v, conf_dir) if key in ("path", "image_dir") else v) for key, v in s.items()}
           for k, s in specs.items()}
    assert all(not Path(s["path"]).is_absolute() for s in rel.values())
    (conf_dir / "eval.yaml").write_text(yaml.safe_dump({
        "workspace": "../ws", "models": [{"name": "m", "backend": "transformers", "model_path": "../model"}],
        "benchmarks": list(rel.values()), "judge": {"enabled": False}, "primary_metric": "em",
        "search": {"backend": "local", "local": {"index_dir": "../ws/search-index"}},
    }))

    def items(config: str) -> dict[str, list[tuple[str, str, int]]]:
        cfg = load_eval_config(config)
        out = {}
        for b in cfg.benchmarks:
            res = load_benchmark(b)
            assert not res.rejects, (b.name, res.rejects)
            out[b.name] = [(it.item_id, it.answer, len(it.image)) for it in res.items]
        return out

    monkeypatch.chdir(tmp_path)
    relative = items("configs/eval.yaml")
    monkeypatch.chdir(conf_dir)
    here = items("eval.yaml")
    absolute = items(str(conf_dir / "eval.yaml"))
    assert relative == here == absolute
    assert {k: len(v) for k, v in relative.items()} == {
        "fvqa_test": 3, "infoseek": 3, "mmsearch": 3, "simplevqa": 3, "livevqa": 3}
    cfg = load_eval_config(str(conf_dir / "eval.yaml"))
    assert cfg.benchmarks[1].image_dir == bench / "infoseek_images"
    assert cfg.search.local.index_dir == tmp_path / "ws" / "search-index" and cfg.workspace == tmp_path / "ws"
