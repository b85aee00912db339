"""Generator over a vLLM offline engine (`vllm.LLM`) on a GPU box: the fastest way to probe many items.

The agent hands this backend every turn that is due in one batch; `LLM.chat` schedules them with
continuous batching. Images go in as data URLs (the format every vLLM version's chat parser
accepts). Generation stops after a search tag with the stop string kept
(`include_stop_str_in_output`), exactly as upstream's rollout does. vLLM is not a dependency of
fvqa (it pins its own torch); install it on the GPU machine: `pip install vllm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fvqa.errors import ConfigError
from fvqa.generators.base import Generation, Message, Request, Sampling, restore_stop
from fvqa.llm.images import to_data_url


def vllm_messages(messages: Sequence[Message], image_max_side: int = 1024) -> list[dict[str, Any]]:
    """Neutral messages -> OpenAI-style chat messages with `image_url` data URLs (vLLM's chat input)."""
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            parts = [{"type": "image_url", "image_url": {"url": to_data_url(p["image"], image_max_side)}}
                     if p.get("type") == "image" else {"type": "text", "text": p["text"]} for p in content]
            out.append({"role": msg["role"], "content": parts})
        else:
            out.append({"role": msg["role"], "content": content})
    return out


def sampling_kwargs(s: Sampling) -> dict[str, Any]:
    """`vllm.SamplingParams` keyword arguments for one request."""
    kw: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
                          "seed": s.seed}
    if s.stop:
        kw.update(stop=list(s.stop), include_stop_str_in_output=True)
    return kw


class VLLMGenerator:
    """`vllm.LLM(model_path)`; one `chat` call per batch of turns."""

    def __init__(self, model_path: Path | str, *, max_images_per_prompt: int = 8, max_model_len: int = 16384,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1, image_max_side: int = 1024,
                 engine_kwargs: dict[str, Any] | None = None) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ConfigError(
                "probe.backend=vllm needs vLLM on a GPU machine (`pip install vllm`); without a GPU use "
                "backend=transformers, or serve the model with `vllm serve` and use backend=openai"
            ) from exc
        self._vllm = vllm
        self.image_max_side = image_max_side
        self.llm = vllm.LLM(
            model=str(model_path), limit_mm_per_prompt={"image": max_images_per_prompt},
            max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size, **(engine_kwargs or {}))
        self.name = f"vllm:{Path(str(model_path)).name}"

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        if not requests:
            return []
        convs, params, bad = [], [], {}
        for i, req in enumerate(requests):
            try:
                convs.append(vllm_messages(req.messages, self.image_max_side))
                params.append(self._vllm.SamplingParams(**sampling_kwargs(req.sampling)))
            except Exception as exc:  # noqa: BLE001 - e.g. an undecodable image: fail this request only
                bad[i] = f"{type(exc).__name__}: {exc}"
        try:
            outputs = self.llm.chat(convs, sampling_params=params, use_tqdm=False) if convs else []
        except Exception as exc:  # noqa: BLE001 - engine errors end this batch's rollouts with the reason
            return [Generation(error=f"vLLM engine error: {type(exc).__name__}: {exc}") for _ in requests]
        results: list[Generation] = []
        it = iter(outputs)
        for i, req in enumerate(requests):
            if i in bad:
                results.append(Generation(error=bad[i]))
                continue
            out = next(it)
            comp = out.outputs[0]
            text = restore_stop(comp.text) if req.sampling.stop else comp.text
            results.append(Generation(text=text, prompt_tokens=len(out.prompt_token_ids or []),
                                      completion_tokens=len(comp.token_ids), finish_reason=comp.finish_reason))
        return results
