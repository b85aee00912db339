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
        load_config(None, ["search.local.index_dirr=/tmp/x"])
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match=r"'search\.options\.local\.index_dirr'"):
        load_config(None, ["search.options.local.index_dirr=/tmp/x"])  # the old form: the path as written


def test_probe_eval_and_training_share_one_limits_model(tmp_path):
    from fvqa.eval.config import EvalConfig
    from fvqa.protocol import Limits
    from fvqa.train.agent_loop import LoopSettings

    cfg = load_config(None, ["probe.limits.max_rounds=4", "probe.limits.max_text_search=3"])
    assert cfg.probe.limits == Limits(max_rounds=4, max_text_search=3)
    assert type(EvalConfig.model_fields["limits"].default_factory()) is Limits
    assert type(LoopSettings().limits) is Limits
    p = tmp_path / "c.yaml"
    p.write_text("probe:\n  limits:\n    max_rond: 4\n")
    with pytest.raises(ConfigError, match=r"probe\.limits\.max_rond"):
        load_config(p)
    # The old flat keys still load (with a deprecation warning), into the same model.
    p.write_text("probe:\n  max_rounds: 4\n  max_text_search: 3\n")
    with pytest.warns(DeprecationWarning, match="probe.limits"):
        old = load_config(p)
    assert old.probe.limits == cfg.probe.limits
