"""`fvqa search serve`: one HTTP service that shares the cache and the rate limits across all
rollout workers.

Routes: `POST /image_search` `{image_b64 | image_url | data_id}`, `POST /text_search`
`{query, question}`, `GET /healthz`, `GET /metrics`. A bad request is a 4xx with a message; a backend
failure is *not* an HTTP error: it answers 200 with `ok: false`, the reason, and upstream's error
text, which is exactly what the model should see. Concurrency per backend kind is capped by the
facade's semaphores; endpoints are sync, so FastAPI runs them in its thread pool.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections import Counter
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from fvqa.protocol import IMAGE_SEARCH_ERROR, TEXT_SEARCH_ERROR, render_image_results, render_text_results
from fvqa.search.config import ServiceConfig
from fvqa.search.tools import SearchTools
from fvqa.search.types import BadRequest, SearchError, hit_to_dict

log = logging.getLogger(__name__)


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_b64: str | None = None
    image_url: str | None = None
    data_id: str | None = None


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str
    question: str = ""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"ok": False, "detail": message})


def create_app(tools: SearchTools, config: ServiceConfig | None = None) -> FastAPI:
    """The FastAPI app over one `SearchTools` (its cache and limits are shared by every request)."""
    cfg = config or tools.config.service
    app = FastAPI(title="fvqa search", version="1")
    requests: Counter[str] = Counter()
    latency: Counter[str] = Counter()
    lock = threading.Lock()
    started = time.time()
    max_body = cfg.max_image_bytes * 4 // 3 + 64_000  # base64 of the largest image + JSON overhead

    def note(name: str, seconds: float) -> None:
        with lock:
            requests[name] += 1
            latency[name] += seconds

    @app.middleware("http")
    async def body_limit(request: Request, call_next: Any) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body:
            note("rejected_too_large", 0.0)
            return _error(413, f"request body is {size} bytes, the limit is {max_body}")
        return await call_next(request)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        note("rejected_bad_request", 0.0)
        return _error(400, str(exc))

    @app.post("/image_search")
    def image_search(req: ImageRequest) -> Any:
        t0 = time.perf_counter()
        data = None
        if req.image_b64 is not None:
            try:
                data = base64.b64decode(req.image_b64, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest("image_b64 is not valid base64") from None
            if len(data) > cfg.max_image_bytes:
                return _error(413, f"image is {len(data)} bytes, the limit is {cfg.max_image_bytes}")
        try:
            hits = tools.image_search(data, image_url=req.image_url, data_id=req.data_id)
        except BadRequest:
            raise
        except SearchError as exc:
            note("image_search_failed", time.perf_counter() - t0)
            return {"ok": False, "error": str(exc), "hits": [], "text": IMAGE_SEARCH_ERROR}
        note("image_search", time.perf_counter() - t0)
        text, _ = render_image_results(hits)
        return {"ok": True, "hits": [hit_to_dict(h) for h in hits], "text": text}

    @app.post("/text_search")
    def text_search(req: TextRequest) -> Any:
        t0 = time.perf_counter()
        try:
            hits = tools.text_search(req.query, req.question)
        except BadRequest:
            raise
        except SearchError as exc:
            note("text_search_failed", time.perf_counter() - t0)
            return {"ok": False, "error": str(exc), "hits": [], "text": TEXT_SEARCH_ERROR}
        note("text_search", time.perf_counter() - t0)
        return {"ok": True, "hits": [hit_to_dict(h) for h in hits], "text": render_text_results(hits)}

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "backend": tools.backend.name, "uptime_s": round(time.time() - started, 1)}

    @app.get("/metrics")
    def metrics() -> dict[str, Any]:
        with lock:
            reqs = dict(requests)
            mean_ms = {k: round(1000 * latency[k] / requests[k], 2) for k in requests if requests[k]}
        return {"requests": reqs, "mean_latency_ms": mean_ms, **tools.stats()}

    return app


def serve(tools: SearchTools, config: ServiceConfig | None = None) -> None:
    """Run the service in the foreground (uvicorn) until interrupted."""
    import uvicorn

    cfg = config or tools.config.service
    uvicorn.run(create_app(tools, cfg), host=cfg.host, port=cfg.port, log_level="info")
