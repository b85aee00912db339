"""Two places where veRL 0.9.1 assumes an accelerator, each replaced by its CPU equivalent.

* Process groups: veRL asks for ``"cpu:gloo,<device>:<backend>"``, which on CPU reads
  ``"cpu:gloo,cpu:gloo"`` and torch rejects it. On CPU the group is plain ``gloo``: in Ray workers
  (``initialize_global_process_group_ray``, GRPO) and under ``torchrun``
  (``initialize_global_process_group``, the SFT trainer).
* FSDP2 offload for forward-only models (the reference policy) is forced to
  ``CPUOffloadPolicy(pin_memory=True)``; pinning host memory needs a CUDA driver. Without CUDA the
  same policy is used unpinned (on CPU the "offload" is where the tensors already are).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch


def _gloo_on_cpu(original: Any) -> Any:
    def initialize_global_process_group_ray(timeout_second: int | None = None, backend: str | None = None) -> Any:
        from verl.utils.device import get_device_name

        if backend is None and get_device_name() == "cpu":
            backend = "gloo"
        return original(timeout_second=timeout_second, backend=backend)

    initialize_global_process_group_ray.__wrapped__ = original  # type: ignore[attr-defined]
    return initialize_global_process_group_ray


def _torchrun_gloo_on_cpu(original: Any) -> Any:
    def initialize_global_process_group(timeout_second: int = 36000) -> tuple[int, int, int]:
        import os
        from datetime import timedelta

        from verl.utils.device import get_device_name

        if get_device_name() != "cpu":
            return original(timeout_second=timeout_second)
        # veRL's own body with the backend torch accepts on CPU (no device to pin a rank to).
        torch.distributed.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_second),
                                             init_method=os.environ.get("DIST_INIT_METHOD", None))
        return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    initialize_global_process_group.__wrapped__ = original  # type: ignore[attr-defined]
    return initialize_global_process_group


def patch_process_group() -> None:
    """Make veRL's process-group initialisers pick ``gloo`` on CPU, wherever they were imported by name."""
    import verl.utils.distributed as dist

    if not hasattr(dist.initialize_global_process_group_ray, "__wrapped__"):
        patched = _gloo_on_cpu(dist.initialize_global_process_group_ray)
        dist.initialize_global_process_group_ray = patched
        for module in ("verl.workers.engine_workers",):  # bound by name at import; patched if already loaded
            if module in sys.modules:
                sys.modules[module].initialize_global_process_group_ray = patched
    if not hasattr(dist.initialize_global_process_group, "__wrapped__"):
        # The SFT trainer imports it from the module inside `run_sft`, so the module attribute is enough.
        dist.initialize_global_process_group = _torchrun_gloo_on_cpu(dist.initialize_global_process_group)


def patch_offload_policy() -> None:
    """Without CUDA, veRL's FSDP engine gets an offload policy that does not pin memory."""
    if torch.cuda.is_available():
        return
    import verl.utils.fsdp_utils as fsdp_utils

    base = fsdp_utils.CPUOffloadPolicy
    if base is None or getattr(base, "_fvqa_unpinned", False):
        return

    @dataclasses.dataclass
    class UnpinnedCPUOffloadPolicy(base):  # type: ignore[misc, valid-type]
        """``CPUOffloadPolicy`` that never pins (pinning needs a CUDA driver)."""

        _fvqa_unpinned = True

        def __post_init__(self) -> None:
            self.pin_memory = False

    fsdp_utils.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy
    engine = sys.modules.get("verl.workers.engine.fsdp.transformer_impl")
    if engine is not None:
        engine.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy
