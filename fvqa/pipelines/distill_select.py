"""Which distilled trajectories become SFT data: search patterns and the balanced, seeded selection.

A trajectory's *search pattern* is what it executed before answering: `none`, `image`, `text` or
`mixed` (image and text). Every usable attempt (correct and format-valid) is a candidate; the
selection is a pure function of the candidates and `distill.balance`, recomputed from the stored
attempts at the end of every run, so it never depends on the order in which items were distilled.

The rule, in order:

1. **Label rule** (`label_rule`). `compatible` (default): a search-free item keeps only trajectories
   without search, a search-required item only trajectories with some search, so the data never
   shows a search the student does not need nor an answer the student could not give unaided.
   `exact`: only the pattern the label names (image-search-required -> image, ...). `any`: no rule.
   A candidate the rule refuses is dropped with code `pattern_label_mismatch`.
2. **Per item** (`per_item`, default 1): an item keeps at most this many trajectories, preferring the
   pattern its label names, then fewer searches, then a seeded hash of (item, attempt).
3. **Per label** (`max_ratio`, `max_per_label`): a label keeps at most
   `ceil(max_ratio x n_smallest)` trajectories, `n_smallest` being the candidates of the smallest
   non-empty label, and at most `max_per_label`; so no label dominates and the data shows search-free
   and search-required items in comparable numbers (the "when to search" signal).
4. **Across patterns within a label**: a capped label is filled round-robin over its search patterns
   (each pattern's candidates in seeded hash order), so no one way of searching crowds out the others.

Dropped candidates keep their row in `distill_attempts`; the selection's counts are in the stage notes.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

PATTERNS = ("none", "image", "text", "mixed")
LABEL_PATTERN = {
    "search_free": "none",
    "image_search_required": "image",
    "text_search_required": "text",
    "mixed_search_required": "mixed",
}
"""The search pattern each 4-way search label names."""
N_SEARCH_KINDS = {"none": 0, "image": 1, "text": 1, "mixed": 2}


def search_pattern(n_image: int, n_text: int) -> str:
    """`none` | `image` | `text` | `mixed` from the searches a trajectory executed."""
    if n_image and n_text:
        return "mixed"
    if n_image:
        return "image"
    return "text" if n_text else "none"


@dataclass(frozen=True)
class Candidate:
    """A usable attempt: correct and format-valid."""

    item_id: str
    attempt: int
    search_pattern: str
    search_label: str


def _hash(seed: int, *parts: object) -> str:
    return hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).hexdigest()


def label_allows(label: str, pattern: str, rule: str) -> bool:
    """Whether `rule` lets an item with this search label keep a trajectory with this pattern."""
    if rule == "any":
        return True
    if rule == "exact":
        return LABEL_PATTERN.get(label) == pattern
    if rule == "compatible":
        return (pattern == "none") == (label == "search_free")
    raise ValueError(f"unknown label rule {rule!r}; use compatible, exact or any")


@dataclass
class Selection:
    """The kept candidates (in selection order) and why the others were left out."""

    kept: list[Candidate]
    mismatched: list[Candidate]
    over_item_cap: list[Candidate]
    over_label_cap: list[Candidate]
    caps: dict[str, int]


def select(candidates: Sequence[Candidate], *, per_item: int = 1, max_ratio: float | None = 1.0,
           max_per_label: int | None = None, label_rule: str = "compatible", seed: int = 0) -> Selection:
    """The balanced selection (module docstring); deterministic for a seed, whatever the input order."""
    ordered = sorted(candidates, key=lambda c: (c.item_id, c.attempt))
    allowed = [c for c in ordered if label_allows(c.search_label, c.search_pattern, label_rule)]
    allowed_keys = {(c.item_id, c.attempt) for c in allowed}
    mismatched = [c for c in ordered if (c.item_id, c.attempt) not in allowed_keys]

    by_item: dict[str, list[Candidate]] = defaultdict(list)
    for c in allowed:
        by_item[c.item_id].append(c)
    per_item_kept: list[Candidate] = []
    over_item: list[Candidate] = []
    for item_id in sorted(by_item):
        ranked = sorted(by_item[item_id], key=lambda c: (
            LABEL_PATTERN.get(c.search_label) != c.search_pattern, N_SEARCH_KINDS[c.search_pattern],
            _hash(seed, c.item_id, c.attempt)))
        per_item_kept += ranked[:per_item]
        over_item += ranked[per_item:]

    by_label: dict[str, dict[str, list[Candidate]]] = defaultdict(lambda: defaultdict(list))
    for c in per_item_kept:
        by_label[c.search_label][c.search_pattern].append(c)
    sizes = {label: sum(map(len, pats.values())) for label, pats in by_label.items()}
    smallest = min(sizes.values(), default=0)
    caps = {}
    for label, n in sizes.items():
        cap = n
        if max_ratio is not None:
            cap = min(cap, math.ceil(max_ratio * smallest))
        if max_per_label is not None:
            cap = min(cap, max_per_label)
        caps[label] = cap
    kept: list[Candidate] = []
    over_label: list[Candidate] = []
    for label in sorted(by_label):
        queues = {p: sorted(cs, key=lambda c: _hash(seed, "order", c.item_id, c.attempt))
                  for p, cs in sorted(by_label[label].items(), key=lambda kv: PATTERNS.index(kv[0]))}
        taken: list[Candidate] = []
        while len(taken) < caps[label] and any(queues.values()):
            for q in queues.values():
                if q and len(taken) < caps[label]:
                    taken.append(q.pop(0))
        kept += taken
        over_label += [c for q in queues.values() for c in q]
    return Selection(kept, mismatched, over_item, over_label, caps)


__all__ = ["LABEL_PATTERN", "PATTERNS", "Candidate", "Selection", "label_allows", "search_pattern", "select"]
