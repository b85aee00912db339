"""Downloader benchmark: fvqa's async downloader + image checks vs img2dataset on the same URLs.

A loopback server (its own process) serves N image URLs with 50 ms latency; 10% of them fail (404,
500, or HTML served as image/jpeg). Both sides use the same concurrency, no retries, and resize to a
256 px side. Printed: images/s and success counts, as `name: ours=... anchor=... ratio=...`. img2dataset's time is
its shard's own `duration` (download + resize), which leaves out its worker-process start-up, so the
comparison favours the anchor.

img2dataset pins pandas<3 (and more), so it usually lives in its own venv: set IMG2DATASET_PYTHON to
that interpreter (default: /tmp/i2d-venv/bin/python if present). Without it, the anchor is a plain
thread-pool httpx downloader doing the same work, and the output says so.

    python bench/bench_download.py [--quick] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fvqa.net.fetch import Downloader, FetchOptions  # noqa: E402
from fvqa.vision.imageproc import ImageReject, process_image  # noqa: E402

SIDE = 256

I2D_SCRIPT = r"""
import json, sys, time, glob
from img2dataset import download

if __name__ == "__main__":  # img2dataset's worker processes re-import this file
    urls, out, conc, side = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    t0 = time.perf_counter()
    download(url_list=urls, output_folder=out, processes_count=1, thread_count=conc, image_size=side,
             resize_mode="keep_ratio", resize_only_if_bigger=True, output_format="files", input_format="txt",
             timeout=10, retries=0, number_sample_per_shard=100000, disallowed_header_directives=[],
             enable_wandb=False, distributor="multiprocessing")
    wall = time.perf_counter() - t0
    stats = [json.load(open(p)) for p in glob.glob(out + "/*_stats.json")]
    print(json.dumps({"wall": wall, "seconds": sum(s["duration"] for s in stats),
                      "successes": sum(s["successes"] for s in stats),
                      "failed_to_download": sum(s["failed_to_download"] for s in stats),
                      "failed_to_resize": sum(s["failed_to_resize"] for s in stats),
                      "errors": [s.get("status_dict", {}) for s in stats]}))
"""


def start_server(n: int, latency: float, fail: float) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "support" / "web_server.py"), "--bench", str(n),
                             "--latency", str(latency), "--fail", str(fail)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port, n_failing = (int(x) for x in proc.stdout.readline().split())
    return proc, port, n_failing


def run_ours(urls: list[str], concurrency: int) -> tuple[float, int, Counter[str]]:
    """Download + check + resize + re-encode every URL; reasons for every failure."""
    opts = FetchOptions(concurrency=concurrency, per_host_concurrency=concurrency, retries=0, timeout_s=10,
                        allow_private=True, respect_robots=False)
    reasons: Counter[str] = Counter()

    async def one(d: Downloader, url: str) -> None:
        res = await d.fetch(url)
        if not res.ok:
            reasons[res.reason] += 1
            return
        try:
            await asyncio.to_thread(process_image, res.data, max_side=SIDE, min_side=1, max_pixels=10**8)
            reasons["ok"] += 1
        except ImageReject as exc:
            reasons[exc.reason] += 1

    async def go() -> None:
        async with Downloader(opts) as d:
            await asyncio.gather(*(one(d, u) for u in urls))

    t0 = time.perf_counter()
    asyncio.run(go())
    return time.perf_counter() - t0, reasons["ok"], reasons


def run_img2dataset(python: str, urls: list[str], concurrency: int) -> tuple[float, int, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        url_file = Path(tmp) / "urls.txt"
        url_file.write_text("\n".join(urls) + "\n")
        script = Path(tmp) / "run.py"
        script.write_text(I2D_SCRIPT)
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
        res = subprocess.run([python, str(script), str(url_file), str(Path(tmp) / "out"), str(concurrency), str(SIDE)],
                             capture_output=True, text=True, env=env, timeout=1800)
        if res.returncode != 0:
            raise RuntimeError(f"img2dataset failed: {res.stderr[-2000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["seconds"], out["successes"], out


def run_threaded_httpx(urls: list[str], concurrency: int) -> tuple[float, int, Counter[str]]:
    """Fallback anchor: a thread pool of synchronous httpx GETs doing the same image work."""
    import httpx

    reasons: Counter[str] = Counter()
    client = httpx.Client(timeout=10, limits=httpx.Limits(max_connections=concurrency))

    def one(url: str) -> str:
        try:
            r = client.get(url)
        except httpx.HTTPError as exc:
            return exc.__class__.__name__
        if r.status_code >= 400:
            return f"HTTP {r.status_code}"
        try:
            process_image(r.content, max_side=SIDE, min_side=1, max_pixels=10**8)
            return "ok"
        except ImageReject as exc:
            return exc.reason

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        reasons.update(pool.map(one, urls))
    client.close()
    return time.perf_counter() - t0, reasons["ok"], reasons


def find_img2dataset() -> str | None:
    try:
        import img2dataset  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    for cand in (os.environ.get("IMG2DATASET_PYTHON"), "/tmp/i2d-venv/bin/python"):
        if cand and Path(cand).is_file():
            return cand
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 URLs instead of 2,000")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--fail", type=float, default=0.1)
    args = parser.parse_args()
    n = 300 if args.quick else 2000
    proc, port, n_failing = start_server(n, args.latency, args.fail)
    try:
        urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(n)]
        expected_ok = n - n_failing
        ours_s, ours_ok, ours_reasons = run_ours(urls, args.concurrency)
        python = find_img2dataset()
        if python is not None:
            anchor_name = "img2dataset"
            anchor_s, anchor_ok, detail = run_img2dataset(python, urls, args.concurrency)
            anchor_reasons = detail["errors"]
            anchor_startup = detail["wall"] - detail["seconds"]
        else:
            anchor_name = "threaded-httpx (img2dataset not installed)"
            anchor_s, anchor_ok, anchor_reasons = run_threaded_httpx(urls, args.concurrency)
            anchor_startup = 0.0
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
    print(f"# {n} URLs, {n_failing} failing by design, latency {args.latency * 1000:.0f} ms, "
          f"concurrency {args.concurrency}; anchor: {anchor_name}")
    print(f"# ours reasons: {dict(ours_reasons)}")
    print(f"# anchor start-up not counted below (worker processes, imports): {anchor_startup:.1f}s")
    print(f"# anchor reasons: {anchor_reasons}")
    ours_rate, anchor_rate = ours_ok / ours_s, anchor_ok / anchor_s
    print(f"download_images_per_s: ours={ours_rate:.1f} anchor={anchor_rate:.1f} ratio={ours_rate / anchor_rate:.2f}")
    print(f"download_successes: ours={ours_ok} anchor={anchor_ok} ratio={ours_ok / max(anchor_ok, 1):.2f} "
          f"(expected {expected_ok})")
    print(f"download_wall_s: ours={ours_s:.2f} anchor={anchor_s:.2f} ratio={anchor_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
