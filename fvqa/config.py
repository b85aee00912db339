"""Typed run configuration loaded from YAML.

Every section forbids unknown keys, so a typo (`crawl.max_sid`) is an error naming its path instead
of a silently ignored setting. Secrets never appear here: only the *names* of environment variables
that hold them (`api_key_env`). Loading (YAML, `--set`, error lines, relative paths: against the
config file's folder) is `fvqa.configfile`'s, shared with the eval config. With a demo `world`, the
stage paths left unset are filled from the world's folder at load (`_world_defaults`), so
`fvqa config show` prints the files the stages will read.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fvqa.configfile import DEFAULT_WORKSPACE, HUB_ID_OR_PATH, load_yaml_config, resolve_paths
from fvqa.errors import ConfigDeprecation
from fvqa.llm.config import LLMConfig
from fvqa.protocol import Limits
from fvqa.search.config import SearchConfig


class Section(BaseModel):
    """Base for config sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class WorldConfig(Section):
    """The bundled offline demo world; generated on first use when `generate` is true.

    `path` left unset is `<workspace>/demo-world` (filled by `RunConfig`), so it follows `-w`."""

    path: Path = DEFAULT_WORKSPACE / "demo-world"
    generate: bool = True
    seed: int = 0
    n_entities: int = 240
    # scale runs (bench/bench_paper_scale.py): grow the vocabulary, caption pool and InfoSeek file
    vocab_size: int | None = None
    captions: int | None = None
    infoseek_rows: int | None = None


class ConceptsConfig(Section):
    """MetaCLIP vocabulary -> sampled head/tail concepts (fvqa.pipelines.concepts)."""

    enabled: bool = True
    metadata_path: Path | None = None  # MetaCLIP metadata.json (list of strings); default: the demo world's
    counts_path: Path | None = None  # entry counts json: list aligned with entries, or dict entry -> count
    use_match_counts: bool = False  # take counts from the `match` stage's `entry_counts` table instead
    categories_path: Path | None = None  # optional json/jsonl concept -> category; demo: entities.jsonl
    threshold: int = Field(20_000, ge=1)  # MetaCLIP's head/tail threshold t: head = count >= t
    n: int = Field(10_000, ge=0)  # concepts to sample (paper: 10,000)
    head_fraction: float = Field(0.5, ge=0, le=1)  # share of n drawn from the head; the rest from the tail
    zero_fraction: float = Field(0.0, ge=0, le=1)  # share of n drawn from never-matched entries
    min_chars: int = Field(3, ge=1)  # shorter entries are dropped ("too short")
    max_chars: int = Field(100, ge=1)  # longer entries are dropped ("too long")
    allow_list: Path | None = None  # text file, one entry per line: keep only these
    deny_list: Path | None = None  # text file, one entry per line: drop these
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> ConceptsConfig:
        if self.head_fraction + self.zero_fraction > 1:
            raise ValueError("head_fraction + zero_fraction must be <= 1")
        return self


class MatchConfig(Section):
    """Optional MetaCLIP-style substring matching over a caption pool."""

    enabled: bool = False
    pool: Path | None = None  # parquet with url, caption[, page_url]
    processes: int = Field(2, ge=1)
    balance: bool = False
    candidates_per_concept: int = Field(8, ge=0)
    seed: int = 0
    shard_rows: int = Field(100_000, ge=1)  # executor ray: pool rows per shard (one task of a worker)


class CrawlConfig(Section):
    """Find, download, dedup and CLIP-verify one image (and its page) per concept (fvqa.pipelines.crawl)."""

    enabled: bool = True
    source: Literal["local", "urls", "web_search"] = "local"
    manifest: Path | None = None  # local: image manifest jsonl {path, title, url, page_url}; default: demo world
    pages: Path | None = None  # local: pages jsonl {url, html_path | wikipedia_content}; default: beside manifest
    candidates_table: str = "match_candidates"  # urls: table with (concept_id | entry_id), url[, page_url]
    candidates_per_concept: int = Field(4, ge=1)
    # image checks and re-encoding
    max_side: int = Field(768, ge=16)  # resize so the longer side is at most this
    min_side: int = Field(64, ge=1)  # smaller images are rejected ("too small")
    max_pixels: int = Field(64_000_000, ge=1)  # decompression-bomb guard, checked before decoding
    jpeg_quality: int = Field(90, ge=1, le=100)
    phash_distance: int = Field(4, ge=-1)  # near-duplicate if perceptual-hash Hamming distance <= this (-1: off)
    # downloader
    max_bytes: int = Field(20_000_000, ge=1)
    timeout_s: float = Field(20.0, gt=0)  # whole request (connect + all bytes), per attempt
    retries: int = Field(3, ge=0)  # extra attempts on 429/5xx/timeouts/connection errors
    backoff_s: float = Field(0.5, ge=0)  # first retry delay; doubles per attempt
    max_retry_after_s: float = Field(60.0, ge=0)  # a longer Retry-After gives up instead of waiting
    concurrency: int = Field(32, ge=1)
    per_host_concurrency: int = Field(4, ge=1)
    per_host_interval_s: float = Field(0.0, ge=0)  # minimum gap between request starts on one host
    respect_robots: bool = True
    user_agent: str = "fvqa-crawler/0.1 (research dataset builder)"
    allow_private: bool = False  # allow loopback/private/link-local addresses (tests, intranets)
    fetch_pages: bool = True  # download the source page and extract its main text
    # CLIP verification
    clip_model: str = "ViT-B-32"  # any open_clip model name, or fvqa-tiny (random-weight mechanics)
    clip_pretrained: str | None = "openai"  # None: random weights (scores then mean nothing)
    clip_threshold: float | None = None  # None: keep the best image regardless of score
    clip_prompts: list[str] = Field(default_factory=lambda: ["a photo of {concept}.", "{concept}"])
    clip_threads: int | None = Field(None, ge=1)  # torch intra-op threads while scoring (None: torch's own)
    # web_search source (SerpAPI Google Images wire format)
    search_url: str = "https://serpapi.com/search.json"
    search_engine: str = "google_images"
    search_api_key_env: str | None = "SERPAPI_API_KEY"


class GenerateConfig(Section):
    """Question generation for crawled visual concepts (paper App. D.1 rules, enforced in code)."""

    enabled: bool = True
    backend: Literal["template", "llm"] = "template"
    llm: LLMConfig | None = None  # backend llm; None: GPT-4o at api.openai.com with OPENAI_API_KEY
    prompt_path: Path | None = None  # own prompt text with {concept}, {page_title}, {page_text}
    max_answer_words: int = Field(12, ge=1)
    send_image: bool = True  # attach the crawled image to the prompt
    batch_wait_s: float | None = None  # llm.batch: stop polling after this long (None: wait); re-run collects


class InfoseekConfig(Section):
    """InfoSeek sampling (files in the official format)."""

    enabled: bool = True
    jsonl: Path | None = None  # infoseek_train.jsonl; default: the demo world's
    withkb: Path | None = None
    qtype: Path | None = None
    image_dir: Path | None = None
    image_pattern: str = "{image_id}.jpg"
    n: int = Field(7_000, ge=0)
    per_entity: int = Field(3, ge=1)
    # strata sampled evenly; knowledge_type comes from `knowledge_types` or a MiniLM pre-tag of entity_text
    stratify: list[Literal["question_type", "knowledge_type"]] = Field(
        default_factory=lambda: ["question_type", "knowledge_type"])
    knowledge_types: Path | None = None  # jsonl/csv with entity_id and knowledge_type columns
    seed: int = 0

    @field_validator("image_pattern")
    @classmethod
    def _one_field_pattern(cls, v: str) -> str:
        """The pattern may name only `{image_id}`: anything else is a one-line config error at load."""
        try:
            v.format(image_id="x")
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"{v!r} may only contain the field {{image_id}} (failed on {exc!s})") from None
        return v


class TagConfig(Section):
    """Knowledge-type tagging."""

    enabled: bool = True
    backend: Literal["minilm", "llm"] = "minilm"
    llm: LLMConfig | None = None  # backend llm; None: GPT-4o at api.openai.com with OPENAI_API_KEY
    taxonomy: dict[str, str] | None = None  # type -> one-line definition; default: the paper's eight
    subtypes: dict[str, dict[str, str]] | None = None  # optional level 2: type -> {subtype: definition}
    batch_wait_s: float | None = None  # llm.batch: stop polling after this long (None: wait); re-run collects


class ProbeConfig(Section):
    """Search-need probing: k rollouts with search and k direct per item, or the popularity prior.

    `popularity` (offline default) labels from MetaCLIP counts and says so in every row
    (`probe_method='popularity-prior'`); the model backends run the search agent (fvqa.agent).
    """

    enabled: bool = True
    backend: Literal["popularity", "openai", "transformers", "vllm"] = "popularity"
    k: int = Field(8, ge=1)
    llm: Any = None  # openai backend: fvqa.llm.config.LLMConfig (endpoints, model, ...)
    model_path: Annotated[Path | None, HUB_ID_OR_PATH] = None  # transformers / vllm: local model folder or hub id
    device: str = "cpu"  # transformers backend
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(1.0, ge=0)  # paper: sampled rollouts
    top_p: float = Field(1.0, gt=0, le=1)
    prompts: list[Path] | None = None  # prompt files/folders (fvqa.protocol.load_prompts)
    limits: Limits = Field(default_factory=Limits)  # the same rollout limits as eval and training
    # popularity prior: head concepts (>= head_threshold matches) are search-free; fact questions on
    # torso concepts (>= torso_threshold) need text search, on tail concepts image + text search
    head_threshold: int = 20_000
    torso_threshold: int = 1_000
    counts_path: Path | None = None  # MetaCLIP entry counts json; default: concepts.counts_path / world
    seed: int = 0

    @field_validator("llm", mode="before")
    @classmethod
    def _llm_config(cls, v: Any) -> Any:
        from fvqa.llm.config import LLMConfig  # lazy: the LLM layer is only needed by this backend

        return None if v is None else LLMConfig.model_validate(v)

    @model_validator(mode="before")
    @classmethod
    def _flat_limits(cls, data: Any) -> Any:
        """Older configs set `probe.max_rounds` etc. directly: read them as `probe.limits.*`."""
        flat = [k for k in _FLAT_LIMITS if isinstance(data, dict) and k in data]
        if not flat:
            return data
        if "limits" in data:
            raise ValueError(f"set the limits once: probe.limits or the deprecated probe.{flat[0]}, not both")
        warnings.warn(f"probe.{', probe.'.join(flat)}: deprecated, write them under probe.limits",
                      ConfigDeprecation, stacklevel=2)
        data = dict(data)
        data["limits"] = {k: data.pop(k) for k in flat}
        return data


_FLAT_LIMITS = ("max_rounds", "max_image_search", "max_text_search", "image_search_first_round_only")


class DistillBalance(Section):
    """How kept trajectories are balanced (`fvqa.pipelines.distill_select`)."""

    per_item: int = Field(1, ge=1)  # at most this many kept trajectories per item
    # no search label keeps more than max_ratio x the trajectories of the smallest non-empty label
    max_ratio: float | None = Field(1.0, ge=1.0)  # None: no ratio cap
    max_per_label: int | None = Field(None, ge=1)  # absolute cap per search label (None: none)
    # which search patterns a label's items may keep: `compatible` = search-free items only without
    # search, search-required items only with some search; `exact` = the pattern the label names; `any`
    label_rule: Literal["compatible", "exact", "any"] = "compatible"
    seed: int = 0


class DistillConfig(Section):
    """SFT cold start: a teacher runs the search protocol on chosen items; correct, format-valid
    trajectories are kept, balanced by search pattern and label (fvqa.pipelines.distill)."""

    enabled: bool = False
    # openai: any OpenAI-compatible VLM (GPT-4o, `vllm serve`); transformers / vllm: a local model;
    # scripted-teacher: the offline demo's stand-in over the demo world (fvqa.demo.teacher)
    backend: Literal["openai", "transformers", "vllm", "scripted-teacher"] = "openai"
    llm: Any = None  # openai backend: fvqa.llm.config.LLMConfig; None: GPT-4o with OPENAI_API_KEY
    model_path: Annotated[Path | None, HUB_ID_OR_PATH] = None  # transformers / vllm
    device: str = "cpu"
    split: str = "train"  # the items distilled: this split of the `dataset` view
    max_items: int | None = Field(None, ge=1)  # None: every item of the split (else a seeded, label-interleaved sample)
    k: int = Field(4, ge=1)  # attempts per item
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    prompts: list[Path] | None = None  # the same prompt files as the probe / training
    limits: Limits = Field(default_factory=Limits)
    format_rule: Literal["limits", "upstream"] = "limits"  # fvqa.protocol.format_rules
    balance: DistillBalance = Field(default_factory=DistillBalance)
    seed: int = 0

    @field_validator("llm", mode="before")
    @classmethod
    def _llm_config(cls, v: Any) -> Any:
        from fvqa.llm.config import LLMConfig

        return None if v is None else LLMConfig.model_validate(v)


class SplitConfig(Section):
    """Balancing and leakage-free train/test split (defaults: the paper's FVQA-train/test sizes)."""

    enabled: bool = True
    train_size: int = Field(5_000, ge=0)
    train_search_required: int = Field(3_400, ge=0)
    train_search_free: int = Field(1_600, ge=0)
    train_sources: list[str] | None = None  # None: every source may go to train
    test_per_source: dict[str, int] = Field(
        default_factory=lambda: {"metaclip": 600, "infoseek": 600, "manual": 600}
    )
    strata: list[Literal["knowledge_type", "source"]] = Field(
        default_factory=lambda: ["knowledge_type", "source"]
    )
    question_key: Literal["question_answer", "question"] = "question_answer"
    phash_distance: int = 4  # near-duplicate images: Hamming distance <= this (-1: off)
    contamination_files: list[Path] = Field(default_factory=list)  # benchmark jsonl/json/parquet/csv
    seed: int = 0

    @model_validator(mode="after")
    def _train_sum(self) -> SplitConfig:
        if self.train_search_required + self.train_search_free != self.train_size:
            raise ValueError(
                f"train_search_required ({self.train_search_required}) + train_search_free "
                f"({self.train_search_free}) must equal train_size ({self.train_size})"
            )
        return self


class ExportConfig(Section):
    """Which export formats a build writes at its end."""

    enabled: bool = True
    formats: list[Literal["native", "upstream", "hf", "sft"]] = Field(
        default_factory=lambda: ["native", "upstream", "hf"]
    )
    include_unassigned: bool = True
    sft_val_fraction: float = Field(0.0, ge=0, lt=1)  # sft: share of items (seeded) written to val.parquet
    # hf: the dataset card's `license` (a Hub license id: cc-by-4.0, cc-by-sa-4.0, apache-2.0, other...)
    # and `pretty_name`; set the license your sources allow before publishing
    license: str = Field("cc-by-4.0", min_length=1, pattern=r"^\S+$")
    pretty_name: str = Field("FVQA (fvqa build)", min_length=1)


class AnnotateConfig(Section):
    """`fvqa annotate` review rounds."""

    # pre-fill review tasks with the pipeline's labels (knowledge type, search need, question, aliases)
    # as Label Studio predictions. Off by default: pre-filled values anchor annotators and inflate
    # agreement; each round records the mode it was pushed with.
    prefill: bool = False


class IndexConfig(Section):
    """The local search index over a page corpus (`search.backend: local`)."""

    enabled: bool = True
    corpus: Path | None = None  # Wiki6M-style or {url,title,text} jsonl; default: the demo world's pages
    images: Path | None = None  # image manifest jsonl or folder; default: the demo world's manifest


class RayConfig(Section):
    """Where and how `executor: ray` runs the map-shaped work of match, crawl, index and the probe.

    With `address` unset a Ray instance is started on this machine for the build (and stopped at its
    end); with an address (`auto`, `ray://head:10001`) the build joins that cluster. Workers read and
    write the workspace's files (images, caches), so on several machines the workspace and the
    inputs must be on storage every node sees at the same path (README, "Scaling out on Ray").
    """

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)  # CPUs of the Ray started here (address unset); default: all
    workers: int | None = Field(None, ge=1)  # workers per stage; default: the cluster's CPUs // cpus_per_worker
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # e.g. 1 for a probe with a vLLM engine in each worker
    max_retries: int = Field(3, ge=0)  # a dead worker is restarted and its shard re-run this often
    temp_dir: Path | None = None  # the local Ray's session folder; default: a short one under /tmp


class RunConfig(Section):
    """A whole `fvqa build` run."""

    workspace: Path = DEFAULT_WORKSPACE
    seed: int = 0
    world: WorldConfig | None = None
    batch_size: int = 64
    # where the map-shaped stage work runs (match, crawl, index, model probe): this process, or Ray
    executor: Literal["local", "ray"] = "local"
    ray: RayConfig = Field(default_factory=RayConfig)
    concepts: ConceptsConfig = Field(default_factory=ConceptsConfig)
    match: MatchConfig = Field(default_factory=MatchConfig)
    crawl: CrawlConfig = Field(default_factory=CrawlConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    infoseek: InfoseekConfig = Field(default_factory=InfoseekConfig)
    tag: TagConfig = Field(default_factory=TagConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)  # search tools of probe/eval/train (fvqa.search)

    @model_validator(mode="after")
    def _paths(self, info: ValidationInfo) -> RunConfig:
        resolve_paths(self, info.context)  # relative to the config file first, then the world's defaults
        if self.world is not None and "path" not in self.world.model_fields_set:
            self.world.path = self.workspace / "demo-world"
        _world_defaults(self)
        return self

    def section_hash(self, name: str) -> str:
        """Stable hash of one section (recorded in `runs` to tell which settings produced rows)."""
        section = getattr(self, name, None)
        payload = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Demo-world defaults: a stage path left unset reads this file of `world.path`. `when` (if given) must
# hold on the config as written; `optional` files are filled only when present (or when the world is
# still to be generated), as the stages used them only if they were there.
_WORLD_DEFAULTS: tuple[tuple[str, str, Callable[[RunConfig], bool] | None, bool], ...] = (
    # field                    file in the world                      when                                optional
    ("concepts.metadata_path", "metaclip/metadata.json", None, False),
    ("concepts.counts_path", "metaclip/entry_counts.json", lambda c: not c.concepts.use_match_counts, False),
    ("concepts.categories_path", "entities.jsonl", lambda c: c.concepts.metadata_path is None, True),
    ("match.pool", "web/caption_pool.parquet", None, False),
    ("crawl.manifest", "web/images.jsonl", None, False),
    ("index.corpus", "web/pages.jsonl", None, False),
    ("index.images", "web/images.jsonl", None, False),
    ("infoseek.jsonl", "infoseek/infoseek_train.jsonl", None, False),
    ("infoseek.withkb", "infoseek/infoseek_train_withkb.jsonl", lambda c: c.infoseek.jsonl is None, True),
    ("infoseek.qtype", "infoseek/infoseek_train_qtype.jsonl", lambda c: c.infoseek.jsonl is None, True),
    ("infoseek.image_dir", "infoseek/images", None, False),
    ("probe.counts_path", "metaclip/entry_counts.json", lambda c: c.concepts.counts_path is None, True),
)


def _world_defaults(config: RunConfig) -> None:
    """Fill the unset stage paths: from the demo world (table above); probe counts from concepts'."""
    world = config.world.path if config.world is not None else None
    if world is not None:
        pending = not (world / "world.json").exists()  # generated before the first stage runs
        fills = [(key, world / rel) for key, rel, when, optional in _WORLD_DEFAULTS
                 if _get(config, key) is None and (when is None or when(config))
                 and (not optional or pending or (world / rel).exists())]
        for key, path in fills:
            section, name = key.split(".")
            setattr(getattr(config, section), name, path)
    counts = config.concepts.counts_path
    if config.probe.counts_path is None and counts is not None and counts.is_file():
        config.probe.counts_path = counts  # the popularity prior reads the concepts' counts file if there


def _get(config: RunConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _under(path: Path, root: Path) -> Path | None:
    """`path` relative to `root` when it lies inside it (compared as absolute, normalised paths)."""
    try:
        return Path(os.path.normpath(path.absolute())).relative_to(os.path.normpath(root.absolute()))
    except ValueError:
        return None


def _rebased(node: Any, old: Path, new: Path) -> Any:
    """`node` with every Path inside `old` moved to the same place inside `new` (models in place)."""
    if isinstance(node, PurePath):
        rel = _under(Path(node), old)
        return node if rel is None else new / rel
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            value = getattr(node, name)
            moved = _rebased(value, old, new)
            if moved is not value:
                object.__setattr__(node, name, moved)  # no re-validation, fields_set unchanged
        return node
    if isinstance(node, list):
        moved_list = [_rebased(v, old, new) for v in node]
        return moved_list if any(a is not b for a, b in zip(moved_list, node, strict=True)) else node
    if isinstance(node, dict):
        moved_dict = {k: _rebased(v, old, new) for k, v in node.items()}
        return moved_dict if any(moved_dict[k] is not v for k, v in node.items()) else node
    return node


def move_workspace(config: RunConfig, workspace: Path) -> RunConfig:
    """Point `config` at another workspace (`-w`): every path inside the old workspace (the demo
    world, the search index, caches, whether defaulted or written as `../fvqa-work/...`) moves to
    the same place inside the new one; paths outside it stay as configured."""
    old = config.workspace
    _rebased(config, old, Path(workspace))
    config.workspace = Path(workspace)
    return config


def load_config(path: Path | str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a YAML run config; raise ConfigError with one clear line on any problem.

    `overrides` are `--set` assignments (`crawl.max_side=512`, `search.local.index_dir=ix`,
    `split.contamination_files.0=x.jsonl`). Relative paths written in the file resolve against its
    folder; paths given with `--set` (and defaults) against the current working directory; with no
    file (`path=None`), everything against the working directory.
    """
    return load_yaml_config(RunConfig, path, overrides)


_SECRET_WORDS = ("password", "passwd", "secret", "api_key", "apikey", "credential", "private_key")
_SECRET_NAMES = ("token", "authorization", "bearer")


def is_secret_key(key: str) -> bool:
    """Whether a config key names a credential: `api_key`, `password`, `*_secret`, `token`, `hf_token`,
    `access_token`... but never a count such as `max_tokens` / `max_new_tokens` / `*_tokens`, nor the
    *name* of an environment variable (`api_key_env`)."""
    lowered = key.lower().replace("-", "_")
    if lowered.endswith("_env"):
        return False
    if lowered in _SECRET_NAMES or any(w in lowered for w in _SECRET_WORDS):
        return True
    return lowered.endswith("_token")  # hf_token, access_token; `question_key` etc. are not secrets


def redacted(config: RunConfig) -> dict[str, Any]:
    """Config as plain data with anything secret-looking masked (env var *names* are kept)."""

    def walk(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        if node and is_secret_key(key):
            return "***"
        return node

    return walk(config.model_dump(mode="json"))
