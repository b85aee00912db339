"""Format rules: which turns and which trajectory shapes count as well-formed, and search counts.

Two rule sets: ``upstream`` (its reward, exactly) and ``limits`` (every call sequence the rollout
limits let a trajectory execute). Where upstream's rollout and reward disagree, the choice is
written next to the code.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from fvqa.protocol.turns import Limits, Turn, next_action, parse_turn
from fvqa.protocol.wire import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    IMAGE_SEARCH_TAG,
    REASON_CLOSE,
    REASON_OPEN,
    TEXT_SEARCH_CLOSE,
    TEXT_SEARCH_OPEN,
)

FormatRule = Literal["upstream", "limits"]
Shape = tuple[str, ...]
UPSTREAM_SHAPES: frozenset[Shape] = frozenset(
    {
        ("answer",),
        ("image_search", "answer"),
        ("text_search", "answer"),
        ("image_search", "text_search", "answer"),
    }
)
_ANSWER_TURN = re.compile(r"^<reason>.*</reason>.*<answer>.*</answer>$", re.DOTALL)
_IMAGE_TURN = re.compile(r"^<reason>.*</reason>.*<search><img></search>$", re.DOTALL)
_TEXT_TURN = re.compile(r"^<reason>.*</reason>.*<text_search>.*</text_search>$", re.DOTALL)


def _one_reason(t: str) -> bool:
    return t.count(REASON_OPEN) == 1 and t.count(REASON_CLOSE) == 1


def _has_text_tag(t: str) -> bool:
    return TEXT_SEARCH_OPEN in t or TEXT_SEARCH_CLOSE in t


def _has_answer_tag(t: str) -> bool:
    return ANSWER_OPEN in t or ANSWER_CLOSE in t


def is_valid_answer_turn(text: str) -> bool:
    """Upstream's rule: reason then answer, one pair of each, and no search tag of either kind."""
    t = text.strip()
    return (
        bool(_ANSWER_TURN.match(t))
        and _one_reason(t)
        and t.count(ANSWER_OPEN) == 1
        and t.count(ANSWER_CLOSE) == 1
        and IMAGE_SEARCH_TAG not in t
        and not _has_text_tag(t)
    )


def is_valid_image_search_turn(text: str) -> bool:
    """Upstream's rule: reason then exactly one ``<search><img></search>`` at the end, nothing else."""
    t = text.strip()
    return (
        bool(_IMAGE_TURN.match(t))
        and _one_reason(t)
        and t.count(IMAGE_SEARCH_TAG) == 1
        and not _has_answer_tag(t)
        and not _has_text_tag(t)
    )


def is_valid_text_search_turn(text: str, *, require_query: bool = False) -> bool:
    """Upstream's rule: reason then exactly one text-search pair at the end, no answer or image tag.

    ``require_query`` adds our rollout's condition (non-empty, one-line query); upstream's format
    reward accepts an empty query although its rollout drops such a trajectory.
    """
    t = text.strip()
    ok = (
        bool(_TEXT_TURN.match(t))
        and _one_reason(t)
        and t.count(TEXT_SEARCH_OPEN) == 1
        and t.count(TEXT_SEARCH_CLOSE) == 1
        and not _has_answer_tag(t)
        and IMAGE_SEARCH_TAG not in t
    )
    return ok and (not require_query or parse_turn(t).kind == "text_search")


def allowed_shapes(rule: FormatRule = "limits", limits: Limits | None = None) -> frozenset[Shape]:
    """Every trajectory shape (tool calls then an answer) the rule set accepts.

    ``upstream``: exactly upstream's four shapes. ``limits``: every sequence of calls the limits
    let the rollout execute, followed by an answer (with the defaults this adds text->text->answer,
    which upstream's reward rejects although its rollout allows it).
    """
    if rule == "upstream":
        return UPSTREAM_SHAPES
    if rule != "limits":
        raise ValueError(f"unknown format rule {rule!r}; use 'upstream' or 'limits'")
    limits = limits or Limits()
    shapes: set[Shape] = set()
    for n_calls in range(limits.max_rounds):
        for calls in itertools.product(("image_search", "text_search"), repeat=n_calls):
            history = [*calls, "answer"]
            if all(
                next_action([Turn(k, "") for k in history[: i + 1]], limits).kind == k
                for i, k in enumerate(calls)
            ):
                shapes.add(tuple(history))
    return frozenset(shapes)


@dataclass(frozen=True)
class FormatResult:
    """Whether a trajectory has a valid format, its shape, and a reason a person can read."""

    ok: bool
    shape: Shape
    problem: str | None = None
    turn_problems: list[str | None] = field(default_factory=list)


def _turn_shape(text: str, *, strict_query: bool) -> tuple[str, str | None]:
    if is_valid_answer_turn(text):
        return "answer", None
    if is_valid_image_search_turn(text):
        return "image_search", None
    if is_valid_text_search_turn(text, require_query=strict_query):
        return "text_search", None
    parsed = parse_turn(text)
    why = parsed.problem or f"{parsed.kind} turn breaks the tag rules (one <reason> pair first, one action)"
    return "invalid", why


def trajectory_format(
    turns: Sequence[str], rule: FormatRule = "limits", limits: Limits | None = None
) -> FormatResult:
    """Check every turn against the per-turn rules and the whole against the allowed shapes.

    Any number of turns is accepted as input: shapes longer than the rule set allows (upstream's
    reward raises on more than 3 turns) simply fail with a reason.
    """
    strict = rule == "limits"
    checked = [_turn_shape(t, strict_query=strict) for t in turns]
    shape = tuple(kind for kind, _ in checked)
    problems = [p for _, p in checked]
    if not turns:
        return FormatResult(False, shape, "no assistant turn", problems)
    for i, p in enumerate(problems, start=1):
        if p is not None:
            return FormatResult(False, shape, f"turn {i}: {p}", problems)
    if shape not in allowed_shapes(rule, limits):
        return FormatResult(
            False, shape, f"shape {'->'.join(shape)} is not allowed by rule {rule!r}", problems
        )
    return FormatResult(True, shape, None, problems)


def count_searches(turns: Sequence[str], rule: FormatRule = "limits") -> tuple[int, int]:
    """(image searches, text searches) a trajectory made, as each rule set counts them.

    ``upstream`` (its reward, exactly): look at the first turn of a 1- or 2-turn trajectory, at the
    first two of a 3-turn one (generalised: all but the last of a longer one); a turn counts once if
    it contains ``<search><img></search>`` (image) or else both text-search tags (text), whatever
    its format or position. ``limits``: count the calls the rollout actually ran, i.e. every turn
    but the last that parses as a tool call.
    """
    if rule == "upstream":
        looked_at = turns[:1] if len(turns) <= 2 else turns[:-1]
        n_img = sum(IMAGE_SEARCH_TAG in t for t in looked_at)
        n_txt = sum(
            IMAGE_SEARCH_TAG not in t and TEXT_SEARCH_OPEN in t and TEXT_SEARCH_CLOSE in t for t in looked_at
        )
        return n_img, n_txt
    if rule != "limits":
        raise ValueError(f"unknown format rule {rule!r}; use 'upstream' or 'limits'")
    kinds = [parse_turn(t).kind for t in turns[:-1]]
    return kinds.count("image_search"), kinds.count("text_search")
