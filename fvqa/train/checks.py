"""Pre-launch checks for `fvqa train run`: each says what was checked and what to do if it failed.

A failure here costs seconds; the same mistake on a rented GPU node costs the time to load a 7B
model and start Ray before veRL stops with a message about something else (an empty dataloader,
"no materializable trajectories"). Required checks stop the launch and make ``--dry-run`` exit
non-zero; warnings are printed.
"""

from __future__ import annotations

import importlib.util
import io
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fvqa.train.agent_loop import LoopSettings


@dataclass(frozen=True)
class Check:
    """One pre-launch check: what was checked, whether it passed, and what to do if not."""

    name: str
    ok: bool
    detail: str
    required: bool = True


def is_cpu(cfg: Any) -> bool:
    """A CPU run (``trainer.device=cpu``): fvqa's CPU backend for veRL, logical Ray GPUs."""
    return str(cfg.trainer.get("device") or "cuda") == "cpu"


def files(value: Any) -> list[str]:
    """``data.train_files`` / ``val_files`` as a list (veRL takes a path or a list of paths)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def check_data(cfg: Any) -> list[Check]:
    """Train/val parquet files exist (relative paths are resolved from the current directory)."""
    out = []
    for key in ("train_files", "val_files"):
        paths = files(cfg.data.get(key))
        missing = [f for f in paths if "://" not in f and not Path(f).expanduser().exists()]
        if not paths:
            out.append(Check(f"data.{key}", False, "not set"))
        elif missing:
            out.append(Check(f"data.{key}", False, f"missing {', '.join(missing)}: run `fvqa train prepare`"))
        else:
            out.append(Check(f"data.{key}", True, ", ".join(paths)))
    return out


def _local_files(cfg: Any, key: str) -> list[Path] | None:
    paths = files(cfg.data.get(key))
    local = [Path(f).expanduser() for f in paths if "://" not in f]
    return local if paths and len(local) == len(paths) and all(p.is_file() for p in local) else None


def check_batch_size(cfg: Any) -> Check:
    """At least one full batch of training rows (veRL drops the last partial batch)."""
    import pyarrow.parquet as pq

    local = _local_files(cfg, "train_files")
    if local is None:
        return Check("train batch", False, "train files not readable here: not checked", required=False)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in local)
    batch = int(cfg.data.train_batch_size)
    if rows < batch:
        return Check("train batch", False, f"data.train_batch_size={batch} but only {rows} train rows: veRL would "
                     "stop with 'Train dataloader is empty!'; lower the batch size or prepare more rows")
    return Check("train batch", True, f"{rows} train rows, {rows // batch} step(s) per epoch at batch {batch}")


def _prompt_tokens(processor: Any, row: dict[str, Any]) -> int:
    """Tokens of a row's round-1 prompt as the rollout sees it: chat template plus vision tokens."""
    from PIL import Image

    content = row["prompt"][-1]["content"]
    images = row.get("images") or []
    parts: list[dict[str, Any]] = []
    for i, text in enumerate(content.split("<image>")):
        if i:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                         tokenize=False)
    n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    ip = processor.image_processor
    merge = int(getattr(ip, "merge_size", 2) or 2)
    for image in images:
        with Image.open(io.BytesIO(image["bytes"])) as im:
            width, height = im.size
        n += ip.get_number_of_image_patches(height, width, {}) // (merge * merge) - 1  # the pad counted once
    return n


def check_prompt_length(cfg: Any) -> Check:
    """The longest tokenized round-1 prompt fits ``data.max_prompt_length``.

    Too short and every rollout fails inside veRL's agent loop while the trainer only reports
    "no materializable trajectories".
    """
    import pyarrow.parquet as pq

    model = Path(str(cfg.actor_rollout_ref.model.path)).expanduser()
    local = _local_files(cfg, "train_files")
    if local is None or not model.is_dir():
        why = "train files not readable here" if local is None else f"model {model} is not a local folder"
        return Check("prompt length", False, f"{why}: not checked", required=False)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model))
    longest, where = 0, ""
    for path in local + (_local_files(cfg, "val_files") or []):
        for row in pq.read_table(path, columns=["prompt", "images"]).to_pylist():
            n = _prompt_tokens(processor, row)
            if n > longest:
                longest, where = n, path.name
    limit = int(cfg.data.max_prompt_length)
    if longest > limit:
        return Check("prompt length", False, f"the longest round-1 prompt ({where}) is {longest} tokens > "
                     f"data.max_prompt_length={limit}: raise it, or re-prepare with a smaller --image-max-pixels")
    return Check("prompt length", True, f"longest round-1 prompt {longest} tokens <= {limit}")


def check_prompts(cfg: Any) -> Check:
    """The rows were prepared with the same opening prompt the rollout's follow-up prompts belong to.

    `train prepare` bakes the round-1 prompt into every row; the agent loop adds the follow-up
    prompts from ``fvqa.prompts``. Mixing upstream's prompts with ours would train on a protocol
    nobody wrote, so a mismatch fails the check.
    """
    from fvqa.protocol import load_prompts
    from fvqa.train.prepare import prompt_fingerprint

    paths = files(cfg.data.get("train_files"))
    manifest = Path(paths[0]).expanduser().parent / "manifest.json" if paths else None
    if manifest is None or not manifest.is_file():
        return Check("prompts", False, "no manifest.json next to data.train_files (written by `fvqa train prepare`)",
                     required=False)
    try:
        made_with = json.loads(manifest.read_text(encoding="utf-8")).get("round_1_sha256")
    except (OSError, ValueError) as exc:
        return Check("prompts", False, f"{manifest} unreadable: {exc}", required=False)
    settings = LoopSettings.from_trainer_config(cfg)
    prompt_paths = [settings.prompts] if isinstance(settings.prompts, str) else settings.prompts
    ours = prompt_fingerprint(load_prompts([Path(p) for p in prompt_paths] if prompt_paths else None))
    if made_with != ours:
        return Check("prompts", False, "data was prepared with another round-1 prompt than fvqa.prompts gives: "
                     "re-run `fvqa train prepare --prompts ...` with the same prompts")
    return Check("prompts", True, "data and rollout use the same prompt set")


ENGINE_MODULES = {"hf": "transformers"}
"""Python module behind each rollout engine name, where it is not the name itself."""


def check_packages(cfg: Any) -> list[Check]:
    """Packages the run imports: veRL, Ray, TransferQueue, the rollout engine, flash-attn (optional)."""
    engine = str(cfg.actor_rollout_ref.rollout.name)
    wanted = [("verl", True), ("ray", True), ("transfer_queue", True), (ENGINE_MODULES.get(engine, engine), True),
              ("flash_attn", not is_cpu(cfg) and bool(cfg.actor_rollout_ref.model.get("use_remove_padding")))]
    out = []
    for module, required in wanted:
        found = importlib.util.find_spec(module) is not None
        hint = "" if found else f"not installed: pip install {module.replace('_', '-')}"
        out.append(Check(f"package {module}", found, "importable" if found else hint, required))
    if is_cpu(cfg) and out[0].ok:
        out.append(check_cpu_backend())
    return out


def check_cpu_backend() -> Check:
    """The installed veRL is the one fvqa's CPU backend was checked against (it uses private hooks)."""
    from fvqa.train.cpu import VERL_VERSION, UnsupportedVerlError, check_verl_version

    try:
        check_verl_version()
    except UnsupportedVerlError as exc:
        return Check("CPU backend", False, str(exc))
    return Check("CPU backend", True, f"verl {VERL_VERSION}, the version fvqa.train.cpu was checked against")


def check_gpus(cfg: Any, ray_address: str | None = None, cpu_config: str = "configs/grpo_demo_cpu.yaml") -> Check:
    """This node has the GPUs one node of the run needs (a cluster's other nodes are Ray's business)."""
    need = int(cfg.trainer.n_gpus_per_node)
    if is_cpu(cfg):
        return Check("GPUs", True, f"trainer.device=cpu: {need} trainer process(es) as logical Ray GPUs, "
                     "no accelerator needed")
    try:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # noqa: BLE001 - a broken CUDA install is reported, not raised
        return Check("GPUs", False, f"cannot query CUDA: {exc}")
    where = f" (cluster at {ray_address}: other nodes are checked by Ray)" if ray_address else ""
    if have < need:
        return Check("GPUs", False, f"need {need} per node (trainer.n_gpus_per_node), found {have}{where}; "
                     f"to check the setup without GPUs use trainer.device=cpu ({cpu_config})")
    return Check("GPUs", True, f"{have} visible, {need} per node needed{where}")


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_search_reach(cfg: Any) -> Check:
    """Rollout workers on every node can reach the search service (not a loopback URL across nodes)."""
    settings = LoopSettings.from_trainer_config(cfg)
    nnodes = int(cfg.trainer.nnodes)
    url = settings.search_url
    if nnodes > 1 and (url is None or _is_loopback(url)):
        where = url or "a service the launcher would start on 127.0.0.1"
        return Check("search reach", False, f"trainer.nnodes={nnodes} but fvqa.search_url is {where}: rollout "
                     "workers on other nodes cannot reach it; run `fvqa search serve --host <this node's cluster "
                     "address>` and set fvqa.search_url=http://<address>:<port>")
    return Check("search reach", True, f"{nnodes} node(s), search at {url or 'a service started for the run'}")


def check_reward_limits(cfg: Any) -> Check:
    """The reward scores with the rollout's limits and format rule (``fvqa.limits``, ``fvqa.format_rule``)."""
    from omegaconf import OmegaConf

    from fvqa.protocol import Limits

    settings = LoopSettings.from_trainer_config(cfg)
    kwargs = OmegaConf.to_container(cfg.reward.custom_reward_function.get("reward_kwargs") or {}, resolve=True)
    problems = []
    try:
        reward_limits = Limits.model_validate(kwargs.get("limits") or {}) if "limits" in kwargs else None
    except ValueError as exc:
        return Check("reward limits", False, f"reward_kwargs.limits is invalid: {exc}")
    if reward_limits != settings.limits:
        problems.append(f"reward_kwargs.limits={None if reward_limits is None else reward_limits.model_dump()} "
                        f"but fvqa.limits={settings.limits.model_dump()}")
    if kwargs.get("format_rule", "limits") != settings.format_rule:
        problems.append(f"reward_kwargs.format_rule={kwargs.get('format_rule', 'limits')!r} but "
                        f"fvqa.format_rule={settings.format_rule!r}")
    if problems:
        return Check("reward limits", False, "; ".join(problems) + ": set reward_kwargs.limits: ${fvqa.limits} and "
                     "format_rule: ${fvqa.format_rule} so the reward allows what the rollout allows")
    return Check("reward limits", True, f"reward and rollout share limits and format rule {settings.format_rule!r}")


def check_search_service(cfg: Any, timeout_s: float = 5.0) -> Check:
    """The search service at ``fvqa.search_url`` answers its health check (or one will be started)."""
    import httpx

    settings = LoopSettings.from_trainer_config(cfg)
    url = settings.search_url
    if not url:
        if not settings.search_config:
            return Check("search service", False, "fvqa.search_url and fvqa.search_config are both unset: "
                         "point search_url at `fvqa search serve`, or name a run config to serve")
        return Check("search service", True, f"started for the run over {settings.search_config}'s search section")
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
        check_batch_size(cfg),
        check_prompt_length(cfg),
        check_prompts(cfg),
        check_reward_limits(cfg),
        check_search_reach(cfg),
        check_search_service(cfg),
    ]
