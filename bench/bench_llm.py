"""LLM client throughput against a loopback OpenAI-compatible server with fixed latency per call.

Prints, per the bench convention (`name: ours=<v> anchor=<v> ratio=<v>`):
- achieved req/s of `LLMClient` at concurrency 64 vs the ideal `concurrency / latency` (goal >= 0.9);
- the same vs a bare aiohttp loop (semaphore + post, no cache/retry/ledger) measured in this run;
- requests the server sees on a cache-hit re-run (goal 0) vs the first run.
The server runs in its own process so it does not share the client's GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fvqa.llm import Endpoint, LLMClient, LLMConfig  # noqa: E402

CONCURRENCY = 64
LATENCY = 0.2


def start_server(latency: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "support" / "fake_openai.py"), "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("port="):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{line.split('=')[1]}"


def server_requests(root: str) -> int:
    return int(httpx.get(f"{root}/_fake/stats").json()["chat"])


async def run_ours(base_url: str, cache: Path, n: int, tag: str) -> float:
    cfg = LLMConfig(
        endpoints=[Endpoint(base_url=base_url, api_key_env=None)], model="m", max_concurrency=CONCURRENCY
    )
    reqs = {str(i): [{"role": "user", "content": f"{tag} question {i}"}] for i in range(n)}
    async with LLMClient(cfg, cache) as llm:
        t0 = time.perf_counter()
        results = await llm.complete_many(reqs)
        elapsed = time.perf_counter() - t0
    bad = [r.error for r in results.values() if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")
    return elapsed


async def run_raw(base_url: str, n: int) -> float:
    """The transport alone: a semaphore and aiohttp posts, no cache, retries or ledger."""
    sem = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as http:

        async def one(i: int) -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": f"raw question {i}"}]}
            async with sem, http.post(f"{base_url}/chat/completions", data=json.dumps(body)) as resp:
                json.loads(await resp.text())

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (CI)")
    args = ap.parse_args()
    n = CONCURRENCY * (10 if args.quick else 30)
    proc, root = start_server(LATENCY)
    try:
        base_url = f"{root}/v1"
        asyncio.run(run_raw(base_url, CONCURRENCY))  # warm up connections / imports
        with tempfile.TemporaryDirectory() as tmp:
            raw_s = asyncio.run(run_raw(base_url, n))
            before = server_requests(root)
            ours_s = asyncio.run(run_ours(base_url, Path(tmp), n, "bench"))
            first_run = server_requests(root) - before
            t0 = time.perf_counter()
            asyncio.run(run_ours(base_url, Path(tmp), n, "bench"))
            rerun_s = time.perf_counter() - t0
            rerun = server_requests(root) - before - first_run
    finally:
        proc.kill()
        proc.wait()
    ideal = CONCURRENCY / LATENCY
    ours, raw = n / ours_s, n / raw_s
    print(f"llm_req_per_s_c64_vs_ideal: ours={ours:.1f} anchor={ideal:.1f} ratio={ours / ideal:.3f}")
    print(f"llm_req_per_s_c64_vs_bare_aiohttp: ours={ours:.1f} anchor={raw:.1f} ratio={ours / raw:.3f}")
    print(f"llm_cache_rerun_requests: ours={rerun} anchor={first_run} ratio={rerun / max(1, first_run):.3f}")
    print(f"llm_cache_rerun_seconds: ours={rerun_s:.2f} anchor={ours_s:.2f} ratio={rerun_s / ours_s:.3f}")


if __name__ == "__main__":
    main()
