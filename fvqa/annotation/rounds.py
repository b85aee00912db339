"""Annotation rounds on the server: push items to Label Studio, pull every annotation back, adjudicate.

Each step is idempotent. `push` adds only items the round does not hold yet (checked against the
server, so a crash between import and bookkeeping never duplicates tasks); `pull` rewrites the
round's rows from one full export. Bad tasks and annotations never crash a pull: each lands in
`rejects` (stage `annotate`) with a fixed reason naming the field (shapes are checked in `parse`).
Decisions and `gold` live in `decide`.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from fvqa.annotation import configs, tables
from fvqa.annotation.client import LabelStudioClient
from fvqa.annotation.decide import STAGE, disagreements, superseded
from fvqa.annotation.parse import (
    Annotation,
    AnnotationProblem,
    Task,
    annotation_id,
    annotation_shape,
    as_id,
    cancelled,
    parse_manual,
    parse_review,
    show,
    task_shape,
)
from fvqa.errors import FvqaError
from fvqa.store import ImageError, Workspace, now
from fvqa.textgen import qa


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


def _check_round(row: dict[str, Any] | None, name: str, kind: str, prefill: bool | None) -> None:
    """Refuse a push a recorded round cannot take (before any server call)."""
    if row is not None:
        if row["kind"] != kind:
            raise FvqaError(f"round {name} is a {row['kind']} round, not {kind}: pick another round name")
        if prefill is not None and row.get("prefill") is not None and bool(row["prefill"]) != prefill:
            raise FvqaError(f"round {name} was pushed with prefill {'on' if row['prefill'] else 'off'}: push it "
                            "the same way (mixed modes would blur its agreement), or use a new round name")


def _lookup_project(client: LabelStudioClient, name: str, row: dict[str, Any] | None) -> int | None:
    """The round's project id if it exists on the server (recorded, or found by title); None if not.

    Read-only and server-only (no workspace access): `push` runs it beside its DuckDB work.
    """
    if row is None:
        return client.find_project(_title(name))
    if client.project_exists(int(row["project_id"])):
        return int(row["project_id"])
    raise FvqaError(f"the Label Studio project of round {name} (id {row['project_id']}) is gone from "
                    f"{client.conn.url}: use a new round name")


def _server_project(client: LabelStudioClient, found: int | None, ws_root: Path, name: str, kind: str,
                    label_config: str, annotators: int) -> tuple[int, bool]:
    """The round's project id (the one found, or a new one) and whether it is new."""
    if found is not None:
        return found, False
    desc = json.dumps({"fvqa_round": name, "kind": kind, "workspace": str(ws_root)})
    return client.create_project(_title(name), label_config, desc, annotators), True


def _record_round(ws: Workspace, client: LabelStudioClient, name: str, kind: str, pid: int, annotators: int,
                  split: str | None, parent: str | None, prefill: bool | None) -> None:
    ws.insert("annotation_rounds", [dict(round=name, kind=kind, project_id=pid, server_url=client.conn.url,
                                         split=split, annotators=annotators, parent_round=parent,
                                         created_at=now(), pulled_at=None, prefill=prefill)])


def _server_item_ids(client: LabelStudioClient, pid: int) -> dict[str, int]:
    """Item id -> task id of the project's tasks (tasks of any other shape are not fvqa's)."""
    out: dict[str, int] = {}
    for t in client.export_tasks(pid):
        data = t.get("data") if isinstance(t, dict) else None
        item, tid = (data.get("item_id"), as_id(t.get("id"))) if isinstance(data, dict) else (None, None)
        if isinstance(item, str) and item and tid is not None:
            out.setdefault(item, tid)
    return out


def _predictions(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The pipeline's values as a pre-annotation (only when the round pre-fills)."""
    result = []
    if row.get("knowledge_type") in configs.KNOWLEDGE_TYPES:
        result.append({"from_name": "knowledge_type", "to_name": "image", "type": "choices",
                       "value": {"choices": [row["knowledge_type"]]}})
    if row.get("search_label") in configs.SEARCH_NEEDS:
        result.append({"from_name": "search", "to_name": "image", "type": "choices",
                       "value": {"choices": [row["search_label"]]}})
    if row.get("question"):
        result.append({"from_name": "question", "to_name": "image", "type": "textarea",
                       "value": {"text": [row["question"]]}})
    if row.get("aliases"):
        result.append({"from_name": "aliases", "to_name": "image", "type": "textarea",
                       "value": {"text": list(row["aliases"])}})
    return [{"model_version": "fvqa-pipeline", "result": result}] if result else []


_PUSH_SQL = f"""
SELECT d.item_id, d.source, d.question, d.answer, d.aliases, d.image_sha256, d.image_ext, d.knowledge_type,
       d.search_label, d.entity_text, COALESCE(d.page_url, k1.page_url, k2.page_url) AS page_url,
       COALESCE(d.page_title, k1.page_title, k2.page_title) AS page_title,
       left(COALESCE(k1.page_text, k2.page_text), {qa.MAX_PAGE_CHARS}) AS passage
FROM dataset d
LEFT JOIN crawled k1 ON d.source = 'metaclip' AND starts_with(k1.concept_id, 'metaclip-')
                        AND k1.concept_id = d.item_id
LEFT JOIN crawled k2 ON d.source = 'metaclip' AND NOT starts_with(k2.concept_id, 'metaclip-')
                        AND 'metaclip-' || k2.concept_id = d.item_id
"""
"""Items with their evidence. A generated item's passage is its crawled page text cut where
generation cut it (`qa.MAX_PAGE_CHARS`); its id is `metaclip-<concept id>` (`generate.item_id`)."""


def _source_html(url: str | None, title: str | None) -> str:
    """A link to the source page (http(s) only: a task is HTML in the annotator's browser)."""
    if url and httpx.URL(url).scheme in ("http", "https"):
        return (f'<a href="{html.escape(url, quote=True)}" target="_blank" rel="noopener noreferrer">'
                f"{html.escape(title or url)}</a> <small>({html.escape(url)})</small>")
    shown = html.escape(title) if title else "no source page recorded"
    return f"<span>{shown}</span>" + (f" <small>(not a web link: {html.escape(url)})</small>" if url else "")


def task_data(r: dict[str, Any], image: str, round_name: str, *, prefill: bool, note: str = "") -> dict[str, Any]:
    """One review task's data: what the annotator sees (see `configs.review_config`).

    Without pre-fill the pipeline's knowledge type and search label are not shown at all (not
    even as text), so the annotator's labels are their own.
    """
    aliases = [a for a in (r.get("aliases") or []) if isinstance(a, str)]
    context = f"source {r['source']}"
    if prefill:
        context += (f" | pipeline knowledge type {r['knowledge_type'] or '-'} | "
                    f"pipeline search label {r['search_label'] or '-'}")
    passage = r.get("passage") or (f"InfoSeek entity: {r['entity_text']}" if r.get("entity_text") else "")
    return {"item_id": r["item_id"], "fvqa_round": round_name, "image": image,
            "question": r["question"], "answer": r["answer"], "answer_text": f"Proposed answer: {r['answer']}",
            "aliases": aliases, "aliases_text": "Accepted answers: " + (" | ".join(aliases) or "-"),
            "context": context + (f"\n{note}" if note else ""),
            "page_url": r.get("page_url") or "", "page_title": r.get("page_title") or "",
            "source_html": _source_html(r.get("page_url"), r.get("page_title")),
            "passage": passage or "(no passage recorded for this item)"}


def push(ws: Workspace, client: LabelStudioClient, round_name: str, *, split: str | None = "test",
         sample: int | None = None, annotators: int = 2, item_ids: list[str] | None = None,
         kind: str = "review", parent: str | None = None, notes: dict[str, str] | None = None,
         seed: int = 0, prefill: bool | None = None) -> dict[str, int]:
    """Push dataset items (a split, optionally a stable sample of it) as review tasks; only new ones.

    `prefill` pre-fills each task with the pipeline's labels, question and aliases (predictions);
    None: the round's recorded mode, off for a new round. The mode is recorded on the round.
    """
    tables.ensure(ws)
    root = _document_root(client, ws)
    row = tables.round_row(ws, round_name)
    if prefill is None:  # a round from before the switch (NULL) was always pre-filled
        prefill = bool(row and row.get("prefill") in (None, True))
    _check_round(row, round_name, kind, prefill)
    # Server round trips overlap local work: the project is looked up while the items are read, created
    # while the tasks are built and encoded, and the image storage is attached while they are imported.
    # DuckDB stays on this thread (one connection is not shared across threads).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fvqa-push") as pool:
        lookup = pool.submit(_lookup_project, client, round_name, row)
        where, params = ("WHERE d.split = ?", [split]) if split and item_ids is None else ("", [])
        cur = ws.con.execute(_PUSH_SQL + where, params)
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
        project = pool.submit(lambda: _server_project(client, lookup.result(), ws.root, round_name, kind,
                                                      configs.review_config(prefill), annotators))
        no_image, built = [], []
        for r in rows:
            if not r["image_sha256"] or not r["image_ext"]:
                no_image.append(r["item_id"])
                continue
            data = task_data(r, _image_url(root, ws, r["image_sha256"], r["image_ext"]), round_name,
                             prefill=prefill, note=(notes or {}).get(r["item_id"], ""))
            built.append((r["item_id"], {"data": data, "predictions": _predictions(r) if prefill else []}))
        bodies = client.encode_tasks([t for _, t in built])  # right for a new project (nothing on it yet)
        pid, created = project.result()
        storage = pool.submit(client.attach_local_storage, pid, ws.root / "images", new_project=created)
        if row is None:
            _record_round(ws, client, round_name, kind, pid, annotators, split, parent, prefill)
        on_server = {} if created else _server_item_ids(client, pid)
        known = {r[0] for r in ws.execute("SELECT item_id FROM annotation_tasks WHERE round = ?", [round_name])}
        # tasks on the server but not in our table (crash after import): record, never import twice
        ws.insert("annotation_tasks", [dict(round=round_name, item_id=i, task_id=t, project_id=pid, pushed_at=now())
                                       for i, t in on_server.items() if i not in known])
        rejects = [(STAGE, f"{round_name}/{i}", "no_image", "item has no image to review")
                   for i in no_image if i not in on_server]
        if on_server:
            built = [(i, t) for i, t in built if i not in on_server]
            bodies = client.encode_tasks([t for _, t in built])
        todo = [i for i, _ in built]
        ids = client.import_encoded(pid, bodies) if built else []
        if len(ids) != len(todo):  # fall back to the server's own mapping
            mapping = _server_item_ids(client, pid)
            ids = [mapping.get(i, -1) for i in todo]
        with ws.transaction():
            ws.insert("annotation_tasks", [dict(round=round_name, item_id=i, task_id=t, project_id=pid,
                                                pushed_at=now()) for i, t in zip(todo, ids, strict=True)])
            ws.add_rejects(rejects)
        storage.result()  # the tasks are recorded first: a failed attach is retried by the next push
    return {"project_id": pid, "pushed": len(todo), "already": len(on_server), "rejected": len(rejects),
            "prefill": prefill}


def create_manual(ws: Workspace, client: LabelStudioClient, round_name: str, *, annotators: int = 1) -> int:
    """A project for writing new items: annotators upload images in the UI and write question + answer."""
    tables.ensure(ws)
    row = tables.round_row(ws, round_name)
    _check_round(row, round_name, "manual", None)
    pid, _ = _server_project(client, _lookup_project(client, round_name, row), ws.root, round_name, "manual",
                             configs.manual_config(), annotators)
    if row is None:
        _record_round(ws, client, round_name, "manual", pid, annotators, "manual", None, None)
    return pid


def pull(ws: Workspace, client: LabelStudioClient, round_name: str) -> dict[str, Any]:
    """Store every annotation of a round as a row (replacing the round's previous pull).

    Each annotation of a readable task ends in exactly one place, and the counts say so
    (`annotations_in == annotations + annotations_rejected + skipped`): a stored row, a reject
    (stage `annotate`, a fixed reason naming the field, the first copy of a duplicated annotation id
    kept) or a skip with a reason (cancelled in Label Studio). A task that cannot be read at all is
    one reject. An annotation without `completed_by` is its own annotator, `anonymous:<annotation
    id>`, never merged with another. Re-annotations of an item by the same annotator are all
    stored; the latest counts (see `decide`) and the superseded ones are counted.
    """
    tables.ensure(ws)
    rnd = tables.round_row(ws, round_name)
    if rnd is None:
        raise FvqaError(f"unknown round {round_name}: push it first (`fvqa annotate push --round {round_name}`)")
    pid = int(rnd["project_id"])
    if not client.project_exists(pid):
        raise FvqaError(f"the Label Studio project of round {round_name} (id {pid}) is gone from {client.conn.url}")
    exported = client.export_tasks(pid)
    users = client.user_emails(refresh=True)
    ctx = _PullContext(ws, client, round_name, pid, rnd["kind"] == "manual", ws.keys("items", "item_id"),
                       dict(ws.execute("SELECT task_id, item_id FROM annotation_tasks WHERE round = ?", [round_name])),
                       users, now())
    rows: list[dict[str, Any]] = []
    task_rejects: list[tuple[str, str, str, str]] = []
    ann_rejects: list[tuple[str, str, str, str]] = []
    skipped: Counter[str] = Counter()
    seen_tasks: set[int] = set()
    seen_annotations: dict[int, int] = {}  # annotation id -> task id of its first copy
    annotations_in = 0
    for pos, raw in enumerate(exported):
        tid = as_id(raw.get("id")) if isinstance(raw, dict) else None
        try:
            if tid is not None and tid in seen_tasks:
                n = len(raw["annotations"]) if isinstance(raw.get("annotations"), list) else 0
                raise AnnotationProblem("duplicate_id", f"task id again at position {pos}: the first copy is used, "
                                                             f"the {n} annotations of this one are not read")
            task = task_shape(raw)
        except AnnotationProblem as exc:
            key = f"{round_name}/task {tid}" if tid is not None else f"{round_name}/task #{pos}"
            task_rejects.append((STAGE, key, exc.reason, exc.detail))
            if tid is not None:
                seen_tasks.add(tid)  # it exists on the server: not deleted
            continue
        seen_tasks.add(task.id)
        for apos, ann in enumerate(task.annotations):
            annotations_in += 1
            key = f"{round_name}/task {task.id}/annotation #{apos}"
            try:
                aid = annotation_id(ann)
                key = f"{round_name}/task {task.id}/annotation {aid}"
                if aid in seen_annotations:
                    raise AnnotationProblem("duplicate_id", f"annotation id first seen in task {seen_annotations[aid]}: "
                                                                       "that copy is used, this one ignored")
                seen_annotations[aid] = task.id
                if cancelled(ann):
                    skipped["cancelled in Label Studio"] += 1
                    continue
                rows.append(ctx.row(task, annotation_shape(ann, aid)))
            except AnnotationProblem as exc:
                result = ann.get("result") if isinstance(ann, dict) else None
                ann_rejects.append((STAGE, key, exc.reason, exc.detail or show(result, 2000)))
    deleted = [(STAGE, f"{round_name}/task {tid}", "task_deleted",
                f"item {item_id}: push the round again to re-create it")
               for tid, item_id in ctx.pushed.items() if tid not in seen_tasks]
    rejects = task_rejects + ann_rejects + deleted
    with ws.transaction():
        ws.execute("DELETE FROM annotations WHERE round = ?", [round_name])
        ws.execute("DELETE FROM rejects WHERE stage = ? AND starts_with(key, ?)", [STAGE, f"{round_name}/task "])
        if rows:
            ws.insert("annotations", _complete(rows))
        ws.add_rejects(rejects)
        ws.execute("UPDATE annotation_rounds SET pulled_at = ? WHERE round = ?", [ctx.pulled_at, round_name])
    old, changed = (0, 0) if ctx.manual else superseded(rows)
    return {"tasks": len(exported), "tasks_rejected": len(task_rejects), "tasks_deleted": len(deleted),
            "annotations_in": annotations_in, "annotations": len(rows), "annotations_rejected": len(ann_rejects),
            "skipped": sum(skipped.values()), "skipped_reasons": dict(skipped),
            "anonymous": sum(1 for r in rows if r["annotator_id"] is None),
            "superseded": old, "superseded_changed": changed,
            "rejected": len(rejects), "reasons": dict(Counter(r[2] for r in rejects))}


@dataclass
class _PullContext:
    """What turning one exported annotation into a row needs."""

    ws: Workspace
    client: LabelStudioClient
    round_name: str
    project_id: int
    manual: bool
    items: set[str]
    pushed: dict[int, str]
    users: dict[int, str]
    pulled_at: datetime

    def row(self, task: Task, ann: Annotation) -> dict[str, Any]:
        """The `annotations` row of one annotation; raises AnnotationProblem for anything unusable."""
        data = task.data
        if not isinstance(data, dict):
            raise AnnotationProblem("wrong_type", f"task data is not an object: {show(data)}")
        if self.manual:
            fields = parse_manual(ann.result)
            fields["image_sha256"] = _store_image(self.ws, self.client, data.get("image"))
            item_id = f"manual-{self.round_name}-{ann.id}"
        else:
            item_id = data.get("item_id")
            if item_id is None:
                raise AnnotationProblem("field_missing", "task has no item_id in its data (not pushed by fvqa?)")
            if not isinstance(item_id, str) or not item_id:
                raise AnnotationProblem("wrong_type", f"task item_id is not a string: {show(item_id)}")
            if task.id in self.pushed and self.pushed[task.id] != item_id:
                raise AnnotationProblem("item_id_mismatch",
                                        f"{show(item_id)}, pushed as {self.pushed[task.id]}")
            if item_id not in self.items:
                raise AnnotationProblem("item_gone", show(item_id))
            proposed = data.get("answer")
            if proposed is not None and not isinstance(proposed, str):
                raise AnnotationProblem("wrong_type", f"task answer is not a string: {show(proposed)}")
            question, aliases = data.get("question"), data.get("aliases")
            if question is not None and not isinstance(question, str):
                raise AnnotationProblem("wrong_type", f"task question is not a string: {show(question)}")
            if aliases is not None and not (isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
                raise AnnotationProblem("wrong_type", f"task aliases is not a list of strings: {show(aliases)}")
            fields = parse_review(ann.result, proposed, question=question, aliases=aliases)
        if ann.user_id is None:
            annotator = f"anonymous:{ann.id}"  # never merged with another anonymous annotation
        else:
            annotator = self.users.get(ann.user_id) or ann.user_email or f"user-{ann.user_id}"
        return dict(round=self.round_name, annotation_id=ann.id, task_id=task.id, project_id=self.project_id,
                    item_id=item_id, annotator=annotator, annotator_id=ann.user_id, lead_time=ann.lead_time,
                    created_at=ann.created_at, updated_at=ann.updated_at, pulled_at=self.pulled_at, **fields)


_COLUMNS = ("verdict", "answer", "proposed_answer", "knowledge_type", "search_label", "comment", "question",
            "aliases", "image_sha256", "proposed_question", "proposed_aliases")


def _complete(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{c: r.get(c) for c in _COLUMNS} | r for r in rows]


def _store_image(ws: Workspace, client: LabelStudioClient, url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise AnnotationProblem("field_missing", "written item has no image")
    try:
        return ws.put_image(client.download(url), provenance={"stage": "annotate", "url": url}).sha256
    except FvqaError as exc:
        raise AnnotationProblem("image_unavailable", str(exc)) from exc
    except ImageError as exc:
        raise AnnotationProblem("image_unusable", str(exc)) from exc


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
    def edits(v: dict[str, Any]) -> str:
        out = (f" / question: {v['question']}" if v.get("question") else "") + (
            f" / aliases: {' | '.join(v['aliases'])}" if v.get("aliases") else "")
        return out

    notes = {d["item_id"]: "Annotators disagreed on " + ", ".join(d["fields"]) + ": " + "; ".join(
        f"{a}: {v['verdict']} / {v['answer']} / {v['knowledge_type']} / {v['search_label']}{edits(v)}"
        for a, v in sorted(d["values"].items())) for d in items}
    res = push(ws, client, new_round, split=None, item_ids=list(notes), annotators=1, kind="adjudication",
               parent=round_name, notes=notes, prefill=bool(rnd.get("prefill")))
    return {"round": new_round, **res, "disagreements": len(items)}
