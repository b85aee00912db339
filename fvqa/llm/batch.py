"""OpenAI Batch API: write JSONL, upload, create a batch, poll, download, merge into the cache.

Exactly-once spending across crashes: a job's row (its keys) is committed before its file is
uploaded, the file id before the batch is created, and the batch carries `metadata.fvqa_job`, so a
process killed at any point finds its batch again (by id, or by listing batches) on the next run
and polls it instead of paying twice. `custom_id` is the request's cache key: stable across runs and
mapped straight back into the cache when results arrive.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from fvqa.errors import FvqaError
from fvqa.formats.jsonl import BadLine, parse_jsonl
from fvqa.llm.cache import TERMINAL
from fvqa.llm.client import CACHEABLE_STATUS, LLMClient, LLMResult, Messages, parse_retry_after, valid_body
from fvqa.llm.images import BadImageError

MAX_LINES = 50_000  # OpenAI's per-batch limit
MAX_BYTES = 190_000_000  # under the 200 MB file limit
DONE = ("completed", "failed", "expired", "cancelled")


class BatchError(FvqaError):
    """The Batch API could not be reached or refused a control call; re-running resumes."""


@dataclass
class BatchOutcome:
    results: dict[str, LLMResult] = field(default_factory=dict)  # id -> result (finished ones)
    pending: list[str] = field(default_factory=list)  # ids whose batch is still running
    batch_ids: list[str] = field(default_factory=list)


class BatchRunner:
    """Runs requests through the Batch API of the client's first endpoint, sharing its cache."""

    def __init__(self, client: LLMClient, *, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES) -> None:
        self.client = client
        self.cache = client.cache
        self.ep = client._eps[0]
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.work_dir = Path(self.cache.dir) / "batches"

    async def run(
        self,
        requests: Mapping[str, Messages],
        *,
        wait: bool = True,
        poll_s: float | None = None,
        max_wait_s: float | None = None,
        **params: Any,
    ) -> BatchOutcome:
        """Answer `requests` (id -> messages) from the cache, running batches, or new batches.

        `wait=False` polls once and returns: ids still running are listed in `pending`; run again later."""
        self.client._open()
        poll_s = poll_s if poll_s is not None else self.client.cfg.batch_poll_s
        keys = {rid: self.client.key_for(msgs, **params) for rid, msgs in requests.items()}
        messages_by_key = {keys[rid]: msgs for rid, msgs in requests.items()}
        missing = sorted({k for k in keys.values() if self.client.lookup(k) is None})
        open_jobs = self._resumable_jobs(missing)
        in_flight = {k for job_keys in open_jobs.values() for k in job_keys}
        bad: dict[str, LLMResult] = {}
        new_jobs = await self._write_jobs(
            [k for k in missing if k not in in_flight], messages_by_key, params, bad
        )
        for job in [*open_jobs, *new_jobs]:
            await self._ensure_submitted(job)
        fresh = await self._poll(list(dict.fromkeys([*open_jobs, *new_jobs])), wait, poll_s, max_wait_s)
        return self._collect(keys, open_jobs | new_jobs, fresh, bad)

    # -- jobs -------------------------------------------------------------------------------------

    def _resumable_jobs(self, missing: list[str]) -> dict[str, list[str]]:
        """Unfinished jobs holding any missing key; a job never uploaded is abandoned and rebuilt."""
        out = {}
        for job, job_keys in self.cache.open_jobs_for(missing).items():
            info = self.cache.job(job)
            if info is None or info.input_file_id is None:
                self.cache.update_job(job, status="abandoned")
                continue
            out[job] = job_keys
        return out

    async def _write_jobs(
        self,
        keys: list[str],
        messages_by_key: dict[str, Messages],
        params: dict[str, Any],
        bad: dict[str, LLMResult],
    ) -> dict[str, list[str]]:
        """Write JSONL files of at most max_lines / max_bytes, record each job, then upload it."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        jobs: dict[str, list[str]] = {}
        chunk: list[str] = []
        size = 0
        job = uuid.uuid4().hex
        fh = (self.work_dir / f"{job}.jsonl").open("wb")
        try:
            for key in keys:
                try:
                    payload = await self.client.wire_payload(messages_by_key[key], **params)
                except BadImageError as exc:
                    bad[key] = LLMResult(ok=False, key=key, error_class="bad_image", error=str(exc))
                    continue
                line = (
                    json.dumps(
                        {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": payload},
                        ensure_ascii=False,
                    ).encode()
                    + b"\n"
                )
                if chunk and (len(chunk) >= self.max_lines or size + len(line) > self.max_bytes):
                    fh.close()
                    jobs[job] = await self._upload(job, chunk)
                    chunk, size, job = [], 0, uuid.uuid4().hex
                    fh = (self.work_dir / f"{job}.jsonl").open("wb")
                fh.write(line)
                chunk.append(key)
                size += len(line)
        finally:
            fh.close()
        if chunk:
            jobs[job] = await self._upload(job, chunk)
        else:
            (self.work_dir / f"{job}.jsonl").unlink(missing_ok=True)
        return jobs

    async def _upload(self, job: str, keys: list[str]) -> list[str]:
        path = self.work_dir / f"{job}.jsonl"
        self.cache.add_job(job, self.ep.endpoint.base_url, keys)
        content = path.read_bytes()

        def form() -> aiohttp.FormData:  # a FormData is consumed by one send: build one per attempt
            fd = aiohttp.FormData()
            fd.add_field("purpose", "batch")
            fd.add_field("file", content, filename=path.name, content_type="application/jsonl")
            return fd

        data = await self._call("POST", "/files", data=form)
        self.cache.update_job(job, input_file_id=data["id"], status="uploaded")
        path.unlink(missing_ok=True)
        return keys

    async def _ensure_submitted(self, job: str) -> None:
        info = self.cache.job(job)
        assert info is not None and info.input_file_id is not None
        if info.batch_id:
            return
        batch_id = await self._find_batch(job)  # created before a crash, id not yet recorded?
        if batch_id is None:
            data = await self._call(
                "POST",
                "/batches",
                json={
                    "input_file_id": info.input_file_id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                    "metadata": {"fvqa_job": job},
                },
            )
            batch_id = data["id"]
        self.cache.update_job(job, batch_id=batch_id, status="submitted")

    async def _find_batch(self, job: str, pages: int = 10) -> str | None:
        after = None
        for _ in range(pages):
            query = {"limit": 100, **({"after": after} if after else {})}
            data = await self._call("GET", "/batches", params=query)
            for b in data.get("data", []):
                if (b.get("metadata") or {}).get("fvqa_job") == job:
                    return b["id"]
            if not data.get("has_more") or not data.get("data"):
                return None
            after = data["data"][-1]["id"]
        return None

    # -- polling and merging ----------------------------------------------------------------------

    async def _poll(self, jobs: list[str], wait: bool, poll_s: float, max_wait_s: float | None) -> set[str]:
        """Poll until every job is done (or once if not waiting); return keys merged now."""
        fresh: set[str] = set()
        active = list(jobs)
        deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
        while active:
            for job in list(active):
                info = self.cache.job(job)
                assert info is not None and info.batch_id is not None
                batch = await self._call("GET", f"/batches/{info.batch_id}")
                if batch.get("status") in DONE:
                    fresh |= await self._merge(job, batch)
                    status = "merged" if batch["status"] == "completed" else batch["status"]
                    self.cache.update_job(job, status=status)
                    active.remove(job)
            if not active or not wait or (deadline is not None and time.monotonic() >= deadline):
                break
            await asyncio.sleep(poll_s)
        return fresh

    async def _merge(self, job: str, batch: dict[str, Any]) -> set[str]:
        """Store every successful line (and deterministic errors) of the output files in the cache."""
        job_keys = set(self.cache.job_keys(job))
        stored: set[str] = set()
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if not file_id:
                continue
            text = await self._call("GET", f"/files/{file_id}/content", raw=True)
            for rec in parse_jsonl(text):
                if isinstance(rec, BadLine):
                    continue  # a torn line is simply not merged; its request is sent again later
                row = rec[1]
                key = row.get("custom_id")
                resp = row.get("response") or {}
                if key not in job_keys or not isinstance(resp, dict):
                    continue
                code = resp.get("status_code")
                body = resp.get("body")
                if code == 200 and valid_body(body):
                    self.cache.put_ok(key, body, self.client.cfg.model)
                    stored.add(key)
                elif code in CACHEABLE_STATUS:
                    msg = (
                        ((body or {}).get("error") or {}).get("message", "") if isinstance(body, dict) else ""
                    )
                    self.cache.put_error(
                        key,
                        f"http_{code}",
                        f"HTTP {code} in batch {batch['id']}: {msg}"[:600],
                        self.client.cfg.model,
                    )
                    stored.add(key)
        return stored

    def _collect(
        self, keys: dict[str, str], jobs: dict[str, list[str]], fresh: set[str], bad: dict[str, LLMResult]
    ) -> BatchOutcome:
        out = BatchOutcome()
        job_of = {k: job for job, ks in jobs.items() for k in ks}
        for job in jobs:
            info = self.cache.job(job)
            if info is not None and info.batch_id:
                out.batch_ids.append(info.batch_id)
        billed: set[str] = set()
        for rid, key in keys.items():
            if key in bad:
                out.results[rid] = self.client.record(bad[key]) if key not in billed else bad[key]
                billed.add(key)
                continue
            res = self.client.lookup(key)
            if res is not None:
                if key in fresh and key not in billed:
                    res.cached = False  # paid for in this run (at batch price)
                self.client.record(res, batch=True)
                billed.add(key)
                out.results[rid] = res
                continue
            info = self.cache.job(job_of[key]) if key in job_of else None
            if info is not None and info.status not in TERMINAL:
                out.pending.append(rid)
            else:
                status = info.status if info else "unknown"
                out.results[rid] = self.client.record(
                    LLMResult(
                        ok=False,
                        key=key,
                        error_class="batch_" + status,
                        error=f"batch {info.batch_id if info else '?'} ended '{status}' without a reply for this "
                        "request; it is sent again on the next run",
                    )
                )
        return out

    # -- HTTP -------------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        """A control call with the client's retry policy; BatchError when it keeps failing."""
        http = self.ep.http
        assert http is not None
        cfg = self.client.cfg
        last = ""
        url = self.ep.endpoint.base_url + path
        for attempt in range(cfg.max_retries + 1):
            wait = 0.0
            args = {k: (v() if callable(v) else v) for k, v in kwargs.items()}
            try:
                async with http.request(method, url, **args) as resp:
                    status, headers, text = resp.status, resp.headers, await resp.text(errors="replace")
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{type(exc).__name__}"
            else:
                if status == 200:
                    if raw:
                        return text
                    try:
                        return json.loads(text)
                    except ValueError:
                        last = f"non-JSON reply {text[:100]!r}"
                else:
                    last = f"HTTP {status}: {text[:300]}"
                    if status < 500 and status not in (408, 409, 429):
                        break
                    wait = parse_retry_after(headers) or 0.0
            if attempt < cfg.max_retries:
                backoff = min(cfg.backoff_max_s, cfg.backoff_base_s * 2**attempt) * random.uniform(0.5, 1.0)
                await asyncio.sleep(max(wait, backoff))
        last = last.replace(self.ep.key, "***") if self.ep.key else last
        raise BatchError(f"Batch API call {method} {path} on {self.ep.endpoint.base_url} failed: {last}")
