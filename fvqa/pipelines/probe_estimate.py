"""`fvqa build --estimate` for the model probe (backend `openai`): calls, tokens and dollars, as a range.

Per item the probe makes k search rollouts and k direct answers. A direct answer is one call. A
search rollout is 1 to `limits.max_rounds` calls: low = every search rollout answers at once, high =
every one uses all rounds, mid = turns spread evenly over 1..max_rounds. Turn t's prompt is the
whole conversation so far: the opening prompt with the question and image, each earlier reply
(`COMPLETION` tokens) and each search result turn (round 1 an image search with its thumbnails,
later ones text searches with `text_topk` page summaries), built from the real prompt templates at
~4 characters a token, images by OpenAI's tile rule (`fvqa.pipelines.expected`).

Items: the workspace's items still to label when there are any (their real questions and image
sizes; a rollout an earlier run kept is not made again, and a rollout whose first request is in the
response cache is counted as cached, with its later turns), else the items generate and infoseek are
expected to make. Web search calls (`search.backend: web`) and an LLM summariser are priced too;
the search cache is assumed empty.
"""

from __future__ import annotations

import math
from typing import Any

from fvqa.config import ProbeConfig
from fvqa.llm.config import LLMConfig
from fvqa.pipelines.base import Estimate, StageContext
from fvqa.pipelines.expected import (
    Span,
    crawl_image_paths,
    expected_items,
    image_tokens,
    infoseek_image_paths,
    page_chars,
    prices,
    sampled_image_tokens,
    tok,
    usd,
    workspace_image_tokens,
)

COMPLETION = Span(40, 100, 250)  # reply tokens per turn: a short <reason> and the action
QUESTION_CHARS = 80  # a question not written yet
TITLE_CHARS = 70  # one image-search hit as shown: rank, title, thumbnail placeholder
SENTENCE_CHARS = 120  # one summary sentence
URL_CHARS = 60
WRAPPER_CHARS = 120  # "Searched results: <information>...</information>\nOriginal user's question: "


class _Model:
    """Token sizes of one rollout's turns, for one end (low / mid / high) of the range."""

    def __init__(self, cfg: ProbeConfig, prompts: Any, question: float, image: float, thumb: float,
                 summary: float, completion: float) -> None:
        lim = cfg.limits
        self.rounds = lim.max_rounds
        self.completion = completion
        self.open_search = tok(len(prompts.round_1) + question) + image
        self.open_direct = tok(len(prompts.direct_answer) + question) + image
        self.after_image = (tok(WRAPPER_CHARS + lim.image_topk * TITLE_CHARS + question
                                 + len(prompts.after_image_search)) + lim.image_topk * thumb)
        self.after_text = tok(WRAPPER_CHARS + lim.text_topk * (URL_CHARS + summary) + question
                               + len(prompts.after_text_search))
        self.image_searches = lim.max_image_search

    def result(self, rnd: int) -> float:
        """Prompt tokens the search after round `rnd` adds (round 1: image search if allowed)."""
        return self.after_image if rnd == 1 and self.image_searches else self.after_text

    def search_rollout(self, turns: int) -> tuple[float, float, int, int]:
        """(prompt tokens, completion tokens, image searches, text searches) of a `turns`-call rollout."""
        prompt, total = self.open_search, 0.0
        n_img = n_txt = 0
        for t in range(1, turns + 1):
            total += prompt
            if t < turns:  # a search follows this turn
                if t == 1 and self.image_searches:
                    n_img += 1
                else:
                    n_txt += 1
                prompt += self.completion + self.result(t)
        return total, turns * self.completion, n_img, n_txt


def _turn_mix(rounds: int, end: str) -> list[tuple[int, float]]:
    """(turns, share of search rollouts) for one end of the range."""
    if end == "low":
        return [(1, 1.0)]
    if end == "high":
        return [(rounds, 1.0)]
    return [(t, 1.0 / rounds) for t in range(1, rounds + 1)]


def _cached_rollouts(ctx: StageContext, cfg: ProbeConfig, rows: list[dict[str, Any]], prompts: Any
                     ) -> tuple[int, int, int]:
    """(search rollouts to make, direct rollouts to make, of them cached): stored slots skipped,
    cache hits found from each rollout's deterministic first request."""
    from fvqa.agent import Rollout
    from fvqa.generators.openai_chat import sampling_params, wire_messages
    from fvqa.llm.client import LLMClient
    from fvqa.llm.runner import keyless
    from fvqa.pipelines.probe_model import jobs_for, stored_rollouts, upstream_data_id
    from fvqa.protocol import AgentItem

    have_all = stored_rollouts(ctx, [r["item_id"] for r in rows], cfg.k)
    n_search = n_direct = cached = 0
    client = LLMClient(keyless(cfg.llm), ctx.ws.cache_dir / "llm")
    try:
        for r in rows:
            try:
                image = ctx.ws.find_image(r["image_sha256"]).read_bytes() if r["image_sha256"] else None
            except (KeyError, OSError):
                image = None
            if image is None:
                continue  # rejected as "image missing" without a call
            item = AgentItem(r["item_id"], r["question"], image, r.get("image_url"), upstream_data_id(r))
            for (mode, _), job in jobs_for(item, cfg, set(have_all.get(r["item_id"], {}))):
                n_search += mode == "search"
                n_direct += mode == "direct"
                req = Rollout(job.item, job.mode, prompts, cfg.limits, "estimate", job.sampling).request()
                cached += client.cache.has(client.key_for(wire_messages(req.messages), **sampling_params(req.sampling)))
    finally:
        client.cache.close()
    return n_search, n_direct, cached


def estimate_probe(ctx: StageContext) -> Estimate | None:
    """The probe's `--estimate` row (None for backends that make no paid call)."""
    cfg: ProbeConfig = ctx.cfg
    if cfg.backend != "openai" or cfg.llm is None:
        return None
    from fvqa.protocol import load_prompts

    llm: LLMConfig = cfg.llm
    prompts = load_prompts(cfg.prompts)
    ws, config = ctx.ws, ctx.config
    assumptions: list[str] = []
    cached_calls = 0.0
    if ws.count("items"):
        cols = ("item_id", "question", "image_sha256", "image_url", "data_id")
        rows = [dict(zip(cols, r, strict=True)) for r in ws.execute(
            f"SELECT {', '.join(cols)} FROM items ORDER BY item_id")]
        todo = set(ctx.todo([r["item_id"] for r in rows]))
        rows = [r for r in rows if r["item_id"] in todo]
        n_search, n_direct, cached = _cached_rollouts(ctx, cfg, rows, prompts)
        question = Span.of(sum(len(r["question"] or "") for r in rows) / max(1, len(rows)))
        image = (workspace_image_tokens(ws, llm, "AND sha256 IN (SELECT image_sha256 FROM items)")
                 or Span.of(image_tokens(llm.image_max_side, llm.image_max_side)))
        searches, directs = Span.of(n_search), Span.of(n_direct)
        cached_rollouts = cached
        count_note = f"{len(rows)} items to label ({n_search + n_direct} rollouts to make, {cached} cached)"
        assumptions.append("rollouts whose first request is in the response cache are counted as cached, "
                           "with all their turns")
    else:
        items, count_note = expected_items(ws, config)
        searches = directs = items * cfg.k
        question = Span.of(QUESTION_CHARS)
        cached_rollouts = 0
        crawl_img, why_c = sampled_image_tokens(crawl_image_paths(config), llm, config.crawl.max_side)
        info_img, why_i = sampled_image_tokens(infoseek_image_paths(config), llm, llm.image_max_side)
        image = Span(min(crawl_img.low, info_img.low), (crawl_img.mid + info_img.mid) / 2,
                     max(crawl_img.high, info_img.high))
        assumptions += [f"probe items: {count_note}", f"probe crawled {why_c}", f"probe InfoSeek {why_i}"]
    side = math.isqrt(cfg.limits.thumbnail_max_pixels)
    thumb = image_tokens(side, side, llm.image_max_side)
    sentences = config.search.summary_sentences
    summary, why_s = page_chars(config, sentences * SENTENCE_CHARS)
    assumptions += [
        f"probe: k={cfg.k} search + {cfg.k} direct rollouts per item; a search rollout makes 1 (low) to "
        f"{cfg.limits.max_rounds} (high) calls, evenly spread (mid)",
        f"probe: {COMPLETION.low:.0f}/{COMPLETION.mid:.0f}/{COMPLETION.high:.0f} reply tokens per turn; "
        f"{cfg.limits.image_topk} thumbnails of {thumb} tokens per image search; "
        f"text-search summaries of up to {sentences} sentences ({why_s})",
    ]
    lo_p, mid_p, hi_p = prices(llm)
    web = config.search.backend == "web"
    summ = config.search.summarizer
    summ_llm = None
    if summ.kind == "llm" and config.search.backend in ("web", "local"):
        summ_llm = summ.llm if summ.llm is not None else LLMConfig()
    out: dict[str, tuple[float, float, float]] = {}
    for end, price in (("low", lo_p), ("mid", mid_p), ("high", hi_p)):
        m = _Model(cfg, prompts, getattr(question, end), getattr(image, end), thumb, getattr(summary, end),
                   getattr(COMPLETION, end))
        n_s, n_d = getattr(searches, end), getattr(directs, end)
        calls = n_d
        prompt = n_d * m.open_direct
        completion = n_d * m.completion
        n_img = n_txt = 0.0
        for turns, share in _turn_mix(cfg.limits.max_rounds, end):
            p, c, i, t = m.search_rollout(turns)
            calls += n_s * share * turns
            prompt += n_s * share * p
            completion += n_s * share * c
            n_img += n_s * share * i
            n_txt += n_s * share * t
        # cached rollouts (real items only) cost nothing: take them off at this end's average size
        total_rollouts = max(1.0, n_s + n_d)
        paid_share = 1 - min(1.0, cached_rollouts / total_rollouts)
        cached_here = calls * (1 - paid_share)
        calls, prompt, completion = calls * paid_share, prompt * paid_share, completion * paid_share
        n_img, n_txt = n_img * paid_share, n_txt * paid_share
        dollars = usd(price, prompt, completion, batch=False)
        if web:
            dollars += (n_img + n_txt) * config.search.web.usd_per_call
        if summ_llm is not None:
            chars = summ.max_chars or config.search.reader.max_chars
            n_sum = n_txt * cfg.limits.text_topk
            dollars += usd(prices(summ_llm)[1], n_sum * tok(chars), n_sum * 150, batch=summ_llm.batch)
        out[end] = (calls, prompt + completion, dollars)
        if end == "mid":
            cached_calls = cached_here
    if web:
        assumptions.append(f"probe: web search at ${config.search.web.usd_per_call} a call, search cache empty")
    if summ_llm is not None:
        assumptions.append("probe: an LLM summary per text-search page shown (search.summarizer.kind=llm)")
    if mid_p.input_per_1m == 0 and mid_p.output_per_1m == 0:
        assumptions.append(f"probe: {llm.model} at {llm.endpoints[0].base_url} is self-hosted and priced $0 "
                           "(set its price to bill it)")
    (c_lo, t_lo, u_lo), (c_mid, t_mid, u_mid), (c_hi, t_hi, u_hi) = out["low"], out["mid"], out["high"]
    return Estimate(
        paid_calls=round(c_mid), cached=round(cached_calls), tokens=round(t_mid), usd=u_mid,
        paid_calls_low=round(c_lo), paid_calls_high=round(c_hi), tokens_low=round(t_lo), tokens_high=round(t_hi),
        usd_low=u_lo, usd_high=u_hi,
        note=f"{count_note}; k={cfg.k}, 1-{cfg.limits.max_rounds} turns per search rollout; {llm.model}",
        assumptions=assumptions,
    )


def estimate_distill(ctx: StageContext) -> Estimate | None:
    """The distill stage's `--estimate` row (None for backends that make no paid call).

    Per item k search attempts, each 1 to `limits.max_rounds` teacher calls, sized like the probe's
    search rollouts (`_Model`). Items: the split's items still to distil when the split has run (an
    attempt an earlier run kept is not made again; one whose first request is cached is counted as
    cached, with its later turns), else the split's configured size (at most `distill.max_items`)."""
    from fvqa.config import DistillConfig
    from fvqa.pipelines.expected import expected_split_items

    cfg: DistillConfig = ctx.cfg
    if cfg.backend != "openai":
        return None
    from fvqa.agent import Rollout
    from fvqa.generators.openai_chat import sampling_params, wire_messages
    from fvqa.llm.client import LLMClient
    from fvqa.llm.runner import keyless
    from fvqa.pipelines.distill import sampling_for, split_rows, stored_attempts
    from fvqa.pipelines.probe_model import upstream_data_id
    from fvqa.protocol import AgentItem, load_prompts

    llm: LLMConfig = cfg.llm or LLMConfig()
    prompts = load_prompts(cfg.prompts)
    ws, config = ctx.ws, ctx.config
    assumptions: list[str] = []
    rows = split_rows(ws, cfg) if ws.count("splits") else []
    if rows:
        todo = set(ctx.todo([r["item_id"] for r in rows]))  # prepare() made the stage's tables
        rows = [r for r in rows if r["item_id"] in todo]
        have_all = stored_attempts(ws, [r["item_id"] for r in rows], cfg.k)
        n_attempts = cached = 0
        client = LLMClient(keyless(llm), ws.cache_dir / "llm")
        try:
            for r in rows:
                try:
                    image = ws.find_image(r["image_sha256"]).read_bytes() if r["image_sha256"] else None
                except (KeyError, OSError):
                    image = None
                if image is None:
                    continue
                item = AgentItem(r["item_id"], r["question"], image, r.get("image_url"), upstream_data_id(r))
                for i in range(cfg.k):
                    if i in have_all.get(r["item_id"], {}):
                        continue
                    n_attempts += 1
                    req = Rollout(item, "search", prompts, cfg.limits, "estimate", sampling_for(cfg, r["item_id"], i)
                                  ).request()
                    cached += client.cache.has(client.key_for(wire_messages(req.messages),
                                                              **sampling_params(req.sampling)))
        finally:
            client.cache.close()
        attempts = Span.of(n_attempts)
        question = Span.of(sum(len(r["question"] or "") for r in rows) / max(1, len(rows)))
        image = (workspace_image_tokens(ws, llm, "AND sha256 IN (SELECT image_sha256 FROM items)")
                 or Span.of(image_tokens(llm.image_max_side, llm.image_max_side)))
        count_note = f"{len(rows)} {cfg.split} items to distil ({n_attempts} attempts to make, {cached} cached)"
    else:
        items, why = expected_split_items(ws, config, cfg.split)
        if cfg.max_items is not None:
            items = Span(min(items.low, cfg.max_items), min(items.mid, cfg.max_items), min(items.high, cfg.max_items))
        attempts, cached = items * cfg.k, 0
        question = Span.of(QUESTION_CHARS)
        side = llm.image_max_side
        image = Span(image_tokens(512, 512), image_tokens(side, side), image_tokens(side, side))
        count_note = f"~{round(items.mid)} {cfg.split} items to distil"
        assumptions.append(f"distill items: {why}" + (f", at most distill.max_items={cfg.max_items}"
                                                       if cfg.max_items is not None else "")
                           + f"; images of {side} px at most")
    side = math.isqrt(cfg.limits.thumbnail_max_pixels)
    thumb = image_tokens(side, side, llm.image_max_side)
    summary, why_s = page_chars(config, config.search.summary_sentences * SENTENCE_CHARS)
    assumptions.append(f"distill: k={cfg.k} attempts per item, each 1 (low) to {cfg.limits.max_rounds} (high) "
                       f"teacher calls, evenly spread (mid); {why_s}")
    out: dict[str, tuple[float, float, float]] = {}
    for end, price in zip(("low", "mid", "high"), prices(llm), strict=True):
        m = _Model(cfg, prompts, getattr(question, end), getattr(image, end), thumb, getattr(summary, end),  # type: ignore[arg-type]
                   getattr(COMPLETION, end))
        n = max(0.0, getattr(attempts, end) - cached)  # cached attempts cost nothing
        calls = prompt = completion = n_search = 0.0
        for turns, share in _turn_mix(cfg.limits.max_rounds, end):
            p, c, i, t = m.search_rollout(turns)
            calls += n * share * turns
            prompt += n * share * p
            completion += n * share * c
            n_search += n * share * (i + t)
        dollars = usd(price, prompt, completion, batch=False)
        if config.search.backend == "web":
            dollars += n_search * config.search.web.usd_per_call
        out[end] = (calls, prompt + completion, dollars)
    if config.search.backend == "web":
        assumptions.append(f"distill: web search at ${config.search.web.usd_per_call} a call, search cache empty")
    (c_lo, t_lo, u_lo), (c_mid, t_mid, u_mid), (c_hi, t_hi, u_hi) = out["low"], out["mid"], out["high"]
    return Estimate(
        paid_calls=round(c_mid), cached=cached, tokens=round(t_mid), usd=u_mid,
        paid_calls_low=round(c_lo), paid_calls_high=round(c_hi), tokens_low=round(t_lo), tokens_high=round(t_hi),
        usd_low=u_lo, usd_high=u_hi, note=f"{count_note}; k={cfg.k}; {llm.model}", assumptions=assumptions)
