"""`fvqa build --stages index` with `executor: ray` writes the index a local build writes.

Images are read and embedded on Ray workers; pages, joins, rows and rejects stay on the driver, so
the tables match row for row and the vectors up to float rounding (workers embed in other batches).
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from support.paths import write_demo_config

from fvqa.config import RunConfig, load_config
from fvqa.pipelines.runner import run_build
from fvqa.search.local_index import LocalIndex, ensure_index


def _manifest(world: Path, folder: Path) -> Path:
    """The world's image manifest (absolute paths) with unusable lines mixed in: a bad line, a line
    without a path, a missing file, an image of no page without a title, one of no page with its own."""
    rows = [json.loads(line) for line in (world / "web/images.jsonl").read_text().splitlines()]
    for row in rows:
        row["path"] = str(world / "web" / row["path"])
    some = rows[5]["path"]
    lines = [json.dumps(r) for r in rows]
    lines[40:40] = ["{not json", json.dumps({"title": "no path"}),
                    json.dumps({"path": str(folder / "gone.jpg")}), json.dumps({"path": some}),
                    json.dumps({"path": some, "title": "An orphan", "url": "http://x/o.jpg"})]
    path = folder / "images.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _build(tmp: Path, world: Path, manifest: Path, *overrides: str) -> tuple[RunConfig, str]:
    tmp.mkdir()
    config = load_config(write_demo_config(tmp, world), [f"index.images={manifest}", *overrides])
    stats = run_build(config, only=["index"], console=Console(file=io.StringIO()))["index"]
    return config, " ".join(stats.notes)


def _tables(index: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(index / "pages.sqlite") as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
                for t in ("pages", "images", "rejects")}


def test_index_built_on_ray_is_the_local_index(tmp_path: Path, demo_world: Path, ray_cluster: object) -> None:
    manifest = _manifest(demo_world, tmp_path)
    local, local_note = _build(tmp_path / "local", demo_world, manifest)
    remote, remote_note = _build(tmp_path / "ray", demo_world, manifest, "executor=ray")
    assert remote.executor == "ray" and local.executor == "local"
    a, b = local.search.local.index_dir, remote.search.local.index_dir
    assert a is not None and b is not None and a != b
    # the images were embedded by Ray's worker processes (the pool holds 2), the rest is the same build
    assert local_note == f"240 pages, 481 images (fvqa-tiny/random) -> {a}", local_note
    pattern = r"240 pages, 481 images \(fvqa-tiny/random, embedded by (1 Ray worker|2 Ray workers)\) -> "
    assert re.fullmatch(pattern + re.escape(str(b)), remote_note), remote_note

    tables_a, tables_b = _tables(a), _tables(b)
    for name in ("pages", "images", "rejects"):
        assert tables_b[name] == tables_a[name], name
    reasons = [r[2] for r in tables_a["rejects"]]
    assert {"malformed_json", "field_missing", "image_missing", "no_title"} <= set(reasons), reasons
    assert any(row[2] == "An orphan" and row[1] is None for row in tables_a["images"])

    meta_a, meta_b = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    for key in ("format_version", "pages", "images", "rejected", "sources", "embedder", "clip_model", "ann"):
        assert meta_b[key] == meta_a[key], key
    vec_a, vec_b = np.load(a / "image_vectors.npy"), np.load(b / "image_vectors.npy")
    assert vec_a.shape == vec_b.shape == (481, vec_a.shape[1]) and vec_b.dtype == np.float32
    assert np.allclose(vec_a, vec_b, atol=1e-5)

    ix_a, ix_b = LocalIndex(a, config=local.search.local), LocalIndex(b, config=remote.search.local)
    try:
        for n in (0, 77, 301):
            query = Image.open(json.loads(manifest.read_text().splitlines()[n])["path"])
            hits_a, hits_b = ix_a.image_search(query, k=5), ix_b.image_search(query, k=5)
            assert [(h.title, h.url) for h in hits_b] == [(h.title, h.url) for h in hits_a] and hits_a
    finally:
        ix_a.close()
        ix_b.close()

    # where an index was built is not part of whether it is up to date
    assert ensure_index(remote.index.corpus, manifest, b, config=local.search.local) is None
