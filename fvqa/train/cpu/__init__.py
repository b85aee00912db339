"""veRL's stock trainers on CPU: check a whole GRPO (or SFT) setup on a laptop before renting GPUs.

``fvqa train run`` (and ``fvqa train sft``) with ``trainer.device=cpu`` sets ``VERL_USE_EXTERNAL_MODULES=fvqa.train.cpu.enable``
and ``VERL_PLATFORM=cpu``; veRL imports that module at the end of ``import verl`` in every process
(driver, trainer, FSDP workers, agent-loop and reward workers), and it calls :func:`install`:

1. a CPU platform in veRL's ``PlatformRegistry`` (:mod:`.platform`),
2. gloo process groups (in Ray workers, and under torchrun for ``fvqa train sft``) and unpinned
   FSDP offload (:mod:`.patches`),
3. an ``hf`` rollout engine: a generation server on ``transformers.generate`` with vLLM-server's
   RPC shape, and the adapter that syncs the trained weights into it (:mod:`.replica`).

``fvqa train sft`` uses 1 and 2 only: veRL's SFT trainer runs in torchrun processes, without Ray
or a rollout engine. Everything else - data loading, our agent loop, the search service, the reward
loop, GRPO advantages, the PPO-clip update with KL, SFT's loss, checkpoints, validation - is veRL's
own code, unchanged. Three touch points are private to veRL (the rollout-adapter dict, the
process-group functions, the offload-policy class), so the package refuses any veRL other than the one it was checked against.
"""

from __future__ import annotations

from fvqa.train.verl_hooks import VERL_VERSION, UnsupportedVerlError, require_verl

__all__ = ["VERL_VERSION", "UnsupportedVerlError", "check_verl_version", "install"]

RECHECK = ("fvqa/train/cpu (verl.utils.distributed.initialize_global_process_group_ray and "
           "initialize_global_process_group, "
           "verl.utils.fsdp_utils.CPUOffloadPolicy, verl.workers.rollout.base._ROLLOUT_REGISTRY, "
           "RolloutReplicaRegistry, PlatformBase)")
"""The veRL internals the CPU backend relies on: what to re-read for another veRL release."""


def check_verl_version() -> None:
    """One clear error instead of a deep crash when veRL moved its private extension points."""
    require_verl("fvqa's CPU backend for veRL", RECHECK)


def install() -> None:
    """Register the platform, the patches and the ``hf`` rollout (idempotent)."""
    check_verl_version()
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from fvqa.train.cpu import patches, platform  # noqa: F401 - importing registers the platform
    from fvqa.train.cpu.replica import ROLLOUT_NAME, load_hf_replica

    patches.patch_process_group()
    patches.patch_offload_policy()
    RolloutReplicaRegistry.register(ROLLOUT_NAME, load_hf_replica)
    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "fvqa.train.cpu.replica.HFServerAdapter"
