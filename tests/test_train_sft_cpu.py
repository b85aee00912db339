"""SFT cold start through veRL's own SFT trainer on CPU: `fvqa train sft -c configs/sft_demo_cpu.yaml`.

Nothing here stands in for veRL: the real CLI launches `torchrun -m verl.trainer.sft_trainer`
(MultiTurnSFTDataset, FSDP2 engine, sft loss, checkpoint with a transformers folder) with fvqa's
CPU backend (CPU platform, gloo). The data is the SFT export's contract built from demo-world
items (`support.sft_rows`: scripted protocol-correct trajectories, tool results as user turns); the
model is the tiny random Qwen2.5-VL with the demo tokenizer. Then: the loss fell, the checkpoint
loads with transformers and is accepted as GRPO's policy by `train run --dry-run`, veRL's loss mask
covers assistant turns only, and sampled first turns are protocol-valid far more often than the
random model's (both rates printed). ~2.5 minutes on an idle 2-core machine, ~1.5 GB. The checks'
one-line verdicts on broken files and batch sizes are fast tests at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.paths import FVQA, REPO, write_demo_config
from support.sft_rows import SFT_COLUMNS, prepared_train_parquet, write_sft_parquet

CONFIG = REPO / "configs" / "sft_demo_cpu.yaml"
STEPS = 64  # the demo config's total_training_steps
RUN_TIMEOUT_S = 600


def _cli(args: list[str], cwd: Path, timeout: int = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FVQA, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory, demo_world: Path) -> dict[str, Any]:
    from fvqa.demo.policy import demo_corpus, read_rows
    from fvqa.demo.tiny_model import build_tiny_qwen

    root = tmp_path_factory.mktemp("sft-cpu")
    train_parquet = prepared_train_parquet(root, demo_world)
    data = write_sft_parquet(root / "ws" / "exports" / "sft" / "train.parquet", train_parquet, n=32)
    base = build_tiny_qwen(root / "base", corpus=demo_corpus(read_rows(train_parquet)), subdir=None)
    ckpt = root / "ckpt"
    run = _cli(["train", "sft", "--config", str(CONFIG), f"data.train_files={data}", f"model.path={base}",
                f"trainer.default_local_dir={ckpt}"], root)
    (root / "run.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, f"fvqa train sft failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return {"root": root, "data": data, "base": base, "ckpt": ckpt, "train_parquet": train_parquet,
            "stdout": run.stdout, "stderr": run.stderr}


@pytest.mark.slow
def test_sft_file_has_the_contract_columns(sft: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(sft["data"])
    assert set(SFT_COLUMNS) <= set(table.column_names)
    rows = table.to_pylist()
    assert {r["search_pattern"] for r in rows} == {"none", "image", "text", "mixed"}
    for r in rows:
        assert sum(m["content"].count("<image>") for m in r["messages"]) == len(r["images"])


@pytest.mark.slow
def test_loss_decreases_and_each_step_is_logged(sft: dict[str, Any]) -> None:
    files = sorted((sft["ckpt"] / "metrics").glob("run-*.jsonl"))
    assert len(files) == 1, files
    rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    losses = {r["step"]: r["data"]["train/loss"] for r in rows}
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = sum(losses[s] for s in (1, 2, 3, 4)) / 4
    last = sum(losses[s] for s in range(STEPS - 7, STEPS + 1)) / 8
    print(f"SFT loss: first 4 steps {first:.3f} -> last 8 steps {last:.3f}")
    assert first > 5.0  # a random model over a ~1,500-token vocabulary
    assert last < 0.4 * first
    assert f"step:{STEPS} - " in sft["stdout"] and "train/loss:" in sft["stdout"]  # veRL's console line
    assert f"per-step metrics: {files[0]}" in sft["stderr"]


@pytest.mark.slow
def test_checkpoint_loads_with_transformers_and_is_grpo_policy(sft: dict[str, Any], demo_world: Path) -> None:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    link = sft["ckpt"] / "huggingface"
    assert link.is_symlink() and link.resolve() == (sft["ckpt"] / f"global_step_{STEPS}" / "huggingface").resolve()
    assert f"actor_rollout_ref.model.path): {link}" in sft["stderr"]
    model = AutoModelForImageTextToText.from_pretrained(str(link), dtype=torch.float32).eval()
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(str(link))
    assert processor.chat_template and type(processor).__name__ == "Qwen2_5_VLProcessor"
    base = AutoModelForImageTextToText.from_pretrained(str(sft["base"]), dtype=torch.float32)
    moved = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert any("language_model" in n for n in moved)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[prompt], images=[Image.new("RGB", (56, 56), "red")], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]

    # GRPO takes it as its policy: the dry run loads its processor to measure the round-1 prompts.
    verl_dir = sft["train_parquet"].parent
    grpo = _cli(["train", "run", "--config", str(REPO / "configs" / "grpo_demo_cpu.yaml"), "--dry-run",
                 f"actor_rollout_ref.model.path={link}", f"data.train_files={verl_dir / 'train.parquet'}",
                 f"data.val_files={verl_dir / 'train.parquet'}",
                 f"fvqa.search_config={write_demo_config(sft['root'], demo_world)}"], sft["root"], timeout=300)
    assert grpo.returncode == 0, grpo.stderr[-3000:]
    assert "check prompt length: ok" in grpo.stderr


@pytest.mark.slow
def test_loss_mask_covers_assistant_turns_only(sft: dict[str, Any]) -> None:
    """veRL's MultiTurnSFTDataset over the file: trained tokens are exactly the assistant turns."""
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf
    from verl.utils import hf_processor, hf_tokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    rows = pq.read_table(sft["data"]).to_pylist()
    index = next(i for i, r in enumerate(rows) if r["search_pattern"] == "mixed")
    tokenizer, processor = hf_tokenizer(str(sft["base"])), hf_processor(str(sft["base"]))
    config = OmegaConf.create({"pad_mode": "no_padding", "max_length": 4096, "truncation": "error"})
    item = MultiTurnSFTDataset([str(sft["data"])], tokenizer, config, processor=processor)[index]
    ids, mask = item["input_ids"].tolist(), item["loss_mask"].tolist()
    trained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    masked = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assistant = [m["content"] for m in rows[index]["messages"] if m["role"] == "assistant"]
    assert len(assistant) == 3  # image search, text search, answer
    assert trained == "".join(f"{a}<|im_end|>\n" for a in assistant)
    # tool results (both user turns after a search), their thumbnails and the question are context only
    assert masked.count("Searched results: <information>") == 2 and "<|image_pad|>" in masked
    assert "<|im_start|>assistant\n" in masked and "<information>" not in trained
    assert "multi_modal_inputs" in item and int(item["multi_modal_inputs"]["image_grid_thw"].shape[0]) == 3


@pytest.mark.slow
def test_dry_run_names_a_missing_data_file_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "train.parquet"
    run = _cli(["train", "sft", "--config", str(CONFIG), "--dry-run", f"data.train_files={missing}",
                f"trainer.default_local_dir={tmp_path / 'ckpt'}"], tmp_path, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [ln for ln in run.stderr.splitlines() if str(missing) in ln]
    assert len(lines) == 1 and lines[0].startswith("check data.train_files: FAIL missing"), run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "torch.distributed.run" in run.stdout and not (tmp_path / "ckpt").exists()  # printed, not launched


@pytest.mark.slow
def test_sft_writes_protocol_valid_turns_more_often_than_the_random_model(sft: dict[str, Any]) -> None:
    """32 first turns each at temperature 1 (8 rows x 4), classified with the protocol's format rules."""
    from fvqa.demo.policy import sample_turns

    reports = {name: sample_turns(path, sft["train_parquet"], n_rows=8, k=4, rollout=False, seed=0)
               for name, path in (("random", sft["base"]), ("sft", sft["ckpt"] / "huggingface"))}
    rates = {name: r.well_formed / r.n for name, r in reports.items()}
    parsed = {name: r.valid_fraction for name, r in reports.items()}
    print(f"format-valid first turns (upstream per-turn rules, n=32 each): random {rates['random']:.1%}, "
          f"SFT {rates['sft']:.1%}; parse as an action: random {parsed['random']:.1%}, SFT {parsed['sft']:.1%}")
    assert all(r.n == 32 for r in reports.values())
    assert rates["sft"] > rates["random"] and rates["sft"] >= 0.25
    assert parsed["sft"] > parsed["random"]


def _messages(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _compose(*overrides: str) -> Any:
    from fvqa.train.launcher import compose

    return compose(CONFIG, list(overrides))


def test_data_check_names_the_first_bad_row_in_one_line(tmp_path: Path) -> None:
    from fvqa.train.sft_checks import check_sft_data

    good = {"messages": _messages(("user", "<image>What is this?"), ("assistant", "<answer>x</answer>")),
            "images": [{"bytes": b"\x89PNG"}]}
    cases = {
        "one image for two placeholders": [good, {**good, "messages": _messages(
            ("user", "<image><image>What?"), ("assistant", "<answer>x</answer>"))}],
        "no assistant turn": [{**good, "messages": _messages(("user", "<image>What?"))}],
        "bad role": [{**good, "messages": _messages(("user", "<image>Q"), ("robot", "A"))}],
    }
    expected = {"one image for two placeholders": "row 1: 2 <image> placeholder(s) but 1 image(s)",
                "no assistant turn": "row 0: no assistant turn", "bad role": "row 0: every message needs a role"}
    for name, rows in cases.items():
        path = _write(tmp_path / f"{name.replace(' ', '_')}.parquet", rows)
        (check,) = check_sft_data(_compose(f"data.train_files={path}"))
        assert not check.ok and check.required and expected[name] in check.detail and "\n" not in check.detail
    no_messages = _write(tmp_path / "prompt.parquet", [{"prompt": good["messages"], "images": good["images"]}])
    (check,) = check_sft_data(_compose(f"data.train_files={no_messages}"))
    assert not check.ok and "has no 'messages' column" in check.detail
    (check,) = check_sft_data(_compose(f"data.train_files={_write(tmp_path / 'ok.parquet', [good] * 8)}"))
    assert check.ok and check.detail.startswith("8 conversations")


def test_batch_check_divisibility_rows_and_epochs(tmp_path: Path) -> None:
    from fvqa.train.sft_checks import check_sft_batch, check_sft_save

    good = {"messages": _messages(("user", "Q"), ("assistant", "A")), "images": []}
    data = _write(tmp_path / "train.parquet", [good] * 8)
    ok = check_sft_batch(_compose(f"data.train_files={data}"))
    assert ok.ok and "2 step(s) per epoch, 64 step(s) in total" in ok.detail
    bad = {
        "micro": (["data.micro_batch_size_per_gpu=3"], "not a multiple of data.micro_batch_size_per_gpu=3"),
        "ranks": (["trainer.n_gpus_per_node=3"], "not a multiple of the 3 data-parallel rank(s)"),
        "rows": (["data.train_batch_size=16", "data.micro_batch_size_per_gpu=16"], "only 8 train rows"),
        "epochs": (["trainer.total_epochs=2"], "2 epoch(s) of 2 step(s) end first"),
    }
    for overrides, words in bad.values():
        check = check_sft_batch(_compose(f"data.train_files={data}", *overrides))
        assert not check.ok and words in check.detail, check.detail
    save = check_sft_save(_compose("checkpoint.save_contents=[model,optimizer,extra]"))
    assert not save.ok and "add hf_model" in save.detail


def test_command_env_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fvqa.train import sft

    monkeypatch.chdir(tmp_path)
    cfg = _compose()
    assert sft.runtime_overrides(cfg) == [f"data.train_files={tmp_path / 'fvqa-work/exports/sft/train.parquet'}",
                                          f"trainer.default_local_dir={tmp_path / 'fvqa-work/checkpoints/fvqa_demo_sft/tiny_qwen2_5_vl'}"]
    cmd = sft.build_command(CONFIG, ["trainer.total_training_steps=2"], cfg)
    assert cmd[1:8] == ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1", "-m",
                        "verl.trainer.sft_trainer"]
    assert cmd[-1] == "trainer.total_training_steps=2"
    env = sft.launch_env(cfg)
    assert env["VERL_PLATFORM"] == "cpu"
    assert env["VERL_USE_EXTERNAL_MODULES"] == "fvqa.train.verl_ext,fvqa.train.cpu.enable"
    assert env["VERL_FILE_LOGGER_PATH"].startswith(str(tmp_path / "fvqa-work/checkpoints/fvqa_demo_sft"))

    from fvqa.train.launcher import compose

    gpu = compose(REPO / "configs" / "sft_8gpu.yaml", [])
    assert "VERL_PLATFORM" not in sft.launch_env(gpu) and "--nproc_per_node=8" in sft.build_command(
        REPO / "configs" / "sft_8gpu.yaml", [], gpu)
    sft.validate(gpu)  # veRL's dataclasses accept the engine, optimizer and checkpoint sections
