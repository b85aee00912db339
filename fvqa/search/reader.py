"""Fetch a result page (or thumbnail) safely and extract its main text.

Safety: every URL, and every redirect hop, must be http(s) and resolve only to public addresses;
loopback, private, link-local, multicast and reserved targets are refused unless the config allows
them (tests do, explicitly), so a search result cannot make us read the cloud metadata service or
an intranet. Bodies are capped at `max_bytes`. Failures raise `PageError` marked permanent (cached:
404, not HTML, refused address, no text) or transient (timeouts, 429, 5xx: retried next time).
"""

from __future__ import annotations

from urllib.parse import urljoin

import httpx

from fvqa.net import ssrf
from fvqa.search.config import ReaderConfig
from fvqa.search.types import PageError

MAX_REDIRECTS = 5
TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")


def check_url(url: str, *, allow_private: bool) -> None:
    """Raise a permanent PageError unless `url` is http(s) and its host resolves only to allowed IPs.

    The rules live in fvqa.net.ssrf (shared with the crawler); this maps its errors to PageError.
    """
    try:
        ssrf.check_url_sync(url, allow_private=allow_private)
    except ssrf.BadURL as exc:
        raise PageError("bad_url", f"not an http(s) URL: {url[:200]} ({exc})", permanent=True) from exc
    except ssrf.BlockedAddress as exc:
        raise PageError("refused_address", f"{exc} (set reader.allow_private to allow)", permanent=True) from exc
    except ssrf.ResolveError as exc:
        raise PageError("dns", str(exc), permanent=False) from exc


class PageReader:
    """Guarded GET with size cap, then trafilatura main-text extraction (first `max_chars`)."""

    def __init__(self, config: ReaderConfig | None = None) -> None:
        self.config = config or ReaderConfig()
        # the transport checks the address it connects to, so a host that resolves to a public
        # address for `check_url` and to a private one for the connection (DNS rebinding) is refused
        self._client = httpx.Client(
            timeout=self.config.timeout_s,
            follow_redirects=False,
            headers={"User-Agent": self.config.user_agent},
            transport=ssrf.guarded_transport(allow_private=self.config.allow_private),
            trust_env=False,
        )

    def fetch(self, url: str, *, accept: tuple[str, ...] | None = None) -> tuple[bytes, str, str]:
        """(body, content type, final URL); follows up to 5 redirects, checking every hop."""
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url, allow_private=self.config.allow_private)
            try:
                with self._client.stream("GET", url) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        url = urljoin(url, resp.headers["location"])
                        continue
                    status = resp.status_code
                    if status == 429 or status >= 500:
                        raise PageError(f"http_{status}", f"{url[:200]} answered {status}", permanent=False)
                    if status >= 400:
                        raise PageError(f"http_{status}", f"{url[:200]} answered {status}", permanent=True)
                    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                    if accept and ctype and not ctype.startswith(accept):
                        raise PageError("content_type", f"{url[:200]} is {ctype}, not {accept[0]}", permanent=True)
                    body = bytearray()
                    for chunk in resp.iter_bytes():
                        body.extend(chunk)
                        if len(body) > self.config.max_bytes:
                            raise PageError("too_large", f"{url[:200]} exceeds {self.config.max_bytes} bytes",
                                            permanent=True)
                    return bytes(body), ctype, url
            except httpx.TimeoutException as exc:
                raise PageError("timeout", f"{url[:200]}: {type(exc).__name__}", permanent=False) from exc
            except httpx.HTTPError as exc:
                if (blocked := ssrf.blocked_cause(exc)) is not None:
                    raise PageError("refused_address", f"{blocked} (set reader.allow_private to allow)",
                                    permanent=True) from exc
                raise PageError("connection", f"{url[:200]}: {type(exc).__name__}: {exc}", permanent=False) from exc
        raise PageError("redirects", f"more than {MAX_REDIRECTS} redirects from {url[:200]}", permanent=True)

    def read(self, url: str) -> str:
        """Main text of a page, first `max_chars` characters; PageError if there is none."""
        body, ctype, final = self.fetch(url, accept=TEXT_TYPES)
        html = body.decode("utf-8", errors="replace")
        if ctype == "text/plain":
            text = html
        else:
            import trafilatura

            text = trafilatura.extract(html, url=final, include_comments=False, include_tables=True,
                                       favor_recall=True) or ""
        text = text.strip()
        if not text:
            raise PageError("no_text", f"no main text could be extracted from {url[:200]}", permanent=True)
        return text[: self.config.max_chars]

    def close(self) -> None:
        self._client.close()
