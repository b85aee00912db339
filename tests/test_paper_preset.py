"""configs/grpo_qwen2_5_vl_7b_paper.yaml: upstream's recipe, composed through veRL's Hydra tree, and
accepted by veRL's own dataclasses (with fvqa.train.verl_ext installed, as in a run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fvqa.train import launcher

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "grpo_qwen2_5_vl_7b_paper.yaml"
DEFAULTS = REPO / "configs" / "grpo_qwen2_5_vl_7b.yaml"

# Every resolved key where the preset differs from our defaults (the header of the preset lists the
# sources); anything else differing means one of the two files drifted.
EXPECTED_DIFFERENCES = {
    "fvqa.format_rule": ("limits", "upstream"),
    "reward.custom_reward_function.reward_kwargs.format_rule": ("limits", "upstream"),
    "actor_rollout_ref.actor.optim.lr_scheduler_type": ("constant", "sigmoid"),
    "actor_rollout_ref.actor.optim.lr_warmup_steps": (-1, 45),
    "actor_rollout_ref.actor.optim.min_lr_ratio": (0.0, 0.05),
    "trainer.total_epochs": (8, 30),
    "trainer.experiment_name": ("qwen2_5_vl_7b_fvqa", "qwen2_5_vl_7b_fvqa_paper"),
    "trainer.default_local_dir": ("checkpoints/fvqa_grpo/qwen2_5_vl_7b_fvqa",
                                  "checkpoints/fvqa_grpo/qwen2_5_vl_7b_fvqa_paper"),
    "actor_rollout_ref.rollout.trace.experiment_name": ("qwen2_5_vl_7b_fvqa", "qwen2_5_vl_7b_fvqa_paper"),
}


@pytest.fixture()
def prompts_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMSEARCH_R1_PROMPTS", str(tmp_path))
    return tmp_path


def _leaves(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def test_preset_is_upstreams_recipe(prompts_dir: Path) -> None:
    cfg = launcher.compose(PRESET, [])
    assert cfg.fvqa.format_rule == "upstream"
    assert cfg.reward.custom_reward_function.reward_kwargs.format_rule == "upstream"
    assert cfg.fvqa.prompts == str(prompts_dir)
    optim = cfg.actor_rollout_ref.actor.optim
    assert optim.lr_scheduler_type == "sigmoid"
    assert (optim.lr_warmup_steps, optim.min_lr_ratio) == (45, pytest.approx(0.05))
    assert optim.lr == pytest.approx(2e-6)


def test_preset_differs_from_our_defaults_only_where_documented(prompts_dir: Path) -> None:
    ours = _leaves(OmegaConf.to_container(launcher.compose(DEFAULTS, []), resolve=True))
    paper = _leaves(OmegaConf.to_container(launcher.compose(PRESET, []), resolve=True))
    diff = {k: (ours.get(k), paper.get(k)) for k in ours.keys() | paper.keys() if ours.get(k) != paper.get(k)}
    assert diff.pop("fvqa.prompts") == (None, str(prompts_dir))
    assert diff == EXPECTED_DIFFERENCES


def test_verl_dataclasses_accept_the_preset(prompts_dir: Path) -> None:
    from verl.utils.config import omega_conf_to_dataclass

    import fvqa.train.verl_ext  # noqa: F401 - what VERL_USE_EXTERNAL_MODULES loads in every process
    from fvqa.train.lr_schedule import parameters_from_optim_config

    cfg = launcher.compose(PRESET, launcher.launch_overrides(PRESET))
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert actor.optim.lr_scheduler_type == "sigmoid"
    assert parameters_from_optim_config(actor.optim) == {"midpoint_steps": 45, "final_ratio": 0.05}


def test_prompts_folder_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf.errors import InterpolationResolutionError

    monkeypatch.delenv("MMSEARCH_R1_PROMPTS", raising=False)
    cfg = launcher.compose(PRESET, [])
    with pytest.raises(InterpolationResolutionError, match="MMSEARCH_R1_PROMPTS"):
        _ = cfg.fvqa.prompts
