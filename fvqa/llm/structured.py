"""Structured output: ask for JSON matching a pydantic model, validate, repair once, else explain.

An invalid reply is first mended locally by `json_repair` (unquoted keys, trailing commas, prose or
a fence around the object: free, no request); only if that still does not validate is the model
re-asked once with the error (a paid request). `repaired` says which one worked ("local" or
"reask"), so provenance and stage stats can tell a free mend from a paid one. A reply cut off at
max_tokens is never mended locally: closing its brackets would accept a truncated answer.

A failure is data, not an exception: the stage turns `error_reason` (a sentence a person can act
on) and `raw` (the model's last reply) into a `rejects` row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import json_repair
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from fvqa.llm.client import LLMClient, LLMResult, Messages

M = TypeVar("M", bound=BaseModel)
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)

Repaired = Literal[False, "local", "reask"]
"""How a valid value came from an invalid first reply: not at all, mended by json_repair, or re-asked."""


@dataclass
class StructuredResult(Generic[M]):
    ok: bool
    value: M | None
    raw: str | None  # the last reply text (None if no reply arrived)
    error_reason: str | None = None
    repaired: Repaired = False  # the first reply was invalid: "local" mend or paid "reask" made it valid
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


def repair_locally(text: str | None, model_cls: type[M], finish_reason: str | None = None) -> M | None:
    """The reply mended by `json_repair` if that validates, else None (then the model is re-asked).

    None for a reply cut off at max_tokens: json_repair would close the brackets and a truncated
    answer would pass as complete. None unless the mend is a non-empty JSON object: prose can mend
    to `{}`, which a reply model with only defaulted fields would accept as an answer."""
    if not text or not text.strip() or finish_reason == "length":
        return None
    m = _FENCE.match(text)
    try:
        mended = json_repair.repair_json(m.group(1) if m else text)
        obj = json.loads(mended) if isinstance(mended, str) else None
    except Exception:  # noqa: BLE001 - a failed local mend must only fall through to the re-ask
        return None
    if not isinstance(obj, dict) or not obj:
        return None
    try:
        return model_cls.model_validate_json(mended)
    except ValidationError:
        return None


async def complete_json(
    client: LLMClient, messages: Messages, model_cls: type[M], **params: Any
) -> StructuredResult[M]:
    """Request JSON for `model_cls`; mend an invalid reply locally, else send the error back once; else fail."""
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
    value = repair_locally(first.text, model_cls, first.finish_reason)
    if value is not None:
        return StructuredResult(True, value, first.text, repaired="local", results=[first])
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
    if value is None:
        value = repair_locally(second.text, model_cls, second.finish_reason)
    if value is not None:
        return StructuredResult(True, value, second.text, repaired="reask", results=[first, second])
    cut = " (the reply was cut off at max_tokens)" if second.finish_reason == "length" else ""
    reason = f"reply did not match {model_cls.__name__} after one repair: {why2}{cut}"
    return StructuredResult(False, None, second.text, reason, results=[first, second])
