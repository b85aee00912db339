"""Small deterministic pictures for tests."""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw


def picture(seed: int, quality: int = 90, size: int = 96) -> bytes:
    """A distinct picture per seed; the same seed at another JPEG quality is a near duplicate."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randint(0, size - 20), rng.randint(0, size - 20)
        draw.rectangle([x0, y0, x0 + rng.randint(10, 60), y0 + rng.randint(10, 60)],
                       fill=tuple(rng.randint(0, 255) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
