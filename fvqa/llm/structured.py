"""Structured output: ask for JSON matching a pydantic model, validate, repair once, else explain.

A failure is data, not an exception: the stage turns `error_reason` (a sentence a person can act
on) and `raw` (the model's last reply) into a `rejects` row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from fvqa.llm.client import LLMClient, LLMResult, Messages

M = TypeVar("M", bound=BaseModel)
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


@dataclass
class StructuredResult(Generic[M]):
    ok: bool
    value: M | None
    raw: str | None  # the last reply text (None if no reply arrived)
    error_reason: str | None = None
    repaired: bool = False  # the first reply was invalid, the repair was valid
    results: list[LLMResult] = field(default_factory=list, repr=False)


def response_format(model_cls: type[BaseModel]) -> dict[str, Any]:
    """OpenAI `response_format` for a pydantic model (also understood by vLLM and SGLang)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", model_cls.__name__)[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": model_cls.model_json_schema()}}


def schema_instruction(model_cls: type[BaseModel]) -> dict[str, str]:
    """A system message for endpoints without `response_format` support."""
    schema = json.dumps(model_cls.model_json_schema(), ensure_ascii=False)
    return {
        "role": "system",
        "content": f"Reply with exactly one JSON object and nothing else. It must match this JSON schema: {schema}",
    }


def parse_reply(text: str | None, model_cls: type[M]) -> tuple[M | None, str | None]:
    """`(value, None)` or `(None, why)`; tolerates a ```json fence around the object."""
    if not text or not text.strip():
        return None, "the reply is empty"
    m = _FENCE.match(text)
    candidate = m.group(1) if m else text.strip()
    try:
        return model_cls.model_validate_json(candidate), None
    except ValidationError as exc:
        return None, describe_errors(exc)


def describe_errors(exc: ValidationError) -> str:
    """At most three pydantic errors as one sentence, e.g. "field 'answer': Field required"."""
    parts = []
    for err in exc.errors()[:3]:
        if err["type"] == "json_invalid":
            parts.append(f"not valid JSON ({err['msg'].removeprefix('Invalid JSON: ')})")
            continue
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"field '{loc}': {err['msg']}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


async def complete_json(
    client: LLMClient, messages: Messages, model_cls: type[M], **params: Any
) -> StructuredResult[M]:
    """Request JSON for `model_cls`; on an invalid reply send the error back once; else fail with a reason."""
    if client.cfg.json_schema:
        params.setdefault("response_format", response_format(model_cls))
    else:
        messages = [schema_instruction(model_cls), *messages]
    first = await client.complete(messages, **params)
    if not first.ok:
        return StructuredResult(False, None, None, f"request failed: {first.error}", results=[first])
    value, why = parse_reply(first.text, model_cls)
    if value is not None:
        return StructuredResult(True, value, first.text, results=[first])
    repair = [
        *messages,
        {"role": "assistant", "content": first.text or ""},
        {
            "role": "user",
            "content": f"That reply is invalid: {why}. Reply again with only the corrected JSON object.",
        },
    ]
    second = await client.complete(repair, **params)
    if not second.ok:
        reason = (
            f"reply did not match {model_cls.__name__} ({why}) and the repair request failed: {second.error}"
        )
        return StructuredResult(False, None, first.text, reason, results=[first, second])
    value, why2 = parse_reply(second.text, model_cls)
    if value is not None:
        return StructuredResult(True, value, second.text, repaired=True, results=[first, second])
    cut = " (the reply was cut off at max_tokens)" if second.finish_reason == "length" else ""
    reason = f"reply did not match {model_cls.__name__} after one repair: {why2}{cut}"
    return StructuredResult(False, None, second.text, reason, results=[first, second])
