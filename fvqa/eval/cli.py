"""`fvqa eval`: run an evaluation, write its report. Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

eval_app = typer.Typer(help="Evaluate models: direct / RAG / on-demand search on five benchmarks.",
                       no_args_is_help=True)

ConfigArg = Annotated[Path, typer.Option("--config", "-c", help="Eval YAML (configs/eval_paper.yaml: the paper's "
                                                                 "protocol; configs/eval_demo.yaml: offline demo).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override: key.sub=value (repeatable).")]


@eval_app.command("run")
def run_cmd(
    config: ConfigArg,
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w", help="Override the config's workspace.")] = None,
    limit: Annotated[int | None, typer.Option(help="Items per benchmark (seeded sample).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the --limit sample.")] = None,
    rescore: Annotated[bool, typer.Option("--rescore", help="Score every prediction again (judge from cache).")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write the report at the end.")] = True,
    set_: SetOpt = None,
) -> None:
    """Generate missing predictions, score them, write lmms-eval outputs (and the report).

    Re-running the same command resumes: nothing already predicted or scored is paid for again, and
    predictions whose model or judge call failed (reported as not scored, never as wrong) are asked again.
    """
    from rich.console import Console
    from rich.table import Table

    from fvqa.eval.aggregate import averages, cells, scored_rows, unscored, unscored_note
    from fvqa.eval.config import load_eval_config
    from fvqa.eval.runner import run_eval
    from fvqa.logs import setup_logging
    from fvqa.store import Workspace

    err = Console(stderr=True)
    cfg = load_eval_config(config, set_)
    if workspace is not None:
        cfg.workspace = workspace
    setup_logging(cfg.workspace, "eval", console=err)  # library chatter to <workspace>/logs (-v: here too)
    if limit is not None:
        cfg.limit = limit
    if seed is not None:
        cfg.seed = seed
    summary = run_eval(cfg, rescore=rescore, log=lambda m: err.print(f"[dim]{m}[/]", highlight=False))
    out = Console(soft_wrap=True)
    with Workspace(cfg.workspace) as ws:
        counts = unscored(ws, cfg.run)
        cs = cells(scored_rows(ws, cfg.run), n_resamples=200, unscored_counts=counts)
        table = Table(title=f"eval run {cfg.run} ({cfg.primary_metric})")
        # the not-scored column only when something is not scored: the usual table stays narrow
        cols = ["model", "workflow", "benchmark", "n", "accuracy %", "95% CI", "search ratio %", "searched %"]
        for col in cols + (["not scored (model/judge call failed)"] if counts else []):
            table.add_column(col)
        for c in cs:
            nums = ([f"{100 * c.accuracy:.1f}", f"{100 * c.ci_lo:.1f}-{100 * c.ci_hi:.1f}", f"{100 * c.search_ratio:.1f}",
                     f"{100 * c.search_any_ratio:.1f}"] if c.n else ["–", "–", "–", "–"])
            extra = [f"{c.not_scored_model}/{c.not_scored_judge}"] if counts else []
            table.add_row(c.model, c.workflow, c.benchmark, str(c.n), *nums, *extra)
        for (model, wf), v in sorted(averages(cs).items()):
            table.add_row(model, wf, "average", "", f"{100 * v['accuracy']:.1f}", "", f"{100 * v['search_ratio']:.1f}",
                          "", *([""] if counts else []))
        out.print(table)
        retried = sum(c.retried for c in summary.cells)
        out.print(f"generated {sum(c.generated for c in summary.cells)} predictions"
                  + (f" ({retried} retried)" if retried else "")
                  + f", {summary.model_failures} model calls failed, scored {summary.scored}; "
                  f"judge: {summary.judge_calls} paid requests, {summary.judge_cache_hits} from cache, "
                  f"{summary.judge_failures} failures ({summary.judge_unscored} left unscored); "
                  f"cost ${summary.usd:.4f}")
        note = unscored_note(counts)
        if note:
            out.print(f"[yellow]{note}[/]", highlight=False)
        if report:
            from fvqa.eval.report import build_report

            files = build_report(ws, cfg.run)
            out.print(f"report: {files.markdown}  {files.html}")


@eval_app.command("report")
def report_cmd(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Eval YAML (for workspace and run).")] = None,
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w")] = None,
    run: Annotated[str | None, typer.Option(help="Run name (default: the config's, else the latest).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder (default: <workspace>/eval/<run>).")] = None,
) -> None:
    """Write report.md + a self-contained report.html with plots for a run."""
    from rich.console import Console

    from fvqa.errors import FvqaError
    from fvqa.eval.report import build_report
    from fvqa.eval.runner import runs
    from fvqa.store import Workspace

    if config is not None:
        from fvqa.eval.config import load_eval_config

        cfg = load_eval_config(config)
        workspace = workspace or cfg.workspace
        run = run or cfg.run
    workspace = workspace or Path("fvqa-work")
    with Workspace(workspace, read_only=True) as ws:
        if "eval_runs" not in ws.tables():
            raise FvqaError(f"no evaluation in {ws.root} (run `fvqa eval run --config ...` first)")
        known = list(runs(ws))
        run = run or (known[-1] if known else None)
        if run is None or run not in known:
            raise FvqaError(f"unknown run {run!r}; runs in this workspace: {', '.join(known) or 'none'}")
        files = build_report(ws, run, out_dir)
    Console(soft_wrap=True).print(f"report: {files.markdown}  {files.html}  plots: {len(files.plots)}")
