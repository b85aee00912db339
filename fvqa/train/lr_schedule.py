"""MMSearch-R1's sigmoid learning-rate decay, selectable in veRL as ``lr_scheduler_type: sigmoid``.

Source: upstream (github.com/EvolvingLMMs-Lab/multimodal-search-r1) builds it in
``mmsearch_r1/utils/torch_functional.py`` (``get_sigmoid_decay_schedule``) and switches it on in
``mmsearch_r1/workers/multimodal/fsdp_workers.py`` with ``optim.lr_sigmoid_decay_warmup``. The
factor that multiplies the base learning rate at optimizer step ``t`` is::

    factor(t) = final_ratio + (1 - final_ratio) / (1 + exp(k * (t - midpoint_steps)))
    k = 1 / (width_fraction * midpoint_steps)

Upstream's names: ``lr_low = 1 - lr_sigmoid_decay_ratio`` (our ``final_ratio``),
``num_warmup_steps = lr_sigmoid_decay_warmup_steps`` (our ``midpoint_steps``), and a hard-coded
width of 10% of the midpoint (our ``width_fraction``). Our defaults are the values of upstream's
run script ``mmsearch_r1/scripts/run_mmsearch_r1_grpo.sh``: ``lr_sigmoid_decay_ratio=0.95``
(``final_ratio = 0.05``) and ``lr_sigmoid_decay_warmup_steps=45``. With them (and lr 2e-6):

    step     0      10     30     35     40     45     50     60     70     80     100
    factor   1.000  1.000  0.967  0.907  0.765  0.525  0.285  0.083  0.054  0.050  0.050

i.e. the LR stays near 2e-6 for ~30 steps, halves at step 45 and is ~5% (1e-7) from step ~70 on.
veRL steps the scheduler once per training step (after the step's last mini-batch), as upstream's
worker did, so ``t`` is the number of finished training steps.

In veRL 0.9.1 (no scheduler registry) :func:`install` adds ``sigmoid`` to the FSDP engine; it runs
in every veRL process through ``fvqa.train.verl_ext``. veRL's ``FSDPOptimizerConfig`` rejects keys it
does not know, so the schedule reads two fields veRL already has (same meaning, other schedules):

* ``lr_warmup_steps`` -> ``midpoint_steps`` (upstream calls it "warmup steps" too: roughly how many
  steps the LR stays high). If it is <= 0, ``int(lr_warmup_steps_ratio * total_training_steps)``
  as veRL does for warmups; if that is 0 too, upstream's 45.
* ``min_lr_ratio`` -> ``final_ratio`` (the LR the decay settles at, as a fraction of ``lr``).
  ``null`` or ``0`` (veRL's default) means upstream's 0.05.

``width_fraction`` has no config field and stays at upstream's 0.1.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from fvqa.train.verl_hooks import VERL_VERSION, UnsupportedVerlError, patch_on_import, verl_version

SCHEDULER_TYPE = "sigmoid"
"""The ``actor_rollout_ref.actor.optim.lr_scheduler_type`` value that selects this schedule."""

UPSTREAM_MIDPOINT_STEPS = 45
"""``lr_sigmoid_decay_warmup_steps`` in upstream's run script."""
UPSTREAM_FINAL_RATIO = 0.05
"""``1 - lr_sigmoid_decay_ratio`` with ``lr_sigmoid_decay_ratio=0.95`` in upstream's run script."""
UPSTREAM_WIDTH_FRACTION = 0.1
"""Upstream's fixed slope: ``k = 1 / (0.1 * num_warmup_steps)``."""

CONFIG_MODULE = "verl.workers.config.optimizer"
ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"


def sigmoid_decay_factor(
    step: int,
    *,
    midpoint_steps: int = UPSTREAM_MIDPOINT_STEPS,
    final_ratio: float = UPSTREAM_FINAL_RATIO,
    width_fraction: float = UPSTREAM_WIDTH_FRACTION,
) -> float:
    """LR multiplier after ``step`` optimizer steps (upstream's formula, see the module docstring)."""
    if midpoint_steps <= 0:
        raise ValueError(f"midpoint_steps must be > 0, got {midpoint_steps}")
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")
    if width_fraction <= 0:
        raise ValueError(f"width_fraction must be > 0, got {width_fraction}")
    x = (step - midpoint_steps) / (width_fraction * midpoint_steps)
    # 1 / (1 + e^x), written so that a long run (large x) cannot overflow math.exp.
    falling = 1.0 / (1.0 + math.exp(x)) if x <= 0 else math.exp(-x) / (1.0 + math.exp(-x))
    return final_ratio + (1.0 - final_ratio) * falling


def sigmoid_decay_schedule(
    optimizer: Optimizer,
    *,
    midpoint_steps: int = UPSTREAM_MIDPOINT_STEPS,
    final_ratio: float = UPSTREAM_FINAL_RATIO,
    width_fraction: float = UPSTREAM_WIDTH_FRACTION,
    last_epoch: int = -1,
) -> LambdaLR:
    """Upstream's sigmoid decay as a ``LambdaLR`` (defaults: upstream's run script, 45 steps, 5%)."""
    sigmoid_decay_factor(0, midpoint_steps=midpoint_steps, final_ratio=final_ratio,
                         width_fraction=width_fraction)  # reject bad parameters before the first step

    def factor(step: int) -> float:
        return sigmoid_decay_factor(step, midpoint_steps=midpoint_steps, final_ratio=final_ratio,
                                    width_fraction=width_fraction)

    return LambdaLR(optimizer, factor, last_epoch=last_epoch)


def parameters_from_optim_config(optim_config: Any) -> dict[str, Any]:
    """``midpoint_steps`` and ``final_ratio`` from veRL's optimizer config (mapping in the docstring)."""
    midpoint = optim_config.lr_warmup_steps or 0
    if midpoint <= 0:
        ratio = optim_config.lr_warmup_steps_ratio or 0.0
        total = optim_config.total_training_steps or 0
        midpoint = int(ratio * total) if ratio > 0 and total > 0 else 0
    final_ratio = optim_config.min_lr_ratio
    return {
        "midpoint_steps": midpoint if midpoint > 0 else UPSTREAM_MIDPOINT_STEPS,
        "final_ratio": float(final_ratio) if final_ratio else UPSTREAM_FINAL_RATIO,
    }


def schedule_from_optim_config(optimizer: Optimizer, optim_config: Any) -> LambdaLR:
    """The sigmoid schedule with the parameters an ``FSDPOptimizerConfig`` carries."""
    return sigmoid_decay_schedule(optimizer, **parameters_from_optim_config(optim_config))


# --- the veRL hook -------------------------------------------------------------------------------


def _recheck(what: str) -> UnsupportedVerlError:
    return UnsupportedVerlError(
        f"fvqa's lr_scheduler_type=sigmoid hook was written against verl=={VERL_VERSION}: {what}. "
        f"Install verl=={VERL_VERSION}, or re-check fvqa/train/lr_schedule.py against "
        f"{CONFIG_MODULE}.FSDPOptimizerConfig.__post_init__ (accepted lr_scheduler_type values; fields "
        "lr_warmup_steps, lr_warmup_steps_ratio, total_training_steps, min_lr_ratio) and "
        f"{ENGINE_MODULE}.FSDPEngine._build_lr_scheduler (where constant/cosine are built)."
    )


def _patch_optimizer_config(module: ModuleType) -> None:
    """Let ``FSDPOptimizerConfig`` accept ``sigmoid``; its own check allows only constant/cosine."""
    cls = getattr(module, "FSDPOptimizerConfig", None)
    if cls is None:
        raise _recheck(f"{CONFIG_MODULE} has no FSDPOptimizerConfig")
    original = cls.__post_init__
    if getattr(original, "_fvqa_sigmoid", False):
        return
    needed = {"lr_scheduler_type", "warmup_style", "lr_warmup_steps", "lr_warmup_steps_ratio",
              "total_training_steps", "min_lr_ratio"}
    missing = needed - set(cls.__dataclass_fields__)
    if missing or "lr_scheduler_type" not in cls._mutable_fields:
        raise _recheck(f"FSDPOptimizerConfig lacks {sorted(missing) or 'a mutable lr_scheduler_type'}")

    def __post_init__(self: Any) -> None:
        if self.lr_scheduler_type != SCHEDULER_TYPE:
            return original(self)
        # veRL's checks (warmup_style, lr, grad_clip) run unchanged on a stand-in type it knows.
        self.lr_scheduler_type = "constant"
        original(self)
        if self.warmup_style is None:  # veRL: a (deprecated) warmup_style overrides lr_scheduler_type
            self.lr_scheduler_type = SCHEDULER_TYPE

    __post_init__._fvqa_sigmoid = True  # type: ignore[attr-defined]
    __post_init__.__wrapped__ = original  # type: ignore[attr-defined]
    cls.__post_init__ = __post_init__


def _patch_engine(module: ModuleType) -> None:
    """Route ``sigmoid`` in the FSDP engine's scheduler builder to ours; all else to veRL's."""
    cls = getattr(module, "FSDPEngine", None)
    original = getattr(cls, "_build_lr_scheduler", None)
    if original is None:
        raise _recheck(f"{ENGINE_MODULE} has no FSDPEngine._build_lr_scheduler")
    if getattr(original, "_fvqa_sigmoid", False):
        return

    def _build_lr_scheduler(self: Any, optimizer: Optimizer) -> Any:
        optim_config = self.optimizer_config
        if optim_config.lr_scheduler_type != SCHEDULER_TYPE:
            return original(self, optimizer)
        params = parameters_from_optim_config(optim_config)
        if getattr(self, "rank", 0) == 0:
            print(f"[fvqa] sigmoid LR decay (MMSearch-R1): {params}, width_fraction={UPSTREAM_WIDTH_FRACTION}")
        return sigmoid_decay_schedule(optimizer, **params)

    _build_lr_scheduler._fvqa_sigmoid = True  # type: ignore[attr-defined]
    _build_lr_scheduler.__wrapped__ = original  # type: ignore[attr-defined]
    cls._build_lr_scheduler = _build_lr_scheduler


def check_verl_version() -> None:
    found = verl_version()
    if found != VERL_VERSION:
        raise _recheck(f"found verl=={found}")


def install() -> None:
    """Make ``lr_scheduler_type: sigmoid`` work in veRL's FSDP engine (idempotent, version-guarded).

    Touches two things in veRL, each only for ``sigmoid`` (every other value takes veRL's own
    code): ``FSDPOptimizerConfig.__post_init__`` (accept the value) and
    ``FSDPEngine._build_lr_scheduler`` (build :func:`schedule_from_optim_config`). Modules already
    imported are patched now, the others when veRL imports them.
    """
    check_verl_version()
    patch_on_import(CONFIG_MODULE, _patch_optimizer_config)
    patch_on_import(ENGINE_MODULE, _patch_engine)
