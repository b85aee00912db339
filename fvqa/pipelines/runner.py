"""Run the selected build stages in order, each followed by its summary table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fvqa.config import RunConfig
from fvqa.errors import ConfigError
from fvqa.pipelines import STAGES, load_stage
from fvqa.pipelines.base import Estimate, StageContext, StageStats, execute_stage
from fvqa.reasons import codes_of, legacy_code
from fvqa.store import Workspace


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
    for note in stats.notes:
        table.caption = (table.caption + "\n" if table.caption else "") + note
    return table


def ensure_world(config: RunConfig, console: Console) -> None:
    """Generate the demo world if the config uses one and it is missing."""
    world = config.world
    if world is None or (world.path / "world.json").exists():
        return
    if not world.generate:
        raise ConfigError(f"demo world not found at {world.path} and world.generate is false")
    from fvqa.demo.world import make_world

    console.print(f"generating demo world in {world.path} ...")
    make_world(world.path, seed=world.seed, n_entities=world.n_entities)


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
    ensure_world(config, console)
    results: dict[str, StageStats] = {}
    with Workspace(config.workspace) as ws:
        stages = {name: load_stage(name) for name in names}
        for stage in stages.values():  # before anything runs or is deleted
            stage.check(StageContext(ws, config, stage, console=console))
        for name, stage in stages.items():
            missing = [t for t in stage.inputs if ws.count(t) == 0]
            if missing:
                kept = " (--force not applied: its previous outputs are kept)" if name in force else ""
                console.print(f"[yellow]stage {name}: skipped, no input in {', '.join(missing)}{kept}[/]")
                continue
            if name in retries:
                requeue_rejects(ws, name, retries[name], console)
            stats = execute_stage(stage, ws, config, console, reset=name in force)
            console.print(summary_table(name, stats))
            results[name] = stats
    return results


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
