"""The offline demo's distillation teacher: a scripted stand-in that writes protocol turns.

DEMO STAND-IN, NOT A MODEL. The distill stage (`fvqa.pipelines.distill`, `distill.backend:
scripted-teacher`) uses it where a real build uses GPT-4o or a large Qwen behind an OpenAI-compatible
endpoint. It knows the demo world (`fvqa.demo.world`: every entity's facts) and is told each item's
search label and which entity its image shows (`TeacherHint`, from the `dataset` view), then
follows the label:

* search-free: it answers at once from the world's facts;
* image-search-required: it calls image search, then answers with the title of the returned page
  that shows the subject (the top title when none does, which the answer check then rejects);
* text-search-required: it recognises the subject, searches the web for the missing fact
  (`<name> <fact>`), and reads the fact out of the returned page summary;
* mixed: image search first, the subject's name from the returned titles, then a text search for
  the fact, read out of the returned summary.

Answers after a search come from the tool results in the conversation (titles, summaries), never
from the gold answer: when retrieval misses, the teacher is wrong and its attempt is rejected, as a
real teacher's would be. It plugs into the same rollout core as any generator (`fvqa.agent`), so
its turns go through the real search tools, limits and format rules.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvqa.errors import ConfigError
from fvqa.generators.base import Generation, Message, Request, text_of
from fvqa.protocol.images import image_bytes
from fvqa.protocol.turns import parse_turn
from fvqa.protocol.wire import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    IMAGE_SEARCH_TAG,
    REASON_CLOSE,
    REASON_OPEN,
    TEXT_SEARCH_CLOSE,
    TEXT_SEARCH_OPEN,
)

NAME = "scripted-teacher:demo-world"
STANDIN_NOTE = ("distill teacher is the SCRIPTED DEMO STAND-IN (fvqa.demo.teacher): it knows the demo "
                "world and follows each item's search label; set distill.backend=openai for a real teacher")

_TITLE = re.compile(r"^title: (.*)$", re.MULTILINE)
_TEXT_HIT = re.compile(r"^\d+\. \(link:[^)]*\) (.*)$", re.MULTILINE)
_COUNTRY_Q = re.compile(r"^Which country is this (.+?) from\?$")
_YEAR_Q = re.compile(r"^In which year did this (.+?) first appear\?$")
_MEASURE_Q = re.compile(r"^What is the (.+?) of this (.+?) in (.+?)\?$")

# A few phrasings per action, picked by the request's seed, so k attempts are not k copies.
_REASONS: dict[str, tuple[str, ...]] = {
    "direct": ("I recognise this {noun}: it is {name}, and I know the answer.",
               "This is {name}; I know this {noun} well enough to answer directly."),
    "image": ("I do not recognise this {noun}, so I search with the image.",
              "The {noun} in the image is unfamiliar to me; an image search should identify it."),
    "text": ("This is {name}, but I do not know its {fact}, so I search the web.",
             "I recognise {name}; its {fact} is a fact I need to look up."),
    "text_after_image": ("The image results show {name}; I still need its {fact}, so I search the web.",
                         "The results identify the {noun} as {name}; now I look up its {fact}."),
    "answer_image": ("The image search results show the same {noun}: {name}.",
                     "The top matching page is {name}, so that is the {noun} in the image."),
    "answer_text": ("The page about {name} gives its {fact}: {value}.",
                    "According to the search results, the {fact} of {name} is {value}."),
    "unsure": ("The results do not settle it; I answer with my best guess.",
               "I could not find it in the results, so I give my best guess."),
}


@dataclass(frozen=True)
class TeacherHint:
    """What the teacher is told about an item: its question, the entity its image shows, its label."""

    question: str
    entity: str
    search_label: str


@dataclass(frozen=True)
class Question:
    """What a demo question asks: the subject's name, or one fact (country / year / a measure)."""

    kind: str  # name | country | year | measure
    fact: str  # words for the search query and the reason ("country", "year", "wingspan")


def question_of(question: str) -> Question:
    """Classify a demo-world question (InfoSeek-style fact questions, else a name question)."""
    q = question.strip()
    if _COUNTRY_Q.match(q):
        return Question("country", "country")
    if _YEAR_Q.match(q):
        return Question("year", "year")
    m = _MEASURE_Q.match(q)
    if m:
        return Question("measure", m.group(1))
    return Question("name", "name")


def fact_of(entity: dict[str, Any], q: Question) -> str:
    """The world's value of what `q` asks about `entity` (what the teacher 'knows')."""
    if q.kind == "country":
        return str(entity["country"])
    if q.kind == "year":
        return str(entity["year"])
    if q.kind == "measure":
        return f"{float(entity['measure_value']):g}"
    return str(entity["name"])


def read_fact(summary: str, q: Question) -> str | None:
    """Read the asked fact out of a page summary the text search returned (None: not there)."""
    if q.kind == "country":
        m = re.search(r"\bfrom ([A-Z][\w-]*(?: [A-Z][\w-]*)*)", summary)
    elif q.kind == "year":
        m = re.search(r"\bknown since (\d{3,4})\b", summary) or re.search(r"\bin (\d{4})\b", summary)
    elif q.kind == "measure":
        m = re.search(rf"\bIts {re.escape(q.fact)} is (-?[\d.]+?)(?:\.?\s|\.?$)", summary)
    else:
        return None
    return m.group(1) if m else None


def load_entities(world: Path | str) -> dict[str, dict[str, Any]]:
    """Normalised entity name -> the world's entity record (`entities.jsonl`)."""
    path = Path(world) / "entities.jsonl"
    if not path.is_file():
        raise ConfigError(f"distill.backend=scripted-teacher needs the demo world's entities.jsonl; not found at {path}")
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["name"].strip().lower()] = row
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _first_image(msg: Message) -> bytes | None:
    content = msg.get("content")
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict) and part.get("type") == "image":
            return image_bytes(part["image"])
    return None


class ScriptedTeacher:
    """A `Generator` over the demo world (see the module docstring); deterministic for a seed."""

    name = NAME

    def __init__(self, world: Path | str, hints: dict[str, list[TeacherHint]]) -> None:
        """`hints`: sha256 of an item's image -> the hints of the items showing that image."""
        self.entities = load_entities(world)
        self.hints = hints

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        return [self._one(r) for r in requests]

    # -- one turn ------------------------------------------------------------------------------
    def _hint(self, messages: Sequence[Message]) -> TeacherHint | None:
        image = _first_image(messages[0]) if messages else None
        if image is None:
            return None
        opening = text_of(messages[0]).strip()
        for hint in self.hints.get(_sha(image), ()):
            if opening.endswith(hint.question.strip()):
                return hint
        return None

    def _one(self, req: Request) -> Generation:
        hint = self._hint(req.messages)
        if hint is None:
            return Generation(error="scripted_teacher: the item is not one the distill stage described")
        seed = req.sampling.seed or 0
        text = self._turn(hint, req.messages, seed)
        prompt_chars = sum(len(text_of(m)) for m in req.messages)
        return Generation(text=text, prompt_tokens=max(1, prompt_chars // 4), completion_tokens=max(1, len(text) // 4),
                          finish_reason="stop")

    def _turn(self, hint: TeacherHint, messages: Sequence[Message], seed: int) -> str:
        entity = self.entities.get(hint.entity.strip().lower())
        q = question_of(hint.question)
        noun = entity["noun"] if entity else "subject"
        name = entity["name"] if entity else hint.entity
        n_done = sum(m.get("role") == "assistant" for m in messages)
        results = text_of(messages[-1]) if n_done else ""
        label = hint.search_label
        say = _Say(seed, noun=noun, name=name, fact=q.fact)

        if n_done == 0:
            if label == "search_free" and entity is not None:
                return say.answer("direct", fact_of(entity, q))
            if label in ("image_search_required", "mixed_search_required"):
                return say.reason("image") + IMAGE_SEARCH_TAG
            if label == "text_search_required":
                return say.reason("text") + _text_search(f"{name} {q.fact}")
            return say.answer("unsure", name)
        titles = [t.strip() for t in _TITLE.findall(results)]
        summaries = [s.strip() for s in _TEXT_HIT.findall(results)]
        if titles:  # after the image search: which returned page shows the subject?
            # the page showing this very subject; else one of the same kind of thing; else the top hit
            seen = next((t for t in titles if t.lower() == name.lower()), None) or next(
                (t for t in titles if noun.lower() in t.lower().split()), titles[0])
            if q.kind == "name" or label == "image_search_required":
                return say.answer("answer_image", seen, name=seen)
            return say.reason("text_after_image", name=seen) + _text_search(f"{seen} {q.fact}")
        if summaries:  # after the text search: read the fact from the page about the subject
            searched = _query_of(messages)
            subject = searched.removesuffix(q.fact).strip() or name
            page = next((s for s in summaries if s.lower().startswith(subject.lower())), summaries[0])
            value = read_fact(page, q)
            if value is not None:
                return say.answer("answer_text", value, name=subject, value=value)
        return say.answer("unsure", name)  # a search error or nothing readable: the teacher guesses


def _text_search(query: str) -> str:
    return f"{TEXT_SEARCH_OPEN}{query}{TEXT_SEARCH_CLOSE}"


def _query_of(messages: Sequence[Message]) -> str:
    """The query of the last text search the conversation made (read by the protocol's parser)."""
    for msg in reversed(messages):
        if msg.get("role") == "assistant":
            turn = parse_turn(text_of(msg))
            if turn.kind == "text_search":
                return turn.query or ""
    return ""


class _Say:
    """Reason texts of one turn, the phrasing picked by the seed."""

    def __init__(self, seed: int, **fields: str) -> None:
        self.seed, self.fields = seed, fields

    def reason(self, key: str, **extra: str) -> str:
        options = _REASONS[key]
        text = options[self.seed % len(options)].format(**{**self.fields, "value": "", **extra})
        return f"{REASON_OPEN}{text}{REASON_CLOSE}"

    def answer(self, key: str, answer: str, **extra: str) -> str:
        return self.reason(key, **extra) + f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def hints_from_rows(rows: Sequence[dict[str, Any]]) -> dict[str, list[TeacherHint]]:
    """Image sha256 -> hints, from `dataset` rows (entity: the concept, else the InfoSeek entity)."""
    out: dict[str, list[TeacherHint]] = {}
    for r in rows:
        entity = r.get("concept") or r.get("entity_text") or ""
        if r.get("image_sha256"):
            out.setdefault(r["image_sha256"], []).append(
                TeacherHint(r["question"], entity, r.get("search_label") or ""))
    return out


__all__ = ["NAME", "STANDIN_NOTE", "ScriptedTeacher", "TeacherHint", "hints_from_rows", "question_of", "read_fact"]
