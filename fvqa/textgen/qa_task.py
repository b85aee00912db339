"""Question generation as an LLM task: a concept's page and image in, a rule-checked QA pair out.

The prompt text and reply model live in `fvqa.textgen.qa`, the App. D.1 rules in
`fvqa.textgen.rules`. `checked_pair` is the one gate every pair passes, whatever made it (the LLM
task's parser and the offline template backend both call it): a broken rule is a reject naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fvqa.llm.task import LLMTask, Reject, Reply, Request
from fvqa.textgen import qa
from fvqa.textgen.rules import question_type, rule_violations


@dataclass(frozen=True)
class ConceptPage:
    """What a question is written from: the concept, its crawled page, and the image (a path)."""

    concept: str
    page_title: str | None
    page_text: str | None
    image: Path | None = None


@dataclass(frozen=True)
class QAPair:
    """A pair that passed the rules: stripped text, gold aliases (answer first), question type."""

    question: str
    answer: str
    aliases: list[str]
    question_type: str | None


def checked_pair(concept: str, question: str, answer: str, aliases: list[str], *, raw: str,
                 max_answer_words: int = 12) -> QAPair:
    """The pair if it keeps every rule, else `Reject("rule_violated")` naming the first broken rule."""
    question, answer = question.strip(), answer.strip()
    broken = rule_violations(question, answer, concept, max_answer_words=max_answer_words)
    if broken:
        raise Reject("rule_violated",
                     f"{broken[0]}\nbroken: {'; '.join(broken)}\nconcept: {concept}\nraw reply: {raw}")
    return QAPair(question, answer, qa.clean_aliases(answer, aliases), question_type(question))


class QATask(LLMTask[ConceptPage, QAPair]):
    """GPT-4o (or any OpenAI-wire model) writes one QA pair per concept from its page and photo."""

    name = "generate"
    completion_tokens = 60

    def __init__(self, prompt: str = qa.DEFAULT_PROMPT, *, max_answer_words: int = 12,
                 send_image: bool = True) -> None:
        self.prompt = prompt
        self.prompt_hash = qa.prompt_hash(prompt)
        self.max_answer_words = max_answer_words
        self.send_image = send_image

    def format(self, item: ConceptPage) -> Request:
        image = item.image if self.send_image else None
        return Request(qa.build_messages(self.prompt, item.concept, item.page_title, item.page_text, image),
                       qa.QAReply)

    def parse(self, item: ConceptPage, reply: Reply) -> QAPair:
        v = reply.value
        return checked_pair(item.concept, v.question, v.answer, v.aliases, raw=reply.text,
                            max_answer_words=self.max_answer_words)

    def typical_prompt_tokens(self) -> float:
        """The prompt with a full page excerpt, and the image when one is sent."""
        return (len(self.prompt) + qa.MAX_PAGE_CHARS) / 4 + (self.image_tokens if self.send_image else 0)
