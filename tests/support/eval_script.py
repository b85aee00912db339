"""The scripted loopback model turns and judge the eval tests share, and their local search tools.

The model reads the question's "(hint: MAKER)" when there is one; otherwise it searches the image,
then the first title found, then answers with the maker the page summary names. The judge compares
normalised answers (SimpleVQA's three-way grade: "unknown" is not attempted).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fvqa.answers import normalize_answer
from support.fake_openai import last_user_text
from support.pixel_embedder import PixelEmbedder


def message_text(msg: dict[str, Any]) -> str:
    c = msg["content"]
    return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if p.get("type") == "text")


def first_text(body: dict[str, Any]) -> str:
    return message_text(body["messages"][0])


def n_assistant(body: dict[str, Any]) -> int:
    return sum(m["role"] == "assistant" for m in body["messages"])


def hint(body: dict[str, Any]) -> str | None:
    found = re.search(r"\(hint: (.+?)\)", first_text(body))
    return found.group(1) if found else None


def search_chain(body: dict[str, Any], *, close_search: bool = False) -> str:
    """On demand without a hint: image search, a text search for the first title, the maker.

    Turn 1 comes back without `</search>` (OpenAI-style servers cut the matched stop string) unless
    `close_search`."""
    turns, last = n_assistant(body), last_user_text(body)
    if turns == 0:
        return "<reason>I cannot tell what this is.</reason><search><img>" + ("</search>" if close_search else "")
    if turns == 1:
        title = re.search(r"title: (.+)\n", last).group(1)
        return f"<reason>The image shows {title}.</reason><text_search>{title} maker</text_search>"
    return maker_answer(body)


def maker_answer(body: dict[str, Any]) -> str:
    """The answer from the last search results: the maker the page summary names."""
    maker = re.search(r"created by (.+?) in \d{4}", last_user_text(body)).group(1)
    return f"<reason>The page names the maker.</reason><answer>{maker}</answer>"


def judge(body: dict[str, Any]) -> str:
    text = last_user_text(body)
    gold = re.search(r"Ground truth: (.*)\n", text).group(1)
    pred = re.search(r"Model's answer: (.*)\n", text).group(1)
    if "<grade>" in text:
        grade = "not_attempted" if pred == "unknown" else (
            "correct" if normalize_answer(pred) == normalize_answer(gold) else "incorrect")
        return f"<grade>{grade}</grade> <reason>compared</reason>"
    verdict = "Yes" if normalize_answer(pred) == normalize_answer(gold) else "No"
    return f"<judge>{verdict}</judge> <reason>compared with the ground truth</reason>"


def local_tools(world: Path, factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The real local index over the world's pages behind the real SearchTools (pixel embedder)."""
    from fvqa.search.config import LocalConfig, SearchConfig
    from fvqa.search.local_index import LocalIndex, build_index
    from fvqa.search.tools import SearchTools

    out = factory.mktemp("index") / "index"
    embedder = PixelEmbedder()
    build_index(world / "web/pages.jsonl", world / "web/images.jsonl", out,
                config=LocalConfig(clip_model="ViT-S-32", clip_pretrained=None), embedder=embedder)
    tools = SearchTools(SearchConfig(top_k=2), LocalIndex(out, embedder=embedder), cache_dir=factory.mktemp("scache"))
    yield tools
    tools.close()
