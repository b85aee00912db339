"""`fvqa build --retry-rejects STAGE[:REASON]` re-queues chosen rejects without `--force`."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rich.console import Console
from support.fake_openai import FakeOpenAI

from fvqa.config import RunConfig
from fvqa.errors import ConfigError
from fvqa.pipelines.runner import run_build
from fvqa.store import Workspace

N = 6


def _workspace(root: Path) -> dict[Path, bytes]:
    """Concepts with crawled images; the odd ones' image files are taken away (returned, to put back)."""
    away: dict[Path, bytes] = {}
    with Workspace(root) as ws:
        for i in range(N):
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (40 * i, 80, 120)).save(buf, "JPEG")
            ref = ws.put_image(buf.getvalue())
            if i % 2:
                path = ws.find_image(ref.sha256)
                away[path] = path.read_bytes()
                path.unlink()
            ws.insert("concepts", [dict(concept_id=f"c{i}", entry_id=i, concept=f"Landmark{i}", count=1000,
                                        tier="tail", category="Place")])
            ws.insert("crawled", [dict(concept_id=f"c{i}", image_sha256=ref.sha256, image_url=f"http://x/{i}.jpg",
                                       page_url=f"http://x/{i}", page_title=f"Landmark{i}",
                                       page_text=f"Landmark{i} is famous.", clip_score=0.3)])
    return away


def test_retry_rejects_requeues_only_the_chosen_rejects(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    away = _workspace(root)

    def responder(body: dict[str, Any]) -> str:
        n = int(re.search(r"Landmark(\d+)", json.dumps(body)).group(1))
        return json.dumps({"question": "What place is shown in this photo?", "answer": f"Landmark{n}"})

    def outcome(ws: Workspace) -> tuple[int, int]:
        return ws.count("items"), ws.count("rejects")

    with FakeOpenAI(responder) as srv:
        config = RunConfig.model_validate({"workspace": str(root), "generate": {"backend": "llm", "llm": {
            "endpoints": [{"base_url": srv.base_url, "api_key_env": None}], "model": "m", "max_retries": 0}}})
        quiet = Console(file=io.StringIO())
        run_build(config, only=["generate"], console=quiet)
        with Workspace(root, read_only=True) as ws:
            assert outcome(ws) == (N // 2, N // 2)
            [(reason,)] = ws.execute("SELECT DISTINCT reason FROM rejects")
        for path, data in away.items():  # the user restores the missing image files
            path.write_bytes(data)
        run_build(config, only=["generate"], console=quiet)  # a plain re-run leaves rejects alone
        with Workspace(root, read_only=True) as ws:
            assert outcome(ws) == (N // 2, N // 2)
        with pytest.raises(ConfigError, match="unknown stage 'genrate'"):
            run_build(config, only=["generate"], retry_rejects=["genrate"], console=quiet)
        with pytest.raises(ConfigError, match="'no_such_code' is not a reject code of stage generate; its codes: "):
            run_build(config, only=["generate"], retry_rejects=["generate:no_such_code"], console=quiet)
        said = Console(file=io.StringIO(), width=200)  # a registered code with no rejects: said, nothing done
        run_build(config, only=["generate"], retry_rejects=["generate:rule_violated"], console=said)
        assert "no rejects to retry" in said.file.getvalue() and reason in said.file.getvalue()
        calls = srv.count("POST", "/v1/chat/completions")
        run_build(config, only=["generate"], retry_rejects=[f"generate:{reason}"], console=quiet)
        with Workspace(root, read_only=True) as ws:
            assert outcome(ws) == (N, 0)
        assert srv.count("POST", "/v1/chat/completions") - calls == N // 2  # only the re-queued ones
