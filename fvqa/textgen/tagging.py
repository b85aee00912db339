"""Knowledge-type tagging: the text an item is judged by, the LLM prompt and its reply model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from fvqa.textgen.taxonomy import Taxonomy

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


def item_text(item: dict[str, Any]) -> str:
    """What an item is tagged by: question, answer and the subject (concept or entity name)."""
    subject = item.get("concept") or item.get("entity_text") or ""
    parts = [item.get("question") or "", item.get("answer") or "", subject]
    return " ".join(p.strip() for p in parts if p and p.strip())


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
