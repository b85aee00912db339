"""Local index: known-item retrieval on a small generated corpus, rejects, and bad inputs."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from fvqa.errors import ConfigError
from fvqa.search.config import LocalConfig
from fvqa.search.local_index import LocalIndex, build_index

CFG = LocalConfig(clip_model="fvqa-tiny", clip_pretrained=None)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fvqa.demo.world import make_world

    return make_world(tmp_path_factory.mktemp("sworld") / "w", seed=3, n_entities=6)


@pytest.fixture(scope="module")
def embedder():
    from fvqa.search.clip import ClipEmbedder

    return ClipEmbedder(CFG.clip_model, CFG.clip_pretrained)


@pytest.fixture(scope="module")
def index(world: Path, embedder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("sidx") / "index"
    stats = build_index(world / "web/pages.jsonl", world / "web/images.jsonl", out, config=CFG, embedder=embedder)
    return out, stats


def test_build_counts_pages_images_and_rejects_with_reasons(index) -> None:
    out, stats = index
    assert stats.pages == 6 and stats.images == 12
    # the demo world ships a truncated JPEG, HTML named .jpg and an 8x8 PNG: each rejected with a reason
    assert sum(stats.rejected.values()) == 3
    reasons = {r for (r,) in sqlite3.connect(out / "pages.sqlite").execute("SELECT reason FROM rejects")}
    assert reasons == {"image_undecodable", "image_format_unknown", "image_too_small"}
    assert json.loads((out / "meta.json").read_text())["images"] == 12


def test_image_search_returns_the_images_own_page_first(index, world: Path) -> None:
    """A fresh process (new embedder object) must embed exactly as the build did."""
    out, _ = index
    ix = LocalIndex(out)  # builds its own embedder: random weights are seeded, so vectors agree
    rows = [json.loads(line) for line in (world / "web/images.jsonl").read_text().splitlines()][:12]
    for row in rows:
        hits = ix.image_search(Image.open(world / "web" / row["path"]), k=3)
        assert hits[0].title == row["title"], row["path"]
        assert hits[0].url == row["page_url"]
        assert isinstance(hits[0].thumbnail, bytes) and hits[0].thumbnail[:2] == b"\xff\xd8"
        assert len({h.title for h in hits}) == len(hits)  # one hit per page


def test_concurrent_first_image_searches_share_one_embedder(index, world: Path) -> None:
    """Tool threads search at once on a fresh index: all of them must get the seeded model's answer."""
    from concurrent.futures import ThreadPoolExecutor

    out, _ = index
    ix = LocalIndex(out)
    rows = [json.loads(line) for line in (world / "web/images.jsonl").read_text().splitlines()][:12]
    images = [Image.open(world / "web" / r["path"]).convert("RGB") for r in rows]
    with ThreadPoolExecutor(8) as pool:
        tops = list(pool.map(lambda im: ix.image_search(im, k=1)[0].title, images))
    assert tops == [r["title"] for r in rows]


def test_text_search_finds_the_page_holding_the_answer(index, world: Path, embedder) -> None:
    out, _ = index
    ix = LocalIndex(out, embedder=embedder)
    entities = [json.loads(line) for line in (world / "entities.jsonl").read_text().splitlines()]
    for e in entities:
        hits = ix.text_search(f"{e['name']} maker", f"Who created this {e['noun']}?", k=3)
        assert hits[0].title == e["name"]
        assert e["maker"] in hits[0].summary
        assert hits[0].summary.count(". ") <= 4  # at most 5 sentences
    assert ix.text_search("qqqzzz unknownword", "?") == []


def test_generic_pages_and_image_folder(tmp_path: Path, embedder) -> None:
    import random

    from fvqa.demo.world import _entities, render_image

    ents = _entities(random.Random(1), 3)
    pages = tmp_path / "pages.jsonl"
    lines = [json.dumps({"url": f"https://x.test/{e.entity_id}", "title": e.name, "text": f"{e.name} is red."})
             for e in ents]
    lines += ["{broken", json.dumps({"url": "https://x.test/none", "title": "", "text": "no title"})]
    pages.write_text("\n".join(lines) + "\n")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for e in ents:
        (folder / f"{e.entity_id}.jpg").write_bytes(render_image(e, 0))
    stats = build_index(pages, folder, tmp_path / "ix", config=CFG, embedder=embedder)
    assert stats.pages == 3 and stats.images == 3
    hits = LocalIndex(tmp_path / "ix", embedder=embedder).image_search(Image.open(folder / f"{ents[1].entity_id}.jpg"))
    assert hits[0].title == ents[1].name and hits[0].url == f"https://x.test/{ents[1].entity_id}"
    assert stats.rejected == {"pages: malformed_json": 1, "pages: page_unusable": 1}


def test_image_folder_accounts_for_every_file(tmp_path: Path) -> None:
    """A folder build never skips a file silently: non-image names are rejected with a reason (not
    read), in the stats, meta.json, the index's `rejects` table and the CLI's summary."""
    import subprocess

    from support.paths import FVQA, REPO

    pages = tmp_path / "pages.jsonl"
    pages.write_text(json.dumps({"url": "https://x.test/p0", "title": "Pink square", "text": "A pink square."}) + "\n")
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 64), (250, 20, 200)).save(folder / "p0.png")
    (folder / "random.bin").write_bytes(b"\x00\x01" * 50)
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "sub" / "README").write_text("notes")
    res = subprocess.run([*FVQA, "search", "index", "build", "--corpus", str(pages), "--images", str(folder),
                          "--out", str(tmp_path / "ix"), "--clip-model", "fvqa-tiny"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "rejected - images: not_an_image_file" in res.stdout and "3" in res.stdout
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["images"] == 1 and meta["rejected"] == {"images: not_an_image_file": 3}
    rows = sqlite3.connect(tmp_path / "ix" / "pages.sqlite").execute(
        "SELECT key, reason, detail FROM rejects ORDER BY key").fetchall()
    assert [(k, r) for k, r, _ in rows] == [(".DS_Store", "not_an_image_file"), ("random.bin", "not_an_image_file"),
                                            ("sub/README", "not_an_image_file")]
    assert "'.bin'" in rows[1][2] and "(none)" in rows[2][2]


def test_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="corpus file not found"):
        build_index(tmp_path / "nope.jsonl", None, tmp_path / "o")
    (tmp_path / "empty.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="no usable pages"):
        build_index(tmp_path / "empty.jsonl", None, tmp_path / "o")
    with pytest.raises(ConfigError, match="no search index"):
        LocalIndex(tmp_path / "o")


def test_cli_builds_and_queries_the_index(world: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fvqa.search.cli import search_app

    runner = CliRunner()
    out = tmp_path / "idx"
    res = runner.invoke(search_app, ["index", "build", "--corpus", str(world / "web/pages.jsonl"), "--images",
                                     str(world / "web/images.jsonl"), "--out", str(out), "--clip-model", "fvqa-tiny"])
    assert res.exit_code == 0, res.output
    assert "rejected - images: image_too_small" in res.output
    name = json.loads((world / "entities.jsonl").read_text().splitlines()[2])["name"]
    opts = ["--set", f"search.local.index_dir={out}", "--set", f"workspace={tmp_path / 'ws'}"]
    res = runner.invoke(search_app, ["text", name, "--question", "who made it?", *opts])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("[Text Search Results]") and "1. (link:" in res.output and name in res.output
    res = runner.invoke(search_app, ["image", str(world / "web/images") + "/" + sorted(
        p.name for p in (world / "web/images").glob("Q*_0.jpg"))[2], *opts])
    assert res.exit_code == 0 and res.output.startswith("1. ")
    assert (tmp_path / "ws/cache/search/search_cache.sqlite").is_file()


def test_ensure_index_reuses_a_fresh_index_and_rebuilds_a_stale_one(world: Path, tmp_path: Path, embedder) -> None:
    import asyncio

    from fvqa.search.config import SearchConfig
    from fvqa.search.local_index import ensure_index
    from fvqa.search.tools import make_search_tools

    pages = tmp_path / "pages.jsonl"
    pages.write_text((world / "web/pages.jsonl").read_text())
    out = tmp_path / "ix"
    assert ensure_index(pages, None, out, config=CFG) is not None
    assert ensure_index(pages, None, out, config=CFG) is None  # unchanged inputs: kept
    pages.write_text(pages.read_text() + json.dumps({"url": "https://n.test/x", "title": "Newcomer Qwerty",
                                                     "text": "Newcomer Qwerty is new."}) + "\n")
    assert ensure_index(pages, None, out, config=CFG).pages == 7  # changed corpus: rebuilt
    cfg = SearchConfig.model_validate({"backend": "local", "local": {"index_dir": str(out)}})
    tools = make_search_tools(cfg, cache_dir=tmp_path / "cache")
    hits = asyncio.run(tools.atext_search("qwerty", "what is new?"))
    assert hits[0].title == "Newcomer Qwerty" and hits[0].url == "https://n.test/x"


def test_term_at_a_time_scores_match_bm25s(index) -> None:
    out, _ = index
    ix = LocalIndex(out)
    for query in ("sonata tower", "festival france visitors", "created 1732 photographs", "crystal density"):
        tokens = [t for t in ix._bm25.vocab_dict if t in query.split()]
        docs, scores = ix._bm25.retrieve([tokens], k=3, show_progress=False)
        expected = [round(float(s), 5) for s in scores[0] if s > 0]
        assert [round(s, 5) for _, s in ix.search_pages(query, 3)] == expected
