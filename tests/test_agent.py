"""The search agent: exact trajectories over a loopback OpenAI-compatible server and the local index,
limits, search failures, and a tiny Qwen2.5-VL run locally through transformers."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from support.eval_script import search_chain
from support.fake_openai import FakeOpenAI, Reply, error_body
from support.pixel_embedder import PixelEmbedder

from fvqa.agent import Job, run, run_many
from fvqa.generators.base import Generation, Request, Sampling, restore_stop
from fvqa.generators.openai_chat import OpenAIChatGenerator
from fvqa.llm.config import Endpoint, LLMConfig
from fvqa.protocol import IMAGE_SEARCH_ERROR, TEXT_SEARCH_ERROR, AgentItem, Limits, load_prompts
from fvqa.search.config import LocalConfig
from fvqa.search.local_index import LocalIndex, build_index
from fvqa.search.types import SearchError

PROMPTS = load_prompts()
CFG = LocalConfig(clip_model="ViT-S-32", clip_pretrained=None)


class IndexTools:
    """The agent's search interface over the local index (image bytes in, hits out)."""

    def __init__(self, index: LocalIndex) -> None:
        self.index = index

    def image_search(self, image: bytes, **_: Any) -> list:
        import io

        return self.index.image_search(Image.open(io.BytesIO(image)), k=3)

    def text_search(self, query: str, question: str = "", **_: Any) -> list:
        return self.index.text_search(query, question, k=2)




class Scripted:
    """A generator that answers each request with a function of its messages (no model, no HTTP)."""

    name = "scripted:test"

    def __init__(self, script: Callable[[list[dict[str, Any]]], str]) -> None:
        self.script = script
        self.requests: list[Request] = []

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        self.requests.extend(requests)
        return [Generation(text=self.script(r.messages), prompt_tokens=7, completion_tokens=3) for r in requests]


class FailingTools:
    def image_search(self, image: bytes, **_: Any) -> list:
        raise SearchError("index offline")

    def text_search(self, query: str, question: str = "", **_: Any) -> list:
        raise SearchError("index offline")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fvqa.demo.world import make_world

    return make_world(tmp_path_factory.mktemp("aworld") / "w", seed=3, n_entities=6)


@pytest.fixture(scope="module")
def tools(world: Path, tmp_path_factory: pytest.TempPathFactory) -> IndexTools:
    out = tmp_path_factory.mktemp("aidx") / "index"
    embedder = PixelEmbedder()
    build_index(world / "web/pages.jsonl", world / "web/images.jsonl", out, config=CFG, embedder=embedder)
    return IndexTools(LocalIndex(out, embedder=embedder))


@pytest.fixture(scope="module")
def entity(world: Path) -> dict[str, Any]:
    return json.loads((world / "entities.jsonl").read_text().splitlines()[2])


def _item(world: Path, e: dict[str, Any]) -> AgentItem:
    image = (world / "web" / "images" / f"{e['entity_id']}_0.jpg").read_bytes()
    return AgentItem(f"item-{e['entity_id']}", f"Who created this {e['noun']}?", image)


def searching_model(body: dict[str, Any]) -> str:
    """Image search, then a text search for the first title found, then the maker from the summary.

    Turn 1 comes back *without* `</search>`, as OpenAI-style servers cut the matched stop string."""
    return search_chain(body)


def test_image_then_text_search_then_answer_is_recorded_exactly(world: Path, tools: IndexTools, entity: dict):
    item = _item(world, entity)
    with FakeOpenAI(searching_model) as srv:
        cfg = LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=None)], model="fake-model",
                        max_retries=0)
        gen = OpenAIChatGenerator(cfg, world.parent / "llm-cache")
        traj = run(item, gen, tools, Limits(), PROMPTS, sampling=Sampling(temperature=0.7, seed=11))
        bodies = [r.json for r in srv._records if r.path == "/v1/chat/completions"]

    assert [t.kind for t in traj.turns] == ["image_search", "text_search", "answer"]
    assert traj.turns[0].text.endswith("<search><img></search>")  # stop string restored
    assert traj.answer == entity["maker"] and traj.stop_reason == "answer"
    img_call, txt_call = traj.tool_calls
    assert (img_call.kind, img_call.round, img_call.ok) == ("image_search", 1, True)
    assert img_call.hits[0]["title"] == entity["name"]  # the index found the entity's own page
    assert (txt_call.kind, txt_call.query, txt_call.round) == ("text_search", f"{entity['name']} maker", 2)
    assert entity["maker"] in txt_call.hits[0]["summary"]
    # transcript: user, assistant x3 with two tool-result user turns between, images by hash
    roles = [m["role"] for m in traj.messages]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
    tool_turn = traj.messages[2]["content"]
    assert tool_turn[0]["text"].startswith("Searched results: <information>[Image Search Results]")
    n_thumbs = sum(p["type"] == "image" for p in tool_turn)
    assert n_thumbs == len(img_call.hits) == 3 and len(traj.image_shas) == 1 + n_thumbs
    assert traj.messages[4]["content"][0]["text"].startswith("Searched results: <information>[Text Search Results]")
    assert "Original user's question: Who created this" in traj.messages[4]["content"][0]["text"]
    # the wire: 3 requests, growing conversations, every image sent, stop strings and the seed
    assert len(bodies) == 3 and [len(b["messages"]) for b in bodies] == [1, 3, 5]
    assert sum(p.get("type") == "image_url" for m in bodies[1]["messages"] if isinstance(m["content"], list)
               for p in m["content"]) == 1 + n_thumbs
    assert bodies[0]["stop"] == ["</search>", "</text_search>"] and bodies[0]["seed"] == 11
    # token counts are the server's usage, summed over turns
    assert traj.prompt_tokens == sum(t.prompt_tokens for t in traj.turns) > 0
    assert traj.completion_tokens > 0
    assert json.loads(json.dumps(traj.to_dict()))["n_text_search"] == 1


@pytest.mark.parametrize(
    ("turns", "limits", "kinds", "detail"),
    [
        (["<reason>a</reason><search><img></search>"] * 2, Limits(), ["image_search"] * 2, "image search limit (1)"),
        (["<reason>a</reason><text_search>q</text_search>", "<reason>b</reason><search><img></search>"], Limits(),
         ["text_search", "image_search"], "image search is allowed in round 1 only"),
        (["<reason>a</reason><text_search>q1</text_search>"] * 3, Limits(), ["text_search"] * 3,
         "search call in the last round (3)"),
        (["<reason>a</reason><text_search>q1</text_search>"] * 2, Limits(max_text_search=1), ["text_search"] * 2,
         "text search limit (1)"),
    ],
)
def test_limits_end_the_trajectory_without_running_the_tool(world, tools, entity, turns, limits, kinds, detail):
    script = Scripted(lambda msgs: turns[sum(m["role"] == "assistant" for m in msgs)])
    traj = run(_item(world, entity), script, tools, limits, PROMPTS)
    assert [t.kind for t in traj.turns] == kinds
    assert traj.stop_reason == "limit" and traj.stop_detail == detail and traj.answer is None
    assert len(traj.tool_calls) == len(kinds) - 1  # the call past the limit never ran
    assert len(script.requests) == len(kinds)


def test_failed_search_returns_upstream_error_text_and_goes_on(world, entity):
    turns = ["<reason>a</reason><search><img></search>", "<reason>b</reason><text_search>q</text_search>",
             "<reason>c</reason><answer>x</answer>"]
    script = Scripted(lambda msgs: turns[sum(m["role"] == "assistant" for m in msgs)])
    traj = run(_item(world, entity), script, FailingTools(), Limits(), PROMPTS)
    assert traj.stop_reason == "answer" and traj.answer == "x"
    assert [c.ok for c in traj.tool_calls] == [False, False]
    assert traj.tool_calls[0].error == "SearchError: index offline"
    assert traj.messages[2]["content"] == [{"type": "text", "text": IMAGE_SEARCH_ERROR}]
    assert traj.messages[4]["content"] == [{"type": "text", "text": TEXT_SEARCH_ERROR}]


def test_direct_mode_is_one_turn_without_tools(world, entity):
    searcher = Scripted(lambda msgs: "<reason>r</reason><search><img></search>")
    direct, = run_many([Job(_item(world, entity), "direct")], searcher, FailingTools(), Limits(), PROMPTS)
    assert direct.stop_reason == "limit" and direct.answer is None and not direct.tool_calls
    answered = run(_item(world, entity), Scripted(lambda m: "<reason>r</reason><answer>Peru</answer>"), None,
                   Limits(), PROMPTS, mode="direct")
    assert answered.answer == "Peru" and len(answered.turns) == 1
    first = answered.messages[0]["content"]
    assert first[0]["text"].startswith(PROMPTS.direct_answer.split("<image>")[0]) and first[1]["type"] == "image"


def test_unparseable_turn_and_endpoint_error_stop_with_reasons(world, entity, tmp_path):
    traj = run(_item(world, entity), Scripted(lambda m: "I think it is a tower."), None, Limits(), PROMPTS)
    assert traj.stop_reason == "invalid" and "no <answer>" in traj.stop_detail
    with FakeOpenAI(lambda body: Reply(status=400, body=error_body("image too large"))) as srv:
        cfg = LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=None)], max_retries=0)
        traj = run(_item(world, entity), OpenAIChatGenerator(cfg, tmp_path / "c"), None, Limits(), PROMPTS)
    assert traj.stop_reason == "error" and "image too large" in traj.stop_detail and not traj.turns


def test_restore_stop_is_idempotent():
    assert restore_stop("<reason>x</reason><search><img>") == "<reason>x</reason><search><img></search>"
    assert restore_stop("<reason>x</reason><text_search>a b") == "<reason>x</reason><text_search>a b</text_search>"
    for done in ("<reason>x</reason><search><img></search>", "<answer>a</answer>", "<text_search>q</text_search>"):
        assert restore_stop(done) == done


# -- a real (tiny, random) Qwen2.5-VL through transformers -----------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory):
    from fvqa.demo.tiny_model import build_tiny_qwen
    from fvqa.generators.transformers_local import TransformersGenerator

    path = build_tiny_qwen(tmp_path_factory.mktemp("qwen"))
    return path, TransformersGenerator


FORCED = ["<reason>a</reason><search><img></search>", "<reason>b</reason><text_search>tower maker</text_search>",
          "<reason>c</reason><text_search>again</text_search>"]


def forcing(tokenizer) -> Callable[[int, Any], list[int]]:
    """`prefix_allowed_tokens_fn` that makes the random model write FORCED[turn] token by token."""
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    header = len(tokenizer.encode("assistant\n"))
    scripts = [tokenizer.encode(s) for s in FORCED]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def allowed(batch_id: int, input_ids: Any) -> list[int]:
        ids = input_ids.tolist()
        starts = [i for i, t in enumerate(ids) if t == im_start]
        turn = (len(starts) - 3) // 2  # system, user, then (assistant, user) per earlier round
        done = len(ids) - starts[-1] - 1 - header
        script = scripts[min(turn, len(scripts) - 1)]
        return [script[done]] if done < len(script) else [eos]

    return allowed


@pytest.mark.slow  # ~15 s on an idle 2-core machine (model build + a dozen CPU generations)
def test_tiny_qwen_runs_records_tokens_and_obeys_limits(world, tools, entity, tiny_qwen):
    path, TransformersGenerator = tiny_qwen
    free = TransformersGenerator(path)
    traj = run(_item(world, entity), free, tools, Limits(), PROMPTS, sampling=Sampling(max_tokens=12, seed=1))
    assert traj.generator.startswith("transformers:") and traj.stop_reason in ("answer", "invalid", "limit")
    first = traj.turns[0]
    assert first.prompt_tokens > 20 and 1 <= first.completion_tokens <= 12  # max_tokens respected
    again = run(_item(world, entity), free, tools, Limits(), PROMPTS, sampling=Sampling(max_tokens=12, seed=1))
    assert again.turns[0].text == first.text  # seeded sampling is reproducible

    forced = TransformersGenerator(path, generate_kwargs={"prefix_allowed_tokens_fn": forcing(free.processor.tokenizer)})
    traj = run(_item(world, entity), forced, tools, Limits(), PROMPTS, sampling=Sampling(max_tokens=40, seed=2))
    assert [t.text for t in traj.turns] == FORCED
    assert [c.kind for c in traj.tool_calls] == ["image_search", "text_search"]
    assert traj.stop_reason == "limit" and traj.stop_detail == "search call in the last round (3)"
    # turn 2's prompt held the user image and the returned thumbnails: more vision tokens than turn 1
    assert traj.turns[1].prompt_tokens > traj.turns[0].prompt_tokens + 3 * 4
    assert all(t.completion_tokens == len(free.processor.tokenizer.encode(t.text)) for t in traj.turns)


def test_vllm_backend_converts_requests_and_explains_a_missing_install(world, entity):
    import importlib.util

    from fvqa.errors import ConfigError
    from fvqa.generators import make_generator
    from fvqa.generators.vllm_offline import sampling_kwargs, vllm_messages

    image = _item(world, entity).image
    msgs = vllm_messages([{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "image", "image": image}]},
                          {"role": "assistant", "content": "<answer>a</answer>"}])
    assert msgs[0]["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert msgs[1] == {"role": "assistant", "content": "<answer>a</answer>"}
    kw = sampling_kwargs(Sampling(temperature=0.5, seed=3))
    assert kw["stop"] == ["</search>", "</text_search>"] and kw["include_stop_str_in_output"] and kw["seed"] == 3
    if importlib.util.find_spec("vllm") is None:  # the CPU test machine: a clear error, not an ImportError
        with pytest.raises(ConfigError, match="pip install vllm"):
            make_generator("vllm", model_path="/models/qwen")


def test_image_search_gets_the_items_url_and_upstream_data_id(world, entity):
    seen: list[dict[str, Any]] = []

    class Recording(FailingTools):
        def image_search(self, image: bytes, **kw: Any) -> list:
            seen.append(kw)
            return []

    item = AgentItem("x", "Who?", _item(world, entity).image, image_url="http://img/1.jpg", data_id="fvqa_train_7")
    turns = ["<reason>a</reason><search><img></search>", "<reason>b</reason><answer>c</answer>"]
    run(item, Scripted(lambda m: turns[sum(x["role"] == "assistant" for x in m)]), Recording(), Limits(), PROMPTS)
    assert seen == [{"image_url": "http://img/1.jpg", "data_id": "fvqa_train_7"}]


class InstantTools:
    """Searches that return at once, so only the model's latency matters."""

    def image_search(self, image: bytes, **_: Any) -> list:
        from fvqa.protocol import ImageHit

        return [ImageHit(title="Kalo tower", url="http://demo/kalo")]

    def text_search(self, query: str, question: str = "", **_: Any) -> list:
        from fvqa.protocol import TextHit

        return [TextHit(url="http://demo/kalo", title="Kalo tower", summary="It was created by Ur Sta in 1901.")]


def test_http_rollouts_advance_on_their_own_a_slow_call_holds_only_its_rollout(world, entity, tmp_path):
    """Over an OpenAI-compatible endpoint each rollout requests its next turn as soon as its last search
    is back: while one item's first call takes 1.5 s, the other items finish all three rounds."""
    import threading
    import time

    slow_started = threading.Event()

    def model(body: dict[str, Any]) -> str:
        first = " ".join(p.get("text", "") for p in body["messages"][0]["content"] if p.get("type") == "text")
        if "#slow" in first and not any(m["role"] == "assistant" for m in body["messages"]):
            slow_started.set()
            time.sleep(1.5)
        return searching_model(body)

    item = _item(world, entity)
    jobs = [Job(AgentItem(f"fast-{i}", item.question, item.image), "search", Sampling(seed=i)) for i in range(3)]
    jobs.append(Job(AgentItem("slow", item.question + " #slow", item.image), "search", Sampling(seed=9)))
    with FakeOpenAI(model) as srv:
        cfg = LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=None)], max_retries=0,
                        max_concurrency=8)
        t0 = time.perf_counter()
        trajs = run_many(jobs, OpenAIChatGenerator(cfg, tmp_path / "c"), InstantTools(), Limits(), PROMPTS)
        wall = time.perf_counter() - t0
        bodies = [(r.t, r.json) for r in srv.requests if r.path == "/v1/chat/completions"]
    assert slow_started.is_set() and all(t.stop_reason == "answer" for t in trajs)
    slow_first = min(t for t, b in bodies if "#slow" in json.dumps(b))
    fast_last = max(t for t, b in bodies if "#slow" not in json.dumps(b))
    # every fast rollout's third turn was requested while the slow first call was still running
    assert fast_last < slow_first + 1.5
    assert [len(t.turns) for t in trajs] == [3, 3, 3, 3]
    assert wall < 1.5 + 3.0
