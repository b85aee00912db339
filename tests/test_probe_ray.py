"""The model probe on Ray writes what the local probe writes, with the same paid calls, each made once.

One loopback OpenAI-wire server and one loopback search service serve both runs: the probe runs
locally into one workspace and with `executor=ray` (2 workers) into another; their `labels`,
`probe_rollouts` and rejects are compared row for row, and the server's record of requests shows
every distinct request made exactly once per path, and none by a forced second Ray run.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console

from fvqa.config import ProbeConfig, RunConfig
from fvqa.pipelines.base import StageStats, execute_stage
from fvqa.pipelines.probe import ProbeStage
from fvqa.protocol import ImageHit
from fvqa.search.config import SearchConfig
from fvqa.search.tools import SearchTools
from fvqa.search.types import Candidate
from fvqa.store import Workspace

QUIET = Console(file=io.StringIO())
KINDS = ["known", "image", "text", "hopeless"] * 2
K = 2
MAX_CONCURRENCY = 2


class StubBackend:
    """The search service's backend: one page per query, one hit with a thumbnail per image; counts calls."""

    name = "stub"
    cache_pages = False

    def __init__(self) -> None:
        from support.images import picture

        self.thumb = picture(99)
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._lock:
            self.calls[what] += 1

    def image_search(self, image: Any, k: int) -> list[ImageHit]:
        self._count("image")
        return [ImageHit(title="Kalo tower - Wikipedia", url="http://demo/kalo", thumbnail=self.thumb)]

    def text_candidates(self, query: str, n: int) -> list[Candidate]:
        self._count(f"text:{query}")
        return [Candidate(url="http://demo/kalo", title="Kalo tower")]

    def read_page(self, candidate: Candidate) -> str:
        self._count("page")
        return "Kalo tower is a tower. Kalo tower was built by Ur Sta in 1901. It is tall."


class Model:
    """A scripted VLM (answers by the item's kind) that records the peak number of requests in flight."""

    def __init__(self) -> None:
        self.in_flight = self.peak = 0
        self.delay = 0.0
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> str:
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(self.delay)
            return self.reply(body)
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def reply(body: dict[str, Any]) -> str:
        from support.fake_openai import last_user_text

        first = " ".join(p.get("text", "") for p in body["messages"][0]["content"] if p.get("type") == "text")
        kind = first.rsplit("#", 1)[-1].strip()
        n_turns = sum(m["role"] == "assistant" for m in body["messages"])
        if kind == "known":
            return "<reason>I know this.</reason><answer>Ur Sta</answer>"
        if "from your own knowledge" in first or kind == "hopeless":
            return "<reason>Guess.</reason><answer>Someone</answer>"
        if n_turns == 0:
            return ("<reason>Unknown.</reason><search><img>" if kind == "image"
                    else "<reason>Look up.</reason><text_search>Kalo tower builder")
        assert "Kalo tower" in last_user_text(body)
        return "<reason>Found it.</reason><answer>ur sta</answer>"


def fill(ws: Workspace) -> None:
    from support.images import picture

    shas = [ws.put_image(picture(n)).sha256 for n in range(len(KINDS))]
    base = dict(source="infoseek", answer="Ur Sta", aliases=["Ur Sta"], concept=None, concept_count=None,
                entity_text=None)
    ws.insert("items", [dict(base, item_id=f"it{n}-{k}", question=f"Who built this? #{k}", image_sha256=sha)
                        for n, (k, sha) in enumerate(zip(KINDS, shas, strict=True))]
              + [dict(base, item_id="no-image", question="Who built this? #known", image_sha256=None)])


def probe(ws: Workspace, executor: str, base_url: str, search_url: str) -> StageStats:
    llm = {"endpoints": [{"base_url": base_url, "api_key_env": None}], "model": "fake-model",
           "max_retries": 0, "max_concurrency": MAX_CONCURRENCY}
    config = RunConfig(workspace=ws.root, executor=executor, batch_size=8,  # 2 items (8 rollouts) per chunk
                       probe=ProbeConfig(backend="openai", k=K, llm=llm),
                       search={"backend": "http", "service": {"url": search_url}})
    return execute_stage(ProbeStage(), ws, config, QUIET)


def written(ws: Workspace) -> tuple[list, list, list]:
    """labels, probe_rollouts and rejects, with what legitimately differs between two runs taken out:
    the label's time and each search call's duration."""
    labels = []
    for *cols, prov in ws.execute("SELECT item_id, search_label, p_direct, p_search, probe_k, probe_method, "
                                  "provenance FROM labels ORDER BY item_id"):
        prov = json.loads(prov)
        assert prov["probe"].pop("time")
        labels.append((*cols, prov))
    rollouts = []
    for *cols, traj in ws.execute(
            "SELECT * EXCLUDE (trajectory), trajectory FROM probe_rollouts ORDER BY ALL"):
        traj = json.loads(traj)
        for call in traj["tool_calls"]:
            assert call.pop("seconds") >= 0
        rollouts.append((*cols, traj))
    rejects = ws.execute("SELECT key, reason, detail FROM rejects WHERE stage = 'probe' ORDER BY key")
    return labels, rollouts, rejects


def requests(srv: Any) -> Counter[str]:
    """The chat requests the server answered since its last reset, by canonical body."""
    return Counter(json.dumps(b, sort_keys=True) for b in srv.chat_bodies(status=200))


def test_ray_probe_writes_the_local_rows_and_makes_each_call_once(tmp_path: Path, ray_cluster: Any):
    from support.fake_openai import FakeOpenAI
    from support.search_service import serve_search

    backend, model = StubBackend(), Model()
    service_tools = SearchTools(SearchConfig(cache={"enabled": False}), backend)
    with (FakeOpenAI(model) as srv, serve_search(service_tools) as search_url,
          Workspace(tmp_path / "local") as local, Workspace(tmp_path / "ray") as remote):
        fill(local)
        fill(remote)
        local_stats = probe(local, "local", srv.base_url, search_url)
        local_calls, local_search = requests(srv), Counter(backend.calls)
        srv.reset_records()
        backend.calls.clear()
        model.peak, model.delay = 0, 0.1  # long enough for the two workers' requests to overlap

        ray_stats = probe(remote, "ray", srv.base_url, search_url)
        ray_calls, ray_search = requests(srv), Counter(backend.calls)
        assert srv.count("POST", "/v1/chat/completions") == sum(ray_calls.values())  # no failed calls either
        peak, model.delay = model.peak, 0.0
        assert written(remote) == written(local)

        srv.reset_records()
        probe(remote, "ray", srv.base_url, search_url)  # nothing left to do
        ProbeStage().reset(remote)  # `--force probe`: every rollout again, all from the one cache
        again = probe(remote, "ray", srv.base_url, search_url)
        assert srv.count() == 0
        labels, rollouts, rejects = written(local)
        assert written(remote) == (labels, rollouts, rejects)

    n_items = len(KINDS)
    assert len(labels) == n_items and len(rollouts) == n_items * 2 * K
    assert {lab[1] for lab in labels} == {"search_free", "image_search_required", "text_search_required",
                                          "unanswerable"}
    assert [r[:2] for r in rejects] == [("no-image", "image_missing")]
    # each distinct request exactly once on each path, the same requests on both
    assert ray_calls == local_calls and set(ray_calls.values()) == {1}
    assert ray_search == local_search and ray_search["image"] == 2 * K  # 2 image items x k search rollouts
    # spend booked on the driver from the workers' ledgers; the forced re-run only hit the cache
    n_calls = sum(local_calls.values())
    assert local_stats.paid_calls == ray_stats.paid_calls == n_calls and ray_stats.cache_hits == 0
    assert again.paid_calls == 0 and again.cache_hits == n_calls
    assert ray_stats.n_out == again.n_out == n_items and ray_stats.rejected == {"image_missing": 1}
    # two workers share probe.llm.max_concurrency: together never more in flight than configured
    assert 1 <= peak <= MAX_CONCURRENCY
    assert any("Ray" in n or "labels:" in n for n in ray_stats.notes)


def test_an_endpoint_refusing_the_key_stops_the_ray_probe_with_one_line(tmp_path: Path, ray_cluster: Any):
    """A 401 in a worker is a configuration error on the driver, as locally: no rows, no rejects."""
    import pytest
    from support.fake_openai import FakeOpenAI, Reply, error_body

    from fvqa.errors import ConfigError

    refusing = FakeOpenAI(lambda body: Reply(401, error_body("bad key")))
    with refusing as srv, Workspace(tmp_path / "ws") as ws:
        fill(ws)
        with pytest.raises(ConfigError, match=r"refused .*probe\.llm\.endpoints\[\]\.api_key_env"):
            probe(ws, "ray", srv.base_url, "http://127.0.0.1:9")
        assert ws.count("labels") == ws.count("probe_rollouts") == ws.count("rejects") == 0
