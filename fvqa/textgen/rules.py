"""The paper's QA rules (App. D.1), checked in code on every generated pair.

An LLM told to follow a rule usually does, not always: each rule is verified after the reply and a
violation names the rule, so the `rejects` table says exactly which rule a pair broke.
"""

from __future__ import annotations

import re
import unicodedata

from fvqa.answers import normalize_answer

QUESTION_WORDS = ("Who", "What", "Where")
_START = re.compile(r"^\W*(who|what|where)\b", re.IGNORECASE | re.UNICODE)
_POSSESSIVE = re.compile(r"(\w)['\u2019]s\b", re.UNICODE)


def norm(text: str) -> str:
    """Unicode-safe SQuAD normalisation (NFKC + casefold first, so 'Ｅiffel' == 'eiffel'); a possessive
    's is dropped so "the Sonata's key" still names "Sonata"."""
    text = _POSSESSIVE.sub(r"\1", unicodedata.normalize("NFKC", text).casefold())
    return normalize_answer(text)


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words after normalisation."""
    t, p = norm(text), norm(phrase)
    return bool(p) and f" {p} " in f" {t} "


def question_type(question: str) -> str | None:
    """'Who' / 'What' / 'Where' from the question's first word, else None."""
    m = _START.match(question.strip())
    return m.group(1).capitalize() if m else None


def rule_violations(question: str, answer: str, concept: str, *, max_answer_words: int = 12) -> list[str]:
    """Names of the rules a QA pair breaks (empty when it is acceptable)."""
    broken = []
    if not question.strip():
        broken.append("question is empty")
    elif question_type(question) is None:
        broken.append("question must start with Who, What or Where")
    if not answer.strip():
        broken.append("answer is empty")
    elif not contains_phrase(answer, concept):
        broken.append("answer must contain the concept")
    if question.strip() and contains_phrase(question, concept):
        broken.append("question must not contain the concept")
    if answer.strip() and len(answer.split()) > max_answer_words:
        broken.append(f"answer must be at most {max_answer_words} words")
    return broken
