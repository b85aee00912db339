"""OpenAI Batch API: write JSONL, upload, create a batch, poll, download, merge into the cache.

Exactly-once spending across crashes: a job's row (its keys) is committed before its file is
uploaded, the file id before the batch is created, and the batch carries `metadata.fvqa_job`, so a
process killed at any point finds its batch again (by id, or by listing batches) on the next run
and polls it instead of paying twice. `custom_id` is the request's cache key: stable across runs and
mapped straight back into the cache when results arrive.

Creating a batch is not idempotent, so it is never retried blindly (a 500 that created the batch, or
a create slower than the timeout, used to make 2-6 batches for one job). The protocol:

1. the job (its keys) is committed, then the file uploaded (an ambiguous upload may leave a second,
   unused file: harmless) and its id committed; the job is marked `creating` before the POST;
2. before any create, existing batches are listed and one carrying `metadata.fvqa_job` (or the
   job's input file) is adopted;
3. a create that fails *ambiguously* (5xx, timeout, connection lost after sending) is followed by a
   pause and a new listing, never by a blind second POST; a create refused outright (429, 4xx,
   connection refused) created nothing and may be retried;
4. if several batches exist for one job, the oldest is kept and the others cancelled. A duplicate
   that could not be cancelled in time is polled to its end and whatever it billed is booked (spend
   table and ledger), its replies never merged a second time.

Every reply merged is stored with its spend row (stage, tokens, batch-price dollars, batch id) in one
transaction, and merging the same batch again after a kill books nothing twice. Lines a batch did
not answer go into a new batch on the next run, or online in this run with `batch_online_fallback`.
File upload and download use `batch_transfer_timeout_s`, not the chat `timeout_s`.

The control calls go through the `openai` SDK (`files.create`, `batches.create/retrieve/list/cancel`,
`files.content`), where throughput does not matter; the chat hot path stays on aiohttp
(`fvqa.llm.client`). The SDK client is built with `max_retries=0`: its own retries would POST
`/batches` again after a 500 or a timeout, which is exactly the duplicate this protocol prevents;
the retries here are fvqa's retry policy, applied per call as described above.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from fvqa.errors import FvqaError
from fvqa.formats.jsonl import BadLine, parse_jsonl
from fvqa.llm.cache import TERMINAL
from fvqa.llm.client import CACHEABLE_STATUS, LLMClient, LLMResult, Messages, valid_body
from fvqa.llm.images import BadImageError
from fvqa.net.retry import parse_retry_after

MAX_LINES = 50_000  # OpenAI's per-batch limit
MAX_BYTES = 190_000_000  # under the 200 MB file limit
DONE = ("completed", "failed", "expired", "cancelled")
_NEVER_CONNECTED = ("ConnectError", "ConnectTimeout")  # the SDK transport's errors before any byte was sent

if TYPE_CHECKING:
    import openai  # imported where a batch runs: it costs ~0.5 s, every `import fvqa.llm` would pay it

SdkCall = Callable[["openai.AsyncOpenAI", dict[str, Any]], Awaitable[Any]]  # (client, extra_headers) -> reply


class BatchError(FvqaError):
    """The Batch API could not be reached or refused a control call; re-running resumes."""


class _Ambiguous(Exception):
    """A non-idempotent call may or may not have taken effect (5xx, timeout, connection lost)."""


class _Refused(Exception):
    """A call that certainly did not take effect but may be tried again (429, connection refused)."""


class _CallFailed(Exception):
    """One failed idempotent Batch API call; `retry` when another attempt may succeed."""

    def __init__(self, message: str, *, retry: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry = retry
        self.retry_after = retry_after


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
        self.price = client.cfg.price_at(self.ep.endpoint.base_url)
        self.line_errors: dict[str, str] = {}  # key -> why its batch line failed (this run)
        self._sdk: openai.AsyncOpenAI | None = None  # open during `run`
        self._auth: dict[str, Any] = {}  # extra headers of every control call (set with the SDK client)

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
        self._sdk = self._new_sdk()
        try:
            return await self._run(requests, wait, poll_s, max_wait_s, params)
        finally:
            await self._sdk.close()
            self._sdk = None

    def _new_sdk(self) -> openai.AsyncOpenAI:
        """The SDK client for the control calls: no SDK retries (module doc), the chat `timeout_s`."""
        import openai

        cfg = self.client.cfg
        # a keyless (self-hosted) endpoint gets no Authorization header, as on the chat path
        self._auth = {} if self.ep.key else {"Authorization": openai.Omit()}
        return openai.AsyncOpenAI(
            base_url=self.ep.endpoint.base_url, api_key=self.ep.key or "unused", max_retries=0,
            timeout=openai.Timeout(cfg.timeout_s, connect=min(10.0, cfg.timeout_s)))

    async def _run(self, requests: Mapping[str, Messages], wait: bool, poll_s: float | None,
                   max_wait_s: float | None, params: dict[str, Any]) -> BatchOutcome:
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
        await self._settle_extras()  # duplicates left by earlier runs
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
        data = await self._call("POST", "/files", lambda sdk, auth: sdk.files.create(
            file=(path.name, content, "application/jsonl"), purpose="batch", timeout=self._transfer_timeout(),
            extra_headers=auth), transfer=True)
        self.cache.update_job(job, input_file_id=data["id"], status="uploaded")
        path.unlink(missing_ok=True)
        return keys

    async def _ensure_submitted(self, job: str) -> None:
        """Give `job` exactly one batch: adopt one that exists, else create it (see the module doc)."""
        info = self.cache.job(job)
        assert info is not None and info.input_file_id is not None
        if info.batch_id:
            return
        file_id = info.input_file_id
        batch_id = await self._adopt(job, file_id)  # created before a crash, id not yet recorded?
        ambiguous = False

        async def create_once() -> str:
            """Adopt what an ambiguous earlier POST may have created, else POST once (never blindly twice)."""
            nonlocal ambiguous
            if ambiguous and (found := await self._adopt(job, file_id)) is not None:
                return found
            self.cache.update_job(job, status="creating")
            try:
                created = await self._create(job, file_id)
            except _Ambiguous:
                ambiguous = True
                raise
            if ambiguous:  # an earlier attempt may have created one after all: keep this one
                await self._adopt(job, file_id, keep=created)
            return created

        if batch_id is None:
            try:  # only a create that certainly or maybe did nothing is tried again (module doc, step 3)
                batch_id = await self.client.retry_policy().retrying(
                    transient=lambda exc: isinstance(exc, _Ambiguous | _Refused))(create_once)
            except (_Ambiguous, _Refused) as exc:
                raise BatchError(
                    f"could not create a batch for job {job} on {self.ep.endpoint.base_url}: {exc}; "
                    "re-running looks for it again before creating one"
                ) from None
        self.cache.update_job(job, batch_id=batch_id, status="submitted")

    async def _create(self, job: str, file_id: str) -> str:
        """One POST /batches, classified: the batch id, `_Ambiguous`, `_Refused` or `BatchError`."""
        import openai

        assert self._sdk is not None
        try:
            batch = await self._sdk.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                metadata={"fvqa_job": job}, extra_headers=self._auth)
        except openai.APITimeoutError as exc:
            if _never_connected(exc):
                raise _Refused(_cause(exc)) from exc
            raise _Ambiguous(f"{_cause(exc)} after sending (timeout_s={self.client.cfg.timeout_s:g})") from exc
        except openai.APIConnectionError as exc:
            if _never_connected(exc):  # nothing was sent
                raise _Refused(_cause(exc)) from exc
            raise _Ambiguous(f"{_cause(exc)} after sending") from exc
        except openai.APIStatusError as exc:
            status, text = exc.status_code, exc.response.text
        except openai.APIResponseValidationError as exc:
            raise _Ambiguous(f"unreadable reply {exc.response.text[:100]!r}") from exc
        except ValueError as exc:  # a 200 whose JSON does not parse: the batch may exist
            raise _Ambiguous(f"unreadable reply ({exc})") from exc
        else:
            if isinstance(batch, BaseModel) and getattr(batch, "id", None):
                return str(batch.id)
            raise _Ambiguous(f"unreadable reply {str(batch)[:100]!r}")
        detail = self._redact(f"HTTP {status}: {text[:300]}")
        if status == 429:
            raise _Refused(detail)
        if status >= 500 or status in (408, 409):
            raise _Ambiguous(detail)
        raise BatchError(f"Batch API call POST /batches on {self.ep.endpoint.base_url} failed: {detail}")

    async def _adopt(self, job: str, file_id: str, *, keep: str | None = None) -> str | None:
        """The batch of `job` among those the server lists (by `metadata.fvqa_job` or input file):
        `keep` if given, else the oldest live one; every other live one is cancelled as a duplicate."""
        found = [
            b
            for b in await self._list_batches()
            if (b.get("metadata") or {}).get("fvqa_job") == job or b.get("input_file_id") == file_id
        ]
        live = [b for b in found if b.get("status") not in ("cancelled", "cancelling")]
        if keep is None and live:
            keep = min(live, key=lambda b: (b.get("created_at") or 0, str(b["id"])))["id"]
        for b in live:
            if b["id"] != keep and b["id"] not in self.cache.extra_batches(job):
                await self._cancel_duplicate(job, b)
        return keep

    async def _list_batches(self, pages: int = 10) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = None
        for _ in range(pages):
            data = await self._call("GET", "/batches", lambda sdk, auth, after=after: sdk.batches.list(
                limit=100, **({"after": after} if after else {}), extra_headers=auth))
            out += [b for b in data.get("data", []) if isinstance(b, dict) and "id" in b]
            if not data.get("has_more") or not data.get("data"):
                break
            after = data["data"][-1]["id"]
        return out

    async def _cancel_duplicate(self, job: str, batch: dict[str, Any]) -> None:
        """Cancel a second batch of `job`; it is recorded either way and polled until it ends, so
        whatever it billed before the cancel took (or if it could not be cancelled) is booked."""
        status = str(batch.get("status"))
        if status not in DONE:
            try:
                data = await self._call("POST", f"/batches/{batch['id']}/cancel", lambda sdk, auth: sdk.batches.cancel(
                    str(batch["id"]), extra_headers=auth))
                status = str(data.get("status") or "cancelling")
            except BatchError:
                status = "uncancelled"
        self.cache.add_extra_batch(job, str(batch["id"]), status)

    async def _settle_extras(self) -> None:
        """Poll duplicate batches; book the lines of those that ended (replies stored only if missing)."""
        for batch_id in self.cache.extra_batches():
            batch = await self._retrieve(batch_id)
            status = str(batch.get("status"))
            if status in ("in_progress", "validating", "finalizing"):
                try:  # not cancelled yet (the cancel failed earlier): try again
                    await self._call("POST", f"/batches/{batch_id}/cancel", lambda sdk, auth, b=batch_id:
                                     sdk.batches.cancel(b, extra_headers=auth))
                except BatchError:
                    pass
            if status not in DONE:
                continue
            if batch.get("output_file_id"):
                text = await self._content(str(batch["output_file_id"]))
                for key, code, body in self._lines(text):
                    if code != 200 or not valid_body(body):
                        continue
                    res = LLMResult.from_body(key, body, cached=False)
                    usd = self.price.usd(res.prompt_tokens, res.completion_tokens, batch=True)
                    if not self.cache.has(key):
                        self.cache.put_ok(key, body, self.client.cfg.model, stage=self.client.stage,
                                          usd=usd, batch=batch_id)
                    elif not self.cache.add_spend(key, self.client.stage, self.client.cfg.model, usd,
                                                  res.prompt_tokens, res.completion_tokens, batch_id):
                        continue  # booked by an earlier run
                    self.client.record(res, batch=True)
            self.cache.add_extra_batch(self._extra_job(batch), batch_id, "settled")

    def _extra_job(self, batch: dict[str, Any]) -> str:
        return str((batch.get("metadata") or {}).get("fvqa_job") or "?")

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
                batch = await self._retrieve(info.batch_id)
                if batch.get("status") in DONE:
                    fresh |= await self._merge(job, batch)
                    if self.cache.extra_batches(job):
                        await self._settle_extras()
                    status = "merged" if batch["status"] == "completed" else batch["status"]
                    self.cache.update_job(job, status=status)
                    active.remove(job)
            if not active or not wait or (deadline is not None and time.monotonic() >= deadline):
                break
            await asyncio.sleep(poll_s)
        return fresh

    async def _merge(self, job: str, batch: dict[str, Any]) -> set[str]:
        """Store every successful line (with its spend row) and deterministic errors in the cache."""
        job_keys = set(self.cache.job_keys(job))
        stored: set[str] = set()
        model = self.client.cfg.model
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if not file_id:
                continue
            text = await self._content(str(file_id))
            for key, code, body in self._lines(text):
                if key not in job_keys:
                    continue
                if code == 200 and valid_body(body):
                    self.cache.put_ok(key, body, model, stage=self.client.stage, price=self.price, batch=batch["id"])
                    stored.add(key)
                    continue
                msg = ((body or {}).get("error") or {}).get("message", "") if isinstance(body, dict) else ""
                why = f"HTTP {code} in batch {batch['id']}: {msg}"[:600]
                if code in CACHEABLE_STATUS:
                    self.cache.put_error(key, f"http_{code}", why, model)
                    stored.add(key)
                else:
                    self.line_errors[key] = why
        return stored

    @staticmethod
    def _lines(text: str) -> list[tuple[str, Any, Any]]:
        """(custom_id, status_code, body) of each readable line of a batch output or error file."""
        out = []
        for rec in parse_jsonl(text):
            if isinstance(rec, BadLine):
                continue  # a torn line is simply not merged; its request is sent again later
            row = rec[1]
            resp = row.get("response") if isinstance(row, dict) else None
            if not isinstance(resp, dict) or not isinstance(row.get("custom_id"), str):
                continue
            out.append((row["custom_id"], resp.get("status_code"), resp.get("body")))
        return out

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
                why = f"batch {info.batch_id if info else '?'} ended '{status}' without a reply for this request"
                if key in self.line_errors:
                    why += f" ({self.line_errors[key]})"
                then = (
                    "it is sent online now (batch_online_fallback)"
                    if self.client.cfg.batch_online_fallback
                    else "it is sent again on the next run, in a new batch (batch_online_fallback: true sends "
                    "it online now)"
                )
                out.results[rid] = self.client.record(
                    LLMResult(ok=False, key=key, error_class="batch_" + status, error=f"{why}; {then}")
                )
        return out

    # -- HTTP -------------------------------------------------------------------------------------

    def _transfer_timeout(self) -> openai.Timeout:
        import openai

        total = self.client.cfg.batch_transfer_timeout_s
        return openai.Timeout(total, connect=min(30.0, total))

    async def _retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/batches/{batch_id}", lambda sdk, auth: sdk.batches.retrieve(
            batch_id, extra_headers=auth))

    async def _content(self, file_id: str) -> str:
        """A batch output or error file as text (a torn multi-byte tail decodes as U+FFFD, not an error)."""
        return await self._call("GET", f"/files/{file_id}/content", lambda sdk, auth: sdk.files.content(
            file_id, timeout=self._transfer_timeout(), extra_headers=auth), raw=True, transfer=True)

    def _redact(self, text: str) -> str:
        return self.cache.scrub(text) or ""

    async def _call(self, method: str, path: str, request: SdkCall, *, raw: bool = False,
                    transfer: bool = False) -> Any:
        """An idempotent SDK call (or a file upload, where a duplicate is harmless) with the client's
        retry policy: the reply as a dict (`raw`: the body as text); BatchError when it keeps failing.
        `method` and `path` only name the call in messages. Never used to create a batch."""
        sdk = self._sdk
        assert sdk is not None, "BatchRunner calls the Batch API only inside run()"
        import openai

        cfg = self.client.cfg

        async def once() -> Any:
            try:
                reply = await request(sdk, self._auth)
            except openai.APITimeoutError as exc:
                limit = (f"batch_transfer_timeout_s={cfg.batch_transfer_timeout_s:g}" if transfer
                         else f"timeout_s={cfg.timeout_s:g}")
                raise _CallFailed(f"TimeoutError ({limit})", retry=True) from exc
            except openai.APIConnectionError as exc:
                raise _CallFailed(_cause(exc), retry=True) from exc
            except openai.APIStatusError as exc:
                status, text = exc.status_code, exc.response.text
                transient = status >= 500 or status in (408, 409, 429)
                raise _CallFailed(f"HTTP {status}: {text[:300]}", retry=transient,
                                  retry_after=parse_retry_after(exc.response.headers) if transient else None) from exc
            except openai.APIResponseValidationError as exc:
                raise _CallFailed(f"non-JSON reply {exc.response.text[:100]!r}", retry=True) from exc
            except ValueError as exc:  # the SDK lets a JSON-typed body that does not parse through as is
                raise _CallFailed(f"non-JSON reply ({exc})", retry=True) from exc
            if raw:
                return reply.content.decode("utf-8", errors="replace")
            if not isinstance(reply, BaseModel):  # a 200 whose body is not the API's JSON object
                raise _CallFailed(f"non-JSON reply {str(reply)[:100]!r}", retry=True)
            return reply.model_dump()

        try:
            return await self.client.retry_policy().retrying(
                transient=lambda exc: isinstance(exc, _CallFailed) and exc.retry,
                retry_after=lambda exc: exc.retry_after if isinstance(exc, _CallFailed) else None,
            )(once)
        except _CallFailed as exc:
            last = self._redact(str(exc))
        raise BatchError(f"Batch API call {method} {path} on {self.ep.endpoint.base_url} failed: {last}")


def _cause(exc: openai.APIConnectionError) -> str:
    """The transport error under an SDK connection error, by name (as the messages always said)."""
    return type(exc.__cause__ or exc).__name__


def _never_connected(exc: openai.APIConnectionError) -> bool:
    """The request never reached the server (refused, or the connect timed out): nothing was sent."""
    return any(c.__name__ in _NEVER_CONNECTED for c in type(exc.__cause__).__mro__) if exc.__cause__ else False
