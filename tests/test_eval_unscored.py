"""A failed model or judge call is not a wrong answer: it is stored, reported as not scored, and asked
again (and only it) by the next `fvqa eval run` of the same config.

Three models share one loopback OpenAI-wire server and one benchmark of three items, each question
carrying its answer as a hint: "steady" never fails, "flaky" fails on item 0, "down" fails on every
item (a cell with nothing scored). The loopback judge fails on item 1. Every failure is an HTTP 500
with no retries, so which requests reach the servers on the second run is known exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.fake_openai import FakeOpenAI, Reply, last_user_text, server_error
from typer.testing import CliRunner

from fvqa.answers import normalize_answer
from fvqa.cli import app
from fvqa.demo.benchmarks import entities, write_demo_benchmarks
from fvqa.eval.aggregate import cells, scored_rows, unscored
from fvqa.store import Workspace

N = 3
CHAT = "/v1/chat/completions"


class Script:
    """Which (model, answer) pairs the model server fails, and which gold answers the judge fails."""

    def __init__(self) -> None:
        self.model_fails: set[tuple[str, str]] = set()
        self.judge_fails: set[str] = set()

    def model(self, body: dict[str, Any]) -> str | Reply:
        hint = re.search(r"\(hint: (.+?)\)", last_user_text(body))
        answer = hint.group(1) if hint else "unknown"
        if (body["model"], answer) in self.model_fails or (body["model"], "*") in self.model_fails:
            return server_error(500)
        return f"<reason>I know this.</reason><answer>{answer}</answer>"

    def judge(self, body: dict[str, Any]) -> str | Reply:
        text = last_user_text(body)
        gold = re.search(r"Ground truth: (.*)\n", text).group(1)
        pred = re.search(r"Model's answer: (.*)\n", text).group(1)
        if gold in self.judge_fails:
            return server_error(500)
        verdict = "Yes" if normalize_answer(pred) == normalize_answer(gold) else "No"
        return f"<judge>{verdict}</judge> <reason>compared with the ground truth</reason>"


def _hint(body: dict[str, Any]) -> str:
    return re.search(r"\(hint: (.+?)\)", last_user_text(body)).group(1)


def _gold(body: dict[str, Any]) -> str:
    return re.search(r"Ground truth: (.*)\n", last_user_text(body)).group(1)


@pytest.fixture
def setup(tmp_path: Path):
    from fvqa.demo.world import make_world

    world = make_world(tmp_path / "w", seed=3, n_entities=4)
    makers = [e["maker"] for e in entities(world)[:N]]
    assert len(set(makers)) == N  # the hint tells the items apart on the wire
    spec = write_demo_benchmarks(world, tmp_path / "bench", n=N, hint_every=1)["livevqa"]
    script = Script()
    with FakeOpenAI(script.model) as m, FakeOpenAI(script.judge) as j:
        def llm(srv: FakeOpenAI, model: str) -> dict[str, Any]:
            return {"endpoints": [{"base_url": srv.base_url, "api_key_env": None}], "model": model,
                    "max_retries": 0}

        data = {
            "workspace": str(tmp_path / "ws"), "run": "flaky",
            "models": [{"name": name, "backend": "openai", "llm": llm(m, name)}
                       for name in ("steady", "flaky", "down")],
            "benchmarks": [spec], "workflows": ["direct"], "primary_metric": "judge",
            "judge": {"enabled": True, "llm": llm(j, "judge-pinned")},
            "batch_size": 2, "bootstrap_resamples": 100,
        }
        path = tmp_path / "eval.yaml"
        path.write_text(yaml.safe_dump(data))
        yield path, tmp_path / "ws", makers, script, m, j


def _run(path: Path) -> str:
    res = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["eval", "run", "--config", str(path)])
    assert res.exit_code == 0, res.output
    return res.output


def _cells(ws_path: Path) -> dict[str, Any]:
    with Workspace(ws_path) as ws:
        return {c.model: c for c in cells(scored_rows(ws, "flaky"), n_resamples=50,
                                          unscored_counts=unscored(ws, "flaky"))}


def test_failed_calls_are_not_scored_reported_and_retried_next_run(setup) -> None:
    path, ws_path, makers, script, m, j = setup
    script.model_fails = {("flaky", makers[0]), ("down", "*")}
    script.judge_fails = {makers[1]}

    out = _run(path)

    # every model call was made once; the judge got one request per distinct (question, answer):
    # steady and flaky agree on items 1 and 2, so 5 predictions to judge cost 3 requests
    assert m.count("POST", CHAT) == 3 * N
    assert m.count("POST", CHAT, status=500) == 1 + N
    assert j.count("POST", CHAT) == N and sorted(_gold(b) for b in j.chat_bodies()) == sorted(makers)
    with Workspace(ws_path) as ws:
        preds = {(mo, i): r for mo, i, r in ws.execute(
            "SELECT model, item_id, stop_reason FROM eval_predictions WHERE run = 'flaky'")}
        scores = dict(((mo, i), s) for mo, i, s in ws.execute(
            "SELECT model, item_id, score FROM eval_scores WHERE run = 'flaky'"))
    assert len(preds) == 3 * N  # a failed call is stored (with its error), not dropped
    assert sum(r == "error" for r in preds.values()) == 1 + N
    assert all(s is None or s == 1.0 for s in scores.values())  # nothing failed was scored 0
    assert not any(preds[k] == "error" for k in scores)  # a failed model call has no score row

    cs = _cells(ws_path)
    assert (cs["steady"].n, cs["steady"].not_scored_model, cs["steady"].not_scored_judge) == (2, 0, 1)
    assert (cs["flaky"].n, cs["flaky"].not_scored_model, cs["flaky"].not_scored_judge) == (1, 1, 1)
    assert (cs["down"].n, cs["down"].not_scored_model, cs["down"].not_scored_judge) == (0, N, 0)
    assert cs["steady"].accuracy == cs["flaky"].accuracy == 1.0  # over the scored items only

    # the CLI summary: per cell "model/judge" not-scored counts, and the one-sentence note
    assert re.search(r"steady .*direct .*livevqa .*\b2\b.*0/1", out)
    assert re.search(r"flaky .*direct .*livevqa .*\b1\b.*1/1", out)
    assert re.search(r"down .*direct .*livevqa .*\b0\b .*–.*3/0", out)
    flat = " ".join(out.split())
    assert "4 model calls failed" in flat and "2 left unscored" in flat
    assert ("6 predictions not scored (4 model call failed, 2 judge call failed); accuracy is over the "
            "scored items only") in flat

    # the report (Markdown, summary.json) and the lmms-eval outputs carry the same counts
    run_dir = ws_path / "eval" / "flaky"
    md = (run_dir / "report.md").read_text()
    assert "**Not scored**: 6 predictions not scored" in md
    assert "| down / direct | – (3 not scored) |" in md
    assert "| flaky | direct | livevqa | 1 | 100.0 |" in md and "1 model call failed, 1 judge call failed" in md
    summary = {c["model"]: c for c in json.loads((run_dir / "summary.json").read_text())}
    assert summary["down"]["n"] == 0 and summary["down"]["accuracy"] is None
    assert (summary["down"]["not_scored_model"], summary["flaky"]["not_scored_judge"]) == (N, 1)
    def latest(model: str) -> tuple[dict, str]:  # lmms-eval's names: <date id>_results.json, newest last
        path = sorted((run_dir / "lmms" / model).glob("*_results.json"))[-1]
        return json.loads(path.read_text()), path.name.removesuffix("_results.json")

    lmms, prefix = latest("down")
    task = "fvqa_livevqa_direct"
    assert lmms["results"][task]["accuracy,none"] is None
    assert lmms["n-samples"][task] == {"original": N, "effective": 0, "not_scored_model_call_failed": N,
                                       "not_scored_judge_call_failed": 0, "not_scored_pending": 0}
    assert "3 predictions not scored (3 model call failed)" in lmms["fvqa_not_scored_note"]
    assert (run_dir / "lmms" / "down" / f"{prefix}_samples_{task}.jsonl").read_text() == ""
    flaky, _ = latest("flaky")
    assert flaky["n-samples"][task]["effective"] == 1 and flaky["n-samples"][task]["original"] == N

    # the endpoints recover: the same command asks again exactly the failed calls and nothing else
    script.model_fails, script.judge_fails = set(), set()
    m.reset_records()
    j.reset_records()
    out = _run(path)
    asked = sorted((b["model"], _hint(b)) for b in m.chat_bodies())
    assert asked == sorted([("flaky", makers[0])] + [("down", x) for x in makers])
    # judge: item 1 again (its request failed, once for both models); items 0 and 2 of the
    # regenerated predictions are the verdicts already cached from steady's answers
    assert [_gold(b) for b in j.chat_bodies()] == [makers[1]]
    flat = " ".join(out.split())
    assert "generated 4 predictions (4 retried), 0 model calls failed" in flat
    assert "not scored (" not in flat

    cs = _cells(ws_path)
    assert all((c.n, c.not_scored, c.accuracy) == (N, 0, 1.0) for c in cs.values())
    with Workspace(ws_path) as ws:
        assert ws.execute("SELECT count(*) FROM eval_predictions WHERE stop_reason = 'error'")[0][0] == 0
        assert ws.execute("SELECT count(*), count(score) FROM eval_scores")[0] == (3 * N, 3 * N)
    md = (run_dir / "report.md").read_text()
    assert "Not scored" not in md

    # and once everything is scored, a third run asks nobody anything
    m.reset_records()
    j.reset_records()
    _run(path)
    assert m.count("POST", CHAT) == 0 and j.count("POST", CHAT) == 0


def test_report_of_a_run_where_every_call_failed(setup) -> None:
    """No scored prediction at all: the run and its report still say what happened (n=0, not scored)."""
    path, ws_path, _, script, m, _ = setup
    script.model_fails = {(name, "*") for name in ("steady", "flaky", "down")}
    out = " ".join(_run(path).split())
    assert m.count("POST", CHAT, status=500) == 3 * N
    assert f"{3 * N} predictions not scored ({3 * N} model call failed)" in out
    md = (ws_path / "eval" / "flaky" / "report.md").read_text()
    assert md.count("– (3 not scored)") == 3
