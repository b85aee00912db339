"""ANN image search: recall against the exact scan, the threshold, rebuild/reload and damaged ANN files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fvqa.errors import ConfigError
from fvqa.search.ann import AnnIndex
from fvqa.search.config import LocalConfig
from fvqa.search.local_index import ANN_FILE, LocalIndex, build_index, ensure_index, top_k_cosine

EXACT = LocalConfig(clip_model="fvqa-tiny", clip_pretrained=None)  # default threshold: 12 images stay exact
ANN = EXACT.model_copy(update={"ann_min_vectors": 10})


def clustered(n: int, dim: int, rng: np.random.Generator, centers: int = 200) -> np.ndarray:
    """Unit vectors around `centers` directions (CLIP-like: neighbours share a topic), not uniform noise."""
    c = rng.standard_normal((centers, dim), dtype=np.float32)
    x = c[rng.integers(0, centers, n)] / np.sqrt(dim) + rng.standard_normal((n, dim), dtype=np.float32) * 0.03
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ann_recall_at_5_matches_the_exact_scan_on_a_clustered_corpus() -> None:
    rng = np.random.default_rng(0)
    data = clustered(20_200, 64, rng)
    corpus, queries = data[:20_000], data[20_000:]  # held-out points from the same distribution
    ann = AnnIndex.build(corpus)
    nprobe = LocalConfig().ann_nprobe
    hits = sum(len(set(ann.search(q, 5, nprobe)[0].tolist()) & set(top_k_cosine(corpus, q, 5)[0].tolist()))
               for q in queries)
    assert hits / (5 * len(queries)) >= 0.95
    ids, scores = ann.search(queries[0], 5, nprobe)
    assert list(scores) == sorted(scores, reverse=True) and len(ids) == 5
    np.testing.assert_allclose(scores, corpus[ids] @ queries[0], atol=2e-3)  # fp16 codes, cosine scores


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fvqa.demo.world import make_world

    return make_world(tmp_path_factory.mktemp("annworld") / "w", seed=3, n_entities=6)


@pytest.fixture(scope="module")
def embedder():
    from fvqa.search.clip import ClipEmbedder

    return ClipEmbedder(EXACT.clip_model, EXACT.clip_pretrained)


def _top_titles(ix: LocalIndex, world: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (world / "web/images.jsonl").read_text().splitlines()][:12]
    return [(ix.image_search(Image.open(world / "web" / r["path"]), k=1)[0].title, r["title"]) for r in rows]


def _build(world: Path, out: Path, cfg: LocalConfig, embedder) -> None:
    build_index(world / "web/pages.jsonl", world / "web/images.jsonl", out, config=cfg, embedder=embedder)


def test_threshold_decides_ann_or_exact_and_both_find_the_images_page(world: Path, tmp_path: Path, embedder) -> None:
    _build(world, tmp_path / "small", EXACT, embedder)
    assert not (tmp_path / "small" / ANN_FILE).exists()
    assert json.loads((tmp_path / "small/meta.json").read_text())["ann"] is None
    assert LocalIndex(tmp_path / "small", config=EXACT, embedder=embedder).ann is None

    _build(world, tmp_path / "big", ANN, embedder)
    meta = json.loads((tmp_path / "big/meta.json").read_text())
    assert meta["ann"]["vectors"] == 12 and (tmp_path / "big" / ANN_FILE).stat().st_size == meta["ann"]["bytes"]
    with_ann = LocalIndex(tmp_path / "big", config=ANN, embedder=embedder)
    assert with_ann.ann is not None
    # the same folder opened with a higher threshold scans exactly; both answer every known item
    exact = LocalIndex(tmp_path / "big", config=EXACT, embedder=embedder)
    assert exact.ann is None
    for ix in (with_ann, exact):
        assert all(got == want for got, want in _top_titles(ix, world))


def test_ann_index_survives_rebuild_and_reload(world: Path, tmp_path: Path, embedder) -> None:
    out = tmp_path / "ix"
    _build(world, out, ANN, embedder)
    first = json.loads((out / "meta.json").read_text())["ann"]
    _build(world, out, ANN, embedder)  # replaces the published folder, ANN file included
    assert json.loads((out / "meta.json").read_text())["ann"]["bytes"] == first["bytes"]
    assert not list(tmp_path.glob(".ix.*"))  # no temporary folder left behind
    ix = LocalIndex(out, config=ANN)  # a fresh process's view: own embedder, ANN read from disk
    assert ix.ann is not None and ix.ann.ntotal == 12
    assert all(got == want for got, want in _top_titles(ix, world))


@pytest.mark.parametrize("damage", ["missing", "truncated", "junk_same_size"])
def test_damaged_ann_file_is_a_clear_error_and_ensure_index_repairs_it(world: Path, tmp_path: Path, embedder,
                                                                       damage: str) -> None:
    pages, images, out = world / "web/pages.jsonl", world / "web/images.jsonl", tmp_path / "ix"
    assert ensure_index(pages, images, out, config=ANN) is not None
    path = out / ANN_FILE
    size = path.stat().st_size
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: size // 2])
    else:
        path.write_bytes(b"\x00" * size)
    with pytest.raises(ConfigError, match=r"ANN index file .* (missing|does not match|unreadable).*Rebuild"):
        LocalIndex(out, config=ANN, embedder=embedder)
    built_at = json.loads((out / "meta.json").read_text())["built_at"]
    assert ensure_index(pages, images, out, config=ANN) is None  # inputs unchanged: no re-embedding ...
    assert json.loads((out / "meta.json").read_text())["built_at"] == built_at
    ix = LocalIndex(out, config=ANN, embedder=embedder)  # ... but the ANN file is back
    assert ix.ann is not None and all(got == want for got, want in _top_titles(ix, world))


def test_ensure_index_adds_an_ann_file_when_the_threshold_drops(world: Path, tmp_path: Path, embedder) -> None:
    pages, images, out = world / "web/pages.jsonl", world / "web/images.jsonl", tmp_path / "ix"
    assert ensure_index(pages, images, out, config=EXACT) is not None
    assert not (out / ANN_FILE).exists()
    assert ensure_index(pages, images, out, config=ANN) is None
    assert LocalIndex(out, config=ANN, embedder=embedder).ann is not None
