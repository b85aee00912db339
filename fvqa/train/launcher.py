"""`fvqa train run`: compose the veRL config, check the machine, print and run the exact command.

The command is veRL's own entry point (``python -m verl.trainer.main_ppo --config-path DIR
--config-name NAME overrides...``), so a run launched here is a plain veRL run that anyone can
repeat by copying the printed line. Composition uses Hydra in-process with the same search path
veRL uses (``hydra.searchpath: [pkg://verl.trainer.config]`` in our config), so the printed config is
what ``main_ppo ... --cfg job`` prints, without paying for veRL's import. Before launching, every
check (``fvqa.train.checks``) is reported, and any failure stops the launch with a reason a person
can act on.

What the launcher adds to a plain veRL run, all visible in the printed command: the agent-loop
registry, absolute data/model/output paths (Ray workers do not share the caller's folder), the
environment that loads fvqa's veRL extensions (``VERL_USE_EXTERNAL_MODULES``), and for
``trainer.device=cpu`` the CPU backend (``fvqa.train.cpu``) with logical Ray GPUs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from fvqa.errors import ConfigError, FvqaError
from fvqa.train.checks import is_cpu

ENTRY_MODULE = "verl.trainer.main_ppo"
AGENT_LOOP_CONFIG_KEY = "actor_rollout_ref.rollout.agent.agent_loop_config_path"
RAY_ADDRESS_KEY = "ray_kwargs.ray_init.address"


def agent_loop_config_path() -> Path:
    """Absolute path of the packaged agent-loop registry file (same path on every node of a cluster)."""
    return Path(str(resources.files("fvqa.train").joinpath("configs", "agent_loops.yaml"))).resolve()


def launch_overrides(config: Path, ray_address: str | None = None, extra: list[str] | None = None) -> list[str]:
    """Overrides the launcher adds (agent-loop registry, Ray address) followed by the user's own."""
    overrides = [f"{AGENT_LOOP_CONFIG_KEY}={agent_loop_config_path()}"]
    if ray_address:
        overrides.append(f"{RAY_ADDRESS_KEY}={ray_address}")
    return overrides + list(extra or [])


def _resolve_config(config: Path) -> Path:
    config = Path(config).expanduser().resolve()
    if not config.is_file():
        raise ConfigError(f"training config not found: {config}")
    if config.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"training config must be a .yaml file, got {config.name}")
    return config


def build_command(config: Path, overrides: list[str], python: str | None = None) -> list[str]:
    """The exact veRL command line for a config file and overrides."""
    config = _resolve_config(config)
    return [
        python or sys.executable, "-m", ENTRY_MODULE,
        "--config-path", str(config.parent), "--config-name", config.stem, *overrides,
    ]


def compose(config: Path, overrides: list[str]) -> Any:
    """Compose the job config exactly as veRL's Hydra entry point would (an OmegaConf DictConfig)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config = _resolve_config(config)
    try:
        with initialize_config_dir(config_dir=str(config.parent), version_base=None):
            return hydra_compose(config_name=config.stem, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        why = " ".join(lines[:2]) if lines else type(exc).__name__  # Hydra's hint (e.g. "use +key=") is line 2
        raise ConfigError(f"cannot compose {config.name}: {why}") from exc


def validate(cfg: Any) -> None:
    """veRL's own config validation (batch-size divisibility etc.) and the dataclass conversions the
    workers do at start-up, plus our ``fvqa:`` section - all CPU-only. fvqa's veRL extensions are
    loaded first, as they are in every process of the run (a ``sigmoid`` LR schedule is theirs)."""
    from hydra.errors import InstantiationException
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    import fvqa.train.verl_ext  # noqa: F401 - installs what EXTENSION_MODULES installs in the run
    from fvqa.train.agent_loop import LoopSettings

    try:
        # veRL prints its verdict and warns about the critic; keep stdout for the config alone.
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
        omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    except (AssertionError, ValueError, TypeError, InstantiationException) as exc:
        raise ConfigError(f"veRL rejects the composed config: {exc}") from exc
    LoopSettings.from_trainer_config(cfg)


EXTENSIONS_ENV = "VERL_USE_EXTERNAL_MODULES"
EXTENSION_MODULES = ("fvqa.train.verl_ext",)
"""fvqa's veRL extensions, imported by veRL itself in every process (``import verl`` reads the env)."""
CPU_MODULE = "fvqa.train.cpu.enable"
CPU_RAY_CPUS = 16
"""Logical Ray CPUs of a CPU run: veRL's actors each ask for some; 2 real cores serve them in turn."""
PATH_KEYS = ("data.train_files", "data.val_files", "actor_rollout_ref.model.path", "trainer.default_local_dir",
             "trainer.rollout_data_dir", "trainer.validation_data_dir")


def extension_env(cfg: Any, cpu_vars: dict[str, str]) -> dict[str, str]:
    """The environment a veRL run of ours needs (GRPO's and SFT's): fvqa's extension modules, on CPU
    the CPU backend with `cpu_vars`, and the per-launch metrics file when the file logger is on."""
    modules = [*EXTENSION_MODULES]
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if is_cpu(cfg):
        modules.append(CPU_MODULE)
        # veRL registers its FSDP engine for cuda/npu only; on the cpu platform the same engine
        # runs, with every device call going through the platform.
        env.update({"VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda", **cpu_vars})
    env[EXTENSIONS_ENV] = ",".join(modules)
    if "file" in list(cfg.trainer.get("logger") or []):
        env["VERL_FILE_LOGGER_PATH"] = str(metrics_path(cfg))
    return env


def launch_env(cfg: Any) -> dict[str, str]:
    """Environment variables the run needs on top of the caller's (printed before the command)."""
    return extension_env(cfg, {"OMP_NUM_THREADS": "1", "FVQA_CPU_ROLLOUT_THREADS": str(os.cpu_count() or 1),
                               "RAY_DEDUP_LOGS": "0"})


def metrics_path(cfg: Any) -> Path:
    """Where this launch's per-step metrics go (veRL's file logger truncates its file: one per launch)."""
    return checkpoint_dir(cfg) / "metrics" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def absolute_path_overrides(cfg: Any, keys: Sequence[str], model_key: str) -> list[str]:
    """`key=<absolute path>` for each relative path among `keys` (a printed command must run from
    anywhere); a `model_key` value that is no local folder is a hub name and stays as it is."""
    out = []
    for key in keys:
        value = _select(cfg, key)
        if isinstance(value, str) and "://" not in value:
            path = Path(value).expanduser()
            if key == model_key and not path.exists():
                continue  # a hub name (Qwen/Qwen2.5-VL-7B-Instruct), resolved by veRL on the GPU box
            if not path.is_absolute():
                out.append(f"{key}={path.resolve()}")
    return out


def runtime_overrides(cfg: Any) -> list[str]:
    """Overrides that depend on the composed config: absolute paths, and the CPU backend's Ray resources."""
    out = absolute_path_overrides(cfg, PATH_KEYS, "actor_rollout_ref.model.path")
    if is_cpu(cfg):
        gpus = int(cfg.trainer.nnodes) * int(cfg.trainer.n_gpus_per_node)
        out += [f"++ray_kwargs.ray_init.num_gpus={gpus}", f"++ray_kwargs.ray_init.num_cpus={CPU_RAY_CPUS}",
                "++ray_kwargs.ray_init.include_dashboard=false"]
    return out


def format_command(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """A shell line a person can copy (environment assignments first)."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join([*prefix, *(shlex.quote(c) for c in cmd)])


AGENT_LOOP_ERROR = re.compile(r"Error in _run_prompt|Error in agent loop|ValueError: Multimodal prompt")
EXCEPTION_LINE = re.compile(r"^(?:\S+ pid=\d+\S*\s+)?(?:\x1b\[[0-9;]*m)*\s*([A-Za-z_.]*(?:Error|Exception)\b.*)$")


class _ErrorWatch:
    """Remembers the first agent-loop failure in veRL's output: the trainer itself only says later
    that no trajectory could be used, which names the symptom, not the cause."""

    def __init__(self) -> None:
        self.armed = False
        self.error: str | None = None

    def feed(self, line: str) -> None:
        if self.error is not None:
            return
        if AGENT_LOOP_ERROR.search(line):
            self.armed = True
        if self.armed and (m := EXCEPTION_LINE.match(line.strip())) and "Traceback" not in line:
            self.error = m.group(1).strip()


def launch(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run veRL in the foreground, its output passed through; its exit code becomes ours.

    On failure the first agent-loop error seen is repeated at the end as one line.
    """
    full_env = {**os.environ, **(env or {})}
    if full_env.get("VERL_FILE_LOGGER_PATH"):
        Path(full_env["VERL_FILE_LOGGER_PATH"]).parent.mkdir(parents=True, exist_ok=True)  # veRL does not
    watch = _ErrorWatch()
    try:
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, errors="replace")
    except OSError as exc:
        raise FvqaError(f"cannot start {cmd[0]}: {exc}") from exc
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            watch.feed(line)
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        raise
    sys.stdout.flush()
    if code != 0 and watch.error:
        print(f"fvqa: a rollout failed inside veRL's agent loop: {watch.error}", file=sys.stderr, flush=True)
    return code


def checkpoint_dir(cfg: Any) -> Path:
    """The run's checkpoint folder (``trainer.default_local_dir``)."""
    return Path(str(cfg.trainer.default_local_dir)).expanduser().resolve()


def latest_checkpoint(cfg: Any) -> Path | None:
    """The newest ``global_step_N`` folder veRL recorded, if any."""
    root = checkpoint_dir(cfg)
    marker = root / "latest_checkpointed_iteration.txt"
    if not marker.is_file():
        return None
    step = marker.read_text(encoding="utf-8").strip()
    path = root / f"global_step_{step}"
    return path if path.is_dir() else None
