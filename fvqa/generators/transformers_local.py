"""Generator over a local vision-language model with Hugging Face transformers (CPU or GPU).

One request at a time: batching multi-image chats with Qwen's 3-D rope positions needs padding care
that the vLLM backend already does well; this backend is for small probes, debugging and tests.
Sampling is reproducible per request (`Sampling.seed`) without touching the global torch RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fvqa.errors import ConfigError
from fvqa.generators.base import Generation, Message, Request, cut_at_stop
from fvqa.protocol.images import to_pil


def processor_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Neutral messages -> the processor's chat format (images as PIL)."""
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            parts = [{"type": "image", "image": to_pil(p["image"])} if p.get("type") == "image"
                     else {"type": "text", "text": p["text"]} for p in content]
            out.append({"role": msg["role"], "content": parts})
        else:
            out.append({"role": msg["role"], "content": [{"type": "text", "text": content or ""}]})
    return out


class TransformersGenerator:
    """`AutoModelForImageTextToText` + `AutoProcessor` from a local folder (or the HF cache)."""

    def __init__(self, model_path: Path | str, *, device: str = "cpu", dtype: str = "auto",
                 generate_kwargs: dict[str, Any] | None = None) -> None:
        try:
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as exc:  # pragma: no cover - transformers is a core dependency
            raise ConfigError(f"the transformers backend needs torch and transformers: {exc}") from exc
        self._torch = torch
        try:
            self.processor = AutoProcessor.from_pretrained(str(model_path))
            self.model = AutoModelForImageTextToText.from_pretrained(str(model_path), dtype=dtype).to(device).eval()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load model {model_path}: {str(exc).splitlines()[0]}") from exc
        self.device = device
        self.generate_kwargs = dict(generate_kwargs or {})
        self.name = f"transformers:{Path(str(model_path)).name}"

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        out = []
        for req in requests:
            try:
                out.append(self._one(req))
            except Exception as exc:  # noqa: BLE001 - one bad request (image, OOM) must not end the batch
                out.append(Generation(error=f"{type(exc).__name__}: {exc}"))
        return out

    def _one(self, req: Request) -> Generation:
        torch, s = self._torch, req.sampling
        inputs = self.processor.apply_chat_template(
            processor_messages(req.messages), add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt").to(self.device)
        n_prompt = int(inputs["input_ids"].shape[1])
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_tokens, **self.generate_kwargs}
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
        else:
            kwargs.update(do_sample=False)
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.processor.tokenizer)
        with torch.random.fork_rng(devices=[] if self.device == "cpu" else None), torch.no_grad():
            if s.seed is not None:
                torch.manual_seed(s.seed)
            seq = self.model.generate(**inputs, **kwargs)
        new = seq[0, n_prompt:]
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        text = cut_at_stop(text, s.stop) if s.stop else text
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        if len(new) and int(new[-1]) in eos_ids or any(text.endswith(x) for x in s.stop):
            finish = "stop"
        else:
            finish = "length" if len(new) >= s.max_tokens else "stop"
        return Generation(text=text, prompt_tokens=n_prompt, completion_tokens=int(len(new)), finish_reason=finish)
