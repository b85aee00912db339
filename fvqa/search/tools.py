"""`SearchTools`: the two tools the agent calls, with a backend chosen by config and a cache in front.

    tools = make_search_tools(cfg.search, cache_dir=ws.cache_dir / "search", cost_hook=ledger_hook)
    hits = tools.image_search(image_bytes)           # -> list[ImageHit]
    hits = tools.text_search("query", "question")    # -> list[TextHit]

Text search runs in three cached steps, as upstream: query -> candidate pages; URL -> page text;
(page, question) -> summary. A page that fails to read or summarise is replaced by the next
candidate until `top_k` summaries or the candidates run out. Backend failures raise `SearchError`
(the agent renders upstream's error text for it); nothing is silently dropped: failures are counted
in `stats()`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from fvqa.errors import ConfigError
from fvqa.search.cache import SearchCache, cache_key
from fvqa.search.config import SearchConfig
from fvqa.search.summarize import Summarizer, default_summarizer
from fvqa.search.types import (
    BadRequest,
    Candidate,
    ImageHit,
    PageError,
    QueryImage,
    SearchError,
    TextHit,
    as_query_image,
    hit_to_dict,
    image_hit_from_dict,
)

log = logging.getLogger(__name__)

CostHook = Callable[[str, int, float], None]
"""(kind, n_calls, usd) -> None; called once per paid backend call (e.g. to feed the cost ledger)."""


class Backend(Protocol):
    """What a search backend provides; the facade adds caching, limits, fallback and counting."""

    name: str
    cache_pages: bool

    def image_search(self, image: QueryImage, k: int) -> list[ImageHit]: ...

    def text_candidates(self, query: str, n: int) -> list[Candidate]: ...

    def read_page(self, candidate: Candidate) -> str: ...


class RateLimiter:
    """At most `rate` acquisitions per second across threads (None: unlimited); spaces calls evenly."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            time.sleep(wait)


class SearchTools:
    """In-process image/text search over one backend, with the persistent cache in front."""

    def __init__(
        self,
        config: SearchConfig,
        backend: Backend,
        *,
        cache_dir: Path | str | None = None,
        cost_hook: CostHook | None = None,
        summarizer: Summarizer | None = None,
        summarizer_id: str | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.cost_hook = cost_hook
        self.summarizer = summarizer or default_summarizer(config.summary_sentences, config.reader.max_chars)
        self.summarizer_id = summarizer_id or ("extractive-bm25" if summarizer is None else "custom")
        cache_dir = cache_dir or config.cache.dir
        self.cache = (
            SearchCache(cache_dir, ttl_s=config.cache.ttl_s, max_mb=config.cache.max_mb,
                        error_ttl_s=config.cache.error_ttl_s)
            if config.cache.enabled and cache_dir is not None
            else None
        )
        svc = config.service
        self._image_slots = threading.BoundedSemaphore(svc.image_concurrency)
        self._text_slots = threading.BoundedSemaphore(svc.text_concurrency)
        self._rate = RateLimiter(svc.rate_per_s)
        # cache keys name the backend *instance* (e.g. which local index build), so answers from a
        # rebuilt index or another backend are never served from the cache
        self._backend_id = getattr(backend, "cache_id", backend.name)
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self._inflight: dict[str, tuple[threading.Lock, int]] = {}

    # -- bookkeeping ---------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += n

    @contextmanager
    def _single_flight(self, key: str) -> Iterator[None]:
        """Concurrent identical requests wait for the first one instead of each paying for a call."""
        with self._counter_lock:
            lock, users = self._inflight.get(key, (threading.Lock(), 0))
            self._inflight[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._counter_lock:
                lock, users = self._inflight[key]
                if users <= 1:
                    del self._inflight[key]
                else:
                    self._inflight[key] = (lock, users - 1)

    def _get(self, layer: str, key: str) -> tuple[bool, Any] | None:
        return self.cache.get(layer, key) if self.cache else None

    def _put(self, layer: str, key: str, value: Any, *, ok: bool = True) -> None:
        if self.cache:
            self.cache.put(layer, key, value, ok=ok)

    def stats(self) -> dict[str, Any]:
        """Backend calls, failures and cache hit/miss counters (for summaries and `/metrics`)."""
        with self._counter_lock:
            counters = dict(self.counters)
        return {"backend": self.backend.name, "counters": counters,
                "cache": self.cache.stats() if self.cache else None}

    # -- image search --------------------------------------------------------------------------

    def image_search(self, image: Any, *, image_url: str | None = None, data_id: str | None = None) -> list[ImageHit]:
        """Top-k pages for an image (bytes, PIL image, path): each a title, page URL and thumbnail."""
        query = as_query_image(image, url=image_url, data_id=data_id)
        if not query.data and not query.url and not query.data_id:
            raise BadRequest("image search needs an image (or its URL / upstream data_id)")
        if query.data:
            query.check()
        identity = query.sha256 if query.data else (query.data_id or query.url)
        if getattr(self.backend, "keyed_by_data_id", False):
            identity = query.data_id or identity
        key = cache_key("image", self._backend_id, identity, self.config.top_k)
        with self._single_flight(key):
            cached = self._get("image", key)
            if cached is not None:
                return [image_hit_from_dict(d) for d in cached[1]]
            return self._image_miss(query, key)

    def _image_miss(self, query: QueryImage, key: str) -> list[ImageHit]:
        with self._image_slots:
            self._rate.acquire()
            self._count("image_backend_calls")
            try:
                hits = self.backend.image_search(query, self.config.top_k)
            except SearchError:
                self._count("image_failures")
                raise
            except Exception as exc:  # noqa: BLE001 - any backend bug becomes a search error, not a crash
                self._count("image_failures")
                log.exception("image search backend %s failed", self.backend.name)
                raise SearchError(f"image search failed ({self.backend.name}): {type(exc).__name__}: {exc}") from exc
        hits = hits[: self.config.top_k]
        if hits:  # an empty answer may be transient (index rebuilt, API hiccup): not remembered
            self._put("image", key, [hit_to_dict(h) for h in hits])
        return hits

    # -- text search ---------------------------------------------------------------------------

    def _check_query(self, query: str) -> str:
        if not isinstance(query, str) or not query.strip():
            raise BadRequest("text search needs a non-empty query")
        limit = self.config.service.max_query_chars
        if len(query) > limit:
            raise BadRequest(f"query is {len(query)} characters, the limit is {limit}")
        return query.strip()

    def candidates(self, query: str) -> list[Candidate]:
        """Layer 1: query -> candidate pages (cached)."""
        n = max(self.config.top_k, self.config.candidates)
        key = cache_key("query", self._backend_id, query, n)
        with self._single_flight(key):
            cached = self._get("query", key)
            if cached is not None:
                return [Candidate(**d) for d in cached[1]]
            return self._candidates_miss(query, n, key)

    def _candidates_miss(self, query: str, n: int, key: str) -> list[Candidate]:
        with self._text_slots:
            self._rate.acquire()
            self._count("text_backend_calls")
            try:
                cands = self.backend.text_candidates(query, n)
            except SearchError:
                self._count("text_failures")
                raise
            except Exception as exc:  # noqa: BLE001
                self._count("text_failures")
                log.exception("text search backend %s failed", self.backend.name)
                raise SearchError(f"text search failed ({self.backend.name}): {type(exc).__name__}: {exc}") from exc
        if cands:
            self._put("query", key, [c.__dict__ for c in cands])
        return cands

    def page_text(self, cand: Candidate) -> str:
        """Layer 2: URL -> extracted page text (cached for remote backends, failures by class)."""
        if not self.backend.cache_pages:
            return self.backend.read_page(cand)
        key = cache_key("page", cand.url)
        cached = self._get("page", key)
        if cached is not None:
            ok, value = cached
            if ok:
                return value
            raise PageError(value["error_class"], value["message"] + " (cached)", permanent=True)
        self._count("page_fetches")
        try:
            text = self.backend.read_page(cand)
        except PageError as exc:
            if exc.permanent:
                self._put("page", key, {"error_class": exc.error_class, "message": str(exc)}, ok=False)
            raise
        self._put("page", key, text)
        return text

    def summary(self, text: str, question: str) -> str:
        """Layer 3: (page, question) -> summary (cached; keyed by page content and summariser)."""
        page_hash = hashlib.sha256(text.encode()).hexdigest()
        key = cache_key("summary", self.summarizer_id, page_hash, question)
        cached = self._get("summary", key)
        if cached is not None:
            return cached[1]
        self._count("summaries")
        summary = self.summarizer(text, question)
        if not isinstance(summary, str) or not summary.strip():
            raise ValueError("summariser returned nothing")
        self._put("summary", key, summary)
        return summary

    def text_search(self, query: str, question: str = "") -> list[TextHit]:
        """Top-k pages for `query`, each summarised with respect to `question` (default: the query)."""
        query = self._check_query(query)
        question = (question or "").strip() or query
        hits: list[TextHit] = []
        for cand in self.candidates(query):
            if len(hits) >= self.config.top_k:
                break
            try:
                text = self.page_text(cand)
                summary = self.summary(text, question)
            except ConfigError:  # a missing / refused summariser key is no page's fault: stop
                raise
            except Exception as exc:  # noqa: BLE001 - one bad page is replaced by the next candidate
                self._count("pages_failed")
                log.info("text search: skipping %s (%s)", cand.url, exc)
                continue
            hits.append(TextHit(url=cand.url, title=cand.title, summary=summary))
        return hits

    async def aimage_search(self, image: Any, *, image_url: str | None = None,
                            data_id: str | None = None) -> list[ImageHit]:
        """`image_search` for async callers (agent loops): runs in a worker thread."""
        return await asyncio.to_thread(self.image_search, image, image_url=image_url, data_id=data_id)

    async def atext_search(self, query: str, question: str = "") -> list[TextHit]:
        """`text_search` for async callers: runs in a worker thread."""
        return await asyncio.to_thread(self.text_search, query, question)

    def close(self) -> None:
        if self.cache:
            self.cache.close()
        for part in (self.backend, self.summarizer):
            close = getattr(part, "close", None)
            if callable(close):
                close()


def make_backend(config: SearchConfig, *, cost_hook: CostHook | None = None) -> Backend:
    """The backend named by `config.backend` (imports only what that backend needs)."""
    if config.backend == "local":
        from fvqa.search.local_index import LocalIndex

        if config.local.index_dir is None:
            raise ConfigError("search.local.index_dir is not set (build an index with `fvqa search index build`)")
        return LocalIndex(config.local.index_dir, config=config.local)
    if config.backend == "web":
        from fvqa.search.web import WebBackend

        return WebBackend(config, cost_hook=cost_hook)
    if config.backend == "replay":
        from fvqa.search.reader import PageReader
        from fvqa.search.replay import ReplayBackend

        reader = PageReader(config.reader) if config.replay.fetch_thumbnails else None
        return ReplayBackend(config.replay.paths, reader=reader)
    raise ValueError(f"backend {config.backend!r} has no in-process implementation")


def make_search_tools(
    config: SearchConfig | Any,
    *,
    cache_dir: Path | str | None = None,
    cost_hook: CostHook | None = None,
    summarizer: Summarizer | None = None,
    llm_cache_dir: Path | str | None = None,
    ledger: Any = None,
) -> Any:
    """`SearchTools` for local/web/replay, or an HTTP `SearchClient` for backend `http` (same interface).

    The page summariser is `summarizer` if given, else `search.summarizer` (`extractive`, or `llm`:
    replies cached in `llm_cache_dir`, default `<cache_dir>/../llm`, i.e. the workspace's LLM cache;
    paid calls reported to `cost_hook` as kind "summary" and billed in `ledger` if given)."""
    if not isinstance(config, SearchConfig):
        config = SearchConfig.from_section(config)  # compat: a plain dict, either form
    if config.backend == "http":
        from fvqa.search.client import SearchClient

        return SearchClient(config.service.url, timeout_s=config.service.timeout_s)
    backend = make_backend(config, cost_hook=cost_hook)
    summarizer_id = None
    if summarizer is None and config.summarizer.kind == "llm":
        built = make_llm_summarizer(config, llm_cache_dir=llm_cache_dir, cache_dir=cache_dir or config.cache.dir,
                                    cost_hook=cost_hook, ledger=ledger)
        summarizer, summarizer_id = built, built.cache_id
    return SearchTools(config, backend, cache_dir=cache_dir, cost_hook=cost_hook, summarizer=summarizer,
                       summarizer_id=summarizer_id)


def make_llm_summarizer(config: SearchConfig, *, llm_cache_dir: Path | str | None = None,
                        cache_dir: Path | str | None = None, cost_hook: CostHook | None = None,
                        ledger: Any = None) -> Any:
    """The `search.summarizer` LLM summariser: its LLM response cache is `llm_cache_dir`, by default
    the workspace's `cache/llm` next to the search cache `cache_dir` (`<workspace>/cache/search`)."""
    from fvqa.search.summarize import SUMMARY_PROMPT, ClientSummarizer, SummaryTask

    sc = config.summarizer
    if llm_cache_dir is None:
        if cache_dir is None:
            raise ConfigError("search.summarizer.kind is llm but there is no cache folder for its replies "
                              "(pass the workspace's cache, or set search.cache.dir)")
        llm_cache_dir = Path(cache_dir).parent / "llm"
    task = SummaryTask(sc.prompt or SUMMARY_PROMPT, max_sentences=sc.max_sentences or config.summary_sentences,
                       max_chars=sc.max_chars or config.reader.max_chars)
    return ClientSummarizer(sc.llm, llm_cache_dir, task=task, max_tokens=sc.max_tokens, ledger=ledger,
                            cost_hook=cost_hook)


def ledger_hook(ledger: Any, stage: str) -> CostHook:
    """A `CostHook` that records each paid search call in a `CostLedger` (kind "search")."""

    def hook(kind: str, n_calls: int, usd: float) -> None:
        for _ in range(n_calls):
            ledger.record(stage, "search", usd=usd)

    return hook
