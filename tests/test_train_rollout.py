"""From a workspace to veRL rollouts, on CPU: `train prepare` -> veRL's RLHFDataset -> our agent loop
with a scripted generation server, a tiny Qwen2.5-VL processor and the search tools.

The GPU boundary is the generation server: here it returns scripted token ids instead of sampling.
Everything on our side of it (prompt tokens, tool calls, result rendering, thumbnails, masks, limits,
the reward on the returned turns, veRL's GRPO advantage) runs for real.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from support.search_service import serve_search

from fvqa.protocol import ImageHit, TextHit
from fvqa.store import Workspace
from fvqa.train.prepare import prepare

QUESTION = "Who designed the tower in this picture?"
IMAGE_MAX_PIXELS = 64 * 28 * 28


# --------------------------------------------------------------------------------------------
# The tiny Qwen2.5-VL (fvqa.demo.tiny_model): random BPE vocabulary, real Qwen special tokens and processor
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fvqa.demo.tiny_model import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(scope="module")
def processor(tiny_path: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_path))


# --------------------------------------------------------------------------------------------
# A workspace with a few items, prepared for veRL
# --------------------------------------------------------------------------------------------


def png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    img.paste((255 - color[0], color[1], 255 - color[2]), (0, 0, size[0] // 2, size[1] // 3))
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ws")
    with Workspace(root) as ws:
        big = ws.put_image(png((200, 30, 30), (900, 700)))  # larger than IMAGE_MAX_PIXELS: downscaled
        small = ws.put_image(png((30, 200, 30), (120, 90)))
        other = ws.put_image(png((30, 30, 200), (160, 100)))
        items = [
            dict(item_id="a-tower", source="metaclip", question=QUESTION, answer="Gustave Eiffel",
                 aliases=["Eiffel"], image_sha256=big.sha256),
            dict(item_id="b-bridge", source="infoseek", question="What river does this bridge cross?",
                 answer="Seine", aliases=[], image_sha256=small.sha256),
            dict(item_id="c-test", source="infoseek", question="Where is this?", answer="Lyon", aliases=[],
                 image_sha256=other.sha256),
            dict(item_id="d-noimage", source="manual", question="What is it?", answer="x", aliases=[],
                 image_sha256=None),
            dict(item_id="e-empty", source="manual", question="  ", answer="y", aliases=[],
                 image_sha256=small.sha256),
        ]
        corrupt = ws.put_image(png((9, 9, 9), (50, 50)))
        corrupt.path.write_bytes(b"not an image any more")
        items.append(dict(item_id="f-corrupt", source="manual", question="What?", answer="z", aliases=[],
                          image_sha256=corrupt.sha256))
        ws.insert("items", items)
        ws.insert("splits", [dict(item_id=i["item_id"], split="test" if i["item_id"] == "c-test" else "train")
                             for i in items])
        ws.insert("tags", [dict(item_id="a-tower", knowledge_type="Place")])
        ws.insert("labels", [dict(item_id="a-tower", search_label="mixed_search_required")])
        result = prepare(ws, image_max_pixels=IMAGE_MAX_PIXELS)
        rejects = ws.execute("SELECT key, reason FROM rejects WHERE stage = 'train_prepare' ORDER BY key")
    return {"root": root, "result": result, "rejects": rejects, "big": big}


def test_prepare_writes_both_splits_and_rejects_with_reasons(prepared: dict[str, Any]) -> None:
    result = prepared["result"]
    assert result.rows == {"train": 2, "test": 1}
    assert prepared["rejects"] == [("d-noimage", "image_missing"), ("e-empty", "empty_question"),
                                   ("f-corrupt", "image_undecodable")]
    train = pq.read_table(result.files["train"]).to_pylist()
    val = pq.read_table(result.files["test"]).to_pylist()
    assert result.files["test"].name == "val.parquet"
    tower = next(r for r in train if r["extra_info"]["item_id"] == "a-tower")
    assert "mmsearch_r1" in tower["data_source"] and tower["agent_name"] == "fvqa_search_agent"
    assert tower["reward_model"]["style"] == "rule" and tower["reward_model"]["ground_truth"] == "Gustave Eiffel"
    # the item's aliases under the one candidate rule; the reward adds the ground truth itself
    assert json.loads(tower["reward_model"]["candidate_answers"]) == ["Eiffel"]
    assert tower["extra_info"]["candidate_answers"] == ["Eiffel"]
    assert tower["extra_info"]["knowledge_type"] == "Place"
    assert tower["extra_info"]["search_label"] == "mixed_search_required"
    assert tower["extra_info"]["question"] == QUESTION
    [msg] = tower["prompt"]
    assert msg["role"] == "user" and msg["content"].count("<image>") == len(tower["images"]) == 1
    assert msg["content"].endswith(QUESTION)
    with Image.open(io.BytesIO(tower["images"][0]["bytes"])) as img:
        assert img.width * img.height <= IMAGE_MAX_PIXELS  # 900x700 original was downscaled
    indices = [r["extra_info"]["index"] for r in train + val]
    assert len(set(indices)) == len(indices)
    manifest = json.loads(result.manifest.read_text())
    assert manifest["rows"] == {"train": 2, "test": 1} and manifest["rejected"] == {
        "image_missing": 1, "empty_question": 1, "image_undecodable": 1}


def test_prepare_cli_rerun_writes_identical_files(prepared: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from fvqa.cli import app

    before = prepared["result"].files["train"].read_bytes()
    result = CliRunner().invoke(app, ["train", "prepare", "--workspace", str(prepared["root"]),
                                      "--image-max-pixels", str(IMAGE_MAX_PIXELS)])
    assert result.exit_code == 0, result.output
    assert "train.parquet" in result.stdout and "image_undecodable" in result.stdout
    assert pq.read_table(prepared["result"].files["train"]).equals(pq.read_table(io.BytesIO(before)))
    with Workspace(prepared["root"], read_only=True) as ws:
        n = ws.execute("SELECT count(*) FROM rejects WHERE stage = 'train_prepare'")[0][0]
    assert n == 3  # the re-run replaced its rejects, it did not repeat them


def test_prepare_refuses_an_empty_workspace(tmp_path: Path) -> None:
    from fvqa.errors import FvqaError

    with Workspace(tmp_path / "empty") as ws, pytest.raises(FvqaError, match="no items in split train or test"):
        prepare(ws)


_DATASETS: dict[tuple[str, int], Any] = {}


def _dataset(prepared: dict[str, Any], processor: Any, split: str = "train") -> Any:
    """veRL's RLHFDataset over a prepared file (built once per module).

    veRL's overlong-prompt filter is off: it forks a process pool, and forking a test process that
    already runs threads (search services, torch) can deadlock. The prompt length it would check is
    asserted directly in the dataset test instead."""
    from verl.utils.dataset.rl_dataset import RLHFDataset

    key = (str(prepared["result"].files[split]), id(processor))
    if key in _DATASETS:
        return _DATASETS[key]

    config = OmegaConf.create({
        "prompt_key": "prompt", "image_key": "images", "max_prompt_length": 2048, "return_raw_chat": True,
        "filter_overlong_prompts": False, "truncation": "error",
        "cache_dir": str(prepared["root"] / "verl-cache"),
    })
    _DATASETS[key] = RLHFDataset(str(prepared["result"].files[split]), processor.tokenizer, config, processor)
    return _DATASETS[key]


def test_prepared_rows_load_through_verl_rlhf_dataset(prepared: dict[str, Any], processor: Any) -> None:
    ds = _dataset(prepared, processor)
    assert len(ds) == 2
    row = next(ds[i] for i in range(len(ds)) if ds[i]["extra_info"]["item_id"] == "a-tower")
    [msg] = row["raw_prompt"]
    images = [p for p in msg["content"] if p["type"] == "image"]
    assert len(images) == 1 and isinstance(images[0]["image"], Image.Image)
    assert row["agent_name"] == "fvqa_search_agent" and row["index"] == row["extra_info"]["index"]
    # The processor expands the one placeholder into exactly the vision tokens of the one image.
    text = processor.apply_chat_template(row["raw_prompt"], add_generation_prompt=True, tokenize=False)
    out = processor(text=[text], images=[images[0]["image"]], return_tensors="pt")
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == pad).sum()) == int(out["image_grid_thw"].prod()) // 4
    assert text.count("<|vision_start|>") == 1 and QUESTION in text
    assert out["input_ids"].shape[1] <= 2048  # fits data.max_prompt_length used below


# --------------------------------------------------------------------------------------------
# The agent loop with a scripted generation server and scripted search tools
# --------------------------------------------------------------------------------------------


class ScriptedServer:
    """Stands in for veRL's LLM server client: returns the next scripted assistant turn's token ids."""

    def __init__(self, tokenizer: Any, turns: list[str]) -> None:
        self.tokenizer = tokenizer
        self.turns = list(turns)
        self.calls: list[dict[str, Any]] = []

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       image_data: list[Any] | None = None, **kwargs: Any) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        self.calls.append({"prompt_ids": list(prompt_ids), "images": list(image_data or []),
                           "params": dict(sampling_params)})
        text = self.turns.pop(0)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids))


class ScriptedSearch:
    """The search tools' interface with canned hits; records what the rollout asked for."""

    def __init__(self, fail: bool = False, empty_text: bool = False) -> None:
        self.fail, self.empty_text = fail, empty_text
        self.image_calls: list[tuple[bytes, dict[str, Any]]] = []
        self.text_calls: list[tuple[str, str]] = []

    def image_search(self, image: bytes, *, data_id: str | None = None) -> list[ImageHit]:
        self.image_calls.append((image, {"data_id": data_id}))
        if self.fail:
            raise ConnectionError("search service down")
        hits = [ImageHit(title=f"Tower photo {i}", url=f"https://example.org/{i}",
                         thumbnail=png((40 * i, 90, 160), (300 + 40 * i, 200))) for i in range(4)]
        return [*hits, ImageHit(title="Page without image", url="https://example.org/x", thumbnail=None)]

    def text_search(self, query: str, question: str = "") -> list[TextHit]:
        self.text_calls.append((query, question))
        if self.empty_text:
            return []
        return [TextHit(url="https://example.org/eiffel", title="Eiffel", summary="Designed by Gustave Eiffel.")]


IMG = "<reason>I cannot tell which tower this is.</reason><search><img></search>"
TXT = "<reason>It is the Eiffel Tower.</reason><text_search>Eiffel Tower designer</text_search>"
TXT2 = "<reason>Need more.</reason><text_search>tower engineer</text_search>"
ANS = "<reason>The results say Gustave Eiffel.</reason><answer>Gustave Eiffel</answer><|im_end|>"
THUMB_MAX_PIXELS = 16 * 28 * 28


def _run(prepared: dict[str, Any], processor: Any, turns: list[str], search: ScriptedSearch | None,
         response_length: int = 4096, limits: dict[str, Any] | None = None,
         search_url: str = "http://127.0.0.1:9", server: Any = None) -> tuple[Any, Any]:
    import hydra
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from fvqa.train.agent_loop import FvqaSearchAgentLoop
    from fvqa.train.launcher import agent_loop_config_path

    ds = _dataset(prepared, processor)
    row = next(ds[i] for i in range(len(ds)) if ds[i]["extra_info"]["item_id"] == "a-tower")
    cfg = OmegaConf.create({
        "actor_rollout_ref": {"rollout": {"prompt_length": 2048, "response_length": response_length}},
        "data": {},
        "fvqa": {"search_url": search_url,
                 "limits": {"thumbnail_max_pixels": THUMB_MAX_PIXELS, "image_topk": 5, **(limits or {})}},
    })
    server = server or ScriptedServer(processor.tokenizer, turns)

    # Instantiate the loop the way veRL's AgentLoopWorker does: from the registry entry that
    # `fvqa train run` points rollout.agent.agent_loop_config_path at.
    [entry] = [e for e in OmegaConf.load(agent_loop_config_path()) if e.name == row["agent_name"]]

    async def go() -> Any:
        loop = hydra.utils.instantiate(
            entry, trainer_config=DictConfigWrap(cfg), server_manager=server, tokenizer=processor.tokenizer,
            processor=processor, dataset_cls=RLHFDataset, data_config=DictConfigWrap(cfg.data),
            hf_model_type="qwen2_5_vl", tools=ToolListWrap([]), search_client=search,
        )
        assert isinstance(loop, FvqaSearchAgentLoop)
        return await loop.run({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}, **row)

    return asyncio.run(go()), server


class _ClipConfig(dict):
    """The actor-config fields veRL's vanilla policy loss reads (the paper's clip 0.2)."""

    clip_ratio = clip_ratio_low = clip_ratio_high = 0.2
    global_batch_info: dict[str, Any] = {}


def _spans(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) runs of a 0/1 mask."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], start, i))
            start = i
    return runs


def test_full_episode_image_then_text_search_then_answer(prepared: dict[str, Any], processor: Any,
                                                         tiny_path: Path) -> None:
    tok = processor.tokenizer
    search = ScriptedSearch()
    out, server = _run(prepared, processor, [IMG, TXT, ANS], search)

    # Three model turns, two tool turns; the trajectory ended on the answer.
    assert out.extra_fields["assistant_turns"] == [IMG, TXT, ANS.replace("<|im_end|>", "")]
    assert out.extra_fields["turn_kinds"] == ["image_search", "text_search", "answer"]
    assert out.extra_fields["stop_reason"] == "answer" and out.num_turns == 6
    assert [c["kind"] for c in out.extra_fields["tool_calls"]] == ["image_search", "text_search"]

    # The tools got the user's stored image bytes and the model's query with the question.
    with Workspace(prepared["root"], read_only=True) as ws:
        rows = pq.read_table(prepared["result"].files["train"]).to_pylist()
        stored = next(r for r in rows if r["extra_info"]["item_id"] == "a-tower")["images"][0]["bytes"]
        del ws
    assert search.image_calls[0][0] == stored
    assert search.image_calls[0][1]["data_id"] == "a-tower"
    assert search.text_calls == [("Eiffel Tower designer", QUESTION)]

    # Model tokens carry mask 1 and are exactly what the server generated, in order; the rest is 0.
    generated = [tok.encode(t, add_special_tokens=False) for t in (IMG, TXT, ANS)]
    ones = [s for s in _spans(out.response_mask) if s[0] == 1]
    assert [out.response_ids[a:b] for _, a, b in ones] == generated
    assert out.response_logprobs is not None and len(out.response_logprobs) == len(out.response_ids)
    assert all(lp == 0.0 for lp, m in zip(out.response_logprobs, out.response_mask, strict=True) if m == 0)
    zeros = [tok.decode(out.response_ids[a:b]) for v, a, b in _spans(out.response_mask) if v == 0]
    assert len(zeros) == 2
    assert zeros[0].startswith("<|im_end|>\n<|im_start|>user\nSearched results: <information>[Image Search")
    assert f"Original user's question: {QUESTION}" in zeros[0] and zeros[0].endswith("<|im_start|>assistant\n")
    assert "[thumbnail unavailable]" in zeros[0] and zeros[0].count("<|vision_start|>") == 4
    assert "(link:https://example.org/eiffel) Designed by Gustave Eiffel." in zeros[1]

    # Thumbnails reach the next turn: the engine gets them as images, bounded in size, each matched
    # by exactly its own number of vision tokens in the prompt.
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    first, second, third = server.calls
    assert len(first["images"]) == 1 and len(second["images"]) == 5 and len(third["images"]) == 5
    assert all(im.width * im.height <= THUMB_MAX_PIXELS for im in second["images"][1:])
    grid = processor.image_processor(images=second["images"], return_tensors="pt")["image_grid_thw"]
    assert second["prompt_ids"].count(pad) == int(grid.prod(dim=1).sum()) // 4
    assert out.multi_modal_data["images"] == third["images"]
    # Each turn continues the previous prompt (append-only), and generation stops after a search tag.
    assert second["prompt_ids"][: len(first["prompt_ids"])] == first["prompt_ids"]
    assert third["prompt_ids"][: len(second["prompt_ids"])] == second["prompt_ids"]
    assert out.prompt_ids + out.response_ids[: len(third["prompt_ids"]) - len(out.prompt_ids)] == third["prompt_ids"]
    assert "</search>" in first["params"]["stop"] and first["params"]["include_stop_str_in_output"]

    # The trainer side: veRL rebuilds the vision inputs from the whole trajectory, and the policy's
    # forward pass (the actor update's first step) accepts tokens and images together - Qwen2.5-VL
    # refuses any mismatch between image tokens and image features.
    from transformers import AutoModelForImageTextToText
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    ids = torch.tensor([out.prompt_ids + out.response_ids])
    worker = SimpleNamespace(processor=processor, tokenizer=tok, _get_mm_processor_kwargs=lambda audios=None: {})
    mm = AgentLoopWorker._compute_multi_modal_inputs(worker, out, ids)
    assert mm["image_grid_thw"].shape[0] == 5
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_path)).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=mm["pixel_values"], image_grid_thw=mm["image_grid_thw"]).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    # veRL's PPO-clip loss on the response: tool-turn tokens (mask 0) get no gradient at all.
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    n_prompt, n_resp = len(out.prompt_ids), len(out.response_ids)
    leaf = logits[:, n_prompt - 1: n_prompt - 1 + n_resp].clone().requires_grad_()
    logp = torch.log_softmax(leaf, -1).gather(-1, torch.tensor([out.response_ids])[..., None])[..., 0]
    resp_mask = torch.tensor([out.response_mask], dtype=torch.float32)
    loss, _ = compute_policy_loss_vanilla(logp.detach() - 0.1, logp, torch.ones_like(logp), resp_mask,
                                          config=_ClipConfig())
    loss.backward()
    grad_per_token = leaf.grad.abs().sum(-1)[0]
    assert torch.all(grad_per_token[resp_mask[0] == 0] == 0)
    assert torch.all(grad_per_token[resp_mask[0] == 1] > 0)

    # The reward's fallback (cutting veRL's decoded response into turns) agrees with the loop's turns,
    # and the reward veRL computes from the loop's extra fields: correct after searching -> 0.91.
    from fvqa.train.reward import split_turns
    from fvqa.train.verl_reward import compute_score

    decoded = tok.decode(out.response_ids, skip_special_tokens=True)
    assert [t.strip() for t in split_turns(decoded)] == [t.strip() for t in out.extra_fields["assistant_turns"]]
    info = {"candidate_answers": ["Gustave Eiffel", "Eiffel"], **out.extra_fields}
    score = compute_score("mmsearch_r1/fvqa_train", tok.decode(out.response_ids), "Gustave Eiffel", info)
    assert score["score"] == pytest.approx(0.91) and score["n_image_search"] == 1 and score["n_text_search"] == 1


@pytest.mark.parametrize(
    ("turns", "limits", "kinds", "detail", "n_image", "n_text"),
    [
        # A second image search is past the limit: the rollout ends without calling the tool.
        ([IMG, IMG], {}, ["image_search", "image_search"], "image search limit (1)", 1, 0),
        # Image search only in round 1.
        ([TXT, IMG], {"max_image_search": 2}, ["text_search", "image_search"],
         "image search is allowed in round 1 only", 0, 1),
        # A call in the last (third) round ends the trajectory; two text searches ran.
        ([TXT, TXT2, TXT], {}, ["text_search"] * 3, "search call in the last round (3)", 0, 2),
        # A third text search past a 2-search limit with rounds to spare.
        ([TXT, TXT2, TXT], {"max_rounds": 5}, ["text_search"] * 3, "text search limit (2)", 0, 2),
    ],
)
def test_limits_end_the_trajectory(prepared: dict[str, Any], processor: Any, turns: list[str],
                                   limits: dict[str, Any], kinds: list[str], detail: str,
                                   n_image: int, n_text: int) -> None:
    search = ScriptedSearch()
    out, server = _run(prepared, processor, turns, search, limits=limits)
    assert out.extra_fields["turn_kinds"] == kinds
    assert out.extra_fields["stop_reason"] == "limit" and out.extra_fields["stop_detail"] == detail
    assert (len(search.image_calls), len(search.text_calls)) == (n_image, n_text)
    assert len(server.calls) == len(turns)
    # The last turn's tokens end the response: nothing after the refused call.
    last = processor.tokenizer.encode(turns[-1], add_special_tokens=False)
    assert out.response_ids[-len(last):] == last and out.response_mask[-len(last):] == [1] * len(last)


def test_invalid_turn_ends_trajectory(prepared: dict[str, Any], processor: Any) -> None:
    out, server = _run(prepared, processor, ["I think it is a tower.<|im_end|>"], ScriptedSearch())
    assert out.extra_fields["stop_reason"] == "invalid" and len(server.calls) == 1
    assert set(out.response_mask) == {1}


def test_search_failure_is_rendered_not_raised(prepared: dict[str, Any], processor: Any) -> None:
    out, server = _run(prepared, processor, [IMG, ANS], ScriptedSearch(fail=True))
    assert out.extra_fields["stop_reason"] == "answer" and out.extra_fields["n_tool_errors"] == 1
    assert "ConnectionError" in out.extra_fields["tool_calls"][0]["error"]
    tool_text = processor.tokenizer.decode(server.calls[1]["prompt_ids"][len(server.calls[0]["prompt_ids"]):])
    assert "There is an error encountered in performing search" in tool_text
    assert len(server.calls[1]["images"]) == 1  # no thumbnails


def test_response_budget_stops_before_a_result_that_does_not_fit(prepared: dict[str, Any], processor: Any) -> None:
    n_img = len(processor.tokenizer.encode(IMG, add_special_tokens=False))
    out, server = _run(prepared, processor, [IMG, ANS], ScriptedSearch(), response_length=n_img + 20)
    assert out.extra_fields["stop_reason"] == "response_budget"
    assert len(server.calls) == 1 and len(out.response_ids) == n_img
    assert server.calls[0]["params"]["max_tokens"] == n_img + 20


def test_grpo_advantage_on_a_group_of_our_rollouts(prepared: dict[str, Any], processor: Any) -> None:
    """veRL's own GRPO advantage over one prompt's rollouts scored by our reward."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    from fvqa.train.verl_reward import compute_score

    wrong = "<reason>Guess.</reason><answer>Napoleon</answer><|im_end|>"
    scripts = [[ANS], [IMG, ANS], [IMG, TXT, ANS], [wrong]]
    scores, lengths = [], []
    for turns in scripts:
        out, _ = _run(prepared, processor, turns, ScriptedSearch())
        info = {"candidate_answers": ["Gustave Eiffel"], **out.extra_fields}
        scores.append(compute_score("mmsearch_r1/fvqa_train", "", "Gustave Eiffel", info)["score"])
        lengths.append(len(out.response_ids))
    assert scores == pytest.approx([1.0, 0.91, 0.91, 0.1])
    width = max(lengths)
    rewards = torch.zeros(len(scripts), width)
    mask = torch.zeros(len(scripts), width)
    for i, (s, n) in enumerate(zip(scores, lengths, strict=True)):
        rewards[i, n - 1] = s
        mask[i, :n] = 1
    adv, _ = compute_grpo_outcome_advantage(rewards, mask, np.array(["item"] * len(scripts), dtype=object))
    first, searched, searched_twice, wrong_adv = adv[:, 0].tolist()
    assert searched == pytest.approx(searched_twice)
    assert first > searched > 0 > wrong_adv


# --------------------------------------------------------------------------------------------
# Over HTTP: the loop calls the real search service (`fvqa search serve`'s app) on loopback
# --------------------------------------------------------------------------------------------


class PageBackend:
    """A search backend with canned pages: what the service's SearchTools facade sits on."""

    name = "scripted"
    cache_pages = True

    def __init__(self) -> None:
        self.image_queries: list[Any] = []

    def image_search(self, image: Any, k: int) -> list[ImageHit]:
        self.image_queries.append(image)
        return [ImageHit(title=f"Eiffel Tower view {i}", url=f"https://example.org/v{i}",
                         thumbnail=png((20 * i, 120, 60), (240, 180))) for i in range(k)]

    def text_candidates(self, query: str, n: int) -> list[Any]:
        from fvqa.search.types import Candidate

        return [Candidate(url="https://example.org/eiffel", title="Gustave Eiffel")]

    def read_page(self, candidate: Any) -> str:
        return "The tower was designed by the engineering company of Gustave Eiffel. It opened in 1889."


@pytest.fixture(scope="module")
def search_service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fvqa.search.config import SearchConfig
    from fvqa.search.tools import SearchTools

    backend = PageBackend()
    tools = SearchTools(SearchConfig(), backend, cache_dir=tmp_path_factory.mktemp("search-cache"))
    with serve_search(tools) as url:
        yield SimpleNamespace(url=url, backend=backend, tools=tools)


def test_episode_over_http_search_service(prepared: dict[str, Any], processor: Any, search_service: Any) -> None:
    from fvqa.train import checks

    out, server = _run(prepared, processor, [IMG, TXT, ANS], None, search_url=search_service.url)
    assert out.extra_fields["stop_reason"] == "answer"
    assert [c["ok"] for c in out.extra_fields["tool_calls"]] == [True, True]
    assert len(search_service.backend.image_queries) == 1
    tool_turns = [processor.tokenizer.decode(out.response_ids[a:b])
                  for v, a, b in _spans(out.response_mask) if v == 0]
    assert tool_turns[0].count("<|vision_start|>") == 5 and "title: Eiffel Tower view 0" in tool_turns[0]
    assert "(link:https://example.org/eiffel)" in tool_turns[1] and "Gustave Eiffel" in tool_turns[1]
    assert len(server.calls[1]["images"]) == 6
    # The pre-launch check sees the same service as up.
    cfg = OmegaConf.create({"fvqa": {"search_url": search_service.url}})
    check = checks.check_search_service(cfg)
    assert check.ok and "backend scripted" in check.detail


def test_verl_reward_manager_scores_our_rollout(prepared: dict[str, Any], processor: Any) -> None:
    """veRL's own reward path: the agent loop's extra fields reach our reward through extra_info."""
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    out, _ = _run(prepared, processor, [IMG, TXT, ANS], ScriptedSearch())
    row = next(r for r in (_dataset(prepared, processor)[i] for i in range(2))
               if r["extra_info"]["item_id"] == "a-tower")
    cfg = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://fvqa.train.verl_reward", "name": "compute_score",
        "reward_kwargs": {"alpha": 0.1, "search_penalty": 0.1, "mode": "EM", "format_rule": "limits"}}}})
    prompts = torch.tensor([out.prompt_ids])
    responses = torch.tensor([out.response_ids])
    data = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses,
                 "attention_mask": torch.ones(1, prompts.shape[1] + responses.shape[1], dtype=torch.int64)},
        non_tensors={
            "data_source": np.array([row["data_source"]], dtype=object),
            "reward_model": np.array([row["reward_model"]], dtype=object),
            "extra_info": np.array([dict(row["extra_info"])], dtype=object),
            "tool_extra_fields": np.array([out.extra_fields], dtype=object),
            "__num_turns__": np.array([out.num_turns]),
        },
    )

    async def score() -> dict[str, Any]:
        manager = NaiveRewardManager(cfg, processor.tokenizer, get_custom_reward_fn(cfg))
        return await manager.run_single(data)

    result = asyncio.run(score())
    assert result["reward_score"] == pytest.approx(0.91)
    info = result["reward_extra_info"]
    assert (info["acc"], info["format"], info["n_image_search"], info["n_text_search"], info["searched"]) == (
        1.0, 1.0, 1, 1, 1)


def test_launch_check_catches_data_prepared_with_other_prompts(prepared: dict[str, Any], tmp_path: Path) -> None:
    from fvqa.train import checks

    train = str(prepared["result"].files["train"])
    same = OmegaConf.create({"data": {"train_files": train}, "fvqa": {"prompts": None}})
    assert checks.check_prompts(same).ok
    other = tmp_path / "prompts.yaml"
    other.write_text("round_1: 'Answer the question about this image: <image>'\n")
    mixed = OmegaConf.create({"data": {"train_files": train}, "fvqa": {"prompts": str(other)}})
    check = checks.check_prompts(mixed)
    assert not check.ok and check.required and "fvqa train prepare --prompts" in check.detail


class RoundRobinServer:
    """veRL's LLM client stand-in for a batch: each trajectory (request id) walks the same script."""

    def __init__(self, turns: list[str]) -> None:
        self.turns = turns
        self.tokenizer: Any = None
        self.seen: dict[str, int] = {}

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       image_data: list[Any] | None = None, **kwargs: Any) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        n = self.seen.get(request_id, 0)
        self.seen[request_id] = n + 1
        ids = self.tokenizer.encode(self.turns[n], add_special_tokens=False)
        return TokenOutput(token_ids=ids, log_probs=[-0.3] * len(ids))


def test_verl_agent_loop_worker_runs_a_batch_from_our_config(prepared: dict[str, Any], tiny_path: Path,
                                                            search_service: Any) -> None:
    """veRL's own AgentLoopWorker (what each Ray rollout worker runs), built from our composed
    training config: dataset rows -> our registered loop -> padded batch with masks, M-RoPE position
    ids and vision inputs for every thumbnail. Only the generation server is scripted."""
    from verl import DataProto
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    from fvqa.train import launcher

    config = Path(__file__).resolve().parents[1] / "configs" / "grpo_qwen2_5_vl_7b.yaml"
    train = str(prepared["result"].files["train"])
    cfg = launcher.compose(config, launcher.launch_overrides(config, None, [
        f"actor_rollout_ref.model.path={tiny_path}", f"data.train_files={train}", f"data.val_files={train}",
        "data.max_prompt_length=2048", "data.max_response_length=2048", "data.dataloader_num_workers=0",
        # veRL's length filter forks a process pool, which can deadlock a threaded test process.
        "data.filter_overlong_prompts=false",
        f"+data.cache_dir={prepared['root'] / 'verl-cache'}", f"fvqa.search_url={search_service.url}",
        f"fvqa.limits.thumbnail_max_pixels={THUMB_MAX_PIXELS}",
    ]))
    server = RoundRobinServer([IMG, TXT, ANS])

    async def go() -> Any:
        worker = AgentLoopWorker(cfg, server)
        server.tokenizer = worker.tokenizer
        ds = RLHFDataset(train, worker.tokenizer, cfg.data, worker.processor)
        batch = DataProto.from_single_dict(collate_fn([ds[i] for i in range(len(ds))]))
        return await worker.generate_sequences(batch.repeat(repeat_times=2, interleave=True))

    out = asyncio.run(go())
    n, resp_len = 4, 2048
    assert out.batch["responses"].shape == (n, resp_len)
    assert out.batch["position_ids"].shape == (n, 4, 2048 + resp_len)  # text + 3 M-RoPE axes
    assert list(out.non_tensor_batch["stop_reason"]) == ["answer"] * n
    assert [len(t) for t in out.non_tensor_batch["assistant_turns"]] == [3] * n
    generated = sum(len(server.tokenizer.encode(t, add_special_tokens=False)) for t in (IMG, TXT, ANS))
    assert out.batch["response_mask"].sum(-1).tolist() == [generated] * n
    # Every trajectory carries the user image plus the five thumbnails into training.
    assert [m["image_grid_thw"].shape[0] for m in out.non_tensor_batch["multi_modal_inputs"]] == [6] * n
    assert len(search_service.backend.image_queries) >= 1


# --------------------------------------------------------------------------------------------
# Through veRL's own LLMServerClient and fvqa's CPU generation server (the path a real run takes)
# --------------------------------------------------------------------------------------------


class _Rpc:
    """A Ray method handle's `.remote` for an object living in this process."""

    def __init__(self, fn: Any) -> None:
        self.remote = fn


class InProcessBalancer:
    """veRL's load-balancer actor interface over one in-process server (no Ray cluster in a unit test)."""

    def __init__(self, server: Any) -> None:
        async def fields() -> list[str]:
            return []

        async def acquire(request_id: str, **kwargs: Any) -> tuple[str, Any]:
            return "server-0", SimpleNamespace(generate=_Rpc(server.generate))

        self.require_acquire_fields = _Rpc(fields)
        self.require_release_fields = _Rpc(fields)
        self.acquire_server = _Rpc(acquire)
        self.release_server = _Rpc(lambda **kwargs: None)


class VersionedServer:
    """The generation-server side of the RPC (as vLLM's and fvqa's hf server answer it): scripted
    turns, each reported with the weight version (`global_steps`) that produced it."""

    def __init__(self, tokenizer: Any, turns: list[str], version: int) -> None:
        self.tokenizer, self.turns, self.version = tokenizer, list(turns), version

    async def generate(self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any],
                       image_data: list[Any] | None = None, **kwargs: Any) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        ids = self.tokenizer.encode(self.turns.pop(0), add_special_tokens=False)
        out = TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed",
                          extra_fields={"global_steps": self.version})
        self.version += 1  # the trainer pushes new weights while this trajectory waits on a search
        return out


def test_weight_versions_reach_the_trainer_through_verl_llm_server_client(prepared: dict[str, Any],
                                                                          processor: Any) -> None:
    """The step-1 crash: veRL's v1 trainer builds `np.array([tag["min_global_steps"] ...], dtype=int)`
    from the loop's extra fields (None crashed it). Here veRL's own LLMServerClient sits between the
    loop and a server whose weights change in the middle of the trajectory."""
    from verl.workers.rollout.llm_server import LLMServerClient

    server = VersionedServer(processor.tokenizer, [IMG, TXT, ANS], version=1)
    client = LLMServerClient(OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": "hf"}}}),
                             InProcessBalancer(server))
    out, _ = _run(prepared, processor, [], ScriptedSearch(), server=client)
    assert out.extra_fields["turn_kinds"] == ["image_search", "text_search", "answer"]
    assert (out.extra_fields["min_global_steps"], out.extra_fields["max_global_steps"]) == (1, 3)
    assert np.array([out.extra_fields["min_global_steps"], out.extra_fields["max_global_steps"]], dtype=int).tolist() == [1, 3]


def test_step_metrics_count_searches_and_failed_searches(prepared: dict[str, Any], processor: Any) -> None:
    """What `fvqa/...` adds to each training step's metrics, from real trajectories of the loop."""
    from fvqa.train.step_metrics import search_metrics

    ok, _ = _run(prepared, processor, [IMG, TXT, ANS], ScriptedSearch())
    failed, _ = _run(prepared, processor, [IMG, ANS], ScriptedSearch(fail=True))
    direct, _ = _run(prepared, processor, [ANS], ScriptedSearch())
    empty, _ = _run(prepared, processor, [TXT, ANS], ScriptedSearch(empty_text=True))
    m = search_metrics([ok.extra_fields, failed.extra_fields, direct.extra_fields, empty.extra_fields, None,
                        {"other": 1}])
    assert m["fvqa/trajectories"] == 4
    assert m["fvqa/image_search/mean"] == pytest.approx(2 / 4) and m["fvqa/text_search/mean"] == pytest.approx(2 / 4)
    assert m["fvqa/search_errors/total"] == 1 and m["fvqa/search_errors/mean"] == pytest.approx(1 / 4)
    assert m["fvqa/search_empty/mean"] == pytest.approx(1 / 4)
    assert m["fvqa/searched/mean"] == pytest.approx(3 / 4) and m["fvqa/stop_reason/answer"] == 1.0
    # The reward's validation key counts the same failures (not the empty search).
    from fvqa.train.verl_reward import compute_score

    scores = [compute_score("mmsearch_r1/fvqa_train", "", "Gustave Eiffel", t.extra_fields)["n_search_errors"]
              for t in (ok, failed, direct, empty)]
    assert scores == [0, 1, 0, 0]
    assert search_metrics([None, {"other": 1}]) == {}
