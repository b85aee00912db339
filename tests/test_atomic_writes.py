"""Nothing half-written: image rows commit with the items that reference them; exports are all or nothing.

A crash injected on row 3 of import-upstream or infoseek must leave no `images` row that no item
references (the files may stay: content-addressed, nothing points at them); an export that cannot be
completed (a store file is missing) writes nothing and leaves the previous export as it was.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console

import fvqa.pipelines.import_upstream as import_mod
import fvqa.pipelines.infoseek as infoseek_mod
from fvqa.config import InfoseekConfig, RunConfig
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.export import ExportError, export_all
from fvqa.pipelines.import_upstream import import_upstream
from fvqa.pipelines.infoseek import InfoseekStage
from fvqa.store import Workspace

N = 5
ORPHANS = "SELECT count(*) FROM images WHERE sha256 NOT IN (SELECT image_sha256 FROM items WHERE image_sha256 IS NOT NULL)"


class Crash(RuntimeError):
    """The injected failure."""


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 80), (seed * 40 % 255, 80, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def _crash_on_call(monkeypatch: pytest.MonkeyPatch, module: object, name: str, n: int) -> None:
    """Make `module.name` raise Crash on its n-th call (it is called once per row, after the row's image)."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"injected on row {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def _upstream_file(tmp_path: Path) -> Path:
    rows = [dict(data_id=f"u{i}", prompt=[{"role": "user", "content": f"<image>What is thing {i}?"}],
                 images=[{"bytes": _jpeg(i), "path": None}], data_source="fvqa_test",
                 reward_model={"ground_truth": f"thing {i}", "candidate_answers": "[]"}) for i in range(N)]
    src = tmp_path / "fvqa_test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    return src


def test_import_crash_on_row_3_leaves_no_image_row_without_an_item(tmp_path: Path, monkeypatch) -> None:
    src = _upstream_file(tmp_path)
    _crash_on_call(monkeypatch, import_mod, "candidate_answers", 3)
    with Workspace(tmp_path / "ws") as ws:
        with pytest.raises(Crash):
            import_upstream(ws, src)
        assert ws.count("items") == 0 and ws.count("images") == 0 and ws.execute(ORPHANS)[0][0] == 0
    monkeypatch.undo()
    with Workspace(tmp_path / "ws") as ws:  # the re-run imports everything once
        assert import_upstream(ws, src)["imported"] == N
        assert ws.count("items") == ws.count("images") == N and ws.execute(ORPHANS)[0][0] == 0


def _infoseek_files(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    lines, qtypes = [], []
    for i in range(N):
        (folder / "images" / f"img{i}.jpg").write_bytes(_jpeg(i))
        lines.append(json.dumps(dict(data_id=f"d{i}", image_id=f"img{i}", question=f"What is thing {i}?",
                                     answer=[f"thing {i}"], answer_eval=[f"thing {i}"], data_split="val")))
        qtypes.append(json.dumps(dict(data_id=f"d{i}", question_type="String")))
    main = folder / "infoseek_val.jsonl"
    main.write_text("\n".join(lines) + "\n")
    (folder / "infoseek_val_qtype.jsonl").write_text("\n".join(qtypes) + "\n")
    return main


@pytest.mark.parametrize("batch_size", [64, 3])  # 3: a batch boundary falls inside an (image, item) pair
def test_infoseek_crash_on_row_3_leaves_no_image_row_without_an_item(tmp_path: Path, monkeypatch,
                                                                        batch_size: int) -> None:
    main = _infoseek_files(tmp_path / "in")
    config = RunConfig(workspace=tmp_path / "ws", batch_size=batch_size,
                       infoseek=InfoseekConfig(jsonl=main, stratify=["question_type"], n=100))
    _crash_on_call(monkeypatch, infoseek_mod, "aliases_of", 3)
    with Workspace(config.workspace) as ws:
        with pytest.raises(Crash):
            execute_stage(InfoseekStage(), ws, config, Console(quiet=True))
        assert ws.execute(ORPHANS)[0][0] == 0
        assert ws.count("images") == ws.count("items") < 3
    monkeypatch.undo()
    with Workspace(config.workspace) as ws:  # resume: the rest, once
        stats = execute_stage(InfoseekStage(), ws, config, Console(quiet=True))
        assert ws.count("items") == ws.count("images") == N and ws.execute(ORPHANS)[0][0] == 0
    assert stats.n_rejected == 0


def _workspace_with_items(root: Path, n: int) -> Workspace:
    ws = Workspace(root)
    for i in range(n):
        sha = ws.put_image(_jpeg(i)).sha256
        ws.insert("items", [dict(item_id=f"import-u{i}", source="import", data_id=f"u{i}", question=f"What {i}?",
                                 answer=f"a{i}", aliases=[f"a{i}"], image_sha256=sha)])
        ws.insert("splits", [dict(item_id=f"import-u{i}", split="test")])
    return ws


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_with_a_missing_store_file_writes_nothing(tmp_path: Path) -> None:
    with _workspace_with_items(tmp_path / "ws", 3) as ws:
        ws.find_image(ws.execute("SELECT image_sha256 FROM items WHERE item_id = 'import-u1'")[0][0]).unlink()
        with pytest.raises(ExportError, match="import-u1: image file .* missing; nothing was written"):
            export_all(ws, ["native", "upstream"])
        assert list(ws.exports_dir.iterdir()) == []  # no exports/native, no staging folder left behind


def test_failed_export_leaves_the_previous_export_intact(tmp_path: Path) -> None:
    with _workspace_with_items(tmp_path / "ws", 2) as ws:
        written = export_all(ws, ["native", "upstream"])
        assert [p.relative_to(ws.exports_dir).as_posix() for ps in written.values() for p in ps] == [
            "native/fvqa_items.parquet", "upstream/fvqa_test.parquet"]
        before = _snapshot(ws.exports_dir)
        sha = ws.put_image(_jpeg(9)).sha256  # a new item whose image then goes missing
        ws.insert("items", [dict(item_id="import-u9", source="import", question="What 9?", answer="a9",
                                 aliases=["a9"], image_sha256=sha)])
        ws.insert("splits", [dict(item_id="import-u9", split="test")])
        ws.find_image(sha).unlink()
        with pytest.raises(ExportError, match="import-u9"):
            export_all(ws, ["native", "upstream"])
        assert _snapshot(ws.exports_dir) == before
        assert sorted(p.name for p in ws.exports_dir.iterdir()) == ["native", "upstream"]


def test_export_crash_midway_leaves_the_previous_export_intact(tmp_path: Path, monkeypatch) -> None:
    """A crash while writing the second format: the first format's new file is not renamed into place."""
    import fvqa.pipelines.export as export_mod

    with _workspace_with_items(tmp_path / "ws", 2) as ws:
        export_all(ws, ["native", "upstream"])
        before = _snapshot(ws.exports_dir)
        ws.insert("items", [dict(item_id="metaclip-x", source="metaclip", question="Who?", answer="b", aliases=["b"])])
        _crash_on_call(monkeypatch, export_mod, "upstream_record", 1)
        with pytest.raises(Crash):
            export_all(ws, ["native", "upstream"])
        assert _snapshot(ws.exports_dir) == before
        assert sorted(p.name for p in ws.exports_dir.iterdir()) == ["native", "upstream"]
        monkeypatch.undo()
        export_all(ws, ["native", "upstream"])  # and a good run replaces both
        assert pq.read_table(ws.exports_dir / "native" / "fvqa_items.parquet").num_rows == 3
