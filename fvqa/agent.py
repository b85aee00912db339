"""The multi-turn search agent: one rollout loop used by the probe and the eval workflows.

A rollout follows the MMSearch-R1 protocol exactly as `fvqa.protocol` defines it: the opening
prompt with the user's image and question; after each assistant turn `protocol.next_action`
decides whether to run a tool or stop (answer, limit, unparseable turn); a tool result comes back
as the next user turn (`protocol.tool_response_text`), image-search thumbnails interleaved with
their titles. A failed search never fails a rollout: upstream's error text goes back to the model.

Many rollouts advance together turn by turn (`run_many`), so a backend gets every turn that is due
in one batch. Every turn, tool call and result, every image (by sha256), the answer and the token
counts are recorded in a `Trajectory`, which serialises to JSON for `probe_rollouts`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from fvqa.generators.base import Generation, Generator, Message, Request, Sampling, image_to_bytes, to_pil
from fvqa.protocol import (
    IMAGE_PLACEHOLDER,
    QWEN_IMAGE_PAD,
    ImageHit,
    Limits,
    Prompts,
    TextHit,
    next_action,
    opening_user_text,
    parse_turn,
    render_image_results,
    render_text_results,
    to_content_parts,
    tool_response_text,
)

Mode = Literal["search", "direct", "rag"]  # rag: the fixed two-search workflow (fvqa.eval)


class SearchTools(Protocol):
    """What the agent needs from the search facade (`fvqa.search`): sync calls, errors raise."""

    def image_search(self, image: bytes, **kwargs: Any) -> Sequence[ImageHit]: ...

    def text_search(self, query: str, question: str = "", **kwargs: Any) -> Sequence[TextHit]: ...


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
    kind: Literal["image_search", "text_search"]
    query: str | None
    ok: bool
    hits: list[dict[str, Any]]  # image: title, url, thumbnail sha256 | text: url, title, summary
    result_text: str
    error: str | None = None
    seconds: float = 0.0


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
    mode: Mode
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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                   n_image_search=self.n_image_search, n_text_search=self.n_text_search)
        return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decodable(thumbnail: Any) -> bool:
    """Whether the protocol will show this thumbnail (it skips undecodable ones the same way)."""
    if thumbnail is None:
        return False
    if not isinstance(thumbnail, bytes | bytearray):
        return True
    try:
        to_pil(thumbnail)
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        return False
    return True


def image_hit_records(hits: Sequence[Any], shown_sha256: Sequence[str]) -> list[dict[str, Any]]:
    """Each hit's title and URL with the sha256 of the thumbnail the model was shown for it.

    ``render_image_results`` shows only decodable thumbnails, in hit order; pairing by "has a
    thumbnail" instead would give a broken hit the next good hit's image.
    """
    shown = iter(shown_sha256)
    return [{"title": h.title, "url": h.url,
             "thumbnail_sha256": next(shown, None) if _decodable(h.thumbnail) else None} for h in hits]


class Rollout:
    """One rollout's state: the live messages (with image bytes) and its growing trajectory."""

    def __init__(self, item: AgentItem, mode: Mode, prompts: Prompts, limits: Limits, generator_name: str,
                 sampling: Sampling) -> None:
        self.item, self.mode, self.prompts, self.sampling = item, mode, prompts, sampling
        # direct answering is one round with no tools: a search call there ends the rollout at the limit
        self.limits = limits if mode == "search" else Limits(max_rounds=1, max_image_search=0, max_text_search=0)
        prompt = prompts.round_1 if mode == "search" else prompts.direct_answer
        text = opening_user_text(prompt, item.question)
        self.messages: list[Message] = [
            {"role": "user", "content": to_content_parts(text, [item.image], IMAGE_PLACEHOLDER)}]
        self.traj = Trajectory(item.item_id, mode, item.question, generator_name, seed=sampling.seed,
                               image_shas=[_sha(item.image)])
        self._record(self.messages[0])
        self.done = False

    def _record(self, msg: Message) -> None:
        """Append a JSON-able copy (images replaced by their sha256) to the trajectory transcript."""
        content = msg["content"]
        if isinstance(content, list):
            content = [{"type": "image", "sha256": _sha(p["image"])} if p.get("type") == "image" else dict(p)
                       for p in content]
        self.traj.messages.append({"role": msg["role"], "content": content})

    def request(self) -> Request:
        return Request(list(self.messages), self.sampling)

    def stop(self, reason: str, detail: str = "") -> None:
        self.traj.stop_reason, self.traj.stop_detail, self.done = reason, detail, True

    def step(self, gen: Generation, tools: SearchTools | None) -> None:
        """Take one generated assistant turn: record it, then answer, stop, or run the tool."""
        rnd = len(self.traj.turns) + 1
        if gen.error is not None:
            self.stop("error", gen.error)
            return
        turn = parse_turn(gen.text)
        self.traj.turns.append(TurnRecord(rnd, gen.text, turn.kind, gen.prompt_tokens, gen.completion_tokens,
                                          gen.finish_reason, turn.problem))
        msg: Message = {"role": "assistant", "content": gen.text}
        self.messages.append(msg)
        self._record(msg)
        action = next_action([t.text for t in self.traj.turns], self.limits)
        if action.kind == "stop":
            if action.stop_reason == "answer":
                self.traj.answer = turn.answer
            self.stop(action.stop_reason or "invalid", action.detail)
            return
        if tools is None:
            self.stop("error", "a search was called but no search tools are configured")
            return
        if action.kind == "image_search":
            text, images, call = self._image_search(tools, rnd)
            follow_up = self.prompts.after_image_search
        else:
            text, images, call = self._text_search(tools, rnd, action.query or "")
            follow_up = self.prompts.after_text_search
        self.traj.tool_calls.append(call)
        user_text = tool_response_text(text, self.item.question, follow_up)
        image_bytes = [image_to_bytes(im) for im in images]
        self.traj.image_shas.extend(_sha(b) for b in image_bytes)
        msg = {"role": "user", "content": to_content_parts(user_text, image_bytes, QWEN_IMAGE_PAD)}
        self.messages.append(msg)
        self._record(msg)

    def _image_search(self, tools: SearchTools, rnd: int) -> tuple[str, list[Any], ToolCall]:
        t0 = time.perf_counter()
        try:
            extra = {k: v for k, v in (("image_url", self.item.image_url), ("data_id", self.item.data_id)) if v}
            hits = list(tools.image_search(self.item.image, **extra))
            error = None
        except Exception as exc:  # noqa: BLE001 - any search failure becomes upstream's error text
            hits, error = [], f"{type(exc).__name__}: {exc}"
        text, images = render_image_results(hits)
        records = image_hit_records(hits, [_sha(image_to_bytes(im)) for im in images])
        call = ToolCall(rnd, "image_search", None, error is None and bool(hits), records, text, error,
                        time.perf_counter() - t0)
        return text, images, call

    def _text_search(self, tools: SearchTools, rnd: int, query: str) -> tuple[str, list[Any], ToolCall]:
        t0 = time.perf_counter()
        try:
            hits = list(tools.text_search(query, self.item.question))
            error = None
        except Exception as exc:  # noqa: BLE001 - any search failure becomes upstream's error text
            hits, error = [], f"{type(exc).__name__}: {exc}"
        text = render_text_results(hits)
        records = [{"url": h.url, "title": h.title, "summary": h.summary} for h in hits]
        call = ToolCall(rnd, "text_search", query, error is None and bool(hits), records, text, error,
                        time.perf_counter() - t0)
        return text, [], call


@dataclass(frozen=True)
class Job:
    """One rollout to run: which item, with or without search, and its sampling (seed)."""

    item: AgentItem
    mode: Mode = "search"
    sampling: Sampling = field(default_factory=Sampling)


def run_many(jobs: Sequence[Job], generator: Generator, tools: SearchTools | None, limits: Limits,
             prompts: Prompts, *, tool_workers: int = 8,
             on_turn: Callable[[int], None] | None = None) -> list[Trajectory]:
    """Run rollouts together, one batched generator call per round; trajectories in job order.

    The tool calls of a round run on up to `tool_workers` threads (web searches are slow; each
    rollout only touches its own state, and the search facade is thread-safe).
    """
    rollouts = [Rollout(j.item, j.mode, prompts, limits, generator.name, j.sampling) for j in jobs]
    with ThreadPoolExecutor(max_workers=max(1, tool_workers)) as pool:
        while True:
            active = [r for r in rollouts if not r.done]
            if not active:
                break
            gens = generator.generate([r.request() for r in active])
            if len(gens) != len(active):
                raise RuntimeError(
                    f"generator {generator.name} returned {len(gens)} turns for {len(active)} requests")
            list(pool.map(lambda rg: rg[0].step(rg[1], tools if rg[0].mode == "search" else None),
                          zip(active, gens, strict=True)))
            if on_turn is not None:
                on_turn(len(active))
    return [r.traj for r in rollouts]


def run(item: AgentItem, generator: Generator, tools: SearchTools | None, limits: Limits, prompts: Prompts,
        *, mode: Mode = "search", sampling: Sampling | None = None) -> Trajectory:
    """One rollout of one item (see `run_many` to batch)."""
    return run_many([Job(item, mode, sampling or Sampling())], generator, tools, limits, prompts)[0]
