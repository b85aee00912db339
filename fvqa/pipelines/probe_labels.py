"""Search-need labels: from a set of probe rollouts, or from the popularity prior. Pure functions.

Rollout rule (paper, keeping the 4-way label the released dataset lost):
  * `search_free` if some correct rollout used no search (direct rollouts, or search-enabled ones
    that answered without calling a tool);
  * else, over the correct rollouts: `image_search_required` if they used image search only,
    `text_search_required` if text search only, `mixed_search_required` if any used both or the
    correct ones differ (some image-only, some text-only);
  * `unanswerable` if no rollout was correct (excluded from the dataset by the split stage).

Popularity-prior rule (offline default, labelled `popularity-prior`, never a model's opinion):
  * tier from the MetaCLIP match count of the item's concept/entity: head >= head_threshold
    (MetaCLIP's t = 20,000), torso >= torso_threshold, else tail (also when no count is known);
  * an *identify* question (its answer names the visual concept: MetaCLIP-sourced items, or the
    concept appears in the answer) needs recognition only: head -> search_free, otherwise
    image_search_required;
  * a *fact* question about the entity (InfoSeek-style) needs recognition and the fact: head ->
    search_free, torso -> text_search_required (the model knows what it sees but not the fact),
    tail -> mixed_search_required (identify with image search, then look the fact up).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fvqa.answers import normalize_answer
from fvqa.schema import SearchLabel

POPULARITY_METHOD = "popularity-prior"
# prior chance that search recovers a question the model cannot answer directly, by label
SEARCH_RECOVERY = {
    SearchLabel.search_free: 0.8,
    SearchLabel.image_search_required: 0.8,
    SearchLabel.text_search_required: 0.8,
    SearchLabel.mixed_search_required: 0.6,
}


@dataclass(frozen=True)
class RolloutOutcome:
    """What the label needs from one rollout."""

    correct: bool
    used_image_search: bool
    used_text_search: bool


def label_from_rollouts(rollouts: Sequence[RolloutOutcome]) -> SearchLabel:
    """The 4-way search label (or `unanswerable`) of one item's rollout set."""
    correct = [r for r in rollouts if r.correct]
    if not correct:
        return SearchLabel.unanswerable
    if any(not r.used_image_search and not r.used_text_search for r in correct):
        return SearchLabel.search_free
    used_image = any(r.used_image_search for r in correct)
    used_text = any(r.used_text_search for r in correct)
    if used_image and used_text:
        return SearchLabel.mixed_search_required
    return SearchLabel.image_search_required if used_image else SearchLabel.text_search_required


Tier = Literal["head", "torso", "tail"]
QuestionKind = Literal["identify", "fact"]


def tier_of(count: int | None, head_threshold: int, torso_threshold: int) -> Tier:
    """Popularity tier of a match count (unknown counts are tail: not in MetaCLIP's matches)."""
    if count is not None and count >= head_threshold:
        return "head"
    if count is not None and count >= torso_threshold:
        return "torso"
    return "tail"


def question_kind(source: str, concept: str | None, answer: str) -> QuestionKind:
    """`identify` if answering means naming the visual concept, else `fact`."""
    if source == "metaclip":
        return "identify"
    c = normalize_answer(concept or "")
    return "identify" if c and c in normalize_answer(answer) else "fact"


def prior_label(tier: Tier, kind: QuestionKind) -> SearchLabel:
    """The popularity-prior label (rule in the module docstring)."""
    if tier == "head":
        return SearchLabel.search_free
    if kind == "identify":
        return SearchLabel.image_search_required
    return SearchLabel.text_search_required if tier == "torso" else SearchLabel.mixed_search_required


def prior_probabilities(count: int | None, head_threshold: int, label: SearchLabel) -> tuple[float, float]:
    """(p_direct, p_search) as prior probabilities of a correct answer.

    p_direct is logistic in log10(count) and crosses 0.5 exactly at the head threshold (so it
    agrees with the label); p_search adds what search is assumed to recover (`SEARCH_RECOVERY`).
    """
    x = math.log10((count or 0) + 1) - math.log10(max(head_threshold, 1))
    p_direct = 1.0 / (1.0 + math.exp(-2.0 * x))
    p_search = p_direct + (1.0 - p_direct) * SEARCH_RECOVERY[label]
    return round(p_direct, 4), round(p_search, 4)
