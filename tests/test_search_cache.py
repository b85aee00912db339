"""The search facade and its persistent three-layer cache, over a counting fake backend."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image

from fvqa.search.cache import SearchCache
from fvqa.search.config import SearchConfig
from fvqa.search.tools import SearchTools
from fvqa.search.types import BadRequest, Candidate, ImageHit, PageError, SearchError


class FakeBackend:
    """Counts calls; page texts per URL; URLs named 'gone' fail permanently, 'flaky' transiently."""

    name = "fake"
    cache_pages = True

    def __init__(self) -> None:
        self.image_calls = self.text_calls = 0
        self.reads: list[str] = []
        self.fail_images = False

    def image_search(self, image, k):
        self.image_calls += 1
        if self.fail_images:
            raise RuntimeError("boom")
        return [ImageHit(title=f"page {i} for {image.sha256[:6]}", url=f"https://p.test/{i}", thumbnail=b"\xff\xd8x")
                for i in range(k + 2)]

    def text_candidates(self, query, n):
        self.text_calls += 1
        urls = ["gone", "a", "flaky", "b", "c", "d", "e", "f"]
        return [Candidate(url=f"https://p.test/{u}", title=u.upper()) for u in urls[:n]]

    def read_page(self, cand):
        self.reads.append(cand.url)
        if cand.url.endswith("gone"):
            raise PageError("http_404", "not found", permanent=True)
        if cand.url.endswith("flaky"):
            raise PageError("timeout", "read timed out", permanent=False)
        return f"Page {cand.title} opens here. The answer for {cand.title} is 42. Unrelated text follows."


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return buf.getvalue()


def _tools(tmp_path: Path, backend: FakeBackend, **cache) -> SearchTools:
    cfg = SearchConfig.model_validate({"backend": "local", "top_k": 5, "cache": cache})
    return SearchTools(cfg, backend, cache_dir=tmp_path / "cache")


def test_image_cache_hit_skips_backend_and_survives_reopen(tmp_path: Path) -> None:
    backend = FakeBackend()
    tools = _tools(tmp_path, backend)
    first = tools.image_search(_png("red"))
    assert len(first) == 5 and backend.image_calls == 1
    assert tools.image_search(_png("red")) == first
    assert backend.image_calls == 1
    tools.image_search(_png("blue"))
    assert backend.image_calls == 2
    assert tools.stats()["cache"]["layers"]["image"] == {"hits": 1, "misses": 2, "entries": 2}
    tools.close()

    reopened = _tools(tmp_path, FakeBackend())
    assert reopened.image_search(_png("red")) == first
    assert reopened.backend.image_calls == 0


def test_text_search_replaces_failed_pages_and_caches_three_layers(tmp_path: Path) -> None:
    backend = FakeBackend()
    tools = _tools(tmp_path, backend)
    hits = tools.text_search("what answer", "What is the answer for B?")
    # gone (404) and flaky (timeout) are skipped; the next candidates fill the 5 slots in rank order
    assert [h.title for h in hits] == ["A", "B", "C", "D", "E"]
    assert "42" in hits[1].summary
    assert tools.counters["pages_failed"] == 2
    reads = len(backend.reads)

    again = tools.text_search("what answer", "What is the answer for B?")
    assert again == hits
    assert backend.text_calls == 1
    # only the transient failure is retried; the 404 is remembered with its class
    assert backend.reads[reads:] == ["https://p.test/flaky"]
    layers = tools.stats()["cache"]["layers"]
    assert layers["query"]["hits"] == 1 and layers["summary"]["hits"] == 5
    tools.close()

    # a new question on a cached page reuses the page text but makes a new summary
    tools = _tools(tmp_path, backend)
    tools.text_search("what answer", "Who?")
    assert backend.text_calls == 1 and tools.counters["summaries"] == 5
    assert tools.counters["page_fetches"] == 1  # the flaky page again


def test_ttl_expires_entries(tmp_path: Path) -> None:
    backend = FakeBackend()
    tools = _tools(tmp_path, backend, ttl_s=0.05)
    tools.image_search(_png("red"))
    time.sleep(0.1)
    tools.image_search(_png("red"))
    assert backend.image_calls == 2


def test_size_cap_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = SearchCache(tmp_path, max_mb=0.01)  # 10 kB
    for i in range(30):
        cache.put("page", f"k{i}", "x" * 1000)
    cache.evict_now()
    stats = cache.stats()
    assert stats["bytes"] <= 10_000
    assert cache.get("page", "k29") is not None  # newest kept
    assert cache.get("page", "k0") is None  # oldest evicted


def test_bad_requests_and_backend_failures_are_clear_errors(tmp_path: Path) -> None:
    backend = FakeBackend()
    tools = _tools(tmp_path, backend)
    with pytest.raises(BadRequest, match="non-empty query"):
        tools.text_search("   ", "q")
    with pytest.raises(BadRequest, match="limit is 1000"):
        tools.text_search("x" * 1001, "q")
    with pytest.raises(BadRequest, match="must be bytes"):
        tools.image_search(12345)
    backend.fail_images = True
    with pytest.raises(SearchError, match="image search failed .*boom"):
        tools.image_search(_png("green"))
    assert tools.counters["image_failures"] == 1
    backend.fail_images = False
    assert len(tools.image_search(_png("green"))) == 5  # the failure was not cached


def test_custom_summariser_is_used_cached_and_failures_replaced(tmp_path: Path) -> None:
    calls: list[str] = []

    def summarise(page: str, question: str) -> str:
        calls.append(page)
        if "Page A" in page:
            raise ValueError("LLM refused")
        return f"summary for {question}: {page[:10]}"

    cfg = SearchConfig.model_validate({"backend": "local", "top_k": 3})
    backend = FakeBackend()
    tools = SearchTools(cfg, backend, cache_dir=tmp_path / "c", summarizer=summarise, summarizer_id="test-llm")
    hits = tools.text_search("q", "who?")
    assert [h.title for h in hits] == ["B", "C", "D"]  # gone, A (summariser failed), flaky skipped
    assert hits[0].summary == "summary for who?: Page B ope"
    n = len(calls)
    tools.text_search("q", "who?")
    assert len(calls) == n + 1  # only page A is re-summarised (failures are not cached)


def test_ledger_hook_records_paid_calls() -> None:
    from fvqa.search.tools import ledger_hook

    class Ledger:
        def __init__(self) -> None:
            self.rows: list[tuple] = []

        def record(self, stage: str, kind: str, *, usd: float) -> None:
            self.rows.append((stage, kind, usd))

    ledger = Ledger()
    ledger_hook(ledger, "probe")("search_text", 2, 0.015)
    assert ledger.rows == [("probe", "search", 0.015)] * 2
