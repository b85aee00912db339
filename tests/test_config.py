"""Config loading: unknown keys and malformed YAML are one clear error naming the problem."""

from __future__ import annotations

import pytest

from fvqa.config import load_config, redacted
from fvqa.errors import ConfigError


def test_unknown_key_names_its_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("crawl:\n  max_sid: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'crawl\.max_sid'"):
        load_config(p)


def test_malformed_yaml_gives_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("crawl:\n  max_side: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML.*line"):
        load_config(p)


def test_missing_file_and_bad_type(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "c.yaml"
    p.write_text("crawl:\n  max_side: big\n")
    with pytest.raises(ConfigError, match="crawl.max_side"):
        load_config(p)


def test_overrides_and_redaction(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("generate:\n  backend: llm\n  llm:\n    model: gpt-4o\n")
    cfg = load_config(p, ["generate.llm.model=gpt-4o-mini", "infoseek.n=12"])
    assert cfg.generate.llm.model == "gpt-4o-mini"
    assert cfg.infoseek.n == 12
    shown = redacted(cfg)
    assert shown["generate"]["llm"]["endpoints"][0]["api_key_env"] == "OPENAI_API_KEY"  # a name, kept
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["infoseek.n"])
    leaked = redacted(load_config(p, ["generate.llm.extra_body.api_key=sk-live-123"]))
    assert leaked["generate"]["llm"]["extra_body"]["api_key"] == "***"


def test_section_hash_changes_with_settings():
    a = load_config(None)
    b = load_config(None, ["infoseek.n=5"])
    assert a.section_hash("infoseek") != b.section_hash("infoseek")
    assert a.section_hash("crawl") == b.section_hash("crawl")


def test_unknown_search_option_is_an_error_at_load_time():
    with pytest.raises(ConfigError, match=r"unknown key 'search\.local\.index_dirr'"):
        load_config(None, ["search.options.local.index_dirr=/tmp/x"])
