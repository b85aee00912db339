"""The `hf` export in the Hub's layout, its card, and `fvqa export --push-to-hub` against a loopback Hub.

The workspace is a handful of rows inserted directly (items, images, tags, labels, gold, splits), so
every label source the card reports is present: the popularity prior, model-probe rollouts, and a
human (gold) label. The push runs the real CLI in a subprocess against a stand-in of the Hub's
upload API (`/api/repos/create`, `tree`, `preupload`, `commit`) that answers "regular" for every
file, so the commit carries each file base64-encoded and the test can rebuild the repo and load it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml
from huggingface_hub import DatasetCard
from PIL import Image
from rich.console import Console
from support.paths import FVQA, REPO

import fvqa.pipelines.export_hf as export_hf_mod
from fvqa.config import ExportConfig, RunConfig, WorldConfig
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.export import ExportStage, export_all
from fvqa.pipelines.export_hf import CardOptions, export_hf
from fvqa.store import Workspace

TOKEN = "hf_loopbackSECRETtoken0123456789"
SPLITS = {"train": 4, "test": 3, "unassigned": 1}


def _image(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40 + i, 30), (i * 37 % 255, 90, 140)).save(buf, format="PNG")
    return buf.getvalue()


def _fill(ws: Workspace) -> None:
    """8 items: 5 popularity-prior labels, 2 from model rollouts (one overridden by a human), 1 unlabelled."""
    i = 0
    for split, n in SPLITS.items():
        for _ in range(n):
            item = f"metaclip-{i:03d}"
            sha = ws.put_image(_image(i)).sha256
            ws.insert("items", [dict(item_id=item, source="metaclip" if i % 2 else "infoseek",
                                     question=f"What is thing {i}?", answer=f"thing {i}", aliases=[f"thing {i}"],
                                     image_sha256=sha, provenance=json.dumps({"generate": {"backend": "template"}}))])
            ws.insert("tags", [dict(item_id=item, knowledge_type="Place" if i < 5 else "Nature", confidence=0.9)])
            if i < 7:
                method = "popularity-prior" if i < 5 else "rollouts:openai:gpt-4o"
                ws.insert("labels", [dict(item_id=item, search_label="search_free" if i < 3 else
                                          "image_search_required", p_direct=0.5, p_search=0.7,
                                          probe_k=0 if i < 5 else 8, probe_method=method, provenance="{}")])
            ws.insert("splits", [dict(item_id=item, split=split)])
            i += 1
    ws.insert("gold", [dict(item_id="metaclip-006", status="kept", search_label="text_search_required",
                            round="r1", provenance="{}")])


@pytest.fixture
def ws_root(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    with Workspace(root) as ws:
        _fill(ws)
    return root


def _load(folder: Path, cache: Path) -> datasets.DatasetDict:
    return datasets.load_dataset(str(folder), cache_dir=str(cache))


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_hf_export_is_the_hub_layout_and_load_dataset_reads_it(ws_root: Path, tmp_path: Path) -> None:
    with Workspace(ws_root) as ws:
        [folder] = export_all(ws, ["hf"], card=CardOptions(license="cc-by-sa-4.0"))["hf"]
    assert folder == ws_root / "exports" / "hf"
    assert _files(folder) == ["README.md", "data/test-00000-of-00001.parquet",
                              "data/train-00000-of-00001.parquet", "data/unassigned-00000-of-00001.parquet"]
    assert not list((ws_root / "exports").glob(".staging-*"))
    dd = _load(folder, tmp_path / "cache")
    assert {s: len(d) for s, d in dd.items()} == SPLITS
    assert isinstance(dd["train"].features["image"], datasets.Image)
    row = dd["train"][1]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (41, 30)
    assert row["item_id"] == "metaclip-001" and row["question"] == "What is thing 1?"
    assert dd["test"]["search_label"] == ["image_search_required", "image_search_required", "text_search_required"]
    assert json.loads(dd["train"][0]["provenance"]) == {"generate": {"backend": "template"}}


def test_card_has_license_real_counts_and_label_provenance(ws_root: Path) -> None:
    with Workspace(ws_root) as ws:
        [folder] = export_all(ws, ["hf"], card=CardOptions(license="cc-by-sa-4.0", pretty_name="FVQA mini"))["hf"]
    card = DatasetCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "cc-by-sa-4.0" and data["pretty_name"] == "FVQA mini"
    assert data["task_categories"] == ["visual-question-answering"] and data["size_categories"] == ["n<1K"]
    assert data["configs"] == [{"config_name": "default", "data_files": [
        {"split": s, "path": f"data/{s}-*"} for s in sorted(SPLITS)]}]
    info = data["dataset_info"]
    assert {s["name"]: s["num_examples"] for s in info["splits"]} == SPLITS
    assert {"name": "image", "dtype": "image"} in info["features"]
    text = card.text
    assert "Items: 8" in text
    assert "| test | 3 |" in text and "| train | 4 |" in text and "| unassigned | 1 |" in text
    assert "| Place | 5 |" in text and "| Nature | 3 |" in text
    assert "| infoseek | 4 |" in text and "| metaclip | 4 |" in text
    assert "| unlabelled | 1 |" in text and "| text_search_required | 1 |" in text
    # label sources: 5 prior, 1 probe, 1 human (gold over a probe label), 1 unlabelled
    assert "**prior**: 5 (62.5%)" in text and "**probe**: 1 (12.5%)" in text
    assert "**human**: 1 (12.5%)" in text and "**unlabelled**: 1 (12.5%)" in text
    assert "62.5% of the labels are a popularity prior (a stand-in)" in text
    assert "`rollouts:openai:gpt-4o` (1)" in text
    assert "Fictional" not in text and "fictional" not in data["tags"]


def test_export_stage_takes_license_from_config_and_marks_the_demo_world(ws_root: Path, tmp_path: Path) -> None:
    config = RunConfig(workspace=ws_root, world=WorldConfig(path=tmp_path / "demo-world"),
                       export=ExportConfig(formats=["hf"], license="mit", pretty_name="FVQA demo"))
    with Workspace(ws_root) as ws:
        stats = execute_stage(ExportStage(), ws, config, Console(quiet=True))
    assert stats.notes == [f"hf: {ws_root / 'exports' / 'hf'}"]
    card = DatasetCard.load(ws_root / "exports" / "hf" / "README.md")
    assert card.data.license == "mit" and card.data.pretty_name == "FVQA demo"
    assert "**Fictional data.**" in card.text and "offline demo world" in card.text
    assert "fictional" in card.data.tags
    assert ExportConfig().license == "cc-by-4.0"


def test_demo_world_urls_mark_the_card_fictional_without_a_config(tmp_path: Path) -> None:
    with Workspace(tmp_path / "ws") as ws:
        sha = ws.put_image(_image(1)).sha256
        ws.insert("items", [dict(item_id="metaclip-x", source="metaclip", question="Which tower?", answer="Lonorpel",
                                 aliases=["Lonorpel"], image_sha256=sha,
                                 page_url="http://demo.fvqa.local/wiki/Q100000")])
        ws.insert("splits", [dict(item_id="metaclip-x", split="test")])
        [folder] = export_all(ws, ["hf"])["hf"]
    card = DatasetCard.load(folder / "README.md")
    assert "**Fictional data.**" in card.text and card.data.license == "cc-by-4.0"


def test_large_splits_are_sharded_like_push_to_hub(ws_root: Path, tmp_path: Path) -> None:
    with Workspace(ws_root) as ws:
        from fvqa.pipelines.export import dataset_rows

        folder = export_hf(ws, dataset_rows(ws), tmp_path / "out", max_shard_bytes=1_000)
    shards = [f for f in _files(folder) if f.startswith("data/train-")]
    assert len(shards) > 1 and all(re.fullmatch(rf"data/train-\d{{5}}-of-{len(shards):05d}\.parquet", f)
                                   for f in shards)
    dd = _load(folder, tmp_path / "cache")
    assert {s: len(d) for s, d in dd.items()} == SPLITS
    assert dd["train"]["item_id"] == [f"metaclip-{i:03d}" for i in range(4)]  # shard order kept


def test_a_failed_hf_export_leaves_the_previous_one(ws_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Workspace(ws_root) as ws:
        export_all(ws, ["native", "hf"])
        before = {f: (ws_root / "exports" / f).read_bytes() for f in _files(ws_root / "exports")}

        def boom(*args: Any, **kwargs: Any) -> str:
            raise RuntimeError("card failed")

        monkeypatch.setattr(export_hf_mod, "card_body", boom)
        with pytest.raises(RuntimeError, match="card failed"):
            export_all(ws, ["native", "hf"])
    assert {f: (ws_root / "exports" / f).read_bytes() for f in _files(ws_root / "exports")} == before
    assert sorted(p.name for p in (ws_root / "exports").iterdir()) == ["hf", "native"]


# --- push to a loopback stand-in of the Hub ------------------------------------------------------


class FakeHub:
    """The Hub's upload API for dataset repos, in memory: what `create_repo` + `upload_folder` call."""

    def __init__(self, files: dict[str, bytes] | None = None, fail_commit: bool = False) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.created: list[dict[str, Any]] = []
        self.validated: list[str] = []
        self.commits: list[list[dict[str, Any]]] = []
        self.fail_commit = fail_commit
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self) -> None:  # noqa: N802
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                if re.fullmatch(r"/api/datasets/[^/]+/[^/]+/tree/main(\?.*)?", self.path):
                    return self._reply(200, [{"type": "file", "path": p, "size": len(b), "oid": "0" * 40}
                                             for p, b in sorted(hub.files.items())])
                self._reply(404, {"error": f"no route {self.path}"})

            def do_POST(self) -> None:  # noqa: N802
                hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
                body = self._body()
                base = f"http://127.0.0.1:{self.server.server_address[1]}"
                if self.path == "/api/validate-yaml":  # upload_folder checks README.md's metadata first
                    payload = json.loads(body)
                    hub.validated.append(payload["repoType"])
                    meta = yaml.safe_load(payload["content"].split("---")[1])
                    ok = isinstance(meta, dict) and "license" in meta and "configs" in meta
                    return self._reply(200 if ok else 400, {} if ok else {"errors": [{"message": "bad card"}]})
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    return self._reply(200, {"url": f"{base}/datasets/{payload['organization']}/{payload['name']}"})
                m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/(preupload|commit)/main(\?.*)?", self.path)
                if m and m.group(2) == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if m and m.group(2) == "commit":
                    if hub.fail_commit:
                        return self._reply(403, {"error": "You don't have the rights to create a commit"})
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    hub.commits.append(lines)
                    for line in lines:
                        if line["key"] == "file":
                            hub.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                        elif line["key"] == "deletedFile":
                            hub.files.pop(line["value"]["path"], None)
                    return self._reply(200, {"commitUrl": f"{base}/datasets/{m.group(1)}/commit/{'a' * 40}",
                                             "commitOid": "a" * 40})
                self._reply(404, {"error": f"no route {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The CLI's environment: online (HF_HUB_OFFLINE unset), no cached login, no token yet."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "HUGGING_FACE_HUB_TOKEN")}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_COLOR": "1", "COLUMNS": "400"}
    yield env


def _config(tmp_path: Path, ws_root: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"workspace": str(ws_root),
                                    "export": {"license": "cc-by-nc-4.0", "pretty_name": "FVQA pushed"}}))
    return path


def _export(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FVQA, "export", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_push_to_hub_uploads_our_card_and_parquet_shards(ws_root: Path, tmp_path: Path,
                                                          hub_env: dict[str, str]) -> None:
    stale = "data/train-00001-of-00002.parquet"  # from an earlier, bigger push: must not stay matched
    with FakeHub(files={".gitattributes": b"*.parquet filter=lfs\n", stale: b"old"}) as hub:
        env = hub_env | {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url}
        res = _export(env, "--config", str(_config(tmp_path, ws_root)), "--format", "hf",
                      "--push-to-hub", "someone/fvqa-mini", "--private")
    assert res.returncode == 0, res.stderr
    assert TOKEN not in res.stdout + res.stderr
    assert f"pushed: {hub.url}/datasets/someone/fvqa-mini (private)" in res.stdout
    assert hub.created == [{"name": "fvqa-mini", "organization": "someone", "type": "dataset",
                            "visibility": "private"}]
    assert hub.requests and all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    assert hub.validated == ["dataset"]
    [commit] = hub.commits
    assert commit[0]["key"] == "header"
    assert {(line["key"], line["value"]["path"]) for line in commit[1:]} == {
        ("deletedFile", stale), ("file", "README.md"), *(("file", f"data/{s}-00000-of-00001.parquet") for s in SPLITS)}
    local = ws_root / "exports" / "hf"
    assert hub.files["README.md"] == (local / "README.md").read_bytes()  # our card, not push_to_hub's
    assert ".gitattributes" in hub.files
    mirror = tmp_path / "hub-repo"  # what the Hub now holds loads like the local folder
    for path, data in hub.files.items():
        (mirror / path).parent.mkdir(parents=True, exist_ok=True)
        (mirror / path).write_bytes(data)
    dd = _load(mirror, tmp_path / "cache")
    assert {s: len(d) for s, d in dd.items()} == SPLITS
    assert isinstance(dd["test"][0]["image"], Image.Image)
    assert DatasetCard.load(mirror / "README.md").data.license == "cc-by-nc-4.0"
    on_disk = [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert on_disk == [], "the token is written nowhere (exports, HF_HOME, datasets cache)"


def test_push_without_a_token_is_one_error_line_and_uploads_nothing(ws_root: Path, hub_env: dict[str, str]) -> None:
    with FakeHub() as hub:
        res = _export(hub_env | {"HF_ENDPOINT": hub.url}, "--workspace", str(ws_root),
                      "--push-to-hub", "someone/fvqa-mini")
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "HF_TOKEN" in lines[0] and "nothing was uploaded" in lines[0]
    assert "Traceback" not in res.stderr
    assert hub.requests == [] and not (ws_root / "exports" / "hf").exists()


def test_push_refused_by_the_hub_is_one_line_without_the_token(ws_root: Path, hub_env: dict[str, str]) -> None:
    with FakeHub(fail_commit=True) as hub:
        res = _export(hub_env | {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url}, "--workspace", str(ws_root),
                      "--push-to-hub", "someone/fvqa-mini")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "push to someone/fvqa-mini" in lines[0] and "403" in lines[0], res.stderr
    assert TOKEN not in res.stdout + res.stderr
    assert hub.created and hub.files == {}
    assert (ws_root / "exports" / "hf" / "README.md").is_file()  # the local export stands


@pytest.mark.parametrize(("args", "message"), [
    (["--push-to-hub", "not a repo id"], "not a Hub repo id"),
    (["--format", "native", "--push-to-hub", "someone/x"], "add --format hf"),
    (["--private"], "--private only applies with --push-to-hub"),
])
def test_push_argument_errors_stop_before_exporting(ws_root: Path, hub_env: dict[str, str], args: list[str],
                                                    message: str) -> None:
    res = _export(hub_env | {"HF_TOKEN": TOKEN}, "--workspace", str(ws_root), *args)
    assert res.returncode == 2 and message in res.stderr and TOKEN not in res.stderr
    assert not (ws_root / "exports" / "hf").exists()
