"""`--force` deletes a stage's outputs only once it is known the stage can run, and only together with
its first new rows; `fvqa config show` masks credentials but not token counts."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from rich.console import Console
from support.paths import FVQA, REPO

from fvqa.config import RunConfig, is_secret_key, load_config
from fvqa.errors import ConfigError
from fvqa.pipelines.base import Stage, StageContext, execute_stage
from fvqa.store import Workspace

N_LABELS = 104


def _labelled_workspace(root: Path) -> None:
    """A workspace with items and one popularity-prior label each (what an earlier probe left)."""
    with Workspace(root) as ws:
        ws.insert("items", [dict(item_id=f"it{i:03d}", source="metaclip", question=f"What is {i}?",
                                 answer=f"a{i}") for i in range(N_LABELS)])
        ws.insert("labels", [dict(item_id=f"it{i:03d}", search_label="search_free", p_direct=1.0, p_search=1.0,
                                  probe_k=0, probe_method="popularity-prior") for i in range(N_LABELS)])


def _labels(root: Path) -> list[tuple]:
    with Workspace(root, read_only=True) as ws:
        return ws.execute("SELECT item_id, search_label, probe_method FROM labels ORDER BY item_id")


def test_force_probe_with_unset_key_exits_with_one_line_and_keeps_labels(tmp_path: Path):
    root = tmp_path / "ws"
    _labelled_workspace(root)
    before = _labels(root)
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({
        "workspace": str(root),
        "probe": {"backend": "openai", "k": 2,
                  "llm": {"model": "m", "endpoints": [{"base_url": "http://127.0.0.1:9/v1",
                                                       "api_key_env": "FVQA_TEST_UNSET_PROBE_KEY"}]}},
    }))
    env = {k: v for k, v in __import__("os").environ.items() if k != "FVQA_TEST_UNSET_PROBE_KEY"}
    res = subprocess.run([*FVQA, "build", "--config", str(config), "--stages", "probe", "--force", "probe"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "FVQA_TEST_UNSET_PROBE_KEY is not set" in lines[0], res.stderr
    assert _labels(root) == before and len(before) == N_LABELS


def test_force_of_a_stage_not_in_the_build_is_refused_before_anything(tmp_path: Path):
    root = tmp_path / "ws"
    _labelled_workspace(root)
    cfg = RunConfig(workspace=root)
    from fvqa.pipelines.runner import run_build

    with pytest.raises(ConfigError, match="--force probe: stage probe is not part of this build"):
        run_build(cfg, only=["split"], force=["probe"], console=Console(file=io.StringIO()))
    assert len(_labels(root)) == N_LABELS


class _Relabel(Stage):
    """A stand-in for a forced probe: emits new labels, optionally failing after `fail_after` rows."""

    name = "probe"
    inputs = ("items",)
    outputs = ("labels",)
    fail_after: ClassVar[int | None] = None

    def run(self, ctx: StageContext) -> None:
        assert ctx.ws.count("labels") == 0  # the stage sees its old outputs gone ...
        assert ctx.todo(sorted(ctx.ws.keys("items", "item_id")))  # ... so everything is to do
        for n, iid in enumerate(sorted(ctx.ws.keys("items", "item_id"))):
            if self.fail_after is not None and n == self.fail_after:
                raise RuntimeError("endpoint down")
            ctx.emit("labels", dict(item_id=iid, search_label="text_search_required", probe_method="relabel"))


@pytest.mark.parametrize("fail_after", [0, 10])
def test_forced_stage_failing_before_its_first_commit_leaves_old_outputs(tmp_path: Path, fail_after: int):
    root = tmp_path / "ws"
    _labelled_workspace(root)
    before = _labels(root)
    stage = type("Failing", (_Relabel,), {"fail_after": fail_after})()
    cfg = RunConfig(workspace=root, batch_size=64)
    with Workspace(root) as ws:
        ws.reject("probe", "old-reject", "image_missing")
        with pytest.raises(RuntimeError, match="endpoint down"):
            execute_stage(stage, ws, cfg, Console(file=io.StringIO()), reset=True)
        assert ws.count("rejects") == 1  # rejects of the stage are back too
        ws.insert("labels", [dict(item_id="after", search_label="x")])  # the workspace is usable, no open tx
    assert len(_labels(root)) == N_LABELS + 1
    assert [r for r in _labels(root) if r[0] != "after"] == before


def test_forced_stage_replaces_outputs_once_it_commits(tmp_path: Path):
    root = tmp_path / "ws"
    _labelled_workspace(root)
    cfg = RunConfig(workspace=root, batch_size=16)
    with Workspace(root) as ws:
        stats = execute_stage(_Relabel(), ws, cfg, Console(file=io.StringIO()), reset=True)
    assert stats.n_out == N_LABELS
    labels = _labels(root)
    assert len(labels) == N_LABELS and {r[2] for r in labels} == {"relabel"}

    # a failure after the first commit keeps what was committed (the batch-level resume guarantee)
    stage = type("Late", (_Relabel,), {"fail_after": 40})()
    with Workspace(root) as ws, pytest.raises(RuntimeError):
        execute_stage(stage, ws, cfg, Console(file=io.StringIO()), reset=True)
    assert len(_labels(root)) == 32  # two batches of 16 committed, the reset with the first


def test_config_show_masks_secrets_not_token_counts(tmp_path: Path):
    assert not any(is_secret_key(k) for k in ("max_tokens", "max_new_tokens", "prompt_tokens", "api_key_env",
                                             "question_key", "upload_response_key", "tokenizer"))
    assert all(is_secret_key(k) for k in ("api_key", "token", "hf_token", "access_token", "password",
                                         "client_secret", "API_KEY"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "workspace": str(tmp_path / "ws"),
        "generate": {"backend": "llm", "llm": {"max_tokens": 777, "extra_body": {"hf_token": "hf_live",
                                                                                 "api_key": "sk-live"}}},
        "probe": {"max_new_tokens": 99},
    }))
    res = subprocess.run([*FVQA, "config", "show", "--config", str(config)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown["generate"]["llm"]["max_tokens"] == 777 and shown["probe"]["max_new_tokens"] == 99
    assert shown["generate"]["llm"]["extra_body"] == {"hf_token": "***", "api_key": "***"}
    assert "sk-live" not in res.stdout and "hf_live" not in res.stdout
    assert json.dumps(load_config(config).generate.llm.max_tokens) == "777"
