"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

Speaks the wire format of `/v1/chat/completions`, `/v1/models`, `/v1/files`,
`/v1/files/{id}/content`, `/v1/batches` (create, list), `/v1/batches/{id}` and
`/v1/batches/{id}/cancel`. `inject_route` scripts faults on those control routes, including
ambiguous ones (the batch is created, the reply is a 500 or comes too late). Replies are scripted (a function of
the request body) and faults are injected in order (429 with Retry-After, 5xx, hangs, non-JSON).
Every request is recorded so tests can assert counts and the absence of repeats.

    with FakeOpenAI(lambda body: '{"answer": "Paris"}') as srv:
        srv.inject(rate_limited(1.0), server_error())
        ... LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=None)]) ...
        assert srv.count("POST", "/v1/chat/completions") == 3

Run standalone (used by the benchmark, so the server does not share the client's GIL):
`python tests/support/fake_openai.py --latency 0.2` prints `port=<n>` and serves until killed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """A scripted HTTP reply; `body=None` with status 200 means "the responder's normal answer"."""

    status: int = 200
    body: Any = None  # dict/list -> JSON; str/bytes -> sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to hold the request before answering (a hang past the timeout)
    content_type: str = "application/json"
    applied: bool = False  # route faults only: the request takes effect, then this reply is sent


def completion(
    content: str,
    *,
    model: str = "fake-model",
    prompt_tokens: int = 10,
    completion_tokens: int | None = None,
    finish_reason: str = "stop",
) -> dict[str, Any]:
    """A chat.completion body."""
    ctoks = completion_tokens if completion_tokens is not None else max(1, len(content) // 4)
    return {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": ctoks,
            "total_tokens": prompt_tokens + ctoks,
        },
    }


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def rate_limited(retry_after: float = 1.0) -> Reply:
    return Reply(
        429, error_body("Rate limit reached", "rate_limit_error"), {"Retry-After": f"{retry_after:g}"}
    )


def server_error(status: int = 500) -> Reply:
    return Reply(status, error_body("The server had an error", "server_error"))


def hang(seconds: float) -> Reply:
    return Reply(delay=seconds)


def not_json() -> Reply:
    return Reply(200, "<html><body>502 Bad Gateway</body></html>", content_type="text/html")


def ambiguous(status: int = 500) -> Reply:
    """For `inject_route`: the server does what was asked (creates the batch) but answers 5xx."""
    return Reply(status, error_body("The server had an error", "server_error"), applied=True)


def slow(seconds: float) -> Reply:
    """For `inject_route`: the request takes effect, the normal reply comes `seconds` late."""
    return Reply(delay=seconds, applied=True)


def bad_request(message: str = "Invalid request") -> Reply:
    return Reply(400, error_body(message))


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message (helper for responders)."""
    for msg in reversed(body.get("messages", [])):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            return " ".join(
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
    return ""


def echo(body: dict[str, Any]) -> str:
    return "echo: " + last_user_text(body)


Responder = Callable[[dict[str, Any]], "str | dict[str, Any] | Reply"]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    t: float
    status: int = 0  # filled in when the reply is sent (0: never answered)

    def header(self, name: str) -> str | None:
        """A request header by name, case-insensitively (the openai SDK's httpx sends lowercase names)."""
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class FakeOpenAI:
    """The server; a context manager. Attributes may be changed while it runs."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        latency: float = 0.0,
        batch_polls: int = 2,
        model: str = "fake-model",
        port: int = 0,
    ) -> None:
        self.responder: Responder = responder or echo
        self.latency = latency
        self.batch_polls = batch_polls  # GETs of a batch before it completes
        self.hold_batches = False  # keep batches in_progress while True
        self.batch_final_status = "completed"  # or "expired", "failed"
        self.model = model
        self._faults: deque[Reply] = deque()
        self._route_faults: list[tuple[str, str, deque[Reply]]] = []
        self._lock = threading.Lock()
        self._records: list[Recorded] = []
        self._ids = itertools.count(1)
        self.files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._polls: dict[str, int] = {}
        self._stop = threading.Event()
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()  # releases hangs
        if self._thread.is_alive():  # shutdown() would wait forever for a loop that never ran
            self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting --------------------------------------------------------------------------------

    def inject(self, *replies: Reply) -> None:
        """Faults answered, in order, to the next chat requests (before the responder)."""
        with self._lock:
            self._faults.extend(replies)

    def inject_route(self, method: str, path: str, *replies: Reply) -> None:
        """Faults answered, in order, to the next requests of `method` on a path starting with
        `path` (files, batches...). A reply with `applied=True` (`ambiguous`, `slow`) lets the request
        take effect first; others refuse it."""
        with self._lock:
            self._route_faults.append((method, path, deque(replies)))

    def _route_fault(self, method: str, path: str) -> Reply | None:
        with self._lock:
            for m, prefix, queue in self._route_faults:
                if m == method and path.startswith(prefix) and queue:
                    return queue.popleft()
        return None

    def clear_faults(self) -> int:
        """Drop faults not yet served; returns how many there were."""
        with self._lock:
            n = len(self._faults)
            self._faults.clear()
            return n

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._records)

    def count(self, method: str | None = None, path: str = "", status: int | None = None) -> int:
        """Requests whose method matches and whose path starts with `path` (and status, if given)."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method)
            and r.path.startswith(path)
            and (status is None or r.status == status)
        )

    def chat_bodies(self, status: int | None = None) -> list[dict[str, Any]]:
        return [
            r.json
            for r in self.requests
            if r.path == "/v1/chat/completions" and (status is None or r.status == status)
        ]

    def reset_records(self) -> None:
        with self._lock:
            self._records.clear()

    # -- behaviour --------------------------------------------------------------------------------

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self._records.append(rec)

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):06d}"

    def chat(self, body: dict[str, Any], *, use_faults: bool = True) -> Reply:
        fault = None
        if use_faults:
            with self._lock:
                fault = self._faults.popleft() if self._faults else None
        if fault is not None and not (fault.status == 200 and fault.body is None):
            return fault
        out = self.responder(body)
        if isinstance(out, Reply):
            reply = out
        elif isinstance(out, str):
            reply = Reply(
                body=completion(
                    out,
                    model=body.get("model", self.model),
                    prompt_tokens=max(1, len(json.dumps(body.get("messages"))) // 4),
                )
            )
        else:
            reply = Reply(body=out)
        if fault is not None:  # a hang: the normal reply, late
            reply.delay = fault.delay
        return reply

    def _run_batch(self, batch: dict[str, Any]) -> None:
        _, data = self.files[batch["input_file_id"]]
        out_lines, err_lines = [], []
        for line in data.decode().splitlines():
            req = json.loads(line)
            reply = self.chat(req["body"], use_faults=False)
            row = {
                "id": self._next_id("batch_req"),
                "custom_id": req["custom_id"],
                "response": {
                    "status_code": reply.status,
                    "request_id": self._next_id("req"),
                    "body": reply.body,
                },
                "error": None,
            }
            (out_lines if reply.status == 200 else err_lines).append(json.dumps(row))
        for name, lines in (("output_file_id", out_lines), ("error_file_id", err_lines)):
            if lines:
                fid = self._next_id("file")
                content = ("\n".join(lines) + "\n").encode()
                self.files[fid] = (
                    {
                        "id": fid,
                        "object": "file",
                        "bytes": len(content),
                        "purpose": "batch_output",
                        "filename": f"{name}.jsonl",
                        "created_at": int(time.time()),
                        "status": "processed",
                    },
                    content,
                )
                batch[name] = fid
        n = len(out_lines) + len(err_lines)
        batch["request_counts"] = {"total": n, "completed": len(out_lines), "failed": len(err_lines)}
        batch["status"] = self.batch_final_status
        batch["completed_at"] = int(time.time())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True
    fake: FakeOpenAI


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else header and body writes meet delayed ACKs: +40 ms per reply
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, rec: Recorded, reply: Reply) -> None:
        fake = self.server.fake
        if reply.delay > 0 and fake._stop.wait(reply.delay):
            return
        body = reply.body
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body or b""
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in reply.headers.items():
                self.send_header(k, v)
            # one write for head and body: two small writes stall on delayed ACKs
            self._headers_buffer.append(b"\r\n" + data)
            self.wfile.write(b"".join(self._headers_buffer))
            self._headers_buffer = []
            rec.status = reply.status
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _handle(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        rec = Recorded(self.command, path, dict(self.headers.items()), raw, time.time())
        fake._record(rec)
        try:
            fault = fake._route_fault(self.command, path)
            if fault is not None and not fault.applied:
                reply = fault
            else:
                reply = self._route(fake, path, raw)
                if fault is not None:
                    if fault.status == 200 and fault.body is None:
                        reply.delay = max(reply.delay, fault.delay)
                    else:
                        reply = fault
        except Exception as exc:  # a bug in a responder must show up in the test, not hang it
            reply = Reply(500, error_body(f"fake server error: {type(exc).__name__}: {exc}"))
        self._send(rec, reply)

    do_GET = do_POST = do_DELETE = _handle

    def _route(self, fake: FakeOpenAI, path: str, raw: bytes) -> Reply:
        cmd = self.command
        if cmd == "POST" and path == "/v1/chat/completions":
            try:
                body = json.loads(raw)
            except ValueError:
                return Reply(400, error_body("We could not parse the JSON body of your request."))
            if fake.latency and fake._stop.wait(fake.latency):
                return Reply(503, error_body("shutting down"))
            return fake.chat(body)
        if cmd == "GET" and path == "/_fake/stats":  # for out-of-process users (the benchmark)
            return Reply(body={"requests": fake.count(), "chat": fake.count("POST", "/v1/chat/completions")})
        if cmd == "GET" and path == "/v1/models":
            return Reply(
                body={
                    "object": "list",
                    "data": [{"id": fake.model, "object": "model", "created": 0, "owned_by": "fake"}],
                }
            )
        if cmd == "POST" and path == "/v1/files":
            return self._upload(fake, raw)
        if cmd == "GET" and path.startswith("/v1/files/") and path.endswith("/content"):
            fid = path.split("/")[3]
            if fid not in fake.files:
                return Reply(404, error_body(f"No such File object: {fid}"))
            return Reply(body=fake.files[fid][1], content_type="application/octet-stream")
        if cmd == "GET" and path.startswith("/v1/files/"):
            fid = path.split("/")[3]
            return (
                Reply(body=fake.files[fid][0])
                if fid in fake.files
                else Reply(404, error_body("No such File"))
            )
        if cmd == "POST" and path == "/v1/batches":
            return self._create_batch(fake, raw)
        if cmd == "GET" and path == "/v1/batches":
            with fake._lock:
                data = sorted(fake.batches.values(), key=lambda b: b["id"], reverse=True)
            return Reply(
                body={
                    "object": "list",
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                }
            )
        if cmd == "POST" and path.startswith("/v1/batches/") and path.endswith("/cancel"):
            return self._cancel_batch(fake, path.split("/")[3])
        if cmd == "GET" and path.startswith("/v1/batches/"):
            return self._get_batch(fake, path.split("/")[3])
        return Reply(404, error_body(f"Unknown route {cmd} {path}"))

    def _upload(self, fake: FakeOpenAI, raw: bytes) -> Reply:
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            return Reply(400, error_body("expected multipart/form-data"))
        msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
        if "file" not in fields or fields.get("purpose", (None, b""))[1] != b"batch":
            return Reply(400, error_body("file and purpose=batch are required"))
        filename, content = fields["file"]
        for i, line in enumerate(content.decode().splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                return Reply(400, error_body(f"line {i} of the file is not JSON"))
        fid = fake._next_id("file")
        meta = {
            "id": fid,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename or "upload.jsonl",
            "purpose": "batch",
            "status": "processed",
        }
        with fake._lock:
            fake.files[fid] = (meta, content)
        return Reply(body=meta)

    def _create_batch(self, fake: FakeOpenAI, raw: bytes) -> Reply:
        body = json.loads(raw or b"{}")
        if body.get("input_file_id") not in fake.files:
            return Reply(400, error_body("input_file_id does not exist"))
        bid = fake._next_id("batch")
        batch = {
            "id": bid,
            "object": "batch",
            "endpoint": body.get("endpoint"),
            "errors": None,
            "input_file_id": body["input_file_id"],
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(time.time()),
            "completed_at": None,
            "metadata": body.get("metadata"),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        with fake._lock:
            fake.batches[bid] = batch
            fake._polls[bid] = 0
        return Reply(body=batch)

    def _cancel_batch(self, fake: FakeOpenAI, bid: str) -> Reply:
        """Cancels a running batch at once (nothing billed); a finished one answers 400, like OpenAI."""
        with fake._lock:
            batch = fake.batches.get(bid)
            if batch is None:
                return Reply(404, error_body(f"No such Batch: {bid}"))
            if batch["status"] in ("completed", "failed", "expired"):
                return Reply(400, error_body(f"Cannot cancel a batch with status '{batch['status']}'."))
            batch["status"] = "cancelled"
            batch["cancelled_at"] = int(time.time())
            return Reply(body=json.loads(json.dumps(batch)))

    def _get_batch(self, fake: FakeOpenAI, bid: str) -> Reply:
        with fake._lock:
            batch = fake.batches.get(bid)
            if batch is None:
                return Reply(404, error_body(f"No such Batch: {bid}"))
            fake._polls[bid] += 1
            if batch["status"] == "validating":
                batch["status"] = "in_progress"
            elif (
                batch["status"] == "in_progress"
                and not fake.hold_batches
                and fake._polls[bid] >= fake.batch_polls
            ):
                fake._run_batch(batch)
            return Reply(body=json.loads(json.dumps(batch)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    args = ap.parse_args()
    with FakeOpenAI(latency=args.latency, port=args.port) as srv:
        print(f"port={srv.port}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    sys.exit(0)


if __name__ == "__main__":
    main()
