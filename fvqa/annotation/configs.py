"""Label Studio label configs (XML): reviewing a pipeline item, and writing a new (manual) item.

A review task's data carries: image, question, answer, answer_text, aliases (list), aliases_text,
context, source_html (a link to the source page), passage (`rounds.task_data` builds it).

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


def review_config(prefill: bool = False) -> str:
    """Image, question, proposed answer and the evidence it came from (source page link, title,
    passage); verdict, corrected answer, question and aliases, knowledge type, search need, comment.

    The evidence and the current question/aliases are read-only objects. Without `prefill` the
    edit fields start empty ("leave empty if fine"), so an untouched task is never mistaken for an
    edit; with it they start from the current values (Label Studio predictions, see `rounds`).
    """
    if prefill:
        q_header = "Question (pre-filled with the current one: edit it if wrong)"
        a_header = "Accepted answers (pre-filled, one per line: edit the list if wrong)"
    else:
        q_header = "Corrected question (leave empty if fine)"
        a_header = "Corrected accepted answers, one per line: the whole new list (leave empty if fine)"
    return (
        "<View>"
        '<Image name="image" value="$image" maxWidth="640px"/>'
        '<Header value="$question"/>'
        '<Text name="proposed" value="$answer_text"/>'
        '<Text name="aliases_shown" value="$aliases_text"/>'
        '<Text name="context" value="$context"/>'
        '<Header value="Evidence: the source page and the passage the question was written from" size="5"/>'
        '<HyperText name="source" value="$source_html" inline="true" clickableLinks="true" selectionEnabled="false"/>'
        '<View style="max-height: 240px; overflow-y: auto; border: 1px solid #ddd; padding: 4px">'
        '<Text name="passage" value="$passage"/>'
        "</View>"
        + _choices("verdict", "image", VERDICTS, required=True, header="Verdict on this item")
        + '<Header value="Corrected answer (only when the verdict is fix)"/>'
        '<TextArea name="answer" toName="image" maxSubmissions="1" editable="true"/>'
        f'<Header value={quoteattr(q_header)}/>'
        '<TextArea name="question" toName="image" maxSubmissions="1" editable="true"/>'
        f'<Header value={quoteattr(a_header)}/>'
        '<TextArea name="aliases" toName="image" editable="true"/>'
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
