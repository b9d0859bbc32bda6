"""The DPO paper's controlled-sentiment experiment (Rafailov et al. 2305.18290, §6.1, Fig. 2 left), CPU-sized.

Task: continue a TinyStories prefix (4–8 words, :data:`udrra.lm.prompts.TINYSTORIES_RULE`) so that the
continuation is positive. Ground-truth reward: VADER compound sentiment of the continuation (``vadersentiment``
3.3.2), in [−1, 1]. Policy and reference: SmolLM2-135M-Instruct (``smollm2-135m``), continuing raw text (no chat
template). Every algorithm trains the same model through ``udrra.lm`` (the one loop and the one log-prob op):

- online (``udrra.lm.online.train_online``): PPO (critic, GAE), GRPO, RLOO, ReMax, REINFORCE, online DPO;
- offline DPO on pairs built as the paper did: π_ref samples ``pair_samples`` completions of each of
  ``pair_prompts`` training prefixes, VADER labels them, and every ordered pair with different rewards is a
  preference pair (the paper: 4 completions → 6 pairs per prefix).

Evaluation (the frontier's axes): ``evaluate_generations`` on the same ``eval_prompts`` held-out prefixes, one
sample each at temperature 1: mean VADER reward and the sampled sequence KL(π‖π_ref) (k1, and k3 as a check),
the DPO paper's "sum of per-timestep KLs" (§6.1, fn. 3) estimated from samples. π_ref's own reward is measured
with the seeds of the repeated runs (its spread over evaluation seeds).

Usage (from the repository root; results go to ``--out``)::

    python experiments/sentiment_frontier.py                      # the committed CPU run (about 50 min, 1 core)
    python experiments/sentiment_frontier.py --scale gpu          # larger: more prompts, steps and tokens
    python experiments/sentiment_frontier.py --only grpo --steps 2  # a smoke run of one entry

Writes ``runs.jsonl`` (one line per run, appended as each finishes, so an interrupted run keeps what it did),
``table.md``, ``frontier.png``, ``report.md`` (setup, π_ref's reward over seeds, the best repeated entry, each
entry's change) and ``samples/`` (each online run's generations every 5 steps); ``--report-only`` rebuilds the
last three from ``runs.jsonl``. ``--jobs 2`` (default) trains two entries at once, one process and one torch
thread each: the committed CPU run.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

#: (name, algorithm, beta, seed): PPO, GRPO and DPO at three β each (frontiers), the rest at one; the best
#: policy-gradient entry repeated over three seeds.
CPU_RUNS = [
    ("grpo", "grpo", 0.01, 0), ("grpo", "grpo", 0.05, 0), ("grpo", "grpo", 0.2, 0),
    ("ppo", "ppo", 0.01, 0), ("ppo", "ppo", 0.05, 0), ("ppo", "ppo", 0.2, 0),
    ("rloo", "rloo", 0.05, 0), ("remax", "remax", 0.05, 0), ("reinforce", "reinforce", 0.05, 0),
    ("online_dpo", "online_dpo", 0.05, 0),
    ("dpo", "dpo", 0.05, 0), ("dpo", "dpo", 0.1, 0), ("dpo", "dpo", 0.5, 0),
    ("grpo", "grpo", 0.01, 1), ("grpo", "grpo", 0.01, 2),
]

SCALES = {
    "cpu": dict(steps=20, batch_size=4, n=4, max_new_tokens=24, eval_prompts=64, lr=3e-5, pair_prompts=64,
                pair_samples=4, dpo_batch=8, threads=1),
    "gpu": dict(steps=200, batch_size=16, n=8, max_new_tokens=48, eval_prompts=256, lr=1e-5, pair_prompts=1024,
                pair_samples=4, dpo_batch=32, threads=None),
}


def _online(entry, model, tok, reference, prompts, reward, sc, out: Path, work: Path, seed: int) -> Dict[str, Any]:
    import udrra
    from udrra.lm.online import OnlineConfig, train_online
    from udrra.lm.rollout import Sampling

    name, algo_name, beta, _ = entry
    overrides = {"target.beta": beta}
    src = udrra.load(algo_name).components.source
    if src.kind == "on_policy" and src.get("n") not in (None, 1):
        overrides["source.n"] = sc["n"]
    algo = udrra.load(algo_name, overrides)
    per_prompt = 2 if src.kind == "on_policy_pairs" else int(algo.components.source.get("n") or 1)
    batch = max(1, sc["batch_size"] * sc["n"] // per_prompt)       # the same samples per step for every entry
    cfg = OnlineConfig(max_steps=sc["steps"], batch_size=batch, learning_rate=sc["lr"], eval_before=False,
                       sampling=Sampling(max_new_tokens=sc["max_new_tokens"]), eval_prompts=sc["eval_prompts"],
                       seed=seed, threads=sc["threads"], sample_steps=5)
    run_dir = work / f"{name}-b{beta:g}-s{seed}"
    r = train_online(algo, (model, tok), prompts, reward, output_dir=run_dir, config=cfg, overwrite=True,
                     progress=False, verbose=False)
    (out / "samples").mkdir(exist_ok=True)
    shutil.copy(run_dir / "samples.jsonl", out / "samples" / f"{run_dir.name}.jsonl")
    shutil.rmtree(run_dir)                              # the checkpoint (270 MB) is not kept
    return {"eval": {k[5:]: v for k, v in r["eval_after"].items() if k.startswith("eval/")},
            "train_reward": [h.get("train/reward") for h in r["log_history"]],
            "train_kl_k1": [h.get("train/kl_k1") for h in r["log_history"]],
            "seconds_per_step": r["seconds_per_step"], "train_time_s": r["train_time_s"],
            "peak_rss_mb": r["peak_rss_mb"], "samples_per_step": batch * per_prompt}


def _pairs(reference, tok, train_prompts: List[str], reward, sc, seed: int, path: Path) -> Dict[str, Any]:
    """π_ref samples ``pair_samples`` completions per prefix; VADER labels every pair with different rewards."""
    from udrra.lm.prompts import tokenize_prompts
    from udrra.lm.rollout import Sampling, generate

    rng = random.Random(seed)
    chosen_prompts = rng.sample(train_prompts, sc["pair_prompts"])
    ids, _ = tokenize_prompts(tok, chosen_prompts, max_prompt_length=64)
    rows, t0 = [], time.time()
    torch.manual_seed(seed)
    for s in range(0, len(chosen_prompts), 8):
        ro = generate(reference, ids[s:s + 8], chosen_prompts[s:s + 8], Sampling(max_new_tokens=sc["max_new_tokens"]),
                      n=sc["pair_samples"], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      tokenizer=tok)
        r = reward(ro.row_prompts(), ro.responses).tolist()
        k = sc["pair_samples"]
        for g in range(len(ro.prompts)):
            for i, j in itertools.combinations(range(g * k, g * k + k), 2):
                a, b = ro.responses[i], ro.responses[j]
                if r[i] != r[j] and a != b and a.strip() and b.strip():  # the loader refuses empty responses
                    w, l = (i, j) if r[i] > r[j] else (j, i)
                    rows.append({"prompt": ro.prompts[g], "chosen": ro.responses[w], "rejected": ro.responses[l]})
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return {"pairs": len(rows), "prompts": len(chosen_prompts), "seconds": time.time() - t0}


def _offline_dpo(entry, model, tok, reference, pairs_path, eval_texts, eval_ids, reward, sc, work, seed):
    import udrra
    from udrra.lm.online import evaluate_generations
    from udrra.lm.rollout import Sampling
    from udrra.lm.train import train

    name, algo_name, beta, _ = entry
    algo = udrra.load(algo_name, {"target.beta": beta})
    run_dir = work / f"{name}-b{beta:g}-s{seed}"
    r = train(algo, model, str(pairs_path), tokenizer=tok, output_dir=run_dir,
              max_steps=sc["steps"], batch_size=sc["dpo_batch"], learning_rate=sc["lr"], max_length=128,
              max_prompt_length=64, eval_pairs=0, kl_prompts=0, seed=seed, overwrite=True, progress=False,
              verbose=False)
    shutil.rmtree(run_dir)
    ev = evaluate_generations(model, reference, eval_texts, eval_ids, reward, tok,
                              Sampling(max_new_tokens=sc["max_new_tokens"]), seed=seed + 1_000_003, batch_size=16)
    return {"eval": ev, "train_loss": [h.get("train/loss") for h in r["log_history"]],
            "seconds_per_step": r["seconds_per_step"], "train_time_s": r["train_time_s"],
            "peak_rss_mb": r["peak_rss_mb"], "samples_per_step": 2 * sc["dpo_batch"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="cpu (the committed run) or gpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reward", default="vader")
    ap.add_argument("--out", default="results/sentiment_frontier")
    ap.add_argument("--work", default="runs/sentiment_frontier", help="scratch space for checkpoints (deleted)")
    ap.add_argument("--only", nargs="*", help="run only these names (e.g. grpo dpo)")
    ap.add_argument("--steps", type=int, help="override the scale's steps")
    ap.add_argument("--report-only", action="store_true", help="rebuild table/plot/report from runs.jsonl")
    ap.add_argument("--jobs", type=int, default=2, help="entries trained at once, one process and one torch thread "
                    "each (default 2: the two cores of the CPU machine)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run: keep runs.jsonl and the DPO pairs, run only the missing entries")
    ap.add_argument("--redo", nargs="*", metavar="NAME", help="with --resume: rerun these entries too")
    ap.add_argument("--replace", action="store_true",
                    help="with --only: rerun those entries, replacing their lines in runs.jsonl (keeps the rest)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sc = dict(SCALES[args.scale])
    if args.steps:
        sc["steps"] = args.steps
    if not args.report_only:
        run_all(args, sc, out)
    write_report(out, sc, args)
    return 0


class _World:
    """What every entry shares: the model, its reference copy, tokenizer, reward and prompts (loaded once per
    process; a worker of ``--jobs`` loads its own)."""

    def __init__(self, model: str, reward: str, sc: Dict[str, Any]):
        from udrra.lm.models import load_model_and_tokenizer, make_reference
        from udrra.lm.prompts import load_prompts, tokenize_prompts
        from udrra.lm.rewards import load_reward

        if sc["threads"]:
            torch.set_num_threads(sc["threads"])
        self.sc = sc
        self.base, self.tok = load_model_and_tokenizer(model)
        self.reference = make_reference(self.base)
        self.reward = load_reward(reward)
        self.prompts = load_prompts("tinystories", self.tok, eval_prompts=sc["eval_prompts"])
        self.eval_ids, _ = tokenize_prompts(self.tok, self.prompts.eval, max_prompt_length=64)

    def reference_eval(self, seed: int) -> Dict[str, float]:
        from udrra.lm.online import evaluate_generations
        from udrra.lm.rollout import Sampling

        return evaluate_generations(self.reference, self.reference, self.prompts.eval, self.eval_ids, self.reward,
                                    self.tok, Sampling(max_new_tokens=self.sc["max_new_tokens"]),
                                    seed=seed + 1_000_003, batch_size=16)

    def run(self, entry, out: Path, work: Path, pairs_path: Path) -> Dict[str, Any]:
        name, algo_name, beta, seed = entry
        model = copy.deepcopy(self.base)
        t0 = time.time()
        if algo_name == "dpo":
            res = _offline_dpo(entry, model, self.tok, self.reference, pairs_path, self.prompts.eval, self.eval_ids,
                               self.reward, self.sc, work, seed)
        else:
            res = _online(entry, model, self.tok, self.reference, self.prompts, self.reward, self.sc, out, work, seed)
        res.update(kind="run", name=name, algorithm=algo_name, beta=beta, seed=seed, wall_s=time.time() - t0)
        return res


_WORKER: Dict[str, Any] = {}


def _worker_run(model: str, reward: str, sc, entry, out: Path, work: Path, pairs_path: Path) -> Dict[str, Any]:
    """One entry in a ``--jobs`` worker process (the world is loaded on the worker's first entry)."""
    if "world" not in _WORKER:
        _WORKER["world"] = _World(model, reward, sc)
    return _WORKER["world"].run(entry, out, work, pairs_path)


def run_all(args, sc: Dict[str, Any], out: Path) -> None:
    t_all = time.time()
    world = _World(args.model, args.reward, sc)
    runs = [e for e in CPU_RUNS if not args.only or e[0] in args.only]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    if args.resume:                                    # keep what is done (less --redo), run the rest
        old = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        redo = [e for e in runs if e[0] in (args.redo or [])]
        kept = [r for r in old if not _replaced(r, redo)]
        log.write_text("".join(json.dumps(r, default=str) + "\n" for r in kept))
        done = {(r["name"], r["beta"], r["seed"]) for r in kept if r["kind"] == "run"}
        runs = [e for e in runs if (e[0], e[2], e[3]) not in done]
        have_pairs = any(r["kind"] == "pairs" for r in kept) and (out / "dpo_pairs.jsonl").is_file()
    elif args.replace:                                 # rerun some entries: drop their old lines, keep the rest
        kept = [l for l in log.read_text().splitlines() if l.strip() and not _replaced(json.loads(l), runs)]
        log.write_text("".join(l + "\n" for l in kept))
    else:
        log.write_text("")
        meta = {"kind": "meta", "scale": args.scale, **sc, "model": args.model, "reward": args.reward,
                "jobs": args.jobs, "prompts": world.prompts.describe(), "torch_threads": torch.get_num_threads(),
                "machine": _machine()}
        meta["reference_eval"] = {s: world.reference_eval(s) for s in sorted({e[3] for e in runs})}
        _append(log, meta)
    pairs_path = out / "dpo_pairs.jsonl"
    if any(e[1] == "dpo" for e in runs) and not (args.resume and have_pairs):
        info = _pairs(world.reference, world.tok, world.prompts.train, world.reward, sc, 0, pairs_path)
        _append(log, {"kind": "pairs", **info})
        if info["pairs"] == 0:                         # every sample tied: offline DPO has nothing to learn from
            print("[sentiment] no preference pairs (all rewards tied): skipping the dpo entries", flush=True)
            runs = [e for e in runs if e[1] != "dpo"]
    if args.jobs > 1:
        del world                                      # the workers load their own copies
        _run_parallel(args, sc, runs, out, work, pairs_path, log)
    else:
        for entry in runs:
            print(f"[sentiment] {entry[0]} beta={entry[2]:g} seed={entry[3]} ...", flush=True)
            _report(log, world.run(entry, out, work, pairs_path))
    _append(log, {"kind": "done", "wall_s": time.time() - t_all, "entries": [e[0] for e in runs]})


def _run_parallel(args, sc, runs, out: Path, work: Path, pairs_path: Path, log: Path) -> None:
    """Entries on ``--jobs`` worker processes (spawned; one torch thread each), logged as they finish."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_worker_run, args.model, args.reward, sc, e, out, work, pairs_path): e for e in runs}
        for f in as_completed(futures):
            _report(log, f.result())


def _report(log: Path, res: Dict[str, Any]) -> None:
    print(f"[sentiment] {res['name']} beta={res['beta']:g} seed={res['seed']}: reward {res['eval']['reward']:.3f}  "
          f"KL {res['eval'].get('kl_k1', float('nan')):.2f}  {res['wall_s']:.0f}s", flush=True)
    _append(log, res)


def _replaced(row: Dict[str, Any], runs) -> bool:
    """A runs.jsonl line that a rerun of ``runs`` replaces (its run lines and their pairs line)."""
    names = {e[0] for e in runs}
    return (row.get("kind") == "run" and row.get("name") in names) or (row.get("kind") == "pairs" and "dpo" in names)


def _append(path: Path, row: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def _machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}"


def write_report(out: Path, sc: Dict[str, Any], args) -> None:
    """table.md, frontier.png and report.md from runs.jsonl."""
    rows = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines() if l.strip()]
    meta = next((r for r in rows if r["kind"] == "meta"), {})
    runs = [r for r in rows if r["kind"] == "run"]
    lines = ["| algorithm | β | seed | held-out reward | KL k1 (nats) | KL k3 | length | distinct-2 | s/step | "
             "samples/step | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        e = r["eval"]
        lines.append(f"| {r['name']} | {r['beta']:g} | {r['seed']} | {e['reward']:.3f} | {e.get('kl_k1', 0):.2f} | "
                     f"{e.get('kl_k3', 0):.2f} | {e['response_length']:.1f} | {e['distinct_2']:.2f} | "
                     f"{r['seconds_per_step']:.1f} | {r['samples_per_step']} | {r['wall_s']:.0f} |")
    ref = meta.get("reference_eval", {})
    for s, e in ref.items():
        lines.append(f"| π_ref | – | {s} | {e['reward']:.3f} | 0 | 0 | {e['response_length']:.1f} | "
                     f"{e['distinct_2']:.2f} | – | – | – |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(out, runs, ref)
    (out / "report.md").write_text(_report_md(meta, runs, rows, "\n".join(lines)))


def _mean_sd(xs: List[float]) -> str:
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f} (n = {len(xs)})"


def _report_md(meta: Dict[str, Any], runs: List[Dict[str, Any]], rows: List[Dict[str, Any]], table: str) -> str:
    """report.md: the setup, π_ref's reward, the best entry over its seeds, every entry's change, the table."""
    ref = [e["reward"] for e in meta.get("reference_eval", {}).values()]
    done = next((r for r in rows if r["kind"] == "done"), {})
    pairs = next((r for r in rows if r["kind"] == "pairs"), {})
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["name"], r["beta"]), []).append(r)
    lines = [f"# Sentiment frontier ({meta.get('scale', '?')} scale)", "",
             f"- model {meta.get('model')}, reward {meta.get('reward')}, prompts {meta.get('prompts', '')[:60]}...",
             f"- per run: {meta.get('steps')} steps × {meta.get('batch_size')} prompts × {meta.get('n')} samples "
             f"(the same samples per step for every online entry), {meta.get('max_new_tokens')} new tokens, AdamW lr "
             f"{meta.get('lr')}; offline DPO: {pairs.get('pairs', '?')} pairs from π_ref samples of "
             f"{pairs.get('prompts', '?')} prefixes, batch {meta.get('dpo_batch')} pairs, the same steps",
             f"- evaluation: {meta.get('eval_prompts')} held-out prefixes, one sample each, evaluation seed = "
             f"training seed; KL = sampled sequence KL(π‖π_ref), k1",
             f"- machine: {meta.get('machine')}; {meta.get('jobs', 1)} entries at once, "
             f"{meta.get('torch_threads')} torch thread each; whole experiment "
             f"{done.get('wall_s', float('nan')) / 60:.1f} min", ""]
    if ref:
        lines.append(f"π_ref's held-out reward over the evaluation seeds: {_mean_sd(ref)}.")
    multi = [(k, v) for k, v in groups.items() if len(v) > 1]
    if multi:
        (name, beta), v = max(multi, key=lambda kv: sum(r["eval"]["reward"] for r in kv[1]) / len(kv[1]))
        lines.append(f"Best repeated entry, {name} β = {beta:g}: held-out reward {_mean_sd([r['eval']['reward'] for r in v])}"
                     f", KL {_mean_sd([r['eval'].get('kl_k1', 0.0) for r in v])}.")
    base = {int(s): e["reward"] for s, e in meta.get("reference_eval", {}).items()}
    lines += ["", "Change of the held-out reward against π_ref evaluated with the same seed:", ""]
    for r in runs:
        if r["seed"] in base:
            lines.append(f"- {r['name']} β = {r['beta']:g}, seed {r['seed']}: {r['eval']['reward'] - base[r['seed']]:+.3f} "
                         f"at KL {r['eval'].get('kl_k1', 0.0):.2f}")
    return "\n".join(lines + ["", table, "", "![frontier](frontier.png)", ""])


def _plot(out: Path, runs, ref) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = {"ppo": "o", "grpo": "s", "dpo": "^", "rloo": "D", "remax": "v", "reinforce": "P", "online_dpo": "X"}
    for name in markers:
        pts = sorted((r["eval"].get("kl_k1", 0.0), r["eval"]["reward"], r["beta"]) for r in runs
                     if r["name"] == name and r["seed"] == 0)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[name], label=name,
                linestyle="-" if len(pts) > 1 else "none")
        for x, y, b in pts:
            ax.annotate(f"β={b:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if ref:
        rr = [e["reward"] for e in ref.values()]
        ax.axhline(sum(rr) / len(rr), color="gray", linestyle=":", label="π_ref")
    ax.set_xlabel("sampled sequence KL(π‖π_ref), k1 (nats)")
    ax.set_ylabel("held-out VADER reward")
    ax.set_title("Sentiment frontier, SmolLM2-135M on TinyStories prefixes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
