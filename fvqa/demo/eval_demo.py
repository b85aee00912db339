"""`fvqa demo eval` (`make eval-demo`): the whole judged evaluation on the offline demo world.

What it puts together, each piece real except the labelled stand-ins:
- the five benchmarks in their official file layouts, written from the demo build (FVQA-test from the
  build's own test split, the other four from the fictional world: `fvqa.demo.benchmarks`);
- the policy `make demo` trained (GRPO checkpoint; else the SFT one; else the untrained tiny base
  model), named in the output;
- the demo build's local search index;
- a loopback stand-in for the GPT-4o judge (`fvqa.demo.judge_server`: substring match, labelled);
then `fvqa eval run` with the config's protocol and the report. Nothing leaves the machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fvqa.errors import FvqaError

if TYPE_CHECKING:
    from fvqa.eval.config import EvalConfig

BENCH_DIR = "demo-eval/benchmarks"
STANDIN_NOTE = ("DEMO STAND-INS: fictional world, a tiny 2-layer demo policy, and a substring-match "
                "judge on loopback in place of GPT-4o; the numbers show the harness works, not what any model achieves")


@dataclass
class EvalDemoResult:
    report_md: Path
    report_html: Path
    model_path: Path
    model_label: str


def pick_model(workspace: Path, configured: Path | None) -> tuple[Path, str]:
    """The newest demo policy that exists: the configured path, else the SFT checkpoint, else the base."""
    candidates = [
        (configured, "the GRPO policy `make demo` trained"),
        (workspace / "checkpoints" / "fvqa_demo_sft" / "tiny_qwen2_5_vl" / "huggingface",
         "the SFT checkpoint (no GRPO checkpoint found)"),
        (workspace / "demo-tiny-model", "the untrained tiny base model (no trained checkpoint found)"),
    ]
    for path, label in candidates:
        if path is not None and (Path(path) / "config.json").is_file():
            return Path(path), label
    raise FvqaError(f"no demo model under {workspace}: run `make demo` first (it trains the policy this evaluates)")


def run_eval_demo(cfg: EvalConfig, *, world: Path | None = None, n_items: int | None = None,
                  log: Callable[[str], None] = lambda _: None) -> EvalDemoResult:
    """Write the benchmark files, start the stand-in judge, run the eval `cfg` describes, report.

    `world` is the demo world the build read (default: `<workspace>/demo-world`, where `make demo`
    writes it)."""
    from fvqa.demo.benchmarks import write_demo_benchmarks
    from fvqa.demo.judge_server import StandInJudge
    from fvqa.eval.report import build_report
    from fvqa.eval.runner import run_eval
    from fvqa.store import Workspace

    ws_root = cfg.workspace
    world = world or ws_root / "demo-world"
    fvqa_test = ws_root / "exports" / "upstream" / "fvqa_test.parquet"
    if not (world / "entities.jsonl").is_file() or not fvqa_test.is_file():
        raise FvqaError(f"no demo build in {ws_root}: run `make demo` first")
    specs = write_demo_benchmarks(world, ws_root / BENCH_DIR, fvqa_test=fvqa_test, **({"n": n_items} if n_items else {}))
    log(f"benchmarks (official layouts, from the demo world): {ws_root / BENCH_DIR}  ({', '.join(specs)})")
    cfg.notes.append(STANDIN_NOTE)  # the report says what the demo stands in for
    model = cfg.models[0]
    path, label = pick_model(ws_root, model.model_path)
    model.model_path = path
    log(f"model {model.name}: {label}: {path}")
    with StandInJudge() as judge:
        if cfg.judge.enabled and cfg.judge.llm is not None:
            cfg.judge.llm.endpoints[0].base_url = judge.base_url
            log(f"judge: DEMO STAND-IN on {judge.base_url} (substring match, not GPT-4o)")
        run_eval(cfg, log=log)
    with Workspace(cfg.workspace, read_only=True) as ws:
        files = build_report(ws, cfg.run)
    return EvalDemoResult(files.markdown, files.html, path, label)
