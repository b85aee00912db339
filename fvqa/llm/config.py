"""Typed settings for one set of OpenAI-compatible endpoints (GPT-4o, vLLM, SGLang...).

Stage configs embed `LLMConfig`. It holds only the *name* of the environment variable with the API
key, never the key, so a config file can be shared and committed safely.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fvqa.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Endpoint(_Section):
    """One server speaking the OpenAI wire format; `base_url` ends before `/chat/completions`."""

    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = "OPENAI_API_KEY"  # None: no key (typical for a private vLLM server)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    def api_key(self) -> str | None:
        """Read the key from the environment at use time; a named but unset variable is an error."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"environment variable {self.api_key_env} is not set (needed for LLM endpoint {self.base_url})"
            )
        return key


class Price(_Section):
    """Dollars per million tokens; `batch_factor` scales Batch API calls (OpenAI: half price)."""

    input_per_1m: float = Field(2.5, ge=0)
    output_per_1m: float = Field(10.0, ge=0)
    batch_factor: float = Field(0.5, ge=0)

    def usd(self, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float:
        """Cost of one call with these token counts."""
        usd = (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6
        return usd * (self.batch_factor if batch else 1.0)


class LLMConfig(_Section):
    """Endpoints, model and request policy shared by every LLM-backed stage."""

    endpoints: list[Endpoint] = Field(default_factory=lambda: [Endpoint()], min_length=1)
    model: str = "gpt-4o"
    max_concurrency: int = Field(16, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0)
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(512, ge=1)
    image_max_side: int = Field(768, ge=16)
    price: Price = Field(default_factory=Price)
    batch: bool = False  # use the Batch API (bulk stages; results arrive within 24 h at half price)
    json_schema: bool = True  # endpoint supports response_format json_schema (OpenAI, vLLM, SGLang)
    backoff_base_s: float = Field(0.5, ge=0)  # first retry delay; doubles per attempt
    backoff_max_s: float = Field(30.0, ge=0)
    health_cooldown_s: float = Field(30.0, ge=0)  # skip an endpoint this long after it failed
    batch_poll_s: float = Field(30.0, gt=0)
    extra_body: dict[str, Any] = Field(default_factory=dict)  # passed through, e.g. vLLM's top_k
