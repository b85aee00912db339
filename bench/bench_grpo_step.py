"""One GRPO step on CPU through veRL's own trainer (`fvqa train run -c configs/grpo_demo_cpu.yaml`).

Builds the demo workspace and the primed tiny policy in a temp folder, runs the stock trainer for a
few steps (no checkpoint, no validation, so a step is rollout + log-probs + advantage + update +
weight sync), and prints per the bench convention (`name: ours=<v> anchor=<v> ratio=<v>`):

- `grpo_rollout_s_per_step`: veRL's rollout wall time per step (`timing_s/gen`: agent loop, search
  calls, Ray RPC, token merging) vs the seconds the same step spent inside `transformers.generate`
  on the same prompts (counted by the hf generation server itself). The ratio is the veRL path's
  overhead over bare generation.
- `grpo_update_s_per_step`: the FSDP2 actor update (`timing_s/update_actor`) vs a plain PyTorch
  forward/backward/AdamW step of the same model on the same number of tokens, in this process.
- `grpo_peak_pss_gb`: peak memory of the whole run's process tree (driver, Ray, workers, search
  service) as summed PSS (shared pages counted once) vs the bare model plus one generate in a
  fresh process.

The first step is warm-up (imports, compilation caches) and is left out of the means.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
FVQA = [sys.executable, "-m", "fvqa.cli"]
SYNC = re.compile(r"weights synced: \d+ tensors, step (\d+), .*?(\d+) requests, (\d+) tokens, ([0-9.]+) s in generate")


def _run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run([*FVQA, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"fvqa {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _demo_config(root: Path) -> Path:
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["workspace"] = str(root / "ws")
    data["world"]["path"] = str(root / "world")
    data["search"]["local"]["index_dir"] = str(root / "search-index")
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class PeakRss:
    """Peak summed PSS of a process and all its descendants, sampled every 0.5 s (PSS, not RSS:
    Ray's workers share torch's pages, which summed RSS would count once per process)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_full_info().pss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(0.5)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def anchor_update_s(policy: Path, n_seqs: int, seqlen: int, repeats: int = 3) -> float:
    """Plain PyTorch: forward + backward + AdamW step of the policy on `n_seqs x seqlen` tokens."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForImageTextToText.from_pretrained(str(policy), dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab - 16, (n_seqs, seqlen))
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / repeats


def anchor_rss(policy: Path) -> int:
    """PSS of a fresh process holding the policy after one generate (the bare-model floor)."""
    code = (
        "import torch, psutil\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(policy)!r}).eval()\n"
        "ids = torch.tensor([[1, 2, 3, 4]])\n"
        "m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)\n"
        "print(psutil.Process().memory_full_info().pss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 steps (2 measured) instead of 5")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    steps = 3 if args.quick else 5
    root = Path(tempfile.mkdtemp(prefix="fvqa-bench-grpo-"))
    ray_dir = Path(tempfile.mkdtemp(prefix="fvqa-ray-", dir="/tmp"))
    try:
        demo = _demo_config(root)
        _run(["build", "--config", str(demo)], root)
        _run(["train", "prepare", "--workspace", str(root / "ws")], root)
        _run(["demo", "policy", "--workspace", str(root / "ws"), "--out", str(root / "policy")], root)
        ckpt = root / "ckpt"
        cmd = [*FVQA, "train", "run", "--config", str(REPO / "configs" / "grpo_demo_cpu.yaml"),
               f"actor_rollout_ref.model.path={root / 'policy'}",
               f"data.train_files={root / 'ws/exports/verl/train.parquet'}",
               f"data.val_files={root / 'ws/exports/verl/val.parquet'}",
               f"fvqa.search_config={demo}", f"trainer.default_local_dir={ckpt}",
               f"trainer.total_training_steps={steps}", "trainer.save_freq=-1", "trainer.test_freq=-1",
               "trainer.rollout_data_dir=null", "trainer.validation_data_dir=null",
               f"+ray_kwargs.ray_init._temp_dir={ray_dir}"]
        log = root / "train.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1"})
            rss = PeakRss(proc.pid)
            code = proc.wait()
            peak = rss.stop()
        text = log.read_text(errors="replace")
        if code != 0:
            raise SystemExit(f"training failed ({code}):\n" + "\n".join(text.splitlines()[-40:]))
        metrics: dict[int, dict[str, Any]] = {}
        for path in (ckpt / "metrics").glob("run-*.jsonl"):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                metrics[row["step"]] = row["data"]
        # The sync after step N reports what step N's rollout generated.
        generated = {int(s) + 1: (int(r), int(t), float(g)) for s, r, t, g in SYNC.findall(text)}
        measured = [s for s in sorted(metrics) if s >= 2]
        gen = sum(metrics[s]["timing_s/gen"] for s in measured) / len(measured)
        bare = sum(generated[s][2] for s in measured) / len(measured)
        update = sum(metrics[s]["timing_s/update_actor"] for s in measured) / len(measured)
        seqs = int(round(sum(metrics[s]["global_seqlen/mean"] for s in measured) / len(measured)))
        n_traj = 2 * 4  # train_batch_size x rollout.n in grpo_demo_cpu.yaml
        anchor_upd = anchor_update_s(root / "policy", n_traj, max(1, seqs // n_traj))
        bare_rss = anchor_rss(root / "policy")
        tokens = sum(generated[s][1] for s in measured) / len(measured)
        print(f"# {len(measured)} measured steps; {tokens:.0f} generated tokens and "
              f"{sum(generated[s][0] for s in measured) / len(measured):.0f} generate calls per step; "
              f"step {sum(metrics[s]['timing_s/step'] for s in measured) / len(measured):.1f} s")
        print(f"grpo_rollout_s_per_step: ours={gen:.2f} anchor={bare:.2f} ratio={gen / bare:.2f}")
        print(f"grpo_update_s_per_step: ours={update:.2f} anchor={anchor_upd:.2f} ratio={update / anchor_upd:.2f}")
        print(f"grpo_peak_pss_gb: ours={peak / 1e9:.2f} anchor={bare_rss / 1e9:.2f} ratio={peak / bare_rss:.2f}")
    finally:
        subprocess.run(["pkill", "-9", "-f", str(ray_dir)], check=False)
        shutil.rmtree(ray_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
