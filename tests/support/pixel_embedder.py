"""A cheap stand-in for CLIP shared by tests that build a local search index.

8x8 grey pixels, centred and unit-normed: the index mechanics are what those tests check, and an
indexed image still finds itself first. Building even a random CLIP costs ~10 s per test module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


class PixelEmbedder:
    """Embeds images as their normalised 8x8 grey pixels (64 dims)."""

    dim = 64
    name = "pixels-8x8"

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = np.stack([np.asarray(im.convert("L").resize((8, 8)), dtype=np.float32).ravel() for im in images])
        vecs -= vecs.mean(axis=1, keepdims=True)
        return (vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-6)).astype(np.float32)
