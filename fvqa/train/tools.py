"""Search calls made from inside a rollout: call the search service, render results for the model.

The agent loop never talks to a backend directly: it calls the search service (``fvqa search
serve``) through its HTTP client, so every rollout worker on every node shares one cache and one
rate limit. This module turns one tool call into what the next user turn needs: upstream's result
text (``fvqa.protocol``) and the thumbnails, downscaled so each costs a bounded number of vision
tokens. A failed search never fails a rollout: it renders upstream's error text, which tells the
model to reason on its own, and the failure is counted in the trajectory's extra fields.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from fvqa.protocol import ImageHit, TextHit, render_image_results, render_text_results

logger = logging.getLogger(__name__)


@runtime_checkable
class SearchClient(Protocol):
    """What the loop needs from the search tools (the ``SearchTools`` facade and its HTTP client).

    Methods may be sync or async; a sync client is run in a worker thread so a slow search never
    blocks the event loop that drives the other trajectories.
    """

    def image_search(self, image: Any, *, data_id: str | None = None) -> Sequence[ImageHit]:
        """Reverse image search for the user's image (``data_id`` lets a replay backend find it)."""
        ...

    def text_search(self, query: str, question: str = "") -> Sequence[TextHit]:
        """Web text search; results summarised with respect to the question."""
        ...


NO_RESULTS = "no results"
"""``ToolResult.error`` of a search that ran but found nothing (the model sees upstream's error text
either way; statistics keep the two apart)."""


def search_outcomes(tool_calls: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(failed, empty) among a trajectory's recorded search calls: failed raised (service down,
    timeout, bad reply), empty ran and found nothing."""
    failed = sum(1 for c in tool_calls if not c.get("ok") and c.get("error") and c.get("error") != NO_RESULTS)
    empty = sum(1 for c in tool_calls if not c.get("ok") and c.get("error") == NO_RESULTS)
    return failed, empty


@dataclass(frozen=True)
class ToolResult:
    """One executed search: the rendered text, the thumbnails it shows, and whether it failed."""

    kind: str
    text: str
    images: list[Image.Image]
    ok: bool
    n_hits: int
    error: str = ""


def bound_thumbnail(img: Image.Image, max_pixels: int, patch_size: int = 14) -> Image.Image:
    """Resize a thumbnail as Qwen-VL's own preprocessing does, capped at ``max_pixels``.

    Uses ``qwen_vl_utils.fetch_image`` (the library veRL itself uses for prompt images) so the
    size the rollout engine sees equals the size the trainer re-processes.
    """
    from qwen_vl_utils import fetch_image

    return fetch_image({"image": img.convert("RGB"), "max_pixels": max_pixels}, image_patch_size=patch_size)


def image_bytes(img: Any) -> bytes:
    """Bytes for an image given as bytes, a ``{bytes: ...}`` dict or a PIL image (PNG-encoded)."""
    if isinstance(img, bytes | bytearray):
        return bytes(img)
    if isinstance(img, dict) and isinstance(img.get("bytes"), bytes | bytearray):
        return bytes(img["bytes"])
    if isinstance(img, dict) and isinstance(img.get("image"), Image.Image):
        img = img["image"]
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"cannot get image bytes from {type(img).__name__}")


async def _call(fn: Any, *args: Any, timeout_s: float, **kwargs: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await asyncio.wait_for(fn(*args, **kwargs), timeout_s)
    return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), timeout_s)


async def run_image_search(
    client: SearchClient,
    image: bytes,
    *,
    topk: int,
    max_pixels: int,
    patch_size: int = 14,
    timeout_s: float = 120.0,
    data_id: str | None = None,
) -> ToolResult:
    """Image search -> upstream's result text with one vision placeholder per thumbnail kept (the
    first ``topk`` hits)."""
    try:
        hits = list(await _call(client.image_search, image, timeout_s=timeout_s, data_id=data_id))
    except Exception as exc:  # noqa: BLE001 - any failure is rendered as upstream's error text
        logger.warning("image search failed: %s", exc)
        text, _ = render_image_results([])
        return ToolResult("image_search", text, [], False, 0, f"{type(exc).__name__}: {exc}")
    text, images = render_image_results(hits[:topk])
    images = [bound_thumbnail(img, max_pixels, patch_size) for img in images]
    return ToolResult("image_search", text, images, bool(hits), len(hits[:topk]), "" if hits else NO_RESULTS)


async def run_text_search(
    client: SearchClient,
    query: str,
    question: str,
    *,
    topk: int,
    timeout_s: float = 120.0,
) -> ToolResult:
    """Text search -> upstream's ``N. (link:URL) summary`` list for the first ``topk`` hits (or its
    error text)."""
    try:
        hits = list(await _call(client.text_search, query, question, timeout_s=timeout_s))
    except Exception as exc:  # noqa: BLE001 - any failure is rendered as upstream's error text
        logger.warning("text search failed: %s", exc)
        return ToolResult("text_search", render_text_results([]), [], False, 0, f"{type(exc).__name__}: {exc}")
    hits = hits[:topk]
    return ToolResult("text_search", render_text_results(hits), [], bool(hits), len(hits), "" if hits else NO_RESULTS)


_CLIENTS: dict[tuple[str, float], SearchClient] = {}
_CLIENTS_LOCK = threading.Lock()


def search_client_for(url: str, timeout_s: float = 120.0) -> SearchClient:
    """One HTTP client per (service URL, timeout) per process, shared by every trajectory.

    veRL builds a new agent-loop object for every sample, so the client (and its connection pool)
    must live outside it.
    """
    key = (url, timeout_s)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            from fvqa.search.client import SearchClient as HttpSearchClient

            client = HttpSearchClient(url, timeout_s=timeout_s)
            _CLIENTS[key] = client
        return client
