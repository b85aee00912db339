"""Question generation for a visual concept: the prompt, the reply model, and offline templates.

The prompt is our own wording of the paper's App. D.1 rules; a config may replace it with a file
holding the placeholders {concept}, {page_title} and {page_text}. The image goes with the prompt.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from fvqa.errors import ConfigError
from fvqa.formats.verl import candidate_answers
from fvqa.llm.images import image_part
from fvqa.schema import KnowledgeType

DEFAULT_PROMPT = """\
You write one factual question-answer pair about a photo, for a visual question answering dataset.

The photo shows this visual concept: {concept}
It was found on a web page titled: {page_title}
Text from that page (may be noisy or incomplete):
<page>
{page_text}
</page>

Write the pair as a curious person looking at the photo would ask it. Rules:
1. The answer must contain the concept "{concept}" word for word (it may add a few words, such as a
   full name); keep it short, factual and checkable against the page.
2. The question must start with "Who", "What" or "Where".
3. The question must not mention the concept itself, nor background facts tied so closely to it that
   they give the answer away: someone must recognise what the photo shows to answer it.
4. The question must be about what is visible in the photo, phrased naturally.
Also give other correct spellings or names of the answer as aliases (an empty list if there are none).

Reply with a JSON object only: {{"question": "...", "answer": "...", "aliases": ["...", "..."]}}"""

MAX_PAGE_CHARS = 3000


class QAReply(BaseModel):
    """What the model must return."""

    question: str
    answer: str
    aliases: list[str] = Field(default_factory=list)


def load_prompt(path: Path | None) -> str:
    """The prompt template: the built-in one, or a file named in config (checked for its placeholders)."""
    if path is None:
        return DEFAULT_PROMPT
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"generate.prompt_path: cannot read {path}: {exc}") from exc
    if "{concept}" not in text:
        raise ConfigError(f"generate.prompt_path {path}: the prompt must contain the placeholder {{concept}}")
    try:
        text.format(concept="", page_title="", page_text="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"generate.prompt_path {path}: unknown placeholder or stray brace ({exc!r}); "
            "use {concept}, {page_title}, {page_text} and write literal braces as {{ }}"
        ) from exc
    return text


def prompt_hash(prompt: str) -> str:
    """Short hash recorded in provenance, so rows say which prompt made them."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


def build_messages(prompt: str, concept: str, page_title: str | None, page_text: str | None,
                   image: bytes | Path | None) -> list[dict[str, Any]]:
    """One user message: the filled prompt and (when present) the image."""
    text = prompt.format(concept=concept, page_title=page_title or "(unknown)",
                         page_text=(page_text or "(no text)")[:MAX_PAGE_CHARS])
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image is not None:
        content.append(image_part(image))
    return [{"role": "user", "content": content}]


def clean_aliases(answer: str, aliases: list[str]) -> list[str]:
    """Answer first, then the aliases, under the one candidate-answer rule
    (``fvqa.formats.verl.candidate_answers``: white space normalised, empties and exact duplicates
    dropped), so a generated item's list is the one its exported and training rows carry."""
    return candidate_answers([answer, *aliases])


# Offline templates: the answer is the concept; the question names only its kind.
TEMPLATES: dict[str, list[str]] = {
    KnowledgeType.Place: ["What is the name of the landmark shown in this photo?",
                          "What place is shown in this picture?"],
    KnowledgeType.Nature: ["What species is shown in this photo?", "What is the name of the living thing in this picture?"],
    KnowledgeType.People: ["Who is the person shown in this photo?", "Who is pictured here?"],
    KnowledgeType.Arts: ["What work of art is shown in this picture?", "What is the title of the work shown here?"],
    KnowledgeType.Industry: ["What machine or product is shown in this photo?",
                             "What is the name of the vehicle or product in this picture?"],
    KnowledgeType.Science: ["What scientific specimen is shown in this photo?",
                            "What is the name of the material shown in this picture?"],
    KnowledgeType.Entities: ["What object is shown in this photo?", "What is the name of the object in this picture?"],
    KnowledgeType.Events: ["What event is shown in this photo?", "What is the name of the event pictured here?"],
}
GENERIC = ["What is shown in this photo?", "What is the name of the thing in this picture?"]


def template_question(concept_id: str, category: str | None) -> str:
    """A deterministic template question for a concept of a category (generic when unknown)."""
    options = TEMPLATES.get(category or "", GENERIC)
    pick = int(hashlib.sha256(concept_id.encode()).hexdigest(), 16) % len(options)
    return options[pick]
