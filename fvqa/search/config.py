"""Typed settings for the search tools (backend choice, local index, web API, cache, service).

The run config's `search` section is `{backend, options}`; `SearchConfig.from_section` merges the two
into this model, so every option is validated (unknown keys are errors naming the key). Secrets are
never here: only the *names* of environment variables that hold them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fvqa.errors import ConfigError


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

    @classmethod
    def from_section(cls, section: Any) -> SearchConfig:
        """Build from the run config's `search: {backend, options}` section (or a plain dict)."""
        if isinstance(section, SearchConfig):
            return section
        if isinstance(section, BaseModel):
            section = section.model_dump()
        data = dict(section or {})
        options = dict(data.pop("options", None) or {})
        options.update({k: v for k, v in data.items() if v is not None})
        try:
            return cls.model_validate(options)
        except ValidationError as exc:
            from fvqa.config import format_validation

            raise ConfigError(format_validation(exc, "search config", prefix="search.")) from exc
