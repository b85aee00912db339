"""Benchmark: pushing and pulling annotation rounds against a real Label Studio server.

ours   = fvqa.annotation.rounds.push / pull (project, local storage, bulk import with predictions,
         bookkeeping; full JSON export, parsing, validation, DuckDB rows)
anchor = the raw REST calls alone on the same server: POST /api/projects/{id}/import with the same
         task JSON, and GET /api/projects/{id}/export?exportType=JSON&download_all_tasks=true

Pull is measured on a project where every task carries one annotation (imported with the tasks).
Prints `<name>: ours=<s> anchor=<s> ratio=<ours/anchor>` (ratio 1.0 = no overhead over raw REST).
Usage: python bench/bench_annotation.py [--quick]   (quick: 1,000 tasks; full: 1,000 and 10,000)
Label Studio comes from $FVQA_LS_VENV or .venv-ls (created on first use).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fvqa.annotation import configs, server  # noqa: E402
from fvqa.annotation.client import Connection, LabelStudioClient  # noqa: E402
from fvqa.annotation.rounds import pull, push  # noqa: E402
from fvqa.store import Workspace, now  # noqa: E402


def make_workspace(root: Path, n: int) -> Workspace:
    """n test-split items with distinct tiny images, written in bulk."""
    ws = Workspace(root)
    images, items, splits = [], [], []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(buf, "PNG")
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        path = ws.image_path(sha, "png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        images.append(dict(sha256=sha, ext="png", width=8, height=8, n_bytes=len(data), provenance="{}"))
        items.append(dict(item_id=f"it{i:06d}", source="metaclip", question=f"What is in picture {i}?",
                          answer=f"Thing {i}", image_sha256=sha, provenance="{}"))
        splits.append(dict(item_id=f"it{i:06d}", split="test", provenance="{}"))
    ws.insert("images", images)
    ws.insert("items", items)
    ws.insert("splits", splits)
    return ws


def _tasks(ws: Workspace, root: Path, annotated: bool) -> list[dict]:
    out = []
    for item_id, sha, answer in ws.execute("SELECT item_id, image_sha256, answer FROM items ORDER BY item_id"):
        task = {"data": {"item_id": item_id, "image": f"/data/local-files/?d={ws.image_path(sha, 'png').relative_to(root)}",
                         "question": "q", "answer": answer, "answer_text": answer, "context": "",
                         "aliases_text": "", "source_html": "", "passage": ""}}
        if annotated:
            task["annotations"] = [{"result": [{"from_name": "verdict", "to_name": "image", "type": "choices",
                                                "value": {"choices": ["keep"]}}], "lead_time": 1.0}]
        out.append(task)
    return out


def bench(n: int, live: server.ServerInfo, key: str, base: Path) -> None:
    ws = make_workspace(base / f"ws{n}", n)
    client = LabelStudioClient(Connection(live.url, key, base))
    http = httpx.Client(base_url=live.url, headers={"Authorization": f"Token {key}"}, timeout=1800)
    t0 = time.perf_counter()
    push(ws, client, f"push{n}", annotators=1)
    ours_push = time.perf_counter() - t0
    pid = http.post("/api/projects", json={"title": f"raw push {n}", "label_config": configs.review_config()}).json()["id"]
    tasks = _tasks(ws, base, annotated=False)
    t0 = time.perf_counter()
    http.post(f"/api/projects/{pid}/import", json=tasks).raise_for_status()
    anchor_push = time.perf_counter() - t0
    print(f"push_{n}_tasks_s: ours={ours_push:.2f} anchor={anchor_push:.2f} ratio={ours_push / anchor_push:.2f}",
          flush=True)

    # pull: a project whose tasks each carry one annotation, registered as a round
    pid = http.post("/api/projects", json={"title": f"annotated {n}", "label_config": configs.review_config()}).json()["id"]
    http.post(f"/api/projects/{pid}/import", json=_tasks(ws, base, annotated=True)).raise_for_status()
    ws.insert("annotation_rounds", [dict(round=f"pull{n}", kind="review", project_id=pid, server_url=live.url,
                                         split="test", annotators=1, created_at=now())])
    t0 = time.perf_counter()
    r = http.get(f"/api/projects/{pid}/export", params={"exportType": "JSON", "download_all_tasks": "true"})
    r.raise_for_status()
    _ = r.json()
    anchor_pull = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = pull(ws, client, f"pull{n}")
    ours_pull = time.perf_counter() - t0
    assert res["annotations"] == n, res
    print(f"pull_{n}_annotations_s: ours={ours_pull:.2f} anchor={anchor_pull:.2f} "
          f"ratio={ours_pull / anchor_pull:.2f}", flush=True)
    ws.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1,000 tasks only")
    args = parser.parse_args()
    venv = Path(os.environ.get("FVQA_LS_VENV") or REPO / ".venv-ls")
    with tempfile.TemporaryDirectory(prefix="bench-annotation-") as tmp:
        base = Path(tmp).resolve()
        key = secrets.token_hex(20)
        t0 = time.perf_counter()
        live = server.start(base / "ls-data", base, key, venv=venv, log=lambda m: print(m, file=sys.stderr))
        print(f"# server start {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        try:
            for n in [1_000] if args.quick else [1_000, 10_000]:
                bench(n, live, key, base)
        finally:
            server.stop(base / "ls-data")


if __name__ == "__main__":
    main()
