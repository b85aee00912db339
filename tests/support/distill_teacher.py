"""A scripted teacher VLM (for the loopback OpenAI server), stub search tools and a small labelled
workspace, for the distill tests; run as a script it is the child process a test SIGKILLs mid-distil.

Each item's question ends in `#<kind>`; the teacher's reply depends on the kind and on how many
assistant turns the conversation already holds:

* `free`: answers at once, correctly;         * `image`: image search, then the right answer;
* `text`: text search, then the right answer; * `mixed`: image search, text search, the answer;
* `wrong`: answers at once, wrongly;          * `malformed`: the right answer without `<reason>`;
* `searchy`: a search-free item the teacher image-searches anyway (right answer);
* `flaky`: like `free`, but its first request gets an HTTP 500 while `FAULTS["on"]`.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from support.fake_openai import Reply, error_body, last_user_text
from support.images import picture

ANSWER = "Ur Sta"
LABELS = {"free": "search_free", "image": "image_search_required", "text": "text_search_required",
          "mixed": "mixed_search_required", "wrong": "search_free", "malformed": "search_free",
          "searchy": "search_free", "flaky": "search_free"}
FAULTS = {"on": True, "flaky_failed": False}
_LOCK = threading.Lock()


def kind_of(body: dict[str, Any]) -> str:
    first = body["messages"][0]["content"]
    text = " ".join(p.get("text", "") for p in first if p.get("type") == "text")
    return text.rsplit("#", 1)[-1].strip()


def teacher(body: dict[str, Any]) -> str | Reply:
    """The scripted teacher (module docstring)."""
    kind = kind_of(body)
    n = sum(m["role"] == "assistant" for m in body["messages"])
    if kind == "flaky":
        with _LOCK:
            if FAULTS["on"] and not FAULTS["flaky_failed"]:
                FAULTS["flaky_failed"] = True
                return Reply(500, error_body("The server had an error", "server_error"))
    if kind in ("free", "flaky"):
        return f"<reason>I know this subject.</reason><answer>{ANSWER}</answer>"
    if kind == "wrong":
        return "<reason>I think I know it.</reason><answer>Someone Else</answer>"
    if kind == "malformed":
        return f"<answer>{ANSWER}</answer>"
    if kind in ("image", "mixed", "searchy") and n == 0:
        return "<reason>Unfamiliar; I search the image.</reason><search><img>"  # the stop string is cut
    if kind == "text" and n == 0 or kind == "mixed" and n == 1:
        return "<reason>I need a fact; I search the web.</reason><text_search>Kalo tower builder"
    if "Kalo tower" not in last_user_text(body):
        return "<reason>No results.</reason><answer>unknown</answer>"
    return f"<reason>The results say it.</reason><answer>{ANSWER.lower()}</answer>"


class StubTools:
    """Search that always finds the subject's page, with a real thumbnail on the image hit."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def image_search(self, image: bytes, **_: Any) -> list:
        from fvqa.protocol import ImageHit

        self.calls.append("image")
        return [ImageHit(title="Kalo tower", url="http://demo/kalo", thumbnail=picture(99, size=64)),
                ImageHit(title="Other tower", url="http://demo/other", thumbnail=picture(98, size=64))]

    def text_search(self, query: str, question: str = "", **_: Any) -> list:
        from fvqa.protocol import TextHit

        self.calls.append("text")
        return [TextHit(url="http://demo/kalo", title="Kalo tower", summary=f"Kalo tower was built by {ANSWER}.")]


def fill_workspace(ws: Any, kinds: list[str]) -> list[str]:
    """Items (one per kind, train split, labelled by kind) with distinct images; their ids."""
    ids = [f"it{n:02d}-{k}" for n, k in enumerate(kinds)]
    shas = [ws.put_image(picture(n)).sha256 for n in range(len(kinds))]
    ws.insert("items", [dict(item_id=i, source="infoseek", question=f"Who built this? #{k}", answer=ANSWER,
                             aliases=[ANSWER], image_sha256=sha, concept=None, concept_count=None, entity_text=None)
                        for i, k, sha in zip(ids, kinds, shas, strict=True)])
    ws.insert("labels", [dict(item_id=i, search_label=LABELS[k], probe_method="popularity-prior")
                         for i, k in zip(ids, kinds, strict=True)])
    ws.insert("splits", [dict(item_id=i, split="train") for i in ids])
    return ids


def distill_section(base_url: str, **extra: Any) -> dict[str, Any]:
    """A `distill:` config section with the loopback teacher."""
    return {"enabled": True, "backend": "openai", "k": 2,
            "llm": {"endpoints": [{"base_url": base_url, "api_key_env": None}], "model": "fake-teacher",
                    "max_retries": 0, "max_concurrency": 4},
            **extra}


def main() -> None:
    """`python distill_teacher.py CONFIG`: the distill stage with stub search tools (a killable child)."""
    import fvqa.search.tools
    from fvqa.config import load_config
    from fvqa.pipelines.runner import run_build

    fvqa.search.tools.make_search_tools = lambda *a, **kw: StubTools()
    config = load_config(Path(sys.argv[1]))
    stats = run_build(config, only=["distill"])
    print(json.dumps({k: v.n_out for k, v in stats.items()}), flush=True)


if __name__ == "__main__":  # run with PYTHONPATH=tests (so `support` imports)
    main()
