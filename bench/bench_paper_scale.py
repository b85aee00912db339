"""Paper-scale build, stage by stage: a synthetic world at the paper's sizes through `fvqa build` offline.

The world (fvqa.demo.world, grown with `vocab_size`, `captions`, `infoseek_rows`) and the build follow
bench/paper_scale.yaml: 500k MetaCLIP entries, a 1M-caption pool, 10,000 concepts, a 1M-row InfoSeek
train file sampled to 7,000 items, ~17k items through tag/probe/split, FVQA-train 5,000 / test 1,800.
The backends are the demo's offline stand-ins (template questions, MiniLM tags, popularity-prior probe,
a random-weight tiny CLIP), so the numbers are the pipeline's own cost, not an API's or a GPU's.

Each stage runs as its own `fvqa build --stages S` process, so its wall seconds (process start included)
and peak RSS (the process tree's largest, from wait4) are its own.

Anchor: the same build on a world at a tenth of the size, in the same run. Printed per stage:
  paper_<stage>_seconds: ours=<s at scale> anchor=<10 x s at scale/10> ratio=<ours/anchor>
    (1.0 = linear in size; below 1 = fixed costs amortised; above 1 = worse than linear)
  paper_<stage>_peak_rss_mb: ours=<MB> anchor=<MB at scale/10> ratio=<ours/anchor>
    (1.0 = memory flat in size, i.e. streaming; 10 = memory linear in size)

    python bench/bench_paper_scale.py            # scale 1 (paper) vs 0.1; ~30-60 min here
    python bench/bench_paper_scale.py --quick    # scale 0.05 vs 0.005
Worlds are cached in .bench-cache/ (their generation is not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
FVQA = Path(sys.executable).with_name("fvqa")
STAGES = ("match", "concepts", "crawl", "generate", "infoseek", "tag", "index", "probe", "split", "export")
# counts in bench/paper_scale.yaml that grow with the scale (section, key)
SCALED = (("world", "n_entities"), ("world", "vocab_size"), ("world", "captions"), ("world", "infoseek_rows"),
          ("concepts", "n"), ("infoseek", "n"), ("split", "train_size"), ("split", "train_search_required"),
          ("split", "train_search_free"))


def scaled_config(scale: float, world: Path, work: Path) -> dict[str, Any]:
    """bench/paper_scale.yaml with its counts multiplied by `scale`, pointed at `world` and `work`."""
    cfg = yaml.safe_load((REPO / "bench" / "paper_scale.yaml").read_text())
    for section, key in SCALED:
        cfg[section][key] = max(1, round(cfg[section][key] * scale))
    cfg["split"]["test_per_source"] = {k: max(1, round(v * scale)) for k, v in cfg["split"]["test_per_source"].items()}
    cfg["workspace"] = str(work)
    cfg["world"]["path"] = str(world)
    cfg["search"]["local"]["index_dir"] = str(work / "search-index")
    return cfg


def ensure_world(cfg: dict[str, Any]) -> None:
    """Generate (once; cached by its parameters) the world the config names."""
    world = Path(cfg["world"]["path"])
    if (world / "world.json").exists():
        return
    w = cfg["world"]
    tmp = world.with_name(world.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"generating world {world.name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run([str(FVQA), "demo", "world", str(tmp), "--seed", str(w["seed"]), "--n-entities",
                    str(w["n_entities"]), "--vocab-size", str(w["vocab_size"]), "--captions", str(w["captions"]),
                    "--infoseek-rows", str(w["infoseek_rows"])], check=True, stdout=subprocess.DEVNULL)
    tmp.rename(world)
    print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def run_stage(config: Path, stage: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one `fvqa build --stages <stage>` process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(FVQA), "build", "-c", str(config), "--stages", stage], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    err = proc.stderr.read()  # drain before waiting: a full pipe would block the child
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"stage {stage} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024  # Linux: KiB


def build(scale: float, cache: Path, tmp: Path) -> dict[str, tuple[float, float]]:
    """Every stage at `scale`, in order, each in its own process; returns stage -> (seconds, MB)."""
    world = cache / f"paper-world-{scale:g}"
    work = tmp / f"work-{scale:g}"
    cfg = scaled_config(scale, world, work)
    ensure_world(cfg)
    config = tmp / f"paper_scale_{scale:g}.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out: dict[str, tuple[float, float]] = {}
    for stage in STAGES:
        out[stage] = run_stage(config, stage)
        print(f"  scale {scale:g} {stage}: {out[stage][0]:.1f} s, {out[stage][1]:.0f} MB", file=sys.stderr, flush=True)
    status = subprocess.run([str(FVQA), "status", "-w", str(work)], capture_output=True, text=True, check=True)
    (tmp / f"status-{scale:g}.txt").write_text(status.stdout)
    return out


def items(work: Path) -> dict[str, int]:
    """Rows per table that say how big the build was (the user's view of "paper scale")."""
    import duckdb

    con = duckdb.connect(str(work / "fvqa.duckdb"), read_only=True)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}  # views too
        return {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]  # type: ignore[index]
                for t in ("concepts", "images", "items", "labels", "splits", "dataset", "rejects") if t in tables}
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="scale 0.05 vs 0.005 (minutes)")
    ap.add_argument("--scale", type=float, help="the measured scale (default 1 = paper; --quick 0.05)")
    ap.add_argument("--cache", type=Path, default=REPO / ".bench-cache", help="where generated worlds are kept")
    args = ap.parse_args()
    scale = args.scale or (0.05 if args.quick else 1.0)
    args.cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fvqa-paper-") as tmp_s:
        tmp = Path(tmp_s)
        anchor = build(scale / 10, args.cache, tmp)
        ours = build(scale, args.cache, tmp)
        sizes = items(tmp / f"work-{scale:g}")
    print(f"paper_scale: scale={scale:g} anchor_scale={scale / 10:g} rows={json.dumps(sizes)}")
    for stage in STAGES:
        (s, mb), (s10, mb10) = ours[stage], anchor[stage]
        print(f"paper_{stage}_seconds: ours={s:.1f} anchor={10 * s10:.1f} ratio={s / (10 * s10):.2f}")
        print(f"paper_{stage}_peak_rss_mb: ours={mb:.0f} anchor={mb10:.0f} ratio={mb / mb10:.2f}")
    total, total10 = sum(v[0] for v in ours.values()), sum(v[0] for v in anchor.values())
    print(f"paper_build_seconds: ours={total:.1f} anchor={10 * total10:.1f} ratio={total / (10 * total10):.2f}")
    peak, peak10 = max(v[1] for v in ours.values()), max(v[1] for v in anchor.values())
    print(f"paper_build_peak_rss_mb: ours={peak:.0f} anchor={peak10:.0f} ratio={peak / peak10:.2f}")


if __name__ == "__main__":
    main()
