"""robots.txt, fetched once per origin and cached for the run (RFC 9309 semantics, via `protego`).

`urllib.robotparser` takes the first matching rule and knows neither `*` nor `$`, so `Disallow: /*.jpg$`
was ignored and `Allow: /a/b` after `Disallow: /a/` lost; protego implements RFC 9309's longest
match (an Allow wins a tie) with both wildcards.

4xx or a redirect: no rules (allowed). 5xx: the site asks crawlers to stay away for now (disallowed).
Unreachable: allowed here, because the real request will fail with its own, clearer reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from protego import Protego

# fetch(url) -> (status or None when unreachable, body text)
RobotsFetch = Callable[[str], Awaitable[tuple[int | None, str]]]


class RobotsCache:
    """`await allowed(url)` -> (allowed, why-not)."""

    def __init__(self, fetch: RobotsFetch, user_agent: str) -> None:
        self._fetch = fetch
        self._agent = user_agent.split("/", 1)[0]
        self._rules: dict[str, Protego | str | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def allowed(self, url: str) -> tuple[bool, str]:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        lock = self._locks.setdefault(origin, asyncio.Lock())
        async with lock:
            if origin not in self._rules:
                self._rules[origin] = await self._load(origin)
        rules = self._rules[origin]
        if rules is None:
            return True, ""
        if isinstance(rules, str):
            return False, rules
        if rules.can_fetch(url, self._agent):
            return True, ""
        return False, f"{origin}/robots.txt disallows {parts.path or '/'} for {self._agent}"

    async def _load(self, origin: str) -> Protego | str | None:
        status, text = await self._fetch(f"{origin}/robots.txt")
        if status is None or 300 <= status < 500:
            return None
        if status >= 500:
            return f"{origin}/robots.txt answered HTTP {status}: crawling paused by the site"
        return Protego.parse(text)
