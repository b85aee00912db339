"""The episode core: everything that follows a model turn, shared by every rollout driver.

Three drivers run the protocol: the agent (`fvqa.agent`: probe and eval direct/on-demand, batched
and sync), the fixed RAG script (`fvqa.eval.workflows`) and the veRL loop
(`fvqa.train.agent_loop`, async, token-level). They differ only in how they drive a model. What
happens after a turn lives here once:

* the search call (sync or async, any `SearchTools`): an exception becomes upstream's error text,
  never a failed rollout; the hits are cut to the limits' top-k; thumbnails are bounded once, the
  way Qwen-VL's processor does; an undecodable thumbnail is shown as missing and recorded as such;
* the record of the call (`ToolCall`: hits with the sha256 of the thumbnail actually shown);
* the next user turn (upstream's ``Searched results: <information>...`` text with one vision
  placeholder per thumbnail shown).

So the probe, whose labels define the dataset, shows a model exactly what training shows it.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from PIL import Image

from fvqa.protocol.images import bound_thumbnail, decode_or_none, image_bytes
from fvqa.protocol.prompts import Prompts
from fvqa.protocol.turns import Limits
from fvqa.protocol.wire import (
    QWEN_IMAGE_PAD,
    ImageHit,
    TextHit,
    render_image_results,
    render_text_results,
    to_content_parts,
    tool_response_text,
)

SearchKind = Literal["image_search", "text_search"]

NO_RESULTS = "no results"
"""`ToolCall.error` of a search that ran but found nothing (the model sees upstream's error text
either way; statistics keep "failed" and "empty" apart)."""


class SearchTools(Protocol):
    """What a rollout needs from search: the in-process facade (`fvqa.search.SearchTools`) or its
    HTTP client. Either method may be a coroutine function; an object with ``aimage_search`` /
    ``atext_search`` is awaited through those. Errors raise (the core renders them)."""

    def image_search(self, image: bytes, *, image_url: str | None = None,
                     data_id: str | None = None) -> Sequence[ImageHit]: ...

    def text_search(self, query: str, question: str = "") -> Sequence[TextHit]: ...


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentItem:
    """What a rollout needs of an item."""

    item_id: str
    question: str
    image: bytes
    image_url: str | None = None  # lets URL-keyed backends (web Lens by URL, replay) find the image
    data_id: str | None = None  # upstream's data_id: the key of its released image-search cache (replay)


@dataclass
class ToolCall:
    """One executed search: its input, what came back, and how long it took."""

    round: int
    kind: SearchKind
    query: str | None
    ok: bool  # found something
    hits: list[dict[str, Any]]  # image: title, url, thumbnail_sha256 | text: url, title, summary
    result_text: str
    error: str | None = None  # None (ok), NO_RESULTS, or "ExceptionType: message"
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """The search raised (service down, timeout, bad reply), as opposed to finding nothing."""
        return self.error is not None and self.error != NO_RESULTS


@dataclass
class TurnRecord:
    """One assistant turn as generated and as the protocol parsed it."""

    round: int
    text: str
    kind: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    problem: str | None = None


@dataclass
class Trajectory:
    """A whole rollout: transcript (images by sha256), turns, tool calls, answer, stop reason, tokens."""

    item_id: str
    mode: str  # search | direct | rag
    question: str
    generator: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    answer: str | None = None
    stop_reason: str | None = None  # answer | limit | invalid | error
    stop_detail: str = ""
    image_shas: list[str] = field(default_factory=list)  # user image first, then thumbnails shown
    seed: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.turns)

    @property
    def completion_tokens(self) -> int:
        return sum(t.completion_tokens for t in self.turns)

    @property
    def n_image_search(self) -> int:
        return sum(c.kind == "image_search" for c in self.tool_calls)

    @property
    def n_text_search(self) -> int:
        return sum(c.kind == "text_search" for c in self.tool_calls)

    @property
    def assistant_turns(self) -> list[str]:
        return [t.text for t in self.turns]

    def record(self, msg: dict[str, Any]) -> None:
        """Append a JSON-able copy of a message (images replaced by their sha256) to the transcript."""
        self.messages.append(transcript_entry(msg))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                   n_image_search=self.n_image_search, n_text_search=self.n_text_search)
        return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def transcript_entry(msg: dict[str, Any]) -> dict[str, Any]:
    """A message as a trajectory stores it: image parts become ``{"type": "image", "sha256": ...}``."""
    content = msg["content"]
    if isinstance(content, list):
        content = [{"type": "image", "sha256": sha256(image_bytes(p["image"]))} if p.get("type") == "image"
                   else dict(p) for p in content]
    return {"role": msg["role"], "content": content}


def search_outcomes(tool_calls: Sequence[ToolCall | dict[str, Any]]) -> tuple[int, int]:
    """(failed, empty) among recorded search calls: failed raised, empty ran and found nothing."""
    errors = [c.error if isinstance(c, ToolCall) else c.get("error") for c in tool_calls]
    return (sum(1 for e in errors if e and e != NO_RESULTS), sum(1 for e in errors if e == NO_RESULTS))


# --------------------------------------------------------------------------------------------
# Search calls
# --------------------------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    """One search as the model sees it: the call's record and the thumbnails shown (bounded, in
    placeholder order, as PIL images and as the PNG bytes whose sha256 the record holds)."""

    call: ToolCall
    images: list[Image.Image] = field(default_factory=list)
    image_data: list[bytes] = field(default_factory=list)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) and not str(exc):
        return "TimeoutError: the search did not answer in time"
    return f"{type(exc).__name__}: {exc}"


def image_outcome(rnd: int, hits: Sequence[ImageHit] | BaseException, limits: Limits,
                  seconds: float = 0.0) -> SearchOutcome:
    """Render an image search's hits (or its exception) as the model will see them."""
    error = _error_text(hits) if isinstance(hits, BaseException) else None
    shown = [] if isinstance(hits, BaseException) else list(hits)[: limits.image_topk]
    text, decoded = render_image_results(shown)
    images = [bound_thumbnail(im, limits.thumbnail_max_pixels, limits.thumbnail_patch_size) for im in decoded]
    data = [image_bytes(im) for im in images]
    shas = iter(sha256(b) for b in data)
    # render_image_results shows only decodable thumbnails, in hit order: pair shas with those only
    records = [{"title": h.title, "url": h.url,
                "thumbnail_sha256": next(shas, None) if decode_or_none(h.thumbnail) is not None else None}
               for h in shown]
    if error is None and not shown:
        error = NO_RESULTS
    call = ToolCall(rnd, "image_search", None, error is None, records, text, error, seconds)
    return SearchOutcome(call, images, data)


def text_outcome(rnd: int, query: str, hits: Sequence[TextHit] | BaseException, limits: Limits,
                 seconds: float = 0.0) -> SearchOutcome:
    """Render a text search's hits (or its exception) as the model will see them."""
    error = _error_text(hits) if isinstance(hits, BaseException) else None
    shown = [] if isinstance(hits, BaseException) else list(hits)[: limits.text_topk]
    records = [{"url": h.url, "title": h.title, "summary": h.summary} for h in shown]
    if error is None and not shown:
        error = NO_RESULTS
    call = ToolCall(rnd, "text_search", query, error is None, records, render_text_results(shown), error, seconds)
    return SearchOutcome(call)


def _image_kwargs(image_url: str | None, data_id: str | None) -> dict[str, str]:
    return {k: v for k, v in (("image_url", image_url), ("data_id", data_id)) if v}


def image_search(tools: SearchTools, image: bytes, limits: Limits, *, rnd: int,
                 image_url: str | None = None, data_id: str | None = None) -> SearchOutcome:
    """Run an image search for the user's image (sync tools) and render it."""
    t0 = time.perf_counter()
    try:
        hits: Sequence[ImageHit] | BaseException = list(tools.image_search(image, **_image_kwargs(image_url, data_id)))
    except Exception as exc:  # noqa: BLE001 - any search failure becomes upstream's error text
        hits = exc
    return image_outcome(rnd, hits, limits, time.perf_counter() - t0)


def text_search(tools: SearchTools, query: str, question: str, limits: Limits, *, rnd: int) -> SearchOutcome:
    """Run a text search (sync tools); summaries are written with respect to the question."""
    t0 = time.perf_counter()
    try:
        hits: Sequence[TextHit] | BaseException = list(tools.text_search(query, question))
    except Exception as exc:  # noqa: BLE001 - any search failure becomes upstream's error text
        hits = exc
    return text_outcome(rnd, query, hits, limits, time.perf_counter() - t0)


async def _await_call(tools: Any, name: str, *args: Any, timeout_s: float | None, **kwargs: Any) -> Any:
    """Call ``tools.a<name>`` or ``tools.<name>`` (coroutine or sync in a worker thread) with a timeout."""
    fn = getattr(tools, "a" + name, None) or getattr(tools, name)
    if inspect.iscoroutinefunction(fn):
        coro = fn(*args, **kwargs)
    else:
        coro = asyncio.to_thread(fn, *args, **kwargs)
    return await asyncio.wait_for(coro, timeout_s)


async def aimage_search(tools: SearchTools, image: bytes, limits: Limits, *, rnd: int,
                        image_url: str | None = None, data_id: str | None = None,
                        timeout_s: float | None = None) -> SearchOutcome:
    """`image_search` for async drivers: a slow search never blocks the event loop."""
    t0 = time.perf_counter()
    try:
        hits: Sequence[ImageHit] | BaseException = list(await _await_call(
            tools, "image_search", image, timeout_s=timeout_s, **_image_kwargs(image_url, data_id)))
    except Exception as exc:  # noqa: BLE001 - any search failure becomes upstream's error text
        hits = exc
    # decoding and resizing thumbnails is CPU work: off the event loop
    return await asyncio.to_thread(image_outcome, rnd, hits, limits, time.perf_counter() - t0)


async def atext_search(tools: SearchTools, query: str, question: str, limits: Limits, *, rnd: int,
                       timeout_s: float | None = None) -> SearchOutcome:
    """`text_search` for async drivers."""
    t0 = time.perf_counter()
    try:
        hits: Sequence[TextHit] | BaseException = list(
            await _await_call(tools, "text_search", query, question, timeout_s=timeout_s))
    except Exception as exc:  # noqa: BLE001 - any search failure becomes upstream's error text
        hits = exc
    return text_outcome(rnd, query, hits, limits, time.perf_counter() - t0)


def no_image_outcome(rnd: int) -> SearchOutcome:
    """An image-search call on a sample without an image: the model gets upstream's error text."""
    text, _ = render_image_results([])
    return SearchOutcome(ToolCall(rnd, "image_search", None, False, [], text,
                                  "ValueError: the sample has no image to search with"))


# --------------------------------------------------------------------------------------------
# The next user turn
# --------------------------------------------------------------------------------------------


def follow_up_prompt(prompts: Prompts, kind: str) -> str:
    """The instruction that follows a search's results (upstream's after-search prompts)."""
    return prompts.after_image_search if kind == "image_search" else prompts.after_text_search


def tool_turn_text(outcome: SearchOutcome, question: str, prompts: Prompts) -> str:
    """The next user turn's text after a search, with one vision placeholder per thumbnail shown."""
    return tool_response_text(outcome.call.result_text, question, follow_up_prompt(prompts, outcome.call.kind))


def user_message(text: str, images: Sequence[Any]) -> dict[str, Any]:
    """A user message in the neutral parts shape: text split at each vision placeholder."""
    return {"role": "user", "content": to_content_parts(text, images, QWEN_IMAGE_PAD)}
