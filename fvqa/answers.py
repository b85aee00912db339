"""Answer normalisation and matching: whether a predicted answer equals (or contains) a gold one.

This sits at the bottom of the package, importing nothing from fvqa, because pipelines (probe
labels, leakage), text generation, annotation, training (the reward) and evaluation all score
answers the same way: one normalisation (SQuAD's) everywhere, so a label, a reward and a reported
accuracy can never disagree about whether the same answer is correct. Benchmark-specific scorers
built on top of these live in ``fvqa.eval.metrics``.

Everything here is a pure function: no I/O, no model calls.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, strip punctuation, drop a/an/the, collapse white space.

    Only ASCII punctuation is stripped and accents are kept, exactly as SQuAD and the official
    InfoSeek scorer do; changing that would make our numbers incomparable with theirs.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def gold_list(golds: Iterable[str] | str) -> list[str]:
    """The gold answers as a list; a bare string is one answer, not a sequence of one-letter answers."""
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in gold_list(golds)))


def sub_exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 if any normalised gold answer occurs inside the normalised prediction (upstream's SubEM).

    One-way on purpose: the reverse direction would pay a one-letter answer that happens to occur
    in the gold ("e" inside "eiffel"). A gold that normalises to nothing never matches (``"" in x``
    is always true).
    """
    pred = normalize_answer(prediction)
    for gold in gold_list(golds):
        g = normalize_answer(gold)
        if g and g in pred:
            return 1.0
    return 0.0
