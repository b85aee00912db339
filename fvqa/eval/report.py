"""`fvqa eval report`: Markdown and a self-contained HTML page with PNG plots, next to the paper.

The HTML embeds its plots as ``data:image/png;base64`` so it can be mailed or attached as one file;
the Markdown links the same PNGs from `plots/`. The protocol section states how the numbers were
made (decoding, judge model and prompt hash, primary metric, limits, prompts), because published
numbers move by 10-15 points with it. Predictions that are not scored (failed model or judge call) are
never counted as wrong: the report says how many per cell, and a cell with nothing scored shows n=0.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from fvqa.errors import FvqaError
from fvqa.eval.aggregate import (
    OUTCOMES,
    Cell,
    Unscored,
    averages,
    cells,
    scored_rows,
    unscored,
    unscored_note,
)
from fvqa.store import Workspace

BENCH_ORDER = ("fvqa", "infoseek", "mmsearch", "simplevqa", "livevqa")


@dataclass(frozen=True)
class PaperRow:
    """One row of the MMSearch-R1 paper's Table 1: accuracy % per benchmark in BENCH_ORDER, the
    average the paper prints (an unweighted mean), and the search ratio % per benchmark when given."""

    label: str
    workflow: str
    accuracy: tuple[float, float, float, float, float]
    avg: float
    search_ratio: tuple[float, float, float, float, float] | None = None


PAPER_TABLE1: tuple[PaperRow, ...] = (
    PaperRow("GPT-4o", "direct", (41.7, 42.7, 22.2, 46.6, 26.9), 36.0),
    PaperRow("Qwen2.5-VL-7B", "direct", (20.3, 20.1, 12.8, 38.4, 17.8), 21.9),
    PaperRow("GPT-4o", "rag", (66.0, 59.1, 62.5, 63.4, 59.6), 62.1),
    PaperRow("Qwen2.5-VL-7B", "rag", (52.9, 53.7, 52.2, 51.6, 48.0), 51.6),
    PaperRow("MMSearch-R1-7B", "on_demand", (58.4, 55.1, 53.8, 57.4, 48.4), 54.6,
             (66.8, 61.6, 88.5, 42.5, 76.2)),
)
WORKFLOW_SEARCH = {"direct": 0.0, "rag": 100.0}
"""Search ratio of the fixed workflows by construction (direct never searches; RAG always twice)."""


def paper_search_ratio(row: PaperRow) -> float:
    """A paper row's average search ratio: the mean of its per-benchmark ratios, else its workflow's."""
    if row.search_ratio is not None:
        return sum(row.search_ratio) / len(row.search_ratio)
    return WORKFLOW_SEARCH[row.workflow]


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    plots: list[Path]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _plots(cs: list[Cell]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    cs = [c for c in cs if c.n]  # an empty cell has no accuracy to plot
    avg = averages(cs)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (model, wf), v in sorted(avg.items()):
        ax.scatter(100 * v["search_ratio"], 100 * v["accuracy"], s=60, label=f"{model} / {wf}")
    for row in PAPER_TABLE1:
        sr, acc = paper_search_ratio(row), row.avg
        ax.scatter(sr, acc, s=60, facecolors="none", edgecolors="grey")
        ax.annotate(f"paper {row.label} {row.workflow}", (sr, acc), fontsize=7, color="grey", xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("search ratio (%)")
    ax.set_ylabel("average accuracy over benchmarks (%)")
    ax.set_xlim(-5, 110)
    ax.set_ylim(0, 100)
    ax.set_title("accuracy vs search ratio (hollow: paper Table 1)")
    if avg:
        ax.legend(fontsize=7, loc="lower right")
    out["accuracy_vs_search_ratio"] = _png(fig)
    plt.close(fig)

    benches = _bench_order(cs)
    series = sorted({(c.model, c.workflow) for c in cs})
    fig, ax = plt.subplots(figsize=(max(6.4, 1.4 * len(benches) + 2), 4.4))
    width = 0.8 / max(1, len(series))
    for j, (model, wf) in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for i, b in enumerate(benches):
            c = next((c for c in cs if (c.model, c.workflow, c.benchmark) == (model, wf, b)), None)
            if c is None:
                continue
            xs.append(i + (j - (len(series) - 1) / 2) * width)
            ys.append(100 * c.accuracy)
            lo.append(100 * (c.accuracy - c.ci_lo))
            hi.append(100 * (c.ci_hi - c.accuracy))
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=f"{model} / {wf}")
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylabel("accuracy (%) with 95% bootstrap CI")
    ax.set_ylim(0, 105)
    ax.set_title("accuracy per benchmark")
    if series:  # outside the axes, right of them: inside it would cover bars and their error bars
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    out["accuracy_per_benchmark"] = _png(fig)
    plt.close(fig)
    return out


def _bench_order(cs: list[Cell]) -> list[str]:
    kinds = {c.benchmark: c.kind for c in cs}
    return sorted(kinds, key=lambda b: (BENCH_ORDER.index(kinds[b]) if kinds[b] in BENCH_ORDER else 99, b))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _not_scored(c: Cell) -> str:
    parts = [f"{n} {what}" for n, what in ((c.not_scored_model, "model call failed"),
                                           (c.not_scored_judge, "judge call failed"),
                                           (c.not_scored_pending, "not scored yet")) if n]
    return ", ".join(parts) or "0"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _cell(cs: list[Cell], model: str, wf: str, bench: str) -> Cell | None:
    return next((c for c in cs if (c.model, c.workflow, c.benchmark) == (model, wf, bench)), None)


def _paper_value(values: tuple[float, ...] | None, kind: str) -> str:
    if values is None or kind not in BENCH_ORDER:
        return "–"
    return f"{values[BENCH_ORDER.index(kind)]:.1f}"


def _tables(cs: list[Cell], prov: dict[tuple[str, str], str]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table of the report."""
    benches = _bench_order(cs)
    kinds = {c.benchmark: c.kind for c in cs}
    avg = averages(cs)
    pairs = sorted({(c.model, c.workflow) for c in cs})
    main_rows = []
    for model, wf in pairs:
        v = avg.get((model, wf), {})
        row = [f"{model} / {wf}"]
        for b in benches:
            c = _cell(cs, model, wf, b)
            if c is None:
                row.append("–")
            elif c.n == 0:
                row.append(f"– ({c.not_scored} not scored)")
            else:
                row.append(f"{_pct(c.accuracy)} [{_pct(c.ci_lo)}, {_pct(c.ci_hi)}]"
                           + (f" ({c.not_scored} not scored)" if c.not_scored else ""))
        scored = [c for c in cs if (c.model, c.workflow) == (model, wf) and c.n]
        k = int(v.get("n_benchmarks", 0))
        avg_text = _pct(v.get("accuracy")) + (f" ({k} of {len(BENCH_ORDER)})" if v and k != len(BENCH_ORDER) else "")
        any_ratio = sum(c.search_any_ratio for c in scored) / len(scored) if scored else None
        main_rows.append(row + [avg_text, _pct(v.get("search_ratio")), _pct(any_ratio), prov.get((model, wf), "")])
    for pr in PAPER_TABLE1:
        row = [f"paper: {pr.label} / {pr.workflow}"] + [_paper_value(pr.accuracy, kinds[b]) for b in benches]
        main_rows.append(row + [f"{pr.avg:.1f}", f"{paper_search_ratio(pr):.1f}", "–", "paper Table 1"])
    main = ("Accuracy (%) next to the paper's Table 1",
            ["model / workflow", *benches, "avg (unweighted)", "search ratio %", "searched %", "provenance"],
            main_rows)

    ratio_rows = []
    for model, wf in pairs:
        row = [f"{model} / {wf}"]
        for b in benches:
            c = _cell(cs, model, wf, b)
            row.append("–" if c is None or c.n == 0 else f"{_pct(c.search_ratio)} / {_pct(c.search_any_ratio)}")
        ratio_rows.append(row)
    for pr in PAPER_TABLE1:
        if pr.search_ratio is not None:
            ratio_rows.append([f"paper: {pr.label} / {pr.workflow}"]
                              + [f"{_paper_value(pr.search_ratio, kinds[b])} / –" for b in benches])
    ratios = ("Search use (%): search ratio (calls / maximum search steps) / searched (items with any search)",
              ["model / workflow", *benches], ratio_rows)

    detail_rows = []
    for c in sorted(cs, key=lambda c: (c.model, c.workflow, benches.index(c.benchmark))):
        extra = []
        if c.simplevqa:
            extra.append(f"SimpleVQA F={_pct(c.simplevqa['f_score'])}, CGA={_pct(c.simplevqa['correct_given_attempted'])}")
        if c.infoseek_final is not None:
            extra.append(f"InfoSeek final (HM unseen q/e)={_pct(c.infoseek_final)}")
        extra += [f"{name}={_pct(value)} (variant, not official)" for name, value in c.variants.items()]
        if c.judge_failures:
            extra.append(f"{c.judge_failures} judge errors")
        if c.n == 0:
            detail_rows.append([c.model, c.workflow, c.benchmark, "0", *["–"] * 10, _not_scored(c), ""])
            continue
        detail_rows.append([
            c.model, c.workflow, c.benchmark, str(c.n), _pct(c.accuracy), _pct(c.em), _pct(c.subem),
            f"{_pct(c.official)} ({c.official_name})", _pct(c.judge), _pct(c.judge_fvqa), _pct(c.search_ratio),
            _pct(c.search_any_ratio), f"{c.image_calls}/{c.text_calls}", _pct(c.correct_without_search),
            _not_scored(c), "; ".join(extra)])
    detail = ("All metrics per cell", ["model", "workflow", "benchmark", "n", "accuracy", "EM", "SubEM",
                                       "official", "judge", "judge (fvqa)", "search ratio", "searched",
                                       "image/text calls", "correct w/o search", "not scored", "notes"], detail_rows)

    outcome_rows = [[c.model, c.workflow, c.benchmark, str(c.n), *[_pct(c.outcomes.get(o)) for o in OUTCOMES]]
                    for c in sorted(cs, key=lambda c: (c.model, c.workflow, benches.index(c.benchmark))) if c.n]
    outcomes = ("Correct and wrong, with and without search (% of items; the paper's Fig. 4b)",
                ["model", "workflow", "benchmark", "n", *[o.replace("_", " ") for o in OUTCOMES]], outcome_rows)
    out = [main, ratios, outcomes, detail]
    for key in ("knowledge_type", "search_label", "split", "question_type"):
        rows = []
        for c in cs:
            for group, (n, acc) in c.breakdowns.get(key, {}).items():
                rows.append([c.model, c.workflow, c.benchmark, group, str(n), _pct(acc)])
        if rows:
            out.append((f"Breakdown by {key}", ["model", "workflow", "benchmark", key, "n", "accuracy"], rows))
    return out


def search_backend(config: dict[str, Any]) -> str:
    """The search backend in words that do not depend on the machine (no paths): part of provenance."""
    search = config.get("search") or {}
    backend = search.get("backend", "local")
    summ = search.get("summarizer") or {}
    summary = summ.get("kind", "extractive")
    if summary == "llm":
        summary += f" ({(summ.get('llm') or {}).get('model', 'gpt-4o')})"
    if backend == "local":
        local = search.get("local") or {}
        where = f"local index, CLIP {local.get('clip_model', 'ViT-B-32')}/{local.get('clip_pretrained') or 'random'}"
    elif backend == "web":
        web = search.get("web") or {}
        where = f"web ({web.get('image_engine', 'google_lens')} + {web.get('text_engine', 'google')})"
    else:
        where = backend
    return f"{where}, top-{search.get('top_k', 5)}, summaries: {summary}"


def provenance(config: dict[str, Any], rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
    """Per (model, workflow): a short hash of what made its numbers (protocol, answer format, prompt
    texts, decoding, limits, judge, search backend) and the record it hashes. Two cells with the same
    hash were made the same way, on any machine."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["workflow"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        prompts = sorted({json.loads(r["prompts_source"] or "{}").get("sha256", "") for r in rs})
        record = {
            "protocol": config.get("protocol", "fvqa"),
            "answer_format": sorted({r.get("answer_format") or "tags" for r in rs}),
            "prompts_sha256": prompts, "sampling": config.get("sampling"), "limits": config.get("limits"),
            "metric": config.get("primary_metric"), "judge": sorted({r["judge_id"] for r in rs if r["judge_id"]}),
            "judge_fvqa": sorted({r["judge_fvqa_id"] for r in rs if r.get("judge_fvqa_id")}),
            "search": search_backend(config) if key[1] != "direct" else None,
        }
        digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:10]
        out[key] = (digest, record)
    return out


def _protocol(config: dict[str, Any], judge_ids: list[str], rejects: list[tuple[str, str, int]],
              counts: dict[tuple[str, str, str], Unscored],
              prov: dict[tuple[str, str], tuple[str, dict[str, Any]]]) -> list[str]:
    s = config.get("sampling", {})
    temp = s.get("temperature", 0.0)
    decoding = "greedy decoding (temperature 0)" if temp == 0 else f"sampled decoding (temperature {temp})"
    judge = config.get("judge", {})
    lim = config.get("limits", {})
    protocol = config.get("protocol", "fvqa")
    style = judge.get("style") or ("paper" if protocol == "paper" else "fvqa")
    judge_words = ("paper style: sees the image and grades the whole final response" if style == "paper"
                   else "fvqa style: text only, grades the extracted answer")
    wording = (f"prompt {judge['prompt_path']}" if judge.get("prompt_path")
               else "fvqa's wording of the paper's ten rules (App. D.6), not the paper's text")
    lines = [f"- **Note**: {note}" for note in config.get("notes") or []] + [
        f"- Protocol: **{protocol}**"
        + (" (plain-answer prompts for direct and RAG unless a model says otherwise; upstream's tags on demand)"
           if protocol == "paper" else " (fvqa's tagged prompts in every workflow)") + ".",
        f"- Decoding of the models under test: {decoding}, top_p {s.get('top_p', 1.0)}, "
        f"max {s.get('max_tokens', 512)} new tokens per turn.",
        f"- Primary metric (the 'accuracy' column): **{config.get('primary_metric', 'judge')}**.",
        "- Judge: " + (f"{', '.join(judge_ids)} (model@temperature-top_p-prompt hash), {judge_words}; {wording}; "
                       "verdicts cached." if judge.get("enabled") else "disabled."),
        f"- On-demand limits: {lim.get('max_rounds', 3)} rounds, {lim.get('max_image_search', 1)} image search "
        f"(round 1), {lim.get('max_text_search', 2)} text searches. Search ratio = search calls / maximum search "
        "steps (on-demand: rounds - 1; RAG: 2; direct: none); searched = share of items with at least one call.",
        f"- Search backend: {search_backend(config)}.",
        "- 95% intervals: percentile bootstrap over the scored items (seeded). Paper rows: Table 1 of the "
        "MMSearch-R1 paper as printed (its averages are unweighted means); their direct/RAG search ratios are "
        "the workflows' by construction.",
    ]
    for (model, wf), (digest, record) in sorted(prov.items()):
        lines.append(f"- Provenance `{digest}` = {model} / {wf}: protocol {record['protocol']}, answers "
                     f"{'/'.join(record['answer_format'])}, prompts {', '.join(record['prompts_sha256'])}, judge "
                     f"{', '.join(record['judge']) or 'none'}"
                     + (f" + {', '.join(record['judge_fvqa'])}" if record["judge_fvqa"] else "")
                     + f", search {record['search'] or 'none'}.")
    note = unscored_note(counts)
    if note:
        lines.append(f"- **Not scored**: {note}")
    if rejects:
        lines.append("- Rejected benchmark rows: " + "; ".join(f"{st.removeprefix('eval:')}: {n} ({r})"
                                                                 for st, r, n in rejects))
    return lines


_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
          "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}th{background:#f3f3f3}")


def render_html(title: str, markdown: str, pngs: dict[str, bytes]) -> str:
    """The Markdown report as one self-contained page: the same text, tables and plots, rendered by
    markdown-it (CommonMark + tables) so the two files cannot drift apart.

    Raw HTML in the Markdown is escaped, not passed through (notes and names come from configs and
    model outputs). The `plots/<name>.png` links become ``data:image/png;base64`` URIs on the parsed
    image tokens, so the page can be mailed as one file and the large base64 never goes through the
    Markdown parser."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    uris = {md.normalizeLink(f"plots/{name}.png"): "data:image/png;base64," + base64.b64encode(data).decode()
            for name, data in pngs.items()}
    for token in tokens:
        for child in token.children or []:
            if child.type == "image" and str(child.attrGet("src")) in uris:
                child.attrSet("src", uris[str(child.attrGet("src"))])
    body = md.renderer.render(tokens, md.options, {})
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title.replace('`', ''))}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}</body></html>\n")


def build_report(ws: Workspace, run: str, out_dir: Path | None = None) -> ReportFiles:
    """Write `report.md`, `report.html` and `plots/*.png` for a run; returns their paths."""
    from fvqa.eval.runner import load_run_config

    rows = scored_rows(ws, run)
    counts = unscored(ws, run)
    if not rows and not counts:
        raise FvqaError(f"no predictions for run {run!r} in {ws.root} (run `fvqa eval run` first)")
    config = load_run_config(ws, run)
    cs = cells(rows, n_resamples=int(config.get("bootstrap_resamples", 1000)), unscored_counts=counts)
    judge_ids = sorted({r["judge_id"] for r in rows if r["judge_id"]})
    rejects = [(st, r, int(n)) for st, r, n in ws.execute(
        "SELECT stage, reason, count(*) FROM rejects WHERE stage LIKE 'eval:%' GROUP BY 1, 2 ORDER BY 1, 3 DESC")]
    out_dir = out_dir or ws.root / "eval" / run
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    pngs = _plots(cs)
    plot_paths = []
    for name, data in pngs.items():
        path = plot_dir / f"{name}.png"
        path.write_bytes(data)
        plot_paths.append(path)
    prov = provenance(config, rows)
    protocol = _protocol(config, judge_ids, rejects, counts, prov)
    tables = _tables(cs, {k: v[0] for k, v in prov.items()})
    title = f"fvqa evaluation: run `{run}`"

    md = [f"# {title}", "", "## Protocol", *protocol, ""]
    for name in pngs:
        md += [f"![{name}](plots/{name}.png)", ""]
    for t, header, trs in tables:
        md += [f"## {t}", "", _md_table(header, trs), ""]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")

    html_path = out_dir / "report.html"
    html_path.write_text(render_html(title, "\n".join(md), pngs), encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps(
        [c.to_dict() for c in cs], indent=1, default=str), encoding="utf-8")
    return ReportFiles(md_path, html_path, plot_paths)
