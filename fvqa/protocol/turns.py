"""What an assistant turn means, the rollout limits, and what follows a turn (`next_action`).

This is the protocol's state machine: every driver (probe, eval, the veRL loop) and the reward
parse turns here, so a rollout and its reward can never disagree about what a turn meant.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fvqa.protocol.wire import IMAGE_SEARCH_TAG, TEXT_SEARCH_OPEN

TurnKind = Literal["answer", "image_search", "text_search", "invalid"]
_TEXT_CALL_AT_END = re.compile(r"<text_search>((?:(?!<text_search>).)*)</text_search>$", re.DOTALL)
_ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_REASON_SPAN = re.compile(r"<reason>(.*?)</reason>", re.DOTALL)


@dataclass(frozen=True)
class Turn:
    """What one assistant turn does. ``problem`` explains an ``invalid`` turn to a person."""

    kind: TurnKind
    text: str
    query: str | None = None
    answer: str | None = None
    reason: str | None = None
    problem: str | None = None


def extract_answer(text: str) -> str | None:
    """The last ``<answer>...</answer>`` span, stripped (upstream's ``extract_solution``)."""
    spans = _ANSWER_SPAN.findall(text)
    return spans[-1].strip() if spans else None


def parse_turn(text: str) -> Turn:
    """Classify an assistant turn.

    A tool call counts only if its tag ends the turn (trailing white space ignored). A text query
    must be non-empty and on one line (upstream's trigger regex has no DOTALL, so a multi-line
    query never reached its search tool either). Otherwise the turn is an answer if it holds an
    ``<answer>`` span (the last one wins), else invalid.
    """
    body = text.strip()
    reason_m = _REASON_SPAN.search(body)
    reason = reason_m.group(1).strip() if reason_m else None
    answer = extract_answer(body)
    if body.endswith(IMAGE_SEARCH_TAG):
        return Turn("image_search", text, reason=reason, answer=answer)
    call = _TEXT_CALL_AT_END.search(body)
    if call is not None:
        query = call.group(1).strip()
        if not query:
            return Turn("invalid", text, query="", reason=reason, problem="empty <text_search> query")
        if "\n" in query:
            return Turn(
                "invalid", text, query=query, reason=reason, problem="<text_search> query spans lines"
            )
        return Turn("text_search", text, query=query, reason=reason, answer=answer)
    if answer is not None:
        return Turn("answer", text, answer=answer, reason=reason)
    if IMAGE_SEARCH_TAG in body or TEXT_SEARCH_OPEN in body:
        problem = "search tag is not at the end of the turn"
    else:
        problem = "no <answer> and no search call at the end of the turn"
    return Turn("invalid", text, reason=reason, problem=problem)



class Limits(BaseModel):
    """Rollout limits and what a search shows. Defaults are the paper's: 3 rounds, 1 image search
    (round 1), 2 text searches, top-5 results, thumbnails of at most 256 vision patches of 28x28.

    ``image_search_first_round_only``: upstream's rollout only counts image searches, while its
    format reward accepts an image search in round 1 only; the paper says round 1. We enforce it in
    the rollout (a later image-search call ends the trajectory like any call past a limit).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_rounds: int = Field(3, ge=1)
    max_image_search: int = Field(1, ge=0)
    max_text_search: int = Field(2, ge=0)
    image_search_first_round_only: bool = True
    # What one search shows the model. The probe's labels define the dataset, so the probe, eval and
    # training must show the same results: these live here, with the limits all three share.
    image_topk: int = Field(5, ge=1)  # image-search hits shown (upstream: 5)
    text_topk: int = Field(5, ge=1)  # text-search summaries shown (upstream: 5)
    thumbnail_max_pixels: int = Field(256 * 28 * 28, ge=28 * 28)  # each thumbnail resized as Qwen-VL's
    thumbnail_patch_size: int = Field(14, ge=1)  # processor would (qwen_vl_utils), capped here


@dataclass(frozen=True)
class Action:
    """What the rollout does after a model turn: call a tool, or stop (and why)."""

    kind: Literal["image_search", "text_search", "stop"]
    query: str | None = None
    stop_reason: Literal["answer", "limit", "invalid"] | None = None
    detail: str = ""


def _as_turns(history: Sequence[Turn | str]) -> list[Turn]:
    return [t if isinstance(t, Turn) else parse_turn(t) for t in history]


def next_action(history: Sequence[Turn | str], limits: Limits | None = None) -> Action:
    """Decide what follows the last assistant turn in ``history`` (all assistant turns so far).

    As upstream: a call past a limit, or any call in the last allowed round, ends the trajectory
    without running the tool (the model gets no further turn); an answer or an unparseable turn
    ends it too. Earlier turns are taken as executed calls (that is how the trajectory got here).
    """
    limits = limits or Limits()
    turns = _as_turns(history)
    if not turns:
        raise ValueError("next_action needs at least one assistant turn")
    last, rnd = turns[-1], len(turns)
    n_img = sum(t.kind == "image_search" for t in turns[:-1])
    n_txt = sum(t.kind == "text_search" for t in turns[:-1])
    if last.kind == "answer":
        return Action("stop", stop_reason="answer")
    if last.kind == "invalid":
        return Action("stop", stop_reason="invalid", detail=last.problem or "")
    if rnd >= limits.max_rounds:
        return Action(
            "stop", stop_reason="limit", detail=f"search call in the last round ({limits.max_rounds})"
        )
    if last.kind == "image_search":
        if n_img >= limits.max_image_search:
            return Action(
                "stop", stop_reason="limit", detail=f"image search limit ({limits.max_image_search})"
            )
        if limits.image_search_first_round_only and rnd > 1:
            return Action("stop", stop_reason="limit", detail="image search is allowed in round 1 only")
        return Action("image_search")
    if n_txt >= limits.max_text_search:
        return Action("stop", stop_reason="limit", detail=f"text search limit ({limits.max_text_search})")
    return Action("text_search", query=last.query)
