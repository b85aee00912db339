"""The one retry policy of the network layer (crawler downloads, LLM calls, Batch API control calls).

Built on tenacity's `AsyncRetrying` so the three callers share one loop instead of three hand-written
ones: stop after N attempts, wait `Retry-After` when the failure carried one (capped), else
exponential backoff with jitter (capped). What counts as *transient* stays with each caller: only it
knows whether a failure was billed or may have taken effect (a paid LLM call or a batch creation must
not be sent twice because of a retry this module decided on).
"""

from __future__ import annotations

import datetime
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_any,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    stop_any,
)

# a failed attempt's value (the returned result, or the raised exception) -> its Retry-After seconds
RetryAfterOf = Callable[[Any], float | None]


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that also works for plain dicts (aiohttp/httpx headers already are)."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def parse_retry_after(source: Mapping[str, str] | str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a response's headers (`retry-after-ms`, then `retry-after`) or from a bare
    `Retry-After` value: delta-seconds or an HTTP date (RFC 9110 section 10.2.3). None if absent or
    unreadable; never negative (a date in the past means "now")."""
    if source is None:
        return None
    if isinstance(source, str):
        value: str | None = source
    else:
        if ms := _header(source, "retry-after-ms"):  # OpenAI-style, finer than seconds
            try:
                return max(0.0, float(ms) / 1000)
            except ValueError:
                pass
        value = _header(source, "retry-after")
    if not value or not (value := value.strip()):
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" / asctime forms parse without a zone: HTTP dates are GMT
            when = when.replace(tzinfo=datetime.UTC)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # nan / inf: not a delay
        return None
    return max(0.0, seconds)


def _failed_value(state: RetryCallState) -> Any:
    """What the last attempt produced: its exception, or the result the caller judged a failure."""
    outcome = state.outcome
    if outcome is None:
        return None
    return outcome.exception() if outcome.failed else outcome.result()


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry; `retrying()` turns it into a tenacity loop.

    `attempts` counts every try (a `max_retries` of 3 is 4 attempts). The n-th retry (n from 0) waits
    `min(cap_s, base_s * 2**n)` times a random factor in `jitter`, unless the failure said how long
    (`Retry-After`), which is then waited instead, up to `max_retry_after_s`."""

    attempts: int
    base_s: float
    cap_s: float
    jitter: tuple[float, float] = (0.5, 1.0)
    max_retry_after_s: float | None = None

    @classmethod
    def from_max_retries(cls, max_retries: int, **kwargs: Any) -> RetryPolicy:
        return cls(attempts=max(0, max_retries) + 1, **kwargs)

    def backoff(self, retry: int) -> float:
        """The jittered exponential delay before retry number `retry` (0 = the first retry)."""
        delay = min(self.cap_s, self.base_s * 2 ** min(retry, 64))
        return max(0.0, delay * random.uniform(*self.jitter))

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Retry-After when given (capped), else `backoff(retry)`."""
        if retry_after is None:
            return self.backoff(retry)
        if self.max_retry_after_s is not None:
            retry_after = min(retry_after, self.max_retry_after_s)
        return max(0.0, retry_after)

    def retrying(
        self,
        *,
        transient: Callable[[BaseException], bool] | None = None,
        transient_result: Callable[[Any], bool] | None = None,
        retry_after: RetryAfterOf | None = None,
        give_up: Callable[[Any], bool] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> AsyncRetrying:
        """An `AsyncRetrying` for this policy: `await policy.retrying(...)(fn, *args)`.

        `transient(exc)` / `transient_result(value)` say which failures are worth another attempt
        (anything else is raised / returned at once). `retry_after(value)` reads the wait a failure
        asked for. `give_up(value)` stops early on a transient failure (e.g. a Retry-After longer than
        the caller will wait). When attempts run out, the last outcome is raised or returned as is."""
        never = lambda _value: False  # noqa: E731 - a default predicate
        give_up = give_up or never

        def wait(state: RetryCallState) -> float:
            after = retry_after(_failed_value(state)) if retry_after is not None else None
            return self.delay(state.attempt_number - 1, after)

        def stop_early(state: RetryCallState) -> bool:
            return give_up(_failed_value(state))

        kwargs: dict[str, Any] = {} if sleep is None else {"sleep": sleep}
        return AsyncRetrying(
            stop=stop_any(stop_after_attempt(max(1, self.attempts)), stop_early),
            wait=wait,
            retry=retry_any(retry_if_exception(transient or never), retry_if_result(transient_result or never)),
            retry_error_callback=_last_outcome,
            **kwargs,
        )


def _last_outcome(state: RetryCallState) -> Any:
    """Attempts ran out: hand back what the last one produced, as is (not tenacity's RetryError)."""
    assert state.outcome is not None
    return state.outcome.result()


__all__ = ["RetryPolicy", "parse_retry_after"]
