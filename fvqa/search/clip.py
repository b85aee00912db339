"""CLIP image embeddings (open_clip) for the local image index.

One job: turn images into L2-normalised float32 vectors. The model is built once per process and
guarded by a lock, because the HTTP service calls it from several worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

from fvqa.vision.clip_model import TINY_NAME, load_clip

__all__ = ["TINY_NAME", "ClipEmbedder"]


class ClipEmbedder:
    """`embed(images) -> (n, d) float32`, unit-norm rows, so a dot product is cosine similarity."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, device: str = "cpu") -> None:
        import torch

        self._torch = torch
        # random weights (pretrained=None) are seeded by load_clip, so every process embeds alike
        self.model, self.preprocess, _ = load_clip(model, pretrained, device)
        self.device = device
        self.name = f"{model}/{pretrained or 'random'}"
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return int(self.model.visual.output_dim)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB images; an empty list gives a (0, d) array."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        torch = self._torch
        batch = torch.stack([self.preprocess(img.convert("RGB")) for img in images]).to(self.device)
        with self._lock, torch.no_grad():
            feats = self.model.encode_image(batch).float()
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return feats.cpu().numpy().astype(np.float32)
