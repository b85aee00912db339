"""Image helpers every driver shares: bytes of an image, decoding, and the one thumbnail bound.

Images travel as bytes (their sha256 identifies them in trajectories and caches); PIL images are
PNG-encoded, which is lossless and gives a stable hash. Thumbnails are resized exactly as Qwen-VL's
own preprocessing does (``qwen_vl_utils``, the library veRL uses for prompt images), so what the
probe, eval and training show the model is the same image the trainer re-processes.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image


def image_bytes(image: Any) -> bytes:
    """Bytes of an image given as bytes, a ``{"bytes": ...}``/``{"image": PIL}`` dict or a PIL image."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, dict) and isinstance(image.get("bytes"), bytes | bytearray):
        return bytes(image["bytes"])
    if isinstance(image, dict) and isinstance(image.get("image"), Image.Image):
        image = image["image"]
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot get image bytes from {type(image).__name__}")
    buf = io.BytesIO()
    img = image if image.mode in ("RGB", "L", "RGBA") else image.convert("RGB")
    img.save(buf, format="PNG")
    return buf.getvalue()


def to_pil(image: Any) -> Image.Image:
    """A decoded RGB PIL image from bytes (or PIL); raises what PIL raises for bad bytes."""
    if isinstance(image, bytes | bytearray):
        image = Image.open(io.BytesIO(image))
        image.load()
    return image.convert("RGB")


def decode_or_none(image: bytes | Image.Image | None) -> Image.Image | None:
    """Decode a thumbnail; an undecodable one counts as missing rather than crashing a rollout."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image
    try:
        img = Image.open(io.BytesIO(image))
        img.load()
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes; all mean "no image"
        return None
    return img


def bound_thumbnail(img: Image.Image, max_pixels: int, patch_size: int = 14) -> Image.Image:
    """Resize a thumbnail as Qwen-VL's processor does (sides multiples of 2 x patch), capped at
    ``max_pixels``."""
    from qwen_vl_utils import fetch_image  # imports torch: only when a search returns thumbnails

    return fetch_image({"image": img.convert("RGB"), "max_pixels": max_pixels}, image_patch_size=patch_size)
