"""A parquet in upstream's layout -> import-upstream -> export --format upstream: same rows, same schema."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from support.paths import FVQA, REPO

from fvqa.store import Workspace


def fvqa(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, from the repository root."""
    return subprocess.run([*FVQA, *args], capture_output=True, text=True, cwd=REPO)


def _import(tmp_path: Path, table: pa.Table) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """Write `table` as upstream's parquet and import it: (file, workspace, the CLI's result)."""
    src, ws = tmp_path / "fvqa_train.parquet", tmp_path / "ws"
    pq.write_table(table, src)
    res = fvqa("import-upstream", str(src), "--workspace", str(ws))
    assert res.returncode == 0, res.stderr
    return src, ws, res


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64 + seed, 64), (seed * 40 % 255, 80, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def _upstream_table(n: int = 4) -> pa.Table:
    rows = []
    for i in range(n):
        rows.append({
            "prompt": [{"content": f"What is the country of origin of this thing #{i}?", "role": "user"}],
            "images": [{"bytes": _jpeg(i), "path": None}],
            "reward_model": {"candidate_answers": json.dumps(["Kingdom of Spain", "ES", "🇪🇸", "Spain"]),
                             "ground_truth": "Spain", "style": "rule"},
            "data_source": "mmsearch_r1/fvqa_train",
            "image_urls": None,
            "data_id": f"fvqa_train_{i:05d}",
            "category": "search_free" if i % 2 else "search_required",
        })
    return pa.Table.from_pylist(rows)


def test_import_then_export_reproduces_rows_and_schema(tmp_path: Path):
    original = _upstream_table()
    src, ws, res = _import(tmp_path, original)
    assert "imported 4" in res.stdout
    again = fvqa("import-upstream", str(src), "--workspace", str(ws))
    assert "imported 0, already present 4" in again.stdout
    res = fvqa("export", "--format", "upstream", "--workspace", str(ws))
    assert res.returncode == 0, res.stderr
    exported = pq.read_table(ws / "exports" / "upstream" / "fvqa_train.parquet")
    assert exported.schema.remove_metadata() == original.schema.remove_metadata()
    key = lambda r: r["data_id"]  # noqa: E731
    assert sorted(exported.to_pylist(), key=key) == sorted(original.to_pylist(), key=key)


def test_missing_column_is_a_clear_error_and_writes_nothing(tmp_path: Path):
    src = tmp_path / "bad.parquet"
    pq.write_table(_upstream_table().drop(["reward_model"]), src)
    res = fvqa("import-upstream", str(src), "--workspace", str(tmp_path / "ws"))
    assert res.returncode == 2
    assert "missing column(s) reward_model" in res.stderr
    with Workspace(tmp_path / "ws") as ws:
        assert ws.count("items") == 0


def test_bad_rows_become_rejects(tmp_path: Path):
    rows = _upstream_table(3).to_pylist()
    rows[0]["images"] = [{"bytes": b"GIF89a-truncated", "path": None}]
    rows[1]["reward_model"] = {**rows[1]["reward_model"], "candidate_answers": "not json"}
    src = tmp_path / "fvqa_test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    with Workspace(tmp_path / "ws") as ws:
        from fvqa.pipelines.import_upstream import import_upstream

        counts = import_upstream(ws, src)
        assert counts == {"imported": 1, "skipped": 0, "moved": 0, "rejected": 2}
        reasons = {r[0] for r in ws.execute("SELECT reason FROM rejects WHERE stage = 'import'")}
        assert reasons == {"image_undecodable", "malformed_json"}
        assert ws.execute("SELECT split FROM splits") == [("test",)]


def test_reference_sample_imports_if_present(tmp_path: Path):
    """The upstream sample shipped in shared/ (when this checkout has it) imports without rejects."""
    sample = REPO.parent / "shared" / "samples" / "upstream_mini_data.parquet"
    if not sample.exists():
        return
    with Workspace(tmp_path / "ws") as ws:
        from fvqa.pipelines.import_upstream import import_upstream

        counts = import_upstream(ws, sample, "train")
        assert counts["rejected"] == 0 and counts["imported"] == pq.read_metadata(sample).num_rows


def _varied_table() -> pa.Table:
    """Candidate lists as upstream's files hold them: the ground truth anywhere in the list, spellings
    that differ only in punctuation, non-ASCII, and an empty list."""
    rows = _upstream_table(4).to_pylist()
    lists = [
        ["Trikay", "Sakyamuni", "Sakya-muni", "Gautama Buddha"],
        [],
        ["Kingdom of Spain", "ES", "🇪🇸", "Spain"],
        ["Palais des Tuileries"],  # the ground truth is not in this one
    ]
    truths = ["Gautama Buddha", "Zürich Opernhaus", "Spain", "Tuileries Palace"]
    for row, cands, truth in zip(rows, lists, truths, strict=True):
        row["reward_model"] = {"candidate_answers": json.dumps(cands), "ground_truth": truth, "style": "rule"}
    return pa.Table.from_pylist(rows)


def test_round_trip_keeps_candidate_lists_as_they_are_and_data_id_as_a_column(tmp_path: Path):
    original = _varied_table()
    src, ws, res = _import(tmp_path, original)
    with Workspace(ws) as w:
        rows = {r[0]: r[1:] for r in w.execute("SELECT data_id, aliases, provenance FROM items")}
        assert set(rows) == {f"fvqa_train_{i:05d}" for i in range(4)}
        assert rows["fvqa_train_00001"][0] == []  # an empty list stays empty ...
        assert all("data_id" not in json.loads(prov)["import"] for _, prov in rows.values())  # ... id: a column
    res = fvqa("export", "--format", "upstream", "--workspace", str(ws))
    assert res.returncode == 0, res.stderr
    exported = pq.read_table(ws / "exports" / "upstream" / "fvqa_train.parquet")
    assert exported.schema.remove_metadata() == original.schema.remove_metadata()
    key = lambda r: r["data_id"]  # noqa: E731
    assert sorted(exported.to_pylist(), key=key) == sorted(original.to_pylist(), key=key)

    # `train prepare` writes the same candidates (as upstream ordered them) and upstream's data_id
    from fvqa.train.prepare import prepare

    with Workspace(ws) as w:
        result = prepare(w)
    train = {r["extra_info"]["data_id"]: r for r in pq.read_table(result.files["train"]).to_pylist()}
    by_id = {r["data_id"]: r for r in original.to_pylist()}
    assert set(train) == set(by_id)
    for data_id, row in train.items():
        upstream = json.loads(by_id[data_id]["reward_model"]["candidate_answers"])
        assert json.loads(row["reward_model"]["candidate_answers"]) == upstream
        assert row["extra_info"]["candidate_answers"] == upstream
        assert row["reward_model"]["ground_truth"] == by_id[data_id]["reward_model"]["ground_truth"]
        assert row["extra_info"]["item_id"] == f"import-{data_id}"


def test_candidate_entries_that_are_not_text_are_dropped_not_stringified(tmp_path: Path):
    rows = _upstream_table(1).to_pylist()
    rows[0]["reward_model"] = {**rows[0]["reward_model"], "candidate_answers": '["Spain", null, "  Spain ", 1492, ""]'}
    src = tmp_path / "fvqa_train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    with Workspace(tmp_path / "ws") as ws:
        from fvqa.pipelines.import_upstream import import_upstream

        assert import_upstream(ws, src)["imported"] == 1
        assert ws.execute("SELECT aliases FROM items") == [(["Spain", "1492"],)]  # no "None"


def test_probe_reads_the_data_id_column_of_imported_items(tmp_path: Path):
    """The probe hands upstream's data_id to image search (the replay backend's key) from items.data_id."""
    from fvqa.pipelines.import_upstream import import_upstream
    from fvqa.pipelines.probe import ITEM_COLUMNS
    from fvqa.pipelines.probe_model import upstream_data_id

    src = tmp_path / "fvqa_train.parquet"
    pq.write_table(_upstream_table(2), src)
    with Workspace(tmp_path / "ws") as ws:
        import_upstream(ws, src)
        ws.insert("items", [dict(item_id="metaclip-x", source="metaclip", question="Q?", answer="A")])
        rows = [dict(zip(ITEM_COLUMNS, r, strict=True))
                for r in ws.execute(f"SELECT {', '.join(ITEM_COLUMNS)} FROM items ORDER BY item_id")]
    assert {r["item_id"]: upstream_data_id(r) for r in rows} == {
        "import-fvqa_train_00000": "fvqa_train_00000", "import-fvqa_train_00001": "fvqa_train_00001",
        "metaclip-x": None}
