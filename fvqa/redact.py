"""Keep secrets out of everything fvqa writes: one scrubber for API keys in every form they come back in.

An endpoint may echo the key it was sent (an error message, a debugging proxy, a prompt-injected
model): raw, percent-encoded (a search API URL in an error), JSON-escaped, or base64 (a Basic
Authorization header). Every string that reaches a cache, a table, a log line or an export passes
through `scrub` first.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
MIN_SECRET_LEN = 6  # shorter "keys" (e.g. "x" for a local server) would mask ordinary text


def variants(secret: str) -> set[str]:
    """The forms `secret` may take in a reply or an error: raw, URL-encoded, JSON-escaped, base64."""
    if len(secret) < MIN_SECRET_LEN:
        return set()
    forms = {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}
    forms.add(base64.b64encode(secret.encode()).decode().rstrip("="))
    return {f for f in forms if f}


class Scrubber:
    """Replaces every known form of the given secrets with `***`."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        forms: set[str] = set()
        for s in secrets:
            if s:
                forms |= variants(s)
        self.forms = sorted(forms, key=len, reverse=True)  # longest first: no partial masks left behind

    def __bool__(self) -> bool:
        return bool(self.forms)

    def text(self, text: str) -> str:
        for form in self.forms:
            if form in text:
                text = text.replace(form, MASK)
        return text

    def value(self, value: Any) -> Any:
        """`value` (a JSON-like tree: a reply body) with every string scrubbed."""
        if not self.forms:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        return value
