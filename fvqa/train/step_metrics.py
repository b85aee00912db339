"""Search statistics in every training step's metrics (``fvqa/...``), next to veRL's own.

Our agent loop records each trajectory's search calls (kind, success, error) and why it stopped in its
extra fields. veRL 0.9.1's v1 trainer keeps those fields in TransferQueue but logs only its fixed
metric set, so failed searches were visible to the model and nowhere else. This hook wraps the
trainer's ``_compute_metrics`` to add, per step: searches per trajectory by kind, failed searches
(raised: total and per trajectory), searches that found nothing, the share of trajectories that searched, and the share of each stop
reason. A problem reading them is a warning, never a failed step.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from fvqa.protocol import search_outcomes
from fvqa.train.verl_hooks import UnsupportedVerlError, patch_on_import, require_verl

logger = logging.getLogger(__name__)

TRAINER_MODULE = "verl.trainer.ppo.v1.trainer_base"
PREFIX = "fvqa/"


def search_metrics(extra_fields: Sequence[Mapping[str, Any] | None]) -> dict[str, float]:
    """Step metrics over the trajectories our agent loop produced (others are left out)."""
    ours = [e for e in extra_fields if isinstance(e, Mapping) and "tool_calls" in e]
    if not ours:
        return {}
    n = len(ours)
    calls = [list(e.get("tool_calls") or []) for e in ours]
    outcomes = [search_outcomes(cs) for cs in calls]
    failed, empty = sum(f for f, _ in outcomes), sum(e for _, e in outcomes)
    out = {
        f"{PREFIX}trajectories": float(n),
        f"{PREFIX}image_search/mean": sum(c.get("kind") == "image_search" for cs in calls for c in cs) / n,
        f"{PREFIX}text_search/mean": sum(c.get("kind") == "text_search" for cs in calls for c in cs) / n,
        f"{PREFIX}searched/mean": sum(bool(cs) for cs in calls) / n,
        f"{PREFIX}search_errors/total": float(failed),
        f"{PREFIX}search_errors/mean": failed / n,
        f"{PREFIX}search_empty/mean": empty / n,
    }
    for reason, count in Counter(str(e.get("stop_reason")) for e in ours).items():
        out[f"{PREFIX}stop_reason/{reason}"] = count / n
    return out


def _patch_trainer(module: ModuleType) -> None:
    cls = getattr(module, "PPOTrainer", None)
    original = getattr(cls, "_compute_metrics", None)
    tq = getattr(module, "tq", None)
    if original is None or tq is None:
        raise UnsupportedVerlError(f"{TRAINER_MODULE} has no PPOTrainer._compute_metrics or tq: re-check "
                                   "fvqa/train/step_metrics.py")
    if getattr(original, "_fvqa_search_metrics", False):
        return

    def _compute_metrics(self: Any, batch: Any, metrics: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        result = original(self, batch, metrics, *args, **kwargs)
        try:
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
            fields = data.pop("extra_fields").tolist()
            real = [f for f, tag in zip(fields, batch.tags, strict=True) if not tag.get("is_padding", False)]
            metrics.update(search_metrics(real))
        except Exception as exc:  # noqa: BLE001 - statistics must never fail a training step
            logger.warning("fvqa search metrics skipped this step: %s: %s", type(exc).__name__, exc)
        return result

    _compute_metrics._fvqa_search_metrics = True  # type: ignore[attr-defined]
    _compute_metrics.__wrapped__ = original  # type: ignore[attr-defined]
    cls._compute_metrics = _compute_metrics


def install() -> None:
    """Add ``fvqa/...`` search metrics to the v1 trainer's step metrics (idempotent, version-guarded)."""
    require_verl("fvqa's step search metrics", f"{TRAINER_MODULE}.PPOTrainer._compute_metrics")
    patch_on_import(TRAINER_MODULE, _patch_trainer)
