"""Names in the veRL row layout that more than one part of fvqa writes or reads.

Upstream's released FVQA parquet and fvqa's `train prepare` rows carry the same ``data_source``
(upstream's reward and reporting key on it); the agent loop registers under the name the rows ask
for in ``agent_name``.
"""

from __future__ import annotations

AGENT_NAME = "fvqa_search_agent"
"""The veRL agent loop every prepared row asks for (``agent_name``), registered by fvqa.train.agent_loop."""

DATA_SOURCE = "mmsearch_r1/fvqa_{split}"
"""``data_source`` of an FVQA row: upstream's name, so its tooling recognises the rows."""


def data_source(split: str) -> str:
    """``data_source`` for a split (``train`` / ``test``)."""
    return DATA_SOURCE.format(split=split)
