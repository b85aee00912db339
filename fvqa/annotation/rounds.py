"""Annotation rounds: push items to Label Studio, pull every annotation back, adjudicate, apply to gold.

Each step is idempotent. `push` adds only items the round does not hold yet (checked against the
server, so a crash between import and bookkeeping never duplicates tasks); `pull` rewrites the
round's rows from one full export; `apply` upserts `gold`, which pipelines never write.
Bad annotations never crash a pull: each lands in `rejects` (stage `annotate`) with a reason.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvqa.annotation import configs, tables
from fvqa.annotation.agreement import field_agreement
from fvqa.annotation.client import LabelStudioClient
from fvqa.errors import FvqaError
from fvqa.eval.metrics import normalize_answer
from fvqa.store import ImageError, Workspace, now

STAGE = "annotate"
FIELDS = ("verdict", "answer", "knowledge_type", "search_label")


class AnnotationProblem(ValueError):
    """An annotation that cannot be used (the message becomes the reject reason)."""


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


# -- parsing -----------------------------------------------------------------------------------
def _values(result: list[dict[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for region in result or []:
        if not isinstance(region, dict):
            continue
        value = region.get("value") or {}
        name = region.get("from_name")
        if "choices" in value:
            out[name] = list(value["choices"])
        elif "text" in value:
            text = value["text"]
            out[name] = [t for t in (text if isinstance(text, list) else [text]) if isinstance(t, str)]
    return out


def _one_choice(values: dict[str, list[Any]], name: str, allowed: tuple[str, ...], required: bool) -> str | None:
    got = values.get(name) or []
    if not got:
        if required:
            raise AnnotationProblem(f"annotation has no {name}")
        return None
    if len(got) != 1 or got[0] not in allowed:
        raise AnnotationProblem(f"unknown {name} value {got!r} (expected one of {', '.join(allowed)})")
    return str(got[0])


def _text(values: dict[str, list[Any]], name: str) -> str | None:
    text = "\n".join(v for v in values.get(name) or [] if v).strip()
    return text or None


def parse_review(result: list[dict[str, Any]], proposed: str | None) -> dict[str, Any]:
    """Fields of one review annotation; raises AnnotationProblem for anything unusable."""
    v = _values(result)
    verdict = _one_choice(v, "verdict", configs.VERDICTS, True)
    corrected = _text(v, "answer")
    if verdict == "fix" and not corrected:
        raise AnnotationProblem("verdict fix without a corrected answer")
    return {"verdict": verdict, "answer": corrected if verdict == "fix" else None,
            "knowledge_type": _one_choice(v, "knowledge_type", configs.KNOWLEDGE_TYPES, False),
            "search_label": _one_choice(v, "search", configs.SEARCH_NEEDS, False),
            "comment": _text(v, "comment"), "proposed_answer": proposed}


def parse_manual(result: list[dict[str, Any]]) -> dict[str, Any]:
    """Fields of one written item; raises AnnotationProblem for anything unusable."""
    v = _values(result)
    question, answer = _text(v, "question"), _text(v, "answer")
    if not question:
        raise AnnotationProblem("written item has no question")
    if not answer:
        raise AnnotationProblem("written item has no answer")
    aliases = [a.strip() for a in (_text(v, "aliases") or "").splitlines() if a.strip()]
    return {"verdict": "manual", "question": question, "answer": answer, "aliases": aliases or None,
            "knowledge_type": _one_choice(v, "knowledge_type", configs.KNOWLEDGE_TYPES, True)}


# -- pull --------------------------------------------------------------------------------------
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
    return {"tasks": len(exported), "annotations": len(rows), "rejected": len(rejects)}


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


# -- decisions, agreement ----------------------------------------------------------------------
def _rows(ws: Workspace, round_name: str) -> list[dict[str, Any]]:
    cur = ws.con.execute("SELECT * FROM annotations WHERE round = ? ORDER BY annotation_id", [round_name])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def final_answer(row: dict[str, Any]) -> str:
    """The answer an annotation stands for, normalised: keep -> proposed, fix -> corrected."""
    if row["verdict"] == "reject":
        return "<rejected>"
    text = row["answer"] if row["verdict"] == "fix" else row["proposed_answer"]
    return normalize_answer(text or "")


def _field(row: dict[str, Any], name: str) -> Any:
    return final_answer(row) if name == "answer" else row[name]


def _latest_per_annotator(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    by_item: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:  # ordered by annotation id: a later annotation by the same person wins
        by_item[r["item_id"]][r["annotator"]] = r
    return by_item


@dataclass
class RoundSummary:
    """What `fvqa annotate status` shows for one round."""

    round: str
    kind: str
    tasks: int
    annotated: int
    pending: int
    by_annotator: dict[str, int]
    agreement: dict[str, tuple[str, float, int]] = field(default_factory=dict)
    disagreements: list[dict[str, Any]] = field(default_factory=list)


def disagreements(ws: Workspace, round_name: str) -> list[dict[str, Any]]:
    """Items whose annotators differ on any field (an empty optional field differs from nothing)."""
    out = []
    for item, per in sorted(_latest_per_annotator(_rows(ws, round_name)).items()):
        if len(per) < 2:
            continue
        fields = [f for f in FIELDS if len({v for r in per.values() if (v := _field(r, f)) is not None}) > 1]
        if fields:
            out.append({"item_id": item, "fields": fields,
                        "values": {a: {f: _field(r, f) for f in FIELDS} for a, r in per.items()}})
    return out


def summarize(ws: Workspace, round_name: str) -> RoundSummary:
    """Counts, agreement per field and disagreements of one round."""
    rnd = tables.round_row(ws, round_name)
    if rnd is None:
        raise FvqaError(f"unknown round {round_name}")
    rows = _rows(ws, round_name)
    per_item = _latest_per_annotator(rows)
    if rnd["kind"] == "manual":
        tasks = len({r["task_id"] for r in rows})
    else:
        tasks = ws.execute("SELECT count(*) FROM annotation_tasks WHERE round = ?", [round_name])[0][0]
    target = int(rnd["annotators"] or 1)
    done_items = sum(1 for per in per_item.values() if len(per) >= target)
    summary = RoundSummary(round=round_name, kind=rnd["kind"], tasks=int(tasks), annotated=len(per_item),
                           pending=max(int(tasks) - done_items, 0),
                           by_annotator=dict(Counter(r["annotator"] for r in rows)))
    if rnd["kind"] != "manual":
        for f in FIELDS:
            # optional fields left empty are missing values (not a label of their own), as in apply()
            labels = {item: {a: v for a, r in per.items() if (v := _field(r, f)) is not None}
                      for item, per in per_item.items()}
            summary.agreement[f] = field_agreement(labels)
        summary.disagreements = disagreements(ws, round_name)
    return summary


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


# -- apply -------------------------------------------------------------------------------------
def _consensus(values: list[Any]) -> tuple[bool, Any]:
    present = {v for v in values if v is not None}
    if len(present) > 1:
        return False, None
    return True, next(iter(present), None)


def apply(ws: Workspace, round_name: str) -> dict[str, int]:
    """Merge a pulled round into `gold` (with provenance): consensus items, or the adjudicator's word."""
    rnd = tables.round_row(ws, round_name)
    if rnd is None:
        raise FvqaError(f"unknown round {round_name}")
    rows = _rows(ws, round_name)
    if not rows:
        raise FvqaError(f"round {round_name} has no pulled annotations: run `fvqa annotate pull --round {round_name}`")
    if rnd["kind"] == "manual":
        return _apply_manual(ws, round_name, rows)
    target = 1 if rnd["kind"] == "adjudication" else int(rnd["annotators"] or 1)
    counts: Counter[str] = Counter()
    gold = []
    for item, per in _latest_per_annotator(rows).items():
        anns = list(per.values())
        if rnd["kind"] == "adjudication":
            anns = [max(anns, key=lambda r: r["annotation_id"])]
        if len(anns) < target:
            counts["pending"] += 1
            continue
        agree_v, verdict = _consensus([r["verdict"] for r in anns])
        agree_a, _ = _consensus([final_answer(r) for r in anns])
        agree_k, kt = _consensus([r["knowledge_type"] for r in anns])
        agree_s, sl = _consensus([r["search_label"] for r in anns])
        if not (agree_v and agree_a and agree_k and agree_s):
            counts["disagreement"] += 1
            continue
        first = anns[0]
        answer = None if verdict == "reject" else (first["answer"] if verdict == "fix" else first["proposed_answer"])
        status = {"keep": "kept", "fix": "fixed", "reject": "rejected"}[verdict]
        counts[status] += 1
        gold.append(dict(
            item_id=item, status=status, answer=answer, aliases=[answer] if verdict == "fix" else None,
            knowledge_type=kt, search_label=sl, round=round_name,
            provenance=json.dumps({"stage": "annotate", "round": round_name, "kind": rnd["kind"],
                                   "annotators": sorted(per), "annotation_ids": [r["annotation_id"] for r in anns],
                                   "task_id": first["task_id"], "project_id": first["project_id"],
                                   "server": rnd["server_url"], "comments": [r["comment"] for r in anns if r["comment"]],
                                   "time": now().isoformat()})))
    missing = ws.keys("items", "item_id")
    rejects = [(STAGE, f"{round_name}/{g['item_id']}", "item no longer in the workspace", "not applied")
               for g in gold if g["item_id"] not in missing]
    gold = [g for g in gold if g["item_id"] in missing]
    with ws.transaction():
        ws.insert("gold", gold, replace=True)
        ws.add_rejects(rejects)
    return dict(counts) | {"applied": len(gold)}


def _apply_manual(ws: Workspace, round_name: str, rows: list[dict[str, Any]]) -> dict[str, int]:
    items, tags, gold = [], [], []
    for r in rows:
        prov = json.dumps({"stage": "annotate", "round": round_name, "annotator": r["annotator"],
                           "annotation_id": r["annotation_id"], "task_id": r["task_id"], "time": now().isoformat()})
        items.append(dict(item_id=r["item_id"], source="manual", question=r["question"], answer=r["answer"],
                          aliases=r["aliases"], image_sha256=r["image_sha256"],
                          provenance=json.dumps({"manual": json.loads(prov)})))
        tags.append(dict(item_id=r["item_id"], knowledge_type=r["knowledge_type"], confidence=1.0, provenance=prov))
        gold.append(dict(item_id=r["item_id"], status="manual", answer=r["answer"], aliases=r["aliases"],
                         knowledge_type=r["knowledge_type"], search_label=None, round=round_name, provenance=prov))
    with ws.transaction():
        ws.insert("items", items, replace=True)
        ws.insert("tags", tags, replace=True)
        ws.insert("gold", gold, replace=True)
    return {"manual": len(items), "applied": len(items)}
