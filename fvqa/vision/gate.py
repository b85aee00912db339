"""The one image gate: bytes -> a fully decoded, checked image, or a reject with a fixed reason.

Every door that lets an image in (crawl, infoseek, import-upstream, the eval loaders, the search index
build, `Workspace.put_image`) calls `check_image`; no door trusts a header read alone. In order:

1. the format comes from magic bytes (never from a Content-Type, a file name or PIL's guess);
2. the pixel count is read from the header and checked against a budget *before* any pixel is
   decoded, so a 74-byte PNG that claims 12000x12000 is refused without allocating it;
3. the image is decoded in full (`load()`), with Pillow's ``LOAD_TRUNCATED_IMAGES`` forced off, so a
   truncated file fails here instead of coming out grey at the bottom;
4. both sides must reach a minimum (crawl's `min_side`, 64 px by default).

A failure raises `ImageReject`, whose `reason` is one of `REASONS` (what rejects are counted by) and
whose `detail` says what was found.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import Image, ImageFile

UNKNOWN = "image_format_unknown"
UNDECODABLE = "image_undecodable"
TOO_LARGE = "image_too_large"
TOO_SMALL = "image_too_small"
REASONS = (UNKNOWN, UNDECODABLE, TOO_LARGE, TOO_SMALL)
"""Every reason `check_image` rejects with."""

MIN_SIDE = 64  # = CrawlConfig.min_side's default
MAX_PIXELS = 64_000_000  # = CrawlConfig.max_pixels's default (decompression-bomb guard)

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
_EXT = {"jpeg": "jpg"}  # store file extension per sniffed kind (others: the kind)


class ImageReject(ValueError):
    """An image that does not pass the gate; `reason` is the short label counted in the summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CheckedImage:
    """Bytes that passed the gate: sniffed kind, store extension, size from the header, decoded image.

    `image` is the decoded picture (for a JPEG checked with `draft_side`, decoded at a reduced scale;
    `width` x `height` is always the original size)."""

    kind: str
    ext: str
    width: int
    height: int
    image: Image.Image


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


def check_image(
    data: bytes, *, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS, draft_side: int | None = None
) -> CheckedImage:
    """Sniff, budget, fully decode and size-check image bytes; raise `ImageReject` on any problem.

    `draft_side`: let a JPEG decode straight from the DCT at 1/2, 1/4 or 1/8 scale while both sides stay
    at least this (every byte is still decoded, so truncation is still caught)."""
    kind = sniff_kind(data)
    if kind is None:
        raise ImageReject(UNKNOWN, describe_non_image(data))
    # a truncated file must fail, whatever another library set this global to
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size  # header only: nothing decoded yet
        if width * height > max_pixels:
            raise ImageReject(TOO_LARGE, f"{kind} header claims {width}x{height} = {width * height} pixels "
                                         f"> max_pixels {max_pixels}")
        if draft_side is not None and kind == "jpeg":
            im.draft("RGB", (draft_side, draft_side))
        im.load()
    except ImageReject:
        raise
    except Image.DecompressionBombError as exc:  # above Pillow's own hard limit
        raise ImageReject(TOO_LARGE, f"{kind}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, zlib.error...)
        # no object addresses in the detail: a re-run must produce the same reject
        message = re.sub(r" (object )?at 0x[0-9a-f]+", "", str(exc))
        raise ImageReject(UNDECODABLE, f"{kind}: {exc.__class__.__name__}: {message}") from exc
    if min(width, height) < min_side:
        raise ImageReject(TOO_SMALL, f"{width}x{height} < min_side {min_side}")
    return CheckedImage(kind, _EXT.get(kind, kind), width, height, im)
