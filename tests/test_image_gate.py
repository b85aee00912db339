"""The image gate at every door: hostile files are refused with one fixed reason, everywhere.

The same five files (a truncated JPEG, an 8x8 PNG, a 74-byte PNG whose header claims 12000x12000,
random bytes and one valid picture) go through the gate itself, crawl, infoseek, import-upstream, an
eval loader and the search index build. Each door keeps the valid one, rejects each bad one with the
gate's reason, and its counts add up: in == out + rejects.
"""

from __future__ import annotations

import io
import json
import random
import sqlite3
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile
from rich.console import Console
from support.pixel_embedder import PixelEmbedder
from support.web_server import LoopbackServer, Reply, jpeg_bytes

from fvqa.config import CrawlConfig, InfoseekConfig, RunConfig
from fvqa.eval.benchmarks import load_benchmark
from fvqa.eval.config import BenchmarkSpec
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.crawl import CrawlStage
from fvqa.pipelines.import_upstream import import_upstream
from fvqa.pipelines.infoseek import InfoseekStage
from fvqa.search.config import LocalConfig
from fvqa.search.local_index import build_index
from fvqa.store import ImageError, Workspace
from fvqa.vision.gate import REASONS, check_image

# Pillow warns when it opens the 12000x12000 header; the gate refuses it before any decoding
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def claims_12000() -> bytes:
    """A 74-byte PNG whose header claims 12000 x 12000 RGB pixels (432 MB if decoded)."""
    ihdr = struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(bytes(range(9))))
            + _chunk(b"IEND", b""))


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG")
    return buf.getvalue()


VALID = jpeg_bytes(1, (160, 120))
# name -> (bytes, the reason every door rejects it with; None: kept)
HOSTILE: dict[str, tuple[bytes, str | None]] = {
    "truncated": (jpeg_bytes(6, (160, 120))[: len(jpeg_bytes(6, (160, 120))) // 2], "image_undecodable"),
    "tiny": (tiny_png(), "image_too_small"),
    "claims12000": (claims_12000(), "image_too_large"),
    "random": (random.Random(0).randbytes(3000), "image_format_unknown"),
    "valid": (VALID, None),
}
BAD = {name: reason for name, (_, reason) in HOSTILE.items() if reason}


def test_the_hostile_files_are_what_they_claim() -> None:
    assert len(HOSTILE["claims12000"][0]) == 74
    assert Image.open(io.BytesIO(HOSTILE["claims12000"][0])).size == (12000, 12000)
    assert Image.open(io.BytesIO(HOSTILE["truncated"][0])).size == (160, 120)  # the header reads fine
    assert set(BAD.values()) == set(REASONS)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_gate_reason_per_file(name: str) -> None:
    data, reason = HOSTILE[name]
    if reason is None:
        checked = check_image(data)
        assert (checked.kind, checked.ext, checked.width, checked.height) == ("jpeg", "jpg", 160, 120)
        assert checked.image.size == (160, 120)
        return
    with pytest.raises(ImageError) as exc:
        check_image(data)
    assert exc.value.reason == reason and exc.value.detail


def test_gate_refuses_the_pixel_budget_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 12000x12000 claim is refused from the header: no pixel buffer is ever asked for."""
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageError, match="12000x12000 = 144000000 pixels > max_pixels 64000000"):
        check_image(claims_12000())


def test_gate_catches_truncation_even_if_someone_turned_truncated_loading_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError) as exc:
        check_image(HOSTILE["truncated"][0])
    assert exc.value.reason == "image_undecodable" and "truncated" in exc.value.detail


# ------------------------------------------------------------------------------------------ doors


def test_crawl_door(tmp_path: Path) -> None:
    routes = {f"/{name}.img": Reply(body=data, content_type="image/jpeg") for name, (data, _) in HOSTILE.items()}
    with LoopbackServer(routes) as srv:
        config = RunConfig(workspace=tmp_path / "ws", crawl=CrawlConfig(
            source="urls", allow_private=True, respect_robots=False, fetch_pages=False, retries=0,
            clip_model="fvqa-tiny", clip_pretrained=None))
        with Workspace(config.workspace) as ws:
            ws.insert("concepts", [dict(concept_id=f"c-{name}", entry_id=i, concept=name, count=1, tier="tail")
                                   for i, name in enumerate(HOSTILE)])
            ws.execute("CREATE TABLE match_candidates (concept_id VARCHAR, url VARCHAR, page_url VARCHAR)")
            ws.insert("match_candidates", [dict(concept_id=f"c-{name}", url=srv.url(f"/{name}.img"))
                                           for name in HOSTILE])
            stats = execute_stage(CrawlStage(), ws, config, Console(quiet=True))
            kept = [r[0] for r in ws.execute("SELECT concept_id FROM crawled")]
            rejects = {k: r for k, r in ws.execute("SELECT key, reason FROM rejects")}
            n_images = ws.count("images")
        url = srv.url
    assert kept == ["c-valid"] and n_images == 1
    assert {name: rejects[url(f"/{name}.img")] for name in BAD} == BAD
    assert {rejects[f"c-{name}"] for name in BAD} == {"no_usable_image"}
    assert stats.n_in == stats.n_out + stats.rejected["no_usable_image"] == len(HOSTILE)


def test_infoseek_door(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "images").mkdir(parents=True)
    lines, qtypes = [], []
    for name, (data, _) in HOSTILE.items():
        (folder / "images" / f"{name}.jpg").write_bytes(data)
        lines.append(json.dumps(dict(data_id=name, image_id=name, question="Which city is this?", answer=["Paris"],
                                     answer_eval=["Paris"], data_split="val")))
        qtypes.append(json.dumps(dict(data_id=name, question_type="String")))
    main = folder / "infoseek_val.jsonl"
    main.write_text("\n".join(lines) + "\n")
    (folder / "infoseek_val_qtype.jsonl").write_text("\n".join(qtypes) + "\n")
    config = RunConfig(workspace=tmp_path / "ws",
                       infoseek=InfoseekConfig(jsonl=main, stratify=["question_type"], n=100))
    with Workspace(config.workspace) as ws:
        stats = execute_stage(InfoseekStage(), ws, config, Console(quiet=True))
        items = [r[0] for r in ws.execute("SELECT item_id FROM items")]
        rejects = dict(ws.execute("SELECT key, reason FROM rejects WHERE stage = 'infoseek'"))
        n_images = ws.count("images")
    assert items == ["infoseek-valid"] and n_images == 1
    assert rejects == {f"infoseek-{name}": reason for name, reason in BAD.items()}
    assert stats.n_in == stats.n_out + stats.n_rejected == len(HOSTILE)


def test_import_upstream_door(tmp_path: Path) -> None:
    rows = [dict(data_id=name, prompt=[{"role": "user", "content": "<image>Which city is this?"}],
                 images=[{"bytes": data, "path": None}], data_source="fvqa_test",
                 reward_model={"ground_truth": "Paris", "candidate_answers": "[]"})
            for name, (data, _) in HOSTILE.items()]
    src = tmp_path / "fvqa_test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    with Workspace(tmp_path / "ws") as ws:
        counts = import_upstream(ws, src)
        items = [r[0] for r in ws.execute("SELECT item_id FROM items")]
        rejects = dict(ws.execute("SELECT key, reason FROM rejects WHERE stage = 'import'"))
        n_images = ws.count("images")
    assert items == ["import-valid"] and n_images == 1
    assert rejects == BAD
    assert len(HOSTILE) == counts["imported"] + counts["rejected"] and counts["imported"] == 1


def test_eval_loader_door(tmp_path: Path) -> None:
    lines = []
    for name, (data, _) in HOSTILE.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
        lines.append(json.dumps(dict(id=name, image=f"{name}.jpg", question="Which city is this?", answer="Paris")))
    path = tmp_path / "live.jsonl"
    path.write_text("\n".join(lines) + "\n")
    res = load_benchmark(BenchmarkSpec(name="live", kind="livevqa", path=path))
    assert [it.item_id for it in res.items] == ["valid"]
    assert {r.key: r.reason for r in res.rejects} == BAD  # a load reject, not a question scored as wrong
    assert all(r.detail.startswith("line ") for r in res.rejects)
    assert res.n_rows == len(res.items) + len(res.rejects) == len(HOSTILE)


def test_search_index_door(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    pages = []
    for name, (data, _) in HOSTILE.items():
        (images / f"{name}.jpg").write_bytes(data)
        pages.append(json.dumps(dict(wikidata_id=name, title=f"Page {name}", text=f"All about {name}.",
                                     url=f"https://example.org/{name}")))
    corpus = tmp_path / "pages.jsonl"
    corpus.write_text("\n".join(pages) + "\n")
    out = tmp_path / "index"
    stats = build_index(corpus, images, out, config=LocalConfig(clip_model="fvqa-tiny", clip_pretrained=None),
                        embedder=PixelEmbedder())  # type: ignore[arg-type]
    db = sqlite3.connect(out / "pages.sqlite")
    rejects = dict(db.execute("SELECT key, reason FROM rejects WHERE source = 'images'"))
    kept = [r[0] for r in db.execute("SELECT source FROM images")]
    db.close()
    assert kept == ["valid.jpg"]
    assert rejects == {f"{name}.jpg": reason for name, reason in BAD.items()}
    assert len(HOSTILE) == stats.images + sum(stats.rejected.values())
