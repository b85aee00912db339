"""A loopback HTTP server for tests and benchmarks, with scripted and fault-injected replies.

Routes map a path to a `Reply` (or to a function of the hit number returning one, for "429 first,
then 200"). Replies can delay before headers, trickle the body, lie about Content-Length and close
early (truncated transfer), redirect, or carry any headers. Unknown paths answer 404.

    with LoopbackServer({"/a.jpg": Reply(body=jpeg, content_type="image/jpeg")}) as srv:
        srv.url("/a.jpg")

`python tests/support/web_server.py --bench 2000 --latency 0.05 --fail 0.1` serves the downloader
benchmark's URL set (`/img/<i>.jpg`) from its own process and prints its port.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """What the server sends for one request."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before the status line
    trickle_s: float = 0.0  # between body chunks
    chunk: int = 4096
    truncate_at: int | None = None  # send this many body bytes, then close (Content-Length stays full)
    no_length: bool = False  # no Content-Length: the body ends when the connection closes


Route = Reply | Callable[[int], Reply]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes; with Nagle on, a kept-alive connection waits for the
    # client's delayed ACK (40 ms on Linux) between them. Real servers (nginx, CDNs) set TCP_NODELAY.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        srv = self.server
        with srv.lock:
            srv.hits[path] += 1
            n = srv.hits[path]
            srv.queries.append(self.path)
        route = srv.routes.get(path) or (srv.fallback(path) if srv.fallback else None)
        reply = route(n) if callable(route) else route
        if reply is None:
            reply = Reply(404, b"not found", "text/plain")
        if reply.delay_s:
            time.sleep(reply.delay_s)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            if not reply.no_length:
                self.send_header("Content-Length", str(len(reply.body)))
            for k, v in reply.headers.items():
                self.send_header(k, v)
            if reply.truncate_at is not None or reply.no_length:
                self.send_header("Connection", "close")
            self.end_headers()
            body = reply.body if reply.truncate_at is None else reply.body[: reply.truncate_at]
            for i in range(0, len(body), reply.chunk):
                self.wfile.write(body[i: i + reply.chunk])
                self.wfile.flush()
                if reply.trickle_s:
                    time.sleep(reply.trickle_s)
            if reply.truncate_at is not None or reply.no_length:
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, routes: dict[str, Route], fallback: Callable[[str], Route | None] | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes
        self.fallback = fallback
        self.hits: Counter[str] = Counter()
        self.queries: list[str] = []
        self.lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-reply (timeouts, size limits) are part of the tests


class LoopbackServer:
    """Start with `with LoopbackServer(routes) as srv:`; `srv.url(path)`, `srv.hits[path]`."""

    def __init__(self, routes: dict[str, Route] | None = None,
                 fallback: Callable[[str], Route | None] | None = None) -> None:
        self._server = _Server(dict(routes or {}), fallback)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def hits(self) -> Counter[str]:
        return self._server.hits

    @property
    def queries(self) -> list[str]:
        return self._server.queries

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, route: Route) -> None:
        self._server.routes[path] = route

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- helpers for building test bodies ----------------------------------------------------------
def jpeg_bytes(seed: int, size: tuple[int, int] = (160, 120), fmt: str = "JPEG") -> bytes:
    """A distinct picture per seed (blocks of random colour), so perceptual hashes differ."""
    from PIL import Image

    rng = random.Random(seed)
    small = Image.new("RGB", (8, 8))
    small.putdata([tuple(rng.randint(0, 255) for _ in range(3)) for _ in range(64)])
    img = small.resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(side: int = 10_000) -> bytes:
    """A small PNG that claims side x side pixels (a decompression bomb), built without allocating it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * side  # filter byte + one grey byte per pixel
    comp = zlib.compressobj(9)
    raw = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def bench_failures(n: int, fail: float) -> dict[int, int | str]:
    """The benchmark's failing URLs, `/img/<i>.jpg` -> 404, 500 or "html" (HTML served as image/jpeg)."""
    rng = random.Random(0)
    failing = [i for i in range(n) if rng.random() < fail]
    return {i: (404, 500, "html")[i % 3] for i in failing}


def _bench_main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bench", type=int, required=True, help="number of /img/<i>.jpg URLs")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--fail", type=float, default=0.1)
    args = parser.parse_args()
    bodies = [jpeg_bytes(i, (320, 240)) for i in range(64)]
    failing = bench_failures(args.bench, args.fail)

    def fallback(path: str) -> Route | None:
        if not path.startswith("/img/"):
            return None
        i = int(path.rsplit("/", 1)[1].split(".")[0])
        kind = failing.get(i)
        if kind == 404:
            return Reply(404, b"gone", "text/plain", delay_s=args.latency)
        if kind == 500:
            return Reply(500, b"oops", "text/plain", delay_s=args.latency)
        if kind == "html":
            return Reply(200, b"<html>not an image</html>", "image/jpeg", delay_s=args.latency)
        return Reply(200, bodies[i % len(bodies)], "image/jpeg", delay_s=args.latency)

    srv = LoopbackServer(fallback=fallback)
    with srv:
        print(srv.port, len(failing), flush=True)
        try:
            sys.stdin.read()  # serve until the parent closes our stdin
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    _bench_main()
