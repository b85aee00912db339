"""What `fvqa build --estimate` assumes about stages that have not run yet.

Counts: a stage whose input table is still empty is priced from the upstream stages' *expected*
output (concepts x crawl keep rate, generate's rule pass rate, the InfoSeek sample size), each a
`Span` (low, mid, high). Token lengths come from the real prompt templates at ~4 characters a
token, plus image tokens by OpenAI's high-detail tile rule on the image sizes a build will send:
sampled from the input files when they are on disk (crawl manifest, InfoSeek image folder, page
corpus), else taken from the config's size limits. Prices are the endpoint's (a self-hosted one
without a `price` is $0, as when billed).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fvqa.llm.config import LLMConfig, Price
from fvqa.pipelines.base import Estimate

if TYPE_CHECKING:
    from fvqa.config import RunConfig
    from fvqa.store import Workspace

T = TypeVar("T")

CHARS_PER_TOKEN = 4
KEEP_RATE = (0.85, 0.95, 1.0)  # crawl: share of sampled concepts that keep an image and page
PASS_RATE = (0.8, 0.95, 1.0)  # generate: share of paid replies that pass the App. D.1 rules
REPAIR_RATE = 0.1  # high end: this share of structured replies needs one repair request
SAMPLE = 64  # input files opened to measure image sizes / page lengths
LOW_DETAIL_TOKENS = 85  # an image's floor in OpenAI's rule (base tokens, no tile)


@dataclass(frozen=True)
class Span:
    """A quantity as (low, mid, high)."""

    low: float
    mid: float
    high: float

    @classmethod
    def of(cls, x: float) -> Span:
        return cls(x, x, x)

    def __add__(self, other: Span) -> Span:
        return Span(self.low + other.low, self.mid + other.mid, self.high + other.high)

    def __mul__(self, other: Span | float) -> Span:
        o = other if isinstance(other, Span) else Span.of(other)
        return Span(self.low * o.low, self.mid * o.mid, self.high * o.high)

    def rounded(self) -> Span:
        return Span(round(self.low), round(self.mid), round(self.high))


def tok(chars: float) -> float:
    """Tokens of `chars` characters of text (~4 a token; no tokenizer)."""
    return chars / CHARS_PER_TOKEN


# -- prices ------------------------------------------------------------------------------------------
def prices(llm: LLMConfig) -> tuple[Price, Price, Price]:
    """(cheapest, first, dearest) endpoint price as billed: its own, the config's, or $0 self-hosted."""
    each = [llm.price_for(ep) for ep in llm.endpoints]
    key = lambda p: p.input_per_1m + p.output_per_1m  # noqa: E731
    return min(each, key=key), each[0], max(each, key=key)


def billed(llm: LLMConfig) -> LLMConfig:
    """`llm` with `price` set to what its first endpoint is billed (for `fvqa.llm.runner.estimate`,
    which prices with the config-level `price`)."""
    return llm.model_copy(update={"price": prices(llm)[1]})


def usd(price: Price, prompt: float, completion: float, *, batch: bool) -> float:
    return price.usd(round(prompt), round(completion), batch=batch)


# -- image tokens ------------------------------------------------------------------------------------
def image_tokens(width: int, height: int, max_side: int | None = None) -> int:
    """OpenAI high-detail prompt tokens of a `width` x `height` image sent with its longer side at
    most `max_side`: fit in 2048 x 2048, shorter side at most 768, then 85 + 170 per 512 px tile."""
    w, h = float(width), float(height)
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        w, h = w * s, h * s
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    return LOW_DETAIL_TOKENS + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def _sizes(paths: Iterable[Path]) -> list[tuple[int, int]]:
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(im.size)
        except (OSError, ValueError):
            continue
    return out


def _manifest_images(manifest: Path) -> Iterator[Path]:
    with manifest.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("path"):
                yield (manifest.parent / row["path"])


def _take(it: Iterable[Any], n: int) -> list[Any]:
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    return out


def sampled_image_tokens(paths: Iterable[Path], llm: LLMConfig, fallback_side: int) -> tuple[Span, str]:
    """Mean image tokens of up to `SAMPLE` of these files (sent at `llm.image_max_side`), as
    (min, mean, max) of the sample; with no readable file, a `fallback_side` square for mid/high and
    one tile for low. Returns the span and a line saying which it was."""
    sizes = _sizes(_take(paths, SAMPLE))
    if sizes:
        toks = [image_tokens(w, h, llm.image_max_side) for w, h in sizes]
        return (Span(min(toks), sum(toks) / len(toks), max(toks)),
                f"image tokens from {len(toks)} sampled input images (OpenAI high-detail tiles)")
    side = min(fallback_side, llm.image_max_side)
    full = image_tokens(side, side)
    return (Span(image_tokens(512, 512), full, full),
            f"image tokens: a {side} px image, {full} tokens (OpenAI high-detail tiles; inputs not on disk)")


def crawl_image_paths(config: RunConfig) -> Iterator[Path]:
    """Images the crawl would choose from (its local manifest), if on disk."""
    m = config.crawl.manifest
    if config.crawl.source == "local" and m is not None and Path(m).is_file():
        yield from _manifest_images(Path(m))


def infoseek_image_paths(config: RunConfig) -> Iterator[Path]:
    d = config.infoseek.image_dir
    if d is not None and Path(d).is_dir():
        yield from (p for p in sorted(Path(d).iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))


def workspace_image_tokens(ws: Workspace, llm: LLMConfig, sql_filter: str = "") -> Span | None:
    """(min, mean, max) image tokens of the stored images `sql_filter` selects, or None."""
    rows = ws.execute(f"SELECT width, height FROM images WHERE width IS NOT NULL {sql_filter}")
    if not rows:
        return None
    toks = [image_tokens(w, h, llm.image_max_side) for w, h in rows]
    return Span(min(toks), sum(toks) / len(toks), max(toks))


def page_chars(config: RunConfig, cap: int) -> tuple[Span, str]:
    """Characters of page text a request carries (at most `cap`), from a sample of the page corpus
    (the local index's / crawl's pages) when on disk, else the cap."""
    lengths: list[int] = []
    for path in (config.index.corpus, config.crawl.pages):
        if path is None or not Path(path).is_file() or lengths:
            continue
        with Path(path).open(encoding="utf-8") as fh:
            for line in _take(fh, SAMPLE):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                text = row.get("wikipedia_content") or row.get("text") or row.get("contents") or ""
                lengths.append(min(cap, len(str(text))))
    if lengths:
        return (Span(min(lengths), sum(lengths) / len(lengths), max(lengths)),
                f"page text: {sum(lengths) // len(lengths)} chars on average ({len(lengths)} pages sampled)")
    return Span(cap / 4, cap, cap), f"page text: {cap // 4}-{cap} chars, mid {cap} (no page corpus on disk)"


# -- expected counts ----------------------------------------------------------------------------------
def _done(ws: Workspace, stage: str) -> bool:
    return bool(ws.execute("SELECT count(*) FROM runs WHERE stage = ? AND status = 'done'", [stage])[0][0])


def expected_concepts(ws: Workspace, config: RunConfig) -> tuple[Span, str]:
    n = ws.count("concepts")
    if n:
        return Span.of(n), f"{n} concepts in the workspace"
    n = config.concepts.n if config.concepts.enabled else 0
    return Span.of(n), f"{n} concepts (concepts.n)"


def expected_crawled(ws: Workspace, config: RunConfig) -> tuple[Span, str]:
    n = ws.count("crawled")
    if n and (_done(ws, "crawl") or not config.crawl.enabled):
        return Span.of(n), f"{n} crawled concepts"
    c, why = expected_concepts(ws, config)
    lo, mid, hi = KEEP_RATE
    return (c * Span(lo, mid, hi)).rounded(), f"{why} x crawl keep rate {mid:.0%} ({lo:.0%}-{hi:.0%})"


def expected_generated(ws: Workspace, config: RunConfig) -> tuple[Span, str]:
    if not config.generate.enabled:
        return Span.of(0), "generate off"
    n = _count_source(ws, "metaclip")
    if n and _done(ws, "generate"):
        return Span.of(n), f"{n} generated items"
    k, why = expected_crawled(ws, config)
    lo, mid, hi = PASS_RATE
    return (k * Span(lo, mid, hi)).rounded(), f"{why} x rule pass rate {mid:.0%} ({lo:.0%}-{hi:.0%})"


def expected_infoseek(ws: Workspace, config: RunConfig) -> tuple[Span, str]:
    if not config.infoseek.enabled:
        return Span.of(0), "infoseek off"
    n = _count_source(ws, "infoseek")
    if n and _done(ws, "infoseek"):
        return Span.of(n), f"{n} InfoSeek items"
    n = config.infoseek.n
    return Span(0.95 * n, n, n).rounded(), f"{n} InfoSeek items (infoseek.n; fewer if the files hold fewer)"


def expected_items(ws: Workspace, config: RunConfig) -> tuple[Span, str]:
    """Items a stage reading `items` will see once generate and infoseek have run."""
    g, gw = expected_generated(ws, config)
    i, iw = expected_infoseek(ws, config)
    total = g + i
    return total, f"~{round(total.mid)} items expected ({gw}; + {iw})"


def _count_source(ws: Workspace, source: str) -> int:
    if not ws.count("items"):
        return 0
    return int(ws.execute("SELECT count(*) FROM items WHERE source = ?", [source])[0][0])


# -- ranges of an LLM task's estimate -----------------------------------------------------------------
def ranged(est: Estimate, low: float = 1.0, high: float = 1.0, *, low_tokens: float = 1.0,
           high_tokens: float = 1.0, assumptions: Iterable[str] = ()) -> Estimate:
    """`est` (the mid) with its paid calls scaled by `low` / `high` at the ends, and its tokens and
    dollars also by `low_tokens` / `high_tokens` (tokens per call relative to the mid's)."""
    lt, ht = low * low_tokens, high * high_tokens
    return replace(est, paid_calls_low=round(est.paid_calls * low), paid_calls_high=round(est.paid_calls * high),
                   tokens_low=round(est.tokens * lt), tokens_high=round(est.tokens * ht),
                   usd_low=est.usd * lt, usd_high=est.usd * ht, assumptions=[*est.assumptions, *assumptions])


def with_typical_prompt(task: T, tokens: float) -> T:
    """A copy of `task` whose `typical_prompt_tokens()` is `tokens` (sizes measured on the inputs)."""
    sized = copy.copy(task)
    sized.typical_prompt_tokens = lambda: tokens  # type: ignore[method-assign]
    return sized


def repair_note(stage: str) -> str:
    return (f"{stage}: high end adds one repair request for {REPAIR_RATE:.0%} of replies; "
            "requests already in the response cache are free")


def expected_split_items(ws: Workspace, config: RunConfig, split: str) -> tuple[Span, str]:
    """Items the split stage is expected to put in `split` (its configured sizes) before it has run."""
    if split == "train":
        n = config.split.train_size
    elif split == "test":
        n = sum(config.split.test_per_source.values())
    else:
        return Span.of(0), f"split {split!r} has no configured size"
    return Span(0.9 * n, n, n).rounded(), f"{n} {split} items (the split's configured size; fewer if short)"
