"""`fvqa search index build`: one writer per output folder, private temp folders, honest meta.json,
and batches of images already shrunk to the embedder's input size."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fvqa.search.config import LocalConfig
from fvqa.search.local_index import IndexBusyError, LocalIndex, build_index

CFG = LocalConfig(clip_model="fvqa-tiny", clip_pretrained=None)


class FakeEmbedder:
    """Deterministic 8-d vectors; records the sizes it was given; can hold the first call."""

    name = "fake/test"
    input_size = 64

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.hold = hold
        self.entered = threading.Event()
        self.sizes: list[tuple[int, int]] = []

    def embed(self, images):
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(30), "test never released the build"
        self.sizes += [img.size for img in images]
        vecs = np.array([[(i + 1.0) * (j + 1) for j in range(8)] for i, _ in enumerate(images)], dtype=np.float32)
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def _inputs(tmp_path: Path, n: int = 3, size: tuple[int, int] = (96, 80)) -> tuple[Path, Path]:
    pages = tmp_path / "pages.jsonl"
    pages.write_text("".join(json.dumps({"url": f"https://x.test/p{i}", "title": f"Page {i}",
                                         "text": f"page {i} is about thing {i}."}) + "\n" for i in range(n)))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", size, (40 * i, 90, 200 - 30 * i)).save(folder / f"p{i}.png")
    return pages, folder


def _assert_valid_index(out: Path, pages: int, images: int) -> None:
    meta = json.loads((out / "meta.json").read_text())
    db = sqlite3.connect(out / "pages.sqlite")
    counts = (db.execute("SELECT COUNT(*) FROM pages").fetchone()[0], db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    db.close()
    assert (meta["pages"], meta["images"]) == counts == (pages, images)
    assert np.load(out / "image_vectors.npy").shape[0] == images
    LocalIndex(out).close()


def test_a_second_concurrent_build_of_the_same_folder_fails_clearly(tmp_path: Path) -> None:
    pages, folder = _inputs(tmp_path)
    out = tmp_path / "index"
    release = threading.Event()
    slow = FakeEmbedder(hold=release)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            build_index(pages, folder, out, config=CFG, embedder=slow)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert slow.entered.wait(30), "first build never reached the embedder"
        with pytest.raises(IndexBusyError, match=r"another build is writing .*index"):
            build_index(pages, folder, out, config=CFG, embedder=FakeEmbedder())
    finally:
        release.set()
        thread.join(60)
    assert not errors, errors
    _assert_valid_index(out, pages=3, images=3)
    assert not list(tmp_path.glob(".index.tmp-*")) and not list(tmp_path.glob(".index.old-*"))
    # the lock is released: a later build replaces the index
    build_index(pages, None, out, config=CFG)
    _assert_valid_index(out, pages=3, images=0)


def test_cli_reports_a_held_lock_in_one_line_and_exits_2(tmp_path: Path) -> None:
    pages, _ = _inputs(tmp_path, n=1)
    out = tmp_path / "index"
    fd = os.open(tmp_path / "index.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process's build holds it
    try:
        res = subprocess.run([sys.executable, "-m", "fvqa.cli", "search", "index", "build", "--corpus", str(pages),
                              "--out", str(out)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"})
    finally:
        os.close(fd)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "another build is writing" in lines[0], res.stderr
    assert not out.exists()


def test_batches_hold_images_shrunk_to_the_embedder_input(tmp_path: Path) -> None:
    pages, folder = _inputs(tmp_path, n=2, size=(1600, 1200))
    emb = FakeEmbedder()
    build_index(pages, folder, tmp_path / "index", config=CFG, embedder=emb)
    assert len(emb.sizes) == 2 and all(min(s) == 64 and max(s) <= 86 for s in emb.sizes), emb.sizes


def test_shrinking_with_the_clip_preprocess_keeps_vectors_identical(tmp_path: Path) -> None:
    from fvqa.search.clip import ClipEmbedder

    pages, folder = _inputs(tmp_path, n=1, size=(640, 480))
    big = Image.open(folder / "p0.png")
    big.paste((255, 0, 0), (100, 100, 300, 200))
    big.save(folder / "p0.png")
    emb = ClipEmbedder(CFG.clip_model, CFG.clip_pretrained)
    seen: list[tuple[int, int]] = []
    real = emb.embed
    emb.embed = lambda images: (seen.extend(i.size for i in images), real(images))[1]  # type: ignore[method-assign]
    build_index(pages, folder, tmp_path / "index", config=CFG, embedder=emb)
    assert seen == [(85, 64)]
    stored = np.load(tmp_path / "index/image_vectors.npy")
    np.testing.assert_allclose(stored[0], real([Image.open(folder / "p0.png").convert("RGB")])[0], atol=1e-6)
