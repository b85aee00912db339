"""The stage contract: one class per stage, reading top to bottom as in -> work -> out.

A stage asks the context which keys are still to do (`ctx.todo`), emits output rows and rejects
through the context, and the context commits them together in batches inside one transaction.
The stage's `runs` row is written first with status `running` and completed last, after its
outputs (`done`, or `failed` when the stage raised), so a killed stage shows as `running` in
`fvqa status` and the next `fvqa build` simply continues.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fvqa.reasons import check_code
from fvqa.store import Workspace, now

if TYPE_CHECKING:
    from fvqa.config import RunConfig

T = TypeVar("T")

PAID_LLM_BACKENDS = frozenset({"llm", "openai"})
"""`backend` values of stage sections that call a paid OpenAI-compatible endpoint (`section.llm`)."""


@dataclass
class StageStats:
    """Small counters that add up: shown in the summary table and stored in `runs`."""

    n_in: int = 0
    n_out: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    cost_usd: float = 0.0
    paid_calls: int = 0
    cache_hits: int = 0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_in": self.n_in,
            "n_out": self.n_out,
            "rejected": dict(self.rejected),
            "cost_usd": self.cost_usd,
            "paid_calls": self.paid_calls,
            "cache_hits": self.cache_hits,
            "notes": self.notes,
            **self.extra,
        }


@dataclass
class Estimate:
    """What a stage expects to spend before it runs (`fvqa build --estimate`).

    `paid_calls`, `tokens` and `usd` are the central guess; the `*_low` / `*_high` fields bound it
    (None: the same as the central value) and `assumptions` says, one line each, what the numbers
    rest on (expected counts of stages not run yet, token lengths, cache hits)."""

    paid_calls: int = 0
    cached: int = 0
    tokens: int = 0
    usd: float = 0.0
    note: str = ""
    paid_calls_low: int | None = None
    paid_calls_high: int | None = None
    tokens_low: int | None = None
    tokens_high: int | None = None
    usd_low: float | None = None
    usd_high: float | None = None
    assumptions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("paid_calls", "tokens", "usd"):
            for end in ("low", "high"):
                if getattr(self, f"{name}_{end}") is None:
                    setattr(self, f"{name}_{end}", getattr(self, name))


class StageContext:
    """What a running stage sees: workspace, its config section, batching, progress and stats."""

    def __init__(
        self,
        ws: Workspace,
        config: RunConfig,
        stage: Stage,
        console: Console | None = None,
        batch_size: int = 64,
    ) -> None:
        self.ws = ws
        self.config = config
        self.stage = stage
        self.console = console or Console(stderr=True)
        self.batch_size = batch_size
        self.stats = StageStats()
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._rejects: list[tuple[str, str, str, str]] = []
        self._pending = 0
        self._rejected_before: set[str] | None = None
        self._reset_tx: AbstractContextManager[None] | None = None  # open while a `--force` reset is pending

    @property
    def cfg(self) -> Any:
        """This stage's config section."""
        return getattr(self.config, self.stage.name, None)

    # -- work selection --------------------------------------------------------------------
    def todo(self, keys: Iterable[str], table: str | None = None, column: str = "item_id") -> list[str]:
        """Keys not yet in the stage's output table and not already rejected by it (order kept)."""
        table = table or self.stage.outputs[0]
        done = self.ws.keys(table, column) | self.ws.rejected_keys(self.stage.name)
        return [k for k in keys if k not in done]

    # -- output ----------------------------------------------------------------------------
    def emit(self, table: str, row: dict[str, Any]) -> None:
        """Buffer an output row; committed with the current batch."""
        self._rows.setdefault(table, []).append(row)
        if table == self.stage.outputs[0]:
            self.stats.n_out += 1
        self._tick()

    def emit_together(self, *rows: tuple[str, dict[str, Any]]) -> None:
        """Buffer (table, row) pairs that must land in the same transaction, e.g. an `images` row and
        the item referencing it: a batch boundary never falls between them."""
        for table, row in rows:
            self._rows.setdefault(table, []).append(row)
            if table == self.stage.outputs[0]:
                self.stats.n_out += 1
        self._pending += len(rows) - 1
        self._tick()

    def reject(self, key: str, reason: str, detail: str = "", *, counted: bool = True) -> None:
        """Buffer a reject (stage, key, reason, detail); committed with the current batch.

        A key this stage rejected in an earlier run is counted again but not stored twice.
        `counted=False` stores a reject of something that is not the stage's unit (e.g. one of a
        concept's candidate URLs), so `n_in == n_out + n_rejected` stays a statement about units.
        """
        check_code(self.stage.name, reason)
        if counted:
            self.stats.rejected[reason] += 1
        if self._rejected_before is None:
            self._rejected_before = self.ws.rejected_keys(self.stage.name)
        if key in self._rejected_before:
            return
        self._rejected_before.add(key)
        self._rejects.append((self.stage.name, key, reason, detail))
        self._tick()

    def _tick(self) -> None:
        self._pending += 1
        if self._pending >= self.batch_size:
            self.commit()

    def commit(self) -> None:
        """Write buffered rows and rejects in one transaction (the first one also commits a pending
        `--force` reset: see `begin_reset`)."""
        if not self._rows and not self._rejects:
            return
        with self.ws.transaction():
            for table, rows in self._rows.items():
                self.ws.insert(table, rows)
            self.ws.add_rejects(self._rejects)
        self._rows, self._rejects, self._pending = {}, [], 0
        self.end_reset()

    # -- --force ---------------------------------------------------------------------------
    def begin_reset(self) -> None:
        """Delete the stage's old outputs inside a transaction left open until the stage's first
        commit (or its successful end), so the deletion and the first new rows land together: a
        stage that fails before committing anything rolls back to its previous outputs.

        While it is open the stage sees its tables already emptied (its own transaction), and every
        nested `ws.transaction()` joins it."""
        tx = self.ws.transaction()
        tx.__enter__()
        self._reset_tx = tx
        try:
            self.stage.reset(self.ws)
        except BaseException as exc:
            self.abort_reset(exc)
            raise

    def end_reset(self) -> None:
        """Commit a pending reset (no-op when none is pending)."""
        tx, self._reset_tx = self._reset_tx, None
        if tx is not None:
            tx.__exit__(None, None, None)

    def abort_reset(self, exc: BaseException) -> None:
        """Roll a pending reset back: the previous outputs are there again."""
        tx, self._reset_tx = self._reset_tx, None
        if tx is not None:
            try:
                tx.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException as again:  # noqa: BLE001 - the transaction manager re-raises `exc`
                if again is not exc:
                    raise

    # -- progress --------------------------------------------------------------------------
    def progress(self, items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        """Iterate with a rich progress bar (quiet when not a terminal)."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True,
                      disable=not self.console.is_terminal) as bar:
            task = bar.add_task(description or self.stage.name, total=total)
            for item in items:
                yield item
                bar.advance(task)


class Stage:
    """Base class: subclasses set `name`, `inputs`, `outputs` and implement `run`."""

    name: ClassVar[str] = ""
    inputs: ClassVar[tuple[str, ...]] = ()  # tables that must be non-empty before running
    outputs: ClassVar[tuple[str, ...]] = ()  # first one is the completion table (keyed)
    description: ClassVar[str] = ""

    def enabled(self, config: RunConfig) -> bool:
        """Whether the config turns this stage on."""
        section = getattr(config, self.name, None)
        return bool(getattr(section, "enabled", True))

    def prepare(self, ws: Workspace) -> None:
        """Create stage-private tables; default: nothing."""

    def run(self, ctx: StageContext) -> None:
        """Do the work: read inputs, emit outputs and rejects through `ctx`."""
        raise NotImplementedError

    def estimate(self, ctx: StageContext) -> Estimate | None:
        """Expected paid calls/cost before running; None for stages that spend nothing."""
        return None

    def check(self, ctx: StageContext) -> None:
        """Raise `ConfigError` (one line) if this stage cannot run with this config and environment.

        Called for every selected stage before a build runs or resets anything, so a `--force` of a
        stage that cannot run deletes nothing. It must be cheap and spend nothing. Default: the API
        keys of the section's LLM endpoints when its `backend` is a paid one (`llm` / `openai`)."""
        section = ctx.cfg
        if getattr(section, "backend", None) not in PAID_LLM_BACKENDS:
            return
        from fvqa.llm.config import LLMConfig

        llm = getattr(section, "llm", None)
        if llm is None:
            llm = LLMConfig()  # the sections' default: GPT-4o at api.openai.com with OPENAI_API_KEY
        for endpoint in getattr(llm, "endpoints", ()):
            endpoint.api_key()  # ConfigError naming the unset variable

    def reset(self, ws: Workspace) -> None:
        """Forget this stage's outputs and rejects (`--force`)."""
        with ws.transaction():
            for table in self.outputs:
                ws.execute(f"DELETE FROM {table}")
            ws.execute("DELETE FROM rejects WHERE stage = ?", [self.name])


def execute_stage(stage: Stage, ws: Workspace, config: RunConfig, console: Console, *,
                  reset: bool = False) -> StageStats:
    """Run one stage with batching, then record its `runs` row last (completion marker).

    `reset` (`--force`): the old outputs are deleted in the same transaction as the stage's first
    committed batch (`StageContext.begin_reset`); if the stage fails before that, they stay."""
    stage.prepare(ws)
    ctx = StageContext(ws, config, stage, console=console, batch_size=config.batch_size)
    run_id = uuid.uuid4().hex[:12]
    started_at = now()
    t0 = time.perf_counter()
    ws.insert("runs", [dict(run_id=run_id, stage=stage.name, config_hash=config.section_hash(stage.name),
                            started_at=started_at, status="running")])

    def finish(status: str) -> float:
        seconds = time.perf_counter() - t0
        ws.execute(
            "UPDATE runs SET seconds = ?, n_in = ?, n_out = ?, n_rejected = ?, cost_usd = ?, stats = ?, status = ? "
            "WHERE run_id = ?",
            [seconds, ctx.stats.n_in, ctx.stats.n_out, ctx.stats.n_rejected, ctx.stats.cost_usd,
             json.dumps(ctx.stats.as_dict(), default=str), status, run_id])
        return seconds

    if reset:
        ctx.begin_reset()
    try:
        stage.run(ctx)
        ctx.commit()
        ctx.end_reset()  # a forced stage that finished with nothing to write: the reset stands
    except BaseException as exc:
        ctx.abort_reset(exc)
        try:
            finish("failed")
        except Exception:  # noqa: BLE001 - the workspace itself may be what failed; the stage's error wins
            pass
        raise
    ctx.stats.extra["seconds"] = finish("done")
    return ctx.stats
