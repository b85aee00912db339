"""The search agent's driver for the probe and the eval workflows (direct and on-demand).

A rollout follows the MMSearch-R1 protocol exactly as `fvqa.protocol` defines it: the opening
prompt with the user's image and question; after each assistant turn `protocol.next_action`
decides whether to run a tool or stop (answer, limit, unparseable turn); what follows a turn (the
search call, its record, the next user turn) is the episode core, `fvqa.protocol.episode`, shared
with the RAG script and the veRL loop. This module only drives a model:

* batched engines (transformers, vLLM offline) get every turn that is due in one batch, round by
  round, so they fill their batch;
* HTTP backends (`TurnwiseGenerator`) advance each rollout on its own in one event loop, bounded by
  the client's concurrency, so one slow call holds only its own rollout.

Every turn, tool call and result, every image (by sha256), the answer and the token counts are
recorded in a `Trajectory`, which serialises to JSON for `probe_rollouts`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from fvqa.generators.base import Generation, Generator, Message, Request, Sampling, TurnwiseGenerator
from fvqa.protocol import (
    IMAGE_PLACEHOLDER,
    Limits,
    Prompts,
    next_action,
    opening_user_text,
    parse_turn,
    to_content_parts,
)
from fvqa.protocol import episode as ep
from fvqa.protocol.episode import AgentItem, SearchTools, Trajectory, TurnRecord, sha256

Mode = Literal["search", "direct", "rag"]  # rag: the fixed two-search workflow (fvqa.eval)

__all__ = ["Job", "Mode", "Rollout", "run", "run_many"]

DIRECT_LIMITS = Limits(max_rounds=1, max_image_search=0, max_text_search=0)
"""Direct answering is one round with no tools: a search call there ends the rollout at the limit."""


class Rollout:
    """One rollout's state: the live messages (with image bytes) and its growing trajectory."""

    def __init__(self, item: AgentItem, mode: Mode, prompts: Prompts, limits: Limits, generator_name: str,
                 sampling: Sampling) -> None:
        self.item, self.mode, self.prompts, self.sampling = item, mode, prompts, sampling
        self.limits = limits if mode == "search" else DIRECT_LIMITS
        prompt = prompts.round_1 if mode == "search" else prompts.direct_answer
        text = opening_user_text(prompt, item.question)
        self.messages: list[Message] = [
            {"role": "user", "content": to_content_parts(text, [item.image], IMAGE_PLACEHOLDER)}]
        self.traj = Trajectory(item.item_id, mode, item.question, generator_name, seed=sampling.seed,
                               image_shas=[sha256(item.image)])
        self.traj.record(self.messages[0])
        self.done = False

    def request(self) -> Request:
        return Request(list(self.messages), self.sampling)

    def stop(self, reason: str, detail: str = "") -> None:
        self.traj.stop_reason, self.traj.stop_detail, self.done = reason, detail, True

    def step(self, gen: Generation, tools: SearchTools | None) -> None:
        """Take one generated assistant turn: record it, then answer, stop, or run the tool."""
        rnd = len(self.traj.turns) + 1
        if gen.error is not None:
            self.stop("error", gen.error)
            return
        turn = parse_turn(gen.text)
        self.traj.turns.append(TurnRecord(rnd, gen.text, turn.kind, gen.prompt_tokens, gen.completion_tokens,
                                          gen.finish_reason, turn.problem))
        msg: Message = {"role": "assistant", "content": gen.text}
        self.messages.append(msg)
        self.traj.record(msg)
        action = next_action([t.text for t in self.traj.turns], self.limits)
        if action.kind == "stop":
            if action.stop_reason == "answer":
                self.traj.answer = turn.answer
            self.stop(action.stop_reason or "invalid", action.detail)
            return
        if tools is None:
            self.stop("error", "a search was called but no search tools are configured")
            return
        if action.kind == "image_search":
            out = ep.image_search(tools, self.item.image, self.limits, rnd=rnd, image_url=self.item.image_url,
                                  data_id=self.item.data_id)
        else:
            out = ep.text_search(tools, action.query or "", self.item.question, self.limits, rnd=rnd)
        self.traj.tool_calls.append(out.call)
        self.traj.image_shas.extend(sha256(b) for b in out.image_data)
        msg = ep.user_message(ep.tool_turn_text(out, self.item.question, self.prompts), out.image_data)
        self.messages.append(msg)
        self.traj.record(msg)


@dataclass(frozen=True)
class Job:
    """One rollout to run: which item, with or without search, and its sampling (seed)."""

    item: AgentItem
    mode: Mode = "search"
    sampling: Sampling = field(default_factory=Sampling)


def _run_batched(rollouts: list[Rollout], generator: Generator, tools: SearchTools | None, tool_workers: int,
                 on_turn: Callable[[int], None] | None) -> None:
    """Round by round: one batched generator call per round, the round's searches on a thread pool."""
    with ThreadPoolExecutor(max_workers=max(1, tool_workers)) as pool:
        while True:
            active = [r for r in rollouts if not r.done]
            if not active:
                return
            gens = generator.generate([r.request() for r in active])
            if len(gens) != len(active):
                raise RuntimeError(
                    f"generator {generator.name} returned {len(gens)} turns for {len(active)} requests")
            list(pool.map(lambda rg: rg[0].step(rg[1], tools if rg[0].mode == "search" else None),
                          zip(active, gens, strict=True)))
            if on_turn is not None:
                on_turn(len(active))


async def _run_turnwise(rollouts: list[Rollout], generator: TurnwiseGenerator, tools: SearchTools | None,
                        tool_workers: int, on_turn: Callable[[int], None] | None) -> None:
    """Each rollout on its own: its next turn is requested as soon as its last search returns."""
    searches = asyncio.Semaphore(max(1, tool_workers))

    async def drive(r: Rollout) -> None:
        while not r.done:
            gen = await generator.agenerate_one(r.request())
            async with searches:  # the sync search facade runs in worker threads, at most tool_workers
                await asyncio.to_thread(r.step, gen, tools if r.mode == "search" else None)
            if on_turn is not None:
                on_turn(1)

    async with generator.session():
        await asyncio.gather(*(drive(r) for r in rollouts))


def run_many(jobs: Sequence[Job], generator: Generator, tools: SearchTools | None, limits: Limits,
             prompts: Prompts, *, tool_workers: int = 8,
             on_turn: Callable[[int], None] | None = None) -> list[Trajectory]:
    """Run rollouts together; trajectories in job order.

    Searches run on up to `tool_workers` threads (web searches are slow; each rollout only touches
    its own state, and the search facade is thread-safe). `on_turn(n)` is called as n turns finish.
    """
    rollouts = [Rollout(j.item, j.mode, prompts, limits, generator.name, j.sampling) for j in jobs]
    if isinstance(generator, TurnwiseGenerator):
        asyncio.run(_run_turnwise(rollouts, generator, tools, tool_workers, on_turn))
    else:
        _run_batched(rollouts, generator, tools, tool_workers, on_turn)
    return [r.traj for r in rollouts]


def run(item: AgentItem, generator: Generator, tools: SearchTools | None, limits: Limits, prompts: Prompts,
        *, mode: Mode = "search", sampling: Sampling | None = None) -> Trajectory:
    """One rollout of one item (see `run_many` to batch)."""
    return run_many([Job(item, mode, sampling or Sampling())], generator, tools, limits, prompts)[0]
