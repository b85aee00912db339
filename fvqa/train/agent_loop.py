"""The MMSearch-R1 rollout as a veRL agent loop (``fvqa_search_agent``).

Why our own ``AgentLoopBase`` subclass rather than veRL's ``ToolAgentLoop`` with a custom parser:
the upstream protocol does not fit the tool-message shape that loop is built around.

* Tool results come back as a *user* turn (``Searched results: <information>...</information>``,
  the original question and a follow-up prompt), not as ``role: tool`` messages; released
  checkpoints were trained on exactly this text.
* Image-search results interleave up to five thumbnails with their titles at fixed places in the
  text; ``ToolAgentLoop`` puts all images first and truncates the text at
  ``max_tool_response_length`` characters (256 by default), which would cut results mid-way and
  could separate a placeholder from its image.
* The limits are protocol rules (image search once and only in round 1, text search twice, three
  rounds, a call in the last round ends the trajectory), decided by ``fvqa.protocol.next_action`` -
  the same function the probe and eval workflows use - not by turn counters.
* The reward needs the exact assistant turns, which we hand over in ``extra_fields``.

Tokens are built with veRL's Continuous Token builder (the same code path ``ToolAgentLoop`` uses),
so the prompt the rollout engine sees is exactly what the trainer re-tokenises: model tokens get
mask 1; tool turns, the ``<|im_end|>`` that closes a turn stopped at a search tag, and boundary
tokens get mask 0.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any
from uuid import uuid4

from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
from verl.utils.profiler import simple_timer

from fvqa.errors import ConfigDeprecation, ConfigError
from fvqa.formats.verl import AGENT_NAME
from fvqa.protocol import (
    IMAGE_SEARCH_TAG,
    STOP_STRINGS,
    FormatRule,
    Limits,
    Prompts,
    SearchTools,
    load_prompts,
    next_action,
    parse_turn,
)
from fvqa.protocol import episode as ep
from fvqa.protocol.images import image_bytes
from fvqa.train.tools import search_client_for

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))


class LoopSettings(BaseModel):
    """The ``fvqa:`` section of the training config (veRL ignores keys it does not know)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # null: `fvqa train run` starts a search service over `search_config` on a free loopback port
    # and fills this in for the run.
    search_url: str | None = "http://127.0.0.1:8765"
    search_config: str | None = None
    search_timeout_s: float = Field(120.0, gt=0)
    # Rollout limits and what a search shows (top-k, thumbnail bound): the same model as the probe's
    # and eval's, so training shows the model what the probe that labelled the data showed it.
    limits: Limits = Field(default_factory=Limits)
    # Which trajectory shapes earn the format reward; the reward's kwargs take it (and the limits)
    # from here, so rollout and reward cannot disagree (the dry run checks it).
    format_rule: FormatRule = "limits"
    prompts: str | list[str] | None = None
    max_tokens_per_turn: int = Field(2048, ge=1)
    close_turn_token: str | None = "<|im_end|>"
    # Extra sampling parameters that make the engine stop after a search tag (vLLM names).
    stop_sampling_params: dict[str, Any] = Field(
        default_factory=lambda: {"stop": list(STOP_STRINGS), "include_stop_str_in_output": True}
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_to_limits(cls, data: Any) -> Any:
        """Older configs set the result view here: read it as ``fvqa.limits.*``."""
        moved = {old: new for old, new in _MOVED_TO_LIMITS.items() if isinstance(data, dict) and old in data}
        if not moved:
            return data
        data, limits = dict(data), dict(data.get("limits") or {})
        for old, new in moved.items():
            if new in limits:
                raise ValueError(f"set it once: fvqa.limits.{new} or the deprecated fvqa.{old}, not both")
            limits[new] = data.pop(old)
        warnings.warn(f"fvqa.{', fvqa.'.join(moved)}: deprecated, write them under fvqa.limits "
                      f"({', '.join(moved.values())})", ConfigDeprecation, stacklevel=2)
        data["limits"] = limits
        return data

    @classmethod
    def from_trainer_config(cls, config: DictConfig | dict[str, Any] | None) -> LoopSettings:
        """Validate ``config.fvqa``; a typo is an error naming the key, not a silent default."""
        section = (config or {}).get("fvqa") if config is not None else None
        if section is None:
            return cls()
        data = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid `fvqa:` section in the training config: {exc}") from exc


_MOVED_TO_LIMITS = {"image_search_topk": "image_topk", "text_search_topk": "text_topk",
                    "thumbnail_max_pixels": "thumbnail_max_pixels"}


def _question_from(kwargs: dict[str, Any]) -> str:
    """The item's question: ``extra_info.question`` (written by prepare), else the first user text."""
    extra = kwargs.get("extra_info") or {}
    if extra.get("question"):
        return str(extra["question"])
    for msg in kwargs.get("raw_prompt") or []:
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            return content
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _user_image(messages: list[dict[str, Any]], images: list[Any]) -> bytes | None:
    """The user's image as bytes for image search: the stored bytes when present (stable cache key)."""
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    try:
                        return image_bytes(part)
                    except TypeError:
                        break
    return image_bytes(images[0]) if images else None


_DECODE_LOCK = threading.Lock()


def _decode_shared_images(messages: list[dict[str, Any]]) -> None:
    """Decode the prompt's PIL images once, before veRL preprocesses them in executor threads.

    veRL gives the n rollouts of a prompt the same lazily decoded PIL images and runs
    ``process_multi_modal_info`` for each in a thread pool; PIL's lazy PNG decode is not
    thread-safe (an ``AssertionError`` in ``PngImagePlugin`` fails the trajectory now and then).
    """
    for msg in messages:
        content = msg.get("content")
        for part in content if isinstance(content, list) else ():
            image = part.get("image") if isinstance(part, dict) else None
            if isinstance(image, Image.Image):
                with _DECODE_LOCK:
                    image.load()


def _weight_versions(extra_fields: dict[str, Any] | None) -> list[int]:
    """Weight versions one generate call reports (veRL's client sets min/max; servers set global_steps)."""
    extra = extra_fields or {}
    keys = ("min_global_steps", "max_global_steps") if "min_global_steps" in extra else ("global_steps",)
    return [int(extra[k]) for k in keys if extra.get(k) is not None]


@functools.lru_cache(maxsize=8)
def _prompts(paths: tuple[str, ...]) -> Prompts:
    """Prompts per process: veRL builds a new loop object for every sample, the files do not change."""
    return load_prompts([Path(p) for p in paths] if paths else None)


@register(AGENT_NAME)
class FvqaSearchAgentLoop(AgentLoopBase):
    """One multi-turn search trajectory: generate, run the called tool, feed results back, repeat."""

    def __init__(
        self, *args: Any, tools: Any = None, search_client: SearchTools | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        del tools  # veRL passes its own tool list to every loop; ours are the search service's.
        self.settings = LoopSettings.from_trainer_config(self.config)
        prompts = self.settings.prompts
        self.prompts = _prompts(tuple([prompts] if isinstance(prompts, str) else prompts or ()))
        if search_client is None and not self.settings.search_url:
            raise ConfigError("fvqa.search_url is not set: start `fvqa search serve` or launch with `fvqa train run`")
        self.search = search_client or search_client_for(str(self.settings.search_url), self.settings.search_timeout_s)
        self.response_length = int(self.rollout_config.response_length)
        patch = getattr(getattr(self.processor, "image_processor", None), "patch_size", None)
        if patch is not None and int(patch) != self.settings.limits.thumbnail_patch_size:
            raise ConfigError(
                f"fvqa.limits.thumbnail_patch_size is {self.settings.limits.thumbnail_patch_size} but the model's "
                f"processor uses patch size {patch}: set it to {patch} (and the probe's and eval's limits too) so "
                "every driver shows the same thumbnails")
        close = self.settings.close_turn_token
        self.close_ids = self.tokenizer.encode(close, add_special_tokens=False) if close else []

    async def _tool(self, action_kind: str, query: str | None, user_image: bytes | None, question: str,
                    extra: dict[str, Any], rnd: int) -> ep.SearchOutcome:
        limits, timeout = self.settings.limits, self.settings.search_timeout_s
        if action_kind == "image_search":
            if user_image is None:
                return ep.no_image_outcome(rnd)
            return await ep.aimage_search(self.search, user_image, limits, rnd=rnd, timeout_s=timeout,
                                          data_id=extra.get("data_id") or extra.get("item_id"))
        return await ep.atext_search(self.search, query or "", question, limits, rnd=rnd, timeout_s=timeout)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        """Roll out one trajectory; ``kwargs`` are the dataset row's fields (raw_prompt, extra_info...)."""
        messages: list[dict[str, Any]] = list(kwargs["raw_prompt"])
        extra = dict(kwargs.get("extra_info") or {})
        question = _question_from(kwargs)
        metrics: dict[str, Any] = {}
        _decode_shared_images(messages)
        multi_modal = await self.process_multi_modal_info(messages)
        images: list[Any] = list(multi_modal.get("images") or [])
        self._assert_mm_supported(bool(images))
        user_image = _user_image(messages, images)

        prompt_ids = await self.ct_build_initial_tokens(messages, images=images or None)
        runtime_ids = list(prompt_ids)
        mask: list[int] = []
        logprobs: list[float] | None = None
        turns: list[str] = []
        calls: list[dict[str, Any]] = []
        n_tool_turns = 0
        stop_reason, stop_detail = "answer", ""
        request_id = uuid4().hex
        params = {**sampling_params, **self.settings.stop_sampling_params}
        versions: list[int] = []  # weight version (global step) of the policy behind each turn

        while True:
            budget = self.response_length - len(mask)
            if budget <= 0:
                stop_reason, stop_detail = "response_budget", "no response tokens left for another turn"
                break
            params["max_tokens"] = min(self.settings.max_tokens_per_turn, budget)
            with simple_timer("generate_sequences", metrics):
                out = await self.server_manager.generate(
                    request_id=request_id, prompt_ids=runtime_ids, sampling_params=params,
                    image_data=images or None,
                )
            versions.extend(_weight_versions(out.extra_fields))
            token_ids = list(out.token_ids)[:budget]
            new_logprobs = list(out.log_probs)[: len(token_ids)] if out.log_probs else None
            merged, mask, logprobs = await self.ct_merge_assistant_token(
                runtime_ids, token_ids, mask,
                logprobs if logprobs is not None else ([] if new_logprobs is not None and not mask else None),
                assistant_logprobs=new_logprobs,
            )
            runtime_ids = merged.token_ids
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            turns.append(text)
            action = next_action(turns, self.settings.limits)
            if action.kind == "stop":
                stop_reason, stop_detail = action.stop_reason or "answer", action.detail
                break

            with simple_timer("tool_calls", metrics):
                result = await self._tool(action.kind, action.query, user_image, question, extra, len(turns))
            call = result.call
            calls.append({"round": call.round, "kind": call.kind, "query": call.query, "ok": call.ok,
                          "n_hits": len(call.hits), "hits": call.hits, "error": call.error,
                          "seconds": round(call.seconds, 3)})
            user_text = ep.tool_turn_text(result, question, self.prompts)
            # text-only turns stay plain strings: a tokenizer's chat template (no processor) reads only those
            user_msg = ep.user_message(user_text, result.images) if result.images else {"role": "user",
                                                                                         "content": user_text}
            # A turn stopped at a search tag has no <|im_end|>: close it as the template would.
            closed_ids, closed_mask, closed_lp = runtime_ids, mask, logprobs
            if self.close_ids and runtime_ids[-len(self.close_ids):] != self.close_ids:
                closed_ids = runtime_ids + self.close_ids
                closed_mask = mask + [0] * len(self.close_ids)
                closed_lp = logprobs + [0.0] * len(self.close_ids) if logprobs is not None else None
            previous = [*messages, {"role": "assistant", "content": text}]
            merged, new_mask, new_lp = await self.ct_merge_context_msg(
                previous, [*previous, user_msg], closed_ids, closed_mask, closed_lp
            )
            if len(new_mask) >= self.response_length:
                stop_reason = "response_budget"
                stop_detail = f"{call.kind} result does not fit in rollout.response_length={self.response_length}"
                break
            runtime_ids, mask, logprobs, messages = merged.token_ids, new_mask, new_lp, [*previous, user_msg]
            n_tool_turns += 1
            images = images + result.images

        response_ids = runtime_ids[len(prompt_ids):]
        kinds = [parse_turn(t).kind for t in turns]
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response_ids[: self.response_length],
            response_mask=mask[: self.response_length],
            response_logprobs=logprobs[: self.response_length] if logprobs is not None else None,
            multi_modal_data={"images": images} if images else {},
            num_turns=1 + len(turns) + n_tool_turns,
            metrics=metrics,
            extra_fields={
                "assistant_turns": turns,
                "turn_kinds": kinds,
                "tool_calls": calls,
                "n_tool_errors": sum(not c["ok"] for c in calls),
                "stop_reason": stop_reason,
                "stop_detail": stop_detail,
                # veRL's v1 trainer reads the policy versions a trajectory was sampled with.
                "min_global_steps": min(versions) if versions else None,
                "max_global_steps": max(versions) if versions else None,
            },
        )


__all__ = ["AGENT_NAME", "IMAGE_SEARCH_TAG", "FvqaSearchAgentLoop", "LoopSettings"]
