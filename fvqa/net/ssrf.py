"""Refuse URLs that point into private networks (SSRF guard) unless the config allows them.

A crawler fed URLs from captions or search results must not be steerable into `localhost:8080/admin`
or a cloud metadata endpoint (169.254.169.254). Every hop of a redirect chain is checked, and a host
is refused if *any* of its resolved addresses is private, loopback, link-local, multicast, reserved
or unspecified. Known limit: the check and httpx's own connect resolve separately, so a hostile DNS
server answering differently within milliseconds (rebinding) is not stopped here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit


class BlockedAddress(ValueError):
    """The URL resolves to an address this crawler will not contact."""


class BadURL(ValueError):
    """Not an http(s) URL with a host."""


class ResolveError(OSError):
    """The host name does not resolve."""


def is_public(ip: str) -> bool:
    """True for globally routable unicast addresses."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
                or addr.is_reserved or addr.is_unspecified or not addr.is_global)


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
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return [host]


def _refuse_non_public(host: str, addresses: list[str]) -> None:
    """The one classification both the async and the sync guard apply to resolved addresses."""
    for ip in addresses:
        if not is_public(ip):
            raise BlockedAddress(f"{host} resolves to non-public address {ip}")


def _addresses(infos: list[tuple]) -> list[str]:
    """Distinct resolved IPs, sorted so the error names the same address every time."""
    return sorted({str(info[4][0]) for info in infos})


async def check_url(url: str, *, allow_private: bool) -> None:
    """Raise BadURL / BlockedAddress / ResolveError unless the URL may be fetched."""
    host, port = split_host(url)
    if allow_private:
        return
    addresses = _literal(host)
    if addresses is None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ResolveError(f"cannot resolve {host}: {exc}") from exc
        addresses = _addresses(infos)
    _refuse_non_public(host, addresses)


def check_url_sync(url: str, *, allow_private: bool) -> None:
    """Blocking twin of `check_url` for synchronous clients (the search page reader); same rules."""
    host, port = split_host(url)
    if allow_private:
        return
    addresses = _literal(host)
    if addresses is None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ResolveError(f"cannot resolve {host}: {exc}") from exc
        addresses = _addresses(infos)
    _refuse_non_public(host, addresses)
