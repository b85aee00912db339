"""Typed config of an evaluation run (`fvqa eval run --config C`).

Kept apart from the build's `RunConfig`: an eval config names models, benchmark files, workflows and
the judge, and nothing of the build. Loading is the build's (`fvqa.configfile`): unknown keys are
errors naming their path, relative paths in the file resolve against its folder, and `search` is the
same typed `SearchConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fvqa.configfile import DEFAULT_WORKSPACE, HUB_ID_OR_PATH, load_yaml_config, resolve_paths
from fvqa.llm.config import LLMConfig
from fvqa.protocol import Limits
from fvqa.search.config import SearchConfig

Workflow = Literal["direct", "rag", "on_demand"]
BenchmarkKind = Literal["fvqa", "infoseek", "mmsearch", "simplevqa", "livevqa"]
Metric = Literal["judge", "official", "em", "subem"]
Protocol = Literal["fvqa", "paper"]
AnswerFormat = Literal["tags", "plain"]
JudgeStyle = Literal["fvqa", "paper"]
WORKFLOWS: tuple[str, ...] = ("direct", "rag", "on_demand")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Section):
    """One model under test: an OpenAI-compatible endpoint (vLLM, GPT-4o) or a local model."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    backend: Literal["openai", "transformers", "vllm"] = "openai"
    llm: LLMConfig | None = None  # openai backend
    model_path: Annotated[Path | None, HUB_ID_OR_PATH] = None  # transformers / vllm: folder or hub id
    device: str = "cpu"
    # how direct and RAG answers are read: `tags` (<answer>...</answer>, fvqa's and upstream's protocol)
    # or `plain` (the reply is the answer, as the paper's baselines); None: the run's protocol decides
    # (fvqa: tags; paper: plain). On-demand search always uses the tags: its tools are called with them.
    answer_format: AnswerFormat | None = None
    prompts: list[Path] | None = None  # this model's prompt files over the run's (upstream's folder for
    # MMSearch-R1 checkpoints: their exact on-demand texts)

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
    answers: Path | None = None  # InfoSeek Human split: re-annotated answers by data_id (jsonl/json)
    split: str | None = None  # FVQA native export: keep rows of this split (default test, if a split column)
    language: str | None = None  # SimpleVQA: keep this language (default EN, as the paper)
    image_only: bool = True  # MMSearch: only questions with a query image (the paper's 171)
    limit: int | None = Field(None, ge=1)


class JudgeSpec(_Section):
    """The pinned LLM judge (paper App. D.6 rules; prompt texts ours, overridable).

    Style `fvqa` grades the extracted answer, text only. Style `paper` grades as the paper's GPT-4o
    judge (App. F.3): it sees the question's image and the model's whole final response. None: the
    run's protocol decides. `compare_fvqa` (default: on under the paper style) also runs fvqa's judge
    on the same predictions, reported beside the paper-style verdict (column `judge (fvqa)`).
    """

    enabled: bool = True
    style: JudgeStyle | None = None
    compare_fvqa: bool | None = None
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

    workspace: Path = DEFAULT_WORKSPACE
    run: str = Field("default", pattern=r"^[A-Za-z0-9._-]+$")  # a name; re-running it resumes
    # `fvqa`: fvqa's tagged prompts and text-only judge; `paper`: the MMSearch-R1 paper's protocol
    # (plain-answer prompts for base models, the judge sees the image and the whole response)
    protocol: Protocol = "fvqa"
    notes: list[str] = Field(default_factory=list)  # printed first in the report (e.g. what a demo stands in for)
    models: list[ModelSpec] = Field(min_length=1)
    benchmarks: list[BenchmarkSpec] = Field(min_length=1)
    workflows: list[Workflow] = Field(default_factory=lambda: list(WORKFLOWS), min_length=1)
    primary_metric: Metric = "judge"
    judge: JudgeSpec = Field(default_factory=lambda: JudgeSpec(enabled=False))
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    limits: Limits = Field(default_factory=Limits)  # on-demand limits, the same model as probe and training
    prompts: list[Path] | None = None  # prompt files/folders (fvqa.protocol.load_prompts)
    search: SearchConfig = Field(default_factory=SearchConfig)  # {backend: local, local: {index_dir: ...}}
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

    @model_validator(mode="after")
    def _paths(self, info: ValidationInfo) -> EvalConfig:
        resolve_paths(self, info.context)
        return self


def answer_format(cfg: EvalConfig, model: ModelSpec, workflow: str) -> AnswerFormat:
    """How this model's answers are read in this workflow (on-demand search always uses the tags)."""
    if workflow == "on_demand":
        return "tags"
    return model.answer_format or ("plain" if cfg.protocol == "paper" else "tags")


def judge_style(cfg: EvalConfig) -> JudgeStyle:
    return cfg.judge.style or ("paper" if cfg.protocol == "paper" else "fvqa")


def compare_fvqa_judge(cfg: EvalConfig) -> bool:
    """Whether fvqa's own judge runs beside a paper-style judge (never twice the same style)."""
    if judge_style(cfg) == "fvqa":
        return False
    return cfg.judge.compare_fvqa if cfg.judge.compare_fvqa is not None else True


def load_eval_config(path: Path | str, overrides: list[str] | None = None) -> EvalConfig:
    """Read and validate an eval config; raise ConfigError with one clear line on any problem.

    Relative paths written in the file resolve against its folder; paths given with `--set`
    (`benchmarks.0.path=x.jsonl`) against the current working directory.
    """
    return load_yaml_config(EvalConfig, path, overrides, what="eval config")
