"""The downloader's aiohttp session, with the private-address guard at connect time.

aiohttp rather than httpx for the same reason as `fvqa.llm.client`: on this 2-core machine httpx's
async pool spent ~1.7 ms of CPU per request (anyio socket attributes, httpcore's pool scan), aiohttp
a fraction of that (bench/bench_download.py).

The guard is `fvqa.net.ssrf`'s (the same `resolve_checked` rules), placed where aiohttp resolves a
name for a new connection: `GuardedResolver` resolves once, refuses the name unless every address is
allowed, and hands aiohttp exactly the addresses it checked, so the connection goes to an address
that passed (no DNS rebinding between the pre-check and the connect). IP literals never reach a
resolver; `fvqa.net.fetch` checks them before every hop, and a literal cannot change. A refusal
surfaces as an `aiohttp.ClientConnectorError` whose cause chain holds the `BlockedAddress`
(`ssrf.blocked_cause` finds it).
"""

from __future__ import annotations

import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from fvqa.net.ssrf import BlockedAddress, resolve_checked


class RefusedAtConnect(OSError):
    """A name the guard refused when aiohttp resolved it (an OSError, so aiohttp wraps it as a
    connector error); the `BlockedAddress` is its `__cause__`."""


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that returns only addresses `fvqa.net.ssrf` allows (all of them, or an error)."""

    def __init__(self, *, allow_private: bool = False) -> None:
        self.allow_private = allow_private

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        try:
            addresses = await resolve_checked(host, port, allow_private=self.allow_private)
        except BlockedAddress as exc:
            raise RefusedAtConnect(str(exc)) from exc
        out = []
        for ip in addresses:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            if family not in (socket.AF_UNSPEC, fam):
                continue
            out.append(ResolveResult(hostname=host, host=ip, port=port, family=fam, proto=0,
                                     flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        if not out:
            raise OSError(f"{host} has no {family.name} address")
        return out

    async def close(self) -> None:
        pass


def downloader_session(*, limit: int, allow_private: bool, user_agent: str) -> aiohttp.ClientSession:
    """One pooled session for a Downloader: keep-alive per host, no cookies kept, no proxy from the
    environment, the address guard unless private addresses are allowed. Timeouts are the caller's
    (one deadline per attempt, see `fvqa.net.fetch`)."""
    resolver = None if allow_private else GuardedResolver(allow_private=False)
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, resolver=resolver)
    return aiohttp.ClientSession(
        connector=connector, headers={"User-Agent": user_agent}, cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None), trust_env=False)
