"""Refuse URLs that point into private networks (SSRF guard) unless the config allows them.

A crawler fed URLs from captions or search results must not be steerable into `localhost:8080/admin`
or a cloud metadata endpoint (169.254.169.254). Every hop of a redirect chain is checked, and a host
is refused if *any* of its resolved addresses is private, loopback, link-local, multicast, reserved
or unspecified. IPv6 forms that carry an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible
`::a.b.c.d`, 6to4 `2002::/16`, Teredo `2001::/32`, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`) are
judged by the IPv4 address they carry.

Checking a URL before the request is not enough: the HTTP client resolves the name again when it
connects, and a hostile DNS server can answer "public" the first time and "127.0.0.1" the second
(DNS rebinding). So the guard also sits at connect time: `guarded_transport` builds an httpx
transport (and `fvqa.net.transport.GuardedResolver` an aiohttp resolver, for the async downloader)
that resolves the host once, refuses it unless every address is allowed, and connects to a checked
address (TLS still verifies the certificate against the host name). A refusal there surfaces as a
connect error whose cause chain holds the `BlockedAddress` (`blocked_cause` finds it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx


class BlockedAddress(ValueError):
    """The URL resolves to an address this crawler will not contact."""


class BadURL(ValueError):
    """Not an http(s) URL with a host."""


class ResolveError(OSError):
    """The host name does not resolve."""


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 address(es) an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64); [] if none."""
    if addr.ipv4_mapped is not None:
        return [addr.ipv4_mapped]
    if addr.sixtofour is not None:
        return [addr.sixtofour]
    if addr.teredo is not None:
        return list(addr.teredo)  # (server, client)
    if any(addr in net for net in _NAT64) or (addr in _IPV4_COMPATIBLE and int(addr) > 1):
        return [ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)]
    return []


def _plain_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
                or addr.is_reserved or addr.is_unspecified or not addr.is_global)


def is_public(ip: str) -> bool:
    """True for globally routable unicast addresses (an IPv6 carrying an IPv4 is judged by that IPv4)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        inner = embedded_ipv4(addr)
        if inner:
            return all(_plain_public(v4) for v4 in inner)
    return _plain_public(addr)


def split_host(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL, or BadURL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadURL(f"malformed URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise BadURL(f"scheme {parts.scheme or '(none)'!r} is not http(s)")
    if not parts.hostname:
        raise BadURL("URL has no host")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _literal(host: str) -> list[str] | None:
    """[host] when the host is already an IP literal (no lookup needed), else None."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return [host.strip("[]")]


def _refuse_non_public(host: str, addresses: list[str]) -> None:
    """The one classification both the async and the sync guard apply to resolved addresses."""
    for ip in addresses:
        if not is_public(ip):
            raise BlockedAddress(f"{host} resolves to non-public address {ip}")


def _addresses(infos: list[tuple]) -> list[str]:
    """Distinct resolved IPs, sorted so the error names the same address every time."""
    return sorted({str(info[4][0]) for info in infos})


def resolve_checked_sync(host: str, port: int, *, allow_private: bool) -> list[str]:
    """Resolve `host` once; its addresses if all are allowed, else BlockedAddress (ResolveError if none)."""
    addresses = _literal(host)
    if addresses is None:
        try:
            addresses = _addresses(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            raise ResolveError(f"cannot resolve {host}: {exc}") from exc
    if not allow_private:
        _refuse_non_public(host, addresses)
    return addresses


async def resolve_checked(host: str, port: int, *, allow_private: bool) -> list[str]:
    """Async twin of `resolve_checked_sync` (same rules)."""
    addresses = _literal(host)
    if addresses is None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ResolveError(f"cannot resolve {host}: {exc}") from exc
        addresses = _addresses(infos)
    if not allow_private:
        _refuse_non_public(host, addresses)
    return addresses


async def check_url(url: str, *, allow_private: bool) -> None:
    """Raise BadURL / BlockedAddress / ResolveError unless the URL may be fetched."""
    host, port = split_host(url)
    if not allow_private:
        await resolve_checked(host, port, allow_private=False)


def check_url_sync(url: str, *, allow_private: bool) -> None:
    """Blocking twin of `check_url` for synchronous clients (the search page reader); same rules."""
    host, port = split_host(url)
    if not allow_private:
        resolve_checked_sync(host, port, allow_private=False)


def blocked_cause(exc: BaseException) -> BlockedAddress | None:
    """The BlockedAddress behind an httpx error raised by a guarded transport, if that is what it is."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, BlockedAddress):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


# -- connect-time guard ------------------------------------------------------------------------

def _refused(exc: BlockedAddress | ResolveError) -> httpcore.ConnectError:
    err = httpcore.ConnectError(str(exc))
    err.__cause__ = exc
    return err


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore backend that connects only to an address it resolved and checked itself."""

    def __init__(self, inner: httpcore.NetworkBackend | None = None, *, allow_private: bool = False) -> None:
        self._inner = inner or httpcore.SyncBackend()
        self.allow_private = allow_private

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        try:
            addresses = resolve_checked_sync(host, port, allow_private=self.allow_private)
        except (BlockedAddress, ResolveError) as exc:
            raise _refused(exc) from exc
        last: Exception | None = None
        for ip in addresses:
            try:
                return self._inner.connect_tcp(ip, port, timeout=timeout, local_address=local_address,
                                               socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed by the address guard")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _install(transport: httpx.HTTPTransport, wrap: Any) -> None:
    pool = getattr(transport, "_pool", None)
    if pool is None or not hasattr(pool, "_network_backend"):  # an httpx/httpcore whose internals moved
        raise RuntimeError("cannot install the connect-time address guard on this httpx version")
    pool._network_backend = wrap(pool._network_backend)


def guarded_transport(*, allow_private: bool, **kwargs: Any) -> httpx.HTTPTransport:
    """`httpx.HTTPTransport(**kwargs)` that checks the address it connects to (see the module doc)."""
    transport = httpx.HTTPTransport(**kwargs)
    _install(transport, lambda inner: GuardedBackend(inner, allow_private=allow_private))
    return transport
