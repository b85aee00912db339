"""The demo world grown to benchmark sizes (bench/bench_paper_scale.py): exact counts, same formats."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from typer.testing import CliRunner

from fvqa.cli import app


def test_scaled_world_has_the_asked_sizes_in_the_official_shapes(tmp_path):
    result = CliRunner().invoke(app, ["demo", "world", str(tmp_path / "w"), "--n-entities", "30",
                                      "--vocab-size", "3000", "--captions", "2000", "--infoseek-rows", "500"])
    assert result.exit_code == 0, result.output
    w = tmp_path / "w"
    entries = json.loads((w / "metaclip/metadata.json").read_text())
    counts = json.loads((w / "metaclip/entry_counts.json").read_text())
    assert len(entries) == len(set(entries)) == 3000
    entities = [json.loads(line) for line in (w / "entities.jsonl").read_text().splitlines()]
    counted = {e for e, c in counts.items() if c > 0}
    assert counted <= {e["name"] for e in entities} | set(entries[30:45])  # filler is never counted
    assert pq.read_metadata(w / "web/caption_pool.parquet").num_rows == 2000

    main = (w / "infoseek/infoseek_train.jsonl").read_text().splitlines()
    assert len(main) == 501  # 500 rows + the planted malformed line
    rows = [json.loads(line) for line in main if not line.endswith('"question": ')]
    assert len({r["data_id"] for r in rows}) == 500
    images = {r["image_id"] for r in rows}
    assert len(images) == 90  # three question kinds per entity share one image each
    missing = [i for i in images if not (w / f"infoseek/images/{i}.jpg").exists()]
    assert missing == [rows[-1]["image_id"]]  # the planted missing image
    assert len((w / "infoseek/infoseek_train_withkb.jsonl").read_text().splitlines()) == 500
    assert json.loads((w / "world.json").read_text())["n_vocab"] == 3000
