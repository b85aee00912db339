"""The generator interface: chat messages in, one assistant turn out, for a batch of requests.

The agent (fvqa.agent) drives many rollouts turn by turn and hands a backend all the turns due at
once, so a vLLM engine or a batched GPU model can fill its batch and an HTTP backend can send them
concurrently. Messages use one neutral shape for every backend:

    {"role": "user", "content": [{"type": "text", "text": ...}, {"type": "image", "image": <bytes>}]}

Images are raw bytes (their sha256 is the cache key everywhere); each backend converts them to what
it needs (data URLs, PIL images). A backend never raises for one failed request: it returns a
`Generation` with `error` set, and the agent ends that rollout with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from fvqa.protocol import IMAGE_SEARCH_TAG, STOP_STRINGS, TEXT_SEARCH_CLOSE, TEXT_SEARCH_OPEN

Message = dict[str, Any]


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request. `seed` makes a sampled rollout reproducible and, for
    cached HTTP backends, makes the k rollouts of an item k distinct requests."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = STOP_STRINGS


@dataclass(frozen=True)
class Request:
    """One assistant turn to generate."""

    messages: list[Message]
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class Generation:
    """One generated assistant turn with its token counts (or the reason it failed)."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    cached: bool = False
    error: str | None = None


@runtime_checkable
class Generator(Protocol):
    """A backend: OpenAI-compatible endpoint, local transformers model, vLLM offline engine."""

    name: str  # "<backend>:<model>", recorded in trajectories and provenance

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """One Generation per request, in order; failures as `Generation(error=...)`."""
        ...


@runtime_checkable
class TurnwiseGenerator(Protocol):
    """A backend whose requests are independent calls (an HTTP endpoint): the agent advances each
    rollout on its own instead of round by round, so one slow call never holds a batch. Batched
    engines (transformers, vLLM offline) are plain `Generator`s and keep round batching."""

    name: str

    def session(self) -> AbstractAsyncContextManager[Any]:
        """Open whatever the calls share (connection pools) for the running event loop."""
        ...

    async def agenerate_one(self, request: Request) -> Generation:
        """One turn; a failure is `Generation(error=...)`, never an exception."""
        ...


def restore_stop(text: str) -> str:
    """Put back a search tag's closing stop string that the server cut off.

    OpenAI-style servers drop the matched stop string from the output (vLLM keeps it only with
    `include_stop_str_in_output`), which would turn `...<search><img></search>` into an unparseable
    `...<search><img>`. Idempotent: a text that already ends in a closed tag is returned unchanged.
    """
    body = text.rstrip()
    if body.endswith(IMAGE_SEARCH_TAG.removesuffix("</search>")):
        return body + "</search>"
    opened = body.rfind(TEXT_SEARCH_OPEN)
    if opened != -1 and body.rfind(TEXT_SEARCH_CLOSE) < opened and "\n" not in body[opened:]:
        return body + TEXT_SEARCH_CLOSE
    return text


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut a generation right after the first stop string (for backends that overshoot)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i + len(s))
    return text[:cut]


_WS = re.compile(r"\s+")


def text_of(message: Message) -> str:
    """The text parts of a message joined (for logs and fake backends)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text")
