"""Label Studio label configs (XML): reviewing a pipeline item, and writing a new (manual) item.

The control names here are the contract with `parse.parse_review` / `parse.parse_manual`: a
value outside the listed choices is rejected on pull, never guessed.
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

from fvqa.schema import KnowledgeType, SearchLabel

VERDICTS = ("keep", "fix", "reject")
KNOWLEDGE_TYPES = tuple(k.value for k in KnowledgeType)
SEARCH_NEEDS = tuple(s.value for s in SearchLabel)


def _choices(name: str, to_name: str, values: tuple[str, ...], *, required: bool, header: str) -> str:
    opts = "".join(f"<Choice value={quoteattr(v)}/>" for v in values)
    req = ' required="true"' if required else ""
    return (f'<Header value={quoteattr(header)}/>'
            f'<Choices name="{name}" toName="{to_name}" choice="single"{req}>{opts}</Choices>')


def review_config() -> str:
    """Image, question and proposed answer; verdict, corrected answer, knowledge type, search need, comment."""
    return (
        "<View>"
        '<Image name="image" value="$image" maxWidth="640px"/>'
        '<Header value="$question"/>'
        '<Text name="proposed" value="$answer_text"/>'
        '<Text name="context" value="$context"/>'
        + _choices("verdict", "image", VERDICTS, required=True, header="Verdict on this item")
        + '<Header value="Corrected answer (only when the verdict is fix)"/>'
        '<TextArea name="answer" toName="image" maxSubmissions="1" editable="true"/>'
        + _choices("knowledge_type", "image", KNOWLEDGE_TYPES, required=False, header="Knowledge type")
        + _choices("search", "image", SEARCH_NEEDS, required=False,
                   header="Search needed to answer? (search_free = answerable from the model's knowledge)")
        + '<Header value="Comment (optional)"/>'
        '<TextArea name="comment" toName="image" maxSubmissions="1" editable="true"/>'
        "</View>"
    )


def manual_config() -> str:
    """Write a new item for an uploaded image: question, answer, aliases, knowledge type."""
    return (
        "<View>"
        '<Image name="image" value="$image" maxWidth="640px"/>'
        '<Header value="Write a Who/What/Where question about this image that needs factual knowledge"/>'
        '<TextArea name="question" toName="image" maxSubmissions="1" editable="true" required="true"/>'
        '<Header value="Answer"/>'
        '<TextArea name="answer" toName="image" maxSubmissions="1" editable="true" required="true"/>'
        '<Header value="Other accepted answers (one per line, optional)"/>'
        '<TextArea name="aliases" toName="image" editable="true"/>'
        + _choices("knowledge_type", "image", KNOWLEDGE_TYPES, required=True, header="Knowledge type")
        + "</View>"
    )
