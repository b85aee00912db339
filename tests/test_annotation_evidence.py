"""Review tasks that help annotators, through a real Label Studio server and its SDK: the evidence an
item came from (source page link, title, passage), pre-fill off by default, and question / alias
edits carried by `apply` into `gold` with provenance."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.ls_server import LiveServer, ls_server  # noqa: F401  (session fixture)
from support.paths import FVQA, REPO
from test_annotation import _annotate, _choice, _client, _png, _text, _user

from fvqa.annotation import tables
from fvqa.annotation.client import LabelStudioClient
from fvqa.annotation.decide import apply, summarize
from fvqa.annotation.rounds import adjudicate, pull, push
from fvqa.errors import FvqaError
from fvqa.store import Workspace
from fvqa.textgen.qa import MAX_PAGE_CHARS

pytestmark = pytest.mark.slow

LONG_PAGE = "The Eiffel Tower is a wrought-iron lattice tower in Paris. " * 80  # longer than generation reads
PAGES = {  # item id -> (page url, page title, crawled concept id, page text)
    "metaclip-c0": ("https://en.wikipedia.org/wiki/Eiffel_Tower", "Eiffel Tower", "c0", LONG_PAGE),
    "metaclip-c1": ("https://en.wikipedia.org/wiki/Louvre", "Louvre <museum>", "metaclip-c1",
                    "The Louvre is the world's most-visited museum."),
    "metaclip-c2": ("javascript:alert(1)", "<script>alert(1)</script>", "c2", "A page with a hostile link."),
    "metaclip-c3": ("https://en.wikipedia.org/wiki/Notre-Dame", "Notre-Dame", "c3", "Notre-Dame de Paris."),
}


def evidence_workspace(root: Path) -> Workspace:
    """Four generated items with crawled pages (as `generate` leaves them) and one InfoSeek item."""
    ws = Workspace(root)
    images, items, tags, labels, splits, crawled = [], [], [], [], [], []
    ids = [*PAGES, "infoseek-q1"]
    for i, iid in enumerate(ids):
        data = _png(1000 + i)
        sha = hashlib.sha256(data).hexdigest()
        path = ws.image_path(sha, "png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        images.append(dict(sha256=sha, ext="png", width=8, height=8, n_bytes=len(data), provenance="{}"))
        url, title, concept, text = PAGES.get(iid, (None, None, None, None))
        items.append(dict(item_id=iid, source="infoseek" if iid.startswith("infoseek") else "metaclip",
                          question=f"What landmark is shown in picture {i}?", answer=f"Landmark {i}",
                          aliases=[f"Landmark {i}", f"L{i}"], image_sha256=sha, page_url=url, page_title=title,
                          entity_text="Q243 Eiffel Tower" if concept is None else None, provenance="{}"))
        if concept is not None:
            crawled.append(dict(concept_id=concept, image_sha256=sha, page_url=url, page_title=title,
                                page_text=text, provenance="{}"))
        tags.append(dict(item_id=iid, knowledge_type="Place", provenance="{}"))
        labels.append(dict(item_id=iid, search_label="text_search_required", provenance="{}"))
        splits.append(dict(item_id=iid, split="test", provenance="{}"))
    for table, rows in (("images", images), ("items", items), ("tags", tags), ("labels", labels),
                        ("splits", splits), ("crawled", crawled)):
        ws.insert(table, rows)
    return ws


def _tasks(client: LabelStudioClient, pid: int) -> dict[str, dict[str, Any]]:
    return {t["data"]["item_id"]: t for t in client.export_tasks(pid)}


def _predicted(client: LabelStudioClient, task_id: int) -> dict[str, Any]:
    """The pre-annotation values of a task as the SDK returns them (control name -> value)."""
    out: dict[str, Any] = {}
    for p in client.sdk.predictions.list(task=task_id):
        for region in p.result or []:
            out[region["from_name"]] = region["value"]
    return out


def test_review_tasks_show_evidence_and_are_not_prefilled(ls_server: LiveServer,  # noqa: F811
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    ws = evidence_workspace(tmp_path_factory.mktemp("ev") / "ws")
    client = _client(ls_server)
    res = push(ws, client, "ev", annotators=1)
    assert (res["pushed"], res["prefill"]) == (5, False)
    assert tables.round_row(ws, "ev")["prefill"] is False, "the round records its mode"
    config = client.sdk.projects.get(res["project_id"]).label_config
    assert '<HyperText name="source" value="$source_html"' in config and '<Text name="passage"' in config
    assert 'clickableLinks="true"' in config, "the source link opens from the task"
    assert "Corrected question (leave empty if fine)" in config and '<TextArea name="aliases"' in config

    tasks = _tasks(client, res["project_id"])
    eiffel = tasks["metaclip-c0"]["data"]
    assert eiffel["page_url"] == "https://en.wikipedia.org/wiki/Eiffel_Tower" and eiffel["page_title"] == "Eiffel Tower"
    assert ('<a href="https://en.wikipedia.org/wiki/Eiffel_Tower" target="_blank" rel="noopener noreferrer">'
            "Eiffel Tower</a>") in eiffel["source_html"]
    assert eiffel["passage"] == LONG_PAGE[:MAX_PAGE_CHARS], "the passage generation read, cut where it cut"
    assert eiffel["aliases"] == ["Landmark 0", "L0"] and "Landmark 0 | L0" in eiffel["aliases_text"]
    louvre = tasks["metaclip-c1"]["data"]  # a concept id that already carries the item prefix
    assert louvre["passage"] == PAGES["metaclip-c1"][3] and "Louvre &lt;museum&gt;</a>" in louvre["source_html"]
    hostile = tasks["metaclip-c2"]["data"]["source_html"]
    assert "<a " not in hostile and "<script>" not in hostile and "&lt;script&gt;" in hostile
    assert tasks["infoseek-q1"]["data"]["passage"] == "InfoSeek entity: Q243 Eiffel Tower"
    assert tasks["infoseek-q1"]["data"]["source_html"] == "<span>no source page recorded</span>"

    for item, task in tasks.items():
        assert task["predictions"] == [] and _predicted(client, task["id"]) == {}, item
        assert "pipeline knowledge type" not in task["data"]["context"], "no pipeline label shown as text either"
    # what the annotator's browser loads: the task with its evidence, served by Label Studio itself
    page = client.sdk.tasks.get(tasks["metaclip-c0"]["id"])
    assert page.data["passage"] == eiffel["passage"] and page.data["source_html"] == eiffel["source_html"]
    with pytest.raises(FvqaError, match="was pushed with prefill off"):
        push(ws, client, "ev", annotators=1, prefill=True)
    ws.close()


def test_prefill_on_fills_predictions_and_is_recorded(ls_server: LiveServer, tmp_path: Path) -> None:  # noqa: F811
    ws = evidence_workspace(tmp_path / "ws")
    ws.close()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"workspace: {tmp_path / 'ws'}\nannotate:\n  prefill: true\n")
    env = {**os.environ, "FVQA_LS_API_KEY": ls_server.api_key}
    pushed = subprocess.run([*FVQA, "annotate", "push", "--round", "pf", "--config", str(cfg), "--annotators", "1",
                             "--url", ls_server.url, "--document-root", str(ls_server.document_root)],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed 5" in pushed.stdout and "prefill on" in pushed.stdout
    ws = Workspace(tmp_path / "ws")
    client = _client(ls_server)
    rnd = tables.round_row(ws, "pf")
    assert rnd["prefill"] is True
    config = client.sdk.projects.get(int(rnd["project_id"])).label_config
    assert "Question (pre-filled with the current one: edit it if wrong)" in config
    tasks = _tasks(client, int(rnd["project_id"]))
    assert all(t["predictions"] for t in tasks.values())
    got = _predicted(client, tasks["metaclip-c0"]["id"])
    assert got == {"knowledge_type": {"choices": ["Place"]}, "search": {"choices": ["text_search_required"]},
                   "question": {"text": ["What landmark is shown in picture 0?"]},
                   "aliases": {"text": ["Landmark 0", "L0"]}}
    assert "pipeline knowledge type Place" in tasks["metaclip-c0"]["data"]["context"]

    # an annotator who submits the pre-filled values unchanged edited nothing
    me = _user(client, "prefilled")
    _annotate(client, tasks["metaclip-c0"]["id"], me, _choice("verdict", "keep"), _choice("knowledge_type", "Place"),
              _text("question", "What landmark is shown in  picture 0?"), _text("aliases", "Landmark 0\nL0"))
    pull(ws, client, "pf")
    assert apply(ws, "pf") == {"kept": 1, "applied": 1}
    question, aliases, prov = ws.execute("SELECT question, aliases, provenance FROM gold")[0]
    assert question is None and aliases is None
    assert json.loads(prov)["prefill"] is True and json.loads(prov)["edits"] == {}
    ws.close()
    shown = subprocess.run([*FVQA, "annotate", "status", "--workspace", str(tmp_path / "ws")], capture_output=True,
                           text=True, cwd=REPO, env=env, timeout=120)
    assert shown.returncode == 0 and "prefill on" in shown.stdout, shown.stderr


def test_question_and_alias_edits_flow_into_gold(ls_server: LiveServer,  # noqa: F811
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    ws = evidence_workspace(tmp_path_factory.mktemp("ed") / "ws")
    client = _client(ls_server)
    push(ws, client, "ed", annotators=2)
    tasks = dict(ws.execute("SELECT item_id, task_id FROM annotation_tasks WHERE round = 'ed'"))
    a1, a2 = _user(client, "editor1"), _user(client, "editor2")
    keep, fix = _choice("verdict", "keep"), _choice("verdict", "fix")
    plan = {  # item: (annotator 1, annotator 2)
        # both rewrite the question the same way (whitespace aside)
        "metaclip-c0": ([keep, _text("question", "Which tower is shown in this photo?")],
                        [keep, _text("question", " Which tower is shown  in this photo?")]),
        # both fix the answer and give the same alias list (order and case aside)
        "metaclip-c1": ([fix, _text("answer", "The Louvre"), _text("aliases", "The Louvre\nMusée du Louvre")],
                        [fix, _text("answer", "the louvre"), _text("aliases", "musée du louvre\nThe Louvre")]),
        # one adds aliases, the other leaves the field empty: an empty field is no opinion
        "metaclip-c2": ([keep, _text("aliases", "Landmark 2\nL2\nLM2")], [keep]),
        # different question rewrites: a disagreement for the adjudicator
        "metaclip-c3": ([keep, _text("question", "What cathedral is this?")],
                        [keep, _text("question", "Which church is shown?")]),
        "infoseek-q1": ([keep], [keep]),
    }
    for item, (r1, r2) in plan.items():
        _annotate(client, tasks[item], a1, *r1)
        _annotate(client, tasks[item], a2, *r2)
    counts = pull(ws, client, "ed")
    assert (counts["annotations"], counts["annotations_rejected"]) == (10, 0)
    row = ws.execute("SELECT question, proposed_question, aliases, proposed_aliases FROM annotations "
                     "WHERE item_id = 'metaclip-c1' ORDER BY annotation_id")[0]
    assert row == (None, "What landmark is shown in picture 1?", ["The Louvre", "Musée du Louvre"],
                   ["Landmark 1", "L1"])
    s = summarize(ws, "ed")
    assert s.prefill is False
    assert [(d["item_id"], d["fields"]) for d in s.disagreements] == [("metaclip-c3", ["question"])]

    assert apply(ws, "ed") == {"kept": 2, "fixed": 2, "disagreement": 1, "question_edited": 1,
                               "aliases_edited": 2, "applied": 4}
    gold = {r[0]: r[1:] for r in ws.execute("SELECT item_id, status, question, answer, aliases, provenance FROM gold")}
    status, question, answer, aliases, prov = gold["metaclip-c0"]
    assert (status, question, answer, aliases) == ("kept", "Which tower is shown in this photo?", "Landmark 0", None)
    edit = json.loads(prov)["edits"]["question"]
    assert edit["original"] == "What landmark is shown in picture 0?"
    assert edit["annotators"] == ["editor1@fvqa.test", "editor2@fvqa.test"] and json.loads(prov)["round"] == "ed"
    assert json.loads(prov)["prefill"] is False
    status, question, answer, aliases, prov = gold["metaclip-c1"]
    assert (status, answer, aliases) == ("fixed", "The Louvre", ["The Louvre", "Musée du Louvre"])
    assert json.loads(prov)["edits"]["aliases"]["original"] == ["Landmark 1", "L1"]
    status, _, answer, aliases, prov = gold["metaclip-c2"]
    assert (status, answer, aliases) == ("fixed", "Landmark 2", ["Landmark 2", "L2", "LM2"])
    assert json.loads(prov)["edits"]["aliases"]["annotators"] == ["editor1@fvqa.test"]
    assert gold["infoseek-q1"][:4] == ("kept", None, "Landmark 4", None)
    asked = dict(ws.execute("SELECT item_id, question FROM dataset"))
    assert asked["metaclip-c0"] == "Which tower is shown in this photo?", "the reviewed question is the dataset's"
    assert asked["metaclip-c1"] == "What landmark is shown in picture 1?"
    shown = dict(ws.execute("SELECT item_id, aliases FROM dataset"))
    assert shown["metaclip-c1"] == ["The Louvre", "Musée du Louvre"] and shown["metaclip-c2"] == ["Landmark 2", "L2",
                                                                                                  "LM2"]

    adj = adjudicate(ws, client, "ed")
    assert (adj["disagreements"], adj["pushed"]) == (1, 1)
    adj_task = _tasks(client, int(tables.round_row(ws, "ed-adj")["project_id"]))["metaclip-c3"]
    assert "question: Which church is shown?" in adj_task["data"]["context"]
    assert adj_task["data"]["passage"] == "Notre-Dame de Paris.", "the adjudicator sees the evidence too"
    senior = _user(client, "senior-editor")
    _annotate(client, adj_task["id"], senior, keep, _text("question", "Which cathedral is shown?"))
    pull(ws, client, "ed-adj")
    assert apply(ws, "ed-adj") == {"kept": 1, "question_edited": 1, "applied": 1}
    question, prov = ws.execute("SELECT question, provenance FROM gold WHERE item_id = 'metaclip-c3'")[0]
    assert question == "Which cathedral is shown?"
    assert json.loads(prov)["edits"]["question"]["annotators"] == ["senior-editor@fvqa.test"]
    ws.close()
