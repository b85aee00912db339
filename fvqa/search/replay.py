"""Replay upstream's released FVQA image-search caches as an image-search backend.

Upstream (lmms-lab/FVQA) ships `fvqa_{train,test}_image_search_results_cache.pkl`: a dict keyed by
`data_id`, each entry holding `tool_returned_web_title_list` and `tool_returned_images_urls` (and
possibly the thumbnails themselves as PIL images). Pickles can run code, so they are read with
`safe_unpickle` (plain data and PIL images only). Lookups are by `data_id`, so a rollout replays
exactly what upstream's model saw; an unknown id is a SearchError (rendered as upstream's error text,
which is also what upstream returned on a cache miss).

Limits: titles and URLs must be strings (never `str()` of another object: a list that shares itself
through the pickle's memo renders to hundreds of megabytes) and are cut at `MAX_TITLE_CHARS` /
`MAX_URL_CHARS`; an entry keeps at most `MAX_RESULTS` results. Embedded thumbnails are bytes or
images the unpickler rebuilt from pixel bytes, never a file the pickle names.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from fvqa.errors import ConfigError
from fvqa.protocol.unpickle import safe_load
from fvqa.search.types import Candidate, ImageHit, QueryImage, SearchError

TITLES = "tool_returned_web_title_list"
URLS = "tool_returned_images_urls"
MAX_RESULTS = 100
MAX_TITLE_CHARS = 1_000
MAX_URL_CHARS = 4_096


def _embedded_images(entry: dict[str, Any]) -> list[Any]:
    for key, value in entry.items():
        if key not in (TITLES, URLS) and isinstance(value, list) and value and all(
            isinstance(v, Image.Image | bytes) or v is None for v in value
        ):
            return value
    return []


class ReplayBackend:
    """Image search answered from upstream's cache pickles (text search is not part of them)."""

    name = "replay"
    cache_pages = False
    keyed_by_data_id = True

    def __init__(self, paths: Iterable[Path | str], *, reader: Any = None) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        paths = [Path(p) for p in paths]
        if not paths:
            raise ConfigError("search.replay.paths is empty: name upstream's *_image_search_results_cache.pkl files")
        for path in paths:
            data = safe_load(path)
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a dict keyed by data_id, got {type(data).__name__}")
            for data_id, entry in data.items():
                if not (isinstance(data_id, str) or type(data_id) is int and abs(data_id) < 10**30):
                    continue  # not an upstream data_id (and str() of it could be huge, or raise)
                data_id = str(data_id)[:MAX_URL_CHARS]
                if not isinstance(entry, dict) or not isinstance(entry.get(TITLES), list):
                    self.skipped[data_id] = f"entry has no '{TITLES}' list"
                    continue
                titles, urls = entry[TITLES], entry.get(URLS) or []
                if not all(isinstance(t, str) for t in titles[:MAX_RESULTS]):
                    self.skipped[data_id] = f"'{TITLES}' holds something other than strings"
                    continue
                if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls[:MAX_RESULTS]):
                    self.skipped[data_id] = f"'{URLS}' is not a list of strings"
                    continue
                self.entries[data_id] = {
                    TITLES: [t[:MAX_TITLE_CHARS] for t in titles[:MAX_RESULTS]],
                    URLS: [u[:MAX_URL_CHARS] for u in urls[:MAX_RESULTS]],
                    "images": _embedded_images(entry)[:MAX_RESULTS],
                }
        self.cache_id = "replay:" + ",".join(sorted(p.name for p in paths))
        self.reader = reader

    def __len__(self) -> int:
        return len(self.entries)

    def image_search(self, image: QueryImage, k: int) -> list[ImageHit]:
        if not image.data_id:
            raise SearchError("the replay backend looks results up by upstream data_id; none was given")
        entry = self.entries.get(image.data_id)
        if entry is None:
            reason = self.skipped.get(image.data_id, "not in the replayed caches")
            raise SearchError(f"no cached image-search result for data_id {image.data_id!r} ({reason})")
        titles, urls, images = entry[TITLES], entry[URLS], entry["images"]
        hits = []
        for i, title in enumerate(titles[:k]):
            url = urls[i] if i < len(urls) else ""
            thumb = images[i] if i < len(images) else None
            if thumb is None and url and self.reader is not None:
                try:
                    thumb = self.reader.fetch(url, accept=("image/",))[0]
                except Exception:  # noqa: BLE001 - a dead thumbnail URL leaves the title usable
                    thumb = None
            if isinstance(thumb, Image.Image):
                thumb = thumb.convert("RGB")
            hits.append(ImageHit(title=title, url=url, thumbnail=thumb))
        return hits

    def text_candidates(self, query: str, n: int) -> list[Candidate]:
        raise SearchError("upstream's caches hold image-search results only; use the local or web backend for text")

    def read_page(self, candidate: Candidate) -> str:
        raise SearchError("the replay backend has no pages")
