"""CLIP verification: how well each candidate image matches prompts for its concept (open_clip).

The model is built once per stage run. `pretrained=None` gives random weights (seeded, so runs agree):
scores are then recorded and the rules applied, but they mean nothing, and `describe()` says so for
the provenance. `fvqa-tiny` is a bundled two-layer config for offline mechanics; any open_clip name
(with its `pretrained` tag in the local cache when offline) works the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from fvqa.vision.clip_model import TINY_NAME, load_clip


class ClipScorer:
    """`score(concept, images) -> cosine similarities` against a prompt ensemble."""

    def __init__(
        self, model: str, pretrained: str | None, prompts: Sequence[str], device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        import torch

        self._torch = torch
        self.model, self.preprocess, self.tokenizer = load_clip(
            model, pretrained, device, hint="; crawl.clip_pretrained: null uses random weights")
        self.model_name, self.pretrained, self.device = model, pretrained, device
        self.prompts = list(prompts) or ["{concept}"]
        # tiny per-concept batches gain nothing from intra-op threads and lose a lot to spinning
        # threads on a busy machine (measured 10x): default to one thread for the tiny config
        self.threads = threads if threads is not None else (1 if model == TINY_NAME else None)

    def describe(self) -> dict[str, Any]:
        """What produced the scores, for provenance (random weights are flagged plainly)."""
        info: dict[str, Any] = {"model": self.model_name, "pretrained": self.pretrained,
                                "prompts": self.prompts}
        if self.pretrained is None:
            info["warning"] = "random weights (pretrained=None): scores are not semantic"
        return info

    def text_embedding(self, concept: str) -> Any:
        """Mean of the normalised prompt embeddings, renormalised (CLIP's prompt ensembling)."""
        torch = self._torch
        texts = [p.format(concept=concept) for p in self.prompts]
        with torch.no_grad():
            feats = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        mean = feats.mean(dim=0)
        return mean / mean.norm().clamp_min(1e-12)

    def score(self, concept: str, images: Sequence[Image.Image]) -> list[float]:
        """Cosine similarity of each image to the concept's prompts, in [-1, 1]."""
        if not images:
            return []
        torch = self._torch
        if self.threads is None:
            return self._score(concept, images)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._score(concept, images)
        finally:
            torch.set_num_threads(before)

    def _score(self, concept: str, images: Sequence[Image.Image]) -> list[float]:
        torch = self._torch
        text = self.text_embedding(concept)
        batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        with torch.no_grad():
            feats = self.model.encode_image(batch).float()
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return [round(float(s), 6) for s in (feats @ text).cpu().tolist()]
