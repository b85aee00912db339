"""The private-address guard: IPv6 forms that carry an IPv4, and DNS rebinding (a name that resolves
to a public address when checked and to loopback when connected). Everything stays on loopback: the
"DNS" is a patched `socket.getaddrinfo`."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from fvqa.net import ssrf
from fvqa.net.fetch import Downloader, FetchOptions


@pytest.mark.parametrize("ip", [
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a00:1::",  # 6to4 of 10.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254 (cloud metadata)
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a00:1",  # local-use NAT64 of 10.0.0.1
    "::ffff:127.0.0.1",
    "::ffff:10.1.2.3",
    "::127.0.0.1",  # IPv4-compatible
    "127.0.0.1", "10.0.0.1", "169.254.169.254", "::1", "fe80::1", "fc00::1", "0.0.0.0",
])
def test_embedded_private_ipv4_is_not_public(ip: str) -> None:
    assert not ssrf.is_public(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::", "64:ff9b::808:808"])
def test_public_addresses_stay_public(ip: str) -> None:
    assert ssrf.is_public(ip)


def test_6to4_literal_url_is_refused() -> None:
    with pytest.raises(ssrf.BlockedAddress, match="2002:7f00:1::"):
        ssrf.check_url_sync("http://[2002:7f00:1::]/", allow_private=False)


# ------------------------------------------------------------------------------------------------
# DNS rebinding
# ------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).hits.append(self.path)
        body = b"internal secret"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def loopback_server() -> Iterator[int]:
    _Handler.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def rebinding_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`rebind.test` answers a public address on the first lookup and 127.0.0.1 on every later one."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def fake(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        ip = "93.184.216.34" if not lookups else "127.0.0.1"
        lookups.append(ip)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port or 80)))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return lookups


def test_sync_transport_refuses_a_name_that_rebinds_to_loopback(loopback_server: int, rebinding_dns: list[str]) -> None:
    url = f"http://rebind.test:{loopback_server}/admin"
    ssrf.check_url_sync(url, allow_private=False)  # the first answer is public: the pre-check passes
    with httpx.Client(transport=ssrf.guarded_transport(allow_private=False), trust_env=False) as client:
        with pytest.raises(httpx.ConnectError) as info:
            client.get(url)
    assert isinstance(ssrf.blocked_cause(info.value), ssrf.BlockedAddress)
    assert "127.0.0.1" in str(info.value)
    assert rebinding_dns == ["93.184.216.34", "127.0.0.1"] and _Handler.hits == []


def test_guarded_transport_connects_to_the_address_it_checked(loopback_server: int,
                                                               rebinding_dns: list[str]) -> None:
    rebinding_dns.append("(first lookup used up)")  # every lookup now answers 127.0.0.1
    with httpx.Client(transport=ssrf.guarded_transport(allow_private=True), trust_env=False) as client:
        resp = client.get(f"http://rebind.test:{loopback_server}/ok")
    assert resp.text == "internal secret" and _Handler.hits == ["/ok"]


def test_downloader_refuses_a_name_that_rebinds_to_loopback(loopback_server: int, rebinding_dns: list[str]) -> None:
    async def go():
        opts = FetchOptions(allow_private=False, respect_robots=False, retries=0)
        async with Downloader(opts) as d:
            return await d.fetch(f"http://rebind.test:{loopback_server}/admin")

    result = asyncio.run(go())
    assert not result.ok and result.reason == "private_address", result
    assert "127.0.0.1" in result.detail and not result.retryable
    assert _Handler.hits == []


def test_rebinding_reaches_loopback_neither_for_robots_nor_for_the_page(loopback_server: int,
                                                                         rebinding_dns: list[str]) -> None:
    """With robots.txt on, its request is the first connection: refused at connect time too."""
    async def go():
        async with Downloader(FetchOptions(allow_private=False, respect_robots=True, retries=2)) as d:
            return await d.fetch(f"http://rebind.test:{loopback_server}/admin")

    result = asyncio.run(go())
    assert not result.ok and result.reason == "private_address" and not result.retryable, result
    assert rebinding_dns[0] == "93.184.216.34" and "127.0.0.1" in rebinding_dns[1:]
    assert _Handler.hits == []


def test_page_reader_refuses_a_name_that_rebinds_to_loopback(loopback_server: int, rebinding_dns: list[str]) -> None:
    from fvqa.search.reader import PageError, PageReader

    reader = PageReader()
    with pytest.raises(PageError) as info:
        reader.fetch(f"http://rebind.test:{loopback_server}/admin")
    assert info.value.error_class == "refused_address" and info.value.permanent, info.value
    assert "127.0.0.1" in str(info.value) and _Handler.hits == []
