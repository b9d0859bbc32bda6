"""Train a composition on a bandit through its derived loss and compare with its analytic target.

The loop is the generic one every trainer runs: sample source → log-probs → loss → optimiser step (→ reference
update). Exact mode uses the population loss (every pair or sample weighted by its probability) and must reach
the target to TV < 1e-4; sampled mode draws mini-batches and must reach it within 2e-2 (iterate averaging over
the second half of training removes most of the SGD noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from .bandit import Bandit, draw_indices, make_batch
from .errors import InputError

__all__ = ["VerifyResult", "verify", "train", "total_variation", "EXACT_TOL", "SAMPLED_TOL", "OPTIMIZERS"]

EXACT_TOL = 1e-4
SAMPLED_TOL = 2e-2


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`.

    Attributes:
        algorithm: the algorithm's name.
        target: ``(P, K)`` float64 analytic target (``None`` for a ``margin`` target).
        learned: ``(P, K)`` float64 trained policy.
        tv: max over prompts of total variation ½·Σ_y |learned − target| (NaN for ``margin``).
        kl: max over prompts of KL(target ‖ learned) in nats (NaN for ``margin``).
        steps: optimiser steps taken.
        history: per-logged-step dicts with ``step``, ``loss`` and ``tv``.
        tolerance: the tolerance ``passed`` was judged against.
        passed: tv < tolerance (or, for ``margin``, margin_violation < tolerance).
        target_kind, note: the derived target kind and why it differs from the declared one, if it does.
        margin_violation: for ``margin`` targets, max over covered pairs of max(0, 1/β − h)·β (relative).
    """

    algorithm: str
    target: Optional[Tensor]
    learned: Tensor
    tv: float
    kl: float
    steps: int
    history: List[Dict[str, float]] = field(default_factory=list)
    tolerance: float = EXACT_TOL
    passed: bool = False
    target_kind: str = ""
    note: Optional[str] = None
    margin_violation: Optional[float] = None

    def to_json(self) -> dict:
        """JSON-ready dict with keys algorithm, target, learned, tv, kl, steps (+ passed, tolerance, kinds)."""
        def num(x: float):
            return None if x is None or math.isnan(x) else x
        return {"algorithm": self.algorithm,
                "target": None if self.target is None else self.target.tolist(),
                "learned": self.learned.tolist(), "tv": num(self.tv), "kl": num(self.kl), "steps": self.steps,
                "passed": self.passed, "tolerance": self.tolerance, "target_kind": self.target_kind,
                "margin_violation": self.margin_violation, "note": self.note}


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """Per-prompt total variation ½·Σ_y |p − q|. p, q: ``(P, K)``; returns ``(P,)``."""
    return 0.5 * (p - q).abs().sum(-1)


def _kl(p: Tensor, q: Tensor) -> Tensor:
    ratio = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.log(q.clamp_min(1e-300))),
                        torch.zeros_like(p))
    return ratio.sum(-1).clamp_min(0.0)  # KL ≥ 0; clamp round-off


def _margin_violation(algorithm, bandit: Bandit, probs: Tensor) -> float:
    """max over pairs the data can hold, ordered as labelled, of β·max(0, 1/β − h)."""
    from .components.source import pair_labels
    beta = algorithm.beta
    src = algorithm.components.source
    u = torch.log(probs) - bandit.log_pi_ref
    P, K = probs.shape
    worst = 0.0
    for p in range(P):
        for i in range(K):
            for j in range(K):
                if i == j or bandit.pair_distribution[p, i, j] + bandit.pair_distribution[p, j, i] <= 0:
                    continue
                q = float(pair_labels(src, bandit, torch.tensor([p]), torch.tensor([i]), torch.tensor([j]))[0])
                if q > 0.5:
                    worst = max(worst, beta * max(0.0, 1.0 / beta - float(u[p, i] - u[p, j])))
    return worst


OPTIMIZERS = ("rprop", "adam", "sgd")


def train(algorithm, bandit: Bandit, *, exact: bool = True, steps: Optional[int] = None, seed: int = 0,
          lr: Optional[float] = None, batch_size: int = 64, init_logits: Optional[Tensor] = None,
          log_every: int = 50, target: Optional[Tensor] = None, policy: Optional[torch.nn.Module] = None,
          optimizer: Optional[str] = None, lr_decay: Optional[bool] = None, average: Optional[bool] = None,
          early_stop: Optional[bool] = None, metrics: Optional[Callable[[Tensor], Dict[str, float]]] = None,
          loss_scale: float = 1.0):
    """Train a bandit policy on ``bandit`` through ``algorithm``'s derived loss.

    The generic loop: source → log-probs → loss → optimiser step → reference update. Exact mode runs Rprop on
    the population loss (sign-based steps suit its deterministic gradients and reach 1e-12 precision); sampled
    mode runs Adam with a 1/√t learning-rate decay and averages the policy over the second half of training.

    Args: as :func:`verify`, and
        target: ``(P, K)`` (optional) adds TV to the logged history.
        policy: a module whose ``forward()`` gives ``(P, K)`` logits (:mod:`udrra.policy`); default a
            :class:`~udrra.policy.TablePolicy` at log π_ref + ``init_logits``.
        optimizer: ``rprop`` | ``adam`` | ``sgd`` (default rprop exact, adam sampled).
        lr_decay: multiply the learning rate by 1/√(1 + t/50) (default: only for the default sampled optimiser).
        average: return the average policy over the second half of each round (default: sampled mode).
        early_stop: stop once the logits move < 1e-11 for 5 steps (default: exact mode).
        metrics: called with the ``(P, K)`` policy at every logged step; its dict joins the history record.
        loss_scale: multiplies the loss (used when independent copies of a bandit are stacked as prompts, so
            that each copy sees the gradient it would see alone).
    Returns:
        ``(learned (P, K) float64, steps taken, history list of dicts)``.
    Raises:
        InputError: ``steps`` < 1, or an unknown optimizer.
    """
    from .policy import TablePolicy
    if steps is not None and steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    default_opt = optimizer is None
    optimizer = optimizer or ("rprop" if exact else "adam")
    lr_decay = (default_opt and not exact) if lr_decay is None else lr_decay
    average = (not exact) if average is None else average
    early_stop = exact if early_stop is None else early_stop
    steps = steps or (3000 if exact else 1000)
    lr = lr or (0.05 if exact else 0.1)
    ref_comp = algorithm.components.reference
    update = ref_comp.get("update", "frozen")
    rounds = int(ref_comp.get("rounds") or 1) if update == "reset_every" else 1
    epochs = 1 if exact else int(algorithm.components.source.get("epochs") or 1)
    gen = torch.Generator().manual_seed(seed)

    ref_logits = bandit.log_pi_ref.clone()
    if policy is None:
        start = ref_logits.clone() if init_logits is None else \
            ref_logits + torch.as_tensor(init_logits, dtype=torch.float64)
        policy = TablePolicy(start)
    params = [p for p in policy.parameters() if p.requires_grad]
    history: List[Dict[str, float]] = []
    total = 0
    final = None
    for rnd in range(rounds):
        if optimizer == "rprop":
            opt = torch.optim.Rprop(params, lr=lr, step_sizes=(1e-12, 5.0))
        elif optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr)
        else:
            opt = torch.optim.SGD(params, lr=lr)
        avg = None
        n_avg = 0
        still = 0
        for step in range(steps):
            if lr_decay:
                for g in opt.param_groups:
                    g["lr"] = lr / math.sqrt(1.0 + step / 50.0)
            logits = policy()
            ib = draw_indices(algorithm, bandit, logits, exact=exact, batch_size=batch_size, generator=gen)
            old = logits.detach().clone()
            for epoch in range(epochs):
                if epoch:
                    logits = policy()
                batch = make_batch(algorithm, bandit, ib, logits, ref_logits, old_logits=old if epochs > 1 else None)
                out = algorithm.loss(batch)
                opt.zero_grad()
                (out.loss * loss_scale if loss_scale != 1.0 else out.loss).backward()
                opt.step()
            total += 1
            with torch.no_grad():
                now = policy().detach()
            if update == "ema":
                decay = float(ref_comp["decay"])
                ref_logits = decay * ref_logits + (1 - decay) * torch.log_softmax(now, -1)
            moved = float((now - old).abs().max())
            probs = torch.softmax(now, -1)
            if average and step >= steps // 2:
                avg = probs if avg is None else avg + probs
                n_avg += 1
            if step % log_every == 0 or step == steps - 1:
                rec = {"step": total, "round": rnd, "loss": float(out.loss.detach())}
                if target is not None and rnd == rounds - 1:
                    rec["tv"] = float(total_variation(probs, target).max())
                if metrics is not None:
                    rec.update(metrics(probs))
                history.append(rec)
            still = still + 1 if moved < 1e-11 else 0  # Rprop skips one update after each sign flip
            if early_stop and still >= 5:
                break
        final = torch.softmax(policy().detach(), -1) if avg is None else avg / n_avg
        if avg is not None and isinstance(policy, TablePolicy):
            with torch.no_grad():
                policy.logits.copy_(torch.log(final))
        if update == "reset_every" and rnd < rounds - 1:
            ref_logits = torch.log(final).clone()
    return final, total, history


def verify(algorithm, bandit: Bandit, *, exact: bool = True, steps: Optional[int] = None, seed: int = 0,
           lr: Optional[float] = None, batch_size: int = 64, init_logits: Optional[Tensor] = None,
           tolerance: Optional[float] = None, log_every: int = 50) -> VerifyResult:
    """Train ``algorithm`` on ``bandit`` and compare the learned policy with its analytic target.

    Args:
        algorithm: a loaded :class:`udrra.Algorithm`.
        bandit: a :class:`udrra.Bandit`.
        exact: population loss (True) or sampled mini-batches (False).
        steps: optimiser steps per round (default 3000 exact, 1000 sampled); exact training stops early once
            the policy moves less than 1e-11 per step for 5 steps.
        seed: seeds the sampler (sampled mode).
        lr: learning rate on the logits (default 0.05 exact, for Rprop; 0.1 decaying as 1/√t sampled, for Adam).
        batch_size: pairs, or samples (whole groups of n), per prompt per sampled step.
        init_logits: ``(P, K)`` added to log π_ref to start from another policy (default: start at π_ref).
        tolerance: pass threshold on TV (default 1e-4 exact, 2e-2 sampled).
    Returns:
        :class:`VerifyResult`.
    Raises:
        TargetError: the composition has no target on this bandit. InputError: bad arguments.
    """
    derived = algorithm.derived_target()
    target = None if derived.solve is None else algorithm.target_distribution(bandit).double()
    tolerance = tolerance if tolerance is not None else (EXACT_TOL if exact else SAMPLED_TOL)
    learned, total, history = train(algorithm, bandit, exact=exact, steps=steps, seed=seed, lr=lr,
                                    batch_size=batch_size, init_logits=init_logits, log_every=log_every,
                                    target=target)
    if target is None:
        viol = _margin_violation(algorithm, bandit, learned)
        return VerifyResult(algorithm.name, None, learned, float("nan"), float("nan"), total, history, tolerance,
                            viol < tolerance, derived.kind, derived.note, viol)
    tv = float(total_variation(learned, target).max())
    kl = float(_kl(target, learned).max())
    return VerifyResult(algorithm.name, target, learned, tv, kl, total, history, tolerance, tv < tolerance,
                        derived.kind, derived.note)
