"""A loopback stand-in for the GPT-4o judge, so `make eval-demo` runs the whole judged eval offline.

DEMO STAND-IN, not a judge: it speaks the OpenAI chat-completions wire format on 127.0.0.1 and
decides by substring match (`fvqa.answers.sub_exact_match`) of the model's answer against the
ground truth and candidates it reads from fvqa's judge prompt. The eval goes through the real judge
path (prompt, request, cache, parsing, scoring, report); only the verdict is a rule. Every reply
says so in its reason, and the model name it answers as (`demo-stand-in-judge`) ends up in the
report's judge id.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fvqa.answers import sub_exact_match

MODEL = "demo-stand-in-judge"
REASON = "DEMO STAND-IN judge: substring match of the answer against the ground truth, not GPT-4o"
_FIELD = re.compile(r"^(Ground truth|Candidate answers):[ \t]*(.*)$", re.MULTILINE)
_ANSWER = re.compile(r"^Model's answer:[ \t]*(.*?)(?:\n\nReply in exactly|\Z)", re.MULTILINE | re.DOTALL)


def _prompt_text(body: dict[str, Any]) -> str:
    """The text of the last user message (a string, or the text parts of a content list)."""
    user = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    content = user[-1].get("content") if user else ""
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def verdict(prompt: str) -> str:
    """The stand-in's reply to one judge prompt: binary or SimpleVQA's three grades."""
    fields: dict[str, str] = {}
    for m in _FIELD.finditer(prompt):
        fields.setdefault(m.group(1), m.group(2).strip())
    answer = _ANSWER.search(prompt)  # a whole response (paper style) may span lines
    if answer is not None:
        fields["Model's answer"] = answer.group(1).strip()
    if "Ground truth" not in fields or "Model's answer" not in fields:
        return f"<judge>No</judge> <reason>{REASON}; the prompt is not in fvqa's judge layout</reason>"
    golds = [fields["Ground truth"]]
    candidates = fields.get("Candidate answers", "")
    if candidates and candidates != "(none)":
        golds += [c.strip() for c in candidates.split(";") if c.strip()]
    correct = sub_exact_match(fields["Model's answer"], golds) >= 0.5
    if "<grade>" in prompt:
        grade = "correct" if correct else ("not_attempted" if not fields["Model's answer"] else "incorrect")
        return f"<grade>{grade}</grade> <reason>{REASON}</reason>"
    return f"<judge>{'Yes' if correct else 'No'}</judge> <reason>{REASON}</reason>"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        except (ValueError, json.JSONDecodeError):
            self._send(400, {"error": {"message": "request body is not JSON"}})
            return
        prompt = _prompt_text(body)
        text = verdict(prompt)
        self._send(200, {
            "id": f"standin-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4,
                      "total_tokens": (len(prompt) + len(text)) // 4},
        })

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: the eval logs progress
        return


class StandInJudge:
    """The stand-in judge on a free loopback port for the duration of a `with` block."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StandInJudge:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
