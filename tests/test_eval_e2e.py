"""End-to-end eval: three workflows x five benchmark files against a scripted loopback OpenAI-compatible
model, a scripted loopback judge, and the real local search index behind the real `SearchTools` facade.

The index is built with a pixel embedder instead of a random CLIP (the mechanics are the same and
an indexed image still finds itself first; building a CLIP costs ~10 s). The scripted model knows
the answer when the question carries a hint, and otherwise reads it from the search results, so
accuracy and search ratio are known in advance: direct 2/3 (no search), RAG 3/3 (ratio 100%),
on-demand 3/3 (ratio 1/3: only the one unhinted item searches, image + text of 2 allowed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.eval_script import (
    first_text,
    hint,
    judge,
    local_tools,
    maker_answer,
    n_assistant,
    search_chain,
)
from support.fake_openai import FakeOpenAI

from fvqa.demo.benchmarks import write_demo_benchmarks
from fvqa.eval.aggregate import cells, scored_rows
from fvqa.eval.config import load_eval_config
from fvqa.eval.report import build_report
from fvqa.eval.runner import run_eval
from fvqa.store import Workspace

N = 3


def model(body: dict[str, Any]) -> str:
    """Direct: the hint or 'unknown'. RAG: query the image-search title, answer from the text results.
    On-demand: answer from the hint at once, else image search -> text search -> answer."""
    first, answer = first_text(body), hint(body)
    if "from your own knowledge" in first:
        return f"<reason>I look at it.</reason><answer>{answer or 'unknown'}</answer>"
    if n_assistant(body) == 0 and "already been run" in first:
        title = re.search(r"title: (.+)\n", first).group(1)
        return f"<reason>It is {title}.</reason><text_search>{title} maker</text_search>"
    if answer and ("already been run" in first or n_assistant(body) == 0):
        return f"<reason>I know this.</reason><answer>{answer}</answer>"
    if "already been run" in first:  # RAG's second turn: the maker from the text results
        return maker_answer(body)
    return search_chain(body)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fvqa.demo.world import make_world

    return make_world(tmp_path_factory.mktemp("eworld") / "w", seed=3, n_entities=6)


@pytest.fixture(scope="module")
def tools(world: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from local_tools(world, tmp_path_factory)


@pytest.fixture(scope="module")
def servers():
    with FakeOpenAI(model) as m, FakeOpenAI(judge) as j:
        yield m, j


def _config(tmp: Path, world: Path, servers: tuple[FakeOpenAI, FakeOpenAI]) -> Path:
    specs = write_demo_benchmarks(world, tmp / "bench", n=N, bad_rows=True)
    m, j = servers
    data = {
        "workspace": str(tmp / "ws"), "run": "e2e",
        "models": [{"name": "scripted-vlm", "backend": "openai",
                    "llm": {"endpoints": [{"base_url": m.base_url, "api_key_env": None}], "model": "fake-vlm",
                            "max_retries": 0}}],
        "benchmarks": list(specs.values()),
        "workflows": ["direct", "rag", "on_demand"],
        "judge": {"enabled": True, "llm": {"endpoints": [{"base_url": j.base_url, "api_key_env": None}],
                                           "model": "judge-pinned", "max_retries": 0}},
        "batch_size": 2, "bootstrap_resamples": 200,
    }
    path = tmp / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def first_run(world: Path, tools, servers, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("erun")
    cfg = load_eval_config(_config(tmp, world, servers))
    summary = run_eval(cfg, tools=tools)
    return cfg, summary


def test_accuracy_and_search_ratio_per_workflow(first_run) -> None:
    cfg, summary = first_run
    assert sum(c.generated for c in summary.cells) == 5 * 3 * N
    with Workspace(cfg.workspace) as ws:
        cs = {(c.workflow, c.benchmark): c for c in cells(scored_rows(ws, "e2e"), n_resamples=100)}
    assert len(cs) == 15
    for bench in ("fvqa_test", "infoseek", "mmsearch", "simplevqa", "livevqa"):
        direct, rag, od = cs["direct", bench], cs["rag", bench], cs["on_demand", bench]
        assert direct.n == rag.n == od.n == N
        assert direct.accuracy == pytest.approx(2 / 3) and direct.search_ratio == 0.0
        assert rag.accuracy == 1.0 and rag.search_ratio == 1.0 and (rag.image_calls, rag.text_calls) == (N, N)
        assert od.accuracy == 1.0 and od.search_ratio == pytest.approx(1 / 3)
        assert (od.image_calls, od.text_calls) == (1, 1) and od.correct_without_search == pytest.approx(2 / 3)
    assert cs["direct", "infoseek"].official_name == "infoseek_score"
    assert cs["direct", "mmsearch"].official_name == "mmsearch_f1"
    svqa = cs["direct", "simplevqa"].simplevqa
    assert svqa["not_attempted"] == pytest.approx(1 / 3) and svqa["correct_given_attempted"] == 1.0
    assert cs["rag", "infoseek"].infoseek_final == 1.0


def test_trajectories_and_rejects_are_stored(first_run) -> None:
    cfg, _ = first_run
    with Workspace(cfg.workspace) as ws:
        rows = ws.execute(
            "SELECT trajectory, prediction FROM eval_predictions WHERE workflow='on_demand' AND benchmark='mmsearch' "
            "AND item_id='mm1'")
        rejects = dict(ws.execute("SELECT stage, count(*) FROM rejects WHERE stage LIKE 'eval:%' GROUP BY 1"))
    traj = json.loads(rows[0][0])
    assert [t["kind"] for t in traj["turns"]] == ["image_search", "text_search", "answer"]
    assert traj["tool_calls"][1]["query"].endswith("maker") and traj["answer"] == rows[0][1]
    assert rejects == {"eval:fvqa_test": 2, "eval:infoseek": 4, "eval:mmsearch": 1, "eval:simplevqa": 1,
                       "eval:livevqa": 1}


def test_rerun_and_rescore_make_no_new_requests(first_run, tools, servers) -> None:
    cfg, first = first_run
    m, j = servers
    assert first.judge_calls > 0 and j.count("POST", "/v1/chat/completions") > 0
    n_model, n_judge = m.count("POST", "/v1/chat/completions"), j.count("POST", "/v1/chat/completions")
    with Workspace(cfg.workspace) as ws:
        before = ws.execute("SELECT model, benchmark, workflow, item_id, score FROM eval_scores ORDER BY ALL")
    again = run_eval(cfg, tools=tools)  # everything predicted and scored: nothing to do
    with Workspace(cfg.workspace) as ws:  # and the bad rows are not rejected twice
        assert ws.execute("SELECT count(*) FROM rejects WHERE stage LIKE 'eval:%'")[0][0] == 9
    assert sum(c.generated for c in again.cells) == 0 and again.scored == 0
    rescored = run_eval(cfg, tools=tools, rescore=True)  # every verdict again, from the judge cache
    assert rescored.scored == 5 * 3 * N and rescored.judge_calls == 0 and rescored.judge_cache_hits > 0
    assert m.count("POST", "/v1/chat/completions") == n_model
    assert j.count("POST", "/v1/chat/completions") == n_judge
    with Workspace(cfg.workspace) as ws:
        assert ws.execute("SELECT model, benchmark, workflow, item_id, score FROM eval_scores ORDER BY ALL") == before
    # the judge was pinned: temperature 0, top_p 0.1, the configured model
    body = j.chat_bodies()[0]
    assert (body["model"], body["temperature"], body["top_p"]) == ("judge-pinned", 0.0, 0.1)


def test_report_and_lmms_outputs(first_run) -> None:
    cfg, _ = first_run
    with Workspace(cfg.workspace) as ws:
        files = build_report(ws, "e2e")
        root = ws.root
    page = files.html.read_text()
    assert page.count("data:image/png;base64,") == 2
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in files.plots)
    md = files.markdown.read_text()
    assert "greedy decoding (temperature 0)" in md and "58.4" in md and "judge-pinned@t0-p0.1" in md
    assert "| scripted-vlm / rag | 100.0" in md
    lmms = root / "eval" / "e2e" / "lmms" / "scripted-vlm"
    res_file = sorted(lmms.glob("*_results.json"))[-1]  # lmms-eval's names: <date id>_results.json
    results = json.loads(res_file.read_text())["results"]
    assert results["fvqa_mmsearch_on_demand"]["accuracy,none"] == 1.0
    assert results["fvqa_fvqa_test_direct"]["exact_match,none"] == pytest.approx(2 / 3)
    prefix = res_file.name.removesuffix("_results.json")
    samples = (lmms / f"{prefix}_samples_fvqa_livevqa_rag.jsonl").read_text().splitlines()
    assert len(samples) == N and json.loads(samples[0])["accuracy"] == 1.0


def test_report_cli(first_run) -> None:
    from typer.testing import CliRunner

    from fvqa.cli import app

    cfg, _ = first_run
    res = CliRunner().invoke(app, ["eval", "report", "--workspace", str(cfg.workspace)])
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output
    res = CliRunner().invoke(app, ["eval", "report", "--workspace", str(cfg.workspace), "--run", "nope"])
    assert res.exit_code != 0 and "unknown run 'nope'" in str(res.exception)


def test_cli_run_direct_workflow_with_limit(world: Path, servers, tmp_path: Path) -> None:
    """`fvqa eval run` end to end through the CLI (direct only: no search tools needed)."""
    from typer.testing import CliRunner

    from fvqa.cli import app

    path = _config(tmp_path, world, servers)
    args = ["eval", "run", "--config", str(path), "--limit", "2", "--set", "workflows=[direct]",
            "--set", "primary_metric=official"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output and "average" in res.output
    with Workspace(tmp_path / "ws") as ws:
        counts = dict(ws.execute("SELECT benchmark, count(*) FROM eval_scores GROUP BY 1"))
        metrics = {r[0] for r in ws.execute("SELECT DISTINCT metric FROM eval_scores")}
    assert counts == {"fvqa_test": 2, "infoseek": 2, "mmsearch": 2, "simplevqa": 2, "livevqa": 2}
    assert metrics == {"official"}


@pytest.mark.slow  # model build (~6 s) + three CPU generations; ~25-45 s on a busy 2-core machine
def test_tiny_qwen_through_transformers_runs_direct_and_rag(world: Path, tools, tmp_path: Path) -> None:
    """Mechanics with a real (tiny, random) Qwen2.5-VL: chat template, images, thumbnails, token counts."""
    from fvqa.demo.tiny_model import build_tiny_qwen
    from fvqa.eval.config import EvalConfig

    specs = write_demo_benchmarks(world, tmp_path / "bench", n=2)
    model_path = build_tiny_qwen(tmp_path / "qwen")
    cfg = EvalConfig.model_validate({
        "workspace": str(tmp_path / "ws"), "run": "tiny",
        "models": [{"name": "tiny-qwen", "backend": "transformers", "model_path": str(model_path)}],
        "benchmarks": [specs["livevqa"]], "workflows": ["direct", "rag"], "primary_metric": "em",
        "sampling": {"max_tokens": 6}, "limit": 1,
    })
    summary = run_eval(cfg, tools=tools)
    assert sum(c.generated for c in summary.cells) == 2
    with Workspace(cfg.workspace) as ws:
        rows = ws.execute("SELECT workflow, generator, completion_tokens, n_image_search + n_text_search, "
                          "trajectory FROM eval_predictions ORDER BY workflow")
        n_scores = ws.count("eval_scores")
    (d_wf, d_gen, d_tok, d_calls, _), (r_wf, _, r_tok, r_calls, r_traj) = rows
    assert (d_wf, r_wf) == ("direct", "rag") and d_gen.startswith("transformers:")
    assert 1 <= d_tok <= 6 and 2 <= r_tok <= 12 and (d_calls, r_calls) == (0, 2)
    assert len(json.loads(r_traj)["turns"]) == 2 and n_scores == 2
