"""One config tree: the build's and the eval's configs share the loader (YAML, `--set`, error lines,
relative paths) and the typed `search` section; the demo world's paths are filled in at load."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import yaml

from fvqa.config import load_config
from fvqa.errors import ConfigError
from fvqa.eval.config import load_eval_config
from fvqa.search.config import SearchConfig

REPO = Path(__file__).resolve().parents[1]
EVAL_MIN = {
    "models": [{"name": "m", "backend": "transformers", "model_path": "/models/m"}],
    "benchmarks": [{"name": "b", "kind": "livevqa", "path": "data/b.jsonl"}],
    "primary_metric": "em",
}


def _write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_search_typo_in_an_eval_config_is_a_load_time_error_naming_the_path_written(tmp_path: Path) -> None:
    new = _write(tmp_path / "new.yaml", {**EVAL_MIN, "search": {"backend": "local", "local": {"index_dri": "ix"}}})
    with pytest.raises(ConfigError, match=r"unknown key 'search\.local\.index_dri'"):
        load_eval_config(new)
    old = _write(tmp_path / "old.yaml", {**EVAL_MIN, "search": {"backend": "local",
                                                                "options": {"local": {"index_dri": "ix"}}}})
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError) as exc:
        load_eval_config(old)
    assert "unknown key 'search.options.local.index_dri'" in str(exc.value)
    # the build config names the same paths (validators' messages too)
    with pytest.raises(ConfigError, match=r"'search\.web\.base_url': base_url must start with http"):
        load_config(None, ["search.web.base_url=ftp://x"])
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match=r"'search\.options\.top_k'"):
        load_config(None, ["search.options.top_k=0"])


def test_old_options_form_still_loads_with_a_deprecation_warning(tmp_path: Path) -> None:
    old = _write(tmp_path / "c.yaml", "search:\n  backend: local\n  options:\n    top_k: 3\n"
                                      "    local: {index_dir: ix, clip_model: fvqa-tiny}\n")
    with pytest.warns(DeprecationWarning, match="search.options is deprecated"):
        cfg = load_config(old)
    assert isinstance(cfg.search, SearchConfig) and cfg.search.top_k == 3
    assert cfg.search.local.clip_model == "fvqa-tiny" and cfg.search.local.index_dir == tmp_path / "ix"
    with pytest.warns(DeprecationWarning):
        ev = load_eval_config(_write(tmp_path / "e.yaml", {**EVAL_MIN, "search": {"options": {"top_k": 4}}}))
    assert ev.search.top_k == 4
    both = _write(tmp_path / "both.yaml", "search:\n  top_k: 3\n  options: {top_k: 4}\n")
    with pytest.raises(ConfigError, match=r"'search': top_k set both directly and under options"):
        load_config(both)
    # --set in the old form is still a cwd-relative path
    with pytest.warns(DeprecationWarning):
        cli = load_config(old, ["search.options.local.index_dir=elsewhere"])
    assert cli.search.local.index_dir == Path("elsewhere")
    # the compat shim takes dicts of either form
    with pytest.warns(DeprecationWarning):
        assert SearchConfig.from_section({"backend": "web", "options": {"top_k": 2}}).top_k == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SearchConfig.from_section({"backend": "local", "top_k": 2}).top_k == 2


def test_shipped_configs_use_the_new_search_form() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        build = load_config(REPO / "configs" / "demo.yaml")
        ev = load_eval_config(REPO / "configs" / "eval_demo.yaml")
    assert build.workspace == REPO / "fvqa-work" == ev.workspace
    assert build.search.local.index_dir == REPO / "fvqa-work" / "search-index" == ev.search.local.index_dir


def test_list_index_overrides(tmp_path: Path) -> None:
    two = {**EVAL_MIN, "models": [EVAL_MIN["models"][0], {"name": "n", "backend": "transformers", "model_path": "/x"}],
           "benchmarks": [*EVAL_MIN["benchmarks"], {"name": "c", "kind": "fvqa", "path": "c.parquet"}]}
    path = _write(tmp_path / "e.yaml", two)
    cfg = load_eval_config(path, ["benchmarks.0.limit=5", "models.1.name=x", "workflows=[direct]"])
    assert cfg.benchmarks[0].limit == 5 and cfg.benchmarks[1].limit is None
    assert [m.name for m in cfg.models] == ["m", "x"] and cfg.workflows == ["direct"]
    for bad, msg in [
        ("benchmarks.2.limit=5", r"--set benchmarks\.2\.limit: 'benchmarks' has 2 item\(s\), so no item 2"),
        ("benchmarks.first.limit=5", r"'benchmarks' is a list; index it with a number, not 'first'"),
        ("run.0=x", r"--set run\.0: 'run' is not set, so it has no item 0"),
        ("sampling.0.x=1", r"'sampling' is not set, so it has no item 0"),
        ("models.0.name.x=1", r"'models\.0\.name' is str 'm', not a section"),
        ("benchmarks.0.limit", r"key=value"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_eval_config(path, [bad])
    build = _write(tmp_path / "b.yaml", "split:\n  contamination_files: [a.jsonl, b.jsonl]\n")
    cfg = load_config(build, ["split.contamination_files.1=c.jsonl"])
    assert cfg.split.contamination_files == [tmp_path / "a.jsonl", Path("c.jsonl")]  # --set: cwd-relative
    with pytest.raises(ConfigError, match=r"'crawl\.max_side' is int 768, not a list"):
        load_config(_write(tmp_path / "c.yaml", "crawl: {max_side: 768}\n"), ["crawl.max_side.0=1"])


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "conf"
    (conf / "models" / "local").mkdir(parents=True)
    build = _write(conf / "run.yaml", {
        "workspace": "ws", "concepts": {"metadata_path": "../data/meta.json"},
        "split": {"contamination_files": ["bench/a.jsonl", "/abs/b.jsonl"]},
        "probe": {"model_path": "Qwen/Qwen2.5-VL-7B-Instruct", "prompts": ["prompts"]},
        "search": {"local": {"index_dir": "ix"}, "replay": {"paths": ["cache.pkl"]}},
    })
    cfg = load_config(build, ["infoseek.jsonl=given.jsonl", "search.cache.dir=cache"])
    assert cfg.workspace == conf / "ws"
    assert cfg.concepts.metadata_path == tmp_path / "data" / "meta.json"  # normalised, absolute
    assert cfg.split.contamination_files == [conf / "bench" / "a.jsonl", Path("/abs/b.jsonl")]
    assert cfg.probe.prompts == [conf / "prompts"]
    assert cfg.probe.model_path == Path("Qwen/Qwen2.5-VL-7B-Instruct")  # a hub id: no such folder here
    assert cfg.search.local.index_dir == conf / "ix" and cfg.search.replay.paths == [conf / "cache.pkl"]
    assert cfg.infoseek.jsonl == Path("given.jsonl") and cfg.search.cache.dir == Path("cache")  # --set: cwd
    assert cfg.crawl.manifest is None and load_config(None).workspace == Path("fvqa-work")  # defaults: cwd
    assert load_config(None, ["workspace=~/w"]).workspace == Path.home() / "w"

    ev = load_eval_config(_write(conf / "eval.yaml", {
        **EVAL_MIN, "workspace": "ews", "models": [{"name": "m", "backend": "transformers", "model_path": "models/local"}],
        "judge": {"enabled": False, "prompt_path": "judge.yaml"}, "prompts": ["p.yaml"],
        "search": {"local": {"index_dir": "../ix"}},
    }), ["benchmarks.0.image_dir=imgs"])
    assert ev.workspace == conf / "ews" and ev.models[0].model_path == conf / "models" / "local"
    assert ev.benchmarks[0].path == conf / "data" / "b.jsonl" and ev.benchmarks[0].image_dir == Path("imgs")
    assert ev.judge.prompt_path == conf / "judge.yaml" and ev.prompts == [conf / "p.yaml"]
    assert ev.search.local.index_dir == tmp_path / "ix"


def test_loader_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("workspace: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"malformed YAML in .*m\.yaml at line 3, column 2: "):
        load_eval_config(_write(tmp_path / "m.yaml", "run: x\nmodels: [a\nb: 1\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_eval_config(_write(tmp_path / "l.yaml", "- a\n- b\n"))
    with pytest.raises(ConfigError, match="eval config not found"):
        load_eval_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'judge\.tempreature'"):
        load_eval_config(_write(tmp_path / "e.yaml", EVAL_MIN), ["judge.tempreature=0"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["crawl.max_side=[1,"])


def test_config_show_prints_the_demo_worlds_real_paths(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fvqa.cli import app

    conf = _write(tmp_path / "conf" / "run.yaml", {"world": {"path": "world"}, "infoseek": {"jsonl": "/own.jsonl"}})
    res = CliRunner().invoke(app, ["config", "show", "--config", str(conf)])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    world = tmp_path / "conf" / "world"
    assert shown["concepts"]["metadata_path"] == str(world / "metaclip" / "metadata.json")
    assert shown["concepts"]["counts_path"] == str(world / "metaclip" / "entry_counts.json")
    assert shown["concepts"]["categories_path"] == str(world / "entities.jsonl")
    assert shown["match"]["pool"] == str(world / "web" / "caption_pool.parquet")
    assert shown["crawl"]["manifest"] == str(world / "web" / "images.jsonl")
    assert shown["index"] == {"enabled": True, "corpus": str(world / "web" / "pages.jsonl"),
                              "images": str(world / "web" / "images.jsonl")}
    assert shown["probe"]["counts_path"] == str(world / "metaclip" / "entry_counts.json")
    # a main InfoSeek file of one's own keeps its own companions (found beside it by the stage)
    assert shown["infoseek"]["jsonl"] == "/own.jsonl" and shown["infoseek"]["withkb"] is None
    assert shown["infoseek"]["image_dir"] == str(world / "infoseek" / "images")
    res = CliRunner().invoke(app, ["config", "show"])
    assert res.exit_code == 0 and yaml.safe_load(res.output)["concepts"]["metadata_path"] is None  # no world


def test_world_optional_files_only_when_present(tmp_path: Path, demo_world: Path) -> None:
    (tmp_path / "world.json").write_text("{}")  # an existing world without entities / companions
    cfg = load_config(None, [f"world.path={tmp_path}"])
    assert cfg.concepts.metadata_path == tmp_path / "metaclip" / "metadata.json"
    assert cfg.concepts.categories_path is None and cfg.infoseek.withkb is None and cfg.probe.counts_path is None
    real = load_config(None, [f"world.path={demo_world}", "concepts.use_match_counts=true"])
    assert real.concepts.counts_path is None  # counts come from `match`
    assert real.probe.counts_path == demo_world / "metaclip" / "entry_counts.json"
    assert real.infoseek.qtype == demo_world / "infoseek" / "infoseek_train_qtype.jsonl"
    own = load_config(None, [f"world.path={demo_world}", f"concepts.counts_path={tmp_path / 'c.json'}"])
    assert own.probe.counts_path is None  # the concepts' file is not there: the prior uses the table only
    (tmp_path / "c.json").write_text("{}")
    own = load_config(None, [f"world.path={demo_world}", f"concepts.counts_path={tmp_path / 'c.json'}"])
    assert own.probe.counts_path == tmp_path / "c.json"


def test_search_config_does_not_import_the_run_config() -> None:
    tree = ast.parse((REPO / "fvqa" / "search" / "config.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and (m == "fvqa.config" or m.startswith("fvqa.eval"))}
    loader = ast.parse((REPO / "fvqa" / "configfile.py").read_text())
    assert {n.module for n in ast.walk(loader) if isinstance(n, ast.ImportFrom) and
            (n.module or "").startswith("fvqa")} == {"fvqa.errors"}
    import subprocess
    import sys

    code = "import sys, fvqa.search.config; sys.exit('fvqa.config' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_search_commands_read_any_configs_search_section(tmp_path: Path) -> None:
    from fvqa.search.config import load_search_file

    ev = _write(tmp_path / "conf" / "eval.yaml", {**EVAL_MIN, "workspace": "ws", "search": {"local": {"index_dir": "ix"}}})
    found = load_search_file(ev, ["search.top_k=3"])
    assert found.search.local.index_dir == tmp_path / "conf" / "ix" and found.search.top_k == 3
    assert found.cache_dir == tmp_path / "conf" / "ws" / "cache" / "search"
    assert load_search_file(REPO / "configs" / "demo.yaml").search.local.clip_model == "fvqa-tiny"
    with pytest.raises(ConfigError, match=r"--set crawl\.max_side: the search commands read only"):
        load_search_file(ev, ["crawl.max_side=5"])
    with pytest.raises(ConfigError, match=r"unknown key 'search\.local\.index_dri'"):
        load_search_file(ev, ["search.local.index_dri=x"])


def test_the_cli_notes_an_old_config_form_in_one_line(tmp_path: Path) -> None:
    """Python hides DeprecationWarnings by default: the CLI prints ours as a note naming the new form."""
    import subprocess

    from support.paths import FVQA

    cfg = tmp_path / "old.yaml"
    cfg.write_text(yaml.safe_dump({"search": {"backend": "local", "options": {"top_k": 3}}}))
    out = subprocess.run([*FVQA, "config", "show", "-c", str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "note: search.options is deprecated" in out.stderr and "Warning" not in out.stderr
    assert "top_k: 3" in out.stdout
