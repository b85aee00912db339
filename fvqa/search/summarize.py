"""Page summaries for text search: an offline extractive default and the LLM summariser hook.

Upstream summarised each result page with an LLM (first 30,000 characters, at most 5 sentences,
keeping the page's main points and whatever answers the question). Offline we approximate that
extractively: the page's lead sentence (its main point) plus the sentences that rank highest by BM25
against the question, in page order. An LLM summariser is any callable `(page_text, question) -> str`
(the cache keys summaries by page and question, as upstream); `llm_summarizer` builds one from a
text-completion function, with `SummaryTask` (an `fvqa.llm.task.LLMTask`) formatting the prompt and
reading the reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bm25s

from fvqa.llm.task import LLMTask, Reject, Reply, Request

Summarizer = Callable[[str, str], str]
"""(page_text, question) -> summary; raising means "this page failed" (the next result is used)."""

SUMMARY_PROMPT = (
    "You summarise a web page for someone answering a question.\n"
    "Question: {question}\n"
    "Write at most {max_sentences} sentences. Keep the page's main points and every fact on the page "
    "that helps answer the question (names, dates, numbers). Use only what the page says; if it says "
    "nothing relevant, summarise its main points.\n\n"
    "Page:\n{page}"
)

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
_WS = re.compile(r"\s+")


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased word tokens without English stop words (the same analyser as the local index)."""
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def split_sentences(text: str) -> list[str]:
    """Split on sentence-ending punctuation followed by a capital/digit; also on blank lines."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n|\n(?=[A-Z#*\-])", text):
        block = _WS.sub(" ", block).strip()
        if block:
            out.extend(s.strip() for s in _SENTENCE_END.split(block) if s.strip())
    return out


def extractive_summary(text: str, question: str, *, max_sentences: int = 5, max_chars: int = 30_000) -> str:
    """At most `max_sentences` sentences of `text[:max_chars]`: the lead + the best BM25 matches."""
    sentences = split_sentences(text[:max_chars])
    if len(sentences) <= max_sentences:
        return " ".join(sentences)
    q_tokens = tokenize([question])[0]
    picked = {0}
    if q_tokens:
        retriever = bm25s.BM25()
        retriever.index(tokenize(sentences), show_progress=False)
        known = [t for t in q_tokens if t in retriever.vocab_dict]
        if known:
            scores = retriever.get_scores(known)
            for idx in scores.argsort()[::-1]:
                if len(picked) >= max_sentences or scores[idx] <= 0:
                    break
                picked.add(int(idx))
    for idx in range(len(sentences)):  # fill with the page's opening when few sentences matched
        if len(picked) >= max_sentences:
            break
        picked.add(idx)
    return " ".join(sentences[i] for i in sorted(picked))


def default_summarizer(max_sentences: int = 5, max_chars: int = 30_000) -> Summarizer:
    """The offline extractive summariser as a `Summarizer`."""

    def summarize(page: str, question: str) -> str:
        return extractive_summary(page, question, max_sentences=max_sentences, max_chars=max_chars)

    return summarize


@dataclass(frozen=True)
class PageQuestion:
    """One page to summarise with respect to one question."""

    page: str
    question: str


class SummaryTask(LLMTask[PageQuestion, str]):
    """A page and a question -> a summary of at most `max_sentences` sentences; an empty reply is a reject.

    `prompt` may use `{question}`, `{page}` and `{max_sentences}`; the page is cut at `max_chars`."""

    name = "search-summary"

    def __init__(self, prompt: str = SUMMARY_PROMPT, *, max_sentences: int = 5,
                 max_chars: int = 30_000) -> None:
        self.prompt = prompt
        self.max_sentences = max_sentences
        self.max_chars = max_chars

    def prompt_text(self, item: PageQuestion) -> str:
        return self.prompt.format(question=item.question, page=item.page[: self.max_chars],
                                  max_sentences=self.max_sentences)

    def format(self, item: PageQuestion) -> Request:
        return Request([{"role": "user", "content": self.prompt_text(item)}])

    def parse(self, item: PageQuestion, reply: Reply) -> str:
        if not reply.text.strip():
            raise Reject("empty summary", "summariser returned an empty reply")
        return reply.text.strip()


def llm_summarizer(complete: Callable[[str], str], *, prompt: str = SUMMARY_PROMPT, max_sentences: int = 5,
                   max_chars: int = 30_000) -> Summarizer:
    """Wrap a text-completion function (prompt -> reply text, e.g. around `LLMClient`) as a `Summarizer`.

    `prompt` may use `{question}`, `{page}` and `{max_sentences}`; it is overridable from config so a
    run can reproduce upstream's summariser or use its own. An empty reply raises `Reject` (a
    `ValueError`), so the search tools move on to the next page.
    """
    task = SummaryTask(prompt, max_sentences=max_sentences, max_chars=max_chars)

    def summarize(page: str, question: str) -> str:
        item = PageQuestion(page, question)
        return task.parse(item, Reply(complete(task.prompt_text(item)) or ""))

    return summarize


class ClientSummarizer:
    """An LLM `Summarizer` over `fvqa.llm.LLMClient`: its response cache (a summary asked before is
    served from it, nothing paid), retries, endpoint failover and ledger, as every stage uses them.

    Text search calls summarisers from worker threads; the client's async requests run on one event
    loop of its own in a daemon thread. `cost_hook(kind, n_calls, usd)` hears of every paid call.
    A missing key or an endpoint refusing it is a `ConfigError` (raised when built / on first call).
    """

    def __init__(self, llm: Any, cache_dir: Path | str, *, task: SummaryTask | None = None,
                 max_tokens: int | None = None, ledger: Any = None, stage: str = "search-summary",
                 cost_hook: Callable[[str, int, float], None] | None = None) -> None:
        from fvqa.llm.client import LLMClient

        self.task = task or SummaryTask()
        self.params: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
        self.cost_hook = cost_hook
        self.client = LLMClient(llm, cache_dir, ledger=ledger, stage=stage, section="search.summarizer.llm")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fvqa-summarizer", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def cache_id(self) -> str:
        """Names model, prompt and limits: a summary cached for other settings is never reused."""
        spec = [self.client.cfg.model, self.task.prompt, self.task.max_sentences, self.task.max_chars, self.params]
        return "llm:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def __call__(self, page: str, question: str) -> str:
        item = PageQuestion(page, question)
        req = self.task.format(item)
        res = asyncio.run_coroutine_threadsafe(self.client.complete(req.messages, **self.params), self._loop).result()
        if not res.ok:
            raise RuntimeError(f"summary request failed ({res.error_class}): {res.error}")
        if self.cost_hook is not None and not res.cached and not res.shared:
            usd = self.client.cfg.price_at(res.endpoint).usd(res.prompt_tokens, res.completion_tokens)
            self.cost_hook("summary", 1, usd)
        return self.task.parse(item, Reply(res.text or "", cached=res.cached))

    def close(self) -> None:
        """Close the client's connections and cache, and stop its loop."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self.client.aclose(), self._loop).result(timeout=30)
        finally:
            self.client.cache.close()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
