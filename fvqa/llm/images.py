"""Images in chat messages: callers attach raw bytes, the client sends resized data URLs.

The cache key sees only the image's content hash (plus the max side), so a re-run with the same
image file hits the cache regardless of how PIL happens to re-encode it.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


class BadImageError(ValueError):
    """An attached image cannot be decoded; the request is rejected with this reason."""


@dataclass(frozen=True)
class ImageInput:
    """Raw image bytes with their sha256 (the key the cache uses)."""

    data: bytes = field(repr=False)
    sha256: str


def image_part(image: bytes | str | Path) -> dict[str, Any]:
    """A message content part carrying an image (bytes or a file path), e.g.
    `{"role": "user", "content": [{"type": "text", "text": q}, image_part(path)]}`."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return {"type": "image", "image": ImageInput(data, hashlib.sha256(data).hexdigest())}


def _iter_parts(messages: list[dict[str, Any]]) -> Any:
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            yield from (p for p in content if isinstance(p, dict))


def has_images(messages: list[dict[str, Any]]) -> bool:
    return any(p.get("type") in ("image", "image_url") for p in _iter_parts(messages))


def messages_for_key(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A JSON-able copy with every image replaced by its content hash."""
    out = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(dict(msg))
            continue
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                parts.append({"type": "image", "sha256": _image_of(part).sha256})
            elif isinstance(part, dict) and part.get("type") == "image_url":
                url = part.get("image_url", {}).get("url", "")
                if url.startswith("data:"):
                    url = "sha256:" + hashlib.sha256(url.encode()).hexdigest()
                parts.append({"type": "image_url", "image_url": {**part.get("image_url", {}), "url": url}})
            else:
                parts.append(part)
        out.append({**msg, "content": parts})
    return out


def _image_of(part: dict[str, Any]) -> ImageInput:
    img = part.get("image")
    if not isinstance(img, ImageInput):
        raise BadImageError("image part must be built with fvqa.llm.images.image_part()")
    return img


class DataUrlEncoder:
    """Resize-and-encode with a small LRU, so a repair retry does not re-encode the same image."""

    def __init__(self, max_side: int, capacity: int = 256) -> None:
        self.max_side = max_side
        self._lru: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()  # encoding runs in worker threads

    def encode(self, img: ImageInput) -> str:
        with self._lock:
            url = self._lru.get(img.sha256)
            if url is not None:
                self._lru.move_to_end(img.sha256)
                return url
        url = to_data_url(img.data, self.max_side)
        with self._lock:
            self._lru[img.sha256] = url
            if len(self._lru) > self._capacity:
                self._lru.popitem(last=False)
        return url

    def wire_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages as sent: our image parts become `image_url` parts with data URLs."""
        if not has_images(messages):
            return messages
        out = []
        for msg in messages:
            content = msg.get("content")
            if not isinstance(content, list):
                out.append(msg)
                continue
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    parts.append({"type": "image_url", "image_url": {"url": self.encode(_image_of(part))}})
                else:
                    parts.append(copy.copy(part))
            out.append({**msg, "content": parts})
        return out


def to_data_url(data: bytes, max_side: int) -> str:
    """`data:<mime>;base64,...`, downscaled so the longer side is at most `max_side`.

    Small JPEG/PNG/WEBP images are sent as they are (no quality loss, no CPU)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            if max(im.size) <= max_side and fmt in ("JPEG", "PNG", "WEBP"):
                im.verify()
                return f"data:{_MIME[fmt]};base64,{base64.b64encode(data).decode()}"
            im = ImageOps.exif_transpose(im)
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            if im.mode in ("RGBA", "LA", "P") and "transparency" in im.info or im.mode in ("RGBA", "LA"):
                im.convert("RGBA").save(buf, format="PNG", optimize=True)
                mime = "image/png"
            else:
                im.convert("RGB").save(buf, format="JPEG", quality=90)
                mime = "image/jpeg"
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise BadImageError(f"image cannot be decoded ({type(exc).__name__}: {exc})") from exc
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"
