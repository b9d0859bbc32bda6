"""Train a composition on a bandit through its derived loss and compare with its analytic target.

The loop is the generic one every trainer runs: sample source → log-probs → loss → optimiser step (→ reference
update). Exact mode uses the population loss (every pair or sample weighted by its probability) and must reach
the target to TV < 1e-4; sampled mode draws mini-batches and must reach it within 2e-2 (iterate averaging over
the second half of training removes most of the SGD noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .bandit import Bandit, draw_indices, make_batch
from .errors import InputError

__all__ = ["VerifyResult", "verify", "train", "total_variation", "EXACT_TOL", "SAMPLED_TOL"]

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
    u = torch.log(probs) - torch.log(bandit.pi_ref)
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


def train(algorithm, bandit: Bandit, *, exact: bool = True, steps: Optional[int] = None, seed: int = 0,
          lr: Optional[float] = None, batch_size: int = 64, init_logits: Optional[Tensor] = None,
          log_every: int = 50, target: Optional[Tensor] = None):
    """Train a tabular softmax policy on ``bandit`` through ``algorithm``'s derived loss.

    The generic loop: source → log-probs → loss → optimiser step → reference update. Exact mode runs Rprop on
    the population loss (sign-based steps suit its deterministic gradients and reach 1e-12 precision); sampled
    mode runs Adam with a 1/√t learning-rate decay and averages the policy over the second half of training.

    Args: as :func:`verify`; ``target`` ``(P, K)`` (optional) adds TV to the logged history.
    Returns:
        ``(learned (P, K) float64, steps taken, history list of dicts)``.
    Raises:
        InputError: ``steps`` < 1.
    """
    if steps is not None and steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    steps = steps or (3000 if exact else 1000)
    lr = lr or (0.05 if exact else 0.1)
    ref_comp = algorithm.components.reference
    update = ref_comp.get("update", "frozen")
    rounds = int(ref_comp.get("rounds") or 1) if update == "reset_every" else 1
    epochs = 1 if exact else int(algorithm.components.source.get("epochs") or 1)
    gen = torch.Generator().manual_seed(seed)

    ref_logits = torch.log(bandit.pi_ref).clone()
    start = ref_logits.clone() if init_logits is None else ref_logits + torch.as_tensor(init_logits, dtype=torch.float64)
    logits = start.clone().requires_grad_(True)
    history: List[Dict[str, float]] = []
    total = 0
    for rnd in range(rounds):
        opt = (torch.optim.Rprop([logits], lr=lr, step_sizes=(1e-12, 5.0)) if exact
               else torch.optim.Adam([logits], lr=lr))
        avg = None
        n_avg = 0
        still = 0
        for step in range(steps):
            if not exact:
                for g in opt.param_groups:
                    g["lr"] = lr / math.sqrt(1.0 + step / 50.0)
            ib = draw_indices(algorithm, bandit, logits, exact=exact, batch_size=batch_size, generator=gen)
            old = logits.detach().clone()
            for _ in range(epochs):
                batch = make_batch(algorithm, bandit, ib, logits, ref_logits, old_logits=old if epochs > 1 else None)
                out = algorithm.loss(batch)
                opt.zero_grad()
                out.loss.backward()
                opt.step()
            total += 1
            if update == "ema":
                decay = float(ref_comp["decay"])
                ref_logits = decay * ref_logits + (1 - decay) * torch.log_softmax(logits.detach(), -1)
            moved = float((logits.detach() - old).abs().max())
            if not exact and step >= steps // 2:
                probs = torch.softmax(logits.detach(), -1)
                avg = probs if avg is None else avg + probs
                n_avg += 1
            if step % log_every == 0 or step == steps - 1:
                rec = {"step": total, "round": rnd, "loss": float(out.loss.detach())}
                if target is not None and rnd == rounds - 1:
                    rec["tv"] = float(total_variation(torch.softmax(logits.detach(), -1), target).max())
                history.append(rec)
            still = still + 1 if moved < 1e-11 else 0  # Rprop skips one update after each sign flip
            if exact and still >= 5:
                break
        if not exact and avg is not None:
            with torch.no_grad():
                logits.copy_(torch.log(avg / n_avg))
        if update == "reset_every" and rnd < rounds - 1:
            ref_logits = torch.log_softmax(logits.detach(), -1).clone()
    return torch.softmax(logits.detach(), -1), total, history


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
