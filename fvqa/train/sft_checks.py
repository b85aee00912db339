"""Pre-launch checks for `fvqa train sft`: each says what was checked and what to do if it failed.

veRL's SFT trainer reads its data lazily: a missing column, an image count that does not match the
``<image>`` placeholders, or a conversation longer than ``data.max_length`` stops it at the first
batch that holds the row, after the model is loaded and sharded. These checks read the same files
with veRL's own ``MultiTurnSFTDataset`` before anything starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import random
import re
from pathlib import Path
from typing import Any

from fvqa.train.checks import Check, check_cpu_backend, check_gpus, files, is_cpu

ROLES = frozenset({"system", "user", "assistant", "tool"})
IMAGE_PLACEHOLDER = "<image>"
LENGTH_CHECK_ROWS = 256
"""Rows tokenized by the length check (all of them up to this many, else a seeded sample)."""
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _keys(cfg: Any) -> tuple[str, str]:
    return str(cfg.data.get("messages_key") or "messages"), str(cfg.data.get("image_key") or "images")


def _local(paths: list[str]) -> list[Path] | None:
    local = [Path(p).expanduser() for p in paths if "://" not in p]
    return local if paths and len(local) == len(paths) and all(p.is_file() for p in local) else None


def _scan(path: Path, messages_key: str, image_key: str) -> tuple[int, str | None]:
    """Rows of one SFT parquet and the first problem in it (columns, roles, images vs placeholders)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        return 0, f"{path} is not a readable parquet file ({type(exc).__name__}: {exc})"
    names = set(pf.schema_arrow.names)
    if messages_key not in names:
        return 0, (f"{path} has no {messages_key!r} column (has {', '.join(sorted(names))}): write it with the "
                   "SFT exporter (exports/sft)")
    columns = [messages_key] + ([image_key] if image_key in names else [])
    row = 0
    for batch in pf.iter_batches(batch_size=64, columns=columns):
        for rec in batch.to_pylist():
            messages = rec.get(messages_key) or []
            where = f"{path.name} row {row}"
            if not isinstance(messages, list) or not messages:
                return row, f"{where}: {messages_key} is empty or not a list"
            placeholders = 0
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    return row, (f"{where}: every message needs a role in {sorted(ROLES)} and a string content, "
                                 f"got {str(m)[:80]!r}")
                placeholders += m["content"].count(IMAGE_PLACEHOLDER)
            if not any(m["role"] == "assistant" for m in messages):
                return row, f"{where}: no assistant turn (nothing to train on)"
            images = rec.get(image_key) or []
            if placeholders != len(images):
                return row, (f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) "
                             f"in {image_key!r}; they must pair up in order")
            if any(not isinstance(im, dict) or not (im.get("bytes") or im.get("image")) for im in images):
                return row, f"{where}: every image must be a {{'bytes': ...}} dict"
            row += 1
    return row, None


def check_sft_data(cfg: Any) -> list[Check]:
    """Train (required) and val (optional) files exist and hold conversations veRL's dataset can read."""
    messages_key, image_key = _keys(cfg)
    out = []
    for key, required in (("train_files", True), ("val_files", False)):
        paths = files(cfg.data.get(key))
        if not paths:
            if required:
                out.append(Check(f"data.{key}", False, "not set: point it at exports/sft/train.parquet"))
            continue
        missing = [p for p in paths if "://" not in p and not Path(p).expanduser().is_file()]
        if missing:
            out.append(Check(f"data.{key}", False, f"missing {', '.join(missing)}: export the distilled "
                             "trajectories first (exports/sft/train.parquet)"))
            continue
        local = _local(paths)
        if local is None:
            out.append(Check(f"data.{key}", True, f"{', '.join(paths)} (remote: not read here)", required=False))
            continue
        rows, problem = 0, None
        for path in local:
            n, problem = _scan(path, messages_key, image_key)
            rows += n
            if problem:
                break
        out.append(Check(f"data.{key}", problem is None, problem or f"{rows} conversations in {', '.join(paths)}"))
    return out


def sft_rows(cfg: Any) -> int | None:
    """Rows in the train files, if they are local and readable."""
    import pyarrow.parquet as pq

    local = _local(files(cfg.data.get("train_files")))
    if local is None:
        return None
    try:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in local)
    except Exception:  # noqa: BLE001 - reported by check_sft_data
        return None


def check_sft_batch(cfg: Any) -> Check:
    """Batch sizes divide as veRL's SFT trainer splits them, and one epoch has at least one step."""
    dp = int(cfg.trainer.nnodes) * int(cfg.trainer.n_gpus_per_node)
    batch = int(cfg.data.train_batch_size)
    micro = int(cfg.data.micro_batch_size_per_gpu)
    problems = []
    if batch % dp:
        problems.append(f"data.train_batch_size={batch} is not a multiple of the {dp} data-parallel rank(s)")
    elif not cfg.data.use_dynamic_bsz and (batch // dp) % micro:
        problems.append(f"the per-rank batch {batch // dp} is not a multiple of data.micro_batch_size_per_gpu={micro}")
    if cfg.data.use_dynamic_bsz and int(cfg.data.max_token_len_per_gpu) < int(cfg.data.max_length):
        problems.append(f"data.max_token_len_per_gpu={cfg.data.max_token_len_per_gpu} < data.max_length="
                        f"{cfg.data.max_length}: a long conversation would fit no micro-batch")
    rows = sft_rows(cfg)
    if rows is not None and rows < batch:
        problems.append(f"data.train_batch_size={batch} but only {rows} train rows (veRL drops the last partial "
                        "batch, so no step would run)")
    steps = cfg.trainer.get("total_training_steps")
    epochs = int(cfg.trainer.total_epochs)
    if rows is not None and rows >= batch and steps and epochs * (rows // batch) < int(steps):
        problems.append(f"trainer.total_training_steps={steps} but {epochs} epoch(s) of {rows // batch} step(s) end "
                        "first, before the last step's checkpoint is saved: raise trainer.total_epochs")
    if problems:
        return Check("train batch", False, "; ".join(problems))
    per_epoch = f", {rows // batch} step(s) per epoch" if rows is not None else ""
    total = f", {steps} step(s) in total" if steps else f", {epochs} epoch(s)"
    return Check("train batch", True, f"batch {batch} over {dp} rank(s), micro-batch {micro}{per_epoch}{total}")


def check_sft_model(cfg: Any) -> Check:
    """``model.path`` is a local model folder veRL can load (config, tokenizer, processor), or a hub name."""
    path = Path(str(cfg.model.path)).expanduser()
    if not path.exists():
        if HUB_NAME.match(str(cfg.model.path)):
            return Check("model", False, f"{cfg.model.path} is not a local folder: veRL fetches it from the "
                         "Hugging Face Hub (or its cache) on the training node", required=False)
        return Check("model", False, f"model.path {path} does not exist: build or download the model first")
    if not (path / "config.json").is_file():
        return Check("model", False, f"model.path {path} has no config.json: not a transformers model folder")
    from verl.utils.config import omega_conf_to_dataclass

    try:
        model = omega_conf_to_dataclass(cfg.model)
    except Exception as exc:  # noqa: BLE001 - whatever stops veRL loading it, in one line
        return Check("model", False, f"veRL cannot load model.path {path}: {type(exc).__name__}: {exc}")
    kind = "processor" if getattr(model, "processor", None) is not None else "tokenizer only (text model)"
    return Check("model", True, f"{path} ({model.hf_config.architectures[0]}, {kind})")


def check_sft_lengths(cfg: Any) -> Check:
    """Conversations, tokenized by veRL's ``MultiTurnSFTDataset`` as the trainer will, fit
    ``data.max_length`` and each puts some tokens under the loss (assistant turns only)."""
    local = _local(files(cfg.data.get("train_files")))
    path = Path(str(cfg.model.path)).expanduser()
    if local is None or not (path / "config.json").is_file():
        why = "train files not readable here" if local is None else f"model {path} is not a local folder"
        return Check("sequence length", False, f"{why}: not checked", required=False)
    from transformers.utils import logging as hf_logging

    # veRL prints the dataset size and passes processor kwargs transformers warns about on every row
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return _measure_lengths(cfg, local, path)
    finally:
        hf_logging.set_verbosity(verbosity)


def _measure_lengths(cfg: Any, local: list[Path], path: Path) -> Check:
    from omegaconf import OmegaConf
    from verl.utils import hf_processor, hf_tokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    tokenizer = hf_tokenizer(str(path), trust_remote_code=bool(cfg.model.get("trust_remote_code")))
    processor = hf_processor(str(path), trust_remote_code=bool(cfg.model.get("trust_remote_code")))
    data = OmegaConf.merge(cfg.data, {"truncation": "right"})  # measure, don't raise, on a long row
    try:
        dataset = MultiTurnSFTDataset([str(p) for p in local], tokenizer, data, processor=processor)
        n = len(dataset)
        picked = range(n) if n <= LENGTH_CHECK_ROWS else sorted(random.Random(0).sample(range(n), LENGTH_CHECK_ROWS))
        longest, trained, where = 0, 0, 0
        for i in picked:
            item = dataset[i]
            length = int(item["input_ids"].shape[-1])
            if length > longest:
                longest, where = length, i
            trained += int(item["loss_mask"].sum() > 0)
    except Exception as exc:  # noqa: BLE001 - veRL's own error, as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Check("sequence length", False, f"veRL's MultiTurnSFTDataset fails on the train data: {first}")
    scope = f"{len(picked)} of {n} rows" if len(picked) < n else f"all {n} rows"
    limit = int(cfg.data.max_length)
    untrained = len(picked) - trained
    if untrained:
        return Check("sequence length", False, f"{untrained} row(s) have no token under the loss ({scope} checked)")
    if longest >= limit and str(cfg.data.get("truncation") or "error") == "error":
        return Check("sequence length", False, f"row {where} is {longest}+ tokens > data.max_length={limit} "
                     f"({scope} checked): raise data.max_length or set data.truncation=right")
    return Check("sequence length", True, f"longest {longest} tokens <= data.max_length={limit} ({scope} checked)")


def check_sft_save(cfg: Any) -> Check:
    """Checkpoints hold a transformers folder (``hf_model``): what GRPO's ``actor_rollout_ref.model.path`` needs."""
    contents = [str(c) for c in (cfg.checkpoint.get("save_contents") or [])]
    if "hf_model" not in contents:
        return Check("hf model", False, f"checkpoint.save_contents={contents} has no hf_model: no transformers folder "
                     "would be saved for GRPO to start from; add hf_model")
    return Check("hf model", True, "each checkpoint holds a transformers folder (model, processor, chat template)")


def check_sft_nodes(cfg: Any) -> Check:
    """`fvqa train sft` launches one node (torchrun --standalone)."""
    nnodes = int(cfg.trainer.nnodes)
    if nnodes != 1:
        return Check("nodes", False, f"trainer.nnodes={nnodes}: `fvqa train sft` launches one node; on a cluster run "
                     "the printed veRL command under torchrun on every node (--nnodes/--node-rank/--rdzv-endpoint)")
    return Check("nodes", True, f"1 node, {cfg.trainer.n_gpus_per_node} process(es)")


def check_sft_packages(cfg: Any) -> list[Check]:
    """Packages veRL's SFT trainer imports: veRL, torchdata, qwen-vl-utils (images), flash-attn (optional)."""
    wanted = [("verl", True), ("torchdata", True), ("qwen_vl_utils", True)]
    if not is_cpu(cfg):
        wanted.append(("flash_attn", bool(cfg.model.get("use_remove_padding"))))
    out = []
    for module, required in wanted:
        found = importlib.util.find_spec(module) is not None
        hint = "importable" if found else f"not installed: pip install {module.replace('_', '-')}"
        out.append(Check(f"package {module}", found, hint, required))
    if is_cpu(cfg) and out[0].ok:
        out.append(check_cpu_backend())
    return out


def check_sft_gpus(cfg: Any) -> Check:
    """This node has the GPUs the run needs (on CPU: torchrun processes, no accelerator)."""
    if is_cpu(cfg):
        return Check("GPUs", True, f"trainer.device=cpu: {cfg.trainer.n_gpus_per_node} trainer process(es) under "
                     "torchrun (gloo), no accelerator needed")
    return check_gpus(cfg, cpu_config="configs/sft_demo_cpu.yaml")


def run_sft_checks(cfg: Any) -> list[Check]:
    """Every pre-launch check of an SFT run, in the order they are printed."""
    checks = [check_sft_gpus(cfg), *check_sft_packages(cfg), check_sft_nodes(cfg), check_sft_model(cfg),
              *check_sft_data(cfg)]
    data_ok = all(c.ok for c in checks if c.name == "data.train_files")
    checks.append(check_sft_batch(cfg))
    if data_ok:
        checks.append(check_sft_lengths(cfg))
    checks.append(check_sft_save(cfg))
    return checks
