"""`search.summarizer`: the LLM page summariser through the shared client, its cache and cost hook."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from support.fake_openai import FakeOpenAI, last_user_text

from fvqa.errors import ConfigError
from fvqa.search import tools as tools_mod
from fvqa.search.config import SearchConfig
from fvqa.search.types import Candidate, ImageHit, QueryImage

PAGES = {
    "https://example.org/kalo": "The Kalo tower stands in Veld. It was built in 1851 by Ada Marsh. It is 40 m tall.",
    "https://example.org/veld": "Veld is a town on the river Orn. Its market is famous. The Kalo tower is there.",
}


class PagesBackend:
    """Two fixed pages for any query (the summariser, not retrieval, is under test)."""

    name = "pages"
    cache_pages = True

    def image_search(self, image: QueryImage, k: int) -> list[ImageHit]:
        return []

    def text_candidates(self, query: str, n: int) -> list[Candidate]:
        return [Candidate(url=u, title=u.rsplit("/", 1)[1]) for u in PAGES][:n]

    def read_page(self, candidate: Candidate) -> str:
        return PAGES[candidate.url]


def _summary(body: dict[str, Any]) -> str:
    text = last_user_text(body)
    page = text.split("Page:\n", 1)[1]
    return "SUMMARY of " + re.sub(r"\W+", " ", page.split(".")[0]).strip()


def _config(srv: FakeOpenAI, **summarizer: Any) -> SearchConfig:
    return SearchConfig.model_validate({
        "backend": "local", "top_k": 2,
        "summarizer": {"kind": "llm", "max_sentences": 2, "max_tokens": 64,
                       "llm": {"model": "qwen3-32b", "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "endpoints": [{"base_url": srv.base_url, "api_key_env": None}]},
                       **summarizer},
    })


@pytest.fixture(autouse=True)
def pages_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools_mod, "make_backend", lambda config, cost_hook=None: PagesBackend())


def test_llm_summarizer_serves_the_fakes_summaries_and_caches_them(tmp_path: Path):
    costs: list[tuple[str, int, float]] = []
    with FakeOpenAI(_summary) as srv:
        cfg = _config(srv)
        search_cache = tmp_path / "ws" / "cache" / "search"
        tools = tools_mod.make_search_tools(cfg, cache_dir=search_cache, cost_hook=lambda *a: costs.append(a))
        try:
            hits = tools.text_search("kalo tower builder", "Who built this tower?")
            assert [h.summary for h in hits] == ["SUMMARY of The Kalo tower stands in Veld",
                                                 "SUMMARY of Veld is a town on the river Orn"]
            bodies = srv.chat_bodies()
            assert len(bodies) == 2 and {b["model"] for b in bodies} == {"qwen3-32b"}
            assert all(b["max_tokens"] == 64 and "at most 2 sentences" in last_user_text(b)
                       and "Who built this tower?" in last_user_text(b) for b in bodies)
            assert [c[:2] for c in costs] == [("summary", 1), ("summary", 1)] and all(c[2] > 0 for c in costs)

            again = tools.text_search("kalo tower builder", "Who built this tower?")
            assert again == hits and len(srv.chat_bodies()) == 2 and len(costs) == 2  # no new request
        finally:
            tools.close()
        # the replies live in the workspace's LLM cache: a fresh search stack without its own search
        # cache (so the summary layer misses) still sends nothing
        assert (tmp_path / "ws" / "cache" / "llm").is_dir()
        cfg_nocache = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"enabled": False})})
        fresh = tools_mod.make_search_tools(cfg_nocache, cache_dir=search_cache, cost_hook=lambda *a: costs.append(a))
        try:
            assert fresh.text_search("kalo tower builder", "Who built this tower?") == hits
        finally:
            fresh.close()
        assert len(srv.chat_bodies()) == 2 and len(costs) == 2


def test_other_summarizer_settings_are_not_served_from_the_cache(tmp_path: Path):
    with FakeOpenAI(_summary) as srv:
        cache = tmp_path / "ws" / "cache" / "search"
        for n in (2, 3):
            tools = tools_mod.make_search_tools(_config(srv, max_sentences=n), cache_dir=cache)
            try:
                tools.text_search("kalo", "Who?")
            finally:
                tools.close()
        assert len(srv.chat_bodies()) == 4


def test_default_is_extractive_and_an_unset_key_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tools = tools_mod.make_search_tools(SearchConfig(top_k=1), cache_dir=tmp_path / "cache" / "search")
    try:
        assert tools.summarizer_id == "extractive-bm25"
        assert tools.text_search("kalo")[0].summary.startswith("The Kalo tower stands in Veld.")
    finally:
        tools.close()
    monkeypatch.delenv("FVQA_TEST_UNSET_SUMMARY_KEY", raising=False)
    cfg = SearchConfig.model_validate({"summarizer": {"kind": "llm", "llm": {"endpoints": [
        {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "FVQA_TEST_UNSET_SUMMARY_KEY"}]}}})
    with pytest.raises(ConfigError, match="FVQA_TEST_UNSET_SUMMARY_KEY is not set"):
        tools_mod.make_search_tools(cfg, cache_dir=tmp_path / "cache" / "search")
    assert SearchConfig.model_validate({"summarizer": {"kind": "llm"}}).summarizer.llm.model == "gpt-4o"
