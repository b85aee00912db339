"""The reward function veRL loads (``custom_reward_function.path: pkg://fvqa.train.verl_reward``).

``fvqa.train.reward.compute_score`` with two more keys, ``searched`` (1 if the trajectory ran any
search) and ``n_search_errors`` (search calls that raised: service down, timeout; from the agent
loop's ``tool_calls``; calls that found nothing are not errors),
so veRL's validation logs the search ratio and failed searches next to reward, accuracy and format. veRL
averages every key a reward function returns per data source; the keys must be the same for
every sample, which they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fvqa.protocol import search_outcomes
from fvqa.train.reward import RESULT_KEYS
from fvqa.train.reward import compute_score as _compute_score

VERL_RESULT_KEYS = (*RESULT_KEYS, "searched", "n_search_errors")


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kw: Any,
) -> dict[str, float | int]:
    """Paper eq. 1 reward plus ``searched`` and ``n_search_errors``; see ``fvqa.train.reward.compute_score``."""
    result = dict(_compute_score(data_source, solution_str, ground_truth, extra_info, **kw))
    result["searched"] = int(result["n_image_search"] + result["n_text_search"] > 0)
    result["n_search_errors"] = search_outcomes(list((extra_info or {}).get("tool_calls") or []))[0]
    return result
