"""HTTP client for `fvqa search serve`, with the same interface as the in-process `SearchTools`.

Rollout workers use this (search backend `http`) so that all of them share one cache and one set
of rate limits. Errors map back to the same exceptions: 4xx -> BadRequest, a backend failure or an
unreachable service -> SearchError.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx

from fvqa.search.types import (
    BadRequest,
    ImageHit,
    SearchError,
    TextHit,
    as_query_image,
    image_hit_from_dict,
    text_hit_from_dict,
)


class SearchClient:
    """`image_search` / `text_search` / `stats` over HTTP (thread-safe; one connection pool)."""

    def __init__(self, base_url: str, *, timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self._client.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise SearchError(f"search service at {self.base_url} unreachable: {type(exc).__name__}: {exc}") from exc
        try:
            body = resp.json()
        except ValueError:
            raise SearchError(f"search service answered HTTP {resp.status_code} without JSON") from None
        if 400 <= resp.status_code < 500:
            detail = body.get("detail") if isinstance(body, dict) else body
            raise BadRequest(f"search service refused the request (HTTP {resp.status_code}): {detail}")
        if resp.status_code >= 500 or not isinstance(body, dict):
            raise SearchError(f"search service error (HTTP {resp.status_code})")
        if not body.get("ok"):
            raise SearchError(str(body.get("error") or "search failed"))
        return body

    def image_search(self, image: Any, *, image_url: str | None = None, data_id: str | None = None) -> list[ImageHit]:
        query = as_query_image(image, url=image_url, data_id=data_id)
        body = self._post("/image_search", {
            "image_b64": base64.b64encode(query.data).decode() if query.data else None,
            "image_url": image_url,
            "data_id": data_id,
        })
        return [image_hit_from_dict(d) for d in body["hits"]]

    def text_search(self, query: str, question: str = "") -> list[TextHit]:
        body = self._post("/text_search", {"query": query, "question": question})
        return [text_hit_from_dict(d) for d in body["hits"]]

    async def aimage_search(self, image: Any, *, image_url: str | None = None,
                            data_id: str | None = None) -> list[ImageHit]:
        """`image_search` for async callers (runs in a worker thread)."""
        return await asyncio.to_thread(self.image_search, image, image_url=image_url, data_id=data_id)

    async def atext_search(self, query: str, question: str = "") -> list[TextHit]:
        """`text_search` for async callers (runs in a worker thread)."""
        return await asyncio.to_thread(self.text_search, query, question)

    def stats(self) -> dict[str, Any]:
        try:
            return self._client.get("/metrics").json()
        except (httpx.HTTPError, ValueError) as exc:
            raise SearchError(f"search service at {self.base_url} unreachable: {exc}") from exc

    def close(self) -> None:
        self._client.close()
