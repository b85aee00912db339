"""Web backend against recorded SerpAPI-shaped responses and pages served from loopback (no real network)."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from fvqa.errors import ConfigError
from fvqa.protocol import MISSING_THUMBNAIL, render_image_results, render_text_results
from fvqa.search.config import SearchConfig
from fvqa.search.reader import PageReader, check_url
from fvqa.search.tools import make_search_tools
from fvqa.search.types import BadRequest, PageError, SearchError

KEY = "sk-serp-test-secret"


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), "orange").save(buf, format="JPEG")
    return buf.getvalue()


ARTICLE = (
    "<html><head><title>{t}</title></head><body><nav>Home | About</nav><article><h1>{t}</h1>"
    "<p>The {t} is a famous landmark that many people visit every single year.</p>"
    "<p>It was designed by the architect Alma Verde in the year 1887 after a long competition.</p>"
    "<p>Its height is 312 metres, which made it the tallest structure of its time in the region.</p>"
    "</article><footer>cookie banner</footer></body></html>"
)


class Server:
    """Records requests; routes: /search.json (by engine), /page/<name>, /thumb/<n>.jpg, /upload."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.fail_429 = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.hits["upload"] += 1
                self._send(200, json.dumps({"url": f"{outer.base}/uploaded/q.jpg"}).encode(), "application/json")

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(parts.query).items()}
                outer.hits[parts.path] += 1
                if parts.path == "/search.json":
                    assert q.get("api_key") == KEY
                    if outer.fail_429:
                        outer.fail_429 -= 1
                        return self._send(429, b'{"error": "rate limited"}', "application/json")
                    if q["engine"] == "google_lens":
                        outer.hits["lens_url:" + q["url"]] += 1
                        body = {"search_metadata": {"status": "Success"}, "visual_matches": [
                            {"position": i + 1, "title": f"Tower {i}", "link": f"https://site{i}.example/tower",
                             "source": "site", "thumbnail": f"{outer.base}/thumb/{i}.jpg"} for i in range(7)
                        ]}
                        body["visual_matches"][1]["thumbnail"] = f"{outer.base}/thumb/missing.jpg"
                    elif q["q"] == "nothing at all":
                        body = {"error": "Google hasn't returned any results for this query."}
                    elif q["q"] == "broken key":
                        return self._send(401, json.dumps({"error": f"Invalid API key {KEY}"}).encode(),
                                          "application/json")
                    else:
                        names = ["notfound", "garbage", "a", "slow", "b", "binary", "c", "d", "e", "f"]
                        body = {"organic_results": [
                            {"position": i + 1, "title": n.upper(), "link": f"{outer.base}/page/{n}",
                             "snippet": "..."} for i, n in enumerate(names[: int(q.get("num", 10))])
                        ]}
                    return self._send(200, json.dumps(body).encode(), "application/json")
                if parts.path.startswith("/thumb/"):
                    if "missing" in parts.path:
                        return self._send(404, b"", "text/plain")
                    return self._send(200, _jpeg(), "image/jpeg")
                name = parts.path.rsplit("/", 1)[-1]
                if name == "notfound":
                    return self._send(404, b"<html>nope</html>", "text/html")
                if name == "garbage":
                    return self._send(200, b"<<<\x00\x01 ]]>", "text/html")
                if name == "binary":
                    return self._send(200, b"%PDF-1.4", "application/pdf")
                if name == "slow":
                    time.sleep(1.5)
                if name == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "/page/a")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self._send(200, ARTICLE.format(t=f"Tower {name}").encode(), "text/html; charset=utf-8")

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # the client hanging up on /page/slow is the point of that page

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture
def cfg(server: Server, monkeypatch: pytest.MonkeyPatch) -> SearchConfig:
    monkeypatch.setenv("FVQA_TEST_SERP_KEY", KEY)
    return SearchConfig.model_validate({
        "backend": "web",
        "web": {"base_url": server.base, "api_key_env": "FVQA_TEST_SERP_KEY", "retries": 2},
        "reader": {"allow_private": True, "timeout_s": 0.5},
    })


def test_text_search_reads_pages_and_replaces_failures(cfg: SearchConfig, server: Server, tmp_path: Path) -> None:
    costs: list[tuple[str, int, float]] = []
    tools = make_search_tools(cfg, cache_dir=tmp_path, cost_hook=lambda *a: costs.append(a))
    hits = tools.text_search("famous tower", "Who designed this tower?")
    # 404, garbage HTML, a timeout and a PDF are each replaced by the next result, in rank order
    assert [h.title for h in hits] == ["A", "B", "C", "D", "E"]
    assert "Alma Verde" in hits[0].summary and "cookie" not in hits[0].summary
    assert hits[0].url == f"{server.base}/page/a"
    assert costs == [("search_text", 1, 0.015)]
    text = render_text_results(hits)
    assert text.startswith("[Text Search Results]") and f"1. (link:{server.base}/page/a) " in text

    # second identical call: no API call, no page fetch except the transient timeout
    api_before, slow_before, a_before = server.hits["/search.json"], server.hits["/page/slow"], server.hits["/page/a"]
    assert tools.text_search("famous tower", "Who designed this tower?") == hits
    assert server.hits["/search.json"] == api_before and server.hits["/page/a"] == a_before
    assert server.hits["/page/slow"] == slow_before + 1
    assert len(costs) == 1
    tools.close()


def test_no_results_and_api_errors(cfg: SearchConfig, server: Server, tmp_path: Path) -> None:
    tools = make_search_tools(cfg, cache_dir=tmp_path)
    assert tools.text_search("nothing at all", "q") == []
    with pytest.raises(SearchError) as info:
        tools.text_search("broken key", "q")
    assert "HTTP 401" in str(info.value) and KEY not in str(info.value)  # the key never leaks
    server.fail_429 = 2  # two 429s, then success within the 3 attempts
    assert len(tools.text_search("retry me", "q")) == 5


def test_lens_by_url_and_upload(cfg: SearchConfig, server: Server, tmp_path: Path) -> None:
    tools = make_search_tools(cfg, cache_dir=tmp_path / "c1")
    with pytest.raises(BadRequest, match="public URL"):
        tools.image_search(_jpeg())
    hits = tools.image_search(_jpeg(), image_url="https://img.example/q.jpg")
    assert [h.title for h in hits] == [f"Tower {i}" for i in range(5)]
    assert hits[0].thumbnail[:2] == b"\xff\xd8" and hits[1].thumbnail is None
    assert server.hits["lens_url:https://img.example/q.jpg"] == 1
    text, images = render_image_results(hits)
    assert len(images) == 4 and MISSING_THUMBNAIL in text

    up = cfg.model_copy(update={"web": cfg.web.model_copy(update={"lens_input": "upload",
                                                                  "upload_url": f"{server.base}/upload"})})
    tools = make_search_tools(up, cache_dir=tmp_path / "c2")
    assert len(tools.image_search(_jpeg())) == 5
    assert server.hits["upload"] == 1 and server.hits[f"lens_url:{server.base}/uploaded/q.jpg"] == 1


def test_missing_key_is_a_clear_error(cfg: SearchConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FVQA_TEST_SERP_KEY")
    with pytest.raises(ConfigError, match="FVQA_TEST_SERP_KEY is not set"):
        make_search_tools(cfg, cache_dir=tmp_path)


def test_reader_ssrf_guard_and_redirects(server: Server) -> None:
    from fvqa.search.config import ReaderConfig

    guarded = PageReader(ReaderConfig())
    with pytest.raises(PageError, match="non-public address 127.0.0.1") as info:
        guarded.read(f"{server.base}/page/a")
    assert info.value.permanent
    for url in ("http://169.254.169.254/latest/meta-data", "http://10.0.0.1/", "http://[::1]/"):
        with pytest.raises(PageError, match="non-public"):
            check_url(url, allow_private=False)
    with pytest.raises(PageError, match="not an http"):
        check_url("file:///etc/passwd", allow_private=True)
    opened = PageReader(ReaderConfig(allow_private=True))
    assert "Alma Verde" in opened.read(f"{server.base}/page/redirect")
