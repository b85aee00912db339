"""Typed settings for one set of OpenAI-compatible endpoints (GPT-4o, vLLM, SGLang...).

Stage configs embed `LLMConfig`. It holds only the *name* of the environment variable with the API
key, never the key, so a config file can be shared and committed safely.

Prices are per endpoint: `Endpoint.price` if set, else the config-level `price` if the config sets
one, else $0 for a self-hosted endpoint (loopback or private address, `localhost`, or a single-label
host name such as a compose service `vllm`) and the model's own list price (`fvqa.llm.prices`) for a
public one. A public endpoint serving a model without a known price must be priced in the config.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fvqa.errors import ConfigError
from fvqa.llm.prices import list_price


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Price(_Section):
    """Dollars per million tokens; `batch_factor` scales Batch API calls (OpenAI: half price)."""

    input_per_1m: float = Field(2.5, ge=0)
    output_per_1m: float = Field(10.0, ge=0)
    batch_factor: float = Field(0.5, ge=0)

    def usd(self, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float:
        """Cost of one call with these token counts."""
        usd = (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6
        return usd * (self.batch_factor if batch else 1.0)


class Endpoint(_Section):
    """One server speaking the OpenAI wire format; `base_url` ends before `/chat/completions`.

    `price` bills the calls this endpoint answers; None takes the config-level `price` if the config
    sets one, else $0 for a self-hosted endpoint (see `self_hosted`) and list prices for others."""

    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = "OPENAI_API_KEY"  # None: no key (typical for a private vLLM server)
    price: Price | None = None

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

    @property
    def self_hosted(self) -> bool:
        """True for a loopback or private address (127.0.0.1, localhost, 10.x, 172.16-31.x,
        192.168.x, fc00::/7, link-local) or a single-label host name (`http://vllm:8000`): a server
        of one's own, not a paid API. Decided from the URL alone (no DNS lookup)."""
        host = (urlsplit(self.base_url).hostname or "").lower()
        if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return bool(host) and "." not in host
        return ip.is_private or ip.is_loopback or ip.is_link_local


FREE = Price(input_per_1m=0.0, output_per_1m=0.0)


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
    price: Price | None = None  # for endpoints without their own `price`; None: the model's list price
    batch: bool = False  # use the Batch API (bulk stages; results arrive within 24 h at half price)
    json_schema: bool = True  # endpoint supports response_format json_schema (OpenAI, vLLM, SGLang)
    backoff_base_s: float = Field(0.5, ge=0)  # first retry delay; doubles per attempt
    backoff_max_s: float = Field(30.0, ge=0)
    health_cooldown_s: float = Field(30.0, ge=0)  # skip an endpoint this long after it failed
    batch_poll_s: float = Field(30.0, gt=0)
    batch_transfer_timeout_s: float = Field(600.0, gt=0)  # Batch API file upload/download (not timeout_s)
    batch_online_fallback: bool = False  # failed batch lines: online now at full price (else next batch)
    extra_body: dict[str, Any] = Field(default_factory=dict)  # passed through, e.g. vLLM's top_k

    @model_validator(mode="after")
    def _priced(self) -> LLMConfig:
        if self.price is None and list_price(self.model) is None:
            public = [ep.base_url for ep in self.endpoints if ep.price is None and not ep.self_hosted]
            if public:
                raise ValueError(
                    f"no list price known for model {self.model!r} at {public[0]}: set price "
                    "{input_per_1m, output_per_1m} (dollars per 1M tokens) in this llm section")
        return self

    def price_for(self, endpoint: Endpoint) -> Price:
        """The price of a call `endpoint` answers: its own `price`; else this config's `price` when
        the config sets it; else $0 if the endpoint is self-hosted, the model's list price if not."""
        if endpoint.price is not None:
            return endpoint.price
        if self.price is not None:
            return self.price
        if endpoint.self_hosted:
            return FREE
        known = list_price(self.model)
        assert known is not None  # checked at load (`_priced`)
        return Price(input_per_1m=known[0], output_per_1m=known[1])

    def price_at(self, base_url: str | None) -> Price:
        """`price_for` the endpoint with this `base_url` (None or unknown: the first endpoint's)."""
        for ep in self.endpoints:
            if ep.base_url == base_url:
                return self.price_for(ep)
        return self.price_for(self.endpoints[0])

    def free_endpoints(self) -> list[str]:
        """Base URLs priced at $0 because they are self-hosted and no price was set (for notes)."""
        return [ep.base_url for ep in self.endpoints if ep.price is None and self.price is None and ep.self_hosted]
