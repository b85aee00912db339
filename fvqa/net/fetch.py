"""Async downloader (aiohttp + asyncio): bounded, polite, and every failure is a reason, not an exception.

- a global concurrency limit and a per-host one (plus an optional minimum gap between requests to a
  host), held only while a request is on the wire, never while a retry sleeps; connections are kept
  alive and reused per host (one pooled session, `fvqa.net.transport`);
- a deadline for the whole attempt (connect + headers + every byte), so a server that trickles bytes
  cannot hold a slot forever;
- retries with exponential backoff on 429/5xx, timeouts and dropped connections, honouring
  `Retry-After` (seconds or HTTP date) up to a cap;
- a maximum body size, enforced from Content-Length and again while streaming;
- redirects followed by hand so every hop passes the private-address guard (fvqa.net.ssrf), and the
  guard again at connect time (the connection goes to the address that was checked: no DNS rebinding);
- robots.txt respected when asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from fvqa.net.retry import RetryPolicy, parse_retry_after
from fvqa.net.robots import RobotsCache
from fvqa.net.ssrf import BadURL, BlockedAddress, ResolveError, blocked_cause, check_url
from fvqa.net.transport import downloader_session

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# an error or redirect body up to this size is read to the end, so its connection stays reusable
DRAIN_BYTES = 65_536
ROBOTS_MAX_BYTES = 500_000  # RFC 9309 2.5: parse at least 500 KiB


@dataclass(frozen=True)
class FetchOptions:
    """Limits for one downloader; `from_config` maps a CrawlConfig onto it."""

    concurrency: int = 32
    per_host_concurrency: int = 4
    per_host_interval_s: float = 0.0
    timeout_s: float = 20.0
    retries: int = 3
    backoff_s: float = 0.5
    max_retry_after_s: float = 60.0
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    allow_private: bool = False
    respect_robots: bool = True
    user_agent: str = "fvqa-crawler/0.1 (research dataset builder)"

    @classmethod
    def from_config(cls, cfg: Any) -> FetchOptions:
        names = cls.__dataclass_fields__.keys()
        return cls(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)})


@dataclass
class FetchResult:
    """Outcome of one URL: bytes on success, else a short `reason` (counted) and a `detail`."""

    url: str
    ok: bool
    data: bytes = b""
    status: int | None = None
    final_url: str = ""
    content_type: str | None = None
    reason: str = ""
    detail: str = ""
    attempts: int = 0
    retryable: bool = False
    retry_after: float | None = None


class _TooLarge(Exception):
    """The body passed the size limit while streaming."""


class Downloader:
    """`async with Downloader(opts) as d: await d.fetch(url)` or `await d.fetch_many(urls)`."""

    def __init__(self, opts: FetchOptions) -> None:
        self.opts = opts
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(opts.concurrency)  # the global in-flight limit
        self._hosts: dict[str, asyncio.Semaphore] = {}
        self._next_start: dict[str, float] = {}
        self._robots = RobotsCache(self._fetch_robots, opts.user_agent) if opts.respect_robots else None
        # backoff_s doubling per retry plus up to 10% jitter; Retry-After is waited as given (a longer
        # one than max_retry_after_s ends the retries instead, see `fetch`)
        self._policy = RetryPolicy.from_max_retries(
            opts.retries, base_s=opts.backoff_s, cap_s=max(opts.max_retry_after_s, opts.backoff_s),
            jitter=(1.0, 1.1), max_retry_after_s=opts.max_retry_after_s)

    async def __aenter__(self) -> Downloader:
        self._session = downloader_session(limit=self.opts.concurrency, allow_private=self.opts.allow_private,
                                           user_agent=self.opts.user_agent)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- public ------------------------------------------------------------------------------
    async def fetch_many(self, urls: Iterable[str], *, max_bytes: int | None = None) -> list[FetchResult]:
        """Fetch all URLs concurrently (within the limits); results in input order."""
        return list(await asyncio.gather(*(self.fetch(u, max_bytes=max_bytes) for u in urls)))

    async def fetch(self, url: str, *, max_bytes: int | None = None) -> FetchResult:
        """GET with retries (the shared `fvqa.net.retry` policy); never raises for network or HTTP problems."""
        limit = max_bytes or self.opts.max_bytes
        first = await self._attempt(url, limit)
        first.attempts = 1
        if first.ok or not first.retryable or self.opts.retries <= 0:
            return first  # settled by the first attempt: no retry loop to set up (~0.1 ms a URL)
        pending, attempts = [first], 1

        async def attempt() -> FetchResult:
            nonlocal attempts
            if pending:  # the policy's first attempt is the one already made
                return pending.pop()
            attempts += 1
            result = await self._attempt(url, limit)
            result.attempts = attempts
            return result

        def too_long(result: FetchResult) -> bool:  # the site asks for a longer pause than we wait
            return result.retry_after is not None and result.retry_after > self.opts.max_retry_after_s

        result: FetchResult = await self._policy.retrying(
            transient_result=lambda r: not r.ok and r.retryable,
            retry_after=lambda r: r.retry_after,
            give_up=too_long,
        )(attempt)
        if result.ok or not result.retryable:
            return result
        if attempts > self.opts.retries:
            result.detail = f"{result.detail} (gave up after {attempts} attempts)".strip()
        elif too_long(result):
            assert result.retry_after is not None
            result.detail = (f"{result.detail} (Retry-After {result.retry_after:.0f}s exceeds "
                             f"max_retry_after_s {self.opts.max_retry_after_s:.0f})").strip()
        return result

    # -- one attempt -------------------------------------------------------------------------
    async def _attempt(self, url: str, max_bytes: int) -> FetchResult:
        current = url
        for _ in range(self.opts.max_redirects + 1):
            try:
                await check_url(current, allow_private=self.opts.allow_private)
            except BadURL as exc:
                return FetchResult(url, False, final_url=current, reason="bad_url", detail=str(exc))
            except BlockedAddress as exc:
                return FetchResult(url, False, final_url=current, reason="private_address",
                                   detail=str(exc))
            except ResolveError as exc:
                return FetchResult(url, False, final_url=current, reason="dns_failed", detail=str(exc))
            if self._robots is not None:
                ok, why = await self._robots.allowed(current)
                if not ok:
                    return FetchResult(url, False, final_url=current, reason="robots_disallowed",
                                       detail=why)
            result = await self._request(url, current, max_bytes)
            if isinstance(result, FetchResult):
                return result
            current = result  # a redirect target
        return FetchResult(url, False, final_url=current, reason="too_many_redirects",
                           detail=f"more than {self.opts.max_redirects} redirects")

    async def _request(self, url: str, current: str, max_bytes: int) -> FetchResult | str:
        """One HTTP exchange; returns a result, or the next URL for a redirect."""
        assert self._session is not None, "use `async with Downloader(...)`"
        host = urlsplit(current).netloc
        per_host = self._hosts.get(host)
        if per_host is None:
            per_host = self._hosts[host] = asyncio.Semaphore(self.opts.per_host_concurrency)
        async with per_host:  # per host first: a busy host must not hold global slots while it waits
            await self._pace(host)
            async with self._slots:
                try:
                    async with asyncio.timeout(self.opts.timeout_s):
                        return await self._exchange(url, current, max_bytes)
                except TimeoutError:  # our deadline, or one of aiohttp's (ServerTimeoutError)
                    return FetchResult(url, False, final_url=current, reason="timeout", retryable=True,
                                       detail=f"no complete response within {self.opts.timeout_s:g}s")
                except aiohttp.InvalidURL as exc:
                    return FetchResult(url, False, final_url=current, reason="bad_url", detail=str(exc))
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                        aiohttp.ClientResponseError) as exc:
                    blocked = blocked_cause(exc)
                    if blocked is not None:  # the connect-time guard: the name re-resolved to a private address
                        return FetchResult(url, False, final_url=current, reason="private_address",
                                           detail=f"{blocked} (at connect)")
                    return FetchResult(url, False, final_url=current, reason="connection_error", retryable=True,
                                       detail=f"{exc.__class__.__name__}: {exc}")
                except aiohttp.ClientError as exc:
                    return FetchResult(url, False, final_url=current, reason="network_error",
                                       detail=f"{exc.__class__.__name__}: {exc}")

    async def _exchange(self, url: str, current: str, max_bytes: int) -> FetchResult | str:
        assert self._session is not None
        async with self._session.get(current, allow_redirects=False) as resp:
            status, headers = resp.status, resp.headers
            if status in REDIRECT_STATUS and "Location" in headers:
                await _drain(resp)
                return urljoin(current, headers["Location"])
            ctype = headers.get("Content-Type")
            if status >= 400:
                await _drain(resp)
                return FetchResult(
                    url, False, status=status, final_url=current, content_type=ctype,
                    reason="http_error", detail=f"HTTP {status} {resp.reason or ''}".strip(),
                    retryable=status in RETRY_STATUS, retry_after=parse_retry_after(headers))
            declared = headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                return FetchResult(url, False, status=status, final_url=current, content_type=ctype,
                                   reason="too_large", detail=f"Content-Length {declared} > max_bytes {max_bytes}")
            try:
                data = await _read_body(resp, max_bytes)
            except _TooLarge:
                return FetchResult(url, False, status=status, final_url=current, content_type=ctype,
                                   reason="too_large", detail=f"body exceeds max_bytes {max_bytes} (stopped reading)")
            return FetchResult(url, True, data, status=status, final_url=current, content_type=ctype)

    async def _pace(self, host: str) -> None:
        """Keep at least `per_host_interval_s` between request starts on one host."""
        gap = self.opts.per_host_interval_s
        if gap <= 0:
            return
        loop = asyncio.get_running_loop()
        start = max(loop.time(), self._next_start.get(host, 0.0))
        self._next_start[host] = start + gap
        await asyncio.sleep(max(0.0, start - loop.time()))

    async def _fetch_robots(self, url: str) -> tuple[int | None, str]:
        assert self._session is not None
        async with self._slots:
            try:
                await check_url(url, allow_private=self.opts.allow_private)
                async with asyncio.timeout(min(self.opts.timeout_s, 10.0)):
                    async with self._session.get(url, allow_redirects=False) as resp:
                        try:
                            body = await _read_body(resp, ROBOTS_MAX_BYTES)
                        except _TooLarge as exc:
                            body = exc.args[0]
                        return resp.status, body.decode("utf-8", "replace")  # RFC 9309: UTF-8
            except (BadURL, BlockedAddress, ResolveError, TimeoutError, aiohttp.ClientError):
                return None, ""


async def _read_body(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The (decoded) body; `_TooLarge(first max_bytes bytes)` as soon as it grows past `max_bytes`."""
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            chunks.append(chunk)
            raise _TooLarge(b"".join(chunks)[:max_bytes])
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read a small error/redirect body to its end, so the connection goes back to the pool."""
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) <= DRAIN_BYTES:
        try:
            await resp.read()
        except (aiohttp.ClientError, OSError):
            pass  # the connection is dropped instead; the response itself is already decided
