"""Benchmark: the `infoseek` build stage on a 1M-row InfoSeek train split (time and peak memory).

ours   = `fvqa build --stages infoseek` in a child process, on synthetic files in the official shapes
         (`infoseek_train.jsonl`, `*_withkb.jsonl` with the main fields plus entity_id/entity_text,
         `*_qtype.jsonl`), a small image folder (1 in 100 image ids has no file, so the stage must
         top up) and a knowledge-type file (the MiniLM pre-tag is the `tag` stage's cost, not this one's).
anchor = the GOAL of issue 19 (40 s, 1024 MB peak RSS), NOT a measured implementation: the previous
         in-memory stage is not kept in the tree to run beside it. ratio = anchor / ours (> 1: goal met).

Seconds are the stage's own (its `runs` row); the child's wall time, with imports, is printed below.
Peak RSS is the child's ru_maxrss (`resource.getrusage(RUSAGE_CHILDREN)`; the parent runs nothing
else as a child). Prints `infoseek_1m_seconds: ...` and `infoseek_1m_peak_rss_mb: ...`, then checks
that the delivered count equals the asked count and that the planted bad lines are rejects.
Usage: python bench/bench_infoseek.py [--quick] [--rows N] [--data DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
from PIL import Image

GOAL_SECONDS = 40.0
GOAL_RSS_MB = 1024.0
N_ENTITIES = 10_000
N_IMAGES = 4_000
KINDS = ("Place", "Nature", "Arts", "Science", "People", "Objects", "Events", "Organizations")
QTYPES = ("String", "String", "String", "Numerical", "Time")  # InfoSeek is mostly String questions


def _answer(i: int, qtype: str) -> tuple[list[str], object]:
    if qtype == "Numerical":
        v = 10.0 + i % 997
        return [f"{v:g}"], {"wikidata": v, "range": [round(v * 0.9, 2), round(v * 1.1, 2)]}
    if qtype == "Time":
        year = str(1800 + i % 220)
        return [year], [year]
    return [f"Answer {i % 5003}"], [f"Answer {i % 5003}", f"Alias {i % 5003}"]


def write_split(folder: Path, rows: int) -> dict[str, int]:
    """The three files and the image folder; returns the planted counts the checks expect."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    planted = {"malformed_json": 0, "wrong_type": 0}
    with (folder / "infoseek_train.jsonl").open("w", encoding="utf-8") as main, \
            (folder / "infoseek_train_withkb.jsonl").open("w", encoding="utf-8") as kb, \
            (folder / "infoseek_train_qtype.jsonl").open("w", encoding="utf-8") as qt:
        for i in range(rows):
            if i % 50_000 == 17:  # a truncated line
                main.write('{"data_id": "infoseek_train_broken", "question": \n')
                planted["malformed_json"] += 1
                continue
            did = f"infoseek_train_{i:08d}"
            e = (i * 7919) % N_ENTITIES
            qtype = QTYPES[i % len(QTYPES)]
            answer, answer_eval = _answer(i, qtype)
            line = dict(data_id=did, image_id=f"oven_{(i * 31) % N_IMAGES:06d}",
                        question=f"What is this {qtype.lower()} question number {i} about?",
                        answer=answer, answer_eval=answer_eval, data_split="train")
            if i % 50_000 == 29:  # a wrong-typed field
                line["question"] = i
                planted["wrong_type"] += 1
            main.write(json.dumps(line, ensure_ascii=False) + "\n")
            kb.write(json.dumps({**line, "entity_id": f"Q{100_000 + e}", "entity_text": f"Entity {e}"},
                                ensure_ascii=False) + "\n")
            qt.write(json.dumps({"data_id": did, "question_type": qtype}) + "\n")
    with (folder / "knowledge_types.csv").open("w", encoding="utf-8") as fh:
        fh.write("entity_id,knowledge_type\n")
        fh.writelines(f"Q{100_000 + e},{KINDS[e % len(KINDS)]}\n" for e in range(N_ENTITIES))
    for k in range(N_IMAGES):
        if k % 100 == 7:
            continue  # missing: the rows naming it are rejected and topped up from their stratum
        buf = io.BytesIO()
        Image.new("RGB", (72, 64), (k % 256, (k // 256) % 256, 90)).save(buf, format="JPEG", quality=70)
        (folder / "images" / f"oven_{k:06d}.jpg").write_bytes(buf.getvalue())
    return planted


def run_stage(folder: Path, work: Path, n: int) -> tuple[float, float, float, float]:
    """(stage seconds, child wall seconds, child CPU seconds, child peak RSS MB) of one
    `fvqa build --stages infoseek` (CPU time: the machine may be shared, so wall time is noisy)."""
    cfg = work / "bench.yaml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "workspace": str(work / "ws"),
        "infoseek": {"jsonl": str(folder / "infoseek_train.jsonl"), "image_dir": str(folder / "images"),
                     "knowledge_types": str(folder / "knowledge_types.csv"), "n": n, "per_entity": 3,
                     "stratify": ["question_type", "knowledge_type"], "seed": 0}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fvqa", "build", "--config", str(cfg), "--stages", "infoseek"],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"stage failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss_mb, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss: KiB on Linux
    con = duckdb.connect(str(work / "ws" / "fvqa.duckdb"), read_only=True)
    seconds = con.execute("SELECT seconds FROM runs WHERE stage = 'infoseek' ORDER BY started_at DESC").fetchone()[0]
    con.close()
    print("# " + "\n# ".join(line for line in proc.stderr.splitlines() if line.strip())[-2000:])
    return float(seconds), wall, cpu, rss_mb


def check(work: Path, n: int, planted: dict[str, int]) -> tuple[bool, str]:
    """Whether the stage delivered what was asked and rejected the planted lines, and a summary."""
    con = duckdb.connect(str(work / "ws" / "fvqa.duckdb"), read_only=True)
    items = con.execute("SELECT count(*) FROM items WHERE source = 'infoseek'").fetchone()[0]
    reasons = dict(con.execute("SELECT reason, count(*) FROM rejects WHERE stage = 'infoseek' GROUP BY 1").fetchall())
    con.close()
    ok = items == n and all(reasons.get(code) == count for code, count in planted.items())
    return ok, f"delivered {items} of {n} asked; rejects {reasons}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="50,000 rows instead of 1,000,000")
    parser.add_argument("--rows", type=int, default=None, help="rows of the main file (overrides --quick)")
    parser.add_argument("--n", type=int, default=7_000, help="items asked (infoseek.n)")
    parser.add_argument("--data", type=Path, default=None, help="keep the generated files here and reuse them")
    args = parser.parse_args()
    rows = args.rows or (50_000 if args.quick else 1_000_000)
    with tempfile.TemporaryDirectory(prefix="bench-infoseek-") as tmp:
        folder = (args.data or Path(tmp) / "data") / f"rows-{rows}"
        stamp = folder / "planted.json"
        if stamp.is_file():
            planted = json.loads(stamp.read_text())
        else:
            t0 = time.perf_counter()
            planted = write_split(folder, rows)
            stamp.write_text(json.dumps(planted))
            print(f"# wrote {rows} rows in {time.perf_counter() - t0:.1f} s to {folder}")
        work = Path(tmp) / "work"
        work.mkdir()
        seconds, wall, cpu, rss = run_stage(folder, work, args.n)
        ok, summary = check(work, args.n, planted)
    label = "1m" if rows == 1_000_000 else f"{rows // 1000}k"
    print(f"infoseek_{label}_seconds: ours={seconds:.2f} anchor={GOAL_SECONDS:.2f} ratio={GOAL_SECONDS / seconds:.2f}")
    print(f"infoseek_{label}_peak_rss_mb: ours={rss:.0f} anchor={GOAL_RSS_MB:.0f} ratio={GOAL_RSS_MB / rss:.2f}")
    print(f"# anchor = the issue-19 goal (40 s, 1024 MB), not a measured implementation; child wall {wall:.1f} s, "
          f"CPU {cpu:.1f} s (with imports), load average {os.getloadavg()[0]:.1f}; {summary}")
    if not ok:
        sys.exit(f"FAILED: {summary} (planted {planted})")


if __name__ == "__main__":
    main()
