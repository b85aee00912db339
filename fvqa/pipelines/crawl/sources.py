"""Where crawl candidates come from: a local manifest, the `match` stage's URLs, or an image-search API.

Each source answers three questions for the crawl stage: which candidates a concept has, the bytes of
a candidate, and the (title, text) of a candidate's page. Failures come back as FetchResult reasons,
never as exceptions, so the stage can count and record them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlencode

from fvqa.config import CrawlConfig, RunConfig
from fvqa.errors import ConfigError
from fvqa.formats.jsonl import BadLine, read_jsonl
from fvqa.net.fetch import Downloader, FetchResult
from fvqa.net.pages import decode_html, extract_page
from fvqa.store import Workspace

PAGE_MAX_BYTES = 5_000_000


@dataclass(frozen=True)
class Candidate:
    """One image candidate for a concept; `url` is its key in `rejects`."""

    concept_id: str
    url: str
    page_url: str | None = None
    title: str | None = None
    path: Path | None = None  # local source: the file on disk


@dataclass(frozen=True)
class Page:
    """A candidate's source page."""

    url: str | None
    title: str | None
    text: str | None


class Failure(NamedTuple):
    """Why a source could not answer: a short `reason` (counted), a `detail`, and whether it may
    work next time (timeouts, 429/5xx: `FetchResult.retryable`)."""

    reason: str
    detail: str
    retryable: bool = False


def _norm(s: str) -> str:
    return " ".join(s.split()).casefold()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a manifest / pages file; a bad line is a one-line error naming it."""
    rows = []
    for rec in read_jsonl(path):
        if isinstance(rec, BadLine):
            raise ConfigError(f"{path}:{rec.line_no}: {rec.reason}")
        rows.append(rec[1])
    return rows


class Source:
    """Base: candidates, bytes and pages for a batch of concepts."""

    name = "base"

    def __init__(self, cfg: CrawlConfig, downloader: Downloader | None) -> None:
        self.cfg = cfg
        self.downloader = downloader

    async def candidates(self, concepts: list[tuple[str, str]]) -> tuple[dict[str, list[Candidate]], dict[str, Failure]]:
        raise NotImplementedError

    async def fetch(self, cands: list[Candidate]) -> list[FetchResult]:
        assert self.downloader is not None
        return await self.downloader.fetch_many([c.url for c in cands])

    async def page(self, cand: Candidate) -> tuple[Page, Failure | None]:
        """Fetch and extract the candidate's page; a failure still returns a Page (title only)."""
        if not cand.page_url or not self.cfg.fetch_pages or self.downloader is None:
            return Page(cand.page_url, cand.title, None), None
        res = await self.downloader.fetch(cand.page_url, max_bytes=PAGE_MAX_BYTES)
        if not res.ok:
            return Page(cand.page_url, cand.title, None), Failure("page_fetch_failed", f"{res.reason}: {res.detail}", res.retryable)
        title, text = extract_page(decode_html(res.data, res.content_type))
        failure = None if text else Failure("page_no_text", str(cand.page_url))
        return Page(cand.page_url, title or cand.title, text), failure


def _cached_failure(error: Any) -> Failure | None:
    """The failure a search cache entry recorded (entries from before reason codes hold the old text)."""
    if not error:
        return None
    reason, detail = str(error[0]), str(error[1]) if len(error) > 1 else ""
    if reason in ("image_search_failed", "image_search_bad_response"):
        return Failure(reason, detail)
    return Failure("image_search_failed", f"{reason}: {detail}")


class LocalSource(Source):
    """A manifest jsonl {path, title | concept, url, page_url} with files on disk, plus pages jsonl."""

    name = "local"

    def __init__(self, cfg: CrawlConfig, config: RunConfig) -> None:
        super().__init__(cfg, None)
        manifest = cfg.manifest  # a demo world's is filled in at load (fvqa.config)
        if manifest is None:
            raise ConfigError("crawl.manifest is not set (and no demo world is configured)")
        if not manifest.is_file():
            raise ConfigError(f"crawl.manifest not found: {manifest}")
        self.root = manifest.parent
        self.by_concept: dict[str, list[dict[str, Any]]] = {}
        for row in _read_jsonl(manifest):
            key = row.get("concept") or row.get("title")
            if isinstance(key, str) and isinstance(row.get("path"), str):
                self.by_concept.setdefault(_norm(key), []).append(row)
        pages = cfg.pages or (manifest.parent / "pages.jsonl")
        self.pages: dict[str, dict[str, Any]] = {}
        if pages.is_file():
            self.pages_root = pages.parent
            for row in _read_jsonl(pages):
                if isinstance(row.get("url"), str):
                    self.pages[row["url"]] = row
        elif cfg.pages is not None:
            raise ConfigError(f"crawl.pages not found: {pages}")

    async def candidates(self, concepts: list[tuple[str, str]]) -> tuple[dict[str, list[Candidate]], dict[str, Failure]]:
        out: dict[str, list[Candidate]] = {}
        for cid, concept in concepts:
            rows = self.by_concept.get(_norm(concept), [])[: self.cfg.candidates_per_concept]
            out[cid] = [Candidate(cid, str(r.get("url") or (self.root / r["path"]).as_uri()), r.get("page_url"),
                                  r.get("title"), self.root / r["path"]) for r in rows]
        return out, {}

    async def fetch(self, cands: list[Candidate]) -> list[FetchResult]:
        return await asyncio.to_thread(lambda: [self._read(c) for c in cands])

    def _read(self, cand: Candidate) -> FetchResult:
        path = cand.path
        if path is None or not path.is_file():
            return FetchResult(cand.url, False, reason="image_missing", detail=f"{path} not found")
        size = path.stat().st_size
        if size > self.cfg.max_bytes:
            return FetchResult(cand.url, False, reason="too_large", detail=f"{size} bytes > max_bytes")
        return FetchResult(cand.url, True, path.read_bytes(), final_url=str(path))

    async def page(self, cand: Candidate) -> tuple[Page, Failure | None]:
        row = self.pages.get(cand.page_url or "")
        if row is None:
            return Page(cand.page_url, cand.title, None), Failure(
                "page_not_found", f"no page with url {cand.page_url} in the pages file")
        title, text = row.get("wikipedia_title") or row.get("title"), None
        html_path = row.get("html_path")
        if self.cfg.fetch_pages and isinstance(html_path, str) and (self.pages_root / html_path).is_file():
            raw = (self.pages_root / html_path).read_bytes()
            got_title, text = extract_page(decode_html(raw))
            title = title or got_title
        text = text or row.get("wikipedia_content") or row.get("text")
        return Page(cand.page_url, title or cand.title, text), None if text else Failure(
            "page_no_text", str(cand.page_url))


class UrlSource(Source):
    """Candidate URLs per concept from a workspace table (the `match` stage's output)."""

    name = "urls"

    def __init__(self, cfg: CrawlConfig, ws: Workspace, downloader: Downloader) -> None:
        super().__init__(cfg, downloader)
        table = cfg.candidates_table
        if not table.replace("_", "").isalnum():
            raise ConfigError(f"crawl.candidates_table {table!r} is not a table name")
        if table not in ws.tables():
            raise ConfigError(f"crawl.source is 'urls' but the workspace has no `{table}` table; run `match` first "
                              "(or set crawl.candidates_table)")
        cols = {r[0] for r in ws.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table])}
        if "url" not in cols:
            raise ConfigError(f"`{table}` has no `url` column (columns: {', '.join(sorted(cols))})")
        page = "t.page_url" if "page_url" in cols else "NULL"
        title = "t.caption" if "caption" in cols else "NULL"
        order = "t.rank, " if "rank" in cols else ""
        if "concept_id" in cols:
            sql = f"SELECT t.concept_id, t.url, {page}, {title} FROM {table} t ORDER BY t.concept_id, {order}t.rowid"
        elif "entry_id" in cols:
            sql = (f"SELECT c.concept_id, t.url, {page}, {title} FROM {table} t JOIN concepts c USING (entry_id) "
                   f"ORDER BY c.concept_id, {order}t.rowid")
        else:
            raise ConfigError(f"`{table}` needs a concept_id or entry_id column")
        self.by_concept: dict[str, list[Candidate]] = {}
        for cid, url, page_url, caption in ws.execute(sql):
            if url:
                self.by_concept.setdefault(cid, []).append(Candidate(cid, str(url), page_url, caption))

    async def candidates(self, concepts: list[tuple[str, str]]) -> tuple[dict[str, list[Candidate]], dict[str, Failure]]:
        out = {}
        for cid, _ in concepts:
            seen: dict[str, Candidate] = {}
            for c in self.by_concept.get(cid, []):
                seen.setdefault(c.url, c)
            out[cid] = list(seen.values())[: self.cfg.candidates_per_concept]
        return out, {}


class WebSearchSource(Source):
    """An image-search API in SerpAPI's Google Images wire format; responses cached by request hash."""

    name = "web_search"

    def __init__(self, cfg: CrawlConfig, ws: Workspace, downloader: Downloader) -> None:
        super().__init__(cfg, downloader)
        env = cfg.search_api_key_env
        self._key = os.environ.get(env) if env else None
        if env and not self._key:
            raise ConfigError(f"crawl.source is 'web_search' but environment variable {env} is not set")
        self.cache = ws.cache_dir / "image_search"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.cache_hits = 0
        self.paid_calls = 0

    def _cache_path(self, query: str) -> Path:
        request = json.dumps({"url": self.cfg.search_url, "engine": self.cfg.search_engine, "q": query},
                             sort_keys=True)  # the key is deliberately not part of it
        return self.cache / f"{hashlib.sha256(request.encode()).hexdigest()}.json"

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    async def search(self, query: str) -> tuple[list[dict[str, Any]], Failure | None]:
        path = self._cache_path(query)
        if path.is_file():
            cached = json.loads(path.read_text(encoding="utf-8"))
            self.cache_hits += 1
            return cached.get("results", []), _cached_failure(cached.get("error"))
        params = {"engine": self.cfg.search_engine, "q": query}
        if self._key:
            params["api_key"] = self._key
        assert self.downloader is not None
        res = await self.downloader.fetch(f"{self.cfg.search_url}?{urlencode(params)}", max_bytes=PAGE_MAX_BYTES)
        self.paid_calls += 1
        if not res.ok:
            failure = Failure("image_search_failed", self._scrub(f"{res.reason}: {res.detail}"), res.retryable)
            if res.status is not None and 400 <= res.status < 500 and res.status != 429:
                self._write(path, {"results": [], "error": list(failure[:2])})  # deterministic: do not pay again
            return [], failure
        try:
            body = json.loads(res.data)
            items = body.get("images_results", []) if isinstance(body, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            items = None
        if not isinstance(items, list):
            return [], Failure("image_search_bad_response", "no images_results list in the JSON answer")
        results = [{"image_url": it.get("original") or it.get("thumbnail"), "page_url": it.get("link"),
                    "title": it.get("title")} for it in items if isinstance(it, dict)]
        results = [r for r in results if isinstance(r["image_url"], str)]
        self._write(path, {"results": results})
        return results, None

    @staticmethod
    def _write(path: Path, payload: dict[str, Any]) -> None:
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    async def candidates(self, concepts: list[tuple[str, str]]) -> tuple[dict[str, list[Candidate]], dict[str, Failure]]:
        answers = await asyncio.gather(*(self.search(concept) for _, concept in concepts))
        out: dict[str, list[Candidate]] = {}
        failures: dict[str, Failure] = {}
        for (cid, _), (results, failure) in zip(concepts, answers, strict=True):
            if failure is not None:
                failures[cid] = failure
            out[cid] = [Candidate(cid, r["image_url"], r.get("page_url"), r.get("title"))
                        for r in results[: self.cfg.candidates_per_concept]]
        return out, failures


def make_source(cfg: CrawlConfig, config: RunConfig, ws: Workspace, downloader: Downloader) -> Source:
    """The configured source."""
    if cfg.source == "local":
        return LocalSource(cfg, config)
    if cfg.source == "urls":
        return UrlSource(cfg, ws, downloader)
    return WebSearchSource(cfg, ws, downloader)


__all__ = ["Candidate", "LocalSource", "Page", "Source", "UrlSource", "WebSearchSource", "make_source"]
