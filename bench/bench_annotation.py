"""Benchmark: pushing and pulling annotation rounds against a real Label Studio server.

ours   = fvqa.annotation.rounds.push / pull (project, local storage, bulk import with predictions,
         bookkeeping; full JSON export, parsing, validation, DuckDB rows)
anchor = the raw REST calls alone on the same server: POST /api/projects/{id}/import of the very
         bytes our push sent (same query and chunks; into a project made beforehand, untimed, with the
         same settings), and GET /api/projects/{id}/export?exportType=JSON&download_all_tasks=true

Push is timed REPS rounds per size after one untimed push that warms client and server; the order
of the sides rotates each round (the machine's load drifts, and a push straight after another import
meets a server still busy with it), with a short untimed pause before each; each side's median is
reported, with the per-round ratios on a `#` line. A second push line takes as anchor the same server calls our
push needs for a new round (find by title, create project, attach storage, import), made raw and
one after another: what is left there is our own cost, the first line adds the project set-up.
Pull is measured once, on a project whose every task carries one annotation.
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
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fvqa.annotation import configs, server  # noqa: E402
from fvqa.annotation.client import Connection, LabelStudioClient, http_client  # noqa: E402
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


SETTLE_S = 0.5  # untimed pause before each timed push, the same for every side


class RecordingClient(LabelStudioClient):
    """Our client, keeping the import bodies it sends (a reference only), so the anchor posts the same JSON."""

    sent: list[tuple[int, bytes]]

    def import_encoded(self, project_id: int, bodies: Sequence[tuple[int, bytes]]) -> list[int]:
        self.sent = list(bodies)
        return super().import_encoded(project_id, bodies)


def bench_push(n: int, ws: Workspace, client: RecordingClient, http: httpx.Client, reps: int) -> None:
    """REPS alternating rounds of: our push of n items to a new round / the raw import / the raw calls."""
    label_config = configs.review_config(False)
    tag = secrets.token_hex(3)  # titles unique on the server: a round found by title would not be pushed

    def project(title: str) -> int:  # the settings our push gives a new round's project
        r = http.post("/api/projects", json={"title": title, "label_config": label_config, "description": "{}",
                                             "maximum_annotations": 1, "show_skip_button": True})
        r.raise_for_status()
        return int(r.json()["id"])

    def post_tasks(pid: int, bodies: list[tuple[int, bytes]]) -> None:  # as our push sent them
        for _, body in bodies:
            http.post(f"/api/projects/{pid}/import", params={"return_task_ids": "true"}, content=body,
                      headers={"Content-Type": "application/json"}).raise_for_status()

    def ours(k: int) -> float:
        t0 = time.perf_counter()
        res = push(ws, client, f"push{n}-{tag}-{k}", annotators=1)
        elapsed = time.perf_counter() - t0
        assert res["pushed"] == n, res
        return elapsed

    def anchor(k: int) -> float:
        pid, bodies = project(f"raw push {n}-{tag}-{k}"), client.sent
        t0 = time.perf_counter()
        post_tasks(pid, bodies)
        return time.perf_counter() - t0

    def same_calls(k: int) -> float:
        bodies = client.sent
        t0 = time.perf_counter()
        http.get("/api/projects", params={"title": f"raw calls {n}-{tag}-{k}"}).raise_for_status()
        pid = project(f"raw calls {n}-{tag}-{k}")
        http.post("/api/storages/localfiles", json={"project": pid, "path": str(ws.root / "images"),
                                                    "title": "fvqa images", "use_blob_urls": False}).raise_for_status()
        post_tasks(pid, bodies)
        return time.perf_counter() - t0

    ours(0)  # warm-up (untimed); also gives the anchors their task JSON
    sides = {"ours": ours, "anchor": anchor, "same_calls": same_calls}
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for k in range(1, reps + 1):
        # the order rotates, so no side follows itself (the server is still busy for a moment after an
        # import) and each goes first equally often; a pause lets each call start on an idle server
        for name in names[k % 3:] + names[:k % 3]:
            time.sleep(SETTLE_S)
            times[name].append(sides[name](k))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, line in (("anchor", f"push_{n}_tasks_s"), ("same_calls", f"push_{n}_tasks_vs_same_rest_calls_s")):
        rounds_ = " ".join(f"{o / a:.2f}" for o, a in zip(times["ours"], times[name], strict=True))
        print(f"{line}: ours={med['ours']:.2f} anchor={med[name]:.2f} ratio={med['ours'] / med[name]:.2f}")
        print(f"#   medians of {reps} rounds; ratio per round: {rounds_}", flush=True)


def bench(n: int, live: server.ServerInfo, key: str, base: Path, reps: int) -> None:
    ws = make_workspace(base / f"ws{n}", n)
    client = RecordingClient(Connection(live.url, key, base))
    # the anchor's sockets as ours (TCP_NODELAY: without it each reused-connection request waits ~40 ms)
    http = http_client(1800, base_url=live.url, headers={"Authorization": f"Token {key}"})
    bench_push(n, ws, client, http, reps)

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
    parser.add_argument("--reps", type=int, default=0, help="timed push rounds per size (default 5; 3 at 10,000)")
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
                bench(n, live, key, base, reps=args.reps or (5 if n <= 1_000 else 3))
        finally:
            server.stop(base / "ls-data")


if __name__ == "__main__":
    main()
