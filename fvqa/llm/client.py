"""One async client for any OpenAI-compatible chat endpoint (OpenAI, vLLM, SGLang...).

Built on aiohttp rather than the `openai` SDK (or httpx): the SDK's retry loop would have to be
switched off anyway (we retry across endpoints, honour Retry-After and cache errors by class), we need
the raw reply body for the cache, and five endpoints of a stable wire format are less churn than an
SDK whose major versions move fast. aiohttp, not httpx: at 64 concurrent requests on this 2-core
machine httpx's async pool reached ~25 req/s, httpx2 (the openai SDK's transport) ~110, aiohttp ~290
of an ideal 320 (bench/bench_llm.py). Tests check wire compatibility with the official `openai` client.

Every request goes: cache -> (miss) join an identical request already in flight, else encode
images -> pick a healthy endpoint -> bounded send with per-request timeout -> retry transient
failures with exponential backoff -> cache the outcome (replies, and deterministic errors) -> record
it in the cost ledger. Failures of a request come back as a `LLMResult` with `ok=False` and a
human-readable `error`; they never raise.

A failure of the *configuration* does raise: HTTP 401/403 (the key) or 404 (the model or URL) would
fail every request the same way, so the first one raises `LLMConfigError` (a `ConfigError`: the CLI
prints one red line and exits 2), later requests of the same client raise it without sending, and it
is never cached nor turned into a reject. Until an endpoint has answered once, requests to it wait
for that first answer, so a wrong key costs one request, not `max_concurrency` of them.

Identical requests in flight at the same time (same cache key) share one call: the first sends it,
the others await its result and are counted as cache hits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from fvqa.errors import ConfigError
from fvqa.llm.cache import ResponseCache, request_key
from fvqa.llm.config import Endpoint, LLMConfig
from fvqa.llm.images import BadImageError, DataUrlEncoder, has_images, messages_for_key
from fvqa.llm.ledger import CostLedger
from fvqa.net.retry import RetryPolicy, parse_retry_after

KIND = "openai-chat"
CACHEABLE_STATUS = frozenset({400, 413, 422})  # the same request will fail the same way
CONFIG_STATUS = frozenset({401, 403, 404})  # every request will fail: the key, model or URL is wrong
CONFIG_ERROR_CLASSES = frozenset(f"http_{s}" for s in CONFIG_STATUS)  # never replayed from the cache
RETRY_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
MAX_RETRY_AFTER_S = 300.0

Messages = list[dict[str, Any]]


@dataclass
class LLMResult:
    """The outcome of one logical request (after cache and retries)."""

    ok: bool
    key: str
    text: str | None = None
    body: dict[str, Any] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error_class: str | None = None  # e.g. http_400, http_429, timeout, connection, bad_response, bad_image
    error: str | None = None
    attempts: int = 0
    endpoint: str | None = None  # base_url that answered (prices the call); None: cache or batch
    shared: bool = False  # joined an identical request in flight: not sent, not paid (a cache hit)

    @classmethod
    def from_body(cls, key: str, body: dict[str, Any], *, cached: bool, attempts: int = 0) -> LLMResult:
        choice = body["choices"][0]
        usage = body.get("usage") or {}
        return cls(
            ok=True,
            key=key,
            text=choice.get("message", {}).get("content") or "",
            body=body,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached=cached,
            attempts=attempts,
        )


class LLMConfigError(ConfigError):
    """An endpoint refused the configuration, not a request: HTTP 401/403 (`api_key_env` or the key
    it names) or 404 (`model`, or a `base_url` without `/chat/completions`). Names the endpoint,
    never the key."""

    def __init__(self, message: str, *, base_url: str, status: int) -> None:
        super().__init__(message)
        self.base_url = base_url
        self.status = status


class _Failure(Exception):
    """One failed attempt, classified."""

    def __init__(self, error_class: str, message: str, *, retry: bool, retry_after: float | None = None,
                 config: LLMConfigError | None = None):
        super().__init__(message)
        self.error_class = error_class
        self.retry = retry
        self.retry_after = retry_after
        self.config = config  # set for 401/403/404: stop everything


class _InFlight:
    """One request being sent, and how many callers await it."""

    def __init__(self, task: asyncio.Task[LLMResult]) -> None:
        self.task = task
        self.waiters = 0


class _EndpointState:
    """An endpoint, its HTTP pool and its health."""

    def __init__(self, endpoint: Endpoint, key: str | None) -> None:
        self.endpoint = endpoint
        self.key = key
        self.http: aiohttp.ClientSession | None = None
        self.down_until = 0.0  # unhealthy: skipped while another endpoint is healthy
        self.not_before = 0.0  # Retry-After: nobody sends here before this time
        self.failures = 0
        self.verified = False  # answered once with anything but 401/403/404
        self.probe: asyncio.Event | None = None  # set when the first request in flight here settles


def valid_body(body: Any) -> bool:
    """A chat completion with at least one choice carrying a message."""
    try:
        return isinstance(body["choices"][0]["message"], dict)
    except (KeyError, IndexError, TypeError):
        return False


class LLMClient:
    """Async client over one or more endpoints; use `async with LLMClient(...) as llm:`.

    `stage` names the ledger row the calls are billed to; `section` is where the config lives
    (e.g. "generate.llm"), named in errors. Set `retry_cached_errors` to resend requests whose
    deterministic error is cached (e.g. after fixing the endpoint)."""

    def __init__(
        self,
        cfg: LLMConfig,
        cache_dir: Path | str,
        *,
        ledger: CostLedger | None = None,
        stage: str = "llm",
        section: str = "llm",
        retry_cached_errors: bool = False,
    ) -> None:
        self.cfg = cfg
        self._eps = [_EndpointState(ep, ep.api_key()) for ep in cfg.endpoints]  # ConfigError if unset
        self.cache = ResponseCache(cache_dir, secrets=[ep.key for ep in self._eps if ep.key])
        self.ledger = ledger if ledger is not None else CostLedger()
        self.stage = stage
        self.section = section
        self.retry_cached_errors = retry_cached_errors
        self.encoder = DataUrlEncoder(cfg.image_max_side)
        self._rr = itertools.count()
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[str, _InFlight] = {}
        self._config_error: LLMConfigError | None = None  # sticky: this client sends nothing more

    # -- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> LLMClient:
        self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _open(self) -> None:
        """Create pools for the running loop (a client may be used by successive `asyncio.run`s)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._sem = asyncio.Semaphore(self.cfg.max_concurrency)
            self._inflight = {}
            for ep in self._eps:
                ep.http = None  # a pool from a closed loop cannot be reused
                ep.probe = None
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s, connect=min(10.0, self.cfg.timeout_s))
        for ep in self._eps:
            if ep.http is None:
                headers = {"Authorization": f"Bearer {ep.key}"} if ep.key else {}
                connector = aiohttp.TCPConnector(limit=self.cfg.max_concurrency)
                ep.http = aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)

    async def aclose(self) -> None:
        for ep in self._eps:
            if ep.http is not None:
                await ep.http.close()
                ep.http = None

    # -- keys and cache ---------------------------------------------------------------------------

    def request_params(self, messages: Messages, params: Mapping[str, Any]) -> dict[str, Any]:
        """Every body field besides model/messages; they all enter the cache key."""
        out: dict[str, Any] = {
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
            **self.cfg.extra_body,
            **params,
        }
        return out

    def key_for(self, messages: Messages, **params: Any) -> str:
        """The cache key of a request (images by content hash; max side matters when images are present)."""
        body_params = self.request_params(messages, params)
        key_params = dict(body_params)
        if has_images(messages):
            key_params["_image_max_side"] = self.cfg.image_max_side
        return request_key(KIND, self.cfg.model, messages_for_key(messages), key_params)

    def cached_count(self, requests: list[Messages], **params: Any) -> int:
        """How many of these requests would be served from the cache (for `--estimate`)."""
        return sum(self.cache.has(self.key_for(m, **params)) for m in requests)

    def lookup(self, key: str) -> LLMResult | None:
        """A cached outcome as a result, honouring `retry_cached_errors`."""
        hit = self.cache.get(key)
        if hit is None or (not hit.ok and (self.retry_cached_errors or hit.error_class in CONFIG_ERROR_CLASSES)):
            return None  # a 401/404 cached by an older fvqa said nothing about the request: ask again
        if hit.ok and valid_body(hit.body):
            return LLMResult.from_body(key, hit.body or {}, cached=True)
        if hit.ok:
            return None  # unreadable stored body: ask again
        return LLMResult(ok=False, key=key, cached=True, error_class=hit.error_class, error=hit.error)

    def record(self, res: LLMResult, *, batch: bool = False) -> LLMResult:
        """Bill one result to this client's stage, at the price of the endpoint that answered it
        (a shared in-flight result counts as a cache hit)."""
        price = self.cfg.price_at(res.endpoint)
        usd = price.usd(res.prompt_tokens, res.completion_tokens, batch=batch)
        self.ledger.record(
            self.stage,
            "llm",
            usd=usd,
            prompt_tokens=res.prompt_tokens,
            completion_tokens=res.completion_tokens,
            cached=res.cached or res.shared,
            failed=not res.ok and not res.cached and not res.shared,
            retries=max(0, res.attempts - 1),
        )
        return res

    # -- requests ---------------------------------------------------------------------------------

    async def wire_payload(self, messages: Messages, **params: Any) -> dict[str, Any]:
        """The JSON body sent to /chat/completions (images as resized data URLs)."""
        wire = (
            await asyncio.to_thread(self.encoder.wire_messages, messages)
            if has_images(messages)
            else messages
        )
        return {"model": self.cfg.model, "messages": wire, **self.request_params(messages, params)}

    async def complete(self, messages: Messages, **params: Any) -> LLMResult:
        """One chat completion: from the cache if answered before, else shared with an identical
        request in flight, else from an endpoint. Raises `LLMConfigError` on 401/403/404."""
        self._raise_if_misconfigured()
        key = self.key_for(messages, **params)
        if (hit := self.lookup(key)) is not None:
            return self.record(hit)
        self._open()
        flight = self._inflight.get(key)
        leader = flight is None
        if flight is None:  # no await between the cache lookup and here: no identical request slips by
            flight = _InFlight(asyncio.ensure_future(self._fetch(key, messages, params)))
            self._inflight[key] = flight
            flight.task.add_done_callback(lambda _t, k=key, f=flight: self._land(k, f))
        flight.waiters += 1
        try:
            res = await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if flight.waiters == 1:  # nobody else wants it: stop the request itself
                flight.task.cancel()
            raise
        finally:
            flight.waiters -= 1
        if leader:
            return res  # billed by `_fetch`, even if every caller went away
        return self.record(dataclasses.replace(res, shared=True, attempts=0))

    def _land(self, key: str, flight: _InFlight) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved here so an exception nobody awaited is not logged

    async def _fetch(self, key: str, messages: Messages, params: Mapping[str, Any]) -> LLMResult:
        try:
            payload = await self.wire_payload(messages, **params)
        except BadImageError as exc:
            return self.record(LLMResult(ok=False, key=key, error_class="bad_image", error=str(exc)))
        return self.record(await self._send(key, payload))

    def _raise_if_misconfigured(self) -> None:
        if self._config_error is not None:
            raise self._config_error

    async def stream(
        self, requests: Mapping[str, Messages], *, window: int | None = None, **params: Any
    ) -> AsyncIterator[tuple[str, LLMResult]]:
        """Yield `(id, result)` as each finishes, so a stage commits progressively and one slow call
        never holds the rest. At most `window` (default 4 x max_concurrency) tasks exist at a time."""
        window = window or 4 * self.cfg.max_concurrency
        items = iter(requests.items())
        done: asyncio.Queue[tuple[str, LLMResult | BaseException]] = asyncio.Queue()
        running: dict[str, asyncio.Task[None]] = {}  # a task leaves when its result is taken

        async def one(rid: str, messages: Messages) -> None:
            try:
                res: LLMResult | BaseException = await self.complete(messages, **params)
            except Exception as exc:  # a bug, not an API failure: surface it to the caller
                res = exc
            done.put_nowait((rid, res))

        def fill() -> None:
            for rid, messages in itertools.islice(items, window - len(running)):
                running[rid] = asyncio.ensure_future(one(rid, messages))

        fill()
        try:
            while running:
                rid, res = await done.get()
                del running[rid]
                if isinstance(res, BaseException):
                    raise res
                fill()
                yield rid, res
        finally:
            for task in running.values():
                task.cancel()

    async def complete_many(self, requests: Mapping[str, Messages], **params: Any) -> dict[str, LLMResult]:
        return {rid: res async for rid, res in self.stream(requests, **params)}

    async def health(self) -> dict[str, str | None]:
        """GET /models on every endpoint: base_url -> None if healthy, else the reason."""
        self._open()
        out: dict[str, str | None] = {}
        for ep in self._eps:
            assert ep.http is not None
            try:
                async with ep.http.get(
                    ep.endpoint.base_url + "/models",
                    timeout=aiohttp.ClientTimeout(total=min(10.0, self.cfg.timeout_s)),
                ) as resp:
                    out[ep.endpoint.base_url] = None if resp.status == 200 else f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                out[ep.endpoint.base_url] = f"{type(exc).__name__}: {exc}"
            if out[ep.endpoint.base_url] is not None:
                ep.down_until = time.monotonic() + self.cfg.health_cooldown_s
        return out

    def _pick(self) -> tuple[_EndpointState, float]:
        """Round-robin over endpoints: prefer healthy ones; respect Retry-After; else wait."""
        now = time.monotonic()
        start = next(self._rr)
        order = [self._eps[(start + i) % len(self._eps)] for i in range(len(self._eps))]
        for ep in order:
            if ep.not_before <= now and ep.down_until <= now:
                return ep, 0.0
        for ep in order:
            if ep.not_before <= now:
                return ep, 0.0  # all unhealthy: try anyway (backoff already spaced us out)
        ep = min(order, key=lambda e: e.not_before)
        return ep, ep.not_before - now

    def retry_policy(self) -> RetryPolicy:
        """The shared retry policy with this client's settings (also used by the Batch API runner)."""
        return RetryPolicy.from_max_retries(
            self.cfg.max_retries, base_s=self.cfg.backoff_base_s, cap_s=self.cfg.backoff_max_s,
            jitter=(0.5, 1.0), max_retry_after_s=MAX_RETRY_AFTER_S)

    async def _send(self, key: str, payload: dict[str, Any]) -> LLMResult:
        """Send with retries. Only failures `_attempt` marks `retry` are sent again (no usable reply:
        timeout, connection lost, 408/409/425/429, 5xx, an unusable body); a reply once received is
        never asked for again, and a 4xx refusal is final. Retry-After
        is not waited here but recorded per endpoint (`_note_failure`), so `_pick` can send the retry
        to another endpoint at once, or wait until the asking one is ready (that wait is no attempt)."""
        self._open()
        body = json.dumps(payload, ensure_ascii=False).encode()
        attempts = 0

        async def send_once() -> tuple[_EndpointState, dict[str, Any]]:
            nonlocal attempts
            while True:
                async with self._sem:  # pick inside, so the pick sees the outcome of earlier attempts
                    ep, wait = self._pick()
                    if wait <= 0:
                        first = await self._first_contact(ep)
                        try:
                            self._raise_if_misconfigured()
                            attempts += 1
                            try:
                                reply = await self._attempt(ep, body)
                            except _Failure as exc:
                                if exc.config is not None:
                                    self._config_error = exc.config
                                    raise exc.config from None
                                ep.verified = True
                                self._note_failure(ep, exc)
                                raise
                            ep.verified = True
                            return ep, reply
                        finally:
                            if first and ep.probe is not None:
                                ep.probe.set()
                                ep.probe = None
                await asyncio.sleep(wait)  # every endpoint asked us to wait (Retry-After)

        try:
            ep, reply = await self.retry_policy().retrying(
                transient=lambda exc: isinstance(exc, _Failure) and exc.retry)(send_once)
        except _Failure as failure:
            message = str(failure)
            if failure.retry:
                message += f" (gave up after {attempts} attempts)"
            elif failure.error_class.startswith("http_") and int(failure.error_class[5:]) in CACHEABLE_STATUS:
                self.cache.put_error(key, failure.error_class, message, self.cfg.model)
            return LLMResult(ok=False, key=key, error_class=failure.error_class, error=message, attempts=attempts)
        ep.failures = 0
        ep.down_until = 0.0
        reply = self.cache.scrubber.value(reply)  # an echoed key reaches neither the cache nor a stage
        self.cache.put_ok(key, reply, self.cfg.model, stage=self.stage, price=self.cfg.price_for(ep.endpoint))
        return dataclasses.replace(LLMResult.from_body(key, reply, cached=False, attempts=attempts),
                                   endpoint=ep.endpoint.base_url)

    async def _first_contact(self, ep: _EndpointState) -> bool:
        """Until `ep` has answered once, one request at a time goes there (True: the caller is it);
        the others wait for its outcome, so a wrong key or model costs one request."""
        while not ep.verified:
            self._raise_if_misconfigured()
            if ep.probe is None:
                ep.probe = asyncio.Event()
                return True
            await ep.probe.wait()
        return False

    def _note_failure(self, ep: _EndpointState, exc: _Failure) -> None:
        """Mark an endpoint unhealthy (timeouts, connection errors, 5xx) and record its Retry-After."""
        if exc.error_class in ("timeout", "connection") or exc.error_class.startswith("http_5"):
            ep.failures += 1
            ep.down_until = time.monotonic() + self.cfg.health_cooldown_s
        if exc.retry_after is not None:
            ep.not_before = time.monotonic() + min(exc.retry_after, MAX_RETRY_AFTER_S)

    async def _attempt(self, ep: _EndpointState, body: bytes) -> dict[str, Any]:
        """One HTTP round trip, classified into a reply body or a `_Failure`."""
        assert ep.http is not None
        where = ep.endpoint.base_url
        try:
            status, headers, text = await asyncio.wait_for(self._post(ep, body), timeout=self.cfg.timeout_s)
        except TimeoutError as exc:
            raise _Failure(
                "timeout", f"{self.section}.timeout_s={self.cfg.timeout_s:g} exceeded on {where}", retry=True
            ) from exc
        except aiohttp.ClientError as exc:
            raise _Failure("connection", f"cannot reach {where}: {type(exc).__name__}", retry=True) from exc
        if status == 200:
            try:
                reply = json.loads(text)
            except ValueError as exc:
                raise _Failure(
                    "bad_response", f"{where} replied with non-JSON: {text[:200]!r}", retry=True
                ) from exc
            if not valid_body(reply):
                raise _Failure("bad_response", f"{where} replied without choices: {text[:200]!r}", retry=True)
            return reply
        detail = self.cache.scrub(_error_detail(text)) or ""
        if status in CONFIG_STATUS:
            message = self._config_message(ep, status, detail)
            raise _Failure(f"http_{status}", message, retry=False,
                           config=LLMConfigError(message, base_url=where, status=status))
        message = f"HTTP {status} from {where}: {detail}"
        retry = status in RETRY_STATUS or status >= 500
        raise _Failure(f"http_{status}", message, retry=retry, retry_after=parse_retry_after(headers))

    def _config_message(self, ep: _EndpointState, status: int, detail: str) -> str:
        """One line: the endpoint, what it said, the setting to fix (never the key itself)."""
        where, sec = ep.endpoint.base_url, self.section
        if status in (401, 403):
            env = ep.endpoint.api_key_env
            sent = f"the API key from ${env}" if env else "no API key (api_key_env is null)"
            return (f"LLM endpoint {where} refused {sent} (HTTP {status}): fix {sec}.endpoints[].api_key_env "
                    f"or the key it names; stopped at the first refusal, nothing was rejected")
        return (f"LLM endpoint {where} has no model {self.cfg.model!r} or no /chat/completions (HTTP 404: "
                f"{detail[:200]}): fix {sec}.model or {sec}.endpoints[].base_url; stopped at the first "
                f"refusal, nothing was rejected")

    @staticmethod
    async def _post(ep: _EndpointState, body: bytes) -> tuple[int, Mapping[str, str], str]:
        assert ep.http is not None
        url = ep.endpoint.base_url + "/chat/completions"
        async with ep.http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            return resp.status, resp.headers, await resp.text(errors="replace")

    async def complete_json(self, messages: Messages, model_cls: Any, **params: Any) -> Any:
        """See `fvqa.llm.structured.complete_json`."""
        from fvqa.llm.structured import complete_json

        return await complete_json(self, messages, model_cls, **params)


def _error_detail(text: str) -> str:
    """The server's error message (OpenAI shape `{"error": {"message": ...}}`) or the start of the body."""
    try:
        data = json.loads(text)
    except ValueError:
        return text[:200] or "(empty body)"
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message") or data["error"])[:500]
    return json.dumps(data)[:500]
