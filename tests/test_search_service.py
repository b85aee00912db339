"""`fvqa search serve` over loopback: concurrent clients, shared cache, bad requests, backend failures."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image

from fvqa.protocol import IMAGE_SEARCH_ERROR
from fvqa.search.client import SearchClient
from fvqa.search.config import SearchConfig
from fvqa.search.service import create_app
from fvqa.search.tools import SearchTools
from fvqa.search.types import BadRequest, Candidate, ImageHit, SearchError


class SlowBackend:
    """Sleeps a little per call and records the peak number of calls in flight."""

    name = "slow"
    cache_pages = False

    def __init__(self) -> None:
        self.calls = 0
        self.in_flight = self.peak = 0
        self.lock = threading.Lock()

    def _enter(self) -> None:
        with self.lock:
            self.calls += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        time.sleep(0.05)
        with self.lock:
            self.in_flight -= 1

    def image_search(self, image, k):
        if image.data_id == "explode":
            raise RuntimeError("backend down")
        self._enter()
        return [ImageHit(title=f"t{i}-{image.sha256[:4]}", url=f"https://x/{i}", thumbnail=None) for i in range(k)]

    def text_candidates(self, query, n):
        self._enter()
        return [Candidate(url=f"https://x/{query}/{i}", title=f"T{i}", ref=i) for i in range(n)]

    def read_page(self, cand):
        return f"{cand.title} is a page about {cand.url}. It has facts."


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (36, 36), (i * 20 % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def service(tmp_path: Path):
    cfg = SearchConfig.model_validate({
        "backend": "local", "service": {"image_concurrency": 2, "max_image_bytes": 20_000, "max_query_chars": 50},
    })
    backend = SlowBackend()
    tools = SearchTools(cfg, backend, cache_dir=tmp_path / "cache")
    server = uvicorn.Server(uvicorn.Config(create_app(tools), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", backend
    server.should_exit = True
    thread.join(5)


def test_concurrent_clients_share_cache_and_respect_limits(service) -> None:
    url, backend = service
    client = SearchClient(url)
    jobs = [("img", i % 4) for i in range(24)] + [("txt", i % 3) for i in range(12)]

    def run(job):
        kind, i = job
        if kind == "img":
            return client.image_search(_png(i))
        return client.text_search(f"query{i}", "what?")

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run, jobs))
    assert all(len(r) == 5 for r in results)
    assert results[0][0].title == results[4][0].title  # same image, same answer
    # 4 distinct images + 3 distinct queries: concurrent duplicates waited for the first call
    assert backend.calls == 7 and backend.peak <= 2 + 8  # image + text concurrency caps
    before = backend.calls
    assert client.image_search(_png(1))[0].title.startswith("t0-")
    client.text_search("query2", "what?")
    assert backend.calls == before
    metrics = client.stats()
    assert metrics["requests"]["image_search"] == 25 and metrics["requests"]["text_search"] == 13
    assert metrics["cache"]["layers"]["image"]["hits"] >= 1
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_image_concurrency_cap(service) -> None:
    url, backend = service
    client = SearchClient(url)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.image_search(_png(100 + i)), range(8)))
    assert backend.peak <= 2  # service.image_concurrency


def test_bad_requests_get_4xx_with_a_message(service) -> None:
    url, _ = service
    r = httpx.post(f"{url}/image_search", json={"image_b64": "***not base64***"})
    assert r.status_code == 400 and "not valid base64" in r.json()["detail"]
    r = httpx.post(f"{url}/image_search", json={"image_b64": "aGVsbG8="})  # b"hello"
    assert r.status_code == 400 and "not a decodable image" in r.json()["detail"]
    r = httpx.post(f"{url}/image_search", json={})
    assert r.status_code == 400 and "needs an image" in r.json()["detail"]
    for side, message in ((100, r"image is \d+ bytes, the limit is 20000"), (200, r"request body is \d+ bytes")):
        buf = io.BytesIO()
        Image.effect_noise((side, side), 80).convert("RGB").save(buf, format="PNG")
        with pytest.raises(BadRequest, match="HTTP 413.*" + message):
            SearchClient(url).image_search(buf.getvalue())
    r = httpx.post(f"{url}/text_search", json={"query": "x" * 51})
    assert r.status_code == 400 and "limit is 50" in r.json()["detail"]
    r = httpx.post(f"{url}/text_search", json={"question": "no query"})
    assert r.status_code == 422 and "query" in r.text
    r = httpx.post(f"{url}/text_search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_backend_failure_is_upstream_error_text_not_500(service) -> None:
    url, _ = service
    r = httpx.post(f"{url}/image_search", json={"data_id": "explode"})
    assert r.status_code == 200
    body = r.json()
    assert body["ok"] is False and body["text"] == IMAGE_SEARCH_ERROR and "backend down" in body["error"]
    with pytest.raises(SearchError, match="backend down"):
        SearchClient(url).image_search(None, data_id="explode")


def test_unreachable_service_is_a_search_error() -> None:
    with pytest.raises(SearchError, match="unreachable"):
        SearchClient("http://127.0.0.1:9", timeout_s=2).text_search("q")
