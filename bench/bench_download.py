"""Downloader benchmark: fvqa's async downloader + image checks vs img2dataset on the same URLs.

A loopback server (its own process) serves N image URLs (320x240 JPEGs) with 50 ms latency; 10% of
them fail (404, 500, or HTML served as image/jpeg). Both sides use the same concurrency, no retries,
and shrink every image so its longer side is 256 px (img2dataset's `keep_ratio_largest`, which is
what fvqa's `max_side` means; its `keep_ratio` would size the *shorter* side and, with
`resize_only_if_bigger`, skip the resize of these images altogether), then re-encode it as JPEG.

Printed, as `name: ours=... anchor=... ratio=...`: images/s, wall seconds, and both sides' success
and failure counts by kind (they must agree with what the server was told to fail, or the run
stops). img2dataset's time is its shard's own `duration` (download + resize), which leaves out its
worker-process start-up, so the comparison favours the anchor. Full mode runs both sides `--rounds`
times, alternating, and keeps each side's best round.

The anchor is always the real img2dataset. It pins pandas<3 (and more), so it lives in its own venv:
IMG2DATASET_PYTHON names its interpreter; otherwise `<repo>/.venv-i2d` is made on first use
(`python3 -m venv` + pip, a minute or two). `--fallback-anchor` swaps in a thread-pool httpx
downloader doing the same work instead, and the output says so on every line.

    python bench/bench_download.py [--quick] [--concurrency 32] [--rounds 2] [--fallback-anchor]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fvqa.net.fetch import Downloader, FetchOptions  # noqa: E402
from fvqa.vision.imageproc import ImageReject, process_image  # noqa: E402

SIDE = 256
I2D_REQUIREMENT = "img2dataset>=1.47,<1.48"
I2D_VENV = REPO / ".venv-i2d"
READY_MARK = ".fvqa-ready"

I2D_SCRIPT = r"""
import json, sys, time, glob
from img2dataset import download

if __name__ == "__main__":  # img2dataset's worker processes re-import this file
    urls, out, conc, side = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    t0 = time.perf_counter()
    download(url_list=urls, output_folder=out, processes_count=1, thread_count=conc, image_size=side,
             resize_mode="keep_ratio_largest", resize_only_if_bigger=True, output_format="files",
             input_format="txt", timeout=10, retries=0, number_sample_per_shard=100000,
             disallowed_header_directives=[], enable_wandb=False, distributor="multiprocessing")
    wall = time.perf_counter() - t0
    stats = [json.load(open(p)) for p in glob.glob(out + "/*_stats.json")]
    print(json.dumps({"wall": wall, "seconds": sum(s["duration"] for s in stats),
                      "successes": sum(s["successes"] for s in stats),
                      "failed_to_download": sum(s["failed_to_download"] for s in stats),
                      "failed_to_resize": sum(s["failed_to_resize"] for s in stats),
                      "errors": [s.get("status_dict", {}) for s in stats]}))
"""


# -- the anchor's venv ---------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive file lock, so two benchmark runs never install into one venv at once."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_img2dataset(venv: Path = I2D_VENV) -> str:
    """The python of a venv holding img2dataset, made with `python3 -m venv` + pip on first use."""
    python = venv / "bin" / "python"
    if (venv / READY_MARK).exists() and python.exists():
        return str(python)
    with _locked(venv.parent / f".{venv.name}.lock"):
        if (venv / READY_MARK).exists() and python.exists():
            return str(python)
        print(f"# installing {I2D_REQUIREMENT} into {venv} (one time, a minute or two)...", file=sys.stderr,
              flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        for cmd in ([base, "-m", "venv", "--clear", str(venv)],
                    [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", I2D_REQUIREMENT]):
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if res.returncode != 0:
                tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-8:])
                raise SystemExit(f"bench_download: `{' '.join(cmd)}` failed (exit {res.returncode}):\n{tail}")
        (venv / READY_MARK).write_text(I2D_REQUIREMENT + "\n")
    return str(python)


def img2dataset_python() -> str:
    """$IMG2DATASET_PYTHON if set (it must exist), else the repo's own `.venv-i2d`."""
    env = os.environ.get("IMG2DATASET_PYTHON")
    if env:
        if not Path(env).is_file():
            raise SystemExit(f"bench_download: IMG2DATASET_PYTHON={env} does not exist")
        return env
    return ensure_img2dataset()


# -- the two sides -------------------------------------------------------------------------------

def start_server(n: int, latency: float, fail: float) -> tuple[subprocess.Popen[str], int]:
    """The URL set's server (its own process, so it does not share our GIL) and its port."""
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "support" / "web_server.py"), "--bench", str(n),
                             "--latency", str(latency), "--fail", str(fail)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline().split()[0])
    return proc, port


def run_ours(urls: list[str], concurrency: int) -> tuple[float, Counter[str]]:
    """Download + check + resize + re-encode every URL (decoding off the event loop); kinds of outcome."""
    opts = FetchOptions(concurrency=concurrency, per_host_concurrency=concurrency, retries=0, timeout_s=10,
                        allow_private=True, respect_robots=False)
    kinds: Counter[str] = Counter()

    async def one(d: Downloader, url: str) -> None:
        res = await d.fetch(url)
        if not res.ok:
            kinds["http_error" if res.reason == "http_error" else f"download:{res.reason}"] += 1
            return
        try:
            await asyncio.to_thread(process_image, res.data, max_side=SIDE, min_side=1, max_pixels=10**8)
            kinds["ok"] += 1
        except ImageReject:
            kinds["not_an_image"] += 1

    async def go() -> None:
        async with Downloader(opts) as d:
            await asyncio.gather(*(one(d, u) for u in urls))

    t0 = time.perf_counter()
    asyncio.run(go())
    return time.perf_counter() - t0, kinds


def run_img2dataset(python: str, urls: list[str], concurrency: int) -> tuple[float, Counter[str], float]:
    """img2dataset on the same URLs; its shard duration, outcome kinds, and its uncounted start-up."""
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
    kinds: Counter[str] = Counter(ok=out["successes"], not_an_image=out["failed_to_resize"])
    for status_dict in out["errors"]:
        for status, n in status_dict.items():
            if status.startswith("HTTP Error"):
                kinds["http_error"] += n
            elif status not in ("success", "Image decoding error"):
                kinds[f"download:{status}"] += n
    return out["seconds"], kinds, out["wall"] - out["seconds"]


def run_threaded_httpx(urls: list[str], concurrency: int) -> tuple[float, Counter[str], float]:
    """The explicit fallback anchor (`--fallback-anchor`): a thread pool of synchronous httpx GETs
    doing the same image work. Not img2dataset: its numbers say nothing about the goal."""
    import httpx

    client = httpx.Client(timeout=10, limits=httpx.Limits(max_connections=concurrency))

    def one(url: str) -> str:
        try:
            r = client.get(url)
        except httpx.HTTPError as exc:
            return f"download:{exc.__class__.__name__}"
        if r.status_code >= 400:
            return "http_error"
        try:
            process_image(r.content, max_side=SIDE, min_side=1, max_pixels=10**8)
            return "ok"
        except ImageReject:
            return "not_an_image"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        kinds = Counter(pool.map(one, urls))
    client.close()
    return time.perf_counter() - t0, kinds, 0.0


def _kinds(c: Counter[str]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(c.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 URLs instead of 2,000, one round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--fail", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per side (default: 1 quick, 3 full)")
    parser.add_argument("--fallback-anchor", action="store_true",
                        help="compare against a thread-pool httpx downloader instead of img2dataset")
    args = parser.parse_args()
    n = 300 if args.quick else 2000
    rounds = args.rounds or (1 if args.quick else 3)
    python = None if args.fallback_anchor else img2dataset_python()
    anchor_name = "img2dataset" if python else "FALLBACK threaded-httpx (not img2dataset: --fallback-anchor)"
    proc, port = start_server(n, args.latency, args.fail)
    ours: list[tuple[float, Counter[str]]] = []
    anchor: list[tuple[float, Counter[str], float]] = []
    try:
        urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(n)]
        for _ in range(rounds):
            ours.append(run_ours(urls, args.concurrency))
            anchor.append(run_img2dataset(python, urls, args.concurrency) if python
                          else run_threaded_httpx(urls, args.concurrency))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
    expected = _expected_kinds(n, args.fail)
    print(f"# {n} URLs ({_kinds(expected)} by design), latency {args.latency * 1000:.0f} ms, "
          f"concurrency {args.concurrency}, {rounds} round(s), best kept; anchor: {anchor_name}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for i, ((o_s, _), (a_s, _, a_up)) in enumerate(zip(ours, anchor, strict=True)):
        print(f"# round {i + 1}: ours {o_s:.2f}s, anchor {a_s:.2f}s (+{a_up:.1f}s start-up not counted)")
    bad = [f"{side} round {i + 1}: {_kinds(k)}" for side, runs in (("ours", ours), ("anchor", anchor))
           for i, (_, k, *_) in enumerate(runs) if k != expected]
    if bad:
        raise SystemExit(f"bench_download: outcome counts differ from the server's design {_kinds(expected)}: "
                         + "; ".join(bad))
    ours_s, anchor_s = min(s for s, _ in ours), min(s for s, _, _ in anchor)
    ok = expected["ok"]
    tag = "" if python else " (FALLBACK anchor, not img2dataset)"
    print(f"download_images_per_s: ours={ok / ours_s:.1f} anchor={ok / anchor_s:.1f} ratio={anchor_s / ours_s:.2f}{tag}")
    print(f"download_wall_s: ours={ours_s:.2f} anchor={anchor_s:.2f} ratio={anchor_s / ours_s:.2f}{tag}")
    print(f"download_successes: ours={ours[0][1]['ok']} anchor={anchor[0][1]['ok']} ratio="
          f"{ours[0][1]['ok'] / max(anchor[0][1]['ok'], 1):.2f} (expected {ok}){tag}")
    print(f"download_failures: ours={_kinds(ours[0][1] - Counter(ok=ok))} "
          f"anchor={_kinds(anchor[0][1] - Counter(ok=ok))}{tag}")


def _expected_kinds(n: int, fail: float) -> Counter[str]:
    """What every URL should end as, from the server's own rule (tests/support/web_server.py)."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.web_server import bench_failures

    kinds: Counter[str] = Counter(ok=n)
    for kind in bench_failures(n, fail).values():
        kinds["ok"] -= 1
        kinds["http_error" if kind in (404, 500) else "not_an_image"] += 1
    return kinds


if __name__ == "__main__":
    main()
