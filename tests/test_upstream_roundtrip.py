"""A parquet in upstream's layout -> import-upstream -> export --format upstream: same rows, same schema."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fvqa.store import Workspace

from conftest import FVQA, REPO


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40 + seed, 30), (seed * 40 % 255, 80, 120)).save(buf, format="JPEG")
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
    src = tmp_path / "fvqa_train.parquet"
    original = _upstream_table()
    pq.write_table(original, src)
    ws = tmp_path / "ws"
    res = subprocess.run([*FVQA, "import-upstream", str(src), "--workspace", str(ws)], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "imported 4" in res.stdout
    again = subprocess.run([*FVQA, "import-upstream", str(src), "--workspace", str(ws)], capture_output=True,
                           text=True, cwd=REPO)
    assert "imported 0, already present 4" in again.stdout
    res = subprocess.run([*FVQA, "export", "--format", "upstream", "--workspace", str(ws)], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    exported = pq.read_table(ws / "exports" / "upstream" / "fvqa_train.parquet")
    assert exported.schema.remove_metadata() == original.schema.remove_metadata()
    key = lambda r: r["data_id"]  # noqa: E731
    assert sorted(exported.to_pylist(), key=key) == sorted(original.to_pylist(), key=key)


def test_missing_column_is_a_clear_error_and_writes_nothing(tmp_path: Path):
    src = tmp_path / "bad.parquet"
    pq.write_table(_upstream_table().drop(["reward_model"]), src)
    res = subprocess.run([*FVQA, "import-upstream", str(src), "--workspace", str(tmp_path / "ws")],
                         capture_output=True, text=True, cwd=REPO)
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
        assert counts == {"imported": 1, "skipped": 0, "rejected": 2}
        reasons = {r[0] for r in ws.execute("SELECT reason FROM rejects WHERE stage = 'import'")}
        assert reasons == {"bad image", "candidate_answers is not a JSON list"}
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
