"""Knowledge-type tagging by an LLM: the prompt, the reply model, and the task that checks the reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from fvqa.llm.task import LLMTask, Reject, Reply, Request
from fvqa.tagging.taxonomy import Taxonomy

TAG_PROMPT = """\
Classify a visual question-answer pair by the kind of knowledge needed to answer it.

Knowledge types:
{taxonomy}

The pair:
Question: {question}
Answer: {answer}
Subject of the image: {subject}

Choose the one type that fits best{subtype_hint}, and say how confident you are (0 to 1).
Reply with a JSON object only: {{"knowledge_type": "...", {subtype_field}"confidence": 0.0}}"""

SUBTYPE_MISMATCH = "subtype_mismatch"


def reply_model(taxonomy: Taxonomy) -> type[BaseModel]:
    """A pydantic model whose JSON schema lists the allowed types (so the endpoint can enforce it)."""
    fields: dict[str, Any] = {
        "knowledge_type": (Literal[tuple(taxonomy.names)], ...),  # type: ignore[valid-type]
        "confidence": (float, Field(ge=0.0, le=1.0)),
    }
    subs = sorted({s for d in taxonomy.subtypes.values() for s in d})
    if subs:
        fields["knowledge_subtype"] = (Literal[tuple(subs)] | None, None)  # type: ignore[valid-type]
    return create_model("TagReply", **fields)


def build_messages(taxonomy: Taxonomy, item: dict[str, Any]) -> list[dict[str, Any]]:
    """One user message with the taxonomy and the item's text (no image: the text decides the type)."""
    has_subs = bool(taxonomy.subtypes)
    text = TAG_PROMPT.format(
        taxonomy=taxonomy.describe(),
        question=item.get("question") or "",
        answer=item.get("answer") or "",
        subject=item.get("concept") or item.get("entity_text") or "(unknown)",
        subtype_hint=" and, if the type lists subtypes, the best subtype of it" if has_subs else "",
        subtype_field='"knowledge_subtype": "... or null", ' if has_subs else "",
    )
    return [{"role": "user", "content": text}]


@dataclass(frozen=True)
class TagOut:
    """One tagging decision read from a reply."""

    knowledge_type: str
    knowledge_subtype: str | None
    confidence: float


class TagTask(LLMTask[dict[str, Any], TagOut]):
    """An item (question, answer, concept / entity_text) -> its knowledge type, from the taxonomy only.

    The allowed types travel in the reply's JSON schema, so an answer outside the taxonomy is an
    invalid reply (repaired once, then `unparseable reply`), never a guess; a subtype that is not
    under the chosen type is a reject of its own."""

    name = "tag"
    completion_tokens = 25

    def __init__(self, taxonomy: Taxonomy) -> None:
        self.taxonomy = taxonomy
        self.reply_model = reply_model(taxonomy)

    def format(self, item: dict[str, Any]) -> Request:
        return Request(build_messages(self.taxonomy, item), self.reply_model)

    def parse(self, item: dict[str, Any], reply: Reply) -> TagOut:
        v = reply.value
        sub = getattr(v, "knowledge_subtype", None)
        if sub is not None and sub not in self.taxonomy.subtypes.get(v.knowledge_type, {}):
            raise Reject(SUBTYPE_MISMATCH,
                         f"{sub!r} is not a subtype of {v.knowledge_type}\nraw reply: {reply.text}")
        return TagOut(v.knowledge_type, sub, float(v.confidence))

    def typical_prompt_tokens(self) -> float:
        """A short question and answer (80 and 20 characters) with this taxonomy."""
        messages = build_messages(self.taxonomy, {"question": "x" * 80, "answer": "x" * 20})
        return len(messages[0]["content"]) / 4
