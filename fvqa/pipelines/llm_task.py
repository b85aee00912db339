"""An LLM task inside a build stage: rejects, stats, notes, progress and `--estimate` in one place.

The generate and tag stages only say which inputs to send and what row an output becomes;
`fvqa.llm.runner` does the requests, this module books the outcome on the stage's context.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from fvqa.llm.client import LLMConfigError
from fvqa.llm.config import LLMConfig
from fvqa.llm.ledger import CostEstimate
from fvqa.llm.runner import TaskRun, estimate, run_task
from fvqa.llm.task import LLMTask, Reject, Reply
from fvqa.pipelines.base import Estimate, StageContext

In = TypeVar("In")
Out = TypeVar("Out")


def run_stage_task(ctx: StageContext, task: LLMTask[In, Out], inputs: Mapping[str, In], llm: LLMConfig,
                   on_output: Callable[[str, Out, Reply], None], *, batch_wait_s: float | None = None,
                   not_done: str = "inputs not done") -> TaskRun:
    """Run `task` for a stage: rejects go to `rejects`, cost to the stats, retries into a note.

    `not_done` names what a transient failure leaves undone in the stage's note, e.g. "items not
    tagged"; those inputs are neither emitted nor rejected, so the next run retries them. An endpoint
    refusing the key or model (401/403/404) stops the stage with `LLMConfigError` after committing
    the outputs already made; nothing is rejected for it. A self-hosted endpoint without a price is
    billed $0, and the note says so. `stats.extra["repaired"]` counts the outputs whose first reply
    was invalid, by how it became valid: "local" (mended by json_repair, free) or "reask" (one paid
    repair request)."""
    if task.name != ctx.stage.name:
        raise ValueError(f"task {task.name!r} would reject rows of stage {ctx.stage.name!r}")

    def on_reject(key: str, rej: Reject) -> None:
        ctx.reject(key, rej.reason, rej.detail)

    repaired: Counter[str] = Counter()

    def counted(key: str, out: Out, reply: Reply) -> None:
        if reply.repaired:
            repaired[reply.repaired] += 1
        on_output(key, out, reply)

    bar = ctx.progress(range(len(inputs)), description=f"{task.name} (llm)")
    next(bar, None)  # opens the bar; each settled input advances it
    try:
        run = run_task(task, inputs, llm, ctx.ws.cache_dir, on_output=counted, on_reject=on_reject,
                       batch_wait_s=batch_wait_s, progress=lambda: next(bar, None), section=f"{task.name}.llm")
    except LLMConfigError:
        ctx.commit()  # keep what was answered before the refusal; the stage records no run
        raise
    finally:
        bar.close()
    ctx.stats.paid_calls += run.paid_calls
    ctx.stats.cache_hits += run.cache_hits
    ctx.stats.cost_usd += run.usd
    ctx.stats.extra["repaired"] = {"local": repaired["local"], "reask": repaired["reask"]}
    for url in llm.free_endpoints():
        ctx.stats.notes.append(f"endpoint {url} priced at $0 (self-hosted); set its price to bill it")
    if run.transient:
        ctx.stats.notes.append(f"{len(run.transient)} {not_done} ({run.transient[0]}); re-run to retry them")
    if run.pending:
        ctx.stats.notes.append(f"{len(run.pending)} requests still in a running batch; re-run to collect")
    return run


def stage_estimate(ctx: StageContext, task: LLMTask[In, Any], inputs: Mapping[str, In], llm: LLMConfig,
                   note: str, *, expected: int | None = None) -> Estimate:
    """`fvqa.llm.runner.estimate` as the stage's `--estimate` row (`note` gets the model and price kind)."""
    est: CostEstimate = estimate(task, inputs, llm, ctx.ws.cache_dir, expected=expected)
    note = f"{note}; {llm.model}" + (" (batch price)" if llm.batch else "")
    return Estimate(paid_calls=est.paid_calls, cached=est.cached,
                    tokens=est.prompt_tokens + est.completion_tokens, usd=est.usd, note=note)
