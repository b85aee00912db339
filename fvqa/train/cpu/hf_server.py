"""A token-in/token-out generation server on ``transformers.generate``: veRL's rollout engine on CPU.

veRL's agent loops talk to a Ray actor with vLLM-server's RPC shape (``generate(prompt_ids,
sampling_params, image_data, ...) -> TokenOutput`` plus sleep/wake/kv-cache controls). vLLM,
SGLang and TensorRT-LLM need GPUs; this server answers the same calls with the Hugging Face model,
one request at a time, so the stock trainer (agent loop, reward loop, GRPO, FSDP update, weight
sync) runs end to end on a laptop. It reports the weight version (``global_steps``) with every
output, as vLLM does, because the v1 trainer's metrics read it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Config fields naming the vision marker tokens the policy is not allowed to generate.
_VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass
class WeightSync:
    """What one weight update did: how many tensors were copied, and a checksum to see them move."""

    global_steps: int | None
    n_tensors: int
    param_abs_sum: float
    renamed: dict[str, str] = field(default_factory=dict)


def _target_name(name: str, params: dict[str, torch.Tensor]) -> str | None:
    """The generation model's parameter for a trainer tensor name.

    FSDP hands out the names of the model it wraps; transformers 5 nests the language model under
    ``model.language_model`` while older checkpoints (and some wrappers) name it ``model.``.
    """
    if name in params:
        return name
    for old, new in (("model.", "model.language_model."), ("language_model.model.", "model.language_model."),
                     ("visual.", "model.visual."), ("language_model.lm_head.", "lm_head.")):
        if name.startswith(old) and (cand := new + name[len(old):]) in params:
            return cand
    return None


class HFGenerationServer:
    """One replica's generation server (a Ray actor): the policy's current weights, sampled with HF."""

    def __init__(self, model_path: str, replica_rank: int = 0, num_threads: int | None = None) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if num_threads:
            torch.set_num_threads(num_threads)
        self.replica_rank = replica_rank
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()
        # The policy must not emit vision markers itself: veRL's M-RoPE indexing expects one image per
        # <|vision_start|> and fails the whole trajectory otherwise (vLLM runs a trained model,
        # which never does; a random or barely primed one does).
        self.suppress = sorted({int(v) for f in _VISION_TOKEN_FIELDS if (v := getattr(self.model.config, f, None))
                                is not None})
        self._lock = asyncio.Lock()
        self.global_steps: int | None = None
        self.syncs: list[WeightSync] = []
        self.n_requests = 0
        # Since the last weight sync: generated tokens and seconds inside transformers.generate - the
        # anchor for what the rest of the rollout path (agent loop, tools, Ray RPC) costs on top.
        self.window = {"requests": 0, "tokens": 0, "generate_s": 0.0}

    def ready(self) -> bool:
        return True

    def load_weights(self, named: dict[str, torch.Tensor], global_steps: int | None = None) -> WeightSync:
        """Copy the trainer's full tensors into the model; every tensor must land (no silent partial sync)."""
        params = dict(self.model.state_dict())
        targets, unknown, mismatched, renamed = {}, [], [], {}
        for name, tensor in named.items():
            target = _target_name(name, params)
            if target is None:
                unknown.append(name)
            elif tuple(params[target].shape) != tuple(tensor.shape):
                mismatched.append(f"{name} {tuple(tensor.shape)} vs {tuple(params[target].shape)}")
            else:
                targets[name] = target
                if target != name:
                    renamed[name] = target
        if unknown or mismatched:
            raise RuntimeError(
                f"weight sync into the hf rollout server failed: {len(unknown)} unknown tensor name(s) "
                f"{unknown[:3]}, {len(mismatched)} shape mismatch(es) {mismatched[:3]}; nothing was copied"
            )
        with torch.no_grad():
            for name, target in targets.items():
                params[target].copy_(named[name].to(params[target].dtype))
        self.global_steps = global_steps
        checksum = float(sum(p.detach().double().abs().sum() for p in self.model.parameters()))
        sync = WeightSync(global_steps, len(named), checksum, renamed)
        self.syncs.append(sync)
        window = self.window
        print(f"[fvqa hf-rollout] weights synced: {len(named)} tensors, step {global_steps}, "
              f"param_abs_sum {checksum:.4f}; served since the last sync: {window['requests']} requests, "
              f"{window['tokens']} tokens, {window['generate_s']:.3f} s in generate", flush=True)
        self.window = {"requests": 0, "tokens": 0, "generate_s": 0.0}
        return sync

    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str,
                       image_data: list[Any] | None = None, video_data: list[Any] | None = None,
                       **kwargs: Any) -> Any:
        """vLLM-server's ``generate``: new token ids, their log-probs, and the weight version.

        Honoured sampling parameters (vLLM names): temperature, top_p, top_k, max_tokens,
        repetition_penalty, stop (the stop string stays in the output, as with
        ``include_stop_str_in_output``). Others do not change a CPU check run and are ignored.
        """
        if video_data:
            raise ValueError("the hf rollout server does not take video input")
        async with self._lock:  # one request at a time: generate is not re-entrant and 2 cores are busy
            return await asyncio.to_thread(self._generate, list(prompt_ids), dict(sampling_params), image_data)

    def _generate(self, prompt_ids: list[int], sp: dict[str, Any], images: list[Any] | None) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        self.n_requests += 1
        input_ids = torch.tensor([prompt_ids])
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if images:
            vision = self.processor.image_processor(images=images, return_tensors="pt")
            inputs.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
        temperature = float(sp.get("temperature") or 0.0)
        sample = temperature > 0
        top_k = int(sp.get("top_k") or -1)
        gen: dict[str, Any] = dict(
            max_new_tokens=int(sp.get("max_tokens") or sp.get("max_new_tokens") or 256),
            do_sample=sample,
            return_dict_in_generate=True,
            output_logits=True,
            repetition_penalty=float(sp.get("repetition_penalty") or 1.0),
            suppress_tokens=self.suppress or None,
        )
        if sample:
            gen.update(temperature=temperature, top_p=float(sp.get("top_p") or 1.0), top_k=top_k if top_k > 0 else 0)
        if sp.get("stop"):
            gen.update(stop_strings=list(sp["stop"]), tokenizer=self.tokenizer)
        started = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**inputs, **gen)
        new = out.sequences[0, len(prompt_ids):].tolist()
        self.window["requests"] += 1
        self.window["tokens"] += len(new)
        self.window["generate_s"] += time.perf_counter() - started
        # Log-probs of the sampled tokens under the model's own distribution at this temperature
        # (what the actor recomputes), not the truncated sampling distribution.
        logits = torch.stack(out.logits, dim=1)[0].float()[: len(new)]
        if sample:
            logits = logits / temperature
        log_probs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(new)[:, None])[:, 0].tolist()
        return TokenOutput(token_ids=new, log_probs=log_probs, stop_reason="completed",
                           extra_fields={"global_steps": self.global_steps})

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    def stats(self) -> dict[str, Any]:
        """Requests served and weight syncs (steps and checksums), for tests and the bench."""
        return {"n_requests": self.n_requests, "window": dict(self.window),
                "syncs": [(s.global_steps, s.n_tensors, s.param_abs_sum) for s in self.syncs]}

    # Memory controls of a GPU engine: weights and cache stay where they are on CPU.
    async def wake_up(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def sleep(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def clear_kv_cache(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def release_kv_cache(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def resume_kv_cache(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def abort_all_requests(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}

    async def resume_generation(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None
