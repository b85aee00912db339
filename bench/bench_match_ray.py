"""The `match` stage on Ray (executor: ray) against the local multiprocess path, same captions.

ours    `fvqa build --stages match` with executor=ray on a local Ray of 2 CPUs: the caption pool cut
        into row-range shards, each matched by one of W Ray Data actors (each builds its own automaton)
anchor  the same stage with executor=local (the parent builds the automaton once, forks P workers)

Lines printed:
  match_ray_2_workers   ours = Ray, 2 workers      anchor = local, 2 processes  (the Ray overhead ratio)
  match_ray_1_worker    ours = Ray, 1 worker       anchor = local, 1 process
  match_ray_scaling     ours = speed-up 1 -> 2 Ray workers   anchor = 2.0 (linear)
Stage seconds exclude starting Ray (printed apart); every run's entry_counts and candidates are
checked to be identical. Machines beyond this one are not measured here: the note's N-machine figure
is a projection from these numbers.

Usage: python bench/bench_match_ray.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_match import synth  # noqa: E402
from rich.console import Console  # noqa: E402

from fvqa.config import RunConfig  # noqa: E402
from fvqa.pipelines.runner import run_build  # noqa: E402
from fvqa.store import Workspace  # noqa: E402


def run_match(root: Path, name: str, **settings: object) -> tuple[float, list]:
    config = RunConfig.model_validate({
        "workspace": str(root / name),
        "concepts": {"metadata_path": str(root / "metadata.json"), "threshold": 20_000},
        "match": {"enabled": True, "pool": str(root / "pool.parquet"), "candidates_per_concept": 4,
                  **settings.pop("match", {})},  # type: ignore[dict-item]
        **settings})
    t0 = time.perf_counter()
    run_build(config, only=["match"], console=Console(file=io.StringIO()))
    seconds = time.perf_counter() - t0
    with Workspace(config.workspace) as ws:
        tables = [ws.execute("SELECT entry_id, count FROM entry_counts ORDER BY 1"),
                  ws.execute("SELECT entry_id, rank, url FROM match_candidates ORDER BY 1, 2")]
    return seconds, tables


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer entries and captions")
    args = parser.parse_args()
    n_entries, n_texts = (100_000, 100_000) if args.quick else (500_000, 600_000)
    shard_rows = 10_000 if args.quick else 25_000
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-match-ray-") as tmp:
        root = Path(tmp)
        entries, texts = synth(n_entries, n_texts, seed=1)
        (root / "metadata.json").write_text(json.dumps(entries))
        pq.write_table(pa.table({"url": [f"http://p/{i}.jpg" for i in range(n_texts)], "caption": texts}),
                       root / "pool.parquet", row_group_size=shard_rows)
        del texts
        print(f"{n_entries} entries, {n_texts} captions, shards of {shard_rows} rows", flush=True)

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="fvqa-ray-bench-", dir="/tmp"))
        print(f"ray start: {time.perf_counter() - t0:.1f} s (not in the stage times)", flush=True)
        try:
            ray_settings = {"executor": "ray", "match": {"shard_rows": shard_rows}}
            times: dict[str, float] = {}
            reference = None
            for label, settings in (
                ("local_1", {"match": {"processes": 1}}),
                ("ray_1", {**ray_settings, "ray": {"workers": 1}}),
                ("local_2", {"match": {"processes": 2}}),
                ("ray_2", {**ray_settings, "ray": {"workers": 2}}),
            ):
                seconds, tables = run_match(root, label, **settings)
                times[label] = seconds
                if reference is None:
                    reference = tables
                elif tables != reference:
                    print(f"MISMATCH: {label} differs from local_1", flush=True)
                    return 1
                print(f"  {label}: {seconds:.1f} s ({n_texts / seconds:,.0f} captions/s)", flush=True)
        finally:
            ray.shutdown()
    print(f"match_ray_2_workers: ours={times['ray_2']:.2f} anchor={times['local_2']:.2f} "
          f"ratio={times['ray_2'] / times['local_2']:.2f}")
    print(f"match_ray_1_worker: ours={times['ray_1']:.2f} anchor={times['local_1']:.2f} "
          f"ratio={times['ray_1'] / times['local_1']:.2f}")
    speedup = times["ray_1"] / times["ray_2"]
    print(f"match_ray_scaling: ours={speedup:.2f} anchor=2.00 ratio={speedup / 2:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
