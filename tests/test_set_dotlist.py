"""`--set` follows OmegaConf's dotlist: bracket and dotted list indices, OmegaConf's value grammar."""

from __future__ import annotations

from pathlib import Path

import pytest

from fvqa.configfile import apply_override
from fvqa.errors import ConfigError


def test_bracket_and_dotted_indices_set_the_same_item_and_return_its_key_path() -> None:
    for key in ("models.1.name", "models[1].name"):
        data = {"models": [{"name": "a"}, {"name": "b"}]}
        assert apply_override(data, f"{key}=x") == ("models", 1, "name")  # the path resolver's cli_keys
        assert data == {"models": [{"name": "a"}, {"name": "x"}]}
    data: dict = {}
    assert apply_override(data, "judge.sampling.temperature=0") == ("judge", "sampling", "temperature")
    assert data == {"judge": {"sampling": {"temperature": 0}}}  # missing sections are created


def test_values_use_omegaconfs_grammar() -> None:
    data: dict = {"workflows": ["rag"]}
    apply_override(data, "lr=1e-3")  # PyYAML 1.1 would keep "1e-3" a string
    apply_override(data, "version=2024-11-20")  # a date stays the text written, not a datetime.date
    apply_override(data, "workflows=[direct, rag]")
    apply_override(data, "judge={model: m, temperature: 0.5}")  # a mapping replaces the section whole
    assert data == {"lr": 0.001, "version": "2024-11-20", "workflows": ["direct", "rag"],
                    "judge": {"model": "m", "temperature": 0.5}}


def test_malformed_keys_and_values_are_one_clear_line() -> None:
    for bad, msg in [
        ("models[1.name=x", r"--set models\[1\.name: a list index is written \[number\] or \.number"),
        ("a..b=1", r"--set a\.\.b: empty key part"),
        ("=1", r"empty key part"),
        ("x=${", r"--set x: not a valid OmegaConf value .*opens an interpolation"),
        ("x={a: 1, a: 2}", r"--set x: the value is not valid YAML .*duplicate key 'a'"),
        ("x.y[0]=1", r"'x\.y' is not set, so it has no item 0"),
        ("models[5].name=1", r"'models' has 1 item\(s\), so no item 5"),
    ]:
        with pytest.raises(ConfigError, match=msg) as info:
            apply_override({"models": [{"name": "a"}]}, bad)
        assert "\n" not in str(info.value)


def test_bracket_index_set_path_stays_cwd_relative(tmp_path: Path) -> None:
    from fvqa.config import load_config

    build = tmp_path / "b.yaml"
    build.write_text("split:\n  contamination_files: [a.jsonl, b.jsonl]\n")
    cfg = load_config(build, ["split.contamination_files[1]=c.jsonl"])
    assert cfg.split.contamination_files == [tmp_path / "a.jsonl", Path("c.jsonl")]
