"""Annotation rounds on the server: push items to Label Studio, pull every annotation back, adjudicate.

Each step is idempotent. `push` adds only items the round does not hold yet (checked against the
server, so a crash between import and bookkeeping never duplicates tasks); `pull` rewrites the
round's rows from one full export. Bad annotations never crash a pull: each lands in `rejects`
(stage `annotate`) with a reason. Decisions and `gold` live in `decide`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from fvqa.annotation import configs, tables
from fvqa.annotation.client import LabelStudioClient
from fvqa.annotation.decide import STAGE, disagreements
from fvqa.annotation.parse import AnnotationProblem, parse_manual, parse_review
from fvqa.errors import FvqaError
from fvqa.store import ImageError, Workspace, now


def _title(round_name: str) -> str:
    return f"fvqa round {round_name}"[:50]


def _sample_key(seed: int, item_id: str) -> str:
    return hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()


def _image_url(conn_root: Path, ws: Workspace, sha: str, ext: str) -> str:
    rel = ws.image_path(sha, ext).relative_to(conn_root)
    return f"/data/local-files/?d={rel.as_posix()}"


def _document_root(client: LabelStudioClient, ws: Workspace) -> Path:
    root = client.conn.document_root
    if root is None:
        raise FvqaError("unknown local-files document root of the Label Studio server: pass --document-root "
                        "(the server's LOCAL_FILES_DOCUMENT_ROOT) or start it with `fvqa annotate server start`")
    if not ws.root.is_relative_to(root.resolve()):
        raise FvqaError(f"workspace {ws.root} is not under the server's document root {root}: restart the server "
                        "with `fvqa annotate server start --workspace <this workspace>`")
    return root.resolve()


def _ensure_round(ws: Workspace, client: LabelStudioClient, name: str, kind: str, label_config: str,
                  annotators: int, split: str | None, parent: str | None = None) -> tuple[int, bool]:
    """The round's project id (recorded, found on the server by title, or newly created) and if new."""
    row = tables.round_row(ws, name)
    if row is not None:
        if row["kind"] != kind:
            raise FvqaError(f"round {name} is a {row['kind']} round, not {kind}: pick another round name")
        if client.project_exists(int(row["project_id"])):
            return int(row["project_id"]), False
        raise FvqaError(f"the Label Studio project of round {name} (id {row['project_id']}) is gone from "
                        f"{client.conn.url}: use a new round name")
    pid = client.find_project(_title(name))
    created = pid is None
    if pid is None:
        desc = json.dumps({"fvqa_round": name, "kind": kind, "workspace": str(ws.root)})
        pid = client.create_project(_title(name), label_config, desc, annotators)
    ws.insert("annotation_rounds", [dict(round=name, kind=kind, project_id=pid, server_url=client.conn.url,
                                         split=split, annotators=annotators, parent_round=parent,
                                         created_at=now(), pulled_at=None)])
    return pid, created


def _server_item_ids(client: LabelStudioClient, pid: int) -> dict[str, int]:
    return {t["data"]["item_id"]: int(t["id"]) for t in client.export_tasks(pid)
            if isinstance(t.get("data"), dict) and t["data"].get("item_id")}


def _predictions(row: dict[str, Any]) -> list[dict[str, Any]]:
    result = []
    if row.get("knowledge_type") in configs.KNOWLEDGE_TYPES:
        result.append({"from_name": "knowledge_type", "to_name": "image", "type": "choices",
                       "value": {"choices": [row["knowledge_type"]]}})
    if row.get("search_label") in configs.SEARCH_NEEDS:
        result.append({"from_name": "search", "to_name": "image", "type": "choices",
                       "value": {"choices": [row["search_label"]]}})
    return [{"model_version": "fvqa-pipeline", "result": result}] if result else []


def push(ws: Workspace, client: LabelStudioClient, round_name: str, *, split: str | None = "test",
         sample: int | None = None, annotators: int = 2, item_ids: list[str] | None = None,
         kind: str = "review", parent: str | None = None, notes: dict[str, str] | None = None,
         seed: int = 0) -> dict[str, int]:
    """Push dataset items (a split, optionally a stable sample of it) as review tasks; only new ones."""
    tables.ensure(ws)
    root = _document_root(client, ws)
    where, params = ("WHERE split = ?", [split]) if split and item_ids is None else ("", [])
    cur = ws.con.execute(
        "SELECT item_id, source, question, answer, aliases, image_sha256, image_ext, knowledge_type, "
        f"search_label FROM dataset {where}", params)
    cols = [d[0] for d in cur.description]
    rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    if item_ids is not None:
        wanted = set(item_ids)
        rows = [r for r in rows if r["item_id"] in wanted]
    if not rows:
        raise FvqaError(f"no items to push (split {split!r} is empty in {ws.root})")
    rows.sort(key=lambda r: _sample_key(seed, r["item_id"]))
    if sample is not None:
        rows = rows[:sample]
    pid, created = _ensure_round(ws, client, round_name, kind, configs.review_config(), annotators, split, parent)
    client.attach_local_storage(pid, ws.root / "images")
    on_server = {} if created else _server_item_ids(client, pid)
    known = {r[0] for r in ws.execute("SELECT item_id FROM annotation_tasks WHERE round = ?", [round_name])}
    # tasks on the server but not in our table (crash after import): record, never import twice
    missing_rows = [dict(round=round_name, item_id=i, task_id=t, project_id=pid, pushed_at=now())
                    for i, t in on_server.items() if i not in known]
    ws.insert("annotation_tasks", missing_rows)
    todo, rejects, tasks = [], [], []
    for r in rows:
        if r["item_id"] in on_server:
            continue
        if not r["image_sha256"] or not r["image_ext"]:
            rejects.append((STAGE, f"{round_name}/{r['item_id']}", "item has no image to review", ""))
            continue
        note = (notes or {}).get(r["item_id"], "")
        context = (f"source {r['source']} | pipeline knowledge type {r['knowledge_type'] or '-'} | "
                   f"pipeline search label {r['search_label'] or '-'} | aliases {', '.join(r['aliases'] or [])}")
        tasks.append({
            "data": {"item_id": r["item_id"], "fvqa_round": round_name,
                     "image": _image_url(root, ws, r["image_sha256"], r["image_ext"]),
                     "question": r["question"], "answer": r["answer"],
                     "answer_text": f"Proposed answer: {r['answer']}",
                     "context": context + (f"\n{note}" if note else "")},
            "predictions": _predictions(r)})
        todo.append(r["item_id"])
    ids = client.import_tasks(pid, tasks) if tasks else []
    if len(ids) != len(todo):  # fall back to the server's own mapping
        mapping = _server_item_ids(client, pid)
        ids = [mapping.get(i, -1) for i in todo]
    with ws.transaction():
        ws.insert("annotation_tasks", [dict(round=round_name, item_id=i, task_id=t, project_id=pid, pushed_at=now())
                                       for i, t in zip(todo, ids, strict=True)])
        ws.add_rejects(rejects)
    return {"project_id": pid, "pushed": len(todo), "already": len(on_server), "rejected": len(rejects)}


def create_manual(ws: Workspace, client: LabelStudioClient, round_name: str, *, annotators: int = 1) -> int:
    """A project for writing new items: annotators upload images in the UI and write question + answer."""
    tables.ensure(ws)
    return _ensure_round(ws, client, round_name, "manual", configs.manual_config(), annotators, "manual")[0]


def pull(ws: Workspace, client: LabelStudioClient, round_name: str) -> dict[str, int]:
    """Store every annotation of a round as a row (replacing the round's previous pull)."""
    tables.ensure(ws)
    rnd = tables.round_row(ws, round_name)
    if rnd is None:
        raise FvqaError(f"unknown round {round_name}: push it first (`fvqa annotate push --round {round_name}`)")
    pid = int(rnd["project_id"])
    if not client.project_exists(pid):
        raise FvqaError(f"the Label Studio project of round {round_name} (id {pid}) is gone from {client.conn.url}")
    exported = client.export_tasks(pid)
    users = client.user_emails(refresh=True)
    items = ws.keys("items", "item_id")
    pushed = dict(ws.execute("SELECT task_id, item_id FROM annotation_tasks WHERE round = ?", [round_name]))
    manual = rnd["kind"] == "manual"
    rows: list[dict[str, Any]] = []
    rejects: list[tuple[str, str, str, str]] = []
    seen_tasks: set[int] = set()
    pulled_at = now()
    for task in exported:
        tid = int(task.get("id", -1))
        seen_tasks.add(tid)
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        item_id = data.get("item_id")
        for ann in task.get("annotations") or []:
            key = f"{round_name}/task {tid}/annotation {ann.get('id')}"
            if ann.get("was_cancelled"):
                rejects.append((STAGE, key, "annotation was skipped (cancelled) in Label Studio", ""))
                continue
            try:
                if manual:
                    fields = parse_manual(ann.get("result") or [])
                    fields["image_sha256"] = _store_image(ws, client, data.get("image"))
                    item_id = f"manual-{round_name}-{ann.get('id')}"
                else:
                    if not item_id:
                        raise AnnotationProblem("task has no item_id in its data (not pushed by fvqa?)")
                    if item_id not in items:
                        raise AnnotationProblem(f"item {item_id} is no longer in the workspace")
                    fields = parse_review(ann.get("result") or [], data.get("answer"))
            except AnnotationProblem as exc:
                rejects.append((STAGE, key, str(exc), json.dumps(ann.get("result"))[:2000]))
                continue
            uid = ann.get("completed_by")
            uid = uid.get("id") if isinstance(uid, dict) else uid
            rows.append(dict(round=round_name, annotation_id=int(ann["id"]), task_id=tid, project_id=pid,
                             item_id=item_id, annotator=users.get(int(uid), f"user-{uid}") if uid else "unknown",
                             annotator_id=int(uid) if uid else None, lead_time=ann.get("lead_time"),
                             created_at=ann.get("created_at"), updated_at=ann.get("updated_at"),
                             pulled_at=pulled_at, **fields))
    for tid, item_id in pushed.items():
        if tid not in seen_tasks:
            rejects.append((STAGE, f"{round_name}/task {tid}", "task deleted in Label Studio",
                            f"item {item_id}: push the round again to re-create it"))
    with ws.transaction():
        ws.execute("DELETE FROM annotations WHERE round = ?", [round_name])
        ws.execute("DELETE FROM rejects WHERE stage = ? AND starts_with(key, ?)", [STAGE, f"{round_name}/task "])
        if rows:
            ws.insert("annotations", _complete(rows))
        ws.add_rejects(rejects)
        ws.execute("UPDATE annotation_rounds SET pulled_at = ? WHERE round = ?", [pulled_at, round_name])
    return {"tasks": len(exported), "annotations": len(rows), "rejected": len(rejects),
            "reasons": dict(Counter(r[2] if not r[2].startswith("unknown ") else r[2].split(" (")[0]
                                    for r in rejects))}


_COLUMNS = ("verdict", "answer", "proposed_answer", "knowledge_type", "search_label", "comment", "question",
            "aliases", "image_sha256")


def _complete(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{c: r.get(c) for c in _COLUMNS} | r for r in rows]


def _store_image(ws: Workspace, client: LabelStudioClient, url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise AnnotationProblem("written item has no image")
    try:
        return ws.put_image(client.download(url), provenance={"stage": "annotate", "url": url}).sha256
    except FvqaError as exc:
        raise AnnotationProblem(str(exc)) from exc
    except ImageError as exc:
        raise AnnotationProblem(f"uploaded image: {exc}") from exc


def adjudicate(ws: Workspace, client: LabelStudioClient, round_name: str, new_round: str | None = None
               ) -> dict[str, Any]:
    """Push the round's disagreements as a new single-annotator round (a senior annotator decides)."""
    rnd = tables.round_row(ws, round_name)
    if rnd is None or rnd["kind"] == "manual":
        raise FvqaError(f"round {round_name} is not a pulled review round")
    items = disagreements(ws, round_name)
    new_round = new_round or f"{round_name}-adj"
    if not items:
        return {"round": new_round, "pushed": 0, "already": 0, "rejected": 0, "disagreements": 0}
    notes = {d["item_id"]: "Annotators disagreed on " + ", ".join(d["fields"]) + ": " + "; ".join(
        f"{a}: {v['verdict']} / {v['answer']} / {v['knowledge_type']} / {v['search_label']}"
        for a, v in sorted(d["values"].items())) for d in items}
    res = push(ws, client, new_round, split=None, item_ids=list(notes), annotators=1, kind="adjudication",
               parent=round_name, notes=notes)
    return {"round": new_round, **res, "disagreements": len(items)}
