"""Spend is on the books the moment it is paid (issue 20, item 5).

Each reply is stored with its `spend` row in one SQLite transaction, so a SIGKILL of `fvqa build`
mid-stage leaves spend == replies kept == what the server billed, and `fvqa status` reads it from
the response caches (not from `runs`, which a killed stage never writes).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from support.fake_openai import FakeOpenAI, last_user_text
from support.paths import FVQA, REPO

from fvqa.llm.cache import ResponseCache, read_spend
from fvqa.llm.config import Price
from fvqa.store import Workspace

PRICE = Price(input_per_1m=2.5, output_per_1m=10.0)
N = 10


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (20 * i, 90, 200 - 15 * i)).save(buf, "JPEG")
    return buf.getvalue()


def _workspace(root: Path) -> None:
    with Workspace(root) as ws:
        for i in range(N):
            cid, concept = f"c{i}", f"Landmark{i}"
            ref = ws.put_image(_jpeg(i))
            ws.insert("concepts", [dict(concept_id=cid, entry_id=i, concept=concept, count=10 ** 3, tier="tail",
                                        category="Place")])
            ws.insert("crawled", [dict(concept_id=cid, image_sha256=ref.sha256, image_url=f"http://x/{cid}.jpg",
                                       page_url=f"http://x/{cid}", page_title=f"{concept} - Wiki",
                                       page_text=f"{concept} is famous.", clip_score=0.3)])


def _responder(body: dict[str, Any]) -> str:
    concept = re.search(r"shows this visual concept: (\S+)", last_user_text(body)).group(1)
    return json.dumps({"question": "What place is shown in this photo?", "answer": f"the {concept}"})


def _billed(srv: FakeOpenAI) -> list[float]:
    """The price of each successful chat completion the server sent, in order (the fake's usage rule)."""
    out = []
    for rec in srv.requests:
        if rec.path == "/v1/chat/completions" and rec.status == 200:
            body = rec.json
            prompt = max(1, len(json.dumps(body["messages"])) // 4)
            completion = max(1, len(_responder(body)) // 4)
            out.append(PRICE.usd(prompt, completion))
    return out


def _status(config: Path) -> str:
    env = {**os.environ, "COLUMNS": "200"}
    res = subprocess.run([*FVQA, "status", "-c", str(config)], capture_output=True, text=True, cwd=REPO,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _status_generate(out: str) -> tuple[int, float]:
    """(paid calls, $) of the generate row of the spend table."""
    table = out.split("paid LLM calls", 1)[1]
    row = next(line for line in table.splitlines() if re.search(r"\bgenerate\b", line))
    cells = [c.strip() for c in re.split(r"[│┃|]", row) if c.strip()]
    return int(cells[1]), float(cells[-1])


def test_put_ok_books_spend_in_the_same_transaction(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path)
    body = {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": 100, "completion_tokens": 10}}
    cache.put_ok("k1", body, "m", stage="tag", price=PRICE)
    cache.put_ok("k2", body, "m", stage="tag", price=PRICE, batch="batch-1")
    cache.put_ok("k2", body, "m", stage="tag", price=PRICE, batch="batch-1")  # a batch merged again: once
    cache.put_ok("k3", body, "m")  # no stage: a reply only (e.g. an import), nothing booked
    cache.close()
    rows = {(r.stage, r.batch): r for r in read_spend(tmp_path)}
    assert rows["tag", False].calls == 1 and rows["tag", False].usd == pytest.approx(PRICE.usd(100, 10))
    assert rows["tag", True].calls == 1 and rows["tag", True].usd == pytest.approx(PRICE.usd(100, 10, batch=True))
    with sqlite3.connect(tmp_path / "llm.sqlite") as con:
        assert con.execute("SELECT count(*) FROM responses").fetchone()[0] == 3


@pytest.mark.slow
def test_sigkill_mid_build_keeps_the_books_then_rerun_pays_only_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    _workspace(root)
    with FakeOpenAI(_responder, latency=0.4) as srv:
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({
            "workspace": str(root),
            "batch_size": 1,
            "generate": {"backend": "llm", "llm": {
                "endpoints": [{"base_url": srv.base_url, "api_key_env": None}], "model": "fake-model",
                "max_concurrency": 1, "max_retries": 0,
                "price": {"input_per_1m": PRICE.input_per_1m, "output_per_1m": PRICE.output_per_1m}}},
        }))
        build = [*FVQA, "build", "-c", str(config), "--stages", "generate"]
        cache = root / "cache" / "llm.sqlite"

        def stored() -> int:  # replies the running build has committed to its cache
            try:
                with sqlite3.connect(f"file:{cache}?mode=ro", uri=True, timeout=0.1) as con:
                    return con.execute("SELECT count(*) FROM responses WHERE ok = 1").fetchone()[0]
            except sqlite3.Error:
                return 0

        proc = subprocess.Popen(build, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 180
        while stored() < 3 and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.8)  # the request in flight at the kill is answered (and billed) into a closed socket
        kept = stored()
        billed = _billed(srv)
        assert 3 <= kept < N, "the kill should land mid-stage"
        lost = len(billed) - kept  # sent by the server, never received: the one paid call a kill can cost
        assert lost in (0, 1)  # max_concurrency 1: at most one in flight
        usd_kept = sum(usd for usd in billed[:kept])
        with Workspace(root, read_only=True) as ws:  # the killed stage wrote no `runs` row
            assert ws.execute("SELECT status FROM runs WHERE stage = 'generate'") == [("running",)]
        [row] = read_spend(root / "cache")
        assert row.calls == kept and row.usd == pytest.approx(usd_kept)
        shown = _status(config)
        calls, usd = _status_generate(shown)
        assert calls == kept and usd == pytest.approx(usd_kept, abs=1e-4)
        assert "running or interrupted" in shown  # the killed stage's runs row was never completed

        res = subprocess.run(build, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        total = _billed(srv)
        assert len(total) - len(billed) == N - kept  # the re-run sent only the requests with no stored reply
        assert len({json.dumps(b, sort_keys=True) for b in srv.chat_bodies(status=200)}) == N
        usd_received = sum(total) - sum(billed[kept:])  # everything billed but the reply lost at the kill
        [row] = read_spend(root / "cache")
        assert row.calls == N and row.usd == pytest.approx(usd_received)
        calls, usd = _status_generate(_status(config))
        assert calls == N and usd == pytest.approx(usd_received, abs=1e-4)
