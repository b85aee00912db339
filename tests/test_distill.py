"""The distill stage (SFT cold start): teacher attempts through the rollout core, kept / rejected /
deferred, the balanced selection, resume after SIGKILL, the SFT export in veRL's multi-turn SFT
dataset (loss mask), and the scripted demo teacher on the demo world."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from support.distill_teacher import FAULTS, StubTools, distill_section, fill_workspace, teacher
from support.fake_openai import FakeOpenAI, Reply
from support.paths import REPO

from fvqa.config import RunConfig
from fvqa.pipelines.base import StageStats, execute_stage
from fvqa.pipelines.distill import REJECT_CODES, DistillStage
from fvqa.pipelines.distill_select import Candidate, search_pattern, select
from fvqa.store import Workspace

QUIET = Console(file=io.StringIO())
CHAT = "/v1/chat/completions"


def run_distill(ws: Workspace, config: RunConfig) -> StageStats:
    return execute_stage(DistillStage(), ws, config, QUIET)


def config_for(ws: Workspace, base_url: str, **extra: Any) -> RunConfig:
    return RunConfig.model_validate({"workspace": str(ws.root), "batch_size": 8,
                                     "distill": distill_section(base_url, **extra)})


@pytest.fixture(autouse=True)
def _faults_on():
    FAULTS.update(on=True, flaky_failed=False)
    yield


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> StubTools:
    import fvqa.search.tools

    tools = StubTools()
    monkeypatch.setattr(fvqa.search.tools, "make_search_tools", lambda *a, **kw: tools)
    return tools


# -- the selection rule --------------------------------------------------------------------------------
def test_search_pattern_names_what_ran():
    assert [search_pattern(i, t) for i, t in ((0, 0), (1, 0), (0, 2), (1, 1))] == ["none", "image", "text", "mixed"]


def test_selection_balances_labels_and_patterns_and_is_seeded():
    C = Candidate
    cands = [C(f"f{n}", a, "none", "search_free") for n in range(10) for a in range(2)]
    cands += [C("f0", 2, "image", "search_free")]  # a search-free item answered with a search
    cands += [C(f"i{n}", 0, "image", "image_search_required") for n in range(3)]
    cands += [C(f"m{n}", 0, p, "mixed_search_required") for n, p in enumerate(["mixed", "text", "text", "text"])]
    sel = select(cands, per_item=1, max_ratio=1.0)
    counts: dict[str, int] = {}
    for c in sel.kept:
        counts[c.search_label] = counts.get(c.search_label, 0) + 1
    assert counts == {"search_free": 3, "image_search_required": 3, "mixed_search_required": 3}
    assert [c for c in sel.mismatched] == [C("f0", 2, "image", "search_free")]
    assert len({c.item_id for c in sel.kept}) == len(sel.kept)  # one per item
    mixed = [c.search_pattern for c in sel.kept if c.search_label == "mixed_search_required"]
    assert "mixed" in mixed and "text" in mixed  # round-robin over the label's patterns
    again = select(list(reversed(cands)), per_item=1, max_ratio=1.0)
    assert again.kept == sel.kept  # input order does not matter
    other = select(cands, per_item=1, max_ratio=1.0, seed=1)
    assert {c.search_label for c in other.kept} == set(counts)
    loose = select(cands, per_item=2, max_ratio=None, label_rule="any")
    assert len(loose.kept) == 10 * 2 + 3 + 4 and not loose.mismatched


# -- the stage against a loopback OpenAI-compatible teacher ------------------------------------------
def test_distill_keeps_correct_valid_attempts_rejects_the_rest_and_defers_a_500(tmp_path: Path, stub: StubTools):
    kinds = ["free", "free", "image", "text", "mixed", "wrong", "malformed", "searchy", "flaky"]
    with Workspace(tmp_path / "ws") as ws, FakeOpenAI(teacher) as srv:
        made = fill_workspace(ws, kinds)
        ids = {k: i for k, i in reversed(list(zip(kinds, made, strict=True)))}  # first item of each kind
        ids["free2"] = made[1]
        config = config_for(ws, srv.base_url)
        first = run_distill(ws, config)
        attempts = {(r[0], r[1]): r[2:] for r in ws.execute(
            "SELECT item_id, attempt, correct, format_valid, search_pattern, reject_code, teacher, trajectory "
            "FROM distill_attempts")}
        rejects = dict(ws.execute("SELECT key, reason FROM rejects WHERE stage = 'distill'"))
        done = {r[0] for r in ws.execute("SELECT item_id FROM distill_items")}
        ok_bodies = [json.dumps(b, sort_keys=True) for b in srv.chat_bodies(status=200)]
        assert srv.count("POST", CHAT, status=500) == 1

        # every attempt is recorded, with its pattern, checks and reject code
        assert len(attempts) == 2 * len(kinds) - 1  # flaky's failed attempt is not a row
        by_kind = {k: [attempts[(ids[k], a)] for a in range(2) if (ids[k], a) in attempts] for k in kinds}
        assert all(a[:4] == (True, True, "none", None) for a in by_kind["free"])
        assert [a[2] for a in by_kind["image"]] == ["image"] * 2 and by_kind["image"][0][3] is None
        assert [a[2] for a in by_kind["text"]] == ["text"] * 2
        assert [a[2] for a in by_kind["mixed"]] == ["mixed"] * 2 and by_kind["mixed"][0][3] is None
        assert {a[3] for a in by_kind["wrong"]} == {"wrong_answer"}
        assert {a[3] for a in by_kind["malformed"]} == {"format_invalid"} and all(a[0] for a in by_kind["malformed"])
        assert {a[4] for a in attempts.values()} == {"openai:fake-teacher"}
        traj = json.loads(by_kind["mixed"][0][5])
        assert [t["kind"] for t in traj["turns"]] == ["image_search", "text_search", "answer"]
        # items: usable -> distill_items; none usable -> reject; the 500 -> deferred (neither)
        assert rejects == {ids["wrong"]: "no_usable_attempt", ids["malformed"]: "no_usable_attempt"}
        assert set(rejects.values()) <= set(REJECT_CODES)
        assert ids["flaky"] not in done and ids["flaky"] not in rejects
        assert done == {ids[k] for k in ("free", "image", "text", "mixed", "searchy")} | {ids["free2"]}
        assert any("deferred" in n for n in first.notes)
        assert first.n_in == len(kinds) and first.n_out == len(done) and first.n_rejected == 2
        from fvqa.llm.cache import read_spend

        booked = [r for r in read_spend(ws.cache_dir) if r.stage == "distill"]  # what `fvqa status` sums
        assert booked and first.paid_calls == len(ok_bodies)

        # the selection: label rule drops `searchy` (a search on a search-free item); one per label
        kept = ws.execute("SELECT item_id, search_label, search_pattern FROM distill_kept ORDER BY ALL")
        assert {(lab, pat) for _, lab, pat in kept} == {
            ("search_free", "none"), ("image_search_required", "image"), ("text_search_required", "text"),
            ("mixed_search_required", "mixed")}
        assert len(kept) == 4 and ids["searchy"] not in {i for i, _, _ in kept}

        # the next run makes only flaky's missing attempt; no successful call is repeated
        FAULTS["on"] = False
        srv.reset_records()
        second = run_distill(ws, config)
        again = [json.dumps(b, sort_keys=True) for b in srv.chat_bodies(status=200)]
        assert len(again) == 1 and again[0] not in ok_bodies
        assert ws.count("distill_attempts") == 2 * len(kinds) and ids["flaky"] in ws.keys("distill_items", "item_id")
        assert second.n_in == 1 and any("resumed" in n for n in second.notes)
        # a forced re-run is served from the response cache: no request at all
        srv.reset_records()
        DistillStage().reset(ws)
        third = run_distill(ws, config)
        assert srv.count("POST", CHAT) == 0 and third.cache_hits > 0
        assert ws.count("distill_kept") == 4


def test_another_teacher_needs_force(tmp_path: Path, stub: StubTools):
    from fvqa.errors import ConfigError

    with Workspace(tmp_path / "ws") as ws, FakeOpenAI(teacher) as srv:
        fill_workspace(ws, ["free"])
        run_distill(ws, config_for(ws, srv.base_url))
        other = config_for(ws, srv.base_url)
        other.distill.llm = other.distill.llm.model_copy(update={"model": "other-teacher"})
        with pytest.raises(ConfigError, match="--force distill"):
            run_distill(ws, other)


# -- the SFT export in veRL's multi-turn SFT dataset -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_processor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoProcessor

    from fvqa.demo.tiny_model import build_tiny_qwen

    return AutoProcessor.from_pretrained(str(build_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"))))


def _spans(ids: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    out: list[tuple[int, list[int]]] = []
    for t, m in zip(ids, mask, strict=True):
        if not out or out[-1][0] != m:
            out.append((m, []))
        out[-1][1].append(t)
    return out


def test_sft_export_loads_in_verls_multiturn_dataset_with_loss_only_on_assistant_turns(
        tmp_path: Path, stub: StubTools, tiny_processor: Any):
    import pandas as pd
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    from fvqa.formats.sft import METADATA_COLUMNS
    from fvqa.pipelines.export import export_all

    FAULTS["on"] = False
    with Workspace(tmp_path / "ws") as ws, FakeOpenAI(teacher) as srv:
        fill_workspace(ws, ["free", "image", "text", "mixed", "free", "free"])
        run_distill(ws, config_for(ws, srv.base_url, balance={"max_ratio": None}))
        written = export_all(ws, ["sft"], sft_val_fraction=0.3)
        n_kept = ws.count("distill_kept")
    files = {p.name for p in written["sft"]}
    assert files == {"train.parquet", "val.parquet", "manifest.json"}
    sft = ws.exports_dir / "sft"
    frames = [pd.read_parquet(sft / f) for f in ("train.parquet", "val.parquet")]
    assert sum(map(len, frames)) == n_kept == 6
    df = pd.concat(frames)
    assert set(METADATA_COLUMNS) | {"messages", "images"} <= set(df.columns)
    assert set(df["search_pattern"]) == {"none", "image", "text", "mixed"}
    assert set(df["teacher"]) == {"openai:fake-teacher"}

    tok = tiny_processor.tokenizer
    ds = MultiTurnSFTDataset([str(sft / "train.parquet"), str(sft / "val.parquet")], tok,
                             {"max_length": 8192, "truncation": "error", "pad_mode": "no_padding"},
                             processor=tiny_processor)
    assert len(ds) == 6
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for i in range(len(ds)):
        row = ds.dataframe.iloc[i]
        x = ds[i]
        ids, mask = x["input_ids"].tolist(), x["loss_mask"].tolist()
        assistant = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        spans = _spans(ids, mask)
        trained = [tok.decode(t) for m, t in spans if m == 1]
        masked = "".join(tok.decode(t) for m, t in spans if m == 0)
        # loss exactly on each assistant turn (and the <|im_end|> that closes it), nothing else
        assert trained == [f"{a}<|im_end|>\n" for a in assistant]
        assert masked.startswith("<|im_start|>system\n")  # the template's system turn: mask 0
        assert all(not any(s in t for s in ("Searched results", "<information>", "system")) for t in trained)
        if row["search_pattern"] != "none":
            assert masked.count("Searched results: <information>") == len(assistant) - 1  # tool turns: mask 0
        n_images = len(row["images"])
        assert n_images == 1 + 2 * (row["search_pattern"] in ("image", "mixed"))  # user image + 2 thumbnails
        assert all(m == 0 for t, m in zip(ids, mask, strict=True) if t == image_pad)
        assert int(x["multi_modal_inputs"]["image_grid_thw"].shape[0]) == n_images


def test_sft_export_without_distilled_trajectories_is_a_clear_error(tmp_path: Path):
    from fvqa.pipelines.export import ExportError, export_all

    with Workspace(tmp_path / "ws") as ws:
        with pytest.raises(ExportError, match="distill.enabled"):
            export_all(ws, ["sft"])
        assert not (ws.exports_dir / "sft").exists()


# -- SIGKILL mid-distil ----------------------------------------------------------------------------
def _cached_ok(cache_dir: Path) -> int:
    n = 0
    for db in cache_dir.glob("*.sqlite"):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            try:
                n += con.execute("SELECT count(*) FROM responses WHERE ok = 1").fetchone()[0]
            except sqlite3.OperationalError:
                pass
    return n


def test_sigkill_mid_distil_then_rerun_repeats_no_successful_teacher_call(tmp_path: Path, stub: StubTools):
    """The child distils against the loopback teacher; after N successful replies the server holds every
    further request, the child is SIGKILLed once those N replies are in its response cache, and the
    re-run (here, in-process) completes the stage without a single successful request repeated."""
    n_before_kill = 9
    served = {"n": 0, "hold": True}

    def holding(body: dict[str, Any]) -> Any:
        if served["hold"] and served["n"] >= n_before_kill:
            return Reply(delay=60)  # hung until the server closes: never answered
        served["n"] += 1
        return teacher(body)

    FAULTS["on"] = False
    kinds = ["free", "image", "text", "mixed"] * 3
    with FakeOpenAI(holding) as srv:
        ws_dir = tmp_path / "ws"
        with Workspace(ws_dir) as ws:
            fill_workspace(ws, kinds)
        cfg = {"workspace": str(ws_dir), "batch_size": 4, "distill": distill_section(srv.base_url)}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
        child = subprocess.Popen([sys.executable, str(REPO / "tests" / "support" / "distill_teacher.py"),
                                  str(tmp_path / "c.yaml")], env=env, cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while _cached_ok(ws_dir / "cache" / "llm") < n_before_kill:
                assert child.poll() is None, child.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the child never reached the kill point"
                time.sleep(0.05)
            time.sleep(0.2)  # let the child commit whatever chunk it finished
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        assert child.returncode == -signal.SIGKILL
        before = [json.dumps(b, sort_keys=True) for b in srv.chat_bodies(status=200)]
        assert len(before) == n_before_kill
        with Workspace(ws_dir) as ws:
            status = ws.execute("SELECT status FROM runs WHERE stage = 'distill'")
            assert status == [("running",)]  # killed mid-stage
            partial = ws.count("distill_attempts")
            assert partial < 2 * len(kinds)
            served["hold"] = False
            srv.reset_records()
            stats = run_distill(ws, RunConfig.model_validate(cfg))
            after = [json.dumps(b, sort_keys=True) for b in srv.chat_bodies(status=200)]
            assert not set(before) & set(after), "a successful teacher call was repeated after the kill"
            assert len(after) == len(set(after))
            assert ws.count("distill_attempts") == 2 * len(kinds) and ws.count("distill_items") == len(kinds)
            assert partial > 0 and stats.n_in < len(kinds)  # committed chunks are not redone


# -- the scripted demo teacher on the demo world ------------------------------------------------------
def _demo_workspace(ws: Workspace, world: Path, n_per_label: int = 6) -> None:
    """Items of the demo world as the build makes them: MetaCLIP-style name questions (search-free and
    image-search-required) on the web images, InfoSeek fact questions (text- and mixed-search-required)
    on the InfoSeek images."""
    from fvqa.textgen.qa import template_question

    entities = [json.loads(line) for line in (world / "entities.jsonl").read_text().splitlines()]
    infoseek = [json.loads(line) for line in (world / "infoseek/infoseek_train_withkb.jsonl").read_text().splitlines()]
    items, labels = [], []
    for n, e in enumerate(entities[: 2 * n_per_label]):
        sha = ws.put_image((world / "web" / "images" / f"{e['entity_id']}_0.jpg").read_bytes()).sha256
        items.append(dict(item_id=f"mc-{e['entity_id']}", source="metaclip", answer=e["name"], aliases=[e["name"]],
                          question=template_question(e["entity_id"], e["knowledge_type"]), image_sha256=sha,
                          concept=e["name"], entity_text=None))
        labels.append("search_free" if n % 2 else "image_search_required")
    rows = [r for r in infoseek if (world / "infoseek/images" / f"{r['image_id']}.jpg").is_file()]
    for n, r in enumerate(rows[: 2 * n_per_label]):
        sha = ws.put_image((world / "infoseek/images" / f"{r['image_id']}.jpg").read_bytes()).sha256
        items.append(dict(item_id=f"is-{r['data_id']}", source="infoseek", answer=r["answer"][0],
                          aliases=list(r["answer"]), question=r["question"], image_sha256=sha, concept=None,
                          entity_text=r["entity_text"]))
        labels.append("text_search_required" if n % 2 else "mixed_search_required")
    ws.insert("items", [{**it, "concept_count": None} for it in items])
    ws.insert("labels", [dict(item_id=it["item_id"], search_label=lab, probe_method="popularity-prior")
                         for it, lab in zip(items, labels, strict=True)])
    ws.insert("splits", [dict(item_id=it["item_id"], split="train") for it in items])


def test_scripted_demo_teacher_distils_every_search_pattern_on_the_demo_world(tmp_path: Path, demo_world: Path):
    from fvqa.demo.teacher import NAME
    from fvqa.pipelines.index import IndexStage

    index_dir = tmp_path / "index"
    config = RunConfig.model_validate({
        "workspace": str(tmp_path / "ws"), "world": {"path": str(demo_world)},
        "search": {"backend": "local", "local": {"index_dir": str(index_dir), "clip_model": "fvqa-tiny"}},
        "distill": {"enabled": True, "backend": "scripted-teacher", "k": 2, "balance": {"max_ratio": None}},
    })
    with Workspace(config.workspace) as ws:
        _demo_workspace(ws, demo_world)
        execute_stage(IndexStage(), ws, config, QUIET)
        stats = run_distill(ws, config)
        kept = ws.execute("SELECT search_label, search_pattern, count(*) FROM distill_kept GROUP BY ALL ORDER BY ALL")
        teachers = {t for (t,) in ws.execute("SELECT DISTINCT teacher FROM distill_attempts")}
        prov = ws.execute("SELECT provenance FROM distill_items")
        traj = json.loads(ws.execute(
            "SELECT a.trajectory FROM distill_kept k JOIN distill_attempts a USING (item_id, attempt) "
            "WHERE k.search_pattern = 'mixed' LIMIT 1")[0][0])
    cells = {(lab, pat): n for lab, pat, n in kept}
    assert set(cells) == {("search_free", "none"), ("image_search_required", "image"),
                          ("text_search_required", "text"), ("mixed_search_required", "mixed")}
    assert cells[("search_free", "none")] == 6 and cells[("text_search_required", "text")] >= 5
    assert cells[("image_search_required", "image")] >= 5 and cells[("mixed_search_required", "mixed")] >= 1
    assert teachers == {NAME} and any("DEMO STAND-IN" in n for n in stats.notes)
    assert all(json.loads(p)["distill"]["demo_standin"] and "STAND-IN" in json.loads(p)["distill"]["note"]
               for (p,) in prov)
    # the answer is read from the text-search result shown to it, which names the subject's page
    last_tool = [m for m in traj["messages"] if m["role"] == "user"][-1]
    shown = last_tool["content"] if isinstance(last_tool["content"], str) else "".join(
        p.get("text", "") for p in last_tool["content"])
    assert traj["answer"] in shown


def test_estimate_prices_the_openai_teacher_and_skips_the_scripted_one(tmp_path: Path, stub: StubTools):
    from fvqa.pipelines.base import StageContext

    with Workspace(tmp_path / "ws") as ws, FakeOpenAI(teacher) as srv:
        fill_workspace(ws, ["free", "image"])
        config = config_for(ws, srv.base_url)
        stage = DistillStage()
        stage.prepare(ws)
        est = stage.estimate(StageContext(ws, config, stage, console=QUIET))
        assert est is not None and est.paid_calls_low == 4 and est.paid_calls_high == 12 and est.cached == 0
        run_distill(ws, config)
        DistillStage().reset(ws)
        stage.prepare(ws)
        est = stage.estimate(StageContext(ws, config, stage, console=QUIET))
        assert est.cached == 4 and est.paid_calls == 0  # every attempt's first request is in the cache
        assert srv.count("POST", CHAT) > 0
    scripted = RunConfig.model_validate({"distill": {"backend": "scripted-teacher"}})
    with Workspace(tmp_path / "ws2") as ws:
        stage.prepare(ws)
        assert stage.estimate(StageContext(ws, scripted, stage, console=QUIET)) is None
