"""The loss, derived from the four components.

There is no per-algorithm code here: the reference term turns log-probs into the quantity the reward estimate
needs, the reward estimate turns it into a per-row loss, the reference term may add a KL penalty, and rows are
aggregated with the batch weights. The same functions train the bandit and an LM.

Aggregation is explicit: every row is one *sequence* (a pair or a sample) and the loss is Σ_b weights[b]·ℓ_b,
with ``weights`` summing to 1 (a mean over the mini-batch, or the population expectation). Log-probs are
per-sequence sums over response tokens; reference terms with ``length_normalize`` divide them by the length
(SimPO's average log-likelihood).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import Tensor

from .batch import PairBatch, SampleBatch
from .components import Components
from .components.reference import implicit_logratio, kl_estimate
from .components.reward import advantages, preference_loss, surrogate

__all__ = ["LossOutput", "pair_loss", "sample_loss"]


@dataclass
class LossOutput:
    """Result of a loss evaluation.

    Attributes:
        loss: scalar tensor to minimise (differentiable in the policy log-probs).
        per_row: ``(B,)`` per-row loss before weighting (detached).
        metrics: named floats (implicit rewards, accuracy, KL estimates, advantages...).
    """

    loss: Tensor
    per_row: Tensor
    metrics: Dict[str, float] = field(default_factory=dict)


def _wmean(x: Tensor, w: Tensor) -> float:
    """Weighted mean, accumulated in float64 (metrics must not carry float32 round-off)."""
    w = w.detach().double()
    return float((x.detach().double() * w).sum() / w.sum())


def pair_loss(components: Components, batch: PairBatch) -> LossOutput:
    """Loss of a pair-based composition (``preference`` or ``reward_difference`` reward).

    Args:
        components: the algorithm's validated components.
        batch: a :class:`PairBatch` of B pairs.
    Returns:
        :class:`LossOutput`; metrics ``rewards/chosen`` and ``rewards/rejected`` (implicit rewards β·u, nats),
        ``rewards/margin``, ``rewards/accuracy`` (ties count ½), ``logps/chosen``, ``logps/rejected``.
    """
    t, _, rw, ref = components
    beta = float(t["beta"])
    uses_ref = ref.kind != "none"
    norm = bool(ref.get("length_normalize"))
    u_w = implicit_logratio(batch.chosen_logps, batch.ref_chosen_logps, batch.chosen_lengths,
                            uses_reference=uses_ref, length_normalize=norm)
    u_l = implicit_logratio(batch.rejected_logps, batch.ref_rejected_logps, batch.rejected_lengths,
                            uses_reference=uses_ref, length_normalize=norm)
    if rw.kind == "preference":
        per_row = preference_loss(u_w, u_l, batch.labels, link=rw["link"], beta=beta,
                                  gamma=float(ref.get("gamma") or 0.0), epsilon=rw.get("epsilon"))
    else:  # reward_difference (UDRRA RDA): regress β·(u_w − u_l) on r_w − r_l
        if batch.chosen_rewards is None or batch.rejected_rewards is None:
            raise ValueError("reward_difference needs chosen_rewards and rejected_rewards in the PairBatch")
        per_row = (beta * (u_w - u_l) - (batch.chosen_rewards - batch.rejected_rewards)) ** 2
    w = batch.weights
    loss = (w * per_row).sum()
    margin = (beta * (u_w - u_l)).detach()
    acc = (margin > 0).double() + 0.5 * (margin == 0).double()
    metrics = {
        "loss": float(loss.detach()),
        "rewards/chosen": _wmean(beta * u_w, w),
        "rewards/rejected": _wmean(beta * u_l, w),
        "rewards/margin": _wmean(margin, w),
        "rewards/accuracy": _wmean(acc, w),
        "logps/chosen": _wmean(batch.chosen_logps, w),
        "logps/rejected": _wmean(batch.rejected_logps, w),
    }
    return LossOutput(loss, per_row.detach(), metrics)


def sample_loss(components: Components, batch: SampleBatch) -> LossOutput:
    """Loss of a sample-based composition (``explicit`` or ``reward_regression`` reward).

    ``explicit``: R = r − β·k1 if the reference term is ``kl_in_reward`` (no gradient through the shaping),
    A = baseline(R), loss = −min(ρA, clip(ρ)A) (or −ρA without clip), plus β·k(log π/π_ref) if the reference
    term is ``kl_in_loss``. ``reward_regression``: (β·u + β·log Z − r)².

    Args:
        components: the algorithm's validated components.
        batch: a :class:`SampleBatch` of B samples.
    Returns:
        :class:`LossOutput`; metrics ``reward`` (mean task reward), ``kl/k1`` and ``kl/k3`` (estimates of
        KL(π‖π_ref) from the batch, exact for on-policy population batches), ``advantage/std``.
    """
    t, src, rw, ref = components
    beta = float(t["beta"])
    w = batch.weights
    log_ratio = batch.logps - batch.ref_logps
    metrics: Dict[str, float] = {"reward": _wmean(batch.rewards, w),
                                 "kl/k1": _wmean(kl_estimate(log_ratio, "k1"), w),
                                 "kl/k3": _wmean(kl_estimate(log_ratio, "k3"), w)}
    if rw.kind == "explicit":
        R = batch.rewards
        if ref.kind == "kl_in_reward":
            R = R - beta * kl_estimate(log_ratio.detach(), ref["estimator"])
        adv = advantages(R, baseline=rw["baseline"], group=batch.group, weights=w, population=batch.population,
                         greedy_rewards=batch.greedy_rewards, eps=float(rw["eps"]))
        per_row = surrogate(batch.logps, batch.old_logps, adv, src.get("clip"))
        metrics["advantage/std"] = float(adv.std()) if adv.numel() > 1 else 0.0
    else:  # reward_regression (UDRRA RA)
        if batch.log_partition is None:
            raise ValueError("reward_regression needs log_partition (log Z) in the SampleBatch")
        per_row = (beta * log_ratio + beta * batch.log_partition - batch.rewards) ** 2
    if ref.kind == "kl_in_loss":
        per_row = per_row + beta * kl_estimate(log_ratio, ref["estimator"])
    loss = (w * per_row).sum()
    metrics["loss"] = float(loss.detach())
    return LossOutput(loss, per_row.detach(), metrics)
