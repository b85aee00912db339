"""Turn one Label Studio annotation result into fvqa fields, or say exactly why it cannot be used.

The control names come from `configs`; a value outside the listed choices is a reject reason,
never a guess.
"""

from __future__ import annotations

from typing import Any

from fvqa.annotation import configs


class AnnotationProblem(ValueError):
    """An annotation that cannot be used (the message becomes the reject reason)."""


def _values(result: list[dict[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for region in result or []:
        if not isinstance(region, dict):
            continue
        value = region.get("value") or {}
        name = region.get("from_name")
        if "choices" in value:
            out[name] = list(value["choices"])
        elif "text" in value:
            text = value["text"]
            out[name] = [t for t in (text if isinstance(text, list) else [text]) if isinstance(t, str)]
    return out


def _one_choice(values: dict[str, list[Any]], name: str, allowed: tuple[str, ...], required: bool) -> str | None:
    got = values.get(name) or []
    if not got:
        if required:
            raise AnnotationProblem(f"annotation has no {name}")
        return None
    if len(got) != 1 or got[0] not in allowed:
        raise AnnotationProblem(f"unknown {name} value {got!r} (expected one of {', '.join(allowed)})")
    return str(got[0])


def _text(values: dict[str, list[Any]], name: str) -> str | None:
    text = "\n".join(v for v in values.get(name) or [] if v).strip()
    return text or None


def parse_review(result: list[dict[str, Any]], proposed: str | None) -> dict[str, Any]:
    """Fields of one review annotation; raises AnnotationProblem for anything unusable."""
    v = _values(result)
    verdict = _one_choice(v, "verdict", configs.VERDICTS, True)
    corrected = _text(v, "answer")
    if verdict == "fix" and not corrected:
        raise AnnotationProblem("verdict fix without a corrected answer")
    return {"verdict": verdict, "answer": corrected if verdict == "fix" else None,
            "knowledge_type": _one_choice(v, "knowledge_type", configs.KNOWLEDGE_TYPES, False),
            "search_label": _one_choice(v, "search", configs.SEARCH_NEEDS, False),
            "comment": _text(v, "comment"), "proposed_answer": proposed}


def parse_manual(result: list[dict[str, Any]]) -> dict[str, Any]:
    """Fields of one written item; raises AnnotationProblem for anything unusable."""
    v = _values(result)
    question, answer = _text(v, "question"), _text(v, "answer")
    if not question:
        raise AnnotationProblem("written item has no question")
    if not answer:
        raise AnnotationProblem("written item has no answer")
    aliases = [a.strip() for a in (_text(v, "aliases") or "").splitlines() if a.strip()]
    return {"verdict": "manual", "question": question, "answer": answer, "aliases": aliases or None,
            "knowledge_type": _one_choice(v, "knowledge_type", configs.KNOWLEDGE_TYPES, True)}
