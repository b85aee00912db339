"""An endpoint that echoes the API key back puts it nowhere on disk (issue 15, item 5).

The fake endpoint answers with the key in its replies (raw, percent-encoded, JSON-escaped, base64) —
in valid questions (-> `items`) and in unparseable replies (-> `rejects` with the raw reply). After the
build, no table of the workspace and no file under it holds any form of the key.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image
from rich.console import Console
from support.fake_openai import FakeOpenAI

from fvqa.config import RunConfig
from fvqa.pipelines.runner import run_build
from fvqa.redact import Scrubber, variants
from fvqa.store import Workspace

KEY = "sk-proj-MARKER/4f9+x=q"  # characters that URL- and JSON-encode differently
FORMS = [KEY, quote(KEY, safe=""), json.dumps(KEY)[1:-1], base64.b64encode(KEY.encode()).decode().rstrip("=")]


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30 * i, 90, 200 - 20 * i)).save(buf, "JPEG")
    return buf.getvalue()


def _responder(body: dict[str, Any]) -> str:
    n = int(re.search(r"shows this visual concept: Landmark(\d+)", json.dumps(body)).group(1))  # repairs too
    echo = FORMS[n % len(FORMS)]
    if n % 2:
        return f"debug: key={echo} -- not the JSON you asked for"  # unparseable: a reject with the raw reply
    return json.dumps({"question": f"What place is shown ({echo})?", "answer": f"Landmark{n} {echo}"})


def test_scrubber_masks_every_form() -> None:
    s = Scrubber([KEY, None, "abc"])  # too short to mask safely: ignored
    for form in FORMS:
        assert s.text(f"x {form} y") == "x *** y"
    assert s.value({"a": [f"{KEY}"], KEY: 1}) == {"a": ["***"], "***": 1}
    assert variants("abc") == set() and s.text("abc") == "abc"


def test_an_echoing_endpoint_leaves_no_key_on_disk(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FVQA_TEST_ECHO_KEY", KEY)
    root = tmp_path / "ws"
    n = 8
    with Workspace(root) as ws:
        for i in range(n):
            ref = ws.put_image(_jpeg(i))
            ws.insert("concepts", [dict(concept_id=f"c{i}", entry_id=i, concept=f"Landmark{i}", count=1000,
                                        tier="tail", category="Place")])
            ws.insert("crawled", [dict(concept_id=f"c{i}", image_sha256=ref.sha256, image_url=f"http://x/{i}.jpg",
                                       page_url=f"http://x/{i}", page_title=f"Landmark{i}",
                                       page_text=f"Landmark{i} is famous.", clip_score=0.3)])
    with FakeOpenAI(_responder) as srv:
        config = RunConfig.model_validate({
            "workspace": str(root),
            "generate": {"backend": "llm", "llm": {
                "endpoints": [{"base_url": srv.base_url, "api_key_env": "FVQA_TEST_ECHO_KEY"}],
                "model": "fake-model", "max_retries": 0}}})
        stats = run_build(config, only=["generate"], console=Console(file=io.StringIO()))
    assert stats["generate"].n_out > 0 and sum(stats["generate"].rejected.values()) > 0  # both paths ran
    with Workspace(root, read_only=True) as ws:
        for table in ws.tables():
            dump = json.dumps([list(map(str, r)) for r in ws.execute(f'SELECT * FROM "{table}"')])
            for form in FORMS:
                assert form not in dump, (table, form)
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for form in FORMS:
                assert form.encode() not in data, (path, form)
