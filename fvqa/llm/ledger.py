"""Cost ledger: every paid call (LLM, search) is recorded here, per stage, so summaries and
`runs` rows show what a stage spent and what the caches saved.

Also the estimator used by `fvqa build --estimate` to print a price before anything is spent.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from fvqa.llm.config import Price


@dataclass
class StageCost:
    """Counters for one (stage, kind) pair; they add up across shards and runs."""

    calls: int = 0  # paid requests that returned a usable reply
    cache_hits: int = 0
    failed: int = 0  # requests that ended in an error (after retries)
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0
    saved_usd: float = 0.0  # what cache hits would have cost

    def add(self, other: StageCost) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class CostLedger:
    """Thread-safe running totals keyed by (stage, kind); `kind` is e.g. "llm" or "search"."""

    _rows: dict[tuple[str, str], StageCost] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(
        self,
        stage: str,
        kind: str = "llm",
        *,
        usd: float = 0.0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached: bool = False,
        failed: bool = False,
        retries: int = 0,
    ) -> None:
        """Record one logical call: a cache hit costs nothing but is counted with what it saved."""
        delta = StageCost(retries=retries)
        if cached:
            delta.cache_hits = 1
            delta.saved_usd = usd
        elif failed:
            delta.failed = 1
        else:
            delta.calls = 1
            delta.prompt_tokens = prompt_tokens
            delta.completion_tokens = completion_tokens
            delta.usd = usd
        with self._lock:
            self._rows.setdefault((stage, kind), StageCost()).add(delta)

    def stage(self, stage: str) -> StageCost:
        """Totals for one stage over every kind."""
        total = StageCost()
        with self._lock:
            for (name, _), row in self._rows.items():
                if name == stage:
                    total.add(row)
        return total

    def total_usd(self) -> float:
        with self._lock:
            return sum(row.usd for row in self._rows.values())

    def summary(self) -> dict[str, dict[str, Any]]:
        """`{stage: {kind: counters}}` for the stage summary table and the `runs` row."""
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for (stage, kind), row in sorted(self._rows.items()):
                out.setdefault(stage, {})[kind] = {**asdict(row), "usd": round(row.usd, 6)}
        return out


@dataclass(frozen=True)
class CostEstimate:
    """Expected spend of a stage before it runs."""

    calls: int
    cached: int
    paid_calls: int
    prompt_tokens: int
    completion_tokens: int
    usd: float


def estimate_cost(
    calls: int,
    avg_prompt_tokens: float,
    avg_completion_tokens: float,
    price: Price,
    *,
    cached: int = 0,
    batch: bool = False,
) -> CostEstimate:
    """Dollars for `calls` requests of which `cached` are already in the cache (and cost nothing)."""
    if calls < 0 or cached < 0:
        raise ValueError("calls and cached must be >= 0")
    paid = max(0, calls - cached)
    prompt = round(paid * avg_prompt_tokens)
    completion = round(paid * avg_completion_tokens)
    return CostEstimate(
        calls=calls,
        cached=min(cached, calls),
        paid_calls=paid,
        prompt_tokens=prompt,
        completion_tokens=completion,
        usd=price.usd(prompt, completion, batch=batch),
    )
