"""Generator over any OpenAI-compatible chat endpoint (GPT-4o, a `vllm serve` box, SGLang).

Uses the project's LLM client (cache, retries, cost ledger), so a re-run of a probe repeats no paid
call: the request, including its per-rollout `seed`, is the cache key.

A failed request becomes `Generation(error=...)`; an endpoint refusing the configuration (HTTP
401/403: the key; 404: the model) is not a failed rollout: `LLMConfigError` propagates and stops
the probe, and the other requests of the batch are cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fvqa.generators.base import Generation, Message, Request, Sampling, restore_stop
from fvqa.llm.client import LLMClient
from fvqa.llm.config import LLMConfig
from fvqa.llm.images import image_part
from fvqa.llm.ledger import CostLedger


def wire_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Neutral messages -> the LLM client's shape (images as `image_part`, hashed by content)."""
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            parts = [image_part(p["image"]) if p.get("type") == "image" else {"type": "text", "text": p["text"]}
                     for p in content]
            out.append({"role": msg["role"], "content": parts})
        else:
            out.append({"role": msg["role"], "content": content})
    return out


def sampling_params(s: Sampling) -> dict[str, Any]:
    """The request parameters of one sampled turn (with the messages, the request's cache key: the
    probe's estimate computes the same keys to count cache hits)."""
    params: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens}
    if s.seed is not None:
        params["seed"] = s.seed
    if s.stop:
        params["stop"] = list(s.stop)
    return params


class OpenAIChatGenerator:
    """Batch of requests -> concurrent chat completions (bounded by the client's concurrency)."""

    def __init__(self, cfg: LLMConfig, cache_dir: Path | str, *, stage: str = "probe",
                 ledger: CostLedger | None = None, section: str | None = None) -> None:
        self.cfg = cfg
        self.client = LLMClient(cfg, cache_dir, stage=stage, ledger=ledger, section=section or (
            "probe.llm" if stage == "probe" else "llm"))
        self.name = f"openai:{cfg.model}"

    @property
    def ledger(self) -> CostLedger:
        return self.client.ledger

    def session(self) -> LLMClient:
        """The client's connection pools, opened for the running event loop (``async with``)."""
        return self.client

    async def agenerate_one(self, req: Request) -> Generation:
        """One turn, inside ``session()``: the agent drives HTTP rollouts one request at a time, so a
        slow call holds only its own rollout."""
        return await self._one(req)

    async def _one(self, req: Request) -> Generation:
        res = await self.client.complete(wire_messages(req.messages), **sampling_params(req.sampling))  # LLMConfigError: stop
        if not res.ok:
            return Generation(error=f"{res.error_class}: {res.error}")
        text = res.text or ""
        if req.sampling.stop and res.finish_reason == "stop":
            text = restore_stop(text)
        return Generation(text=text, prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                          finish_reason=res.finish_reason, cached=res.cached)

    async def agenerate(self, requests: Sequence[Request]) -> list[Generation]:
        async with self.client:
            tasks = [asyncio.ensure_future(self._one(r)) for r in requests]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:  # e.g. LLMConfigError: the rest would fail alike, stop them
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Run the batch on a private event loop (callers here are synchronous stages)."""
        return asyncio.run(self.agenerate(requests))
