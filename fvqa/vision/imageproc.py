"""Bytes from the web -> a checked, normalised JPEG, or a reason a person understands.

The checks are the shared image gate (`fvqa.vision.gate`): type from magic bytes, pixel budget from
the header before decoding, full decode, minimum side. A passing image is then EXIF-rotated,
converted to RGB, shrunk to a maximum side and re-encoded, so every stored image has one format and
bounded size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps

from fvqa.vision.gate import ImageReject, check_image, describe_non_image, sniff_kind

__all__ = ["ImageReject", "Processed", "describe_non_image", "process_image", "sniff_kind"]

@dataclass(frozen=True)
class Processed:
    """A normalised image: re-encoded JPEG bytes plus the decoded RGB image (for hashing and CLIP)."""

    data: bytes
    image: Image.Image
    kind: str  # format sniffed from the original bytes
    orig_size: tuple[int, int]


def process_image(
    data: bytes, *, max_side: int, min_side: int, max_pixels: int, quality: int = 90
) -> Processed:
    """Check (`fvqa.vision.gate.check_image`) and normalise image bytes; raise ImageReject on any problem."""
    # decode at 1/2, 1/4 or 1/8 scale straight from the DCT while both sides stay >= max_side
    checked = check_image(data, min_side=min_side, max_pixels=max_pixels, draft_side=max_side)
    im, kind, width, height = checked.image, checked.kind, checked.width, checked.height
    try:
        im = ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - broken EXIF must not lose an otherwise good image
        pass
    if im.mode != "RGB":
        im = _to_rgb(im)
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
