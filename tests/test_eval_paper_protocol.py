"""`protocol: paper`: plain answers for base models, a judge that sees the image and the whole response
beside fvqa's own, both search ratios, Table 1 beside ours, provenance; and the judge's own price.

A scripted loopback model answers without tags (as a base model would): under `protocol: fvqa` those
answers are invalid and score 0; under `paper` they are the answers. The judge is the demo's
stand-in verdict rule behind a loopback server, so every request it gets can be inspected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.eval_script import first_text, hint, local_tools, n_assistant, search_chain
from support.fake_openai import FakeOpenAI, last_user_text

from fvqa.demo.benchmarks import write_demo_benchmarks
from fvqa.demo.judge_server import verdict
from fvqa.errors import ConfigError
from fvqa.eval.aggregate import cells, scored_rows
from fvqa.eval.config import load_eval_config
from fvqa.eval.report import PAPER_TABLE1, build_report
from fvqa.eval.runner import run_eval
from fvqa.store import Workspace

N = 4  # items per benchmark; every other one carries its answer as a hint


def base_model(body: dict[str, Any]) -> str:
    """A base model: never writes tags in direct or RAG. On demand it knows the hinted answers and
    searches (image, then text) for the others."""
    first, last = first_text(body), last_user_text(body)
    answer = hint(body)
    if "already been run" in first:  # RAG
        if n_assistant(body) == 0:
            title = re.search(r"title: (.+)\n", first).group(1)
            return f"{title} maker\n(that is the query)"
        maker = re.search(r"created by (.+?) in \d{4}", last)
        return f"The maker is {maker.group(1) if maker else 'unknown'}."
    if "from your own knowledge" in first:  # direct, either wording
        return answer or "I am not sure."
    if answer and n_assistant(body) == 0:
        return f"<reason>I know this.</reason><answer>{answer}</answer>"
    return search_chain(body, close_search=True)


def stand_in_judge(body: dict[str, Any]) -> str:
    return verdict(last_user_text(body))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fvqa.demo.world import make_world

    return make_world(tmp_path_factory.mktemp("pworld") / "w", seed=5, n_entities=8)


@pytest.fixture(scope="module")
def tools(world: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from local_tools(world, tmp_path_factory)


@pytest.fixture(scope="module")
def servers():
    with FakeOpenAI(base_model) as m, FakeOpenAI(stand_in_judge) as j:
        yield m, j


def _config(tmp: Path, world: Path, servers: tuple[FakeOpenAI, FakeOpenAI], protocol: str,
            extra: dict[str, Any] | None = None) -> Path:
    specs = write_demo_benchmarks(world, tmp / "bench", n=N)
    m, j = servers
    data = {
        "workspace": str(tmp / "ws"), "run": f"p-{protocol}", "protocol": protocol,
        "models": [{"name": "base", "backend": "openai",
                    "llm": {"endpoints": [{"base_url": m.base_url, "api_key_env": None}], "model": "base-vlm",
                            "max_retries": 0}}],
        "benchmarks": [specs["fvqa"], specs["mmsearch"]],
        "workflows": ["direct", "rag", "on_demand"],
        "judge": {"enabled": True, "llm": {"endpoints": [{"base_url": j.base_url, "api_key_env": None}],
                                           "model": "judge-2024-11-20", "max_retries": 0}},
        "batch_size": 4, "bootstrap_resamples": 100, **(extra or {}),
    }
    path = tmp / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def paper_run(world: Path, tools, servers, tmp_path_factory: pytest.TempPathFactory):
    servers[1].reset_records()
    cfg = load_eval_config(_config(tmp_path_factory.mktemp("paper"), world, servers, "paper"))
    run_eval(cfg, tools=tools)
    bodies = servers[1].chat_bodies()
    with Workspace(cfg.workspace, read_only=True) as ws:
        rows = scored_rows(ws, cfg.run)
        files = build_report(ws, cfg.run)
    return cfg, rows, bodies, files


def test_plain_answers_score_under_paper_and_not_under_fvqa(paper_run, world, tools, servers, tmp_path) -> None:
    cfg, rows, _, _ = paper_run
    direct = [r for r in rows if r["workflow"] == "direct"]
    assert {r["answer_format"] for r in direct} == {"plain"}
    assert sum(r["score"] for r in direct) == N  # the hinted half of both benchmarks, answered untagged
    rag = [r for r in rows if r["workflow"] == "rag"]
    assert all(r["prediction"].startswith("The maker is") for r in rag)
    queries = [c["query"] for r in rag for c in json.loads(r["trajectory"])["tool_calls"] if c.get("query")]
    assert queries and all(q.endswith(" maker") for q in queries)  # the first line of the untagged reply
    assert {r["answer_format"] for r in rows if r["workflow"] == "on_demand"} == {"tags"}

    fcfg = load_eval_config(_config(tmp_path / "f", world, servers, "fvqa"))
    run_eval(fcfg, tools=tools)
    with Workspace(fcfg.workspace, read_only=True) as ws:
        frows = [r for r in scored_rows(ws, fcfg.run) if r["workflow"] == "direct"]
    assert len(frows) == 2 * N and all(r["prediction"] is None and r["score"] == 0 for r in frows)


def test_paper_judge_sees_the_image_and_the_whole_response_beside_fvqas(paper_run) -> None:
    cfg, rows, bodies, _ = paper_run

    def has_image(body: dict[str, Any]) -> bool:
        content = body["messages"][-1]["content"]
        return isinstance(content, list) and any(p.get("type") == "image_url" for p in content)

    with_image = [b for b in bodies if has_image(b)]
    text_only = [b for b in bodies if not has_image(b)]
    assert with_image and text_only  # the paper-style judge and fvqa's, one request each per verdict
    assert all(b["temperature"] == 0 and b["top_p"] == 0.1 for b in bodies)
    assert all(b["messages"][-1]["content"][1]["image_url"]["url"].startswith("data:image/") for b in with_image)
    # the paper style grades the whole final response, fvqa's the extracted answer
    assert any("<reason>" in last_user_text(b) for b in with_image)
    assert not any("<reason>I know this.</reason>" in last_user_text(b) for b in text_only)
    assert all(r["judge"] is not None and r["judge_fvqa"] is not None for r in rows)
    assert {r["judge_id"].endswith("-paper") for r in rows} == {True}
    assert not any(r["judge_fvqa_id"].endswith("-paper") for r in rows)


def test_both_search_ratios_and_fig4b_outcomes(paper_run) -> None:
    cfg, rows, _, files = paper_run
    with Workspace(cfg.workspace, read_only=True) as ws:
        cs = {(c.workflow, c.benchmark): c for c in cells(scored_rows(ws, cfg.run), n_resamples=50)}
    od = cs["on_demand", "fvqa_test"]
    # half the items search (image + text: 2 of 2 allowed calls), half answer at once
    assert od.search_ratio == pytest.approx(0.5) and od.search_any_ratio == pytest.approx(0.5)
    assert od.outcomes["correct_without_search"] == pytest.approx(0.5)
    assert od.outcomes["correct_with_search"] == pytest.approx(0.5)
    assert sum(od.outcomes.values()) == pytest.approx(1.0)
    assert cs["rag", "fvqa_test"].search_ratio == 1.0 and cs["direct", "fvqa_test"].search_any_ratio == 0.0
    md = files.markdown.read_text()
    assert "search ratio (calls / maximum search steps) / searched (items with any search)" in md
    assert "| base / on_demand | 50.0 / 50.0 |" in md
    assert "Fig. 4b" in md


def test_report_prints_table1_beside_ours_with_provenance(paper_run) -> None:
    _, _, _, files = paper_run
    md = files.markdown.read_text()
    assert "| paper: GPT-4o / direct | 41.7 | 22.2 | 36.0 | 0.0 |" in md  # FVQA, MMSearch columns here
    assert "| paper: MMSearch-R1-7B / on_demand | 58.4 | 53.8 | 54.6 | 67.1 |" in md
    assert "| paper: MMSearch-R1-7B / on_demand | 66.8 / – | 88.5 / – |" in md
    hashes = re.findall(r"Provenance `([0-9a-f]{10})` = base / (\w+): protocol paper", md)
    assert {wf for _, wf in hashes} == {"direct", "rag", "on_demand"} and len({h for h, _ in hashes}) == 3
    assert "judge (fvqa)" in md and "sees the image" in md


def test_paper_table1_facts() -> None:
    """The paper's rows as printed; its averages are unweighted means (to the paper's rounding)."""
    rows = {(r.label, r.workflow): r for r in PAPER_TABLE1}
    assert rows["GPT-4o", "direct"].accuracy == (41.7, 42.7, 22.2, 46.6, 26.9)
    assert rows["GPT-4o", "rag"].accuracy == (66.0, 59.1, 62.5, 63.4, 59.6)
    assert rows["Qwen2.5-VL-7B", "rag"].accuracy == (52.9, 53.7, 52.2, 51.6, 48.0)
    assert rows["Qwen2.5-VL-7B", "direct"].accuracy == (20.3, 20.1, 12.8, 38.4, 17.8)
    r1 = rows["MMSearch-R1-7B", "on_demand"]
    assert r1.accuracy == (58.4, 55.1, 53.8, 57.4, 48.4) and r1.search_ratio == (66.8, 61.6, 88.5, 42.5, 76.2)
    for r in PAPER_TABLE1:
        assert abs(sum(r.accuracy) / 5 - r.avg) < 0.1


def test_user_prompt_files_reach_the_model_byte_for_byte(world, tools, servers, tmp_path) -> None:
    """A prompt file with the appendix's text (here a stand-in text with odd spacing) is sent exactly."""
    text = "Answer  the question.\n\n  Keep it short:\t<image>\n"
    prompts = tmp_path / "paper_prompts.yaml"
    prompts.write_text(yaml.safe_dump({"direct_answer": text}))
    judge_text = "Q: {question}\nGround truth: {ground_truth}\nModel's answer: {prediction}\n\nReply in exactly yes/no."
    judge_file = tmp_path / "judge.yaml"
    judge_file.write_text(yaml.safe_dump({"judge": judge_text}))
    path = _config(tmp_path, world, servers, "paper", {"workflows": ["direct"], "prompts": [str(prompts)]})
    data = yaml.safe_load(path.read_text())
    data["judge"]["prompt_path"] = str(judge_file)
    path.write_text(yaml.safe_dump(data))
    servers[0].reset_records()
    servers[1].reset_records()
    run_eval(load_eval_config(path), tools=tools)
    firsts = [b["messages"][0]["content"] for b in servers[0].chat_bodies()]
    head = text.split("<image>")[0]
    assert firsts and all(c[0] == {"type": "text", "text": head} for c in firsts)
    judged = [last_user_text(b) for b in servers[1].chat_bodies()]
    assert any(t.startswith("Q: Who created this") and t.endswith("Reply in exactly yes/no.") for t in judged)


def test_judge_cost_uses_the_judge_models_own_price() -> None:
    from fvqa.llm.config import FREE, Endpoint, LLMConfig

    public = Endpoint(base_url="https://api.openai.com/v1")
    mini = LLMConfig(model="gpt-4o-mini", endpoints=[public])
    assert (mini.price_for(public).input_per_1m, mini.price_for(public).output_per_1m) == (0.15, 0.6)
    snap = LLMConfig(model="gpt-4o-2024-11-20", endpoints=[public])
    assert snap.price_for(public).usd(1_000_000, 0) == 2.5
    local = Endpoint(base_url="http://127.0.0.1:9/v1", api_key_env=None)
    assert LLMConfig(model="gpt-4o", endpoints=[local]).price_for(local) == FREE  # self-hosted: $0
    with pytest.raises(ValueError, match="no list price known for model 'my-judge'"):
        LLMConfig(model="my-judge", endpoints=[public])
    priced = LLMConfig(model="my-judge", endpoints=[public], price={"input_per_1m": 1, "output_per_1m": 2})
    assert priced.price_for(public).output_per_1m == 2


def test_unknown_public_judge_model_is_one_config_error(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "m", "backend": "transformers", "model_path": "/x"}],
        "benchmarks": [{"name": "b", "kind": "livevqa", "path": "x.jsonl"}],
        "judge": {"llm": {"model": "judge-x"}}}))
    with pytest.raises(ConfigError, match=r"judge\.llm.*no list price known for model 'judge-x'"):
        load_eval_config(path)
