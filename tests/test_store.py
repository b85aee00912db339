"""Workspace contract: content-addressed images, keyed idempotent inserts, rejects, versions."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from fvqa.errors import WorkspaceError
from fvqa.store import ImageError, Workspace


def _png(color: str = "red", size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_images_are_content_addressed_and_deduplicated(tmp_path):
    with Workspace(tmp_path / "ws") as ws:
        a = ws.put_image(_png("red"))
        b = ws.put_image(_png("red"))
        c = ws.put_image(_png("blue"))
        assert a.sha256 == b.sha256 != c.sha256
        assert a.path == ws.root / "images" / a.sha256[:2] / f"{a.sha256}.png"
        assert a.path.read_bytes() == _png("red")
        assert ws.count("images") == 2
        assert ws.find_image(c.sha256) == c.path


def test_image_type_is_sniffed_from_bytes_not_trusted(tmp_path):
    with Workspace(tmp_path / "ws") as ws:
        with pytest.raises(ImageError, match="image_format_unknown"):
            ws.put_image(b"<html>not found</html>")
        with pytest.raises(ImageError):
            ws.put_image(_png()[:40])  # truncated
        assert ws.count("images") == 0


def test_keyed_insert_ignores_existing_keys_and_rejects_append(tmp_path):
    with Workspace(tmp_path / "ws") as ws:
        row = dict(item_id="x", source="manual", question="Q?", answer="A")
        ws.insert("items", [row])
        ws.insert("items", [{**row, "answer": "B"}])
        assert ws.execute("SELECT answer FROM items") == [("A",)]
        ws.insert("items", [{**row, "answer": "B"}], replace=True)
        assert ws.execute("SELECT answer FROM items") == [("B",)]
        ws.reject("crawl", "k1", "http_error", "HTTP 404: http://x")
        ws.reject("crawl", "k2", "timeout")
        assert ws.rejected_keys("crawl") == {"k1", "k2"}
        assert ws.rejected_keys("tag") == set()


def test_transaction_rolls_back_on_error(tmp_path):
    with Workspace(tmp_path / "ws") as ws:
        with pytest.raises(RuntimeError):
            with ws.transaction():
                ws.insert("items", [dict(item_id="x", source="manual", question="Q?", answer="A")])
                raise RuntimeError("boom")
        assert ws.count("items") == 0


def test_newer_schema_version_is_refused(tmp_path):
    with Workspace(tmp_path / "ws") as ws:
        ws.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(WorkspaceError, match="newer fvqa"):
        Workspace(tmp_path / "ws")


def test_dataset_view_applies_gold_decisions(tmp_path):
    with Workspace(tmp_path / "ws") as ws:
        ws.insert("items", [dict(item_id="a", source="manual", question="Q1?", answer="old", answer_eval='["old"]'),
                            dict(item_id="b", source="manual", question="Q2?", answer="B")])
        ws.insert("gold", [dict(item_id="a", status="fixed", answer="new"),
                           dict(item_id="b", status="rejected")])
        assert ws.execute("SELECT item_id, answer, answer_eval, annotation_status FROM dataset") == [
            ("a", "new", None, "fixed")]


# A schema-v1 workspace as fvqa 0.x wrote it: `items` without `data_id`, which lived in the import
# provenance (and, for InfoSeek items, only in the item id).
V1_DDL = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE items (
    item_id VARCHAR PRIMARY KEY, source VARCHAR NOT NULL, question VARCHAR NOT NULL,
    answer VARCHAR NOT NULL, aliases VARCHAR[], answer_eval VARCHAR, question_type VARCHAR,
    image_sha256 VARCHAR, image_url VARCHAR, page_url VARCHAR, page_title VARCHAR, concept VARCHAR,
    concept_count BIGINT, concept_tier VARCHAR, entity_id VARCHAR, entity_text VARCHAR,
    provenance VARCHAR);
CREATE TABLE splits (item_id VARCHAR PRIMARY KEY, split VARCHAR, provenance VARCHAR);
CREATE VIEW dataset AS SELECT i.item_id, i.source, i.question, i.provenance FROM items i;
INSERT INTO meta VALUES ('schema_version', '1');
"""
V1_ITEMS = [
    ("import-fvqa_train_00007", "import", '{"import": {"file": "fvqa_train.parquet", "data_id": "fvqa_train_00007"}}'),
    ("import-42", "import", '{"import": {"file": "x.parquet", "data_id": 42}}'),
    ("import-0123abcd", "import", '{"import": {"file": "x.parquet", "data_id": null}}'),
    ("infoseek-infoseek_val_0001", "infoseek", '{"infoseek": {"file": "infoseek_val.jsonl", "line": 1}}'),
    ("infoseek-infoseek_val.jsonl:9", "infoseek", '{"infoseek": {"file": "infoseek_val.jsonl", "line": 9}}'),
    ("metaclip-c1", "metaclip", '{"generate": {"backend": "template"}}'),
    ("manual-broken", "manual", "{not json"),
]


def _v1_workspace(root) -> None:
    import duckdb

    root.mkdir(parents=True)
    con = duckdb.connect(str(root / "fvqa.duckdb"))
    con.execute(V1_DDL)
    con.executemany("INSERT INTO items (item_id, source, question, answer, provenance) VALUES (?, ?, 'Q?', 'A', ?)",
                    [list(r) for r in V1_ITEMS])
    con.close()


def test_v1_workspace_is_migrated_once_and_data_id_back_filled(tmp_path):
    from fvqa.schema import SCHEMA_VERSION

    root = tmp_path / "ws"
    _v1_workspace(root)
    with Workspace(root, read_only=True) as ws:  # read-only never migrates
        assert ws.schema_version == 1
        assert "data_id" not in [c[0] for c in ws.con.execute("SELECT * FROM items").description]
    with Workspace(root) as ws:
        assert ws.schema_version == SCHEMA_VERSION == 3
        assert ws.execute("SELECT value FROM meta WHERE key = 'schema_version'") == [("3",)]
        got = dict(ws.execute("SELECT item_id, data_id FROM items"))
        assert got == {
            "import-fvqa_train_00007": "fvqa_train_00007",
            "import-42": "42",
            "import-0123abcd": None,
            "infoseek-infoseek_val_0001": "infoseek_val_0001",
            "infoseek-infoseek_val.jsonl:9": None,  # the line had no data_id: the id is file:line
            "metaclip-c1": None,
            "manual-broken": None,
        }
        # the dataset view is rebuilt with the column, and new rows write it
        assert ws.execute("SELECT data_id FROM dataset WHERE item_id = 'import-42'") == [("42",)]
        ws.insert("items", [dict(item_id="import-new", source="import", data_id="d9", question="Q?", answer="A")])
        ws.execute("UPDATE items SET data_id = 'hand-edited' WHERE item_id = 'import-42'")
    with Workspace(root) as ws:  # re-open: already current, nothing is migrated again
        assert ws.schema_version == 3
        assert ws.execute("SELECT data_id FROM items WHERE item_id = 'import-42'") == [("hand-edited",)]
        assert ws.execute("SELECT data_id FROM items WHERE item_id = 'import-new'") == [("d9",)]
        assert ws.execute("SELECT count(*) FROM meta WHERE key = 'schema_version'") == [(1,)]


def test_failed_migration_leaves_the_v1_workspace_untouched(tmp_path, monkeypatch):
    from fvqa import store

    root = tmp_path / "ws"
    _v1_workspace(root)

    def boom(ws):
        ws.execute("ALTER TABLE items ADD COLUMN data_id VARCHAR")
        raise RuntimeError("crash mid-migration")

    monkeypatch.setitem(store.MIGRATIONS, 2, boom)
    with pytest.raises(RuntimeError, match="crash mid-migration"):
        Workspace(root)
    monkeypatch.undo()
    import duckdb

    con = duckdb.connect(str(root / "fvqa.duckdb"))
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [("1",)]
    assert "data_id" not in [c[0] for c in con.execute("SELECT * FROM items").description]
    con.close()
    with Workspace(root) as ws:  # the next open migrates for real
        assert ws.schema_version == 3
        assert ws.execute("SELECT data_id FROM items WHERE item_id = 'import-42'") == [("42",)]


def test_new_workspace_starts_at_the_current_version_with_the_column(tmp_path):
    with Workspace(tmp_path / "ws") as ws:
        assert ws.schema_version == 3
        assert ws.execute("SELECT value FROM meta WHERE key = 'schema_version'") == [("3",)]
        assert "data_id" in [c[0] for c in ws.con.execute("SELECT * FROM dataset").description]


def test_insert_takes_the_columns_of_every_row_not_only_the_first(tmp_path):
    with Workspace(tmp_path / "ws") as ws:
        ws.insert("items", [dict(item_id="a", source="manual", question="Q?", answer="A"),
                            dict(item_id="b", source="import", question="Q?", answer="B", data_id="u-b")])
        assert ws.execute("SELECT item_id, data_id FROM items ORDER BY 1") == [("a", None), ("b", "u-b")]
