"""Judge reply parsing and prompt overrides, the RAG workflow's fixed two searches (and its fallbacks),
search-step denominators, rule scores, and eval config validation."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fvqa.errors import ConfigError
from fvqa.eval.config import load_eval_config
from fvqa.eval.judge import load_judge_prompts, parse_grade_reply, parse_judge_reply
from fvqa.eval.metrics import Grade
from fvqa.eval.scoring import rule_scores
from fvqa.eval.workflows import max_search_steps, run_rag
from fvqa.generators.base import Generation, Request, Sampling
from fvqa.protocol import IMAGE_SEARCH_ERROR, AgentItem, ImageHit, Limits, TextHit, load_prompts

REPO = Path(__file__).resolve().parents[1]


def _png(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_judge_reply_parsing() -> None:
    assert parse_judge_reply("<judge>Yes</judge> <reason>same person</reason>") == (1.0, "same person")
    assert parse_judge_reply("<judge> no </judge>") == (0.0, "")
    with pytest.raises(ValueError, match="no <judge>"):
        parse_judge_reply("Yes, it is correct.")
    assert parse_grade_reply("<grade>not attempted</grade><reason>refused</reason>") == (
        Grade.NOT_ATTEMPTED, "refused")
    with pytest.raises(ValueError, match="unknown grade"):
        parse_grade_reply("<grade>maybe</grade>")


def test_judge_prompt_override_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "j.yaml"
    good.write_text("judge: 'Q {question} G {ground_truth} P {prediction} C {candidates}'\n")
    prompts = load_judge_prompts(good)
    assert prompts["judge"].startswith("Q {question}") and "<grade>" in prompts["simplevqa_grader"]
    bad = tmp_path / "b.yaml"
    bad.write_text("judge: 'no placeholders'\n")
    with pytest.raises(ConfigError, match="must be a string containing"):
        load_judge_prompts(bad)
    unknown = tmp_path / "u.yaml"
    unknown.write_text("grader: '{question}'\n")
    with pytest.raises(ConfigError, match="judge and/or simplevqa_grader"):
        load_judge_prompts(unknown)


class Scripted:
    name = "scripted:rag"

    def __init__(self, replies: list[str]) -> None:
        self.replies, self.requests = replies, []

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        self.requests.append(list(requests))
        text = self.replies[len(self.requests) - 1]
        return [Generation(text=text, prompt_tokens=5, completion_tokens=2) for _ in requests]


class Tools:
    def __init__(self, fail_image: bool = False) -> None:
        self.fail_image, self.queries = fail_image, []

    def image_search(self, image: bytes, **_: Any) -> list[ImageHit]:
        if self.fail_image:
            raise RuntimeError("lens down")
        return [ImageHit("Ulix tower", "http://x/1", _png("blue")), ImageHit("Other", "http://x/2", None)]

    def text_search(self, query: str, question: str = "", **_: Any) -> list[TextHit]:
        self.queries.append(query)
        return [TextHit("http://x/1", "Ulix tower", "Ulix tower was created by Ixka in 2020.")]


def test_rag_runs_both_searches_and_answers() -> None:
    gen = Scripted(["<reason>r</reason><text_search>Ulix tower maker</text_search>",
                    "<reason>r</reason><answer>Ixka</answer>"])
    tools = Tools()
    item = AgentItem("i1", "Who made this tower?", _png())
    [traj] = run_rag([item], gen, tools, load_prompts(), Sampling(temperature=0))
    assert traj.answer == "Ixka" and traj.stop_reason == "answer" and traj.mode == "rag"
    assert (traj.n_image_search, traj.n_text_search) == (1, 1) and tools.queries == ["Ulix tower maker"]
    first = gen.requests[0][0].messages[0]["content"]
    kinds = [p["type"] for p in first]
    assert kinds.count("image") == 2  # the user's image and the one decodable thumbnail
    text = " ".join(p["text"] for p in first if p["type"] == "text")
    assert "title: Ulix tower" in text and "[thumbnail unavailable]" in text
    second = gen.requests[1][0].messages[-1]["content"][0]["text"]
    assert "created by Ixka" in second and "Original user's question: Who made this tower?" in second


class BrokenFirstTools(Tools):
    """Hits [undecodable thumbnail, good thumbnail]: the model sees only the good one."""

    def image_search(self, image: bytes, **_: Any) -> list[ImageHit]:
        return [ImageHit("Broken", "http://x/0", b"not an image"), ImageHit("Ulix tower", "http://x/1", _png("blue"))]


def test_rag_records_each_thumbnail_under_its_own_hit() -> None:
    import hashlib

    gen = Scripted(["<reason>r</reason><text_search>Ulix tower maker</text_search>",
                    "<reason>r</reason><answer>Ixka</answer>"])
    item = AgentItem("i1", "Who made this tower?", _png())
    [traj] = run_rag([item], gen, BrokenFirstTools(), load_prompts(), Sampling(temperature=0))
    broken, good = traj.tool_calls[0].hits
    shown = [p["sha256"] for p in traj.messages[0]["content"] if p.get("type") == "image"][1:]
    assert broken["thumbnail_sha256"] is None
    assert good["thumbnail_sha256"] == shown[0] == traj.image_shas[1]
    assert good["thumbnail_sha256"] != hashlib.sha256(b"not an image").hexdigest()


def test_rag_without_a_query_searches_the_question_and_survives_search_errors() -> None:
    gen = Scripted(["<reason>I think I know</reason><answer>Bob</answer>", "no tags at all"])
    tools = Tools(fail_image=True)
    item = AgentItem("i1", "Who made this tower?", _png())
    [traj] = run_rag([item], gen, tools, load_prompts(), Sampling(temperature=0))
    assert tools.queries == ["Who made this tower?"]  # still exactly two searches
    assert traj.tool_calls[0].ok is False and "lens down" in traj.tool_calls[0].error
    assert IMAGE_SEARCH_ERROR in traj.messages[0]["content"][-1]["text"]
    assert traj.answer is None and traj.stop_reason == "invalid" and "searched the question" in traj.stop_detail


def test_search_step_denominators() -> None:
    assert max_search_steps("direct", Limits()) == 0
    assert max_search_steps("rag", Limits()) == 2
    assert max_search_steps("on_demand", Limits()) == 2
    assert max_search_steps("on_demand", Limits(max_rounds=5, max_image_search=1, max_text_search=2)) == 3


def test_rule_scores_per_benchmark() -> None:
    inf = rule_scores("infoseek", "between 170 and 180 m", "176.6", ["176.6"],
                      [{"wikidata": 176.6, "range": [160, 190]}], "numerical")
    assert inf.official == 1.0 and inf.em == 0.0
    mm = rule_scores("mmsearch", "Ixka Norgrabri", "Ixka Norgrabri Jr", ["Ixka Norgrabri Jr", "Ixka N."])
    assert mm.official == pytest.approx(0.8) and mm.official_name == "mmsearch_f1"
    none = rule_scores("fvqa", None, "x", ["x"])
    assert (none.em, none.subem, none.official) == (0.0, 0.0, 0.0)
    assert rule_scores("simplevqa", "x", "x", ["x"]).official is None  # the judge grades SimpleVQA


def test_eval_configs_validate(tmp_path: Path) -> None:
    for name in ("eval_demo.yaml", "eval_paper.yaml"):
        cfg = load_eval_config(REPO / "configs" / name)
        assert [b.kind for b in cfg.benchmarks] == ["fvqa", "infoseek", "mmsearch", "simplevqa", "livevqa"]
        assert cfg.workflows == ["direct", "rag", "on_demand"] and cfg.protocol == "paper"
        assert cfg.judge.top_p == 0.1 and cfg.benchmarks[0].path.is_absolute()
    paper = load_eval_config(REPO / "configs" / "eval_paper.yaml")
    assert paper.sampling.temperature == 0.0 and paper.judge.llm is not None
    assert paper.judge.llm.model == "gpt-4o-2024-11-20"
    demo = load_eval_config(REPO / "configs" / "eval_demo.yaml")  # offline: every endpoint on loopback
    assert demo.judge.llm is not None and all(ep.self_hosted for ep in demo.judge.llm.endpoints)
    assert demo.benchmarks[-1].path == REPO / "fvqa-work" / "demo-eval" / "benchmarks" / "livevqa" / "qa.json"
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{name: m, backend: openai}]\nbenchmarks: [{name: b, kind: nope, path: x}]\n")
    with pytest.raises(ConfigError) as exc:
        load_eval_config(bad)
    assert "needs an llm section" in str(exc.value) and "benchmarks.0.kind" in str(exc.value)
    nojudge = tmp_path / "nojudge.yaml"
    nojudge.write_text("models: [{name: m, backend: transformers, model_path: /x}]\n"
                       "benchmarks: [{name: b, kind: livevqa, path: x.jsonl}]\n")
    with pytest.raises(ConfigError, match="judge is disabled"):
        load_eval_config(nojudge)
    assert load_eval_config(nojudge, ["primary_metric=em"]).primary_metric == "em"
