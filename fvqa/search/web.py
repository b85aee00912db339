"""Web backend: SerpAPI Google Lens (image search) and Google (text search) over httpx.

Lens takes an image *URL*. `web.lens_input: url` uses the image's public URL given by the caller
(FVQA items carry `image_urls`); `upload` first POSTs the bytes to an upload endpoint of yours
(`web.upload_url`) and uses the URL it returns. Thumbnails of the hits are downloaded through the
same SSRF-guarded reader as pages. Each successful API call is reported to the cost hook.
The key comes from the environment variable named by `web.api_key_env` and is never logged: error
messages are scrubbed of it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from fvqa.redact import Scrubber
from fvqa.search.config import SearchConfig
from fvqa.search.reader import PageReader
from fvqa.search.types import BadRequest, Candidate, ImageHit, PageError, QueryImage, SearchError

# SerpAPI answers "no results" as an error string; that is an empty result, not a failure
_NO_RESULTS = ("hasn't returned any results", "returned any results", "no results")


class WebBackend:
    """SerpAPI engines behind the `Backend` interface (cost-counted, retried on 429/5xx/timeouts)."""

    name = "web"
    cache_pages = True

    def __init__(self, config: SearchConfig, *, cost_hook: Any = None) -> None:
        self.config = config
        self.web = config.web
        self.cost_hook = cost_hook
        self.reader = PageReader(config.reader)
        self._client = httpx.Client(timeout=self.web.timeout_s)
        self.cache_id = f"web:{self.web.base_url}:{self.web.image_engine}:{self.web.text_engine}"
        self._key = self.web.api_key()  # fail at start-up, not on the thousandth rollout
        self._scrubber = Scrubber([self._key])

    def _api_key(self) -> str:
        return self._key

    def _scrub(self, text: str) -> str:
        return self._scrubber.text(text)  # raw and URL-encoded: the key rides in the query string

    def _serp(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        """One SerpAPI call with retries; returns the JSON body or raises SearchError."""
        query = {**self.web.params, **params, "api_key": self._api_key(), "output": "json"}
        url = f"{self.web.base_url}/search.json"
        last = ""
        for attempt in range(self.web.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                resp = self._client.get(url, params=query)
            except httpx.TimeoutException:
                last = "timed out"
                continue
            except httpx.HTTPError as exc:
                last = self._scrub(f"{type(exc).__name__}: {exc}")  # httpx errors quote the URL, key included
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}"
                continue
            try:
                body = resp.json()
            except ValueError:
                raise SearchError(f"search API answered non-JSON (HTTP {resp.status_code})") from None
            if not isinstance(body, dict):
                raise SearchError("search API answered JSON that is not an object")
            error = body.get("error")
            if error and any(s in str(error).lower() for s in _NO_RESULTS):
                self._charge(kind)
                return {}
            if resp.status_code >= 400 or error:
                raise SearchError(self._scrub(f"search API error (HTTP {resp.status_code}): {error or resp.text[:200]}"))
            self._charge(kind)
            return self._scrubber.value(body)  # SerpAPI echoes the request (and key) in search_parameters
        raise SearchError(self._scrub(f"search API unavailable after {self.web.retries + 1} attempts: {last}"))

    def _charge(self, kind: str) -> None:
        if self.cost_hook is not None:
            self.cost_hook(kind, 1, self.web.usd_per_call)

    # -- image search --------------------------------------------------------------------------

    def _image_url(self, image: QueryImage) -> str:
        if self.web.lens_input == "url":
            if not image.url:
                raise BadRequest(
                    "web image search (lens_input=url) needs the image's public URL; pass image_url=..., "
                    "or set search.web.lens_input=upload with search.web.upload_url"
                )
            return image.url
        if not self.web.upload_url:
            raise BadRequest("search.web.lens_input=upload needs search.web.upload_url")
        if not image.data:
            raise BadRequest("upload mode needs the image bytes")
        try:
            resp = self._client.post(self.web.upload_url, files={self.web.upload_field: ("image", image.data)})
            resp.raise_for_status()
            url = resp.json()[self.web.upload_response_key]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise SearchError(f"image upload to {self.web.upload_url} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise SearchError(f"image upload returned no usable URL under {self.web.upload_response_key!r}")
        return url

    def _thumbnail(self, url: str | None) -> bytes | None:
        if not url or not self.web.fetch_thumbnails:
            return None
        try:
            body, _, _ = self.reader.fetch(url, accept=("image/",))
        except PageError:
            return None  # the hit keeps its title; rendering marks the thumbnail as unavailable
        return body

    def image_search(self, image: QueryImage, k: int) -> list[ImageHit]:
        body = self._serp("search_image", {"engine": self.web.image_engine, "url": self._image_url(image)})
        matches = [m for m in body.get("visual_matches") or body.get("exact_matches") or [] if isinstance(m, dict)]
        matches = [m for m in matches if m.get("title")][:k]
        with ThreadPoolExecutor(max_workers=min(len(matches), self.config.reader.concurrency) or 1) as pool:
            thumbs = list(pool.map(lambda m: self._thumbnail(m.get("thumbnail") or m.get("image")), matches))
        return [
            ImageHit(title=str(m["title"]), url=str(m.get("link") or ""), thumbnail=t)
            for m, t in zip(matches, thumbs, strict=True)
        ]

    # -- text search ---------------------------------------------------------------------------

    def text_candidates(self, query: str, n: int) -> list[Candidate]:
        body = self._serp("search_text", {"engine": self.web.text_engine, "q": query, "num": n})
        out = []
        for r in body.get("organic_results") or []:
            if isinstance(r, dict) and isinstance(r.get("link"), str):
                out.append(Candidate(url=r["link"], title=str(r.get("title") or ""), snippet=str(r.get("snippet") or "")))
        return out[:n]

    def read_page(self, candidate: Candidate) -> str:
        return self.reader.read(candidate.url)

    def close(self) -> None:
        self._client.close()
        self.reader.close()
