"""``udrra train-rm``: train a Bradley–Terry reward model on preference pairs.

Loss (Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
arXiv:2203.02155, Eq. 1; one pair per term instead of all K-choose-2 comparisons of a prompt)::

    loss = −mean log σ(r(x, y_w) − r(x, y_l))

with ``r`` the score of a one-output sequence-classification model read at the last real token
(:func:`udrra.lm.rewards.last_token_scores`). Chosen and rejected sequences of a batch of ``B`` pairs are scored in
ONE forward over ``2B`` right-padded rows (:func:`udrra.lm.data.collate_pairs`). AdamW (weight decay 0), gradient
clipping at norm 1, constant learning rate, dropout off.

The model:

* anything :func:`udrra.lm.models.load_model_and_tokenizer` accepts (``"smollm2-135m"``, a local causal-LM
  checkpoint, a hub id): an ``AutoModelForSequenceClassification`` with ``num_labels=1`` is built from its config,
  the causal LM's backbone weights are copied into it (every backbone key must load; the LM head is dropped) and
  the ``score`` head starts at ZERO, so every pair starts tied (held-out accuracy exactly 0.5, margin 0 before
  training, reported without an evaluation pass; the first step moves only the head, later steps the backbone
  too);
* a directory holding a sequence-classification checkpoint with one output (``config.json`` names a
  ``*ForSequenceClassification`` class): training continues from it, head included;
* a ``(model, tokenizer)`` tuple of either kind (objects; a sequence-classification model is trained in place).

``train_layers=N`` freezes everything except the last ``N`` transformer layers, the final norm and the score head
(``0``: only the final norm and head). On a CPU this cuts the backward pass and the optimizer state to a few
layers, and the frozen layers' forward keeps no activations; the price is a weaker reward model.

Text convention (the same as :func:`udrra.lm.rewards.load_reward` scores with): prompt and response tokenised
separately and concatenated, NO eos appended to the response; prompts longer than ``3/4 · max_length`` tokens are
cut from the left, responses from the right to fit ``max_length`` (counted in ``metrics.json``).

Output directory (validated before the model loads, written to a temporary sibling and renamed at the end with the
helpers of :mod:`udrra.lm.train`, nothing left behind on error): the model (``save_pretrained``, with
``config.pad_token_id`` set), the tokenizer, and ``metrics.json`` (config, model, data summary, truncation,
``eval_before`` / ``eval_after`` = held-out pair accuracy (ties 0.5), mean margin and loss on the first
``eval_pairs`` rows of the eval split, ``log_history`` per step, seconds per step, peak RSS, torch threads).
``load_reward(output_dir)`` loads the result as a reward.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError
from .data import DEFAULT_SPLIT_SEED, TokenizedPair, collate_pairs, load_preference_data, tokenize_pairs
from .rewards import is_sequence_classification_dir, last_token_scores, load_reward_model, score_head
from .run import atomic_run, check_output_dir, disable_dropout, peak_rss_mb, versions
from .train import _precheck_dataset

__all__ = ["train_reward_model", "evaluate_reward_model", "build_reward_model", "add_train_rm_arguments",
           "run_train_rm_from_args", "MAX_GRAD_NORM"]

MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 0.0
LOSS_CITATION = "Bradley-Terry: -log sigmoid(r(x,y_w) - r(x,y_l)), Ouyang et al. 2022, arXiv:2203.02155, Eq. 1"


# ----------------------------------------------------------------------------------------- model


def _finish_tokenizer(tok: Any) -> Any:
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise InputError(f"tokenizer {type(tok).__name__} has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    return tok


def _from_causal_lm(causal: Any, tok: Any) -> Any:
    """A one-output sequence-classification model with ``causal``'s backbone weights and a zero score head."""
    import copy

    from transformers import AutoModelForSequenceClassification

    prefix = getattr(causal, "base_model_prefix", None)
    src = getattr(causal, prefix, None) if prefix else None
    if src is None or src is causal:
        raise InputError(f"{type(causal).__name__} has no separate backbone (`model.{prefix}`) to build a reward "
                         f"model from")
    config = copy.deepcopy(causal.config)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    config.num_labels = 1
    config.pad_token_id = int(tok.pad_token_id)
    try:
        rm = AutoModelForSequenceClassification.from_config(config)
    except ValueError as e:
        raise InputError(f"no sequence-classification class for {type(causal).__name__}: "
                         f"{str(e).strip().splitlines()[0]}") from e
    dtype = next(causal.parameters()).dtype
    rm.to(dtype)
    backbone, head = score_head(rm)
    missing, unexpected = backbone.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise InputError(f"copying the backbone of {type(causal).__name__} into {type(rm).__name__} left "
                         f"{len(missing)} keys missing {list(missing)[:5]} and {len(unexpected)} unexpected "
                         f"{list(unexpected)[:5]}")
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    return rm


def build_reward_model(model: Any, tokenizer: Any = None) -> Tuple[Any, Any, Dict[str, Any]]:
    """Resolve ``model`` (see the module docstring) into ``(reward_model, tokenizer, info)``.

    ``info``: ``name``, ``initialised_from`` (``"causal LM backbone"`` / ``"sequence-classification checkpoint"``),
    ``head_init`` (``"zeros"`` / ``"from checkpoint"``), ``backbone_keys_copied``.
    """
    from .models import load_model_and_tokenizer

    if isinstance(model, (tuple, list)) and len(model) == 2:
        model, tokenizer = model
    if isinstance(model, (str, Path)):
        name = str(model)
        path = Path(name).expanduser()
        if path.is_dir() and is_sequence_classification_dir(path):
            rm, tok = load_reward_model(path)          # one output, a score head, pad set: or RewardError
            tok = _finish_tokenizer(tok)
            rm.config.pad_token_id = int(tok.pad_token_id)
            return rm, tok, {"name": name, "initialised_from": "sequence-classification checkpoint",
                             "head_init": "from checkpoint"}
        causal, tok = load_model_and_tokenizer(name)
        rm = _from_causal_lm(causal, tok)
        n_keys = len(getattr(causal, causal.base_model_prefix).state_dict())
        del causal
        return rm, tok, {"name": name, "initialised_from": "causal LM backbone", "head_init": "zeros",
                         "backbone_keys_copied": n_keys}
    if tokenizer is None:
        raise InputError("pass a (model, tokenizer) tuple when model is a model object (or a name / path)")
    tok = _finish_tokenizer(tokenizer)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    if isinstance(getattr(model, "score", None), torch.nn.Module):
        score_head(model)
        if int(model.config.num_labels) != 1:
            raise InputError(f"{type(model).__name__} has num_labels={model.config.num_labels}; a reward model "
                             f"needs exactly 1")
        model.config.pad_token_id = int(tok.pad_token_id)
        return model, tok, {"name": str(name), "initialised_from": "sequence-classification model object",
                            "head_init": "from model"}
    rm = _from_causal_lm(model, tok)
    return rm, tok, {"name": str(name), "initialised_from": "causal LM backbone", "head_init": "zeros",
                     "backbone_keys_copied": len(getattr(model, model.base_model_prefix).state_dict())}


def _freeze_all_but_last(rm: Any, n: int) -> Dict[str, Any]:
    """Freeze everything except the last ``n`` transformer layers, the final norm and the score head."""
    backbone, head = score_head(rm)
    layers = getattr(backbone, "layers", None)
    norm = getattr(backbone, "norm", None)
    if not isinstance(layers, torch.nn.ModuleList) or norm is None:
        raise InputError(f"train_layers needs a backbone with `.layers` and `.norm` (Llama-style); "
                         f"{type(backbone).__name__} has none")
    if not 0 <= n <= len(layers):
        raise InputError(f"train_layers must be in [0, {len(layers)}] (the model has {len(layers)} layers), got {n}")
    for p in rm.parameters():
        p.requires_grad_(False)
    keep = [head, norm] + (list(layers[len(layers) - n:]) if n else [])
    for m in keep:
        for p in m.parameters():
            p.requires_grad_(True)
    return {"n_layers": len(layers), "trained_layers": list(range(len(layers) - n, len(layers)))}


# ------------------------------------------------------------------------------------- evaluation


def _pair_stats(scores: torch.Tensor, B: int) -> Dict[str, float]:
    """Loss, accuracy (ties 0.5), margin and mean rewards of ``B`` pairs (rows ``:B`` chosen, ``B:`` rejected)."""
    rc, rr = scores[:B].detach().double(), scores[B:].detach().double()
    m = rc - rr
    acc = ((m > 0).double() + 0.5 * (m == 0).double()).mean()
    return {"loss": float(-F.logsigmoid(m).mean()), "accuracy": float(acc), "margin": float(m.mean()),
            "reward_chosen": float(rc.mean()), "reward_rejected": float(rr.mean())}


@torch.no_grad()
def evaluate_reward_model(rm: Any, rows: Sequence[TokenizedPair], *, batch_size: int, pad_token_id: int,
                          progress: bool = False, desc: str = "eval") -> Dict[str, float]:
    """Held-out metrics of a reward model on tokenised pairs (eval mode, no gradient).

    Returns means over pairs: ``accuracy`` (share with r(chosen) > r(rejected), ties 0.5), ``margin``
    (r(chosen) − r(rejected)), ``loss`` (Bradley–Terry), ``reward_chosen``, ``reward_rejected``, plus ``n_pairs``
    and ``seconds``. Rows are batched longest first (less padding; the means do not depend on the order).
    """
    from tqdm.auto import tqdm

    if not rows:
        return {}
    t0 = time.time()
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -max(len(rows[i].chosen_ids), len(rows[i].rejected_ids)))
    tot: Dict[str, float] = {}
    n = 0
    try:
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = [rows[i] for i in order[s:s + batch_size]]
            B = len(chunk)
            b = collate_pairs(chunk, pad_token_id)
            scores = last_token_scores(rm, b["input_ids"].to(device), b["attention_mask"].to(device))
            for k, v in _pair_stats(scores, B).items():
                tot[k] = tot.get(k, 0.0) + B * v
            n += B
    finally:
        rm.train(was_training)
    out = {k: v / n for k, v in tot.items()}
    out.update(n_pairs=float(n), seconds=time.time() - t0)
    return out


def _zero_head_metrics(rm: Any, n_pairs: int) -> Optional[Dict[str, Any]]:
    """The held-out metrics of a model whose score head is all zeros, without running it: every score is exactly
    0, so every pair is a tie (accuracy 0.5, margin 0, loss log 2). ``None`` if the head is not zero (or no rows).
    Saves a full evaluation pass (minutes on a CPU) before training a freshly built reward model."""
    if n_pairs == 0:
        return {}
    _, head = score_head(rm)
    if any(bool(torch.count_nonzero(p)) for p in head.parameters()):
        return None
    return {"loss": math.log(2.0), "accuracy": 0.5, "margin": 0.0, "reward_chosen": 0.0, "reward_rejected": 0.0,
            "n_pairs": float(n_pairs), "seconds": 0.0,
            "note": "not run: the score head is all zeros, so every score is exactly 0 (every pair a tie)"}


# ------------------------------------------------------------------------------------------- train


def _check_args(max_steps: Any, batch_size: Any, learning_rate: Any, max_length: Any, eval_pairs: Any,
                train_layers: Any, threads: Any) -> None:
    def int_at_least(name: str, v: Any, minimum: int) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise InputError(f"{name} must be an integer >= {minimum}, got {v!r}")

    int_at_least("max_steps", max_steps, 1)
    int_at_least("batch_size", batch_size, 1)
    int_at_least("max_length", max_length, 2)
    int_at_least("eval_pairs", eval_pairs, 0)
    if train_layers is not None:
        int_at_least("train_layers", train_layers, 0)
    if threads is not None:
        int_at_least("threads", threads, 1)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or \
            not math.isfinite(learning_rate) or learning_rate <= 0:
        raise InputError(f"learning_rate must be a finite number > 0, got {learning_rate!r}")


def train_reward_model(model: Any, dataset: Any, *, output_dir: Any, max_steps: int = 100, batch_size: int = 8,
                       learning_rate: float = 1e-5, max_length: int = 256, eval_pairs: int = 100, seed: int = 0,
                       split_seed: int = DEFAULT_SPLIT_SEED, train_layers: Optional[int] = None,
                       overwrite: bool = False, allow_hub: bool = False, progress: bool = True, verbose: bool = True,
                       threads: Optional[int] = None) -> Dict[str, Any]:
    """Train a Bradley–Terry reward model and save it with its tokenizer and ``metrics.json``.

    Args:
        model: a causal LM to start from (``"smollm2-135m"``, a local checkpoint, a hub id), a local
            sequence-classification checkpoint to continue, or a ``(model, tokenizer)`` tuple.
        dataset: anything :func:`udrra.lm.data.load_preference_data` accepts (``"hh-rlhf"``,
            ``"ultrafeedback-1200"``, files, rows, ``PreferenceData``).
        output_dir: must not exist or be empty unless ``overwrite``; written atomically at the end.
        max_steps: optimizer steps of ``batch_size`` pairs each (data reshuffled with ``seed`` every epoch).
        learning_rate: AdamW learning rate (constant; weight decay 0; gradients clipped at norm 1).
        max_length: tokens of prompt + response (prompt ≤ 3/4 of it, cut from the left).
        eval_pairs: held-out pairs (first rows of the eval split) evaluated before and after training; 0: none.
        seed: data order (and torch's seed). ``split_seed``: the built-in HH re-split.
        train_layers: ``None`` trains everything; ``N`` only the last ``N`` layers + final norm + score head.
        threads: ``torch.set_num_threads`` for the run (restored afterwards); ``None`` keeps the current
            setting. The count used is logged either way.
        progress, verbose: tqdm bars; printed header and summary.

    Returns:
        The ``metrics.json`` content plus ``"output_dir"``.

    Raises:
        InputError: bad arguments, a non-empty ``output_dir`` without ``overwrite``, an unusable model or data
            (nothing is written in these cases).
    """
    t_start = time.time()
    _check_args(max_steps, batch_size, learning_rate, max_length, eval_pairs, train_layers, threads)
    from .parallel import World

    if World().size > 1:
        raise InputError("udrra train-rm runs on one process (its loop does not shard the pairs); start it with "
                         "`udrra train-rm ...`, not under accelerate launch / torchrun with several processes")
    out_dir = check_output_dir(output_dir, overwrite)
    _precheck_dataset(dataset, allow_hub)
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _train(model, dataset, out_dir, t_start, dict(
            max_steps=max_steps, batch_size=batch_size, learning_rate=float(learning_rate), max_length=max_length,
            max_prompt_length=max(1, (3 * max_length) // 4), eval_pairs=eval_pairs, seed=seed,
            split_seed=split_seed, train_layers=train_layers, weight_decay=WEIGHT_DECAY,
            max_grad_norm=MAX_GRAD_NORM, append_eos=False, torch_threads=torch.get_num_threads()),
            allow_hub=allow_hub, progress=progress, verbose=verbose)
    finally:
        torch.set_num_threads(prev_threads)


@dataclass
class _RMInputs:
    """The validated inputs of a reward-model run (built before anything is written)."""

    rm: Any
    tok: Any
    model_info: Dict[str, Any]
    trainable: List[torch.Tensor]
    data: Any
    train_rows: List[TokenizedPair]
    tstats: Any
    eval_rows: List[TokenizedPair]
    estats: Any

    @property
    def pad_id(self) -> int:
        return int(self.tok.pad_token_id)

    @property
    def eval_desc(self) -> str:
        return f"first {len(self.eval_rows)} rows of the {self.data.info.get('eval_split', 'eval')} split"


def _load_rm_inputs(model: Any, dataset: Any, cfg: Dict[str, Any], allow_hub: bool) -> _RMInputs:
    """Build the reward model (frozen layers per ``train_layers``), load and tokenise the preference data."""
    torch.manual_seed(cfg["seed"])
    rm, tok, model_info = build_reward_model(model)
    if cfg["train_layers"] is not None:
        model_info.update(_freeze_all_but_last(rm, cfg["train_layers"]))
    trainable = [p for p in rm.parameters() if p.requires_grad]
    if not trainable:
        raise InputError("the reward model has no trainable parameters (all requires_grad=False)")
    data = load_preference_data(dataset, tok, seed=cfg["split_seed"], allow_hub=allow_hub)
    lengths = dict(max_length=cfg["max_length"], max_prompt_length=cfg["max_prompt_length"], append_eos=False)
    train_rows, tstats = tokenize_pairs(tok, data.train, **lengths)
    eval_rows, estats = tokenize_pairs(tok, data.eval[:min(cfg["eval_pairs"], len(data.eval))], **lengths)
    if len(train_rows) < cfg["batch_size"]:
        raise InputError(f"the training split has {len(train_rows)} pairs, fewer than batch_size={cfg['batch_size']}")
    model_info.update({"class": type(rm).__name__, "parameters": sum(p.numel() for p in rm.parameters()),
                       "trainable_parameters": sum(p.numel() for p in trainable),
                       "dtype": str(next(rm.parameters()).dtype).replace("torch.", ""),
                       "pad_token_id": int(tok.pad_token_id), "eos_token_id": tok.eos_token_id})
    return _RMInputs(rm, tok, model_info, trainable, data, train_rows, tstats, eval_rows, estats)


def _print_header(inp: _RMInputs, cfg: Dict[str, Any]) -> None:
    mi = inp.model_info
    print(f"[udrra train-rm] {mi['name']} -> {mi['class']} ({mi['parameters']:,} parameters, "
          f"{mi['trainable_parameters']:,} trainable; head {mi['head_init']}; train_layers {cfg['train_layers']}); "
          f"torch threads {cfg['torch_threads']}")
    print(f"[udrra train-rm] data: {inp.data.describe()}")
    print(f"[udrra train-rm] truncation: train {inp.tstats.describe()}; eval {inp.estats.describe()}")


def _bt_step(inp: _RMInputs, opt: torch.optim.Optimizer, rows: List[TokenizedPair], cfg: Dict[str, Any],
             step: int) -> Tuple[torch.Tensor, int, float, int]:
    """One Bradley–Terry step on ``rows``: chosen and rejected scored in one forward, −log σ(r_w − r_l) averaged,
    backward, clipping, AdamW. Returns ``(scores, B, grad_norm, tokens)``."""
    B = len(rows)
    b = collate_pairs(rows, inp.pad_id)
    scores = last_token_scores(inp.rm, b["input_ids"], b["attention_mask"])
    loss = -F.logsigmoid(scores[:B] - scores[B:]).mean()
    if not torch.isfinite(loss.detach()):
        raise InputError(f"step {step}: the loss is {float(loss.detach())} (not finite); lower the "
                         f"learning rate or check the data")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(inp.trainable, cfg["max_grad_norm"]))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return scores, B, grad_norm, int(b["attention_mask"].sum())


def _fit_rm(inp: _RMInputs, cfg: Dict[str, Any], progress: bool) -> Dict[str, Any]:
    """``max_steps`` Bradley–Terry steps over the seeded data order (:class:`udrra.lm.producers.SeededOrder`);
    returns the training part of ``metrics.json``."""
    from tqdm.auto import tqdm

    from .producers import SeededOrder

    opt = torch.optim.AdamW(inp.trainable, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    order = SeededOrder(len(inp.train_rows), cfg["batch_size"], cfg["seed"])
    log_history: List[Dict[str, Any]] = []
    step_times: List[float] = []
    pairs_seen = 0
    inp.rm.train()
    bar = tqdm(total=cfg["max_steps"], desc="udrra train-rm", disable=not progress)
    t_train = time.time()
    for step in range(1, cfg["max_steps"] + 1):
        t0 = time.time()
        scores, B, grad_norm, tokens = _bt_step(inp, opt, [inp.train_rows[i] for i in order.next()], cfg, step)
        pairs_seen += B
        step_times.append(time.time() - t0)
        rec = {"step": step, **{f"train/{k}": v for k, v in _pair_stats(scores, B).items()},
               "train/grad_norm": grad_norm, "train/seconds": step_times[-1], "train/tokens": tokens,
               "train/epoch": pairs_seen / len(inp.train_rows)}
        log_history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['train/loss']:.4f}", acc=f"{rec['train/accuracy']:.2f}")
    bar.close()
    timed = step_times[1:] if len(step_times) > 1 else step_times
    return {"log_history": log_history, "train_time_s": time.time() - t_train,
            "seconds_per_step": sum(timed) / len(timed),
            "seconds_per_step_note": "mean over steps after the first" if len(step_times) > 1 else "one step",
            "pairs_seen": pairs_seen}


def _run_rm(inp: _RMInputs, cfg: Dict[str, Any], tmp_dir: Path, *, progress: bool, verbose: bool) -> Dict[str, Any]:
    """Evaluate, train, evaluate, save the model and tokenizer into ``tmp_dir``; returns ``metrics.json``."""
    disable_dropout(inp.rm)
    eval_kw = dict(batch_size=cfg["batch_size"], pad_token_id=inp.pad_id, progress=progress)
    before = _zero_head_metrics(inp.rm, len(inp.eval_rows))
    if before is None:
        before = evaluate_reward_model(inp.rm, inp.eval_rows, desc="eval before", **eval_kw)
    if verbose and before:
        print(f"[udrra train-rm] held-out before: accuracy {before['accuracy']:.4f}, margin "
              f"{before['margin']:.4f} ({inp.eval_desc}, {before['seconds']:.1f}s)")
    trained = _fit_rm(inp, cfg, progress)
    after = evaluate_reward_model(inp.rm, inp.eval_rows, desc="eval after", **eval_kw)
    inp.rm.eval()
    inp.rm.config.pad_token_id = inp.pad_id
    inp.rm.save_pretrained(str(tmp_dir), safe_serialization=True)
    inp.tok.save_pretrained(str(tmp_dir))
    data = inp.data
    return {
        "config": cfg,
        "loss": LOSS_CITATION,
        "scoring": "score head at the last real token of prompt + response (no eos appended), "
                   "udrra.lm.rewards.last_token_scores",
        "model": inp.model_info,
        "data": {"name": data.name, "summary": data.describe(), **data.info, "train_pairs": len(inp.train_rows),
                 "eval_pairs_available": len(data.eval), "eval_pairs_used": len(inp.eval_rows),
                 "test_pairs": len(data.test), "eval_rows": inp.eval_desc},
        "truncation": {"train": inp.tstats.as_dict(), "eval": inp.estats.as_dict()},
        "eval_before": before,
        "eval_after": after,
        **trained,
        "torch_threads": cfg["torch_threads"],
        "peak_rss_mb": peak_rss_mb(),
        "versions": versions(),
        "device": str(next(inp.rm.parameters()).device),
        "finished": datetime.now().isoformat(timespec="seconds"),
    }


def _train(model: Any, dataset: Any, out_dir: Path, t_start: float, cfg: Dict[str, Any], *, allow_hub: bool,
           progress: bool, verbose: bool) -> Dict[str, Any]:
    inp = _load_rm_inputs(model, dataset, cfg, allow_hub)
    if verbose:
        _print_header(inp, cfg)
    result = atomic_run(out_dir, lambda tmp_dir: _run_rm(inp, cfg, tmp_dir, progress=progress, verbose=verbose),
                        t_start)
    if verbose:
        _print_summary(result, out_dir)
    return result


def _print_summary(r: Dict[str, Any], out_dir: Path) -> None:
    c = r["config"]
    print(f"[udrra train-rm] done: {c['max_steps']} steps of {c['batch_size']} pairs in {r['train_time_s']:.1f}s "
          f"({r['seconds_per_step']:.2f}s/step, {r['torch_threads']} torch threads), peak RSS "
          f"{r['peak_rss_mb'] or float('nan'):.0f} MB -> {out_dir}")
    b, a = r.get("eval_before") or {}, r.get("eval_after") or {}
    if b or a:
        print(f"[udrra train-rm] held-out ({r['data']['eval_rows']}):")
        print(f"    {'metric':<16}{'before':>12}{'after':>12}")
        for k in ("accuracy", "margin", "loss", "reward_chosen", "reward_rejected"):
            fmt = lambda x: f"{x:12.4f}" if isinstance(x, (int, float)) else f"{'-':>12}"
            print(f"    {k:<16}{fmt(b.get(k))}{fmt(a.get(k))}")


# -------------------------------------------------------------------------------------------- CLI


def add_train_rm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``udrra train-rm`` to ``parser``; returns it. Destinations: model, dataset, output_dir,
    max_steps, batch_size, lr, max_length, eval_pairs, seed, split_seed, train_layers, threads, overwrite,
    allow_hub, no_progress."""
    g = parser.add_argument_group("reward-model training (Bradley-Terry)")
    g.add_argument("--model", required=True, metavar="M",
                   help="causal LM to start from ('smollm2-135m', a local checkpoint dir, a HF id) or a local "
                        "sequence-classification checkpoint to continue")
    g.add_argument("--dataset", required=True, metavar="D",
                   help="'hh-rlhf', 'ultrafeedback-1200', a local .json/.jsonl/.jsonl.gz/.parquet/dir, or a HF id")
    g.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where to save (default runs/rm-<dataset>-<timestamp>)")
    g.add_argument("--max-steps", type=int, default=100, help="optimizer steps (default 100)")
    g.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    g.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    g.add_argument("--max-length", type=int, default=256,
                   help="max tokens of prompt+response; prompts keep their last 3/4 of it (default 256)")
    g.add_argument("--eval-pairs", type=int, default=100,
                   help="held-out pairs evaluated before and after training (default 100; 0 = none)")
    g.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    g.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED,
                   help=f"seed of the built-in hh-rlhf train/validation/test re-split (default {DEFAULT_SPLIT_SEED})")
    g.add_argument("--train-layers", type=int, default=None, metavar="N",
                   help="train only the last N transformer layers + final norm + score head (default: all)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for the run (default: torch's current setting; logged either way)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    g.add_argument("--allow-hub", action="store_true",
                   help="if a built-in dataset's local folder is missing, download it from the HF hub")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_train_rm_from_args(args: argparse.Namespace) -> int:
    """Run :func:`train_reward_model` from parsed ``udrra train-rm`` arguments. Returns 0 on success; raises
    :class:`InputError` for usage errors (the CLI maps them to exit status 2)."""
    out = args.output_dir
    if out is None:
        ds = Path(str(args.dataset)).name.split(".")[0] or "data"
        out = Path("runs") / f"rm-{ds}-{datetime.now():%Y%m%d-%H%M%S}"
    train_reward_model(args.model, args.dataset, output_dir=out, max_steps=args.max_steps,
                       batch_size=args.batch_size, learning_rate=args.lr, max_length=args.max_length,
                       eval_pairs=args.eval_pairs, seed=args.seed, split_seed=args.split_seed,
                       train_layers=args.train_layers, overwrite=args.overwrite, allow_hub=args.allow_hub,
                       progress=not args.no_progress, threads=getattr(args, "threads", None))
    return 0
