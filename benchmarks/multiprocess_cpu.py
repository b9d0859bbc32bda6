"""1 vs 2 CPU processes on the same global batch: time per step, and that each pair / prompt is counted once.

Runs ``udrra train`` as a user would, once as one process and once under ``accelerate launch --multi_gpu
--num_processes 2`` (on a machine without GPUs udrra trains on 2 CPU processes with gloo), on the same global
batch, for an offline (DPO on HH-RLHF) and an online (GRPO on TinyStories prompts with the VADER reward) run of
SmolLM2-135M-Instruct, and the same two on the tiny test model. Each run's ``metrics.json`` gives the seconds per
step (mean over steps after the first), the pairs / prompts seen (must be steps × global batch) and the layout.
Threads: the 1-process run gets ``--threads 2`` (both cores), each of the 2 processes ``--threads 1``.

    python benchmarks/multiprocess_cpu.py [--only tiny|smollm2] [--steps N]

Writes ``benchmarks/results/multiprocess_cpu.{json,md}``. Run it with the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import ROOT, cpu_model, git_state, versions

RESULTS = ROOT / "benchmarks" / "results"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, processes: int, out: Path) -> dict:
    """One ``udrra train`` run; returns its layout, timing and counts."""
    cmd = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(_port()), "-m", "udrra.cli"] if processes > 1 else [sys.executable, "-m", "udrra.cli"])
    threads = "2" if processes == 1 else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    t0 = time.time()
    r = subprocess.run(cmd + args + ["--threads", threads, "--output-dir", str(out), "--no-progress"], env=env,
                       capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd + args)}\n{r.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    seen = m.get("pairs_seen", m.get("prompts_seen"))
    return {"processes": processes, "threads_per_process": int(threads), **m["parallel"],
            "seconds_per_step": m["seconds_per_step"], "wall_s": wall, "seen": seen,
            "seen_expected": m["config"]["max_steps"] * m["parallel"]["global_batch_size"],
            "final_loss": m["log_history"][-1]["train/loss"]}


def cases(steps: int, tiny: dict):
    smol_off = ["train", "dpo", "--model", "smollm2-135m", "--dataset", "hh-rlhf", "--max-length", "256",
                "--eval-pairs", "0", "--max-steps", str(steps)]
    smol_on = ["train", "grpo", "--set", "source.n=4", "--model", "smollm2-135m", "--prompts", "tinystories",
               "--reward", "vader", "--max-new-tokens", "24", "--eval-prompts", "0", "--sample-steps", "0",
               "--max-steps", str(steps)]
    tiny_off = ["train", "dpo", "--model", tiny["model"], "--dataset", tiny["pairs"], "--max-length", "48",
                "--eval-pairs", "0", "--max-steps", str(steps), "--lr", "1e-3"]
    tiny_on = ["train", "grpo", "--set", "source.n=4", "--model", tiny["model"], "--prompts", tiny["prompts"],
               "--reward", tiny["reward"], "--max-new-tokens", "16", "--eval-prompts", "0", "--sample-steps", "0",
               "--max-steps", str(steps), "--lr", "1e-3"]
    return {"tiny": [("tiny DPO (16 pairs/step)", tiny_off, 16), ("tiny GRPO (8 prompts x 4/step)", tiny_on, 8)],
            "smollm2": [("SmolLM2-135M DPO, HH-RLHF (8 pairs/step)", smol_off, 8),
                        ("SmolLM2-135M GRPO n=4, TinyStories/VADER (4 prompts x 4/step)", smol_on, 4)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["tiny", "smollm2"], default=None)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_fixtures import write_inputs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_inputs(Path(tmp) / "inputs")
        for group, items in cases(a.steps, tiny).items():
            if a.only and group != a.only:
                continue
            for name, args, global_batch in items:
                for n in (1, 2):
                    r = run(args + ["--batch-size", str(global_batch // n)], n, Path(tmp) / f"{group}-{len(rows)}")
                    rows.append({"case": name, **r})
                    print(f"{name:60s} {n} proc: {r['seconds_per_step']:.3f} s/step, seen {r['seen']} "
                          f"(expected {r['seen_expected']})", flush=True)
    info = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "git": git_state(),
            "versions": versions(["torch", "transformers", "accelerate"]), "steps": a.steps, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "multiprocess_cpu.json").write_text(json.dumps(info, indent=2))
    lines = [f"# 1 vs 2 CPU processes, same global batch ({info['machine']})", "",
             f"`python benchmarks/multiprocess_cpu.py --steps {a.steps}`; commit {info['git']['commit']}; "
             f"{info['versions']}. Seconds per step = mean over steps after the first (metrics.json).", "",
             "| run | processes x threads | batch per process | global batch | s/step | counted | expected |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['processes']} x {r['threads_per_process']} | {r['batch_size_per_process']} "
                     f"| {r['global_batch_size']} | {r['seconds_per_step']:.3f} | {r['seen']} | {r['seen_expected']} |")
    (RESULTS / "multiprocess_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
