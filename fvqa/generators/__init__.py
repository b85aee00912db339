"""Generator backends for the search agent: OpenAI-compatible endpoint, transformers, vLLM offline.

`make_generator` builds one from the probe config; heavy imports happen only for the chosen backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fvqa.errors import ConfigError
from fvqa.generators.base import Generation, Generator, Request, Sampling
from fvqa.protocol import STOP_STRINGS

__all__ = ["STOP_STRINGS", "Generation", "Generator", "Request", "Sampling", "make_generator"]


def make_generator(backend: str, *, llm: Any = None, model_path: Path | str | None = None, device: str = "cpu",
                   cache_dir: Path | str | None = None, stage: str = "probe", **kwargs: Any) -> Generator:
    """A generator for `backend` (openai | transformers | vllm); a clear ConfigError if misconfigured."""
    if backend == "openai":
        if llm is None:
            raise ConfigError("probe.backend=openai needs a probe.llm section (endpoints, model)")
        if cache_dir is None:
            raise ConfigError("the openai generator needs a cache directory")
        from fvqa.generators.openai_chat import OpenAIChatGenerator

        return OpenAIChatGenerator(llm, cache_dir, stage=stage)
    if backend in ("transformers", "vllm") and model_path is None:
        raise ConfigError(f"probe.backend={backend} needs probe.model_path (a local model folder or hub id)")
    if backend == "transformers":
        from fvqa.generators.transformers_local import TransformersGenerator

        return TransformersGenerator(model_path, device=device, **kwargs)
    if backend == "vllm":
        from fvqa.generators.vllm_offline import VLLMGenerator

        return VLLMGenerator(model_path, **kwargs)
    raise ConfigError(f"unknown generator backend {backend!r} (use openai, transformers or vllm)")
