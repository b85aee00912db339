"""Bytes from the web -> a checked, normalised JPEG, or a reason a person understands.

The type comes from magic bytes, never from a Content-Type header or a file name. The pixel count is
checked from the header before any pixel is decoded (decompression bombs), then the image is fully
decoded (truncated files fail here), EXIF-rotated, converted to RGB, shrunk to a maximum side and
re-encoded, so every stored image has one format and bounded size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# (prefix, offset, kind); webp needs RIFF....WEBP, checked separately
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
)


class ImageReject(ValueError):
    """A candidate that is not usable; `reason` is the short label counted in the summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Processed:
    """A normalised image: re-encoded JPEG bytes plus the decoded RGB image (for hashing and CLIP)."""

    data: bytes
    image: Image.Image
    kind: str  # format sniffed from the original bytes
    orig_size: tuple[int, int]


def sniff_kind(data: bytes) -> str | None:
    """Image format from magic bytes, or None."""
    for magic, offset, kind in _MAGIC:
        if data[offset: offset + len(magic)] == magic:
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def describe_non_image(data: bytes) -> str:
    """What the bytes look like instead (for the reject detail)."""
    head = data[:512].lstrip().lower()
    if not data:
        return "empty body"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head or b"<body" in head:
        return "looks like HTML"
    if head.startswith((b"{", b"[")):
        return "looks like JSON"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "looks like XML/SVG (vector images are not accepted)"
    try:
        data[:256].decode("utf-8")
        return "looks like text"
    except UnicodeDecodeError:
        return f"unknown binary (first bytes {data[:8].hex()})"


def process_image(
    data: bytes, *, max_side: int, min_side: int, max_pixels: int, quality: int = 90
) -> Processed:
    """Check and normalise image bytes; raise ImageReject with a reason on any problem."""
    kind = sniff_kind(data)
    if kind is None:
        raise ImageReject("not an image", describe_non_image(data))
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size  # header only: nothing decoded yet
        if width * height > max_pixels:
            raise ImageReject("decompression bomb", f"{width}x{height} = {width * height} pixels "
                                                     f"> max_pixels {max_pixels}")
        if kind == "jpeg":
            # decode at 1/2, 1/4 or 1/8 scale straight from the DCT while both sides stay >= max_side
            im.draft("RGB", (max_side, max_side))
        im.load()
    except ImageReject:
        raise
    except Image.DecompressionBombError as exc:  # above Pillow's own hard limit
        raise ImageReject("decompression bomb", str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReject("corrupt image", f"{kind}: {exc.__class__.__name__}: {exc}") from exc
    try:
        im = ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - broken EXIF must not lose an otherwise good image
        pass
    if im.mode != "RGB":
        im = _to_rgb(im)
    if min(width, height) < min_side:
        raise ImageReject("too small", f"{width}x{height} < min_side {min_side}")
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=False)
    return Processed(buf.getvalue(), im, kind, (width, height))


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB with transparency flattened onto white (a black background would change what CLIP sees)."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")
