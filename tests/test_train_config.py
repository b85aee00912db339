"""The GRPO configs compose through veRL's own Hydra tree with the paper's values, and
`fvqa train run --dry-run` prints the exact veRL command, the composed config and clear checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fvqa.errors import ConfigError
from fvqa.train import launcher

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "grpo_qwen2_5_vl_7b.yaml"
ONE_NODE = REPO / "configs" / "grpo_qwen2_5_vl_7b_1node.yaml"


@pytest.fixture(scope="module")
def paper_cfg():
    cfg = launcher.compose(PAPER, launcher.launch_overrides(PAPER))
    launcher.validate(cfg)
    return cfg


def test_paper_values(paper_cfg) -> None:
    c = paper_cfg
    actor, rollout = c.actor_rollout_ref.actor, c.actor_rollout_ref.rollout
    assert c.data.train_batch_size == 512
    assert rollout.n == 8
    assert actor.ppo_mini_batch_size == 128
    assert actor.optim.lr == pytest.approx(2e-6)
    assert actor.use_kl_loss is True
    assert actor.kl_loss_coef == pytest.approx(0.001)
    assert actor.kl_loss_type == "low_var_kl"
    assert actor.clip_ratio == pytest.approx(0.2)
    assert actor.entropy_coeff == 0
    assert c.algorithm.adv_estimator == "grpo"
    assert c.algorithm.use_kl_in_reward is False
    assert (c.trainer.nnodes, c.trainer.n_gpus_per_node) == (4, 8)


def test_rollout_goes_to_our_loop_with_room_for_three_turns_and_thumbnails(paper_cfg) -> None:
    c = paper_cfg
    rollout = c.actor_rollout_ref.rollout
    fvqa = c.fvqa
    assert rollout.agent.default_agent_loop == "fvqa_search_agent"
    registry = yaml.safe_load(Path(rollout.agent.agent_loop_config_path).read_text())
    assert {"name": "fvqa_search_agent", "_target_": "fvqa.train.agent_loop.FvqaSearchAgentLoop"} in registry
    # 1 user image + every thumbnail of the one allowed image search.
    assert rollout.limit_images >= 1 + fvqa.limits.max_image_search * fvqa.limits.image_topk
    # Response budget: 3 full turns plus the thumbnails (tokens per thumbnail = pixels / 28^2).
    thumb_tokens = fvqa.limits.image_topk * fvqa.limits.thumbnail_max_pixels // (28 * 28)
    assert rollout.response_length >= fvqa.limits.max_rounds * 1024 + thumb_tokens
    assert rollout.max_model_len >= rollout.prompt_length + rollout.response_length
    assert fvqa.limits.max_rounds == 3 and fvqa.limits.max_text_search == 2
    assert fvqa.limits.max_image_search == 1


def test_reward_checkpoints_validation(paper_cfg) -> None:
    c = paper_cfg
    fn = c.reward.custom_reward_function
    assert fn.path == "pkg://fvqa.train.verl_reward" and fn.name == "compute_score"
    assert fn.reward_kwargs.alpha == pytest.approx(0.1) and fn.reward_kwargs.search_penalty == pytest.approx(0.1)
    assert c.trainer.test_freq > 0 and c.trainer.save_freq > 0
    assert c.trainer.resume_mode == "auto"
    # veRL's loader resolves the reward module from the config exactly as the trainer will.
    from verl.trainer.ppo.reward import get_custom_reward_fn

    fn = get_custom_reward_fn(c)
    out = fn("mmsearch_r1/fvqa_train", "", "Paris",
             {"assistant_turns": ["<reason>r</reason><answer>Paris</answer>"]})
    assert out["score"] == pytest.approx(1.0) and out["searched"] == 0


def test_one_node_variant_differs_only_in_scale(paper_cfg) -> None:
    from omegaconf import OmegaConf

    one = launcher.compose(ONE_NODE, launcher.launch_overrides(ONE_NODE))
    launcher.validate(one)
    a, b = OmegaConf.to_container(paper_cfg), OmegaConf.to_container(one)
    assert b["trainer"]["nnodes"] == 1 and b["trainer"]["n_gpus_per_node"] == 8
    for d in (a, b):
        d["trainer"].pop("nnodes")
        d["trainer"].pop("experiment_name")
        d["trainer"].pop("default_local_dir")
    assert a == b


def test_bad_override_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="cannot compose"):
        launcher.compose(PAPER, ["trainer.no_such_key=1"])
    with pytest.raises(ConfigError, match="not found"):
        launcher.compose(REPO / "configs" / "nope.yaml", [])


def _run_cli(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from fvqa.cli import app

    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args)


def test_dry_run_prints_command_config_and_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run_cli(
        ["train", "run", "--config", str(PAPER), "--dry-run", "--ray-address", "10.0.0.1:6379",
         "trainer.total_epochs=2"], tmp_path, monkeypatch,
    )
    # Checks fail here (no GPU, no data, no search service): the dry run says so with its exit code.
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    cmd = lines[lines.index("command:") + 1]
    assert cmd.startswith("TOKENIZERS_PARALLELISM=false VERL_USE_EXTERNAL_MODULES=fvqa.train.verl_ext ")
    assert f" {sys.executable} -m verl.trainer.main_ppo --config-path {PAPER.parent} --config-name grpo_qwen2_5_vl_7b " in cmd
    assert "ray_kwargs.ray_init.address=10.0.0.1:6379" in cmd.split() and "trainer.total_epochs=2" in cmd.split()
    config_text = result.stdout.split("as `--cfg job` prints it):\n", 1)[1]
    composed = yaml.safe_load(config_text)
    assert composed["trainer"]["total_epochs"] == 2
    assert composed["ray_kwargs"]["ray_init"]["address"] == "10.0.0.1:6379"
    # No GPU, no vLLM, no prepared data, no search service here: each is reported with what to do.
    err = result.stderr
    assert "check GPUs: FAIL need 8 per node" in err
    assert f"check data.train_files: FAIL missing {tmp_path}/fvqa-work/exports/verl/train.parquet" in err
    assert "fvqa train prepare" in err
    assert "check search service: FAIL http://127.0.0.1:8765 unreachable" in err
    assert "check package verl: ok" in err
    assert "check prompts: warn no manifest.json" in err
    # Four nodes cannot reach a search service on this node's loopback address.
    assert "check search reach: FAIL trainer.nnodes=4 but fvqa.search_url is http://127.0.0.1:8765" in err
    assert "fvqa search serve --host" in err
    assert "dry run: nothing launched (7 failed check(s))" in err


def test_run_refuses_to_launch_when_checks_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fvqa.errors import FvqaError

    result = _run_cli(["train", "run", "--config", str(PAPER)], tmp_path, monkeypatch)
    assert isinstance(result.exception, FvqaError)
    assert "check(s) failed" in str(result.exception) and "--skip-checks" in str(result.exception)


def test_cli_entry_point_turns_errors_into_one_red_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fvqa.cli", "train", "run", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert "training config not found" in proc.stderr


def test_reward_scores_with_the_rollout_limits_from_one_source() -> None:
    """`fvqa.limits` reaches the reward through veRL's own reward-function loader: with 4 rounds and 3
    text searches, text -> text -> text -> answer is a well-formed trajectory (format 1)."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    from fvqa.train.checks import check_reward_limits

    turns = ["<reason>a</reason><text_search>q1</text_search>", "<reason>b</reason><text_search>q2</text_search>",
             "<reason>c</reason><text_search>q3</text_search>", "<reason>d</reason><answer>Paris</answer>"]
    wide = launcher.compose(PAPER, ["fvqa.limits.max_rounds=4", "fvqa.limits.max_text_search=3"])
    assert check_reward_limits(wide).ok
    out = get_custom_reward_fn(wide)("mmsearch_r1/fvqa_train", "", "Paris", {"assistant_turns": turns})
    assert out["format"] == 1.0 and out["n_text_search"] == 3 and out["score"] == pytest.approx(0.91)
    # The paper's limits (3 rounds, 2 text searches) do not allow that shape.
    paper = launcher.compose(PAPER, [])
    assert get_custom_reward_fn(paper)("mmsearch_r1/fvqa_train", "", "Paris", {"assistant_turns": turns})["format"] == 0
    # A reward told other limits than the rollout's is a failed check naming both.
    split = launcher.compose(PAPER, ["fvqa.limits.max_rounds=4",
                                     "reward.custom_reward_function.reward_kwargs.limits={max_rounds:3}"])
    check = check_reward_limits(split)
    assert not check.ok and check.required and "max_rounds': 3" in check.detail and "max_rounds': 4" in check.detail
    rule = launcher.compose(PAPER, ["reward.custom_reward_function.reward_kwargs.format_rule=upstream"])
    assert not check_reward_limits(rule).ok


def test_checks_catch_a_batch_larger_than_the_data_and_prompts_longer_than_the_limit(tmp_path: Path) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf
    from PIL import Image

    from fvqa.demo.tiny_model import build_tiny_qwen
    from fvqa.train.checks import check_batch_size, check_prompt_length

    model = build_tiny_qwen(tmp_path)
    buf = io.BytesIO()
    Image.new("RGB", (224, 224), (10, 200, 30)).save(buf, format="PNG")
    rows = [{"prompt": [{"role": "user", "content": "Look at this image: <image> What is it? " + "word " * n}],
             "images": [{"bytes": buf.getvalue(), "path": None}]} for n in (5, 300, 40)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)

    def cfg(batch: int, max_prompt: int) -> object:
        return OmegaConf.create({"data": {"train_files": str(path), "val_files": None, "train_batch_size": batch,
                                          "max_prompt_length": max_prompt},
                                 "actor_rollout_ref": {"model": {"path": str(model)}}})

    assert check_batch_size(cfg(3, 4096)).ok
    big = check_batch_size(cfg(4, 4096))
    assert not big.ok and "data.train_batch_size=4 but only 3 train rows" in big.detail
    fits = check_prompt_length(cfg(3, 4096))
    assert fits.ok, fits.detail
    longest = int(fits.detail.split("longest round-1 prompt ")[1].split()[0])
    # The count is what the processor really produces for the longest row, image tokens included.
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model))
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "Look at this image: "}, {"type": "image"},
        {"type": "text", "text": " What is it? " + "word " * 300}]}], add_generation_prompt=True, tokenize=False)
    image = Image.open(io.BytesIO(buf.getvalue()))
    assert longest == processor(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1]
    short = check_prompt_length(cfg(3, longest - 1))
    assert not short.ok and short.required and f"{longest} tokens > data.max_prompt_length={longest - 1}" in short.detail
