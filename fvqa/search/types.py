"""Hit types and errors shared by every search backend.

`ImageHit` and `TextHit` live in `fvqa.protocol` (which also renders them for the model); they are
re-exported here so backends import one place.
"""

from __future__ import annotations

import base64
from typing import Any

from fvqa.errors import FvqaError
from fvqa.protocol import ImageHit, TextHit

__all__ = ["ImageHit", "TextHit", "SearchError", "BadRequest", "hit_to_dict", "hit_from_dict"]


class SearchError(FvqaError):
    """A backend could not answer (API error, no index, unreachable service). The agent renders
    upstream's error text for it, so a failed search never crashes a rollout."""


class BadRequest(SearchError):
    """The request itself is invalid (undecodable image, empty or too long query): retrying won't help."""


def _thumb_bytes(thumb: Any) -> bytes | None:
    if thumb is None or isinstance(thumb, bytes):
        return thumb
    import io

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
