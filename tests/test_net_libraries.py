"""The network layer's library-backed parts: robots.txt through protego (RFC 9309 wildcards and
longest match), the one retry policy (tenacity) and its `parse_retry_after`, and the connect-time
address guard against DNS rebinding on the robots.txt path too. Everything stays on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest
from support.web_server import LoopbackServer, Reply

from fvqa.net.fetch import Downloader, FetchOptions
from fvqa.net.retry import RetryPolicy, parse_retry_after
from fvqa.net.robots import RobotsCache

AGENT = "fvqa-crawler/0.1 (test)"


def _robots(text: str, status: int | None = 200) -> tuple[RobotsCache, list[str]]:
    fetched: list[str] = []

    async def fetch(url: str) -> tuple[int | None, str]:
        fetched.append(url)
        await asyncio.sleep(0)
        return status, text

    return RobotsCache(fetch, AGENT), fetched


def _allowed(cache: RobotsCache, *urls: str) -> list[bool]:
    async def go() -> list[bool]:
        return [(await cache.allowed(u))[0] for u in urls]

    return asyncio.run(go())


# ------------------------------------------------------------------------------------------------
# robots.txt
# ------------------------------------------------------------------------------------------------


def test_robots_wildcard_and_end_anchor() -> None:
    cache, _ = _robots("User-agent: *\nDisallow: /*.jpg$\nDisallow: /tmp*/cache\n")
    got = _allowed(cache, "http://s.test/a/b.jpg", "http://s.test/b.jpg?size=2", "http://s.test/b.jpeg",
                   "http://s.test/tmp-1/cache/x", "http://s.test/tmp/other", "http://s.test/")
    assert got == [False, True, True, False, True, True]


def test_robots_longest_match_wins_whatever_the_order() -> None:
    """RFC 9309 2.2.2: the most specific rule decides; urllib.robotparser took the first match."""
    for text in ("User-agent: *\nDisallow: /img/\nAllow: /img/public/\n",
                 "User-agent: *\nAllow: /img/public/\nDisallow: /img/\n"):
        cache, _ = _robots(text)
        assert _allowed(cache, "http://s.test/img/public/a.jpg", "http://s.test/img/private/a.jpg",
                        "http://s.test/page") == [True, False, True]
    cache, _ = _robots("User-agent: *\nDisallow: /\nAllow: /*.jpg$\n")  # a longer Allow beats "/"
    assert _allowed(cache, "http://s.test/x/a.jpg", "http://s.test/x/a.html") == [True, False]


def test_robots_group_for_our_agent_and_reason_text() -> None:
    cache, _ = _robots("User-agent: *\nDisallow: /\n\nUser-agent: fvqa-crawler\nDisallow: /private/\n")

    async def go() -> list[tuple[bool, str]]:
        return [await cache.allowed("http://s.test/public.jpg"), await cache.allowed("http://s.test/private/a")]

    (ok_pub, _), (ok_priv, why) = asyncio.run(go())
    assert ok_pub and not ok_priv
    assert why == "http://s.test/robots.txt disallows /private/a for fvqa-crawler"


def test_robots_is_fetched_once_per_origin_even_concurrently() -> None:
    cache, fetched = _robots("User-agent: *\nDisallow: /x\n")

    async def go() -> list[bool]:
        urls = [f"http://s.test/{p}" for p in ("a", "x", "b", "x/y")] + ["http://t.test:8080/x"]
        return [ok for ok, _ in await asyncio.gather(*(cache.allowed(u) for u in urls))]

    assert asyncio.run(go()) == [True, False, True, False, False]
    assert sorted(fetched) == ["http://s.test/robots.txt", "http://t.test:8080/robots.txt"]


@pytest.mark.parametrize(("status", "allowed"), [(404, True), (301, True), (None, True), (503, False)])
def test_robots_status_handling_is_unchanged(status: int | None, allowed: bool) -> None:
    cache, _ = _robots("User-agent: *\nDisallow: /\n", status=status)
    ok, why = asyncio.run(cache.allowed("http://s.test/a.jpg"))
    assert ok is allowed
    assert ("HTTP 503" in why) is (status == 503)


def test_downloader_obeys_wildcard_robots_rules() -> None:
    routes = {
        "/robots.txt": Reply(body=b"User-agent: *\nDisallow: /*.jpg$\nAllow: /ok/*.jpg$\n", content_type="text/plain"),
        "/img/a.jpg": Reply(body=b"a"), "/ok/b.jpg": Reply(body=b"b"), "/img/c.png": Reply(body=b"c"),
    }
    with LoopbackServer(routes) as srv:
        async def go():
            async with Downloader(FetchOptions(allow_private=True, retries=0)) as d:
                return await d.fetch_many([srv.url(p) for p in ("/img/a.jpg", "/ok/b.jpg", "/img/c.png")])

        a, b, c = asyncio.run(go())
        hits = dict(srv.hits)
    assert a.reason == "robots_disallowed" and "/img/a.jpg" in a.detail
    assert b.ok and b.data == b"b" and c.ok and c.data == b"c"
    assert hits.get("/img/a.jpg", 0) == 0 and hits["/robots.txt"] == 1


# ------------------------------------------------------------------------------------------------
# Retry-After and the retry policy
# ------------------------------------------------------------------------------------------------


def test_parse_retry_after_forms() -> None:
    now = time.time()
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 40))
    assert parse_retry_after("7") == 7.0 and parse_retry_after(" 2 ") == 2.0
    assert 35 <= (parse_retry_after(date) or 0) <= 41
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now
    assert parse_retry_after({"Retry-After": "3"}) == 3.0  # plain dict, other case
    assert parse_retry_after({"RETRY-AFTER": date}) is not None
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "soon", "retry-after": "9"}) == 9.0
    for bad in (None, "", "soon", "nan", "inf", {}, {"content-type": "text/plain"}):
        assert parse_retry_after(bad) is None, bad


def test_backoff_is_exponential_jittered_and_capped() -> None:
    policy = RetryPolicy(attempts=5, base_s=0.5, cap_s=3.0, jitter=(0.5, 1.0))
    for retry, full in enumerate([0.5, 1.0, 2.0, 3.0, 3.0, 3.0]):
        delays = [policy.backoff(retry) for _ in range(50)]
        assert all(full * 0.5 <= d <= full for d in delays), (retry, delays)
    assert policy.backoff(10_000) <= 3.0  # no overflow on absurd attempt numbers
    assert policy.delay(0, 12.0) == 12.0  # Retry-After replaces the backoff ...
    assert RetryPolicy(attempts=2, base_s=1, cap_s=1, max_retry_after_s=5).delay(0, 60.0) == 5.0  # ... capped


def _run_policy(policy: RetryPolicy, outcomes: list[object], **kwargs) -> tuple[object, int, list[float]]:
    slept: list[float] = []
    calls = 0

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def attempt() -> object:
        nonlocal calls
        calls += 1
        value = outcomes[min(calls, len(outcomes)) - 1]
        if isinstance(value, BaseException):
            raise value
        return value

    async def go() -> object:
        return await policy.retrying(sleep=sleep, **kwargs)(attempt)

    try:
        result: object = asyncio.run(go())
    except Exception as exc:  # the last failure, re-raised as is
        result = exc
    return result, calls, slept


class _Transient(Exception):
    def __init__(self, after: float | None = None) -> None:
        super().__init__("transient")
        self.after = after


def test_retrying_stops_after_the_attempts_and_returns_or_raises_the_last_outcome() -> None:
    policy = RetryPolicy.from_max_retries(2, base_s=0.01, cap_s=0.04, jitter=(1.0, 1.0))
    result, calls, slept = _run_policy(policy, ["bad"], transient_result=lambda v: v == "bad")
    assert (result, calls, slept) == ("bad", 3, [0.01, 0.02])
    result, calls, _ = _run_policy(policy, [_Transient()], transient=lambda e: isinstance(e, _Transient))
    assert isinstance(result, _Transient) and calls == 3
    result, calls, _ = _run_policy(policy, [_Transient(), "ok"], transient=lambda e: isinstance(e, _Transient))
    assert (result, calls) == ("ok", 2)


def test_retrying_never_retries_what_the_caller_calls_permanent() -> None:
    policy = RetryPolicy.from_max_retries(5, base_s=0.0, cap_s=0.0)
    result, calls, slept = _run_policy(policy, [ValueError("billed")], transient=lambda e: isinstance(e, _Transient))
    assert isinstance(result, ValueError) and calls == 1 and slept == []
    result, calls, _ = _run_policy(policy, ["final"], transient_result=lambda v: v == "bad")
    assert (result, calls) == ("final", 1)
    assert RetryPolicy.from_max_retries(0, base_s=0, cap_s=0).attempts == 1


def test_retrying_waits_retry_after_when_given_and_can_give_up_early() -> None:
    policy = RetryPolicy.from_max_retries(3, base_s=0.01, cap_s=0.01, jitter=(1.0, 1.0), max_retry_after_s=30)
    outcomes: list[object] = [_Transient(2.0), _Transient(None), _Transient(90.0), "ok"]
    result, calls, slept = _run_policy(policy, outcomes, transient=lambda e: isinstance(e, _Transient),
                                       retry_after=lambda e: getattr(e, "after", None))
    assert (result, calls, slept) == ("ok", 4, [2.0, 0.01, 30.0])
    result, calls, slept = _run_policy(policy, [_Transient(90.0)], transient=lambda e: isinstance(e, _Transient),
                                       retry_after=lambda e: e.after, give_up=lambda e: e.after > 30)
    assert isinstance(result, _Transient) and calls == 1 and slept == []


def test_downloader_retries_with_the_shared_policy() -> None:
    def flaky(n: int) -> Reply:
        return Reply(503, b"busy", headers={"retry-after": "0"}) if n < 3 else Reply(body=b"done")

    routes = {"/flaky": flaky, "/down": Reply(500, b"no"), "/later": Reply(429, headers={"Retry-After": "3600"})}
    with LoopbackServer(routes) as srv:
        async def go():
            opts = FetchOptions(allow_private=True, respect_robots=False, retries=2, backoff_s=0.01,
                                max_retry_after_s=5)
            async with Downloader(opts) as d:
                return await d.fetch_many([srv.url("/flaky"), srv.url("/down"), srv.url("/later")])

        flaky_res, down, later = asyncio.run(go())
        hits = dict(srv.hits)
    assert flaky_res.ok and flaky_res.data == b"done" and flaky_res.attempts == 3
    assert not down.ok and down.attempts == 3 and down.detail.endswith("(gave up after 3 attempts)")
    assert not later.ok and later.attempts == 1 and "exceeds max_retry_after_s 5" in later.detail
    assert hits == {"/flaky": 3, "/down": 3, "/later": 1}


# ------------------------------------------------------------------------------------------------
# DNS rebinding on the robots.txt path
# ------------------------------------------------------------------------------------------------
