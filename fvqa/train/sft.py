"""`fvqa train sft`: compose veRL's SFT config, check it, print and run veRL's own SFT trainer.

The command is veRL's multi-turn SFT entry point under torchrun (``python -m torch.distributed.run
--standalone --nproc_per_node N -m verl.trainer.sft_trainer --config-path DIR --config-name NAME
overrides...``): a run launched here is a plain veRL run anyone can repeat by copying the printed
line. Our configs (``configs/sft_*.yaml``) are Hydra primaries over veRL's ``sft_trainer_engine``
(``hydra.searchpath: [pkg://verl.trainer.config]``), composed in-process the same way as
``fvqa train run`` composes GRPO's (:func:`fvqa.train.launcher.compose`).

Data is the SFT export (``exports/sft/train.parquet``: ``messages`` with ``<image>`` placeholders,
``images``), read by veRL's ``MultiTurnSFTDataset``: the loss is on assistant turns only, so the
search results the protocol puts in user turns are context, never targets.

What the launcher adds, all visible in the printed command: absolute data/model/output paths, the
environment that loads fvqa's veRL extensions, and for ``trainer.device=cpu`` the CPU backend
(``fvqa.train.cpu``: CPU platform, gloo process group). After a run, ``<default_local_dir>/huggingface``
points at the newest checkpoint's transformers folder (model, processor, chat template): that path
is a valid ``actor_rollout_ref.model.path`` for ``fvqa train run``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from fvqa.errors import ConfigError
from fvqa.train.launcher import _resolve_config, absolute_path_overrides, checkpoint_dir, extension_env

ENTRY_MODULE = "verl.trainer.sft_trainer"
PATH_KEYS = ("data.train_files", "data.val_files", "model.path", "trainer.default_local_dir")
HF_LINK = "huggingface"
"""Name of the link, in ``trainer.default_local_dir``, to the newest checkpoint's transformers folder."""


def runtime_overrides(cfg: Any) -> list[str]:
    """Absolute data/model/output paths (torchrun workers start in the caller's folder, but a printed
    command should run from anywhere); a model path that is not a local folder is a hub name."""
    return absolute_path_overrides(cfg, PATH_KEYS, "model.path")


def build_command(config: Path, overrides: list[str], cfg: Any, python: str | None = None) -> list[str]:
    """The exact torchrun + veRL SFT command line for a config file and overrides (one node)."""
    config = _resolve_config(config)
    nproc = int(cfg.trainer.n_gpus_per_node)
    return [
        python or sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc_per_node={nproc}", "-m", ENTRY_MODULE,
        "--config-path", str(config.parent), "--config-name", config.stem, *overrides,
    ]


def launch_env(cfg: Any) -> dict[str, str]:
    """Environment variables the run needs on top of the caller's (printed before the command)."""
    procs = max(1, int(cfg.trainer.n_gpus_per_node))
    # on CPU the torchrun processes share the cores; veRL's dataset passes processor kwargs
    # transformers warns about on every row.
    return extension_env(cfg, {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // procs)),
                               "TRANSFORMERS_VERBOSITY": "error"})


def validate(cfg: Any) -> None:
    """The dataclass conversions veRL's SFT trainer does first (``SFTTrainer._build_config``), minus
    the model's, which loads its tokenizer and is a check of its own."""
    from hydra.errors import InstantiationException
    from verl.utils.config import omega_conf_to_dataclass

    for section in ("engine", "optim", "checkpoint", "profiler"):
        try:
            omega_conf_to_dataclass(cfg[section])
        except (AssertionError, ValueError, TypeError, KeyError, InstantiationException) as exc:
            raise ConfigError(f"veRL rejects the composed config's {section} section: {exc}") from exc
    interval = list(cfg.trainer.get("profile_interval") or [-1, -1])
    if len(interval) != 2:
        raise ConfigError(f"trainer.profile_interval must be [start, end], got {interval}")


def finished_step(cfg: Any) -> int | None:
    """The newest checkpoint's step when it already reaches ``trainer.total_training_steps`` (with
    ``resume_mode: auto``), else None. veRL would resume from it and train (and save) one step more."""
    from fvqa.train.launcher import latest_checkpoint

    total = cfg.trainer.get("total_training_steps")
    latest = latest_checkpoint(cfg)
    if not total or latest is None or str(cfg.trainer.get("resume_mode") or "auto") != "auto":
        return None
    step = int(latest.name.removeprefix("global_step_"))
    return step if step >= int(total) else None


def hf_model_dir(cfg: Any) -> Path | None:
    """The newest checkpoint's transformers folder, if veRL saved one (``hf_model`` in save_contents)."""
    from fvqa.train.launcher import latest_checkpoint

    latest = latest_checkpoint(cfg)
    folder = latest / "huggingface" if latest is not None else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


def link_hf_model(cfg: Any) -> Path | None:
    """Point ``<default_local_dir>/huggingface`` at the newest checkpoint's transformers folder.

    The link is relative (the run folder can move) and replaced after every run, so one path always
    names the newest SFT model. Returns the link, or None when no checkpoint has a transformers folder.
    """
    target = hf_model_dir(cfg)
    if target is None:
        return None
    link = checkpoint_dir(cfg) / HF_LINK
    if link.exists() and not link.is_symlink():
        raise ConfigError(f"{link} exists and is not a link: move it away so it can name the newest SFT model")
    tmp = link.with_name(f".{HF_LINK}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.relative_to(link.parent), target_is_directory=True)
    os.replace(tmp, link)
    return link
