"""Turn one Label Studio export into fvqa fields, or say exactly why a piece of it cannot be used.

Every task and annotation is checked against the shape fvqa relies on before any field is read;
fields fvqa does not use are allowed and ignored. A problem raises `AnnotationProblem` with a
reason code (`fvqa.reasons`, stage `annotate`: it becomes the `rejects` reason, so rejects group by
it) and a detail naming the field and the value. The control names come from `configs`; a value outside the listed choices is a reject
reason, never a guess. Values are only ever looked at to a fixed depth and shown through
`show`, so a hostile, deeply nested value cannot raise RecursionError.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fvqa.annotation import configs

MAX_ID = 2**63 - 1  # ids are BIGINT columns
MAX_TEXT = 20_000  # characters of one text control (question, answer, aliases, comment)
CHOICE_CONTROLS = ("verdict", "knowledge_type", "search")
TEXT_CONTROLS = ("answer", "comment", "question", "aliases")
_DIGITS = re.compile(r"[0-9]{1,19}")


class AnnotationProblem(ValueError):
    """A task or annotation that cannot be used: a fixed `reason` (the reject reason) and a `detail`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def show(value: Any, limit: int = 300) -> str:
    """A short JSON rendering of any value for a reject detail (never raises, never recurses deeply)."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (RecursionError, ValueError, TypeError):
        text = f"<{type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def as_id(value: Any) -> int | None:
    """A Label Studio id (a non-negative integer, or its decimal string), or None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    return value if isinstance(value, int) and 0 <= value <= MAX_ID else None


def _timestamp(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= 64:
        try:
            datetime.fromisoformat(value)
            return value
        except ValueError:
            pass
    raise AnnotationProblem("wrong_type", f"annotation {name} is not a timestamp: {show(value)}")


def _seconds(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond float range
            seconds = math.inf
        if math.isfinite(seconds):
            return seconds
    raise AnnotationProblem("wrong_type", f"annotation lead_time is not a number: {show(value)}")


@dataclass(frozen=True)
class Task:
    """The parts of one exported task fvqa reads."""

    id: int
    data: Any  # checked per annotation (`rounds.pull`): what it must hold depends on the round kind
    annotations: list[Any]


@dataclass(frozen=True)
class Annotation:
    """The parts of one exported annotation fvqa reads (`result` is checked later, per round kind)."""

    id: int
    result: list[Any]
    user_id: int | None  # None: anonymous (no `completed_by`)
    user_email: str | None
    lead_time: float | None
    created_at: str | None
    updated_at: str | None


def task_shape(raw: Any) -> Task:
    """Check one exported task: an object with an integer id and a list of annotations."""
    if not isinstance(raw, dict):
        raise AnnotationProblem("wrong_type", f"task is not an object: {show(raw)}")
    tid = as_id(raw.get("id"))
    if tid is None:
        raise AnnotationProblem("wrong_type", f"task id is not an integer: {show(raw.get('id'))}")
    if "annotations" not in raw:
        raise AnnotationProblem("field_missing", "task has no annotations list")
    annotations = raw["annotations"]
    if not isinstance(annotations, list):
        raise AnnotationProblem("wrong_type", f"task annotations is not a list: {show(annotations)}")
    return Task(tid, raw.get("data"), annotations)


def annotation_id(raw: Any) -> int:
    """The id of one exported annotation (checked first: rejects and duplicates are keyed by it)."""
    if not isinstance(raw, dict):
        raise AnnotationProblem("wrong_type", f"annotation is not an object: {show(raw)}")
    aid = as_id(raw.get("id"))
    if aid is None:
        raise AnnotationProblem("wrong_type", f"annotation id is not an integer: {show(raw.get('id'))}")
    return aid


def cancelled(raw: dict[str, Any]) -> bool:
    """Whether the annotator skipped the task (`was_cancelled`); anything but a boolean is a problem."""
    flag = raw.get("was_cancelled")
    if flag is None or isinstance(flag, bool):
        return bool(flag)
    raise AnnotationProblem("wrong_type", f"annotation was_cancelled is not a boolean: {show(flag)}")


def annotation_shape(raw: dict[str, Any], aid: int) -> Annotation:
    """Check the fields of one (not cancelled) annotation fvqa stores."""
    user = raw.get("completed_by")
    email = None
    if isinstance(user, dict):  # some exports expand the user: {"id": 3, "email": ...}
        email = user.get("email") if isinstance(user.get("email"), str) else None
        user = user.get("id")
        if user is None:
            raise AnnotationProblem("wrong_type", f"annotation completed_by is not a user id: {show(raw.get('completed_by'))}")
    uid = as_id(user)
    if user is not None and uid is None:
        raise AnnotationProblem("wrong_type", f"annotation completed_by is not a user id: {show(raw.get('completed_by'))}")
    lead = raw.get("lead_time")
    lead = None if lead is None else _seconds(lead)
    if "result" not in raw:
        raise AnnotationProblem("field_missing", "annotation has no result list")
    result = raw["result"]
    if not isinstance(result, list):
        raise AnnotationProblem("wrong_type", f"annotation result is not a list: {show(result)}")
    return Annotation(aid, result, uid, email, lead,
                      _timestamp(raw.get("created_at"), "created_at"), _timestamp(raw.get("updated_at"), "updated_at"))


def _texts(name: str, text: Any) -> list[str]:
    pieces = text if isinstance(text, list) else [text]
    if not all(isinstance(t, str) for t in pieces):
        raise AnnotationProblem("wrong_type", f"{name} text is not a string or a list of strings: {show(text)}")
    if sum(len(t) for t in pieces) > MAX_TEXT:
        raise AnnotationProblem("too_long",
                                f"{name} text: {sum(len(t) for t in pieces)} characters (limit {MAX_TEXT})")
    return pieces


def _values(result: list[Any]) -> dict[str, list[Any]]:
    """Values per control name; regions of controls fvqa does not define are ignored."""
    out: dict[str, list[Any]] = {}
    for region in result:
        if not isinstance(region, dict):
            raise AnnotationProblem("wrong_type", f"result item is not an object: {show(region)}")
        name = region.get("from_name")
        if not isinstance(name, str):
            raise AnnotationProblem("field_missing", f"result item has no from_name: {show(region)}")
        if name not in CHOICE_CONTROLS and name not in TEXT_CONTROLS:
            continue
        value = region.get("value")
        if not isinstance(value, dict):
            raise AnnotationProblem("wrong_type", f"{name} value is not an object: {show(value)}")
        if name in CHOICE_CONTROLS:
            if not isinstance(value.get("choices"), list):
                raise AnnotationProblem("wrong_type", f"{name} choices is not a list: {show(value.get('choices'))}")
            out.setdefault(name, []).extend(value["choices"])
        else:
            if "text" not in value:
                raise AnnotationProblem("field_missing", f"{name} has no text: {show(value)}")
            out.setdefault(name, []).extend(_texts(name, value["text"]))
    return out


def _one_choice(values: dict[str, list[Any]], name: str, allowed: tuple[str, ...], required: bool) -> str | None:
    got = values.get(name) or []
    if not got:
        if required:
            raise AnnotationProblem("field_missing", f"annotation has no {name}")
        return None
    bad = [g for g in got if not isinstance(g, str) or g not in allowed]
    if bad:
        raise AnnotationProblem("unknown_value", f"{name}: {show(bad)} (expected one of {', '.join(allowed)})")
    if len(set(got)) != 1:
        raise AnnotationProblem("multiple_values", f"{name}: {show(got)}")
    return str(got[0])


def _text(values: dict[str, list[Any]], name: str) -> str | None:
    text = "\n".join(v for v in values.get(name) or [] if v).strip()
    return text or None


def _same_text(a: str, b: str | None) -> bool:
    return b is not None and " ".join(a.split()) == " ".join(b.split())


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def parse_review(result: list[Any], proposed: str | None, *, question: str | None = None,
                 aliases: list[str] | None = None) -> dict[str, Any]:
    """Fields of one review annotation; raises AnnotationProblem for anything unusable.

    `question` and `aliases` are the values the task showed: an edit equal to them (a pre-filled
    field left as it was) is no edit, so both pre-fill modes read the same way. An aliases edit is
    the whole new list, one per line.
    """
    v = _values(result)
    verdict = _one_choice(v, "verdict", configs.VERDICTS, True)
    corrected = _text(v, "answer")
    if verdict == "fix" and not corrected:
        raise AnnotationProblem("fix_without_answer", "verdict fix without a corrected answer")
    new_q = _text(v, "question")
    if new_q is not None and _same_text(new_q, question):
        new_q = None
    new_a: list[str] | None = list(dict.fromkeys(_lines(_text(v, "aliases")))) or None
    if new_a is not None and aliases is not None and [" ".join(a.split()) for a in new_a] == [
            " ".join(a.split()) for a in aliases]:
        new_a = None
    return {"verdict": verdict, "answer": corrected if verdict == "fix" else None,
            "knowledge_type": _one_choice(v, "knowledge_type", configs.KNOWLEDGE_TYPES, False),
            "search_label": _one_choice(v, "search", configs.SEARCH_NEEDS, False),
            "comment": _text(v, "comment"), "proposed_answer": proposed,
            "question": new_q, "aliases": new_a, "proposed_question": question, "proposed_aliases": aliases}


def parse_manual(result: list[Any]) -> dict[str, Any]:
    """Fields of one written item; raises AnnotationProblem for anything unusable."""
    v = _values(result)
    question, answer = _text(v, "question"), _text(v, "answer")
    if not question:
        raise AnnotationProblem("field_missing", "written item has no question")
    if not answer:
        raise AnnotationProblem("field_missing", "written item has no answer")
    aliases = [a.strip() for a in (_text(v, "aliases") or "").splitlines() if a.strip()]
    return {"verdict": "manual", "question": question, "answer": answer, "aliases": aliases or None,
            "knowledge_type": _one_choice(v, "knowledge_type", configs.KNOWLEDGE_TYPES, True)}
