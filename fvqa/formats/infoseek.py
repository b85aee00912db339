"""The official InfoSeek file format, read by both the ``infoseek`` build stage and evaluation.

A split is ``infoseek_{split}.jsonl`` (one JSON object per line: ``data_id, image_id, question,
answer, answer_eval, data_split``) with two companion files named after it, ``*_withkb.jsonl``
(``data_id, entity_id, entity_text``) and ``*_qtype.jsonl`` (``data_id, question_type``), and an
image directory holding ``<image_id>.<ext>``. ``answer_eval`` holds the gold answers: strings, or
for numerical questions ``{"wikidata": value, "range": [low, high]}`` dicts (alone or in a list).

It lives here, not in the stage, so that evaluation can read the format without depending on the
build pipelines. The lines themselves are read with ``fvqa.formats.jsonl.read_jsonl`` (one bad-line
policy for every JSONL file; the stage's million-line files use its ``parse_line_fast`` and
``fvqa.formats.shape.shape_checker``, the same verdicts, faster). Nothing here knows about configs,
stages or workspaces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from fvqa.formats.shape import Shape, found

MAIN_FIELDS = ("data_id", "image_id", "question", "answer", "answer_eval", "data_split")
"""The fields of a line of the main ``infoseek_{split}.jsonl`` file."""

WITHKB_SUFFIX = "_withkb"
WITHKB_FIELDS = ("entity_id", "entity_text")
"""The fields the ``*_withkb`` companion adds to a data_id."""

QTYPE_SUFFIX = "_qtype"
QTYPE_FIELDS = ("question_type",)
"""The fields the ``*_qtype`` companion adds to a data_id."""

_ID = "a string or integer id"
_TEXT = "a string"
_ANSWER = "a string or number, or a list of them"


class MainLine(Shape):
    """The declared shape of a main-file line (types only; emptiness is the reader's rule)."""

    data_id: str | int | None = Field(None, description=_ID)
    image_id: str | int | None = Field(None, description=_ID)
    question: str | None = Field(None, description=_TEXT)
    answer: str | int | float | list[str | int | float] | None = Field(None, description=_ANSWER)
    answer_eval: Any = None  # its rule is check_answer_eval (strings or numeric range dicts)
    data_split: str | None = Field(None, description=_TEXT)


class WithkbLine(Shape):
    """A ``*_withkb`` line."""

    data_id: str | int | None = Field(None, description=_ID)
    entity_id: str | int | None = Field(None, description=_ID)
    entity_text: str | None = Field(None, description=_TEXT)


class QtypeLine(Shape):
    """A ``*_qtype`` line."""

    data_id: str | int | None = Field(None, description=_ID)
    question_type: str | None = Field(None, description=_TEXT)


COMPANION_SHAPES: dict[str, type[Shape]] = {WITHKB_SUFFIX: WithkbLine, QTYPE_SUFFIX: QtypeLine}


IMAGE_EXTS = (".jpg", ".jpeg", ".JPEG", ".JPG", ".png", ".webp")


def companion(main: Path, suffix: str) -> Path:
    """The companion file of a main jsonl: ``infoseek_val.jsonl`` + ``_qtype`` -> ``infoseek_val_qtype.jsonl``."""
    return main.with_name(main.stem + suffix + main.suffix)


def check_answer_eval(value: Any) -> str | None:
    """Why an `answer_eval` is unusable, or None. Strings, and numeric `{"wikidata", "range"}` dicts
    (alone or inside a list) are accepted."""
    items = value if isinstance(value, list) else [value]
    if value is None or (isinstance(value, list) and not value):
        return None  # absent: the answer alone is the gold
    for item in items:
        if isinstance(item, str | int | float) and not isinstance(item, bool):
            continue
        if isinstance(item, dict):
            wikidata = item.get("wikidata")
            if wikidata is not None and (isinstance(wikidata, bool) or not isinstance(wikidata, str | int | float)):
                return f"numeric answer_eval's wikidata must be a number or string, got {found(wikidata)}"
            rng = item.get("range")
            if rng is None:
                if "wikidata" in item:
                    continue
                return f"numeric answer_eval without wikidata or range: {json.dumps(item)[:200]}"
            ok = (isinstance(rng, list) and len(rng) == 2
                  and all(isinstance(x, int | float) and not isinstance(x, bool) for x in rng) and rng[0] <= rng[1])
            if not ok:
                return f"numeric range must be [low, high] with low <= high, got {json.dumps(rng)[:200]}"
            continue
        return f"answer_eval entries must be strings or numeric dicts, got {type(item).__name__}"
    return None


def aliases_of(answers: list[str], answer_eval: Any) -> list[str]:
    """The answer(s) first, then the string forms in answer_eval (numeric dicts: their wikidata value)."""
    out: list[str] = []
    items = answer_eval if isinstance(answer_eval, list) else [answer_eval] if answer_eval is not None else []
    for a in [*answers, *items]:
        if isinstance(a, dict):
            a = a.get("wikidata")
            a = None if a is None else f"{a:g}" if isinstance(a, float) else str(a)
        if isinstance(a, int | float) and not isinstance(a, bool):
            a = f"{a:g}"
        if isinstance(a, str) and a.strip() and a.strip() not in out:
            out.append(a.strip())
    return out


def find_image(image_dir: Path, pattern: str, image_id: str) -> Path | None:
    """The image file for an image_id: the configured pattern, then common extensions."""
    first = image_dir / pattern.format(image_id=image_id)
    if first.is_file():
        return first
    for ext in IMAGE_EXTS:
        path = image_dir / f"{image_id}{ext}"
        if path.is_file():
            return path
    return None
