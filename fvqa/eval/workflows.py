"""The three evaluation workflows: direct answer, fixed RAG, on-demand search.

* ``direct`` (paper App. D.4): one turn, no tools (`fvqa.agent`, mode ``direct``).
* ``on_demand``: the search agent (`fvqa.agent`, mode ``search``) up to the configured limits.
* ``rag`` (paper App. D.5): a fixed two-search pipeline. Image search always runs first; round 1
  shows its results and asks the model for a text query; the text search always runs; round 2
  shows its results and asks for the answer. If the model writes no usable query, the question
  itself is searched (recorded in ``stop_detail``), so every item makes exactly two searches and
  the workflow's search ratio is 100% by construction, as in the paper's Table 1.

Answers are read in one of two formats: ``tags`` (the ``<answer>`` span, fvqa's and upstream's
protocol) or ``plain`` (the paper's baselines: the whole final reply is the answer, an ``<answer>``
span wins if written anyway; the RAG query is the round-1 reply's first line). On-demand search is
always tagged: its tools are called with the tags.

Every workflow returns one `fvqa.protocol.Trajectory` per item, so predictions, search counts and
transcripts are stored the same way whatever produced them; searches and the turns that show
their results come from the episode core (`fvqa.protocol.episode`), as in the agent and training.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fvqa.agent import Job, run_many
from fvqa.generators.base import Generation, Generator, Message, Request, Sampling, TurnwiseGenerator
from fvqa.protocol import (
    IMAGE_PLACEHOLDER,
    Limits,
    Prompts,
    extract_answer,
    is_search_error,
    parse_turn,
    rag_query_user_text,
    tool_response_text,
)
from fvqa.protocol import episode as ep
from fvqa.protocol.episode import AgentItem, SearchTools, Trajectory, TurnRecord, sha256

RAG_SEARCHES = 2
PLAIN_QUERY_MAX_CHARS = 300
PLAIN_ANSWER = "plain answer (the reply is the answer)"


def plain_answer(text: str) -> str | None:
    """The answer of an untagged reply: its ``<answer>`` span if it wrote one, else the whole reply."""
    tagged = extract_answer(text)
    if tagged is not None:
        return tagged
    return text.strip() or None


def plain_query(text: str) -> str | None:
    """A RAG query from an untagged round-1 reply: a ``<text_search>`` call if any, else its first line."""
    turn = parse_turn(text)
    if turn.kind == "text_search" and turn.query:
        return turn.query
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line[:PLAIN_QUERY_MAX_CHARS] or None


def max_search_steps(workflow: str, limits: Limits) -> int:
    """The denominator of the paper's search ratio for one item of this workflow.

    On-demand: the calls the limits allow before the last round, which must answer
    (defaults: min(3 - 1, 1 + 2) = 2). RAG: its two fixed searches. Direct: none.
    """
    if workflow == "direct":
        return 0
    if workflow == "rag":
        return RAG_SEARCHES
    return min(limits.max_rounds - 1, limits.max_image_search + limits.max_text_search)


class _Rag:
    """One RAG item's state: messages, trajectory, and its two searches."""

    def __init__(self, item: AgentItem, prompts: Prompts, limits: Limits, generator_name: str,
                 sampling: Sampling, plain: bool = False) -> None:
        self.item, self.prompts, self.limits, self.sampling, self.plain = item, prompts, limits, sampling, plain
        self.traj = Trajectory(item.item_id, "rag", item.question, generator_name,
                               seed=sampling.seed, image_shas=[sha256(item.image)])
        self.messages: list[Message] = []

    def _add(self, msg: Message) -> None:
        self.messages.append(msg)
        self.traj.record(msg)

    def image_search(self, tools: SearchTools) -> None:
        out = ep.image_search(tools, self.item.image, self.limits, rnd=1, image_url=self.item.image_url,
                              data_id=self.item.data_id)
        self.traj.image_shas.extend(sha256(b) for b in out.image_data)
        self.traj.tool_calls.append(out.call)
        user_text = rag_query_user_text(self.prompts.rag_query, self.item.question, out.call.result_text)
        head, tail = user_text.split(IMAGE_PLACEHOLDER, 1)
        parts: list[dict[str, Any]] = [{"type": "text", "text": head}] if head else []
        parts.append({"type": "image", "image": self.item.image})
        parts.extend(ep.user_message(tail, out.image_data)["content"])
        self._add({"role": "user", "content": parts})

    def take_turn(self, gen: Generation, rnd: int) -> bool:
        """Record one generated turn; False if generation failed (the item stops with the error)."""
        if gen.error is not None:
            self.traj.stop_reason, self.traj.stop_detail = "error", gen.error
            return False
        turn = parse_turn(gen.text)
        self.traj.turns.append(TurnRecord(rnd, gen.text, turn.kind, gen.prompt_tokens, gen.completion_tokens,
                                          gen.finish_reason, turn.problem))
        self._add({"role": "assistant", "content": gen.text})
        return True

    def text_search(self, tools: SearchTools) -> None:
        turn = parse_turn(self.traj.turns[-1].text)
        if self.plain:
            query = plain_query(self.traj.turns[-1].text)
        else:
            query = turn.query if turn.kind == "text_search" and turn.query else None
        if query is None:
            query = self.item.question
            self.traj.stop_detail = f"no usable query in round 1 ({turn.problem or turn.kind}): searched the question"
        out = ep.text_search(tools, query, self.item.question, self.limits, rnd=2)
        self.traj.tool_calls.append(out.call)
        text = out.call.result_text
        if is_search_error(text):  # upstream passes errors bare; RAG still needs the answer instruction
            user_text = f"{text}\nOriginal user's question: {self.item.question.strip()}\n{self.prompts.rag_answer}"
        else:
            user_text = tool_response_text(text, self.item.question, self.prompts.rag_answer)
        self._add({"role": "user", "content": [{"type": "text", "text": user_text}]})

    def finish(self) -> None:
        last = self.traj.turns[-1].text
        answer = plain_answer(last) if self.plain else extract_answer(last)
        self.traj.answer = answer
        if answer is not None:
            self.traj.stop_reason = "answer"
        else:
            self.traj.stop_reason = "invalid"
            problem = parse_turn(last).problem or "no <answer> in the final turn"
            self.traj.stop_detail = "; ".join(x for x in (self.traj.stop_detail, problem) if x)


def run_rag(items: Sequence[AgentItem], generator: Generator, tools: SearchTools, prompts: Prompts,
            sampling: Sampling, limits: Limits | None = None, *, tool_workers: int = 8,
            plain: bool = False) -> list[Trajectory]:
    """The fixed RAG workflow for a batch of items (two batched generator calls in all). Only the
    limits' result view (top-k, thumbnail bound) applies: the script always makes its two searches."""
    limits = limits or Limits()
    states = [_Rag(it, prompts, limits, generator.name, sampling, plain) for it in items]
    if isinstance(generator, TurnwiseGenerator):
        asyncio.run(_rag_turnwise(states, generator, tools, sampling, tool_workers))
        return [s.traj for s in states]
    with ThreadPoolExecutor(max_workers=max(1, tool_workers)) as pool:
        list(pool.map(lambda s: s.image_search(tools), states))
        gens = generator.generate([Request(list(s.messages), sampling) for s in states])
        alive = [s for s, g in zip(states, gens, strict=True) if s.take_turn(g, 1)]
        list(pool.map(lambda s: s.text_search(tools), alive))
        gens = generator.generate([Request(list(s.messages), sampling) for s in alive])
        for s, g in zip(alive, gens, strict=True):
            if s.take_turn(g, 2):
                s.finish()
    return [s.traj for s in states]


async def _rag_turnwise(states: list[_Rag], generator: TurnwiseGenerator, tools: SearchTools, sampling: Sampling,
                        tool_workers: int) -> None:
    """The same script per item, each item on its own (HTTP backends: a slow call holds one item)."""
    searches = asyncio.Semaphore(max(1, tool_workers))

    async def drive(s: _Rag) -> None:
        async with searches:
            await asyncio.to_thread(s.image_search, tools)
        if not s.take_turn(await generator.agenerate_one(Request(list(s.messages), sampling)), 1):
            return
        async with searches:
            await asyncio.to_thread(s.text_search, tools)
        if s.take_turn(await generator.agenerate_one(Request(list(s.messages), sampling)), 2):
            s.finish()

    async with generator.session():
        await asyncio.gather(*(drive(s) for s in states))


def _read_plain(trajs: list[Trajectory]) -> list[Trajectory]:
    """Direct answers in the plain format: a finished one-turn reply is the answer, tags or not."""
    for t in trajs:
        if t.stop_reason != "error" and t.turns:
            answer = plain_answer(t.turns[-1].text)
            if answer is not None:
                t.answer, t.stop_reason, t.stop_detail = answer, "answer", PLAIN_ANSWER
    return trajs


def run_workflow(workflow: str, items: Sequence[AgentItem], generator: Generator, tools: SearchTools | None,
                 prompts: Prompts, limits: Limits, sampling: Sampling,
                 on_turn: Callable[[int], None] | None = None, answer_format: str = "tags") -> list[Trajectory]:
    """Run one workflow over a batch of items; trajectories in item order."""
    if answer_format not in ("tags", "plain"):
        raise ValueError(f"unknown answer format {answer_format!r} (tags, plain)")
    plain = answer_format == "plain"
    if workflow == "direct":
        trajs = run_many([Job(it, "direct", sampling) for it in items], generator, None, limits, prompts,
                         on_turn=on_turn)
        return _read_plain(trajs) if plain else trajs
    if tools is None:
        raise ValueError(f"workflow {workflow} needs search tools")
    if workflow == "rag":
        return run_rag(items, generator, tools, prompts, sampling, limits, plain=plain)
    if workflow == "on_demand":
        return run_many([Job(it, "search", sampling) for it in items], generator, tools, limits, prompts,
                        on_turn=on_turn)
    raise ValueError(f"unknown workflow {workflow!r} (direct, rag, on_demand)")
