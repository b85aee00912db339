"""Upstream's wire strings and how search results and tool turns are rendered for the model.

Tags and result strings are an interface shared with upstream (EvolvingLMMs-Lab/multimodal-search-r1)
and are reproduced exactly, so that upstream's released checkpoints can be evaluated and its reward
reproduced. Everything here is pure: no I/O, no search calls (those are `fvqa.protocol.episode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from fvqa.protocol.images import decode_or_none

IMAGE_SEARCH_TAG = "<search><img></search>"
TEXT_SEARCH_OPEN, TEXT_SEARCH_CLOSE = "<text_search>", "</text_search>"
REASON_OPEN, REASON_CLOSE = "<reason>", "</reason>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
STOP_STRINGS: tuple[str, ...] = ("</search>", TEXT_SEARCH_CLOSE)
"""Generation stops right after a search tag so the tool runs before the model goes on (upstream);
every driver (probe, eval, the veRL loop, the demo's sampler) stops on these."""
IMAGE_PLACEHOLDER = "<image>"
"""Where the user's image sits in an opening prompt (veRL's and upstream's dataset convention)."""

QWEN_IMAGE_PAD = "<|vision_start|><|image_pad|><|vision_end|>"
"""Upstream's per-thumbnail placeholder inside image-search results (Qwen2.5-VL vision tokens)."""

IMAGE_RESULTS_HEADER = (
    "[Image Search Results] The result of the image search consists of web page information related to "
    "the image from the user's original question. Each result includes the main image from the web page "
    "and its title, ranked in descending order of search relevance, as demonstrated below:\n"
)
TEXT_RESULTS_HEADER = (
    "[Text Search Results] Below are the text summaries of the most relevant webpages related to your "
    "query, ranked in descending order of relevance:\n"
)
# Upstream's error strings, typo ("capaibilities") included: released checkpoints were trained on it.
IMAGE_SEARCH_ERROR = (
    "[Image Search Results] There is an error encountered in performing search. "
    "Please reason with your own capaibilities."
)
TEXT_SEARCH_ERROR = (
    "[Text Search Results] There is an error encountered in performing search. "
    "Please reason with your own capaibilities."
)
IMAGE_HIT_TEMPLATE = "{rank}. image: {placeholder}\ntitle: {title}\n"
TEXT_HIT_TEMPLATE = "{rank}. (link:{url}) {summary}\n"
MISSING_THUMBNAIL = "[thumbnail unavailable]"


@dataclass(frozen=True)
class ImageHit:
    """One image-search result: the page title and its main image (bytes, a PIL image, or missing)."""

    title: str
    url: str = ""
    thumbnail: bytes | Image.Image | None = None


@dataclass(frozen=True)
class TextHit:
    """One text-search result: a page link and a summary of the page with respect to the question."""

    url: str
    title: str = ""
    summary: str = ""


def render_image_results(
    hits: Sequence[ImageHit], placeholder: str = QWEN_IMAGE_PAD
) -> tuple[str, list[Image.Image]]:
    """Upstream's image-search result text, one ``placeholder`` per returned image, in order.

    No hits renders upstream's error string (it tells the model to reason on its own). A hit whose
    thumbnail is missing or undecodable keeps its title and gets ``[thumbnail unavailable]`` in
    place of the placeholder, so placeholders and returned images always pair up one to one.
    """
    if not hits:
        return IMAGE_SEARCH_ERROR, []
    text, images = IMAGE_RESULTS_HEADER, []
    for rank, hit in enumerate(hits, start=1):
        img = decode_or_none(hit.thumbnail)
        if img is not None:
            images.append(img)
        slot = placeholder if img is not None else MISSING_THUMBNAIL
        text += IMAGE_HIT_TEMPLATE.format(rank=rank, placeholder=slot, title=hit.title.strip())
    return text, images


def render_text_results(hits: Sequence[TextHit]) -> str:
    """Upstream's text-search result text: header, then ``N. (link:URL) summary`` per page."""
    if not hits:
        return TEXT_SEARCH_ERROR
    body = "".join(
        TEXT_HIT_TEMPLATE.format(rank=rank, url=hit.url.strip(), summary=hit.summary.strip())
        for rank, hit in enumerate(hits, start=1)
    )
    return TEXT_RESULTS_HEADER + body


def is_search_error(result_text: str) -> bool:
    """True for upstream's error results, which are passed back bare (see ``tool_response_text``)."""
    return result_text.startswith((IMAGE_SEARCH_ERROR, TEXT_SEARCH_ERROR))


def to_content_parts(text: str, images: Sequence[Any], placeholder: str) -> list[dict[str, Any]]:
    """Split text at each ``placeholder`` into OpenAI-style text/image parts (for chat endpoints)."""
    pieces = text.split(placeholder)
    if len(pieces) - 1 != len(images):
        raise ValueError(
            f"text has {len(pieces) - 1} image placeholder(s) {placeholder!r} but {len(images)} image(s) "
            "were given; they must pair up one to one"
        )
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(images):
            parts.append({"type": "image", "image": images[i]})
    return parts


def opening_user_text(prompt: str, question: str) -> str:
    """First user message: the opening prompt (with its ``<image>`` placeholder) then the question.

    Upstream concatenates without a separator; its prompt ends in ``"<image> "`` and ours in
    ``"<image>\\n"``, so both read naturally.
    """
    return prompt + question.strip()


def rag_query_user_text(prompt: str, question: str, image_results: str) -> str:
    """First user message of the fixed RAG workflow (paper App. D.5): prompt, question, then the
    image-search results that the workflow always fetches, in the same ``<information>`` wrapper."""
    return (
        opening_user_text(prompt, question)
        + "\nSearched results: <information>"
        + image_results
        + "</information>"
    )


def tool_response_text(result_text: str, question: str, follow_up: str) -> str:
    """Next user turn after a tool call, exactly as upstream's rollout builds it.

    A search error is passed back bare (no ``<information>``, question or follow-up prompt),
    because that is what upstream's rollout does and released checkpoints were trained on it.
    """
    if is_search_error(result_text):
        return result_text
    return (
        "Searched results: <information>"
        + result_text
        + "</information>\n"
        + f"Original user's question: {question.strip()}\n"
        + follow_up
    )


