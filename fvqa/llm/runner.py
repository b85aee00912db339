"""Run an `LLMTask` over many inputs, and price it before anything is spent.

`run_task` answers every input (key -> input) of a task: online with bounded concurrency, or first
through the Batch API when the config asks for it (the batch fills the response cache; the online
pass then finds every first request there and pays only for repair requests). A request the batch
did not answer goes into a new batch on the next run (`on_retry`), or online in this run with
`batch_online_fallback`. Each input ends in
exactly one callback, as soon as its reply is in, so a stage commits progressively and one slow
call never holds the rest:

- `on_output(key, output, reply)`: the task parsed the reply;
- `on_reject(key, reject)`: a named reject, the task's own or the runner's `UNPARSEABLE` (no valid
  JSON after one repair) or `REQUEST_FAILED` (a deterministic error such as HTTP 400);
- `on_retry(key, why)`: not done, and not a reject: a transient failure (network, 5xx, rate limit)
  or a request still in a running batch; the next run tries again.

A configuration error (HTTP 401/403: the key; 404: the model or URL) is no input's fault: the first
one raises `LLMConfigError` out of the run, after the inputs already answered got their callback;
requests in flight are cancelled and nothing is rejected for it, so the same command, once the
config is fixed, does the rest.

Exactly-once spending comes from the client: every outcome is cached by a hash of the request, so a
re-run pays for no reply it already got, and the Batch API's jobs are found again after a crash.
`estimate` prices the same requests from the same cache, with no API key needed.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fvqa.llm.batch import BatchOutcome, BatchRunner
from fvqa.llm.client import LLMClient, LLMConfigError, Messages
from fvqa.llm.config import Endpoint, LLMConfig
from fvqa.llm.ledger import CostEstimate, CostLedger, estimate_cost
from fvqa.llm.structured import StructuredResult, complete_json, response_format, schema_instruction
from fvqa.llm.task import REQUEST_FAILED, UNPARSEABLE, LLMTask, Reject, Reply, Request, request_size

In = TypeVar("In")
Out = TypeVar("Out")

TRANSIENT_PREFIXES = ("timeout", "connection", "bad_response", "http_5", "http_408", "http_409",
                      "http_425", "http_429", "batch_")
PENDING = "still in a running batch"

OnOutput = Callable[[str, Any, Reply], None]
OnReject = Callable[[str, Reject], None]
OnRetry = Callable[[str, str], None]


@dataclass
class TaskRun:
    """What one run of a task produced and spent (copied into the stage's stats)."""

    n_out: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> count
    transient: list[str] = field(default_factory=list)  # why, per input that failed transiently
    pending: list[str] = field(default_factory=list)  # keys still waiting in a running batch
    paid_calls: int = 0
    cache_hits: int = 0
    usd: float = 0.0


def is_transient(result: StructuredResult[Any]) -> bool:
    """A failure worth retrying on the next run (network, 5xx, rate limit), not a reject.

    (401/403/404 never get here: the client raises `LLMConfigError` for them.)"""
    if result.ok or not result.results:
        return False
    last = result.results[-1]
    return not last.ok and not last.cached and str(last.error_class or "").startswith(TRANSIENT_PREFIXES)


def first_request(cfg: LLMConfig, req: Request) -> tuple[Messages, dict[str, Any]]:
    """Messages and params exactly as the runner sends a request first (so: its cache key)."""
    params = dict(req.params)
    if req.reply_model is None:
        return req.messages, params
    if cfg.json_schema:
        params.setdefault("response_format", response_format(req.reply_model))
        return req.messages, params
    return [schema_instruction(req.reply_model), *req.messages], params


def keyless(cfg: LLMConfig) -> LLMConfig:
    """The same config with no API key needed: cache keys never include the key (for estimates)."""
    return cfg.model_copy(update={"endpoints": [Endpoint(base_url=e.base_url, api_key_env=None)
                                                for e in cfg.endpoints]})


async def ask(client: LLMClient, req: Request) -> StructuredResult[Any]:
    """One request: validated JSON (with one repair) for a reply model, else the reply text."""
    if req.reply_model is not None:
        return await complete_json(client, req.messages, req.reply_model, **req.params)
    res = await client.complete(req.messages, **req.params)
    if res.ok:
        return StructuredResult(True, None, res.text or "", results=[res])
    return StructuredResult(False, None, None, f"request failed: {res.error}", results=[res])


class _Settle:
    """Turns each input's outcome into exactly one callback, counting as it goes."""

    def __init__(self, task: LLMTask[Any, Any], run: TaskRun, on_output: OnOutput, on_reject: OnReject | None,
                 on_retry: OnRetry | None, progress: Callable[[], None] | None) -> None:
        self.task, self.run = task, run
        self.on_output, self.on_reject, self.on_retry = on_output, on_reject, on_retry
        self.progress = progress

    def reject(self, key: str, rej: Reject) -> None:
        self.run.rejected[rej.reason] += 1
        if self.on_reject is not None:
            self.on_reject(key, rej)
        self._tick()

    def retry(self, key: str, why: str) -> None:
        if self.on_retry is not None:
            self.on_retry(key, why)
        self._tick()

    def result(self, key: str, item: Any, res: StructuredResult[Any]) -> None:
        if res.ok:
            reply = Reply(res.raw or "", res.value, res.repaired, all(r.cached for r in res.results))
            try:
                out = self.task.parse(item, reply)
            except Reject as rej:
                self.reject(key, rej)
                return
            self.run.n_out += 1
            self.on_output(key, out, reply)
            self._tick()
        elif is_transient(res):
            why = res.error_reason or "request failed"
            self.run.transient.append(why)
            self.retry(key, why)
        else:
            reason = UNPARSEABLE if res.raw is not None else REQUEST_FAILED
            why = res.error_reason or reason
            self.reject(key, Reject(reason, f"{res.error_reason}\nraw reply: {res.raw}", why=why))

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress()


async def _batches(task: LLMTask[Any, Any], inputs: Mapping[str, Any], client: LLMClient,
                   batch_wait_s: float | None) -> BatchOutcome:
    """Every first request through the Batch API, one batch run per distinct set of params."""
    groups: dict[str, tuple[dict[str, Any], dict[str, Messages]]] = {}
    for key, item in inputs.items():
        try:
            messages, params = first_request(client.cfg, task.format(item))
        except Reject:
            continue  # rejected without a request in the online pass
        group = json.dumps(params, sort_keys=True, default=str)
        groups.setdefault(group, (params, {}))[1][key] = messages
    out = BatchOutcome()
    for params, requests in groups.values():
        got = await BatchRunner(client).run(requests, max_wait_s=batch_wait_s, **params)
        out.results.update(got.results)
        out.pending += got.pending
        out.batch_ids += got.batch_ids
    return out


async def arun_task(task: LLMTask[In, Out], inputs: Mapping[str, In], client: LLMClient, *,
                    on_output: OnOutput, on_reject: OnReject | None = None, on_retry: OnRetry | None = None,
                    batch_wait_s: float | None = None, progress: Callable[[], None] | None = None) -> TaskRun:
    """`run_task` on an open client (its `stage` must be the task's name: the ledger row billed)."""
    if client.stage != task.name:
        raise ValueError(f"client bills stage {client.stage!r} but the task is {task.name!r}")
    run = TaskRun()
    settle = _Settle(task, run, on_output, on_reject, on_retry, progress)
    served_by_batch = 0
    skip: set[str] = set()
    if client.cfg.batch and inputs:
        batch_ledger = CostLedger()
        online_ledger, client.ledger = client.ledger, batch_ledger
        try:
            outcome = await _batches(task, inputs, client, batch_wait_s)
        finally:
            client.ledger = online_ledger
        cost = batch_ledger.stage(task.name)
        run.paid_calls += cost.calls
        run.cache_hits += cost.cache_hits
        run.usd += cost.usd
        run.pending = list(outcome.pending)
        skip = set(outcome.pending)
        served_by_batch = sum(client.cache.has(r.key) for r in outcome.results.values())
        for key in run.pending:
            settle.retry(key, PENDING)
        if not client.cfg.batch_online_fallback:  # a line the batch did not answer waits for the next batch
            for key, res in outcome.results.items():
                if not res.ok and not res.cached and str(res.error_class or "").startswith("batch_"):
                    skip.add(key)
                    run.transient.append(res.error or "batch line failed")
                    settle.retry(key, res.error or "batch line failed")
    before = client.ledger.stage(task.name)
    window = 4 * client.cfg.max_concurrency
    todo = ((key, item) for key, item in inputs.items() if key not in skip)  # formatted lazily
    running: dict[asyncio.Task[StructuredResult[Any]], tuple[str, In]] = {}

    def fill() -> None:
        for key, item in todo:
            try:
                req = task.format(item)
            except Reject as rej:
                settle.reject(key, rej)
                continue
            running[asyncio.ensure_future(ask(client, req))] = (key, item)
            if len(running) >= window:
                break

    fill()
    try:
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            stop: LLMConfigError | None = None
            for fut in done:
                key, item = running.pop(fut)
                try:
                    res = fut.result()
                except LLMConfigError as exc:  # no reject: the input is fine, the config is not
                    stop = stop or exc
                    continue
                settle.result(key, item, res)
            if stop is not None:
                raise stop  # `finally` cancels the requests in flight
            fill()
    finally:
        for fut in running:
            fut.cancel()
    cost = client.ledger.stage(task.name)
    run.paid_calls += cost.calls - before.calls
    run.cache_hits += max(0, cost.cache_hits - before.cache_hits - served_by_batch)
    run.usd += cost.usd - before.usd
    return run


def run_task(task: LLMTask[In, Out], inputs: Mapping[str, In], llm: LLMConfig, cache_dir: Path | str, *,
             on_output: OnOutput, on_reject: OnReject | None = None, on_retry: OnRetry | None = None,
             ledger: CostLedger | None = None, batch_wait_s: float | None = None,
             progress: Callable[[], None] | None = None, section: str = "llm") -> TaskRun:
    """Answer every input of `task` through a client on `llm` and the cache in `cache_dir`.

    Calls are billed to `task.name` in `ledger` (a fresh one if None). Inputs still running in a
    batch after `batch_wait_s` get `on_retry`: they stay to do, and the next run polls the same
    batch. `progress()` is called once per input settled. A missing API key raises `ConfigError`; an
    endpoint refusing the key or model raises `LLMConfigError` naming `section` (e.g. "tag.llm")."""

    async def main() -> TaskRun:
        async with LLMClient(llm, cache_dir, stage=task.name, ledger=ledger, section=section) as client:
            try:
                return await arun_task(task, inputs, client, on_output=on_output, on_reject=on_reject,
                                       on_retry=on_retry, batch_wait_s=batch_wait_s, progress=progress)
            finally:
                client.cache.close()

    return asyncio.run(main())


def estimate(task: LLMTask[In, Any], inputs: Mapping[str, In], llm: LLMConfig, cache_dir: Path | str, *,
             expected: int | None = None) -> CostEstimate:
    """What running `task` on `inputs` would cost: requests already in the cache are free.

    Prompt tokens are ~4 characters each plus `task.image_tokens` per image; the reply is
    `task.completion_tokens`. With `expected`, price that many inputs not built yet at the task's
    typical prompt size instead (`inputs` is ignored). Reads only the cache: no key, no request."""
    if expected is not None:
        return estimate_cost(expected, task.typical_prompt_tokens(), task.completion_tokens, llm.price_at(None),
                             batch=llm.batch)
    n = chars = images = cached = 0
    if inputs:
        client = LLMClient(keyless(llm), cache_dir)
        try:
            for item in inputs.values():
                try:
                    req = task.format(item)
                except Reject:
                    continue  # rejected before any request: costs nothing
                n += 1
                c, i = request_size(req.messages)
                chars, images = chars + c, images + i
                messages, params = first_request(llm, req)
                cached += client.cache.has(client.key_for(messages, **params))
        finally:
            client.cache.close()
    avg_prompt = (chars / 4 + images * task.image_tokens) / max(1, n)
    return estimate_cost(n, avg_prompt, task.completion_tokens, llm.price_at(None), cached=cached, batch=llm.batch)
