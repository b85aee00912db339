"""The `fvqa` command line: build, status, sql, export, import-upstream, config, demo (+ sub-apps).

A thin Typer layer: heavy modules are imported inside commands so `fvqa --help` stays fast. Errors a
user can fix print as one red line and exit with code 2.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fvqa.annotation.cli import annotate_app
from fvqa.errors import ConfigDeprecation, FvqaError
from fvqa.eval.cli import eval_app
from fvqa.search.cli import search_app
from fvqa.train.cli import train_app

app = typer.Typer(
    name="fvqa",
    help="Build search-balanced VQA datasets (FVQA), annotate them, train and evaluate on-demand search VLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
)


def _version(value: bool) -> None:
    if value:
        from fvqa import __version__

        out.print(f"fvqa {__version__}")
        raise typer.Exit()


_verbose = {"on": False}  # `fvqa -v CMD` (root option) or `CMD -v`: library logs on the terminal too


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
          verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                                help="Also show library logs on the terminal.")] = False) -> None:
    """Options before the command (the app's help text is set on `app`)."""
    _verbose["on"] = verbose
    if verbose:
        _logging(None, "fvqa")


config_app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)
demo_app = typer.Typer(help="The bundled offline demo world.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(demo_app, name="demo")

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML run config.")]
WorkspaceOpt = Annotated[
    Path | None, typer.Option("--workspace", "-w", help="Workspace folder (default: from config, else ./fvqa-work).")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config value: section.key=value (repeatable).")
]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Also show library logs on the terminal (they always go to WORKSPACE/logs/).")]


def _logging(workspace: Path | None, command: str, verbose: bool = False) -> Path | None:
    """Library logs and warnings -> `<workspace>/logs/<command>-<time>.log` (and the terminal with -v);
    fvqa's own config notes keep reaching the terminal. Returns the log file."""
    from fvqa.logs import setup_logging

    global _show_warning
    path = setup_logging(workspace, command, verbose=verbose or _verbose["on"], console=err)
    _show_warning = warnings.showwarning  # now the logging module's: other warnings go to the log
    warnings.showwarning = _note_deprecations
    return path


def _config(config: Path | None, workspace: Path | None, overrides: list[str] | None = None):
    """The run config; `-w` moves the workspace and every path under it (world, index, caches)."""
    from fvqa.config import load_config, move_workspace

    cfg = load_config(config, overrides)
    if workspace is not None:
        move_workspace(cfg, workspace)
    return cfg


def _workspace_path(config: Path | None, workspace: Path | None) -> Path:
    if workspace is not None:
        return workspace
    return _config(config, None).workspace


def _split_csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _span(mid: float, low: float | None, high: float | None, fmt: str = "{:,.0f}") -> str:
    """`mid (low-high)`, or just `mid` when the range is a point."""
    lo, hi = (mid if low is None else low), (mid if high is None else high)
    if fmt.format(lo) == fmt.format(hi):
        return fmt.format(mid)
    return f"{fmt.format(mid)} ({fmt.format(lo)}-{fmt.format(hi)})"


def _print_estimate(estimates: dict[str, Estimate | None]) -> None:  # noqa: F821 - fvqa.pipelines.base, lazy
    """The `--estimate` table: per stage paid calls, tokens and dollars (mid and range), then the
    total and what the numbers assume."""
    table = Table(title="estimate (nothing spent): mid (low-high)")
    for col in ("stage", "paid calls", "cached", "tokens", "USD", "note"):
        table.add_column(col)
    total = [0.0, 0.0, 0.0]
    assumptions: list[str] = []
    for name, est in estimates.items():
        if est is None:
            table.add_row(name, "0", "-", "-", "0.00", "no paid calls")
            continue
        for i, v in enumerate((est.usd_low, est.usd, est.usd_high)):
            total[i] += est.usd if v is None else v
        table.add_row(name, _span(est.paid_calls, est.paid_calls_low, est.paid_calls_high), f"{est.cached:,}",
                      _span(est.tokens, est.tokens_low, est.tokens_high),
                      _span(est.usd, est.usd_low, est.usd_high, "{:,.2f}"), est.note)
        assumptions += [a for a in est.assumptions if a not in assumptions]
    table.add_row("total", "", "", "", _span(total[1], total[0], total[2], "{:,.2f}"), "")
    out.print(table)
    out.print(f"total API spend: ${total[1]:,.2f} (range ${total[0]:,.2f}-${total[2]:,.2f})")
    if assumptions:
        out.print("assumes:")
        for a in assumptions:
            out.print(f"  - {a}", soft_wrap=True)


@app.command()
def build(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    stages: Annotated[str | None, typer.Option(help="Only these stages, comma-separated.")] = None,
    until: Annotated[str | None, typer.Option(help="Stop after this stage.")] = None,
    force: Annotated[str | None, typer.Option(help="Redo these stages from scratch, comma-separated.")] = None,
    estimate: Annotated[bool, typer.Option("--estimate", help="Print expected paid calls and cost; run nothing.")] = False,
    retry_rejects: Annotated[str | None, typer.Option(
        "--retry-rejects", help="Try these rejects again: STAGE or STAGE:CODE, comma-separated "
        "(codes as `fvqa status` lists them, e.g. crawl:http_error); the stage's outputs stay.")] = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the build stages in order (match, concepts, crawl, generate, infoseek, tag, index, probe, split, distill, export).

    Re-running the same command continues where a previous (even killed) run stopped: each stage
    processes only keys missing from its output table, so no committed paid call is repeated.

    `--set executor=ray` runs the work of match, crawl, index and a model probe on Ray workers (a
    Ray started here, or a cluster: `--set ray.address=auto`); the tables are the local ones.
    """
    from fvqa.pipelines import load_stage
    from fvqa.pipelines.runner import check_selection, check_stages, estimate_build, run_build
    from fvqa.store import check_writable

    cfg = _config(config, workspace, set_)
    only = _split_csv(stages) or None
    names, _ = check_selection(cfg, only, until, _split_csv(force), _split_csv(retry_rejects))  # before any disk
    if estimate:  # reads an existing workspace, else an empty temporary one: creates nothing here
        _print_estimate(estimate_build(cfg, console=err, only=only, until=until))
        return
    check_stages(cfg, [load_stage(n) for n in names], err)
    check_writable(cfg.workspace)
    log = _logging(cfg.workspace, "build", verbose)
    run_build(cfg, only=only, until=until, force=_split_csv(force), retry_rejects=_split_csv(retry_rejects),
              console=err)
    root = cfg.workspace.resolve()
    out.print("[green]build finished[/]")
    for label, path in (("workspace", root), ("exports", root / "exports"), ("log", log and log.resolve())):
        out.print(f"{label}: {path}", soft_wrap=True, highlight=False)  # one line each: copyable


@app.command()
def status(config: ConfigOpt = None, workspace: WorkspaceOpt = None) -> None:
    """Per-stage counts, last run, paid LLM calls and dollars per stage, and rejects by reason code.

    While a build runs (DuckDB's lock keeps other processes out), it shows the build's published
    progress snapshot instead, with its age."""
    from fvqa.llm.cache import read_spend
    from fvqa.store import Workspace, WorkspaceLocked

    root = _workspace_path(config, workspace)
    try:
        ws = Workspace(root, read_only=True)
    except WorkspaceLocked as exc:
        if not _print_snapshot(root):
            raise
        err.print(f"[dim]({exc}; the full tables show once it is released)[/]", highlight=False, soft_wrap=True)
        return
    with ws:
        tables = Table(title=f"workspace {ws.root}")
        tables.add_column("table")
        tables.add_column("rows", justify="right")
        for name in ws.tables():
            tables.add_row(name, str(ws.count(name)))
        tables.add_row("dataset (view)", str(ws.count("dataset")))
        out.print(tables)
        runs = ws.con.execute(
            "SELECT stage, max(started_at), arg_max(status, started_at), arg_max(n_out, started_at), "
            "arg_max(n_rejected, started_at), arg_max(seconds, started_at) FROM runs GROUP BY stage "
            "ORDER BY min(started_at)"
        ).fetchall()
        rt = Table(title="stages (last run)")
        for col in ("stage", "last run", "status", "out", "rejected", "seconds"):
            rt.add_column(col)
        shown = {"running": "[yellow]running or interrupted[/]", "failed": "[red]failed[/]", "done": "done"}
        for stage, when, status, n_out, n_rej, secs in runs:
            rt.add_row(stage, str(when)[:19], shown.get(status or "done", str(status)),
                       "-" if n_out is None else str(n_out), "-" if n_rej is None else str(n_rej),
                       "-" if secs is None else f"{secs:.1f}")
        out.print(rt)
        # Money from the response caches' spend tables (booked with each reply, so right after a
        # kill), not from `runs` (written when a stage finishes).
        spend: dict[str, list[float]] = {}
        for row in read_spend(ws.cache_dir):
            acc = spend.setdefault(row.stage, [0, 0, 0, 0, 0.0])
            for i, v in enumerate((row.calls, row.calls if row.batch else 0, row.prompt_tokens,
                                   row.completion_tokens, row.usd)):
                acc[i] += v
        if spend:
            st = Table(title="paid LLM calls (from the response caches; includes killed runs)")
            for col in ("stage", "paid calls", "of which batch", "prompt tokens", "completion tokens", "$"):
                st.add_column(col, justify="left" if col == "stage" else "right")
            for stage, (n, nb, p, c, usd) in sorted(spend.items()):
                st.add_row(stage, str(int(n)), str(int(nb)), str(int(p)), str(int(c)), f"{usd:.4f}")
            totals = [sum(v[i] for v in spend.values()) for i in range(5)]
            st.add_row("total", *(str(int(v)) for v in totals[:4]), f"{totals[4]:.4f}")
            out.print(st)
        rejects = ws.con.execute(
            "SELECT stage, reason, count(*) FROM rejects GROUP BY 1, 2 ORDER BY 1, 3 DESC"
        ).fetchall()
        if rejects:
            from fvqa.reasons import meaning

            rj = Table(title="rejects by code (retry: fvqa build --retry-rejects STAGE:CODE)")
            for col in ("stage", "code", "count", "means"):
                rj.add_column(col, justify="right" if col == "count" else "left")
            for stage, code, n in rejects:
                rj.add_row(stage, code, str(n), meaning(stage, code))
            out.print(rj)
        if "crawl_deferred" in ws.tables():  # transient failures: neither kept nor rejected, retried next run
            deferred = ws.con.execute(
                "SELECT reason, count(*), max(runs) FROM crawl_deferred GROUP BY 1 ORDER BY 2 DESC").fetchall()
            if deferred:
                dt = Table(title="deferred (retried by the next build)")
                for col in ("stage", "reason", "count", "runs deferred (max)"):
                    dt.add_column(col)
                for reason, n, runs_deferred in deferred:
                    dt.add_row("crawl", reason, str(n), str(runs_deferred))
                out.print(dt)


def _age(iso: str | None) -> str:
    """`12 s ago` for an ISO-8601 UTC time (`?` when unreadable)."""
    from datetime import UTC, datetime

    try:
        then = datetime.fromisoformat(str(iso))
    except ValueError:
        return "?"
    seconds = max(0.0, (datetime.now(UTC) - then).total_seconds())
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _print_snapshot(root: Path) -> bool:
    """Print a live build's progress snapshot (`fvqa.store.read_progress`); False when there is none."""
    from fvqa.store import read_progress

    snap = read_progress(root)
    if snap is None:
        return False
    state, pid = snap.get("status", "?"), snap.get("pid")
    if state == "running" and not _alive(pid):
        state = "stopped (its process is gone: killed?)"
    lead = "live build snapshot" if state == "running" else f"last build snapshot ({state})"
    out.print(f"workspace {root.resolve()} is locked by another process; {lead}: build PID {pid}, "
              f"started {_age(snap.get('started_at'))}, updated {_age(snap.get('updated_at'))}"
              + (f", now in stage {snap['stage']}" if state == "running" and snap.get("stage") else ""),
              soft_wrap=True, highlight=False)
    table = Table()
    for col in ("stage", "status", "new rows", "in", "out", "rejected", "seconds"):
        table.add_column(col, justify="left" if col in ("stage", "status") else "right")
    for entry in snap.get("stages", []):
        table.add_row(*(str(entry.get(k, "-")) for k in ("name", "status", "new_rows", "n_in", "n_out",
                                                          "n_rejected", "seconds")))
    out.print(table)
    return True


def _alive(pid: object) -> bool:
    """Whether a process with this id runs (on this machine)."""
    import os

    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help='e.g. "SELECT split, count(*) FROM dataset GROUP BY 1"')],
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print rows as JSON lines.")] = False,
) -> None:
    """Run a read-only DuckDB query on the workspace and print the result."""
    import duckdb

    from fvqa.store import Workspace

    with Workspace(_workspace_path(config, workspace), read_only=True) as ws:
        try:
            cur = ws.con.execute(query)
        except duckdb.Error as exc:
            raise FvqaError(f"SQL error: {str(exc).splitlines()[0]}") from exc
        if cur.description is None:
            return
        cols = [d[0] for d in cur.description]
        rows = cur.fetchall()
    if json_out:
        for row in rows:
            out.print_json(json.dumps(dict(zip(cols, row, strict=True)), default=str))
        return
    table = Table()
    for col in cols:
        table.add_column(col)
    for row in rows:
        table.add_row(*[str(v) for v in row])
    out.print(table)


@app.command("export")
def export_cmd(
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    format_: Annotated[
        list[str] | None, typer.Option("--format", "-f", help="native | upstream | hf | sft (repeatable; default: native, upstream, hf)")
    ] = None,
    push_to_hub: Annotated[str | None, typer.Option(
        "--push-to-hub", metavar="REPO",
        help="Upload the hf export to this Hub dataset repo (owner/name; token from HF_TOKEN, endpoint from HF_ENDPOINT).")
    ] = None,
    private: Annotated[bool, typer.Option(
        "--private", help="With --push-to-hub: create the repo private (an existing repo keeps its visibility).")
    ] = False,
) -> None:
    """Write the dataset as native Parquet, upstream's veRL parquet and/or a Hugging Face dataset in the
    Hub's layout (Parquet shards under data/ + card), or the distilled SFT trajectories (`sft`: veRL's
    multi-turn SFT parquet, after the distill stage); `--push-to-hub` then uploads the hf folder."""
    from fvqa.pipelines.export import FORMATS, export_all
    from fvqa.pipelines.export_hf import CardOptions, check_push, hub_token, push_hf
    from fvqa.store import Workspace

    formats = format_ or ["native", "upstream", "hf"]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise FvqaError(f"unknown export format(s): {', '.join(bad)} (choose {', '.join(FORMATS)})")
    if private and not push_to_hub:
        raise FvqaError("--private only applies with --push-to-hub REPO")
    token = None
    if push_to_hub:  # every reason the upload cannot work stops here, before anything is written
        if "hf" not in formats:
            raise FvqaError("--push-to-hub uploads the hf export: add --format hf (or leave --format out)")
        token = hub_token()
        check_push(push_to_hub)
    cfg = _config(config, workspace)
    with Workspace(cfg.workspace) as ws:
        written = export_all(ws, formats, card=CardOptions.from_config(cfg))
        for fmt, paths in written.items():
            for p in paths:
                out.print(f"{fmt}: {p}")
    if push_to_hub and token:
        url = push_hf(written["hf"][0], push_to_hub, token=token, private=private)
        out.print(f"pushed: {url}" + (" (private)" if private else ""), highlight=False)


@app.command("import-upstream")
def import_upstream_cmd(
    file: Annotated[Path, typer.Argument(help="A parquet in upstream's layout (lmms-lab/FVQA, mini_data).")],
    config: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    split: Annotated[str | None, typer.Option(
        help="train | test (default: from the file name, else unassigned); moves rows already present too")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Load the released FVQA (or any upstream-layout parquet) into a workspace."""
    from fvqa.pipelines.import_upstream import choose_split, import_upstream, read_upstream
    from fvqa.store import Workspace, check_writable

    chosen, split_from = choose_split(file, split)  # every argument checked before the workspace is touched
    table = read_upstream(file)
    root = _workspace_path(config, workspace)
    check_writable(root)
    _logging(root, "import-upstream", verbose)
    with Workspace(root) as ws:
        counts = import_upstream(ws, file, split, table=table)
    out.print(f"imported {counts['imported']}, already present {counts['skipped']}, rejected {counts['rejected']}")
    why = {"--split": "from --split", "file name": f"from the file name {file.name}",
           "default": f"default: {file.name} names neither train nor test; pass --split train|test"}
    out.print(f"split: {chosen} ({why[split_from]})", soft_wrap=True, highlight=False)
    if counts["moved"]:
        out.print(f"moved {counts['moved']} already present to {chosen}", highlight=False)
    elif counts["skipped"] and split_from == "--split":
        out.print(f"the {counts['skipped']} already present are in {chosen} already", highlight=False)
    elif counts["skipped"]:
        out.print("rows already present keep their split (--split train|test moves them)", highlight=False)


@config_app.command("show")
def config_show(config: ConfigOpt = None, workspace: WorkspaceOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults and demo-world paths filled in, secrets redacted) as YAML.

    Relative paths in the file are shown resolved against its folder, as the stages will use them.
    """
    import yaml

    from fvqa.config import redacted

    # plain echo, not rich: no line wrapping or markup, so the output is valid YAML at any width
    typer.echo(yaml.safe_dump(redacted(_config(config, workspace, set_)), sort_keys=False), nl=False)


@demo_app.command("world")
def demo_world(
    directory: Annotated[Path, typer.Argument(help="Where to write the world.")],
    seed: int = 0,
    n_entities: Annotated[int, typer.Option(help="Number of fictional entities.")] = 240,
    vocab_size: Annotated[int | None, typer.Option(
        help="Grow the MetaCLIP vocabulary to this many entries (uncounted filler; paper: 500,000).")] = None,
    captions: Annotated[int | None, typer.Option(help="Grow the caption pool to this many captions.")] = None,
    infoseek_rows: Annotated[int | None, typer.Option(
        help="Write exactly this many InfoSeek train rows (paper's file: ~1M).")] = None,
) -> None:
    """Write the offline demo world (MetaCLIP vocab, local web, InfoSeek files), deterministic per seed."""
    from fvqa.demo.world import make_world

    path = make_world(directory, seed=seed, n_entities=n_entities, vocab_size=vocab_size, captions=captions,
                      infoseek_rows=infoseek_rows)
    out.print(json.loads((path / "world.json").read_text()))


def _demo_train_rows(ws: Path) -> tuple[Path, list[Any]]:
    """The prepared veRL train parquet and its rows (the demo models' tokenizer is trained on them)."""
    from fvqa.demo.policy import read_rows

    parquet = ws / "exports" / "verl" / "train.parquet"
    if not parquet.is_file():
        raise FvqaError(f"{parquet} not found: run `fvqa train prepare --workspace {ws}` first")
    rows = read_rows(parquet)
    if not rows:
        raise FvqaError(f"{parquet} has no row with one image: run `fvqa train prepare --workspace {ws}` again")
    return parquet, rows


@demo_app.command("base-model")
def demo_base_model(
    workspace: WorkspaceOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Model folder to write (default: WORKSPACE/demo-tiny-model).")
    ] = None,
    seed: int = 0,
    config: ConfigOpt = None,
) -> None:
    """Write the demo's base model: a tiny random Qwen2.5-VL with a tokenizer trained on the demo rows.

    It knows nothing: `fvqa train sft` (on the distilled trajectories) gives it the protocol, then
    GRPO trains it. Its vocabulary comes from the prepared rows, so run `fvqa train prepare` first.
    """
    from fvqa.demo.policy import demo_corpus
    from fvqa.demo.tiny_model import build_tiny_qwen

    ws = _workspace_path(config, workspace)
    parquet, rows = _demo_train_rows(ws)
    target = out_dir if out_dir is not None else ws / "demo-tiny-model"
    model_dir = build_tiny_qwen(target, seed=seed, corpus=demo_corpus(rows), subdir=None)
    out.print(f"[bold yellow]DEMO STAND-IN:[/] tiny random Qwen2.5-VL (untrained) at {model_dir.resolve()}",
              soft_wrap=True)


@demo_app.command("policy")
def demo_policy(
    workspace: WorkspaceOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Model folder to write (default: WORKSPACE/demo-policy).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Supervised priming steps.")] = 150,
    seed: int = 0,
    check: Annotated[
        bool, typer.Option(help="Sample a few first turns at temperature 1 and report what they do.")
    ] = True,
    config: ConfigOpt = None,
) -> None:
    """Build a tiny Qwen2.5-VL and prime it on hand-made protocol turns (a quick demo stand-in).

    A random tiny model scores 0 on every rollout, so GRPO would have no signal: a few seconds of
    supervised steps make it write search and answer tags. `make demo` no longer uses it (it runs
    distill -> `fvqa train sft` -> GRPO); the GRPO tests use it as a policy that takes seconds.
    """
    from fvqa.demo.policy import (
        STANDIN_FILE,
        demo_corpus,
        prime_policy,
        sample_turns,
        write_standin_note,
    )
    from fvqa.demo.tiny_model import build_tiny_qwen

    ws = _workspace_path(config, workspace)
    parquet, rows = _demo_train_rows(ws)
    if steps < 1:
        raise FvqaError("--steps must be at least 1")
    target = out_dir if out_dir is not None else ws / "demo-policy"
    model_dir = build_tiny_qwen(target, seed=seed, corpus=demo_corpus(rows), subdir=None)
    report = prime_policy(model_dir, parquet, steps=steps, seconds_budget=max(120.0, float(steps)), seed=seed)
    out.print(f"[bold yellow]DEMO STAND-IN, not a trained policy:[/] tiny random Qwen2.5-VL primed with "
              f"{report.steps} supervised steps on protocol turns from {parquet}", soft_wrap=True)
    out.print(f"model: {report.model_dir.resolve()}  (see {STANDIN_FILE} there)", soft_wrap=True)
    out.print(f"steps {report.steps}, {report.seconds:.1f} s, loss {report.first_loss:.3f} -> {report.final_loss:.3f}",
              soft_wrap=True)
    if check:
        behaviour = sample_turns(model_dir, parquet, n_rows=4, k=4, seed=seed)
        summary = behaviour.summary()
        write_standin_note(model_dir, sampled_first_turns=summary)
        out.print(f"sampled first turns at temperature 1: {summary['valid']:.0%} valid "
                  f"({summary['well_formed']:.0%} well formed), {summary['search']:.0%} search, "
                  f"{summary['answer']:.0%} answer; groups with varying reward {summary['groups_with_signal']}",
                  soft_wrap=True)


@demo_app.command("eval")
def demo_eval(
    config: Annotated[Path, typer.Option("--config", "-c", help="Eval YAML of the demo.")] = Path(
        "configs/eval_demo.yaml"),
    n_items: Annotated[int | None, typer.Option("--items", help="Items per benchmark file (default: the writer's).")
                       ] = None,
    world: Annotated[Path | None, typer.Option(help="The demo world the build read (default: WORKSPACE/demo-world).")
                     ] = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate the demo policy offline: five benchmarks in official layouts, local search, a stand-in judge.

    Needs `make demo` first (the build, its search index and the trained policy). The judge is a loopback
    DEMO STAND-IN (substring match) speaking the OpenAI wire format, so the judged path runs for real
    without a key; the report says so. Ends with the report's path.
    """
    from fvqa.demo.eval_demo import STANDIN_NOTE, run_eval_demo
    from fvqa.eval.config import load_eval_config

    cfg = load_eval_config(config, set_)
    _logging(cfg.workspace, "demo-eval")
    res = run_eval_demo(cfg, world=world, n_items=n_items,
                        log=lambda m: err.print(f"[dim]{m}[/]", highlight=False))
    out.print(f"[bold yellow]{STANDIN_NOTE}[/]", soft_wrap=True)
    out.print(f"model: {res.model_label}", soft_wrap=True)
    out.print(f"report: {res.report_md}", soft_wrap=True)
    out.print(f"report (html): {res.report_html}", soft_wrap=True)


app.add_typer(search_app, name="search")
app.add_typer(annotate_app, name="annotate")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")


_show_warning = warnings.showwarning


def _note_deprecations(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    """Old config forms still load: one yellow line saying the new form, not a Python warning dump."""
    if issubclass(category, ConfigDeprecation):
        err.print(f"[yellow]note:[/] {message}", highlight=False)
    else:
        _show_warning(message, category, *args, **kwargs)  # type: ignore[arg-type]


def main() -> None:
    """Console entry point: user errors -> one red line, exit code 2; old config forms -> a note."""
    warnings.simplefilter("default", ConfigDeprecation)
    warnings.showwarning = _note_deprecations
    try:
        app()
    except FvqaError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)  # one line, however long
        sys.exit(2)


if __name__ == "__main__":
    main()
