"""fvqa's CPU backend for veRL, piece by piece: what veRL sees after `import verl` with it loaded, and
the `hf` generation server's RPC answers (the end-to-end run is tests/test_train_grpo_cpu.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fvqa.demo.tiny_model import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(scope="module")
def server(tiny_path: Path) -> Any:
    from fvqa.train.cpu.hf_server import HFGenerationServer

    return HFGenerationServer(str(tiny_path))


def test_verl_loads_the_backend_through_its_own_extension_hook() -> None:
    """In a fresh process, as every Ray worker starts: veRL imports the modules the launcher names."""
    code = (
        "import verl\n"
        "from verl.utils.device import get_device_name, get_nccl_backend\n"
        "from verl.workers.rollout.base import get_rollout_class\n"
        "from verl.workers.rollout.replica import get_rollout_replica_class\n"
        "import verl.utils.distributed as d, verl.utils.fsdp_utils as f\n"
        "print(get_device_name(), get_nccl_backend(), get_rollout_class('hf').__name__,\n"
        "      get_rollout_replica_class('hf').__name__, f.CPUOffloadPolicy().pin_memory,\n"
        "      hasattr(d.initialize_global_process_group_ray, '__wrapped__'))\n"
    )
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "fvqa.train.verl_ext,fvqa.train.cpu.enable", "VERL_PLATFORM": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["cpu", "gloo", "HFServerAdapter", "HFReplica", "False", "True"]


def test_another_verl_version_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import verl

    from fvqa.train.checks import check_cpu_backend
    from fvqa.train.cpu import UnsupportedVerlError, check_verl_version

    assert check_cpu_backend().ok
    monkeypatch.setattr(verl, "__version__", "0.10.0")
    with pytest.raises(UnsupportedVerlError, match=r"checked against verl==0\.9\.1, found 0\.10\.0.*re-check"):
        check_verl_version()
    # The launcher's pre-flight check says the same before any Ray process starts.
    check = check_cpu_backend()
    assert not check.ok and check.required and "install verl==0.9.1" in check.detail


def test_gloo_process_group_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import verl.utils.distributed as dist

    from fvqa.train.cpu.patches import _gloo_on_cpu

    seen: list[str | None] = []
    patched = _gloo_on_cpu(lambda timeout_second=None, backend=None: seen.append(backend))
    monkeypatch.setattr("verl.utils.device.get_device_name", lambda: "cpu")
    patched()
    patched(backend="cpu:gloo")  # an explicit backend (veRL's checkpoint engine) is left alone
    assert seen == ["gloo", "cpu:gloo"]
    assert dist.initialize_global_process_group_ray is not patched


def _image(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (96, 64), color)


def _prompt(processor: Any, with_image: bool) -> list[int]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "What is this?"}]
    if with_image:
        content.insert(0, {"type": "image"})
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    images = [_image((200, 40, 40))] if with_image else None
    return processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()


def test_generate_answers_like_a_vllm_server(server: Any) -> None:
    prompt = _prompt(server.processor, with_image=True)
    asyncio.run(server.set_global_steps(7))
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 12, "logprobs": True}
    out = asyncio.run(server.generate(prompt, params, "req-1", image_data=[_image((200, 40, 40))]))
    assert 0 < len(out.token_ids) <= 12 and len(out.log_probs) == len(out.token_ids)
    assert all(lp <= 0 for lp in out.log_probs)
    assert out.extra_fields == {"global_steps": 7} and out.stop_reason == "completed"
    # The policy never emits vision markers (veRL's M-RoPE indexing would fail the trajectory).
    for _ in range(5):
        more = asyncio.run(server.generate(prompt, {**params, "max_tokens": 40}, "req-2",
                                           image_data=[_image((200, 40, 40))]))
        assert not set(more.token_ids) & set(server.suppress)
    assert len(server.suppress) == 4
    # Greedy with the reported log-probs equal to the model's own distribution.
    greedy = asyncio.run(server.generate(prompt, {"temperature": 0, "max_tokens": 4}, "req-3",
                                         image_data=[_image((200, 40, 40))]))
    with torch.no_grad():
        vision = server.processor.image_processor(images=[_image((200, 40, 40))], return_tensors="pt")
        ids = torch.tensor([prompt + greedy.token_ids])
        logits = server.model(input_ids=ids, attention_mask=torch.ones_like(ids), **vision).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, torch.tensor(greedy.token_ids)[:, None])
    assert greedy.log_probs == pytest.approx(expected[:, 0].tolist(), abs=1e-4)


def test_generate_stops_right_after_a_search_tag(server: Any) -> None:
    """vLLM's `stop` + `include_stop_str_in_output`: the tag ends the turn and stays in it."""
    prompt = _prompt(server.processor, with_image=False)
    tok = server.processor.tokenizer
    seen = 0
    for seed in range(30):
        torch.manual_seed(seed)
        out = asyncio.run(server.generate(prompt, {"temperature": 1.5, "max_tokens": 60, "stop": ["e"]}, "r"))
        if "e" in tok.decode(out.token_ids):
            seen += 1
            # The turn ends with the token that completes the stop string: none before it has one.
            assert "e" not in tok.decode(out.token_ids[:-1]) and "e" in tok.decode(out.token_ids[-1:])
    assert seen > 0


def test_weight_sync_is_all_or_nothing(server: Any) -> None:
    state = {k: v.clone() for k, v in server.model.state_dict().items()}
    bumped = {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}
    sync = server.load_weights(bumped, global_steps=3)
    assert sync.n_tensors == len(state) and server.global_steps == 3
    assert sync.param_abs_sum != pytest.approx(sum(float(v.double().abs().sum()) for v in state.values()))
    # Trainer-side names without transformers 5's `language_model` level land in the same tensors.
    old_names = {k.replace("model.language_model.", "model.", 1): v for k, v in state.items()}
    assert server.load_weights(old_names, global_steps=4).renamed
    for k, v in server.model.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(RuntimeError, match=r"1 unknown tensor name\(s\) \['nope.weight'\]"):
        server.load_weights({**state, "nope.weight": torch.zeros(1)}, global_steps=5)
    first = next(iter(state))
    with pytest.raises(RuntimeError, match="1 shape mismatch.*nothing was copied"):
        server.load_weights({first: torch.zeros(3, 3), **{k: v + 1 for k, v in list(state.items())[1:]
                                                           if v.is_floating_point()}}, global_steps=5)
    assert server.global_steps == 4  # a failed sync does not claim the new step, nor change a weight
    for k, v in server.model.state_dict().items():
        assert torch.equal(v, state[k])
