"""Hit types and errors shared by every search backend.

`ImageHit` and `TextHit` live in `fvqa.protocol` (which also renders them for the model); they are
re-exported here so backends import one place.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from fvqa.errors import FvqaError
from fvqa.protocol import ImageHit, TextHit

__all__ = [
    "ImageHit", "TextHit", "Candidate", "QueryImage", "SearchError", "BadRequest", "as_query_image",
    "hit_to_dict", "hit_from_dict",
]


class SearchError(FvqaError):
    """A backend could not answer (API error, no index, unreachable service). The agent renders
    upstream's error text for it, so a failed search never crashes a rollout."""


class BadRequest(SearchError):
    """The request itself is invalid (undecodable image, empty or too long query): retrying won't help."""


def _thumb_bytes(thumb: Any) -> bytes | None:
    if thumb is None or isinstance(thumb, bytes):
        return thumb
    buf = io.BytesIO()
    img = thumb if thumb.mode in ("RGB", "L") else thumb.convert("RGB")
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def hit_to_dict(hit: ImageHit | TextHit) -> dict[str, Any]:
    """JSON-safe form (thumbnails as base64 JPEG/PNG bytes) for caches and the HTTP service."""
    if isinstance(hit, ImageHit):
        thumb = _thumb_bytes(hit.thumbnail)
        return {
            "title": hit.title,
            "url": hit.url,
            "thumbnail_b64": base64.b64encode(thumb).decode() if thumb else None,
        }
    return {"url": hit.url, "title": hit.title, "summary": hit.summary}


def image_hit_from_dict(d: dict[str, Any]) -> ImageHit:
    thumb = d.get("thumbnail_b64")
    return ImageHit(title=d.get("title", ""), url=d.get("url", ""), thumbnail=base64.b64decode(thumb) if thumb else None)


def text_hit_from_dict(d: dict[str, Any]) -> TextHit:
    return TextHit(url=d.get("url", ""), title=d.get("title", ""), summary=d.get("summary", ""))


def hit_from_dict(d: dict[str, Any]) -> ImageHit | TextHit:
    return text_hit_from_dict(d) if "summary" in d else image_hit_from_dict(d)


@dataclass(frozen=True)
class Candidate:
    """One text-search result before reading: a page link and title; `ref` is backend-specific
    (the local index's page id), `snippet` the search engine's own snippet if any."""

    url: str
    title: str = ""
    ref: str | int | None = None
    snippet: str = ""


@dataclass(frozen=True)
class QueryImage:
    """The image a caller searches with: its bytes (hashed for the cache) and, where known, its public
    URL (Lens URL mode) and upstream `data_id` (replay of upstream's caches)."""

    data: bytes
    sha256: str
    url: str | None = None
    data_id: str | None = None

    def check(self) -> None:
        """Raise BadRequest unless the bytes are an image PIL can identify (cheap: header + verify)."""
        try:
            with Image.open(io.BytesIO(self.data)) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise BadRequest(f"query image is not a decodable image ({type(exc).__name__}: {exc})") from exc

    def pil(self) -> Image.Image:
        """Decode; an undecodable image is a BadRequest (the caller sent garbage, retrying won't help)."""
        try:
            img = Image.open(io.BytesIO(self.data))
            img.load()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise BadRequest(f"query image is not a decodable image ({type(exc).__name__}: {exc})") from exc
        return img.convert("RGB")


def as_query_image(image: Any, *, url: str | None = None, data_id: str | None = None) -> QueryImage:
    """Accept bytes, a PIL image, a path, or a QueryImage; PIL images are hashed via lossless PNG."""
    if isinstance(image, QueryImage):
        return image
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    elif isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif isinstance(image, str | Path):
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise BadRequest(f"cannot read query image {image}: {exc}") from exc
    elif image is None:
        if not (url or data_id):
            raise BadRequest("image search needs an image (or its URL / upstream data_id)")
        data = b""
    else:
        raise BadRequest(f"query image must be bytes, a PIL image or a path, not {type(image).__name__}")
    return QueryImage(data=data, sha256=hashlib.sha256(data).hexdigest(), url=url, data_id=data_id)


class PageError(SearchError):
    """A result page could not be read. `permanent` failures (404, not HTML, refused address) are
    cached with their class so they are not fetched again; transient ones (timeouts, 5xx) are not."""

    def __init__(self, error_class: str, message: str, *, permanent: bool) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class
        self.permanent = permanent
