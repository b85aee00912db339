"""`fvqa train run`: compose the veRL config, check the machine, print and run the exact command.

The command is veRL's own entry point (``python -m verl.trainer.main_ppo --config-path DIR
--config-name NAME overrides...``), so a run launched here is a plain veRL run that anyone can
repeat by copying the printed line. Composition uses Hydra in-process with the same search path
veRL uses (``hydra.searchpath: [pkg://verl.trainer.config]`` in our config), so the printed config is
what ``main_ppo ... --cfg job`` prints, without paying for veRL's import. Before launching, every
check (GPUs, packages, data files, search service) is reported, and any failure stops the launch
with a reason a person can act on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fvqa.errors import ConfigError, FvqaError

ENTRY_MODULE = "verl.trainer.main_ppo"
AGENT_LOOP_CONFIG_KEY = "actor_rollout_ref.rollout.agent.agent_loop_config_path"
RAY_ADDRESS_KEY = "ray_kwargs.ray_init.address"


@dataclass(frozen=True)
class Check:
    """One pre-launch check: what was checked, whether it passed, and what to do if not."""

    name: str
    ok: bool
    detail: str
    required: bool = True


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
    workers do at start-up, plus our ``fvqa:`` section - all CPU-only."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    from fvqa.train.agent_loop import LoopSettings

    try:
        # veRL prints its verdict and warns about the critic; keep stdout for the config alone.
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
        omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    except (AssertionError, ValueError, TypeError) as exc:
        raise ConfigError(f"veRL rejects the composed config: {exc}") from exc
    LoopSettings.from_trainer_config(cfg)


def _files(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def check_data(cfg: Any) -> list[Check]:
    """Train/val parquet files exist (relative paths are resolved from the current directory)."""
    out = []
    for key in ("train_files", "val_files"):
        files = _files(cfg.data.get(key))
        missing = [f for f in files if "://" not in f and not Path(f).expanduser().exists()]
        if not files:
            out.append(Check(f"data.{key}", False, "not set"))
        elif missing:
            out.append(Check(f"data.{key}", False, f"missing {', '.join(missing)}: run `fvqa train prepare`"))
        else:
            out.append(Check(f"data.{key}", True, ", ".join(files)))
    return out


def check_prompts(cfg: Any) -> Check:
    """The rows were prepared with the same opening prompt the rollout's follow-up prompts belong to.

    `train prepare` bakes the round-1 prompt into every row; the agent loop adds the follow-up
    prompts from ``fvqa.prompts``. Mixing upstream's prompts with ours would train on a protocol
    nobody wrote, so a mismatch fails the check.
    """
    from fvqa.protocol import load_prompts
    from fvqa.train.agent_loop import LoopSettings
    from fvqa.train.prepare import prompt_fingerprint

    files = _files(cfg.data.get("train_files"))
    manifest = Path(files[0]).expanduser().parent / "manifest.json" if files else None
    if manifest is None or not manifest.is_file():
        return Check("prompts", False, "no manifest.json next to data.train_files (written by `fvqa train prepare`)",
                     required=False)
    try:
        made_with = json.loads(manifest.read_text(encoding="utf-8")).get("round_1_sha256")
    except (OSError, ValueError) as exc:
        return Check("prompts", False, f"{manifest} unreadable: {exc}", required=False)
    settings = LoopSettings.from_trainer_config(cfg)
    paths = [settings.prompts] if isinstance(settings.prompts, str) else settings.prompts
    ours = prompt_fingerprint(load_prompts([Path(p) for p in paths] if paths else None))
    if made_with != ours:
        return Check("prompts", False, "data was prepared with another round-1 prompt than fvqa.prompts gives: "
                     "re-run `fvqa train prepare --prompts ...` with the same prompts")
    return Check("prompts", True, "data and rollout use the same prompt set")


def check_packages(cfg: Any) -> list[Check]:
    """Packages the run imports: veRL, Ray, TransferQueue, the rollout engine, flash-attn (optional)."""
    engine = str(cfg.actor_rollout_ref.rollout.name)
    wanted = [("verl", True), ("ray", True), ("transfer_queue", True), (engine, True), ("flash_attn", False)]
    out = []
    for module, required in wanted:
        found = importlib.util.find_spec(module) is not None
        hint = "" if found else f"not installed: pip install {module.replace('_', '-')}"
        out.append(Check(f"package {module}", found, "importable" if found else hint, required))
    return out


def check_gpus(cfg: Any, ray_address: str | None = None) -> Check:
    """This node has the GPUs one node of the run needs (a cluster's other nodes are Ray's business)."""
    need = int(cfg.trainer.n_gpus_per_node)
    try:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # noqa: BLE001 - a broken CUDA install is reported, not raised
        return Check("GPUs", False, f"cannot query CUDA: {exc}")
    where = f" (cluster at {ray_address}: other nodes are checked by Ray)" if ray_address else ""
    if have < need:
        return Check("GPUs", False, f"need {need} per node (trainer.n_gpus_per_node), found {have}{where}")
    return Check("GPUs", True, f"{have} visible, {need} per node needed{where}")


def check_search_service(cfg: Any, timeout_s: float = 5.0) -> Check:
    """The search service at ``fvqa.search_url`` answers its health check."""
    import httpx

    url = str((cfg.get("fvqa") or {}).get("search_url") or "")
    if not url:
        return Check("search service", False, "fvqa.search_url is not set")
    try:
        resp = httpx.get(url.rstrip("/") + "/healthz", timeout=timeout_s, trust_env=False)
        body = resp.json() if resp.status_code == 200 else {}
    except (httpx.HTTPError, ValueError) as exc:
        return Check(
            "search service", False,
            f"{url} unreachable ({type(exc).__name__}): start it with `fvqa search serve` or set fvqa.search_url",
        )
    if resp.status_code != 200 or body.get("status") != "ok":
        return Check("search service", False, f"{url}/healthz answered HTTP {resp.status_code}: not an fvqa search service")
    return Check("search service", True, f"{url} up (backend {body.get('backend')})")


def run_checks(cfg: Any, ray_address: str | None = None) -> list[Check]:
    """Every pre-launch check, in the order they are printed."""
    return [
        check_gpus(cfg, ray_address),
        *check_packages(cfg),
        *check_data(cfg),
        check_prompts(cfg),
        check_search_service(cfg),
    ]


def format_command(cmd: list[str]) -> str:
    """A shell line a person can copy."""
    return " ".join(shlex.quote(c) for c in cmd)


def launch(cmd: list[str]) -> int:
    """Run veRL in the foreground; its exit code becomes ours."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return subprocess.call(cmd, env=env)
    except OSError as exc:
        raise FvqaError(f"cannot start {cmd[0]}: {exc}") from exc
