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
        with pytest.raises(ImageError, match="not a decodable image"):
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
        ws.reject("crawl", "k1", "HTTP 404", "http://x")
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
