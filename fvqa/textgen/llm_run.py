"""Run many structured (JSON) requests for a stage: online with bounded concurrency, or via batches.

Results are handed to a callback as each finishes, so the stage commits progressively and one slow
call never holds the rest. In batch mode the Batch API fills the response cache first; the online
pass then finds every first request in the cache and pays only for repair retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from fvqa.llm.batch import BatchRunner
from fvqa.llm.client import LLMClient, Messages
from fvqa.llm.config import Endpoint, LLMConfig
from fvqa.llm.ledger import CostLedger
from fvqa.llm.structured import StructuredResult, complete_json, response_format, schema_instruction

TRANSIENT_PREFIXES = ("timeout", "connection", "bad_response", "http_5", "http_408", "http_409",
                      "http_425", "http_429", "batch_")


@dataclass
class RunTotals:
    """What a run spent and saved (copied into the stage's stats)."""

    paid_calls: int = 0
    cache_hits: int = 0
    usd: float = 0.0
    pending: list[str] = field(default_factory=list)  # ids still waiting in a running batch


def is_transient(result: StructuredResult[Any]) -> bool:
    """A failure worth retrying on the next run (network, 5xx, rate limit), not a reject."""
    if result.ok or not result.results:
        return False
    last = result.results[-1]
    return not last.ok and not last.cached and str(last.error_class or "").startswith(TRANSIENT_PREFIXES)


def wire_request(cfg: LLMConfig, messages: Messages, model_cls: type[BaseModel]) -> tuple[Messages, dict[str, Any]]:
    """Messages and params exactly as `complete_json` sends its first request (same cache key)."""
    if cfg.json_schema:
        return messages, {"response_format": response_format(model_cls)}
    return [schema_instruction(model_cls), *messages], {}


def keyless(cfg: LLMConfig) -> LLMConfig:
    """The same config with no API key needed: cache keys never include the key (for estimates)."""
    return cfg.model_copy(update={"endpoints": [Endpoint(base_url=e.base_url, api_key_env=None)
                                                for e in cfg.endpoints]})


def cached_count(cfg: LLMConfig, cache_dir: Any, requests: Mapping[str, Messages],
                 model_cls: type[BaseModel]) -> int:
    """How many first requests are already answered in the workspace cache."""
    client = LLMClient(keyless(cfg), cache_dir)
    try:
        n = 0
        for messages in requests.values():
            wire, params = wire_request(cfg, messages, model_cls)
            n += client.cache.has(client.key_for(wire, **params))
        return n
    finally:
        client.cache.close()


async def _run(client: LLMClient, requests: Mapping[str, Messages], model_cls: type[BaseModel],
               on_result: Callable[[str, StructuredResult[Any]], None], totals: RunTotals,
               batch_wait_s: float | None) -> None:
    served_by_batch = 0
    skip: set[str] = set()
    if client.cfg.batch and requests:
        batch_ledger = CostLedger()
        online_ledger, client.ledger = client.ledger, batch_ledger
        try:
            first = {rid: wire_request(client.cfg, m, model_cls) for rid, m in requests.items()}
            params = next(iter(first.values()))[1]
            outcome = await BatchRunner(client).run({rid: w for rid, (w, _) in first.items()},
                                                    max_wait_s=batch_wait_s, **params)
        finally:
            client.ledger = online_ledger
        cost = batch_ledger.stage(client.stage)
        totals.paid_calls += cost.calls
        totals.cache_hits += cost.cache_hits
        totals.usd += cost.usd
        totals.pending = list(outcome.pending)
        skip = set(outcome.pending)
        served_by_batch = sum(client.cache.has(r.key) for r in outcome.results.values())
    window = 4 * client.cfg.max_concurrency
    todo = ((rid, m) for rid, m in requests.items() if rid not in skip)  # built lazily
    running: dict[asyncio.Task[StructuredResult[Any]], str] = {}

    def fill() -> None:
        for rid, messages in todo:
            running[asyncio.ensure_future(complete_json(client, messages, model_cls))] = rid
            if len(running) >= window:
                break

    fill()
    try:
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                on_result(running.pop(task), task.result())
            fill()
    finally:
        for task in running:
            task.cancel()
    cost = client.ledger.stage(client.stage)
    totals.paid_calls += cost.calls
    totals.cache_hits += max(0, cost.cache_hits - served_by_batch)
    totals.usd += cost.usd


def run_structured(cfg: LLMConfig, cache_dir: Any, stage: str, requests: Mapping[str, Messages],
                   model_cls: type[BaseModel], on_result: Callable[[str, StructuredResult[Any]], None],
                   *, batch_wait_s: float | None = None) -> RunTotals:
    """Answer every request (id -> messages) and call `on_result(id, result)` for each; return totals.

    Requests still running in a batch after `batch_wait_s` get no callback: they stay to do, and the
    next run polls the same batch."""
    totals = RunTotals()

    async def main() -> None:
        async with LLMClient(cfg, cache_dir, stage=stage) as client:
            try:
                await _run(client, requests, model_cls, on_result, totals, batch_wait_s)
            finally:
                client.cache.close()

    asyncio.run(main())
    return totals


class LazyRequests(Mapping[str, Messages]):
    """id -> messages built on access, so 10k requests with images never sit in memory at once."""

    def __init__(self, specs: dict[str, Any], build: Callable[[Any], Messages]) -> None:
        self._specs = specs
        self._build = build

    def __getitem__(self, rid: str) -> Messages:
        return self._build(self._specs[rid])

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)
