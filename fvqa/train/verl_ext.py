"""fvqa's extensions to veRL, loaded by veRL itself in every process of a run.

``fvqa train run`` sets ``VERL_USE_EXTERNAL_MODULES=fvqa.train.verl_ext`` (comma-joined with any
other extension module, e.g. ``fvqa.train.cpu.enable``); ``import verl`` reads that variable and imports
this module at its end, in the driver and in every Ray worker (trainer, FSDP workers, agent-loop and
reward workers), so what it installs is in place before veRL builds any config or engine. A plain
``python -m verl.trainer.main_ppo`` run needs the same variable in its environment. Importing it
again is harmless: every installer here is idempotent.

Installed:

* ``actor_rollout_ref.actor.optim.lr_scheduler_type: sigmoid`` - MMSearch-R1's sigmoid learning-rate
  decay (:mod:`fvqa.train.lr_schedule`), which veRL 0.9.1 has no registry for.
* ``fvqa/...`` search statistics in every training step's metrics, failed searches included
  (:mod:`fvqa.train.step_metrics`).
"""

from __future__ import annotations

from fvqa.train import lr_schedule, step_metrics


def install() -> None:
    """Install every extension (idempotent)."""
    lr_schedule.install()
    step_metrics.install()


install()
