"""Annotation rounds against a real Label Studio server (started once per session from its own venv)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.ls_server import LiveServer, ls_server  # noqa: F401  (session fixture)
from support.paths import FVQA, REPO

from fvqa.annotation import server
from fvqa.annotation.client import Connection, LabelStudioClient
from fvqa.annotation.configs import review_config
from fvqa.annotation.decide import apply, summarize
from fvqa.annotation.rounds import create_manual, pull, push
from fvqa.errors import FvqaError
from fvqa.pipelines.export import export_all
from fvqa.store import Workspace

pytestmark = pytest.mark.slow


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), ((i * 37) % 256, (i * 91) % 256, (i // 256) % 256)).save(buf, "PNG")
    return buf.getvalue()


def make_workspace(root: Path, n: int, split: str = "test") -> Workspace:
    """A workspace of n items with distinct images, tags, labels and a split (written in bulk)."""
    ws = Workspace(root)
    images, items, tags, labels, splits = [], [], [], [], []
    for i in range(n):
        data = _png(i)
        sha = hashlib.sha256(data).hexdigest()
        path = ws.image_path(sha, "png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        images.append(dict(sha256=sha, ext="png", width=8, height=8, n_bytes=len(data), provenance="{}"))
        iid = f"it{i:05d}"
        items.append(dict(item_id=iid, source="metaclip", question=f"What is shown in picture {i}?",
                          answer=f"Thing {i}", aliases=[f"Thing {i}"], image_sha256=sha, provenance="{}"))
        tags.append(dict(item_id=iid, knowledge_type="Nature", provenance="{}"))
        labels.append(dict(item_id=iid, search_label="search_free", provenance="{}"))
        splits.append(dict(item_id=iid, split=split, provenance="{}"))
    for table, rows in (("images", images), ("items", items), ("tags", tags), ("labels", labels),
                        ("splits", splits)):
        ws.insert(table, rows)
    return ws


def _client(live: LiveServer) -> LabelStudioClient:
    return LabelStudioClient(Connection(live.url, live.api_key, live.document_root))


def _choice(name: str, value: str) -> dict[str, Any]:
    return {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": [value]}}


def _text(name: str, value: str) -> dict[str, Any]:
    return {"from_name": name, "to_name": "image", "type": "textarea", "value": {"text": [value]}}


def _annotate(client: LabelStudioClient, task_id: int, user_id: int, *result: dict[str, Any],
              lead_time: float = 2.0) -> None:
    client.sdk.annotations.create(task_id, result=list(result), completed_by=user_id, lead_time=lead_time)


def _user(client: LabelStudioClient, name: str) -> int:
    existing = {u.email: u.id for u in client.sdk.users.list()}
    email = f"{name}@fvqa.test"
    return existing.get(email) or client.sdk.users.create(username=name, email=email, password="pw-123456!").id


def test_two_annotator_round_trip(ls_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: F811
    ws = make_workspace(tmp_path_factory.mktemp("rt") / "ws", 9)
    ws.insert("splits", [dict(item_id="it00008", split="train", provenance="{}")], replace=True)
    client = _client(ls_server)
    res = push(ws, client, "r1", split="test", annotators=2)
    assert res["pushed"] == 8
    ws.insert("splits", [dict(item_id="it00008", split="test", provenance="{}")], replace=True)
    again = push(ws, client, "r1", split="test", annotators=2)
    assert (again["pushed"], again["already"]) == (1, 8), "re-push adds only the new item"
    tasks = dict(ws.execute("SELECT item_id, task_id FROM annotation_tasks WHERE round = 'r1'"))
    exported = {t["data"]["item_id"]: t for t in client.export_tasks(res["project_id"])}
    assert len(exported) == 9 and all(exported[i]["id"] == t for i, t in tasks.items())
    first = exported["it00000"]
    assert first["data"]["image"].startswith("/data/local-files/?d=")
    image = client.http.get(first["data"]["image"])  # local-file serving of the workspace image store
    assert image.status_code == 200 and image.content == _png(0)
    assert first["predictions"] == [], "no pre-annotations unless the round pre-fills"

    a1, a2 = _user(client, "ann1"), _user(client, "ann2")
    keep, fix, rej = _choice("verdict", "keep"), _choice("verdict", "fix"), _choice("verdict", "reject")
    plan = {  # item: (annotator 1, annotator 2)
        "it00000": ([keep, _choice("knowledge_type", "Nature")], [keep, _choice("knowledge_type", "Nature")]),
        "it00001": ([keep], [keep]),
        "it00002": ([fix, _text("answer", "Corrected thing")], [fix, _text("answer", "corrected  thing!")]),
        "it00003": ([rej], [rej]),
        "it00004": ([keep], [fix, _text("answer", "Other")]),
        "it00005": ([keep], [keep]),
        "it00006": ([_choice("verdict", "maybe")], [fix]),  # unknown choice value; fix without an answer
        "it00008": ([keep], [keep]),  # removed from the workspace before the pull
    }
    for item, (r1, r2) in plan.items():
        _annotate(client, tasks[item], a1, *r1)
        _annotate(client, tasks[item], a2, *r2, lead_time=5.5)
    client.sdk.tasks.delete(str(tasks["it00007"]))  # deleted in the UI
    ws.execute("DELETE FROM items WHERE item_id = 'it00008'")

    counts = pull(ws, client, "r1")
    assert counts["annotations"] == 12 and counts["reasons"]["task_deleted"] == 1
    rejects = {(r[0], r[1]) for r in ws.execute("SELECT key, reason FROM rejects WHERE stage = 'annotate'")}
    reasons = sorted(r for _, r in rejects)
    assert "unknown_value" in reasons
    assert "fix_without_answer" in reasons
    assert "task_deleted" in reasons
    assert reasons.count("item_gone") == 2
    assert counts["annotations_in"] == 16 and counts["annotations_rejected"] == 4 and counts["skipped"] == 0
    assert pull(ws, client, "r1") == counts, "pull is idempotent"
    assert ws.count("annotations") == 12 and len(ws.execute(
        "SELECT * FROM rejects WHERE stage = 'annotate'")) == len(rejects)
    row = ws.execute("SELECT annotator, lead_time, verdict, answer FROM annotations WHERE item_id = 'it00002' "
                     "ORDER BY annotation_id")
    assert row[0] == ("ann1@fvqa.test", 2.0, "fix", "Corrected thing") and row[1][1] == 5.5

    s = summarize(ws, "r1")
    assert s.by_annotator == {"ann1@fvqa.test": 6, "ann2@fvqa.test": 6}
    assert (s.tasks, s.annotated, s.pending) == (9, 6, 3)
    method, kappa, n = s.agreement["verdict"]
    assert (method, n) == ("cohen_kappa", 6) and kappa == pytest.approx(15 / 21)  # hand-computed in agreement tests
    # answers (normalised): it00002 agrees ("corrected thing"), it00004 differs ("thing 4" vs "other");
    # every other item has its own answer: p_o = 5/6, p_e = 5/36 -> kappa = (30-5)/(36-5) = 25/31
    assert s.agreement["answer"][1] == pytest.approx(25 / 31)
    assert [d["item_id"] for d in s.disagreements] == ["it00004"]

    env = {**os.environ, "FVQA_LS_API_KEY": ls_server.api_key}
    ws.close()
    shown = subprocess.run([*FVQA, "annotate", "status", "--workspace", str(ws.root)], capture_output=True,
                           text=True, cwd=REPO, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "0.714" in shown.stdout and "it00004" in shown.stdout
    adj = subprocess.run([*FVQA, "annotate", "adjudicate", "--round", "r1", "--workspace", str(ws.root),
                          "--url", ls_server.url, "--document-root", str(ls_server.document_root)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert adj.returncode == 0, adj.stderr
    assert "1 disagreements -> round r1-adj" in adj.stdout
    ws = Workspace(ws.root)

    senior = _user(client, "senior")
    adj_task = ws.execute("SELECT task_id FROM annotation_tasks WHERE round = 'r1-adj'")
    assert len(adj_task) == 1
    adj_data = client.export_tasks(int(tables_round(ws, "r1-adj")))[0]["data"]
    assert "ann2@fvqa.test: fix" in adj_data["context"], "the adjudicator sees each annotator's decision"
    _annotate(client, adj_task[0][0], senior, fix, _text("answer", "Senior answer"), _choice("knowledge_type", "Arts"))
    pull(ws, client, "r1-adj")
    assert apply(ws, "r1") == {"kept": 3, "fixed": 1, "rejected": 1, "disagreement": 1, "applied": 5}
    assert apply(ws, "r1-adj") == {"fixed": 1, "applied": 1}
    prov = json.loads(ws.execute("SELECT provenance FROM gold WHERE item_id = 'it00004'")[0][0])
    assert prov["round"] == "r1-adj" and prov["annotators"] == ["senior@fvqa.test"]

    # a pipeline re-run rewrites its own tables; the human decisions still win
    ws.insert("items", [dict(item_id="it00002", source="metaclip", question="What?", answer="Pipeline again",
                             image_sha256=None, provenance="{}")], replace=True)
    export_all(ws, ["native"])
    rows = {r["item_id"]: r for r in pq.read_table(ws.exports_dir / "native" / "fvqa_items.parquet").to_pylist()}
    assert rows["it00002"]["answer"] == "Corrected thing" and rows["it00002"]["annotation_status"] == "fixed"
    assert rows["it00004"]["answer"] == "Senior answer" and rows["it00004"]["knowledge_type"] == "Arts"
    assert "it00003" not in rows, "the rejected item is gone from the export"
    assert rows["it00000"]["annotation_status"] == "kept"
    ws.close()


def tables_round(ws: Workspace, name: str) -> int:
    return ws.execute("SELECT project_id FROM annotation_rounds WHERE round = ?", [name])[0][0]


def test_manual_round_creates_items(ls_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: F811
    ws = make_workspace(tmp_path_factory.mktemp("man") / "ws", 1)
    client = _client(ls_server)
    pid = create_manual(ws, client, "m1")
    upload = ws.root / "uploads" / "new.png"  # stands in for an image an annotator uploads
    upload.parent.mkdir()
    upload.write_bytes(_png(500))
    client.attach_local_storage(pid, upload.parent)
    rel = upload.relative_to(ls_server.document_root).as_posix()
    ids = client.import_tasks(pid, [{"data": {"image": f"/data/local-files/?d={rel}"}}] * 2
                              + [{"data": {"image": "http://example.invalid/elsewhere.png"}}])
    me = _user(client, "writer")
    _annotate(client, ids[0], me, _text("question", "Who painted this?"), _text("answer", "Ada Lovelace"),
              _choice("knowledge_type", "People"))
    _annotate(client, ids[1], me, _text("question", "Where is this?"), _choice("knowledge_type", "Place"))
    _annotate(client, ids[2], me, _text("question", "What?"), _text("answer", "X"), _choice("knowledge_type", "Arts"))
    client.sdk.annotations.create(ids[0], result=[], completed_by=_user(client, "skipper"), was_cancelled=True)
    counts = pull(ws, client, "m1")
    assert (counts["annotations"], counts["skipped"], counts["annotations_rejected"]) == (1, 1, 2)
    assert counts["skipped_reasons"] == {"cancelled in Label Studio": 1}
    reasons = sorted(ws.execute("SELECT reason, detail FROM rejects WHERE stage = 'annotate'"))
    assert reasons[0][0] == "field_missing"
    assert reasons[1][0] == "image_unavailable"
    assert reasons[1][1].startswith("image URL http://example.invalid/elsewhere.png is not on the Label Studio server")
    assert apply(ws, "m1") == {"manual": 1, "applied": 1}
    row = ws.execute("SELECT source, question, answer, knowledge_type, annotation_status, image_sha256 "
                     "FROM dataset WHERE source = 'manual'")
    assert len(row) == 1 and row[0][:5] == ("manual", "Who painted this?", "Ada Lovelace", "People", "manual")
    assert ws.find_image(row[0][5]).read_bytes() == _png(500)
    ws.close()


def test_server_down_or_wrong_key_is_one_clear_error(ls_server: LiveServer, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(FvqaError, match="refused the API key"):
        LabelStudioClient(Connection(ls_server.url, "wrong-key-123456", None))
    # a personal access token (JWT) works as well as the legacy token, for the SDK and our own calls
    admin = _client(ls_server)
    made = admin.http.post("/api/token/")
    assert made.status_code in (200, 201), made.text
    pat = made.json()["token"]
    assert pat.startswith("eyJ")
    personal = LabelStudioClient(Connection(ls_server.url, pat, None))
    assert personal.sdk.users.whoami().email == server.ADMIN_USER
    # our one raw call (file downloads) carries the SDK's refreshed access token, not the refresh token
    assert json.loads(personal.download("/api/current-user/whoami"))["email"] == server.ADMIN_USER
    pid = admin.create_project("pat check", review_config(), "", 1)
    admin.import_tasks(pid, [{"data": {"image": "/x.png", "question": "q", "answer_text": "a", "context": "",
                                       "aliases_text": "", "source_html": "", "passage": ""}}])
    assert len(personal.export_tasks(pid)) == 1
    with pytest.raises(FvqaError, match="refused the personal access token"):
        LabelStudioClient(Connection(ls_server.url, pat[:-4] + "AAAA", None))
    port = server.free_port()
    env = {**os.environ, "FVQA_LS_API_KEY": "whatever-123"}
    make_workspace(tmp_path / "ws", 1).close()
    res = subprocess.run([*FVQA, "annotate", "push", "--round", "x", "--workspace", str(tmp_path / "ws"),
                          "--url", f"http://127.0.0.1:{port}"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=120)
    assert res.returncode == 2 and "cannot reach Label Studio" in res.stderr and "Traceback" not in res.stderr
    env.pop("FVQA_LS_API_KEY")
    res = subprocess.run([*FVQA, "annotate", "pull", "--round", "x", "--workspace", str(tmp_path / "ws"),
                          "--url", ls_server.url], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert res.returncode == 2 and "FVQA_LS_API_KEY is not set" in res.stderr


def test_thousand_task_push_and_pull(ls_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: F811
    ws = make_workspace(tmp_path_factory.mktemp("big") / "ws", 1000)
    client = _client(ls_server)
    t0 = time.perf_counter()
    res = push(ws, client, "big", split="test", annotators=1)
    t_push = time.perf_counter() - t0
    assert res["pushed"] == 1000
    tasks = dict(ws.execute("SELECT item_id, task_id FROM annotation_tasks WHERE round = 'big'"))
    me = _user(client, "fast")
    for i in range(20):
        _annotate(client, tasks[f"it{i:05d}"], me, _choice("verdict", "keep"))
    t0 = time.perf_counter()
    counts = pull(ws, client, "big")
    t_pull = time.perf_counter() - t0
    assert counts == {"tasks": 1000, "tasks_rejected": 0, "tasks_deleted": 0, "annotations_in": 20, "annotations": 20,
                      "annotations_rejected": 0, "skipped": 0, "skipped_reasons": {}, "anonymous": 0,
                      "superseded": 0, "superseded_changed": 0, "rejected": 0, "reasons": {}}
    print(f"1000 tasks: push {t_push:.1f}s pull {t_pull:.1f}s")
    assert t_push < 120 and t_pull < 60
    ws.close()


def test_busy_port_unknown_round_and_empty_split_are_clear_errors(ls_server: LiveServer, tmp_path: Path) -> None:  # noqa: F811
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(FvqaError, match=f"port {busy} on 127.0.0.1 is already in use"):
            server.start(tmp_path / "ls", tmp_path, "some-key-123", venv=Path(ls_server.info.venv), port=busy)
    ws = make_workspace(tmp_path / "ws", 2, split="train")
    client = _client(ls_server)
    with pytest.raises(FvqaError, match="no items to push"):
        push(ws, client, "empty", split="test")
    with pytest.raises(FvqaError, match="unknown round nope: push it first"):
        pull(ws, client, "nope")
    ws.close()
    res = subprocess.run([*FVQA, "annotate", "server", "status", "--data-dir", str(tmp_path / "none")],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 1 and "not running" in res.stdout


def test_cli_server_start_push_stop(ls_server: LiveServer, tmp_path: Path) -> None:  # noqa: F811
    """What a user types: start a second server for a workspace, push to it by its recorded URL, stop it."""
    make_workspace(tmp_path / "ws", 3).close()
    env = {**os.environ, "FVQA_LS_API_KEY": "cli-key-0123456789", "FVQA_LS_DATA": str(tmp_path / "ls")}
    env.pop("FVQA_LS_URL", None)

    def fvqa(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FVQA, "annotate", *args], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=900)

    started = fvqa("server", "start", "--workspace", str(tmp_path / "ws"), "--venv", ls_server.info.venv)
    assert started.returncode == 0, started.stderr
    try:
        state = server.read_state(tmp_path / "ls")
        assert state is not None and state.url.startswith("http://127.0.0.1:")
        assert state.document_root == str(tmp_path.resolve())
        assert "cli-key" not in (tmp_path / "ls" / "fvqa-server.json").read_text(), "no secret in the state file"
        assert "running at" in fvqa("server", "status").stdout
        pushed = fvqa("push", "--round", "c1", "--workspace", str(tmp_path / "ws"))
        assert pushed.returncode == 0, pushed.stderr
        assert "pushed 3" in pushed.stdout and state.url in pushed.stdout
    finally:
        stopped = fvqa("server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not server.healthy(state.url)
