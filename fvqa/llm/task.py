"""The shape of an LLM task: format one input into a request, parse one reply into an output.

Modelled on distilabel's Task (`format_input` / `format_output`): a task holds a prompt and a parser
and knows nothing about transport. `fvqa.llm.runner` does the rest once for every task: it sends
the requests through the cached client (online, or the Batch API when configured), turns each
reply into an output or a named reject, counts what it cost, and prices a run beforehand.

Question generation, knowledge-type tagging, the eval judge and the search summariser are tasks.

    class Shout(LLMTask[str, str]):
        name = "shout"

        def format(self, item: str) -> Request:
            return Request([{"role": "user", "content": f"Repeat in capitals: {item}"}])

        def parse(self, item: str, reply: Reply) -> str:
            if not reply.text.isupper():
                raise Reject("not capitals", f"raw reply: {reply.text}")
            return reply.text
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from fvqa.llm.client import Messages

In = TypeVar("In")  # one input of a task
Out = TypeVar("Out")  # its output

# Reason codes of the rejects the runner makes itself (a task's parser names its own).
UNPARSEABLE = "unparseable_reply"  # a reply arrived but did not match the reply model (after one repair)
REQUEST_FAILED = "llm_request_failed"  # no usable reply: a deterministic error (HTTP 400, bad image...)

IMAGE_TOKENS = 765  # GPT-4o high-detail cost of a 768 px image (4 tiles x 170 + 85), for estimates


@dataclass(frozen=True)
class Request:
    """What to send for one input.

    `reply_model`: the reply must be JSON matching this pydantic model (sent as `response_format`
    or, for endpoints without it, as a schema instruction; an invalid reply gets one repair
    request). None: free text, handed to `parse` as is. `params`: extra body fields such as
    `max_tokens`, `temperature` or `top_p` (they enter the cache key; unset ones come from the
    `LLMConfig`)."""

    messages: Messages
    reply_model: type[BaseModel] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """One usable reply: its text, the validated model (structured tasks) and where it came from."""

    text: str
    value: Any = None  # an instance of the request's reply_model; None for free-text tasks
    repaired: Literal[False, "local", "reask"] = False  # invalid first reply: mended locally / re-asked
    cached: bool = False  # served from the response cache (nothing paid now)


class Reject(ValueError):
    """An input dropped with a reason: raised by `LLMTask.format` / `parse`, or made by the runner.

    `reason` is the short code stored in `rejects.reason` and counted in the stage's stats;
    `detail` is what a person reads to understand it (the broken rule, the raw reply); `why` is
    the cause in one line (default: the first line of `detail`) for callers that report it
    elsewhere, e.g. a judge verdict's error."""

    def __init__(self, reason: str, detail: str = "", *, why: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.why = why or (detail.splitlines()[0] if detail else reason)
        super().__init__(self.why)


class LLMTask(ABC, Generic[In, Out]):
    """A prompt and a parser over one OpenAI-wire client; subclasses set `name` and the two methods.

    `name` bills the calls in the cost ledger and must equal the stage whose `rejects` rows the
    task's rejects become. It does not enter the cache key: that is the request itself (model,
    messages, params), so an identical request is answered once whichever task sends it."""

    name: str = ""
    completion_tokens: int = 0  # typical reply length, for estimates
    image_tokens: int = IMAGE_TOKENS  # what one attached image costs in prompt tokens, for estimates

    @abstractmethod
    def format(self, item: In) -> Request:
        """The request for one input (called just before it is sent, so images are read lazily)."""

    @abstractmethod
    def parse(self, item: In, reply: Reply) -> Out:
        """The output for one reply; raise `Reject` for a reply that is well-formed but unusable."""

    def typical_prompt_tokens(self) -> float:
        """Prompt tokens of a typical request, to price inputs that do not exist yet."""
        raise NotImplementedError(f"{type(self).__name__} cannot price inputs it has not seen")


def request_size(messages: Messages) -> tuple[int, int]:
    """(text characters, attached images) of a request's messages; ~4 characters make a token."""
    chars = images = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                chars += len(part.get("text") or "")
            elif part.get("type") in ("image", "image_url"):
                images += 1
    return chars, images
