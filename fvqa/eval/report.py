"""`fvqa eval report`: Markdown and a self-contained HTML page with PNG plots, next to the paper.

The HTML embeds its plots as ``data:image/png;base64`` so it can be mailed or attached as one file;
the Markdown links the same PNGs from `plots/`. The protocol section states how the numbers were
made (decoding, judge model and prompt hash, primary metric, limits, prompts), because published
numbers move by 10-15 points with it. Predictions that are not scored (failed model or judge call) are
never counted as wrong: the report says how many per cell, and a cell with nothing scored shows n=0.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvqa.errors import FvqaError
from fvqa.eval.aggregate import Cell, Unscored, averages, cells, scored_rows, unscored, unscored_note
from fvqa.store import Workspace

BENCH_ORDER = ("fvqa", "infoseek", "mmsearch", "simplevqa", "livevqa")
PAPER_TABLE1: dict[str, dict[str, float | None]] = {
    # MMSearch-R1 paper, Table 1 (accuracy %, search ratio %); only the numbers this project reproduces
    "MMSearch-R1-7B (on-demand)": {"fvqa": 58.4, "infoseek": 55.1, "mmsearch": 53.8, "simplevqa": 57.4,
                                   "livevqa": 48.4, "avg": None, "search_ratio": 67.1},
    "Qwen2.5-VL-7B (RAG)": {"avg": 51.6, "search_ratio": 100.0},
    "Qwen2.5-VL-7B (direct)": {"avg": 21.9, "search_ratio": 0.0},
}
PAPER_POINTS = [  # (label, avg accuracy %, search ratio %) for the scatter plot
    ("paper MMSearch-R1-7B", sum([58.4, 55.1, 53.8, 57.4, 48.4]) / 5, 67.1),
    ("paper Qwen2.5-VL-7B RAG", 51.6, 100.0),
    ("paper Qwen2.5-VL-7B direct", 21.9, 0.0),
]


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
    for label, acc, sr in PAPER_POINTS:
        ax.scatter(sr, acc, s=60, facecolors="none", edgecolors="grey")
        ax.annotate(label, (sr, acc), fontsize=7, color="grey", xytext=(4, 4), textcoords="offset points")
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
    if series:
        ax.legend(fontsize=7)
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


def _tables(cs: list[Cell]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table of the report."""
    benches = _bench_order(cs)
    kinds = {c.benchmark: c.kind for c in cs}
    avg = averages(cs)
    main_rows = []
    for model, wf in sorted({(c.model, c.workflow) for c in cs}):
        v = avg.get((model, wf), {})
        row = [f"{model} / {wf}"]
        for b in benches:
            c = next((c for c in cs if (c.model, c.workflow, c.benchmark) == (model, wf, b)), None)
            if c is None:
                row.append("–")
            elif c.n == 0:
                row.append(f"– ({c.not_scored} not scored)")
            else:
                row.append(f"{_pct(c.accuracy)} [{_pct(c.ci_lo)}, {_pct(c.ci_hi)}]"
                           + (f" ({c.not_scored} not scored)" if c.not_scored else ""))
        main_rows.append(row + [_pct(v.get("accuracy")), _pct(v.get("search_ratio"))])
    for label, vals in PAPER_TABLE1.items():
        row = [f"paper: {label}"]
        for b in benches:
            value = vals.get(kinds[b])
            row.append("–" if value is None else f"{value:.1f}")
        avg_value = vals.get("avg")
        if avg_value is None and all(vals.get(k) is not None for k in BENCH_ORDER):
            avg_value = sum(float(vals[k] or 0) for k in BENCH_ORDER) / len(BENCH_ORDER)
        main_rows.append(row + [f"{avg_value:.1f}" if avg_value is not None else "–", f"{vals['search_ratio']:.1f}"])
    main = ("Accuracy (%) next to the paper's Table 1", ["model / workflow", *benches, "avg", "search ratio %"],
            main_rows)
    detail_rows = []
    for c in sorted(cs, key=lambda c: (c.model, c.workflow, benches.index(c.benchmark))):
        extra = []
        if c.simplevqa:
            extra.append(f"SimpleVQA F={_pct(c.simplevqa['f_score'])}, CGA={_pct(c.simplevqa['correct_given_attempted'])}")
        if c.infoseek_final is not None:
            extra.append(f"InfoSeek final (HM unseen q/e)={_pct(c.infoseek_final)}")
        if c.judge_failures:
            extra.append(f"{c.judge_failures} judge errors")
        if c.n == 0:
            detail_rows.append([c.model, c.workflow, c.benchmark, "0", *["–"] * 8, _not_scored(c), ""])
            continue
        detail_rows.append([
            c.model, c.workflow, c.benchmark, str(c.n), _pct(c.accuracy), _pct(c.em), _pct(c.subem),
            f"{_pct(c.official)} ({c.official_name})", _pct(c.judge), _pct(c.search_ratio),
            f"{c.image_calls}/{c.text_calls}", _pct(c.correct_without_search), _not_scored(c), "; ".join(extra)])
    detail = ("All metrics per cell", ["model", "workflow", "benchmark", "n", "accuracy", "EM", "SubEM",
                                       "official", "judge", "search ratio", "image/text calls",
                                       "correct w/o search", "not scored", "notes"], detail_rows)
    out = [main, detail]
    for key in ("knowledge_type", "search_label", "split", "question_type"):
        rows = []
        for c in cs:
            for group, (n, acc) in c.breakdowns.get(key, {}).items():
                rows.append([c.model, c.workflow, c.benchmark, group, str(n), _pct(acc)])
        if rows:
            out.append((f"Breakdown by {key}", ["model", "workflow", "benchmark", key, "n", "accuracy"], rows))
    return out


def _protocol(config: dict[str, Any], judge_ids: list[str], rejects: list[tuple[str, str, int]],
              counts: dict[tuple[str, str, str], Unscored]) -> list[str]:
    s = config.get("sampling", {})
    temp = s.get("temperature", 0.0)
    decoding = "greedy decoding (temperature 0)" if temp == 0 else f"sampled decoding (temperature {temp})"
    judge = config.get("judge", {})
    lim = config.get("limits", {})
    lines = [
        f"- Decoding of the models under test: {decoding}, top_p {s.get('top_p', 1.0)}, "
        f"max {s.get('max_tokens', 512)} new tokens per turn.",
        f"- Primary metric (the 'accuracy' column): **{config.get('primary_metric', 'judge')}**.",
        "- Judge: " + (f"{', '.join(judge_ids)} (model@temperature-top_p-prompt hash), fvqa's prompt implementing "
                       "the paper's ten rules (App. D.6); verdicts cached." if judge.get("enabled") else "disabled."),
        f"- On-demand limits: {lim.get('max_rounds', 3)} rounds, {lim.get('max_image_search', 1)} image search "
        f"(round 1), {lim.get('max_text_search', 2)} text searches. Search ratio = search calls / maximum search "
        "steps (on-demand: rounds - 1; RAG: 2; direct: none).",
        f"- Prompts: {config.get('prompts') or 'fvqa defaults (fvqa/prompts/default.yaml)'}; search backend: "
        f"{(config.get('search') or {}).get('backend', 'local')}.",
        "- 95% intervals: percentile bootstrap over the scored items (seeded).",
    ]
    note = unscored_note(counts)
    if note:
        lines.append(f"- **Not scored**: {note}")
    if rejects:
        lines.append("- Rejected benchmark rows: " + "; ".join(f"{st.removeprefix('eval:')}: {n} ({r})"
                                                                 for st, r, n in rejects))
    return lines


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
    protocol = _protocol(config, judge_ids, rejects, counts)
    tables = _tables(cs)
    title = f"fvqa evaluation: run `{run}`"

    md = [f"# {title}", "", "## Protocol", *protocol, ""]
    for name in pngs:
        md += [f"![{name}](plots/{name}.png)", ""]
    for t, header, trs in tables:
        md += [f"## {t}", "", _md_table(header, trs), ""]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")

    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}th{background:#f3f3f3}</style></head><body>",
             f"<h1>{esc(title)}</h1><h2>Protocol</h2><ul>"]
    parts += [f"<li>{esc(line.removeprefix('- ')).replace('**', '')}</li>" for line in protocol]
    parts.append("</ul>")
    for name, data in pngs.items():
        parts.append(f"<figure><img alt='{esc(name)}' src='data:image/png;base64,"
                     f"{base64.b64encode(data).decode()}'/><figcaption>{esc(name)}</figcaption></figure>")
    for t, header, trs in tables:
        parts.append(f"<h2>{esc(t)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in r) + "</tr>" for r in trs]
        parts.append("</table>")
    parts.append("</body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text("".join(parts), encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps(
        [c.to_dict() for c in cs], indent=1, default=str), encoding="utf-8")
    return ReportFiles(md_path, html_path, plot_paths)
