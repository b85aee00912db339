"""Typed settings for the search tools (backend choice, local index, web API, cache, service).

`SearchConfig` *is* the `search` section of the build's and the eval's configs
(`search: {backend: local, local: {index_dir: ...}, top_k: 5}`), validated with the rest of the file:
unknown keys are errors naming their path. The older `{backend, options: {...}}` form still loads
(with a DeprecationWarning). Secrets are never here: only the *names* of environment variables that
hold them. This module must not import `fvqa.config` (which imports it): the `fvqa search` commands
read a config file's `search` and `workspace` through `SearchFile` instead.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from fvqa.configfile import DEFAULT_WORKSPACE, format_validation, load_yaml_config, resolve_paths
from fvqa.errors import ConfigDeprecation, ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalConfig(_Section):
    """The offline index built by `fvqa search index build` (BM25 text + CLIP image vectors)."""

    index_dir: Path | None = None
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = None  # None: random weights (mechanics only; known-item still works)
    device: str = "cpu"
    batch_size: int = Field(32, ge=1)
    thumbnail_max_side: int = Field(256, ge=16)
    text_field_chars: int = Field(30_000, ge=100)  # page text kept for summaries (upstream: first 30k)
    # image search: exact cosine scan below this many vectors; above, an IVF index (fvqa.search.ann)
    # built with the index and searched over its `ann_nprobe` nearest lists (more: higher recall, slower)
    ann_min_vectors: int = Field(50_000, ge=1)
    ann_nprobe: int = Field(32, ge=1)


class ReaderConfig(_Section):
    """Fetching result pages for text search (SSRF-guarded) and extracting their main text."""

    timeout_s: float = Field(15.0, gt=0)
    max_bytes: int = Field(5_000_000, ge=1_000)
    max_chars: int = Field(30_000, ge=100)  # upstream summarises the first 30,000 characters
    allow_private: bool = False  # loopback/private/link-local targets refused unless true (tests)
    concurrency: int = Field(5, ge=1)
    user_agent: str = "fvqa-search/0.1 (+https://github.com/fvqa)"


class WebConfig(_Section):
    """SerpAPI (Google Lens for images, Google for text) over httpx."""

    base_url: str = "https://serpapi.com"
    api_key_env: str = "SERPAPI_API_KEY"
    image_engine: str = "google_lens"
    text_engine: str = "google"
    lens_input: Literal["url", "upload"] = "url"
    # upload mode: POST the image bytes (multipart field `upload_field`) to a host of yours that
    # answers with JSON holding the public URL at `upload_response_key`; Lens then fetches that URL.
    upload_url: str | None = None
    upload_field: str = "file"
    upload_response_key: str = "url"
    fetch_thumbnails: bool = True
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(2, ge=0)
    usd_per_call: float = Field(0.015, ge=0)  # SerpAPI: $75 per 5,000 searches
    params: dict[str, str] = Field(default_factory=dict)  # extra query params (hl, gl, location...)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    def api_key(self) -> str:
        """The key, read from the environment at use time; unset is a clear error, never a silent miss."""
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"environment variable {self.api_key_env} is not set (needed for the web search backend)")
        return key


class ReplayConfig(_Section):
    """Upstream's released image-search caches (pickles keyed by data_id)."""

    paths: list[Path] = Field(default_factory=list)
    fetch_thumbnails: bool = False  # download `tool_returned_images_urls` when no image is embedded


class CacheConfig(_Section):
    """Persistent search cache (SQLite, WAL) in front of every backend."""

    enabled: bool = True
    dir: Path | None = None  # default: <workspace>/cache/search
    ttl_s: float | None = None  # None: entries never expire
    max_mb: float = Field(2_048, gt=0)
    error_ttl_s: float = Field(86_400, ge=0)  # deterministic page failures are remembered this long


class ServiceConfig(_Section):
    """`fvqa search serve` and the HTTP client."""

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    url: str = "http://127.0.0.1:8765"  # where the HTTP client finds the service
    max_image_bytes: int = Field(10_000_000, ge=1_000)
    max_query_chars: int = Field(1_000, ge=1)
    image_concurrency: int = Field(4, ge=1)
    text_concurrency: int = Field(8, ge=1)
    rate_per_s: float | None = None  # paid calls per second across all clients; None: unlimited
    timeout_s: float = Field(120.0, gt=0)


class SummarizerConfig(_Section):
    """How text search summarises each result page with respect to the question.

    `extractive` (offline default): the page's lead plus its best BM25 sentences. `llm`: a prompt to an
    OpenAI-compatible endpoint (upstream used Qwen3-32B, e.g. behind `vllm serve`), through the same
    client, response cache (`<workspace>/cache/llm`) and cost accounting as every stage."""

    kind: Literal["extractive", "llm"] = "extractive"
    llm: Any = None  # kind llm: fvqa.llm.config.LLMConfig; None: its defaults (GPT-4o, OPENAI_API_KEY)
    max_sentences: int | None = Field(None, ge=1)  # None: search.summary_sentences
    max_chars: int | None = Field(None, ge=100)  # page characters summarised; None: search.reader.max_chars
    max_tokens: int | None = Field(None, ge=1)  # reply limit; None: the llm's max_tokens
    prompt: str | None = None  # may use {question}, {page}, {max_sentences}; None: the built-in prompt

    @field_validator("llm", mode="before")
    @classmethod
    def _llm_config(cls, v: Any) -> Any:
        from fvqa.llm.config import LLMConfig  # lazy: only the llm summariser needs the LLM layer

        return None if v is None else LLMConfig.model_validate(v)

    @model_validator(mode="after")
    def _llm_defaults(self) -> SummarizerConfig:
        if self.kind == "llm" and self.llm is None:
            from fvqa.llm.config import LLMConfig

            self.llm = LLMConfig()
        return self


class SearchConfig(_Section):
    """Everything the search tools need; `backend` picks where results come from."""

    backend: Literal["local", "web", "replay", "http"] = "local"
    top_k: int = Field(5, ge=1, le=50)
    candidates: int = Field(10, ge=1, le=100)  # text results requested; failed pages are replaced from these
    local: LocalConfig = Field(default_factory=LocalConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    reader: ReaderConfig = Field(default_factory=ReaderConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    summary_sentences: int = Field(5, ge=1)
    summarizer: SummarizerConfig = Field(default_factory=SummarizerConfig)

    merged_sections: ClassVar[frozenset[str]] = frozenset({"options"})  # see fvqa.configfile.resolve_paths

    @model_validator(mode="wrap")
    @classmethod
    def _options_form(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> SearchConfig:
        """Read the deprecated `{backend, options: {...}}` form: `options` merges into the section.

        Errors inside the merged keys keep the path the user wrote (`search.options.local.index_dri`).
        """
        if not isinstance(data, dict) or "options" not in data:
            return handler(data)
        options = data["options"] if data["options"] is not None else {}
        if not isinstance(options, dict):
            raise ValueError(f"options must be a mapping, got {type(options).__name__} "
                             "(deprecated: write its keys directly in the search section)")
        both = sorted(set(options) & (set(data) - {"options"}))
        if both:
            raise ValueError(f"{', '.join(both)} set both directly and under options: write each once, "
                             "directly in the search section (options is deprecated)")
        warnings.warn("search.options is deprecated: write its keys directly in the search section "
                      "(search: {backend: local, local: {index_dir: ...}})", ConfigDeprecation, stacklevel=2)
        merged = {k: v for k, v in data.items() if k != "options"} | options
        try:
            return handler(merged)
        except ValidationError as exc:
            raise _under_options(exc, set(options)) from None

    @classmethod
    def from_section(cls, section: Any) -> SearchConfig:
        """Compat shim for callers holding a plain dict (either form): validate it; errors name `search.*`."""
        if isinstance(section, SearchConfig):
            return section
        if isinstance(section, BaseModel):
            section = section.model_dump()
        try:
            return cls.model_validate(section or {})
        except ValidationError as exc:
            raise ConfigError(format_validation(exc, "search config", prefix="search.")) from exc


def _under_options(exc: ValidationError, moved: set[str]) -> ValidationError:
    """`exc` with the locations of errors in keys that came from `options` put back under `options`."""
    details: list[InitErrorDetails] = []
    for err in exc.errors():
        loc = err["loc"]
        detail = InitErrorDetails(type=err["type"], loc=("options", *loc) if loc and loc[0] in moved else loc,
                                  input=err["input"])
        if "ctx" in err:
            detail["ctx"] = err["ctx"]
        details.append(detail)
    try:
        return ValidationError.from_exception_data(exc.title, details)
    except (KeyError, TypeError, ValueError):  # an error type pydantic cannot rebuild: keep the original
        return exc


class SearchFile(BaseModel):
    """What the `fvqa search` commands read from any fvqa config file (build or eval): `search`, `workspace`.

    Other top-level sections are not theirs and are ignored; `search` is validated in full.
    """

    model_config = ConfigDict(extra="ignore")

    workspace: Path = DEFAULT_WORKSPACE
    search: SearchConfig = Field(default_factory=SearchConfig)

    @model_validator(mode="after")
    def _paths(self, info: ValidationInfo) -> SearchFile:
        resolve_paths(self, info.context)
        return self

    @property
    def cache_dir(self) -> Path:
        """`search.cache.dir`, by default `<workspace>/cache/search`."""
        return self.search.cache.dir or (self.workspace / "cache" / "search")


def load_search_file(path: Path | str | None, overrides: list[str] | None = None) -> SearchFile:
    """`search` and `workspace` of a config file (None: defaults), with `--set search.*|workspace=` overrides."""
    for assignment in overrides or []:
        top = re.split(r"[.\[]", assignment.split("=", 1)[0].strip(), maxsplit=1)[0]  # a.b or a[0]
        if "=" in assignment and top not in SearchFile.model_fields:
            raise ConfigError(f"--set {assignment.split('=', 1)[0].strip()}: the search commands read only "
                              "search.* and workspace")
    return load_yaml_config(SearchFile, path, overrides)
