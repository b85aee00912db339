"""One scripted model through the three rollout drivers: the probe, eval on-demand and the veRL loop.

The probe's labels define the dataset and training optimises on what the model is shown, so the
three drivers must agree on everything that follows a model turn: the same turns, the same search
calls and hits, the same thumbnails (bounded once, the same way) and the same reward. Each driver
runs through its real interface:

* the probe stage (`fvqa build`'s stage runner) with the OpenAI-compatible backend against a
  loopback server that plays the scripted model (the HTTP, turn-by-turn driver);
* eval's on-demand workflow with a batched backend (the round-by-round driver);
* veRL's agent loop, instantiated from the registry entry `fvqa train run` uses, over a row from
  `train prepare` and veRL's RLHFDataset, searching through the HTTP search service.

All three search the same search facade (`fvqa.search.SearchTools`) over one scripted backend whose
hits include an undecodable thumbnail, a missing one and one larger than the thumbnail bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from PIL import Image
from support.search_service import serve_search

from fvqa.config import ProbeConfig, RunConfig
from fvqa.generators.base import Generation, Request
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.probe import ProbeStage
from fvqa.protocol import ImageHit, Limits, load_prompts
from fvqa.protocol.images import image_bytes
from fvqa.search.config import SearchConfig
from fvqa.search.tools import SearchTools
from fvqa.search.types import Candidate
from fvqa.store import Workspace
from fvqa.train.verl_reward import compute_score

QUESTION = "Who designed the tower in this picture?"
ANSWER = "Gustave Eiffel"
IMG = "<reason>I cannot tell which tower this is.</reason><search><img></search>"
TXT = "<reason>It looks like the Eiffel Tower.</reason><text_search>Eiffel Tower designer</text_search>"
ANS = "<reason>The results say Gustave Eiffel.</reason><answer>Gustave Eiffel</answer>"
DIRECT = "<reason>A guess.</reason><answer>Someone</answer>"
# Small enough that the 640x480 thumbnail is resized; the same limits for all three drivers.
LIMITS = Limits(thumbnail_max_pixels=16 * 28 * 28)


def png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    img = Image.new("RGB", size, color)
    img.paste((255 - color[0], color[1], 255 - color[2]), (0, 0, size[0] // 2, size[1] // 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


USER_IMAGE = png((200, 40, 40), (160, 120))


class GoldenBackend:
    """Canned pages behind the real search facade: broken, large, missing and small thumbnails."""

    name = "golden"
    cache_pages = True

    def image_search(self, image: Any, k: int) -> list[ImageHit]:
        hits = [
            ImageHit(title="Broken thumbnail page", url="https://example.org/broken", thumbnail=b"\x89PNG broken"),
            ImageHit(title="Eiffel Tower at night", url="https://example.org/night", thumbnail=png((20, 20, 90), (640, 480))),
            ImageHit(title="Page without image", url="https://example.org/none", thumbnail=None),
            ImageHit(title="Tower from the Seine", url="https://example.org/seine", thumbnail=png((30, 160, 60), (120, 90))),
            ImageHit(title="Iron lattice detail", url="https://example.org/iron", thumbnail=png((90, 90, 90), (300, 200))),
            ImageHit(title="Sixth result", url="https://example.org/six", thumbnail=png((10, 200, 200), (64, 64))),
        ]
        return hits[:k]

    def text_candidates(self, query: str, n: int) -> list[Candidate]:
        return [Candidate(url="https://example.org/eiffel", title="Gustave Eiffel"),
                Candidate(url="https://example.org/tower", title="Eiffel Tower")]

    def read_page(self, candidate: Candidate) -> str:
        return f"{candidate.title}: the tower was designed by the company of Gustave Eiffel and opened in 1889."


def scripted_turn(n_assistant: int, direct: bool) -> str:
    """The scripted model: image search, then text search, then the answer (direct: one guess)."""
    return DIRECT if direct else [IMG, TXT, ANS][n_assistant]


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SearchTools]:
    cache = tmp_path_factory.mktemp("golden-search")
    t = SearchTools(SearchConfig(), GoldenBackend(), cache_dir=cache)
    t.golden_cache = cache  # type: ignore[attr-defined]
    yield t
    t.close()


def _reward(turns: Sequence[str], calls: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return compute_score("fvqa", "", ANSWER, {"assistant_turns": list(turns), "tool_calls": list(calls),
                                               "candidate_answers": ["Eiffel"]}, limits=LIMITS.model_dump())


def _view(turns: Sequence[str], calls: Sequence[dict[str, Any]], thumb_shas: Sequence[str]) -> dict[str, Any]:
    """What must be identical across drivers."""
    return {
        "turns": list(turns),
        "calls": [{k: c[k] for k in ("round", "kind", "query", "ok", "hits", "error")} for c in calls],
        "thumbnails": list(thumb_shas),
        "reward": _reward(turns, calls),
    }


# --------------------------------------------------------------------------------------------
# Driver 1: the probe stage, OpenAI-compatible backend (HTTP, turn by turn)
# --------------------------------------------------------------------------------------------


def _probe_view(tmp_path: Path, tools: SearchTools, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    from rich.console import Console
    from support.fake_openai import FakeOpenAI

    import fvqa.search.tools

    def model(body: dict[str, Any]) -> str:
        first = " ".join(p.get("text", "") for p in body["messages"][0]["content"] if p.get("type") == "text")
        n = sum(m["role"] == "assistant" for m in body["messages"])
        return scripted_turn(n, "from your own knowledge" in first)

    # the probe closes its tools when it ends: its own facade over the same backend and cache
    monkeypatch.setattr(fvqa.search.tools, "make_search_tools",
                        lambda *a, **kw: SearchTools(SearchConfig(), tools.backend, cache_dir=tools.golden_cache))
    with Workspace(tmp_path / "probe-ws") as ws, FakeOpenAI(model) as srv:
        sha = ws.put_image(USER_IMAGE).sha256
        ws.insert("items", [dict(item_id="golden", source="manual", question=QUESTION, answer=ANSWER,
                                 aliases=["Eiffel"], image_sha256=sha)])
        llm = {"endpoints": [{"base_url": srv.base_url, "api_key_env": None}], "model": "fake-model",
               "max_retries": 0}
        config = RunConfig(workspace=ws.root, probe=ProbeConfig(backend="openai", k=1, llm=llm, limits=LIMITS))
        execute_stage(ProbeStage(), ws, config, Console(file=io.StringIO()))
        [(traj_json,)] = ws.execute("SELECT trajectory FROM probe_rollouts WHERE mode = 'search'")
    traj = json.loads(traj_json)
    return _view([t["text"] for t in traj["turns"]], traj["tool_calls"], traj["image_shas"][1:])


# --------------------------------------------------------------------------------------------
# Driver 2: eval on-demand, a batched backend (round by round)
# --------------------------------------------------------------------------------------------


class BatchedScriptedModel:
    """A batched backend (the shape of transformers / vLLM offline) playing the scripted model."""

    name = "scripted:batched"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        self.batches.append(len(requests))
        return [Generation(text=scripted_turn(sum(m["role"] == "assistant" for m in r.messages), False),
                           prompt_tokens=10, completion_tokens=5, finish_reason="stop") for r in requests]


def _eval_view(tools: SearchTools) -> dict[str, Any]:
    from fvqa.eval.workflows import run_workflow
    from fvqa.generators.base import Sampling
    from fvqa.protocol import AgentItem

    model = BatchedScriptedModel()
    [traj] = run_workflow("on_demand", [AgentItem("golden", QUESTION, USER_IMAGE)], model, tools, load_prompts(),
                          LIMITS, Sampling(temperature=0.0))
    assert model.batches == [1, 1, 1]  # round by round
    calls = [c.__dict__ for c in traj.tool_calls]
    return _view([t.text for t in traj.turns], calls, traj.image_shas[1:])


# --------------------------------------------------------------------------------------------
# Driver 3: veRL's agent loop over a prepared row, searching through the HTTP search service
# --------------------------------------------------------------------------------------------


class ScriptedServer:
    """Stands in for veRL's LLM server client (the GPU boundary): the next scripted turn's token ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.n = tokenizer, 0

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       image_data: list[Any] | None = None, **kwargs: Any) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        text = scripted_turn(self.n, False) + ("<|im_end|>" if self.n == 2 else "")
        self.n += 1
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids))


def _verl_view(tmp_path: Path, tools: SearchTools) -> dict[str, Any]:
    import hydra
    from transformers import AutoProcessor
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from fvqa.demo.tiny_model import build_tiny_qwen
    from fvqa.train.agent_loop import FvqaSearchAgentLoop
    from fvqa.train.launcher import agent_loop_config_path
    from fvqa.train.prepare import prepare

    processor = AutoProcessor.from_pretrained(str(build_tiny_qwen(tmp_path / "tiny")))
    with Workspace(tmp_path / "train-ws") as ws:
        sha = ws.put_image(USER_IMAGE).sha256
        ws.insert("items", [dict(item_id="golden", source="manual", question=QUESTION, answer=ANSWER,
                                 aliases=["Eiffel"], image_sha256=sha)])
        ws.insert("splits", [dict(item_id="golden", split="train")])
        result = prepare(ws)
    data_cfg = OmegaConf.create({"prompt_key": "prompt", "image_key": "images", "max_prompt_length": 2048,
                                 "return_raw_chat": True, "filter_overlong_prompts": False, "truncation": "error",
                                 "cache_dir": str(tmp_path / "verl-cache")})
    row = RLHFDataset(str(result.files["train"]), processor.tokenizer, data_cfg, processor)[0]
    with serve_search(tools) as url:
        cfg = OmegaConf.create({
            "actor_rollout_ref": {"rollout": {"prompt_length": 2048, "response_length": 4096}},
            "data": {}, "fvqa": {"search_url": url, "limits": LIMITS.model_dump()}})
        [entry] = [e for e in OmegaConf.load(agent_loop_config_path()) if e.name == row["agent_name"]]

        async def go() -> Any:
            loop = hydra.utils.instantiate(
                entry, trainer_config=DictConfigWrap(cfg), server_manager=ScriptedServer(processor.tokenizer),
                tokenizer=processor.tokenizer, processor=processor, dataset_cls=RLHFDataset,
                data_config=DictConfigWrap(cfg.data), hf_model_type="qwen2_5_vl", tools=ToolListWrap([]))
            assert isinstance(loop, FvqaSearchAgentLoop)
            return await loop.run({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}, **row)

        out = asyncio.run(go())
    assert out.extra_fields["stop_reason"] == "answer"
    thumbs = [hashlib.sha256(image_bytes(im)).hexdigest() for im in out.multi_modal_data["images"][1:]]
    return _view(out.extra_fields["assistant_turns"], out.extra_fields["tool_calls"], thumbs)


# --------------------------------------------------------------------------------------------
# The golden comparison
# --------------------------------------------------------------------------------------------


def test_probe_eval_and_verl_drivers_agree_turn_for_turn(tmp_path: Path, tools: SearchTools,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    probe = _probe_view(tmp_path, tools, monkeypatch)
    on_demand = _eval_view(tools)
    verl = _verl_view(tmp_path, tools)

    # The golden episode itself: what every driver must produce.
    assert probe["turns"] == [IMG, TXT, ANS]
    image_call, text_call = probe["calls"]
    assert (image_call["kind"], image_call["ok"], text_call["query"]) == ("image_search", True, "Eiffel Tower designer")
    # top-5 of the backend's six hits; the broken and the missing thumbnail are shown as missing and
    # recorded without a sha, the others carry the sha of the bounded image the model saw
    hits = image_call["hits"]
    assert [h["url"].rsplit("/", 1)[1] for h in hits] == ["broken", "night", "none", "seine", "iron"]
    assert [h["thumbnail_sha256"] is None for h in hits] == [True, False, True, False, False]
    assert [h["thumbnail_sha256"] for h in hits if h["thumbnail_sha256"]] == probe["thumbnails"]
    assert len(probe["thumbnails"]) == 3
    assert probe["reward"]["score"] > 0.9 and probe["reward"]["n_image_search"] == 1

    # ... and every driver produced exactly it.
    assert on_demand == probe
    assert verl == probe


def test_every_driver_bounds_thumbnails_the_same_way(tools: SearchTools) -> None:
    """The large thumbnail is resized as Qwen-VL's processor would (sides multiples of 28, within the
    limits' pixel cap), the small ones keep their size up to that rounding, in every driver."""
    from fvqa.protocol import episode

    out = episode.image_search(tools, USER_IMAGE, LIMITS, rnd=1)
    sizes = [im.size for im in out.images]
    assert all(w % 28 == 0 and h % 28 == 0 and w * h <= LIMITS.thumbnail_max_pixels for w, h in sizes)
    assert sizes[0][0] * sizes[0][1] < 640 * 480 and sizes[0][0] / sizes[0][1] == pytest.approx(640 / 480, rel=0.2)
    wide = episode.image_search(tools, USER_IMAGE, Limits(), rnd=1)
    assert wide.images[0].size != out.images[0].size  # the bound is the limits', not a constant
