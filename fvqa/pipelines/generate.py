"""generate: crawled image + page + concept -> one factual question/answer item per concept.

Backends: `template` (offline; fixed questions per concept category with the concept as answer,
labelled as such in provenance) and `llm` (any OpenAI-compatible endpoint, JSON reply). Every pair,
whatever made it, passes the App. D.1 rules in code; a broken rule is a reject that names it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fvqa.config import GenerateConfig
from fvqa.llm.config import LLMConfig
from fvqa.llm.ledger import estimate_cost
from fvqa.llm.structured import StructuredResult
from fvqa.pipelines.base import Estimate, Stage, StageContext
from fvqa.store import now
from fvqa.textgen import qa
from fvqa.textgen.llm_run import LazyRequests, cached_count, is_transient, run_structured
from fvqa.textgen.rules import question_type, rule_violations

STAGE = "generate"
IMAGE_TOKENS = 765  # GPT-4o high-detail cost of a 768 px image (4 tiles x 170 + 85)
COMPLETION_TOKENS = 60

INPUT_SQL = """
SELECT c.concept_id, c.concept, c.count, c.tier, c.category, k.image_sha256, k.image_url, k.page_url,
       k.page_title, k.page_text, im.ext
FROM crawled k JOIN concepts c USING (concept_id) LEFT JOIN images im ON im.sha256 = k.image_sha256
ORDER BY c.concept_id
"""


def item_id(concept_id: str) -> str:
    """`metaclip-<concept id>` (without doubling a prefix the concepts stage already gave)."""
    return concept_id if concept_id.startswith("metaclip-") else f"metaclip-{concept_id}"


def llm_config(cfg: GenerateConfig) -> LLMConfig:
    return cfg.llm or LLMConfig()


class GenerateStage(Stage):
    """crawled x concepts -> items (source `metaclip`)."""

    name = STAGE
    inputs = ("crawled",)
    outputs = ("items",)
    description = "write one question/answer pair per crawled concept"

    # -- in --------------------------------------------------------------------------------------
    def _inputs(self, ctx: StageContext) -> list[dict[str, Any]]:
        cols = ("concept_id", "concept", "count", "tier", "category", "image_sha256", "image_url",
                "page_url", "page_title", "page_text", "ext")
        return [dict(zip(cols, r, strict=True)) for r in ctx.ws.execute(INPUT_SQL)]

    def _todo(self, ctx: StageContext, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keep = set(ctx.todo([item_id(r["concept_id"]) for r in rows]))
        return [r for r in rows if item_id(r["concept_id"]) in keep]

    def _image(self, ctx: StageContext, row: dict[str, Any]) -> Path | None:
        if not row["image_sha256"] or not row["ext"]:
            return None
        path = ctx.ws.image_path(row["image_sha256"], row["ext"])
        return path if path.is_file() else None

    # -- work ------------------------------------------------------------------------------------
    def run(self, ctx: StageContext) -> None:
        cfg: GenerateConfig = ctx.cfg
        rows = self._inputs(ctx)
        ctx.stats.n_in = len(rows)
        todo = []
        for row in self._todo(ctx, rows):  # an item without its image is no visual question
            if self._image(ctx, row) is None:
                ctx.reject(item_id(row["concept_id"]), "image file missing",
                           f"crawled image {row['image_sha256']} is not in the workspace image store")
            else:
                todo.append(row)
        if not todo:
            return  # nothing to do: no client, so a finished stage needs no API key
        if cfg.backend == "template":
            self._run_template(ctx, todo)
        else:
            self._run_llm(ctx, todo)

    def _run_template(self, ctx: StageContext, rows: list[dict[str, Any]]) -> None:
        prov = {"backend": "template", "model": None, "prompt": None}
        ctx.stats.notes.append("questions come from fixed templates per category (backend=template), not an LLM; "
                               "set generate.backend=llm for real questions")
        for row in ctx.progress(rows, description="generate (template)"):
            question = qa.template_question(row["concept_id"], row["category"])
            self._accept(ctx, row, question, row["concept"], [], prov, raw=question)

    def _requests(self, ctx: StageContext, rows: list[dict[str, Any]], prompt: str) -> LazyRequests:
        """item id -> messages, built (image read) only when a request is about to be sent."""
        cfg: GenerateConfig = ctx.cfg
        specs = {item_id(r["concept_id"]): (r, self._image(ctx, r) if cfg.send_image else None) for r in rows}
        return LazyRequests(specs, lambda spec: qa.build_messages(
            prompt, spec[0]["concept"], spec[0]["page_title"], spec[0]["page_text"], spec[1]))

    def _run_llm(self, ctx: StageContext, rows: list[dict[str, Any]]) -> None:
        cfg: GenerateConfig = ctx.cfg
        llm = llm_config(cfg)
        prompt = qa.load_prompt(cfg.prompt_path)
        by_id = {item_id(r["concept_id"]): r for r in rows}
        requests = self._requests(ctx, rows, prompt)
        prov = {"backend": "llm", "model": llm.model, "prompt": qa.prompt_hash(prompt)}
        transient: list[str] = []

        def on_result(rid: str, res: StructuredResult[Any]) -> None:
            if res.ok and res.value is not None:
                v = res.value
                self._accept(ctx, by_id[rid], v.question, v.answer, v.aliases,
                             {**prov, "repaired": res.repaired}, raw=res.raw or "")
            elif is_transient(res):
                transient.append(res.error_reason or "request failed")
            else:
                reason = "unparseable reply" if res.raw is not None else "LLM request failed"
                ctx.reject(rid, reason, f"{res.error_reason}\nraw reply: {res.raw}")

        totals = run_structured(llm, ctx.ws.cache_dir, STAGE, requests, qa.QAReply, on_result,
                                batch_wait_s=cfg.batch_wait_s)
        ctx.stats.paid_calls += totals.paid_calls
        ctx.stats.cache_hits += totals.cache_hits
        ctx.stats.cost_usd += totals.usd
        if transient:
            ctx.stats.notes.append(f"{len(transient)} concepts not done ({transient[0]}); re-run to retry them")
        if totals.pending:
            ctx.stats.notes.append(f"{len(totals.pending)} requests still in a running batch; re-run to collect")

    # -- out -------------------------------------------------------------------------------------
    def _accept(self, ctx: StageContext, row: dict[str, Any], question: str, answer: str,
                aliases: list[str], prov: dict[str, Any], *, raw: str) -> None:
        """Check the rules, then emit the item (or reject it naming the first broken rule)."""
        cfg: GenerateConfig = ctx.cfg
        key = item_id(row["concept_id"])
        question, answer = question.strip(), answer.strip()
        broken = rule_violations(question, answer, row["concept"], max_answer_words=cfg.max_answer_words)
        if broken:
            ctx.reject(key, f"rule violated: {broken[0]}",
                       f"broken: {'; '.join(broken)}\nconcept: {row['concept']}\nraw reply: {raw}")
            return
        ctx.emit("items", dict(
            item_id=key, source="metaclip", question=question, answer=answer,
            aliases=qa.clean_aliases(answer, aliases), question_type=question_type(question),
            image_sha256=row["image_sha256"], image_url=row["image_url"], page_url=row["page_url"],
            page_title=row["page_title"], concept=row["concept"], concept_count=row["count"],
            concept_tier=row["tier"],
            provenance=json.dumps({STAGE: {**prov, "time": now().isoformat()}}, ensure_ascii=False),
        ))

    # -- cost ------------------------------------------------------------------------------------
    def estimate(self, ctx: StageContext) -> Estimate | None:
        cfg: GenerateConfig = ctx.cfg
        if cfg.backend != "llm":
            return None
        llm = llm_config(cfg)
        prompt = qa.load_prompt(cfg.prompt_path)
        todo = self._todo(ctx, self._inputs(ctx))
        requests = self._requests(ctx, todo, prompt)
        if not requests and ctx.ws.count("crawled") == 0:
            # nothing crawled yet: price the concepts the config asks for, with a full page excerpt
            n = ctx.config.concepts.n if ctx.config.concepts.enabled else 0
            avg_prompt = (len(prompt) + qa.MAX_PAGE_CHARS) / 4 + (IMAGE_TOKENS if cfg.send_image else 0)
            est = estimate_cost(n, avg_prompt, COMPLETION_TOKENS, llm.price, batch=llm.batch)
            note = f"{n} concepts expected (concepts.n; nothing crawled yet); {llm.model}"
        else:
            cached = cached_count(llm, ctx.ws.cache_dir, requests, qa.QAReply) if requests else 0
            text_chars = n_images = 0
            for messages in requests.values():
                text_chars += len(messages[0]["content"][0]["text"])
                n_images += len(messages[0]["content"]) - 1
            avg_prompt = (text_chars / 4 + n_images * IMAGE_TOKENS) / max(1, len(requests))
            est = estimate_cost(len(requests), avg_prompt, COMPLETION_TOKENS, llm.price, cached=cached,
                                batch=llm.batch)
            note = f"{len(todo)} concepts to do; {llm.model}"
        if llm.batch:
            note += " (batch price)"
        return Estimate(paid_calls=est.paid_calls, cached=est.cached,
                        tokens=est.prompt_tokens + est.completion_tokens, usd=est.usd, note=note)
