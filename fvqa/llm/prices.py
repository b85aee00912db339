"""List prices of the hosted models fvqa's configs name, so a call is billed at its own model's price.

Dollars per million tokens (input, output), OpenAI's published standard-tier prices; the Batch API
halves both (`Price.batch_factor`). A model is looked up by its exact name, then by its dated
snapshot's family (``gpt-4o-2024-11-20`` -> ``gpt-4o-2024-11-20``, else ``gpt-4o``). A model not in
the table on a public endpoint has no price fvqa could know: the config must set ``price`` (an error
at load, never a silent GPT-4o price). Self-hosted endpoints cost $0 unless priced.
"""

from __future__ import annotations

import re

LIST_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-2024-11-20": (2.5, 10.0),
    "gpt-4o-2024-08-06": (2.5, 10.0),
    "gpt-4o-2024-05-13": (5.0, 15.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4o-mini-2024-07-18": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1-nano": (0.1, 0.4),
    "o4-mini": (1.1, 4.4),
}
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def list_price(model: str) -> tuple[float, float] | None:
    """(input, output) dollars per 1M tokens for `model`, or None when fvqa does not know its price."""
    name = model.strip().lower().removeprefix("openai/")
    if name in LIST_PRICES:
        return LIST_PRICES[name]
    return LIST_PRICES.get(_SNAPSHOT.sub("", name)) if _SNAPSHOT.search(name) else None
