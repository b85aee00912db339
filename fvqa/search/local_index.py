"""The offline search backend: a BM25 text index and a CLIP image index over a user corpus.

`build_index` reads a page corpus (InfoSeek Wiki6M jsonl, or any jsonl of `{url, title, text}`) and
an image manifest (`{path, wikidata_id?, title?, url?, page_url?}`, paths relative to the manifest's
folder) or a folder of images, and writes one folder:

A folder of images links each file to a page by its stem (= the page's key, i.e. wikidata_id, or the
last segment of its URL). Every file in it is accounted for: one whose name does not end in an image
suffix (`random.bin`, `.DS_Store`) is not read but rejected as "not an image file", like any other
file that cannot be indexed.

* `pages.sqlite` — pages (id = BM25 document id) and images (id = row of the vector matrix, with a
  thumbnail), plus `rejects`: every input line or image that was skipped, with a reason;
* `text/` — the bm25s index (memory-mapped at query time);
* `image_vectors.npy` — unit-norm CLIP vectors (cosine = dot product), searched exactly below
  `ann_min_vectors` images, and the reference the ANN index is built from;
* `image_ann.faiss` — only at `ann_min_vectors` images or more: an IVF index over the same vectors
  (fvqa.search.ann), which image search then queries instead of scanning every vector;
* `meta.json` — format version, CLIP model, counts, build time.

`LocalIndex` answers `image_search` (titles/thumbnails/urls of the nearest images' pages, one hit per
page) and `text_search` (top pages by BM25, each with an extractive summary w.r.t. the question).
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import bm25s
import numpy as np
from PIL import Image

from fvqa.errors import ConfigError, FvqaError
from fvqa.formats.jsonl import BadLine, read_jsonl
from fvqa.reasons import check_code
from fvqa.search.ann import KIND as ANN_KIND
from fvqa.search.ann import AnnIndex, AnnIndexError
from fvqa.search.clip import ClipEmbedder
from fvqa.search.config import LocalConfig
from fvqa.search.summarize import extractive_summary, tokenize
from fvqa.search.types import BadRequest, Candidate, ImageHit, PageError, QueryImage, SearchError, TextHit
from fvqa.vision.gate import ImageReject, check_image

FORMAT_VERSION = 1
ANN_FILE = "image_ann.faiss"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
MIN_SIDE = 32
MAX_SHARDS = 1000  # an executor gets image shards of batch_size, or a multiple of it above this many shards

SCHEMA = """
CREATE TABLE pages (id INTEGER PRIMARY KEY, key TEXT, url TEXT, title TEXT, text TEXT);
CREATE TABLE images (id INTEGER PRIMARY KEY, page_id INTEGER, title TEXT, url TEXT, source TEXT,
                     thumbnail BLOB);
CREATE TABLE rejects (source TEXT, key TEXT, reason TEXT, detail TEXT);
CREATE INDEX pages_key ON pages(key);
"""

Progress = Callable[[str, int, int | None], None]
"""(phase, done, total) -> None; called as the build advances."""


class ShardMap(Protocol):
    """Runs `worker(**init)(shard)` for each shard, yielding results in shard order: the build's
    `fvqa.executor.map_shards` with its run config bound (this package must not import the run config)."""

    def __call__(self, worker: Callable[..., Any], init: dict[str, Any], shards: Sequence[Any], *,
                 name: str) -> Iterator[Any]: ...


@dataclass
class IndexStats:
    """What a build produced and what it skipped (by reason), for the CLI's summary table."""

    pages: int = 0
    images: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    bytes_on_disk: int = 0
    embedder: str = ""
    worker_processes: int = 0  # processes of the executor that embedded the images (0: this one did)


# ----------------------------------------------------------------------------------------------
# Reading the corpus
# ----------------------------------------------------------------------------------------------


def _wikipedia_url(title: str) -> str:
    return "https://en.wikipedia.org/wiki/" + quote(title.replace(" ", "_"))


def parse_page(row: Any) -> tuple[str, str, str, str]:
    """(key, url, title, text) from a Wiki6M line or a `{url, title, text}` line; ValueError if unusable."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    title = row.get("wikipedia_title", row.get("title"))
    text = row.get("wikipedia_content", row.get("text"))
    if not isinstance(title, str) or not title.strip():
        raise ValueError("missing title ('wikipedia_title' or 'title')")
    if not isinstance(text, str) or not text.strip():
        text = row.get("wikipedia_summary") or ""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("missing text ('wikipedia_content', 'text' or 'wikipedia_summary')")
    url = row.get("url") or (_wikipedia_url(title) if "wikipedia_title" in row else "")
    key = str(row.get("wikidata_id") or url or title)
    return key, str(url or ""), title.strip(), text


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
    """(line number, object) per record, or (line number, the BadLine) per bad line."""
    for rec in read_jsonl(path):
        yield (rec.line_no, rec) if isinstance(rec, BadLine) else rec


def _image_entries(images: Path) -> Iterator[tuple[str, Path, dict[str, Any] | ImageReject]]:
    """(key, file, manifest row or the reject of its line) from a manifest jsonl or a folder of image files."""
    if images.is_dir():
        for path in sorted(p for p in images.rglob("*") if not p.is_dir()):
            rel = path.relative_to(images).as_posix()
            if path.suffix.lower() not in IMAGE_SUFFIXES:  # not even read: it may be anything, of any size
                yield rel, path, ImageReject("not_an_image_file", f"suffix {path.suffix or '(none)'!r} is not one of "
                                             f"{', '.join(sorted(IMAGE_SUFFIXES))}")
                continue
            yield rel, path, {"path": rel, "page_key": path.stem}
        return
    base = images.parent
    for lineno, row in _jsonl(images):
        key = f"{images.name}:{lineno}"
        if isinstance(row, BadLine):
            yield key, base, ImageReject(row.code, row.reason)
        elif not isinstance(row.get("path"), str):
            yield key, base, ImageReject("field_missing", "manifest line needs a string 'path'")
        else:
            yield row["path"], base / row["path"], row


def _load_image(path: Path, max_side: int) -> tuple[Image.Image, bytes]:
    """Decoded RGB image and a JPEG thumbnail; `ImageReject` (a reason code and detail) if unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageReject("image_missing", "image file not found") from exc
    except OSError as exc:
        raise ImageReject("image_unreadable", f"image file unreadable ({type(exc).__name__})") from exc
    rgb = check_image(data, min_side=MIN_SIDE).image.convert("RGB")
    thumb = rgb.copy()
    thumb.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return rgb, buf.getvalue()


def _embed_input_shrinker(emb: Any) -> Callable[[Image.Image], Image.Image]:
    """Downscale a decoded image to what the embedder looks at, so a batch never holds full-size images.

    An open_clip embedder's preprocess starts with a `Resize` (shorter side to the model's input
    size); applying that same transform here gives the very pixels the embedder would compute, so
    vectors do not change. Other embedders get their shorter side bounded by `input_size` (or 224).
    """
    for step in getattr(getattr(emb, "preprocess", None), "transforms", None) or []:
        if type(step).__name__ == "Resize":
            size = step.size if isinstance(step.size, int) else min(step.size)
            return lambda img: step(img) if min(img.size) > size else img
    side = int(getattr(emb, "input_size", 224))

    def shrink(img: Image.Image) -> Image.Image:
        short = min(img.size)
        if short <= side:
            return img
        w, h = img.size
        return img.resize((max(1, round(w * side / short)), max(1, round(h * side / short))),
                          Image.Resampling.BICUBIC)

    return shrink


@dataclass
class _Loaded:
    """A usable image on its way into the index: its thumbnail, and the (shrunk) image still to embed
    or the vector a worker already computed."""

    thumbnail: bytes
    image: Image.Image | None = None
    vector: np.ndarray | None = None


ImageOutcome = tuple[str, dict[str, Any] | None, _Loaded | ImageReject]
"""(key, manifest row (None when its line was rejected), the loaded image or why it is unusable)."""


def _load_here(images: Path, cfg: LocalConfig,
               shrink: Callable[[Image.Image], Image.Image]) -> Iterator[ImageOutcome]:
    """Every image entry, loaded in this process (embedded later, in batches of usable, titled images)."""
    for key, path, row in _image_entries(images):
        if isinstance(row, ImageReject):
            yield key, None, row
            continue
        try:
            img, thumb = _load_image(path, cfg.thumbnail_max_side)
        except ImageReject as exc:
            yield key, row, exc
            continue
        yield key, row, _Loaded(thumb, image=shrink(img))


def _load_on_workers(images: Path, cfg: LocalConfig, shard_map: ShardMap,
                     stats: IndexStats) -> Iterator[ImageOutcome]:
    """Every image entry, loaded and embedded by executor workers (`fvqa.search.index_remote`).

    Workers get (key, path) shards of consecutive entries; their outcomes come back in order and are
    matched to a second read of the manifest, so the driver holds paths, not every manifest row. A
    worker embeds every image it can load, titled or not (titles are the driver's check), so its
    batches differ from the in-process build's and vectors may differ in their last float digits."""
    from fvqa.search.index_remote import EmbeddedImage, ImageEmbedWorker

    todo = [(key, str(path)) for key, path, row in _image_entries(images) if not isinstance(row, ImageReject)]
    size = cfg.batch_size * max(1, math.ceil(len(todo) / (cfg.batch_size * MAX_SHARDS)))
    # with nothing to load, one empty shard still tells the embedder's name (meta.json has it either way)
    shards = [todo[i:i + size] for i in range(0, len(todo), size)] or [[]]
    del todo
    results = shard_map(ImageEmbedWorker, {"config": cfg}, shards, name="index")

    workers: set[str] = set()

    def outcomes() -> Iterator[tuple[str, Any]]:
        for shard, result in zip(shards, results, strict=True):
            stats.embedder = result.embedder
            workers.add(result.worker)
            stats.worker_processes = len(workers)
            for (key, _), outcome in zip(shard, result.outcomes, strict=True):
                yield key, outcome

    done = outcomes()
    changed = FvqaError(f"{images} changed while the index was being built: build it again")
    for key, _path, row in _image_entries(images):
        if isinstance(row, ImageReject):
            yield key, None, row
            continue
        sent, outcome = next(done, (None, None))
        if sent != key:
            raise changed
        if isinstance(outcome, EmbeddedImage):
            yield key, row, _Loaded(outcome.thumbnail, vector=outcome.vector)
        else:
            yield key, row, ImageReject(outcome.reason, outcome.detail)
    if next(done, None) is not None:
        raise changed


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


class IndexBusyError(FvqaError):
    """Another build holds the lock on the same output folder."""


@contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<out>.lock` for the whole build; IndexBusyError if another build has it."""
    import fcntl

    lock_path = out.with_name(out.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusyError(f"another build is writing {out} (lock {lock_path} is held): "
                                 "wait for it to finish, or choose another --out") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock; the lock file stays (removing it would race)


def _sibling(out: Path, kind: str) -> Path:
    """A fresh name `.<out>.<kind>-<pid>-<random>` next to `out` (not created)."""
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _publish(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp`: each step a rename, so `out` is never half-written."""
    if not out.exists():
        tmp.rename(out)
        return
    old = _sibling(out, "old")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_index(
    corpus: Path | str,
    images: Path | str | None,
    out: Path | str,
    *,
    config: LocalConfig | None = None,
    embedder: ClipEmbedder | None = None,
    progress: Progress | None = None,
    shard_map: ShardMap | None = None,
) -> IndexStats:
    """Build the local index into `out`, replacing any index there.

    Images are read and embedded in this process, or, given a `shard_map` (the build's executor, e.g.
    Ray), by its workers; everything else (pages, BM25, joins, rows, rejects, ANN) is done here either
    way, so both give the same index row for row. Only the vectors may differ in their last float digits:
    workers embed in other batches (see `_load_on_workers`).

    The build holds an exclusive lock on `<out>.lock` (a second build of the same `out` fails at once
    with IndexBusyError), writes into its own temporary folder next to `out`, writes `meta.json` last
    from what the folder holds, and publishes by renaming; a failed build leaves `out` untouched.
    Bad lines and unusable images never stop the build: each is recorded in the index's `rejects`
    table and counted in the returned stats by reason.
    """
    cfg = config or LocalConfig()
    corpus, out = Path(corpus), Path(out)
    if embedder is not None and shard_map is not None:
        raise ValueError("build_index: an embedder instance cannot be sent to executor workers "
                         "(pass an embedder or a shard_map)")
    if not corpus.is_file():
        raise ConfigError(f"corpus file not found: {corpus}")
    if images is not None and not Path(images).exists():
        raise ConfigError(f"image manifest or folder not found: {images}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out):
        for leftover in ("tmp", "old"):  # left by a crashed build (we hold the lock: nobody is using them)
            for stale in out.parent.glob(f".{glob.escape(out.name)}.{leftover}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = _sibling(out, "tmp")
        tmp.mkdir()  # (not mkdtemp: its 0700 mode would become the published index's)
        try:
            stats = _build_into(corpus, images, tmp, cfg, embedder, progress, shard_map)
            _publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        stats.bytes_on_disk = _dir_size(out)
    return stats


def _build_into(corpus: Path, images: Path | str | None, tmp: Path, cfg: LocalConfig,
                embedder: ClipEmbedder | None, progress: Progress | None,
                shard_map: ShardMap | None) -> IndexStats:
    """Write a complete index into the empty folder `tmp` (meta.json last)."""
    t0 = time.perf_counter()
    stats = IndexStats()
    db = sqlite3.connect(tmp / "pages.sqlite")
    db.executescript(SCHEMA)

    def reject(source: str, key: str, reason: str, detail: str = "") -> None:
        check_code("index", reason)
        db.execute("INSERT INTO rejects VALUES (?, ?, ?, ?)", (source, key, reason, detail))
        stats.rejected[f"{source}: {reason}"] += 1

    # pages -> sqlite + bm25
    texts: list[str] = []
    key_to_page: dict[str, int] = {}
    url_to_page: dict[str, int] = {}
    batch: list[tuple[int, str, str, str, str]] = []
    for lineno, row in _jsonl(corpus):
        if isinstance(row, BadLine):
            reject("pages", f"{corpus.name}:{lineno}", row.code, row.reason)
            continue
        try:
            key, url, title, text = parse_page(row)
        except ValueError as exc:
            reject("pages", f"{corpus.name}:{lineno}", "page_unusable", str(exc))
            continue
        if key in key_to_page:
            reject("pages", key, "duplicate_id", f"line {lineno}: page key seen before")
            continue
        pid = len(texts)
        key_to_page[key] = pid
        if url:
            url_to_page.setdefault(url, pid)
            url_to_page.setdefault("slug:" + url.rstrip("/").rsplit("/", 1)[-1], pid)
        texts.append(f"{title}\n{text}")
        batch.append((pid, key, url, title, text[: cfg.text_field_chars]))
        if len(batch) >= 10_000:
            db.executemany("INSERT INTO pages VALUES (?, ?, ?, ?, ?)", batch)
            batch.clear()
            if progress:
                progress("pages", len(texts), None)
    db.executemany("INSERT INTO pages VALUES (?, ?, ?, ?, ?)", batch)
    if not texts:
        db.close()
        raise ConfigError(f"{corpus}: no usable pages (see rejects: {dict(stats.rejected)})")
    stats.pages = len(texts)
    if progress:
        progress("tokenize", len(texts), len(texts))
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    retriever.save(tmp / "text", show_progress=False)
    del texts

    # images -> CLIP vectors + thumbnails (loaded and embedded here or by the executor's workers)
    vectors: list[np.ndarray] = []
    if images is not None:
        outcomes: Iterator[ImageOutcome]
        embed: Callable[[list[_Loaded]], np.ndarray]
        if shard_map is None:
            emb = embedder or ClipEmbedder(cfg.clip_model, cfg.clip_pretrained, cfg.device)
            stats.embedder = emb.name
            outcomes = _load_here(Path(images), cfg, _embed_input_shrinker(emb))

            def embed(batch: list[_Loaded]) -> np.ndarray:
                return emb.embed([got.image for got in batch if got.image is not None])
        else:
            outcomes = _load_on_workers(Path(images), cfg, shard_map, stats)

            def embed(batch: list[_Loaded]) -> np.ndarray:
                return np.stack([got.vector for got in batch if got.vector is not None])
        pending: list[tuple[_Loaded, tuple[Any, ...]]] = []

        def flush() -> None:
            if not pending:
                return
            vecs = embed([got for got, _ in pending])
            if vecs.shape[0] != len(pending):
                raise FvqaError(f"index build: {vecs.shape[0]} vectors for {len(pending)} images")
            start = stats.images
            db.executemany(
                "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?)",
                [(start + i, *meta) for i, (_, meta) in enumerate(pending)],
            )
            vectors.append(vecs)
            stats.images += len(pending)
            pending.clear()
            if progress:
                progress("images", stats.images, None)

        for key, row, got in outcomes:
            if isinstance(got, ImageReject):
                reject("images", key, got.reason, got.detail)
                continue
            assert row is not None  # only a rejected manifest line has no row
            page_key = str(row.get("wikidata_id") or row.get("page_key") or "")
            pid = key_to_page.get(page_key)
            if pid is None and row.get("page_url"):
                pid = url_to_page.get(str(row["page_url"]))
            if pid is None and row.get("page_key"):  # image folder: file stem = page key or URL slug
                pid = url_to_page.get("slug:" + str(row["page_key"]))
            title = str(row.get("title") or "")
            url = str(row.get("page_url") or "")
            if pid is not None:
                page_title, page_url = db.execute("SELECT title, url FROM pages WHERE id = ?", (pid,)).fetchone()
                title, url = page_title or title, page_url or url
            if not title:
                reject("images", key, "no_title", "the image matches no page and has no title of its own")
                continue
            pending.append((got, (pid, title, url or str(row.get("url") or ""), key, got.thumbnail)))
            if len(pending) >= cfg.batch_size:
                flush()
        flush()
    dim = vectors[0].shape[1] if vectors else 0
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)
    np.save(tmp / "image_vectors.npy", matrix)
    ann = _write_ann(matrix, tmp, cfg, progress) if matrix.shape[0] >= cfg.ann_min_vectors else None
    vectors.clear()
    del matrix
    db.commit()
    # meta.json describes what the folder holds, read back from it (not what the loop meant to write)
    n_pages = db.execute("SELECT COUNT(*) FROM pages").fetchone()[0]
    n_images = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    db.close()
    n_vectors = np.load(tmp / "image_vectors.npy", mmap_mode="r").shape[0]
    if (n_pages, n_images) != (stats.pages, stats.images) or n_vectors != n_images:
        raise FvqaError(f"index build wrote {n_pages} pages / {n_images} images / {n_vectors} vectors, "
                        f"expected {stats.pages} / {stats.images} / {stats.images}: not publishing it")
    stats.seconds = time.perf_counter() - t0
    meta = dict(format_version=FORMAT_VERSION, pages=n_pages, images=n_images,
                sources=_fingerprint(corpus, images),
                clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained, embedder=stats.embedder,
                rejected=dict(stats.rejected), built_at=time.time(), seconds=round(stats.seconds, 2), ann=ann)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return stats


def _write_ann(matrix: np.ndarray, folder: Path, cfg: LocalConfig, progress: Progress | None) -> dict[str, Any]:
    """Build the IVF index over `matrix` into `folder/ANN_FILE`; its meta.json entry (checked on open)."""
    if progress:
        progress("ann", 0, matrix.shape[0])
    t0 = time.perf_counter()
    ann = AnnIndex.build(matrix)
    tmp = folder / f".{ANN_FILE}.{secrets.token_hex(4)}"
    ann.save(tmp)
    os.replace(tmp, folder / ANN_FILE)  # atomic also when repairing a published index
    if progress:
        progress("ann", matrix.shape[0], matrix.shape[0])
    return dict(kind=ANN_KIND, file=ANN_FILE, vectors=ann.ntotal, dim=ann.dim, nlist=ann.nlist,
                bytes=(folder / ANN_FILE).stat().st_size, seconds=round(time.perf_counter() - t0, 2))


def _open_ann_file(folder: Path, meta: dict[str, Any]) -> AnnIndex:
    """The folder's ANN index (memory-mapped); AnnIndexError if missing, damaged or not meta.json's."""
    ann, n = meta["ann"], int(meta.get("images") or 0)
    path = folder / str(ann.get("file", ANN_FILE))
    if not path.is_file():
        raise AnnIndexError(f"ANN index file {path} is missing")
    if path.stat().st_size != ann.get("bytes") or ann.get("vectors") != n or ann.get("kind") != ANN_KIND:
        raise AnnIndexError(f"ANN index file {path} does not match meta.json (truncated or replaced)")
    return AnnIndex.load(path, expected=n, dim=int(ann.get("dim") or 0))


def _ann_problem(folder: Path, meta: dict[str, Any], cfg: LocalConfig) -> str | None:
    """Why the folder's ANN file cannot serve `cfg`, or None if it can or is not needed."""
    if not meta.get("ann"):
        n = int(meta.get("images") or 0)
        return f"{n} images but no ANN index (built with a higher ann_min_vectors)" if n >= cfg.ann_min_vectors else None
    try:
        _open_ann_file(folder, meta)
    except AnnIndexError as exc:
        return str(exc)
    return None


def _repair_ann(out: Path, meta: dict[str, Any], cfg: LocalConfig, progress: Progress | None) -> None:
    """Rebuild only the ANN file of a fresh index from its stored vectors (no re-embedding), then meta.json."""
    with _build_lock(out):
        current = json.loads((out / "meta.json").read_text())
        if current.get("built_at") != meta.get("built_at") or not _ann_problem(out, current, cfg):
            return  # another process rebuilt or repaired it while we waited for the lock
        matrix = np.load(out / "image_vectors.npy", mmap_mode="r")
        meta = dict(current, ann=_write_ann(matrix, out, cfg, progress))
        tmp = out / f".meta.json.{secrets.token_hex(4)}"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out / "meta.json")


def _fingerprint(corpus: Path, images: Path | str | None) -> dict[str, Any]:
    """Paths, sizes and mtimes of the inputs: enough to tell whether an index is stale."""
    out: dict[str, Any] = {}
    for name, path in (("corpus", corpus), ("images", images)):
        if path is None:
            out[name] = None
            continue
        p = Path(path).resolve()
        st = p.stat()
        out[name] = {"path": str(p), "size": st.st_size, "mtime": st.st_mtime}
    return out


def ensure_index(corpus: Path | str, images: Path | str | None, out: Path | str, *,
                 config: LocalConfig | None = None, progress: Progress | None = None,
                 shard_map: ShardMap | None = None) -> IndexStats | None:
    """Build the index unless `out` already holds one from the same inputs and CLIP model.

    Where it would be built (`shard_map`: the executor) is not part of that test: an index built on
    Ray is up to date for a local build, and the other way round.

    Returns the build stats, or None when the existing index was kept (what the demo build calls on
    every run: the first run builds, later runs cost nothing). A kept index whose ANN file is missing,
    damaged or (at `ann_min_vectors` images or more) absent gets only that file rebuilt from its vectors.
    """
    cfg = config or LocalConfig()
    meta_path = Path(out) / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if (meta.get("format_version") == FORMAT_VERSION
                and meta.get("sources") == _fingerprint(Path(corpus), images)
                and meta.get("clip_model") == cfg.clip_model and meta.get("clip_pretrained") == cfg.clip_pretrained):
            if _ann_problem(Path(out), meta, cfg):
                _repair_ann(Path(out), meta, cfg, progress)
            return None
    return build_index(corpus, images, out, config=cfg, progress=progress, shard_map=shard_map)


# ----------------------------------------------------------------------------------------------
# Searching
# ----------------------------------------------------------------------------------------------


def top_k_cosine(matrix: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows by dot product (rows and query unit-norm): (indices, scores), best first."""
    if matrix.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    scores = matrix @ query
    k = min(k, scores.shape[0])
    idx = np.argpartition(-scores, k - 1)[:k]
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    return idx, scores[idx]


class LocalIndex:
    """A built index folder, opened for search (thread-safe)."""

    def __init__(self, path: Path | str, *, config: LocalConfig | None = None,
                 embedder: ClipEmbedder | None = None) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(
                f"no search index at {self.path} (build one with `fvqa search index build`)"
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"search index {self.path} has format {self.meta.get('format_version')}, "
                              f"this fvqa reads {FORMAT_VERSION}: rebuild it")
        self.config = config or LocalConfig(clip_model=self.meta["clip_model"],
                                            clip_pretrained=self.meta["clip_pretrained"])
        self._db = sqlite3.connect(f"file:{self.path / 'pages.sqlite'}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        self._embedder_lock = threading.Lock()
        self._bm25 = bm25s.BM25.load(self.path / "text", mmap=True, show_progress=False, verbosity=0)
        self.vectors = np.load(self.path / "image_vectors.npy", mmap_mode="r")
        self.ann = self._open_ann()
        self._embedder = embedder
        self.cache_id = f"local:{self.meta.get('built_at')}"

    def _open_ann(self) -> AnnIndex | None:
        """The ANN index when the vectors reach `ann_min_vectors` and the build made one; else None (exact scan)."""
        n = int(self.vectors.shape[0])
        if not self.meta.get("ann") or n < self.config.ann_min_vectors:
            return None
        try:
            return _open_ann_file(self.path, self.meta)
        except AnnIndexError as exc:
            raise ConfigError(f"search index {self.path}: {exc}. Rebuild it with `fvqa search index build` "
                              "(or `ensure_index`, which rebuilds just this file from the stored vectors)") from None

    def nearest_rows(self, vec: np.ndarray, k: int) -> np.ndarray:
        """Rows of the k images nearest to a unit vector: ANN above the threshold, else exact."""
        if self.ann is not None:
            return self.ann.search(vec, k, self.config.ann_nprobe)[0]
        return top_k_cosine(np.asarray(self.vectors), vec, k)[0]

    @property
    def embedder(self) -> ClipEmbedder:
        """Built on first image search (text-only users never pay for loading CLIP)."""
        if self._embedder is None:
            with self._embedder_lock:  # concurrent first searches (tool threads) must share one model:
                if self._embedder is None:  # random-weight CLIP is seeded, and two builds at once race
                    self._embedder = ClipEmbedder(self.meta["clip_model"], self.meta["clip_pretrained"],
                                                  self.config.device)
        return self._embedder

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def image_search(self, image: Image.Image | QueryImage, k: int = 5) -> list[ImageHit]:
        """Pages of the nearest indexed images (one hit per page), best first."""
        if isinstance(image, QueryImage):
            image = image.pil()
        if self.vectors.shape[0] == 0:
            raise SearchError(f"search index {self.path} holds no images")
        try:
            vec = self.embedder.embed([image])[0]
        except Exception as exc:  # noqa: BLE001 - a broken image must not crash a rollout
            raise BadRequest(f"cannot embed the query image: {exc}") from exc
        # over-fetch so that several images of one page still leave k distinct pages
        idx = self.nearest_rows(vec, k * 4)
        hits: list[ImageHit] = []
        seen: set[Any] = set()
        for row in idx.tolist():
            page_id, title, url, thumb = self._query(
                "SELECT page_id, title, url, thumbnail FROM images WHERE id = ?", (row,)
            )[0]
            group = page_id if page_id is not None else ("image", row)
            if group in seen:
                continue
            seen.add(group)
            hits.append(ImageHit(title=title, url=url, thumbnail=thumb))
            if len(hits) >= k:
                break
        return hits

    def search_pages(self, query: str, k: int = 5) -> list[tuple[int, float]]:
        """(page id, BM25 score) of the best pages for `query`; empty if no query word is indexed."""
        tokens = [t for t in tokenize([query])[0] if t in self._bm25.vocab_dict]
        if not tokens:
            return []
        k = min(k, int(self._bm25.scores["num_docs"]))
        if self._bm25.nonoccurrence_array is not None:  # BM25L/BM25+ score every page: use bm25s itself
            docs, scores = self._bm25.retrieve([tokens], k=k, show_progress=False, n_threads=0)
            return [(int(d), float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]
        return self._term_at_a_time([self._bm25.vocab_dict[t] for t in tokens], k)

    def _term_at_a_time(self, term_ids: list[int], k: int) -> list[tuple[int, float]]:
        """Sum the query terms' posting lists over only the pages that hold them.

        Same scores as bm25s's `retrieve` (its precomputed BM25 weights), but without allocating and
        ranking a dense array of every page per query, which dominates latency at millions of pages.
        """
        sc = self._bm25.scores
        indptr, indices, data = sc["indptr"], sc["indices"], sc["data"]
        spans = [(int(indptr[t]), int(indptr[t + 1])) for t in term_ids]
        docs = np.concatenate([np.asarray(indices[a:b]) for a, b in spans])
        if docs.size == 0:
            return []
        weights = np.concatenate([np.asarray(data[a:b], dtype=np.float64) for a, b in spans])
        n_docs = int(sc["num_docs"])
        if docs.size > n_docs // 16:  # common words: a dense accumulator beats sorting the postings
            dense = np.bincount(docs, weights=weights, minlength=n_docs)
            pages = np.flatnonzero(dense)
            scores = dense[pages]
        else:
            pages, inverse = np.unique(docs, return_inverse=True)
            scores = np.bincount(inverse, weights=weights)
        k = min(k, scores.size)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((pages[top], -scores[top]))]  # score desc, then page id for stable ties
        return [(int(pages[i]), float(scores[i])) for i in top if scores[i] > 0]

    def page(self, page_id: int) -> tuple[str, str, str]:
        """(url, title, text) of one page."""
        rows = self._query("SELECT url, title, text FROM pages WHERE id = ?", (page_id,))
        if not rows:
            raise SearchError(f"page {page_id} missing from {self.path}")
        return rows[0]

    # the facade's two-step text search (candidates, then page text), shared with the web backend
    name = "local"
    cache_pages = False  # page text is already on local disk

    def text_candidates(self, query: str, n: int) -> list[Candidate]:
        """The best pages for `query` as candidates (ref = page id)."""
        out = []
        for page_id, _ in self.search_pages(query, n):
            url, title, _text = self.page(page_id)
            out.append(Candidate(url=url, title=title, ref=page_id))
        return out

    def read_page(self, candidate: Candidate) -> str:
        """Stored text of a candidate page."""
        if not isinstance(candidate.ref, int):
            raise PageError("bad_ref", f"local candidate without a page id: {candidate}", permanent=True)
        return self.page(candidate.ref)[2]

    def text_search(self, query: str, question: str = "", k: int = 5, *, max_sentences: int = 5) -> list[TextHit]:
        """Top pages for `query`, each summarised extractively with respect to `question`."""
        hits = []
        for page_id, _ in self.search_pages(query, k):
            url, title, text = self.page(page_id)
            summary = extractive_summary(text, question or query, max_sentences=max_sentences,
                                         max_chars=self.config.text_field_chars)
            hits.append(TextHit(url=url, title=title, summary=summary))
        return hits

    def close(self) -> None:
        with self._lock:
            self._db.close()
