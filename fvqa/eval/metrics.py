"""Answer scoring shared by the probe, the reward and evaluation.

One normalisation (SQuAD's) everywhere, so a label, a reward and a reported accuracy can never
disagree about whether the same answer is correct.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, strip punctuation, drop a/an/the, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def sub_exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 if any normalised gold answer occurs inside the normalised prediction (or vice versa)."""
    pred = normalize_answer(prediction)
    if not pred:
        return 0.0
    for gold in golds:
        g = normalize_answer(gold)
        if g and (g in pred or pred in g):
            return 1.0
    return 0.0
