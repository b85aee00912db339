"""The demo's primed tiny policy: built and primed on prepared rows, it writes protocol turns.

A random tiny Qwen2.5-VL scores 0 on every rollout, so the demo's GRPO steps would have all-zero
advantages. `fvqa.demo.policy.prime_policy` gives it a few seconds of supervised steps on protocol
turns; these tests check the result behaves as the demo needs (sampled at temperature 1, most first
turns are valid tag turns, some call search, rewards differ within a group) and is labelled as a
stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from support.sft_rows import prepared_train_parquet
from typer.testing import CliRunner

from fvqa.errors import FvqaError

N_ENTITIES = 24


@pytest.fixture(scope="module")
def train_parquet(tmp_path_factory: pytest.TempPathFactory, demo_world: Path) -> Path:
    """`train prepare` over a small workspace of demo-world entities, their images and questions."""
    path = prepared_train_parquet(tmp_path_factory.mktemp("policy-ws"), demo_world, N_ENTITIES)
    assert len(pq.read_table(path)) == N_ENTITIES
    return path


@pytest.fixture(scope="module")
def primed(tmp_path_factory: pytest.TempPathFactory, train_parquet: Path) -> dict[str, Any]:
    from fvqa.demo.policy import demo_corpus, prime_policy, read_rows
    from fvqa.demo.tiny_model import build_tiny_qwen

    rows = read_rows(train_parquet)
    model_dir = build_tiny_qwen(tmp_path_factory.mktemp("policy") / "demo-policy", corpus=demo_corpus(rows),
                                subdir=None)
    # the budget is only a guard: on an idle 2-core machine 150 steps take ~12 s
    report = prime_policy(model_dir, train_parquet, steps=150, seconds_budget=600, seed=0)
    return {"dir": model_dir, "report": report}


@pytest.mark.slow  # ~25 s on an idle 2-core machine: build, 150 CPU steps, ~40 sampled turns
def test_primed_policy_writes_protocol_turns_and_says_it_is_a_stand_in(primed: dict[str, Any],
                                                                        train_parquet: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from fvqa.demo.policy import STANDIN_FILE, sample_turns

    report, model_dir = primed["report"], primed["dir"]
    assert report.steps == 150 and report.model_dir == model_dir
    assert report.final_loss < 0.5 * report.first_loss  # 7+ nats (random) -> well under half
    assert {"image_search", "answer"} <= set(report.examples_by_kind)

    note = json.loads((model_dir / STANDIN_FILE).read_text())
    assert note["stand_in"] is True and "demo stand-in, not a trained policy" in note["what"]
    assert note["steps"] == 150 and note["final_loss"] == pytest.approx(report.final_loss, abs=1e-3)
    assert str(train_parquet) in note["what"]

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir))
    assert model.config.text_config.num_hidden_layers == 2 and model.config.text_config.hidden_size == 64
    assert 400 < len(processor.tokenizer) <= 2048
    # the tags are single tokens of the demo tokenizer, and decoding gives them back verbatim
    ids = processor.tokenizer.encode("<reason>x</reason><search><img></search>", add_special_tokens=False)
    assert processor.tokenizer.decode(ids) == "<reason>x</reason><search><img></search>"

    first = sample_turns(model_dir, train_parquet, n_rows=6, k=4, seed=0)
    assert first.n == 24
    assert first.valid_fraction >= 0.6, first.samples  # a clear majority parse as protocol turns
    assert first.kinds.get("image_search", 0) + first.kinds.get("text_search", 0) >= 1, first.samples
    assert first.well_formed >= 1
    assert len(first.rewards) == 6 and all(len(g) == 4 for g in first.rewards)
    assert first.groups_with_signal >= 1, first.rewards  # GRPO advantages are not all zero

    second = sample_turns(model_dir, train_parquet, n_rows=3, k=3, after_image_search=True, rollout=False, seed=1)
    assert second.n == 9 and second.rewards == []
    assert second.valid_fraction > 0, second.samples


def test_default_build_is_the_tests_tiny_model(tmp_path: Path) -> None:
    """Without a corpus the builder is the one the agent/eval/train tests were written against."""
    from transformers import AutoConfig, AutoTokenizer

    from fvqa.demo.tiny_model import build_tiny_qwen

    path = build_tiny_qwen(tmp_path)
    assert path == tmp_path / "tiny-qwen2.5-vl"
    assert len(AutoTokenizer.from_pretrained(str(path))) == 400
    assert AutoConfig.from_pretrained(str(path)).text_config.vocab_size == 400
    assert not (path / "fvqa_standin.json").exists()


def test_demo_policy_cli_says_to_prepare_first(tmp_path: Path) -> None:
    from fvqa.cli import app

    result = CliRunner().invoke(app, ["demo", "policy", "--workspace", str(tmp_path), "--out", str(tmp_path / "p")])
    assert isinstance(result.exception, FvqaError)
    assert "run `fvqa train prepare" in str(result.exception)
    assert not (tmp_path / "p").exists()


def test_demo_base_model_cli_writes_an_untrained_model_that_loads(train_parquet: Path, tmp_path: Path) -> None:
    """The SFT cold start's base: random weights, the demo tokenizer, loadable by transformers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from fvqa.cli import app

    workspace = train_parquet.parents[2]  # <ws>/exports/verl/train.parquet
    result = CliRunner().invoke(app, ["demo", "base-model", "--workspace", str(workspace), "--out",
                                      str(tmp_path / "base")])
    assert result.exit_code == 0, result.output
    assert "DEMO STAND-IN" in result.output and "untrained" in result.output
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "base"))
    processor = AutoProcessor.from_pretrained(str(tmp_path / "base"))
    assert model.config.model_type == "qwen2_5_vl" and processor.tokenizer.vocab_size > 100
    assert not (tmp_path / "base" / "fvqa_standin.json").exists()  # not primed: nothing to describe
    missing = CliRunner().invoke(app, ["demo", "base-model", "--workspace", str(tmp_path / "empty")])
    assert isinstance(missing.exception, FvqaError) and "run `fvqa train prepare" in str(missing.exception)
