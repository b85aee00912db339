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
from fvqa.llm.task import Reject, Reply
from fvqa.pipelines.base import Estimate, Stage, StageContext
from fvqa.pipelines.llm_task import run_stage_task, stage_estimate
from fvqa.store import now
from fvqa.textgen import qa
from fvqa.textgen.qa_task import ConceptPage, QAPair, QATask, checked_pair

STAGE = QATask.name

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
                ctx.reject(item_id(row["concept_id"]), "image_missing",
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
        cfg: GenerateConfig = ctx.cfg
        for row in ctx.progress(rows, description="generate (template)"):
            question = qa.template_question(row["concept_id"], row["category"])
            try:  # the same rules as an LLM's pair
                pair = checked_pair(row["concept"], question, row["concept"], [], raw=question,
                                    max_answer_words=cfg.max_answer_words)
            except Reject as rej:
                ctx.reject(item_id(row["concept_id"]), rej.reason, rej.detail)
                continue
            self._emit(ctx, row, pair, prov)

    def _task(self, ctx: StageContext) -> QATask:
        cfg: GenerateConfig = ctx.cfg
        return QATask(qa.load_prompt(cfg.prompt_path), max_answer_words=cfg.max_answer_words,
                      send_image=cfg.send_image)

    def _task_inputs(self, ctx: StageContext, rows: list[dict[str, Any]]) -> dict[str, ConceptPage]:
        """item id -> what its question is written from (the image is read when its request is sent)."""
        return {item_id(r["concept_id"]): ConceptPage(r["concept"], r["page_title"], r["page_text"],
                                                      self._image(ctx, r)) for r in rows}

    def _run_llm(self, ctx: StageContext, rows: list[dict[str, Any]]) -> None:
        cfg: GenerateConfig = ctx.cfg
        llm = llm_config(cfg)
        task = self._task(ctx)
        by_id = {item_id(r["concept_id"]): r for r in rows}
        prov = {"backend": "llm", "model": llm.model, "prompt": task.prompt_hash}

        def on_output(key: str, pair: QAPair, reply: Reply) -> None:
            self._emit(ctx, by_id[key], pair, {**prov, "repaired": reply.repaired})

        run_stage_task(ctx, task, self._task_inputs(ctx, rows), llm, on_output, batch_wait_s=cfg.batch_wait_s,
                       not_done="concepts not done")

    # -- out -------------------------------------------------------------------------------------
    def _emit(self, ctx: StageContext, row: dict[str, Any], pair: QAPair, prov: dict[str, Any]) -> None:
        ctx.emit("items", dict(
            item_id=item_id(row["concept_id"]), source="metaclip", question=pair.question, answer=pair.answer,
            aliases=pair.aliases, question_type=pair.question_type,
            image_sha256=row["image_sha256"], image_url=row["image_url"], page_url=row["page_url"],
            page_title=row["page_title"], concept=row["concept"], concept_count=row["count"],
            concept_tier=row["tier"],
            provenance=json.dumps({STAGE: {**prov, "time": now().isoformat()}}, ensure_ascii=False),
        ))

    # -- cost ------------------------------------------------------------------------------------
    def estimate(self, ctx: StageContext) -> Estimate | None:
        """Crawled concepts to do (their real requests, cache hits free), or before the crawl the
        concepts the crawl is expected to keep; low/high bound page length, image size and repairs."""
        from fvqa.llm.task import request_size
        from fvqa.pipelines import expected as ex

        cfg: GenerateConfig = ctx.cfg
        if cfg.backend != "llm":
            return None
        llm = ex.billed(llm_config(cfg))
        task = self._task(ctx)
        if ctx.ws.count("crawled") > 0:
            todo = [r for r in self._todo(ctx, self._inputs(ctx)) if self._image(ctx, r) is not None]
            est = stage_estimate(ctx, task, self._task_inputs(ctx, todo), llm, f"{len(todo)} concepts to do")
            return ex.ranged(est, 1.0, 1 + ex.REPAIR_RATE, assumptions=[ex.repair_note(STAGE)])
        # nothing crawled yet: the concepts the crawl is expected to keep, at page lengths and image
        # sizes sampled from the inputs on disk (else a full page excerpt and a max-side image)
        n, why = ex.expected_crawled(ctx.ws, ctx.config)
        pages, why_p = ex.page_chars(ctx.config, qa.MAX_PAGE_CHARS)
        images, why_i = ex.sampled_image_tokens(ex.crawl_image_paths(ctx.config), llm, ctx.config.crawl.max_side)

        def prompt(end: str) -> float:
            page = ConceptPage("x" * 20, "x" * 30, "x" * round(getattr(pages, end)))
            chars, _ = request_size(task.format(page).messages)
            return ex.tok(chars) + (getattr(images, end) if cfg.send_image else 0) + task.completion_tokens

        mid = prompt("mid")
        est = stage_estimate(ctx, ex.with_typical_prompt(task, mid - task.completion_tokens), {}, llm,
                             f"~{round(n.mid)} concepts expected ({why})", expected=round(n.mid))
        scale = n.mid or 1
        return ex.ranged(est, n.low / scale, n.high / scale * (1 + ex.REPAIR_RATE),
                         low_tokens=prompt("low") / mid, high_tokens=prompt("high") / mid,
                         assumptions=[f"generate: {why}", f"generate: {why_p}; {why_i}", ex.repair_note(STAGE)])
