"""The map-shaped half of an index build, run by executor workers: image file -> thumbnail + CLIP vector.

`fvqa.search.local_index` hands `ImageEmbedWorker` shards of image entries (consecutive, in manifest
order) through a `ShardMap` (on Ray: `fvqa.executor.map_shards`). A worker builds its CLIP model once
and returns, per entry, either why the image is unusable or its JPEG thumbnail and unit-norm vector.
It reads image files by path and writes nothing: the driver joins images to pages, checks titles,
and writes every row and reject, so the index is the one the in-process build writes.

Results are plain data (dataclasses of bytes, strings and float32 arrays): they are pickled back to
the driver. An `ImageReject` is not returned as such, since an exception with extra constructor
arguments does not survive pickling.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fvqa.search.clip import ClipEmbedder
from fvqa.search.config import LocalConfig
from fvqa.search.local_index import _embed_input_shrinker, _load_image
from fvqa.vision.gate import ImageReject


@dataclass(frozen=True)
class EmbeddedImage:
    """A usable image: its thumbnail (JPEG bytes) and CLIP vector (float32, unit norm)."""

    thumbnail: bytes
    vector: np.ndarray


@dataclass(frozen=True)
class UnusableImage:
    """An image `_load_image` refused: the reject's reason code and detail."""

    reason: str
    detail: str


ImageOutcome = EmbeddedImage | UnusableImage


@dataclass(frozen=True)
class ShardResult:
    """One outcome per entry of the shard, in its order; the embedder's name (for meta.json) and the
    worker process (`host:pid`: the build counts the processes that did its work)."""

    embedder: str
    outcomes: list[ImageOutcome]
    worker: str


class ImageEmbedWorker:
    """Built once per worker process: loads, checks, thumbnails and embeds the images of a shard.

    A shard is a list of (key, image file path); images are embedded in batches of `batch_size`
    as they are loaded, so a worker holds at most one batch of (shrunk) decoded images."""

    def __init__(self, config: LocalConfig) -> None:
        self.cfg = config
        self.embedder = ClipEmbedder(config.clip_model, config.clip_pretrained, config.device)
        self.shrink = _embed_input_shrinker(self.embedder)

    def __call__(self, shard: list[tuple[str, str]]) -> ShardResult:
        outcomes: list[ImageOutcome | None] = []
        pending: list[tuple[int, Image.Image, bytes]] = []  # (position in outcomes, image, thumbnail)

        def flush() -> None:
            vecs = self.embedder.embed([img for _, img, _ in pending])
            for (pos, _, thumb), vec in zip(pending, vecs, strict=True):
                outcomes[pos] = EmbeddedImage(thumb, np.ascontiguousarray(vec, dtype=np.float32))
            pending.clear()

        for _key, path in shard:
            try:
                img, thumb = _load_image(Path(path), self.cfg.thumbnail_max_side)
            except ImageReject as exc:
                outcomes.append(UnusableImage(exc.reason, exc.detail))
                continue
            pending.append((len(outcomes), self.shrink(img), thumb))
            outcomes.append(None)
            if len(pending) >= self.cfg.batch_size:
                flush()
        if pending:
            flush()
        return ShardResult(self.embedder.name, [o for o in outcomes if o is not None],
                           f"{socket.gethostname()}:{os.getpid()}")
