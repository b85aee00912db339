"""The ``hf`` rollout for veRL: a replica that launches the HF generation server, and the adapter in
the actor worker that pushes each step's trained weights into it.

veRL looks a rollout engine up twice: ``RolloutReplicaRegistry`` (who launches the servers the
agent loops call) and ``_ROLLOUT_REGISTRY`` (the ``BaseRollout`` living in each hybrid actor
worker, which receives the trainer's weights after every update). vLLM's pair is
``vLLMReplica``/``ServerAdapter``; this is the same pair for :class:`HFGenerationServer`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica

from fvqa.train.cpu.hf_server import HFGenerationServer

ROLLOUT_NAME = "hf"
THREADS_ENV = "FVQA_CPU_ROLLOUT_THREADS"
"""Torch threads of the generation server (the launcher sets it to the machine's cores: in hybrid
mode the trainer is idle while the rollout runs)."""


def server_name(replica_rank: int) -> str:
    """The Ray actor name of one replica's server: how the adapter finds it to push weights."""
    return f"fvqa_hf_rollout_server_{replica_rank}"


def _model_path(model_config: Any) -> str:
    for key in ("local_path", "path"):
        value = getattr(model_config, key, None)
        if value is None and hasattr(model_config, "get"):
            value = model_config.get(key)
        if value:
            return str(value)
    raise ValueError("actor_rollout_ref.model.path is not set")


class HFReplica(RolloutReplica):
    """One ``hf`` rollout replica: a single generation-server actor (no GPU, no tensor parallelism)."""

    async def launch_servers(self) -> None:
        import ray

        if self.world_size != 1:
            raise ValueError(
                f"the hf rollout runs one process per replica; got tensor/data/pipeline parallel size "
                f"{self.world_size} (set actor_rollout_ref.rollout.tensor_model_parallel_size=1)"
            )
        threads = int(os.environ.get(THREADS_ENV) or 0) or None
        server = ray.remote(HFGenerationServer).options(
            name=server_name(self.replica_rank), num_cpus=0, max_concurrency=self.max_concurrency,
        ).remote(_model_path(self.model_config), self.replica_rank, threads)
        await server.ready.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"ray-actor://{server_name(self.replica_rank)}"


def load_hf_replica() -> type[RolloutReplica]:
    """``RolloutReplicaRegistry`` loader for ``rollout.name=hf``."""
    return HFReplica


class HFServerAdapter(BaseRollout):
    """The ``hf`` rollout inside a hybrid actor worker: forwards the trainer's weights to the server."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.replica_rank = rank  # one process per replica (HFReplica refuses anything else)
        self.sleep_level = 2

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None

    async def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], wire_format: str = "named_tensors",
                             **kwargs: Any) -> None:
        """Gather the full tensors and hand them to this replica's server with the step they belong to."""
        import ray

        if wire_format != "named_tensors":
            raise ValueError(f"the hf rollout takes full named tensors, not {wire_format!r} "
                             "(keep actor_rollout_ref.rollout.checkpoint_engine at its default)")
        named = {name: tensor.detach().to("cpu").clone() for name, tensor in weights}
        server = ray.get_actor(server_name(self.replica_rank))
        await server.load_weights.remote(named, kwargs.get("global_steps"))
