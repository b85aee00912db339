"""Run the selected build stages in order, each followed by its summary table.

While it runs, a build publishes a small snapshot (`fvqa.store.write_progress`: stage, rows done,
updated_at) after each committed batch and each stage, so `fvqa status` can show it although
DuckDB's lock keeps every other process out of the database.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fvqa.config import RunConfig
from fvqa.errors import ConfigError
from fvqa.executor import check_executor, shutdown_ray
from fvqa.pipelines import STAGES, load_stage
from fvqa.pipelines.base import Estimate, Stage, StageContext, StageStats, execute_stage
from fvqa.reasons import codes_of, legacy_code
from fvqa.store import Workspace, check_writable, write_progress


def select_stages(
    config: RunConfig, only: Sequence[str] | None = None, until: str | None = None
) -> list[str]:
    """Stages to run: enabled in config, optionally filtered."""
    for name in [*(only or []), *([until] if until else [])]:
        if name not in STAGES:
            raise ConfigError(f"unknown stage '{name}' (known: {', '.join(STAGES)})")
    names = [n for n in STAGES if load_stage(n).enabled(config) or (only and n in only)]
    if only:
        names = [n for n in names if n in only]
    if until:
        order = list(STAGES)
        names = [n for n in names if order.index(n) <= order.index(until)]
    return names


def summary_table(name: str, stats: StageStats) -> Table:
    """The per-stage summary: in, out, rejected by reason, seconds, cost."""
    table = Table(title=f"stage {name}", title_justify="left", show_header=True)
    for col in ("in", "out", "rejected", "seconds", "cost $", "cache hits"):
        table.add_column(col, justify="right")
    reasons = ", ".join(f"{r}: {n}" for r, n in stats.rejected.most_common()) or "0"
    table.add_row(
        str(stats.n_in), str(stats.n_out), reasons, f"{stats.extra.get('seconds', 0.0):.1f}",
        f"{stats.cost_usd:.4f}", str(stats.cache_hits),
    )
    return table


def print_summary(console: Console, name: str, stats: StageStats) -> None:
    """The stage's table, then its notes as plain lines below it: never wrapped inside a table
    cell, so a path in a note (the export's files) stays whole and can be copied."""
    console.print(summary_table(name, stats))
    for note in stats.notes:
        console.print(f"  {note}", soft_wrap=True, highlight=False, markup=False)


class BuildProgress:
    """The snapshot a running build publishes for `fvqa status` (see the module docstring)."""

    min_interval_s = 0.5  # batch commits closer together than this publish once

    def __init__(self, root: Path, names: Sequence[str]) -> None:
        self.root = root
        self.data: dict[str, Any] = {
            "pid": os.getpid(), "status": "running", "started_at": _utc(), "updated_at": _utc(),
            "stage": None, "stages": [{"name": n, "status": "pending"} for n in names]}
        self._last = 0.0
        self._ws: Workspace | None = None
        self._output: str | None = None
        self._base = 0  # rows the current stage's output table held when it started

    def _entry(self, name: str) -> dict[str, Any]:
        return next(e for e in self.data["stages"] if e["name"] == name)

    def publish(self) -> None:
        """Write the snapshot now."""
        self.data["updated_at"] = _utc()
        self._last = time.monotonic()
        write_progress(self.root, self.data)

    def start(self, ws: Workspace, name: str, output: str | None) -> None:
        """Stage `name` begins; its rows so far are counted in `output` after every commit."""
        self._ws, self._output = ws, output
        self._base = ws.count(output) if output else 0
        self.data["stage"] = name
        self._entry(name).update(status="running", started_at=_utc(), output=output)
        self._count()
        self.publish()

    def _count(self) -> None:
        name = self.data["stage"]
        if self._ws is not None and self._output and name:
            self._entry(name)["new_rows"] = self._ws.count(self._output) - self._base

    def batch(self) -> None:
        """Workspace commit hook: refresh the current stage's row count (throttled)."""
        if self.data["stage"] and time.monotonic() - self._last >= self.min_interval_s:
            self._count()
            self.publish()

    def finish_stage(self, name: str, status: str, stats: StageStats | None = None) -> None:
        """Stage `name` ended (`done`, `skipped`, `failed`)."""
        entry = self._entry(name)
        entry["status"] = status
        if stats is not None:
            entry.update(n_in=stats.n_in, n_out=stats.n_out, n_rejected=stats.n_rejected,
                         seconds=round(float(stats.extra.get("seconds", 0.0)), 1))
        self._count()
        self.data["stage"] = None
        self.publish()

    def finish(self, status: str, error: str | None = None) -> None:
        """The build ended: `finished` or `failed` (with the error's first line)."""
        self.data["status"] = status
        if error:
            self.data["error"] = error.splitlines()[0]
        self.publish()


def _utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def ensure_world(config: RunConfig, console: Console) -> None:
    """Generate the demo world if the config uses one and it is missing."""
    world = config.world
    if world is None or (world.path / "world.json").exists():
        return
    if not world.generate:
        raise ConfigError(f"demo world not found at {world.path} and world.generate is false")
    from fvqa.demo.world import make_world

    console.print(f"generating demo world in {world.path} ...")
    make_world(world.path, seed=world.seed, n_entities=world.n_entities, vocab_size=world.vocab_size,
               captions=world.captions, infoseek_rows=world.infoseek_rows)


def _check_in_build(flag: str, name: str, names: Sequence[str]) -> None:
    """A stage named by `flag` must exist and be part of this build (else one line, nothing touched)."""
    if name not in STAGES:
        raise ConfigError(f"{flag}: unknown stage '{name}' (known: {', '.join(STAGES)})")
    if name not in names:
        raise ConfigError(f"{flag} {name}: stage {name} is not part of this build "
                          f"(selected: {', '.join(names) or 'none'}); enable it or name it in --stages")


def parse_retry_rejects(specs: Sequence[str], names: Sequence[str]) -> dict[str, list[str | None]]:
    """`STAGE[:CODE]` specs -> stage -> reason codes (None: all), checked against the stage's
    registered codes (`fvqa.reasons`) before anything is touched."""
    out: dict[str, list[str | None]] = {}
    for spec in specs:
        stage, _, reason = spec.partition(":")
        stage, reason = stage.strip(), reason.strip()
        _check_in_build("--retry-rejects", stage, names)
        if reason and reason not in codes_of(stage):
            hint = legacy_code(stage, reason)[0]
            hint = f" (did you mean {stage}:{hint}?)" if hint != "legacy" else ""
            raise ConfigError(f"--retry-rejects {spec}: {reason!r} is not a reject code of stage {stage}{hint}; "
                              f"its codes: {', '.join(codes_of(stage))}")
        out.setdefault(stage, []).append(reason or None)
    return out


def requeue_rejects(ws: Workspace, stage: str, reasons: Sequence[str | None], console: Console) -> int:
    """Forget `stage`'s rejects with these reasons (None: all), so its next run does those keys again."""
    n = 0
    with ws.transaction():
        for reason in reasons:
            where, params = ("stage = ?", [stage]) if reason is None else ("stage = ? AND reason = ?", [stage, reason])
            n += int(ws.execute(f"SELECT count(*) FROM rejects WHERE {where}", params)[0][0])
            ws.execute(f"DELETE FROM rejects WHERE {where}", params)
    if n == 0:
        known = [r for (r,) in ws.execute("SELECT DISTINCT reason FROM rejects WHERE stage = ? ORDER BY 1", [stage])]
        console.print(f"[yellow]stage {stage}: no rejects to retry for {', '.join(r or 'all' for r in reasons)}"
                      + (f" (its reasons: {'; '.join(known)})" if known else "") + "[/]")
    else:
        console.print(f"stage {stage}: {n} reject(s) re-queued")
    return n


def check_selection(config: RunConfig, only: Sequence[str] | None = None, until: str | None = None,
                    force: Sequence[str] = (), retry_rejects: Sequence[str] = ()
                    ) -> tuple[list[str], dict[str, list[str | None]]]:
    """The stages a build runs and its re-queued rejects, every name checked before anything is
    touched (a typo in --stages/--until/--force/--retry-rejects is one line, not a written world)."""
    names = select_stages(config, only, until)
    for name in force:
        _check_in_build("--force", name, names)
    return names, parse_retry_rejects(retry_rejects, names)


def run_build(
    config: RunConfig,
    *,
    only: Sequence[str] | None = None,
    until: str | None = None,
    force: Sequence[str] = (),
    retry_rejects: Sequence[str] = (),
    console: Console | None = None,
) -> dict[str, StageStats]:
    """Run a build; re-running continues where a previous (possibly killed) run stopped.

    `--force` never deletes before it is known the stage can run: first every selected stage's
    `check` (config, API keys in the environment) passes, then a forced stage's old outputs are
    deleted only when that stage runs, in the same transaction as its first committed batch — a
    forced stage that fails before producing anything leaves its previous outputs as they were.

    `retry_rejects` (`STAGE` or `STAGE:REASON`) re-queues that stage's rejects (all, or those with
    that reason) when the stage runs: their keys are to do again, its outputs stay.
    """
    console = console or Console(stderr=True)
    names, retries = check_selection(config, only, until, force, retry_rejects)
    stages = {name: load_stage(name) for name in names}
    check_stages(config, stages.values(), console)
    check_writable(config.workspace)  # a bad --workspace fails before the demo world is written
    ensure_world(config, console)
    results: dict[str, StageStats] = {}
    with Workspace(config.workspace) as ws:
        progress = BuildProgress(ws.root, names)
        ws.on_commit.append(progress.batch)
        progress.publish()
        try:
            for i, (name, stage) in enumerate(stages.items(), 1):
                missing = [t for t in stage.inputs if ws.count(t) == 0]
                if missing:
                    kept = " (--force not applied: its previous outputs are kept)" if name in force else ""
                    console.print(f"[yellow]stage {name}: skipped, no input in {', '.join(missing)}{kept}[/]")
                    progress.finish_stage(name, "skipped")
                    continue
                progress.start(ws, name, stage.outputs[0] if stage.outputs else None)
                with console.status(f"[bold]stage {name}[/] ({i}/{len(stages)})"):
                    if name in retries:
                        requeue_rejects(ws, name, retries[name], console)
                    try:
                        stats = execute_stage(stage, ws, config, console, reset=name in force)
                    except BaseException:
                        progress.finish_stage(name, "failed")
                        raise
                progress.finish_stage(name, "done", stats)
                print_summary(console, name, stats)
                results[name] = stats
        except BaseException as exc:
            progress.finish("failed", str(exc) or type(exc).__name__)
            raise
        finally:
            ws.on_commit.remove(progress.batch)
            shutdown_ray()  # a Ray this build started for `executor: ray` (one it joined stays up)
        progress.finish("finished")
    return results


def check_stages(config: RunConfig, stages: Iterable[Stage], console: Console) -> None:
    """Every selected stage's `check` (config, API keys in the environment), before anything is
    written or deleted. The checks read the config and the environment only, so they run before
    the workspace exists (a failing check leaves no folder behind). `executor: ray` is checked too
    (Ray Data installed, `ray.address` answering)."""
    for stage in stages:
        stage.check(StageContext(None, config, stage, console=console))  # type: ignore[arg-type]
    check_executor(config)


def estimate_build(config: RunConfig, console: Console | None = None, *, only: Sequence[str] | None = None,
                   until: str | None = None) -> dict[str, Estimate | None]:
    """Per stage: expected paid calls, cache hits, tokens and dollars (mid and range), without
    spending anything. Stages whose inputs do not exist yet are priced from the upstream stages'
    expected counts (`fvqa.pipelines.expected`), so no data is needed; with no workspace yet, an
    empty temporary one stands in (an estimate writes nothing)."""
    import tempfile
    from contextlib import ExitStack

    console = console or Console(stderr=True)
    out: dict[str, Estimate | None] = {}
    with ExitStack() as stack:
        root = Path(config.workspace)
        if not (root / "fvqa.duckdb").exists():
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fvqa-estimate-"))) / "ws"
        ws = stack.enter_context(Workspace(root))
        for name in select_stages(config, only, until):
            stage = load_stage(name)
            stage.prepare(ws)
            out[name] = stage.estimate(StageContext(ws, config, stage, console=console))
    return out
