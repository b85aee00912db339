"""CLIP image embeddings (open_clip) for the local image index.

One job: turn images into L2-normalised float32 vectors. The model is built once per process and
guarded by a lock, because the HTTP service calls it from several worker threads.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fvqa.errors import ConfigError

# A two-layer, 64-pixel ViT for offline mechanics (demo, tests): same name and shape as the crawler's
# `fvqa-tiny`, so `local.clip_model: fvqa-tiny` works whether or not that config is installed.
TINY_NAME = "fvqa-tiny"
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _register_tiny(open_clip: object) -> None:
    if TINY_NAME in open_clip.list_models():  # type: ignore[attr-defined]
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{TINY_NAME}.json"
        path.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(path)  # type: ignore[attr-defined]


class ClipEmbedder:
    """`embed(images) -> (n, d) float32`, unit-norm rows, so a dot product is cosine similarity."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, device: str = "cpu") -> None:
        import open_clip
        import torch

        self._torch = torch
        if model == TINY_NAME:
            _register_tiny(open_clip)
        try:
            # random weights must be the same in every process, or an index built by one process
            # could not be searched by another: seed them without touching the global RNG
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=pretrained, device=device
                )
        except Exception as exc:  # noqa: BLE001 - open_clip raises RuntimeError/ValueError/OSError here
            raise ConfigError(
                f"cannot load CLIP model {model!r} (pretrained={pretrained!r}): {exc}. "
                "Pretrained weights must be in the local cache when offline."
            ) from exc
        self.model.eval()
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
