"""MMSearch-R1's sigmoid LR decay: upstream's values, and selectable through veRL's own code path."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from fvqa.train import lr_schedule, verl_hooks
from fvqa.train.lr_schedule import sigmoid_decay_factor, sigmoid_decay_schedule


def upstream_factor(step: int, lr_low: float = 0.05, num_warmup_steps: int = 45) -> float:
    """Upstream's expression as it stands in mmsearch_r1/utils/torch_functional.py (run-script values)."""
    k = (num_warmup_steps * 0.1) ** -1
    return (1 - lr_low) / (1 + math.exp(k * (step - num_warmup_steps))) + lr_low


def test_factor_matches_upstream_formula_and_the_paper_shape() -> None:
    for step in range(0, 400):
        assert sigmoid_decay_factor(step) == pytest.approx(upstream_factor(step), rel=1e-12, abs=1e-15)
    assert sigmoid_decay_factor(0) == pytest.approx(1.0, abs=1e-4)
    assert sigmoid_decay_factor(35) == pytest.approx(0.9071, abs=1e-4)
    assert sigmoid_decay_factor(45) == pytest.approx(0.525)  # the midpoint: halfway to the floor
    assert sigmoid_decay_factor(70) == pytest.approx(0.0537, abs=1e-4)  # ~5% by step 70
    assert sigmoid_decay_factor(100) == pytest.approx(0.05, abs=1e-5)
    values = [sigmoid_decay_factor(s) for s in range(0, 200)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert min(values) > 0.05


def test_factor_parameters_and_long_runs() -> None:
    assert sigmoid_decay_factor(10**7) == pytest.approx(0.05)  # math.exp would overflow upstream here
    assert sigmoid_decay_factor(20, midpoint_steps=20, final_ratio=0.0) == pytest.approx(0.5)
    assert sigmoid_decay_factor(10, midpoint_steps=20, width_fraction=0.5) == pytest.approx(
        0.05 + 0.95 / (1 + math.exp(-1.0)))
    for bad in ({"midpoint_steps": 0}, {"final_ratio": 1.5}, {"width_fraction": 0}):
        with pytest.raises(ValueError):
            sigmoid_decay_factor(0, **bad)
    with pytest.raises(ValueError):
        sigmoid_decay_schedule(_optimizer(), midpoint_steps=-1)


def _optimizer(lr: float = 2e-6) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    return torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=lr)


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    """The LR used at each of ``steps`` training steps (veRL steps the scheduler after each)."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_lambda_lr_steps_with_upstream_factors() -> None:
    opt = _optimizer()
    lrs = _lrs(sigmoid_decay_schedule(opt), opt, 101)
    assert lrs == pytest.approx([2e-6 * upstream_factor(t) for t in range(101)], rel=1e-9)


def test_parameters_come_from_existing_verl_fields() -> None:
    from verl.workers.config import FSDPOptimizerConfig

    defaults = FSDPOptimizerConfig(lr=2e-6)  # lr_warmup_steps -1, min_lr_ratio None
    assert lr_schedule.parameters_from_optim_config(defaults) == {"midpoint_steps": 45, "final_ratio": 0.05}
    cfg = FSDPOptimizerConfig(lr=2e-6, lr_warmup_steps=30, min_lr_ratio=0.1)
    assert lr_schedule.parameters_from_optim_config(cfg) == {"midpoint_steps": 30, "final_ratio": 0.1}
    cfg = FSDPOptimizerConfig(lr=2e-6, lr_warmup_steps_ratio=0.25, total_training_steps=200, min_lr_ratio=0.0)
    assert lr_schedule.parameters_from_optim_config(cfg) == {"midpoint_steps": 50, "final_ratio": 0.05}


# --- through veRL 0.9.1's own code ----------------------------------------------------------------


def _verl_optim_config(**optim):
    """veRL's optimizer config built the way its workers build it (OmegaConf -> dataclass)."""
    from verl.utils.config import omega_conf_to_dataclass

    node = OmegaConf.create({"_target_": "verl.workers.config.FSDPOptimizerConfig", "lr": 2e-6, **optim})
    return omega_conf_to_dataclass(node)


def _verl_scheduler(optim_config, optimizer):
    """veRL's FSDP engine method that builds the scheduler (the engine needs only these attributes)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    return FSDPEngine._build_lr_scheduler(SimpleNamespace(optimizer_config=optim_config, rank=0), optimizer)


@pytest.fixture()
def installed():
    lr_schedule.install()
    import verl.workers.config.optimizer  # noqa: F401 - patched now or by the import hook
    import verl.workers.engine.fsdp.transformer_impl  # noqa: F401


def test_sigmoid_through_verl_config_and_engine(installed) -> None:
    from verl.workers.config.optimizer import build_optimizer

    cfg = _verl_optim_config(lr_scheduler_type="sigmoid", lr_warmup_steps=45, min_lr_ratio=0.05,
                             total_training_steps=300)
    assert cfg.lr_scheduler_type == "sigmoid"
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model.parameters(), cfg)  # veRL's own AdamW construction
    sched = _verl_scheduler(cfg, opt)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    lrs = _lrs(sched, opt, 101)
    assert lrs == pytest.approx([2e-6 * upstream_factor(t) for t in range(101)], rel=1e-9)
    # veRL's defaults for the two fields (-1 and 0.0) mean upstream's 45 steps and 5%.
    cfg = _verl_optim_config(lr_scheduler_type="sigmoid", min_lr_ratio=0.0)
    opt = _optimizer()
    assert _lrs(_verl_scheduler(cfg, opt), opt, 71)[70] == pytest.approx(2e-6 * upstream_factor(70))


def test_constant_and_cosine_still_go_to_verl(installed) -> None:
    from hydra.errors import InstantiationException
    from verl.utils.torch_functional import get_cosine_schedule_with_warmup

    opt = _optimizer()
    assert _lrs(_verl_scheduler(_verl_optim_config(lr_scheduler_type="constant"), opt), opt, 5) == [2e-6] * 5

    cfg = _verl_optim_config(lr_scheduler_type="cosine", total_training_steps=10, min_lr_ratio=0.1)
    opt, ref_opt = _optimizer(), _optimizer()
    got = _lrs(_verl_scheduler(cfg, opt), opt, 10)
    want = _lrs(get_cosine_schedule_with_warmup(ref_opt, 0, 10, min_lr_ratio=0.1), ref_opt, 10)
    assert got == pytest.approx(want) and got[0] == pytest.approx(2e-6) and got[-1] < 1e-6
    # veRL's own validation is untouched for other values (Hydra wraps its AssertionError).
    with pytest.raises(InstantiationException, match="AssertionError"):
        _verl_optim_config(lr_scheduler_type="linear")


def test_install_is_idempotent(installed) -> None:
    from verl.workers.config.optimizer import FSDPOptimizerConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    post_init, build = FSDPOptimizerConfig.__post_init__, FSDPEngine._build_lr_scheduler
    lr_schedule.install()
    lr_schedule.install()
    assert FSDPOptimizerConfig.__post_init__ is post_init and FSDPEngine._build_lr_scheduler is build
    assert not getattr(build.__wrapped__, "_fvqa_sigmoid", False)  # one layer, around veRL's own
    assert sum(isinstance(f, verl_hooks._PatchAfterImport) for f in sys.meta_path) == 1


def test_other_verl_versions_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import verl

    monkeypatch.setattr(verl, "__version__", "0.10.0")
    with pytest.raises(lr_schedule.UnsupportedVerlError, match=r"found verl==0\.10\.0.*_build_lr_scheduler"):
        lr_schedule.install()


def test_verl_loads_the_hook_itself_and_patches_lazily() -> None:
    """As in a Ray worker: ``import verl`` imports fvqa.train.verl_ext from the environment, and the
    FSDP engine is patched when veRL imports it, not earlier."""
    code = textwrap.dedent("""
        import sys
        import verl
        assert "fvqa.train.verl_ext" in sys.modules
        assert "verl.workers.engine.fsdp.transformer_impl" not in sys.modules
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngine
        from verl.workers.config import FSDPOptimizerConfig
        assert FSDPEngine._build_lr_scheduler._fvqa_sigmoid
        assert FSDPOptimizerConfig(lr=1e-6, lr_scheduler_type="sigmoid").lr_scheduler_type == "sigmoid"
        print("ok")
    """)
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "fvqa.train.verl_ext"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
