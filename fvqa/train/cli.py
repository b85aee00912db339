"""`fvqa train ...`: prepare veRL data from a workspace; launch (or dry-run) a GRPO or an SFT run.

Only typer is imported at module level: `fvqa --help` must not pay for veRL, Hydra or torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

train_app = typer.Typer(help="SFT and GRPO training on veRL with multi-turn search rollouts.", no_args_is_help=True)


def _print_checks(err: Any, checks: list[Any]) -> list[Any]:
    """One line per check (ok / FAIL / warn) on stderr; the required checks that failed."""
    for c in checks:
        mark = "[green]ok[/]" if c.ok else ("[red]FAIL[/]" if c.required else "[yellow]warn[/]")
        err.print(f"check {c.name}: {mark} {c.detail}", highlight=False)
    return [c for c in checks if c.required and not c.ok]


@train_app.command("prepare")
def prepare_cmd(
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder.")] = Path("fvqa-work"),
    out: Annotated[Path | None, typer.Option(help="Output folder (default: WORKSPACE/exports/verl).")] = None,
    prompts: Annotated[
        list[Path] | None, typer.Option(help="Prompt file or folder overriding fvqa's defaults (repeatable).")
    ] = None,
    image_max_pixels: Annotated[
        int, typer.Option(help="Downscale user images to at most this many pixels (1024*28*28 ~ 1024 tokens).")
    ] = 1024 * 28 * 28,
    limit: Annotated[int | None, typer.Option(help="At most this many rows per split (smoke runs).")] = None,
) -> None:
    """Write train.parquet (split train) and val.parquet (split test) in veRL's layout."""
    from rich.console import Console

    from fvqa.protocol import load_prompts
    from fvqa.store import Workspace
    from fvqa.train.prepare import prepare

    with Workspace(workspace) as ws:
        result = prepare(ws, out, prompts=load_prompts(prompts) if prompts else None,
                         image_max_pixels=image_max_pixels, limit=limit)
    console = Console()
    for split, path in result.files.items():
        console.print(f"{split}: {result.rows[split]} rows -> {path}", highlight=False, soft_wrap=True)
    for reason, n in result.rejected.items():
        console.print(f"rejected: {n} ({reason}); see `fvqa status`", highlight=False, soft_wrap=True)


@train_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_cmd(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", help="veRL training config (configs/grpo_*.yaml).")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Compose, check and print; launch nothing (exit 1 if a check fails).")
    ] = False,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="Join this Ray cluster (multi-node), e.g. 10.0.0.1:6379.")
    ] = None,
    skip_checks: Annotated[bool, typer.Option("--skip-checks", help="Launch even if a check fails.")] = False,
) -> None:
    """Print the exact `python -m verl.trainer.main_ppo ...` command and the composed config, check GPUs,
    packages, data, prompt lengths, reward/rollout limits and the search service, then launch.
    Extra arguments are Hydra overrides (e.g. `trainer.total_epochs=2`).

    `trainer.device=cpu` (configs/grpo_demo_cpu.yaml) runs veRL's own trainer on CPU with fvqa's CPU
    backend: a way to check a whole setup before renting GPUs. With `fvqa.search_url: null` a search
    service over `fvqa.search_config` is started for the run and stopped after it. Re-running the
    same command resumes from the newest checkpoint (`trainer.resume_mode: auto`)."""
    import contextlib

    from omegaconf import OmegaConf
    from rich.console import Console

    from fvqa.errors import FvqaError
    from fvqa.train import launcher
    from fvqa.train.checks import run_checks
    from fvqa.train.search_process import search_config_path, search_service

    out, err = Console(), Console(stderr=True, soft_wrap=True)
    overrides = launcher.launch_overrides(config, ray_address, list(ctx.args))
    overrides += launcher.runtime_overrides(launcher.compose(config, overrides))
    cfg = launcher.compose(config, overrides)
    launcher.validate(cfg)
    env = launcher.launch_env(cfg)
    served = search_config_path(cfg, config.expanduser().resolve())
    out.print("[bold]command:[/]")
    print(launcher.format_command(launcher.build_command(config, overrides), env))
    if served:
        out.print(f"[bold]search service:[/] started for the run over {served} (passed as fvqa.search_url)",
                  highlight=False, soft_wrap=True)
    out.print("[bold]composed config (as `--cfg job` prints it):[/]")
    print(OmegaConf.to_yaml(cfg), end="")
    failed = _print_checks(err, run_checks(cfg, ray_address))
    if dry_run:
        err.print(f"dry run: nothing launched ({len(failed)} failed check(s))")
        raise typer.Exit(1 if failed else 0)
    if failed and not skip_checks:
        raise FvqaError(
            f"{len(failed)} check(s) failed ({', '.join(c.name for c in failed)}); fix them or pass --skip-checks"
        )
    ckpt = launcher.checkpoint_dir(cfg)
    with search_service(served, ckpt / "search-service.log") if served else contextlib.nullcontext() as url:
        run_overrides = [*overrides, f"fvqa.search_url={url}"] if url else overrides
        if url:
            err.print(f"search service up at {url} (log: {ckpt / 'search-service.log'})", highlight=False)
        code = launcher.launch(launcher.build_command(config, run_overrides), env)
    latest = launcher.latest_checkpoint(cfg)
    err.print(f"checkpoints: {latest or f'none yet under {ckpt}'}", highlight=False)
    if env.get("VERL_FILE_LOGGER_PATH") and Path(env["VERL_FILE_LOGGER_PATH"]).is_file():
        err.print(f"per-step metrics: {env['VERL_FILE_LOGGER_PATH']}", highlight=False)
    raise typer.Exit(code)


@train_app.command("sft", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sft_cmd(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", help="veRL SFT config (configs/sft_*.yaml).")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Compose, check and print; launch nothing (exit 2 if a check fails).")
    ] = False,
    skip_checks: Annotated[bool, typer.Option("--skip-checks", help="Launch even if a check fails.")] = False,
) -> None:
    """Supervised fine-tuning on distilled search trajectories with veRL's own SFT trainer.

    Prints the exact `torchrun ... -m verl.trainer.sft_trainer ...` command and the composed config,
    checks GPUs, packages, the model folder, the data (columns, roles, images per `<image>`), batch
    sizes and tokenized lengths (veRL's MultiTurnSFTDataset: loss on assistant turns only), then
    launches. Extra arguments are Hydra overrides (e.g. `trainer.total_training_steps=10`).

    `trainer.device=cpu` (configs/sft_demo_cpu.yaml) runs the same trainer on CPU with fvqa's CPU
    backend. After the run, TRAINER.DEFAULT_LOCAL_DIR/huggingface is the newest checkpoint's
    transformers folder: pass it to GRPO as `actor_rollout_ref.model.path=...`. Re-running the same
    command resumes from the newest checkpoint (`trainer.resume_mode: auto`)."""
    from omegaconf import OmegaConf
    from rich.console import Console

    from fvqa.errors import FvqaError
    from fvqa.train import launcher, sft
    from fvqa.train.sft_checks import run_sft_checks

    out, err = Console(), Console(stderr=True, soft_wrap=True)
    overrides = list(ctx.args)
    overrides += sft.runtime_overrides(launcher.compose(config, overrides))
    cfg = launcher.compose(config, overrides)
    sft.validate(cfg)
    env = sft.launch_env(cfg)
    cmd = sft.build_command(config, overrides, cfg)
    out.print("[bold]command:[/]")
    print(launcher.format_command(cmd, env))
    out.print("[bold]composed config (as `--cfg job` prints it):[/]")
    print(OmegaConf.to_yaml(cfg), end="")
    failed = _print_checks(err, run_sft_checks(cfg))
    if failed and (dry_run or not skip_checks):
        hint = "" if dry_run else "; fix them or pass --skip-checks"
        raise FvqaError(f"{len(failed)} check(s) failed ({', '.join(c.name for c in failed)}){hint}")
    if dry_run:
        err.print("dry run: nothing launched (all required checks passed)")
        raise typer.Exit(0)
    done = sft.finished_step(cfg)
    if done is not None:
        err.print(f"already trained: the newest checkpoint is step {done} (trainer.total_training_steps="
                  f"{cfg.trainer.total_training_steps}); nothing launched", highlight=False)
    code = launcher.launch(cmd, env) if done is None else 0
    ckpt = launcher.checkpoint_dir(cfg)
    latest = launcher.latest_checkpoint(cfg)
    err.print(f"checkpoints: {latest or f'none yet under {ckpt}'}", highlight=False)
    link = sft.link_hf_model(cfg) if code == 0 else None
    if link is not None:
        err.print(f"SFT model (transformers folder; use it as GRPO's actor_rollout_ref.model.path): {link}",
                  highlight=False)
    if env.get("VERL_FILE_LOGGER_PATH") and Path(env["VERL_FILE_LOGGER_PATH"]).is_file():
        err.print(f"per-step metrics: {env['VERL_FILE_LOGGER_PATH']}", highlight=False)
    raise typer.Exit(code)
