"""Typed config of an evaluation run (`fvqa eval run --config C`).

Kept apart from the build's `RunConfig`: an eval config names models, benchmark files, workflows and
the judge, and nothing of the build. Unknown keys are errors naming their path, as everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fvqa.errors import ConfigError
from fvqa.llm.config import LLMConfig
from fvqa.protocol import Limits

Workflow = Literal["direct", "rag", "on_demand"]
BenchmarkKind = Literal["fvqa", "infoseek", "mmsearch", "simplevqa", "livevqa"]
Metric = Literal["judge", "official", "em", "subem"]
WORKFLOWS: tuple[str, ...] = ("direct", "rag", "on_demand")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Section):
    """One model under test: an OpenAI-compatible endpoint (vLLM, GPT-4o) or a local model."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    backend: Literal["openai", "transformers", "vllm"] = "openai"
    llm: LLMConfig | None = None  # openai backend
    model_path: Path | None = None  # transformers / vllm
    device: str = "cpu"

    @model_validator(mode="after")
    def _backend_needs(self) -> ModelSpec:
        if self.backend == "openai" and self.llm is None:
            raise ValueError(f"model {self.name!r}: backend openai needs an llm section (endpoints, model)")
        if self.backend != "openai" and self.model_path is None:
            raise ValueError(f"model {self.name!r}: backend {self.backend} needs model_path")
        return self


class BenchmarkSpec(_Section):
    """One benchmark file in its official format (see `fvqa.eval.benchmarks`)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")  # task name in reports
    kind: BenchmarkKind
    path: Path
    image_dir: Path | None = None  # where image paths/ids resolve (default: the file's folder)
    qtype: Path | None = None  # InfoSeek question types (default: <file>_qtype.jsonl next to it)
    subset: Path | None = None  # optional list of ids to keep (InfoSeek's 2k test subset): txt/jsonl
    split: str | None = None  # FVQA native export: keep rows of this split (default test, if a split column)
    language: str | None = None  # SimpleVQA: keep this language (default EN, as the paper)
    image_only: bool = True  # MMSearch: only questions with a query image (the paper's 171)
    limit: int | None = Field(None, ge=1)


class JudgeSpec(_Section):
    """The pinned LLM judge (paper App. D.6 rules; prompt texts ours, overridable)."""

    enabled: bool = True
    llm: LLMConfig | None = None  # required when enabled
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(0.1, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    prompt_path: Path | None = None  # YAML with `judge` and/or `simplevqa_grader` texts

    @model_validator(mode="after")
    def _needs_llm(self) -> JudgeSpec:
        if self.enabled and self.llm is None:
            raise ValueError("judge.enabled needs judge.llm (endpoints and a pinned model), or set enabled: false")
        return self


class SamplingSpec(_Section):
    """Decoding of the model under test; greedy by default (stated in the report)."""

    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    seed: int | None = None


class EvalConfig(_Section):
    """A whole evaluation: models x benchmarks x workflows, scored and reported."""

    workspace: Path = Path("fvqa-work")
    run: str = Field("default", pattern=r"^[A-Za-z0-9._-]+$")  # a name; re-running it resumes
    models: list[ModelSpec] = Field(min_length=1)
    benchmarks: list[BenchmarkSpec] = Field(min_length=1)
    workflows: list[Workflow] = Field(default_factory=lambda: list(WORKFLOWS), min_length=1)
    primary_metric: Metric = "judge"
    judge: JudgeSpec = Field(default_factory=lambda: JudgeSpec(enabled=False))
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    limits: Limits = Field(default_factory=Limits)  # on-demand limits, the same model as probe and training
    prompts: list[Path] | None = None  # prompt files/folders (fvqa.protocol.load_prompts)
    search: dict[str, Any] = Field(default_factory=lambda: {"backend": "local"})  # {backend, options}
    batch_size: int = Field(32, ge=1)
    seed: int = 0  # sampling of --limit subsets
    limit: int | None = Field(None, ge=1)  # per benchmark, unless the benchmark sets its own
    bootstrap_resamples: int = Field(1000, ge=10)

    @field_validator("workflows")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _checks(self) -> EvalConfig:
        for what, names in (("model", [m.name for m in self.models]), ("benchmark", [b.name for b in self.benchmarks])):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"duplicate {what} name(s): {', '.join(sorted(dup))}")
        if self.primary_metric == "judge" and not self.judge.enabled:
            raise ValueError("primary_metric is judge but the judge is disabled (set primary_metric: official)")
        return self


def _format(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        parts.append(f"unknown key '{path}'" if err["type"] == "extra_forbidden" else f"'{path}': {err['msg']}")
    return f"{source}: " + "; ".join(parts)


def load_eval_config(path: Path | str, overrides: list[str] | None = None) -> EvalConfig:
    """Read and validate an eval config; relative paths resolve against the config's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML in {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for assignment in overrides or []:
        if "=" not in assignment:
            raise ConfigError(f"--set expects key=value, got '{assignment}'")
        dotted, raw = assignment.split("=", 1)
        node = data
        keys = dotted.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    try:
        cfg = EvalConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, str(path))) from exc
    return _resolve_paths(cfg, path.parent)


def _resolve_paths(cfg: EvalConfig, base: Path) -> EvalConfig:
    def fix(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else (base / p)

    for b in cfg.benchmarks:
        for name in ("path", "image_dir", "qtype", "subset"):
            value = getattr(b, name)
            if value is not None and not value.is_absolute():
                setattr(b, name, fix(value))
    for m in cfg.models:
        if m.model_path is not None and not m.model_path.is_absolute() and (base / m.model_path).exists():
            m.model_path = base / m.model_path
    if cfg.prompts:
        cfg.prompts = [p if p.is_absolute() else base / p for p in cfg.prompts]
    if cfg.judge.prompt_path is not None and not cfg.judge.prompt_path.is_absolute():
        cfg.judge.prompt_path = base / cfg.judge.prompt_path
    return cfg
