"""The loss's inputs: per-sequence log-probs plus the structure around them.

The loss never sees "a bandit" or "an LM". A sample source (the bandit's enumerator or sampler, or a
preference dataset fed through a causal LM) produces one of the two batch types below, and the loss derived
from an algorithm's four components consumes it. All tensors are 1-D over the batch dimension ``B``.

Log-probs are natural-log probabilities of a whole response (units: nats), summed over its tokens:
``log π(y | x) = Σ_t log π(y_t | x, y_<t)``. ``lengths`` holds the number of response tokens (1 on the
bandit), used by length-normalised reference terms (SimPO).

``weights`` are the aggregation weights of each row. They sum to 1 over the batch: ``1/B`` for a sampled
mini-batch, or the population probability of the row (pair-distribution mass × prompt weight, or
``π(y|x)`` × prompt weight for on-policy samples) for the exact population loss. ``population`` marks the
second case: baselines then use exact expectations under ``weights`` instead of Monte-Carlo statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["PairBatch", "SampleBatch", "check_finite"]


def check_finite(name: str, value: Optional[Tensor]) -> None:
    """Raise :class:`InputError` if ``value`` holds NaN or ±inf (a silent NaN poisons every later step)."""
    if value is None:
        return
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).nonzero().flatten()[:5].tolist()
        raise InputError(f"{name} contains NaN or inf at rows {bad}; log-probs, rewards and weights must be finite")


def _check_rows(batch, rows: int) -> None:
    """Every tensor field of ``batch`` has shape ``(rows,)``; floating fields are finite."""
    name = type(batch).__name__
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, Tensor):
            if v.dim() != 1 or v.shape[0] != rows:
                raise InputError(f"{name}.{f.name} must have shape (B,)=({rows},), got {tuple(v.shape)}")
            if v.is_floating_point():
                check_finite(f"{name}.{f.name}", v.detach())


@dataclass
class PairBatch:
    """A batch of response pairs for one prompt each (DPO-style losses).

    Attributes (all shape ``(B,)``):
        chosen_logps, rejected_logps: float, log π_θ of the chosen / rejected response (with gradient).
        ref_chosen_logps, ref_rejected_logps: float, log π_ref of the same responses (no gradient).
        weights: float, aggregation weights summing to 1.
        labels: float in [0, 1], probability that ``chosen`` is truly preferred. 1 for a dataset
            (the row is already ordered); ``p(chosen ≻ rejected)`` for the exact population loss, which
            enumerates each ordered pair once and lets the loss take the expectation over the label.
        chosen_lengths, rejected_lengths: float, response lengths in tokens (1 on the bandit).
        chosen_rewards, rejected_rewards: float or None, scalar rewards (reward-difference losses only).
        group: int64 or None, the prompt index of each row (for per-prompt metrics).
        population: bool, True when ``weights`` are exact population probabilities.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    weights: Tensor
    labels: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    chosen_rewards: Optional[Tensor] = None
    rejected_rewards: Optional[Tensor] = None
    group: Optional[Tensor] = None
    population: bool = False

    def validate(self) -> "PairBatch":
        """Check every field is ``(B,)`` and finite, and lengths ≥ 1. Raises :class:`InputError`."""
        _check_rows(self, self.chosen_logps.shape[0])
        if (self.chosen_lengths <= 0).any() or (self.rejected_lengths <= 0).any():
            raise InputError("PairBatch lengths must be >= 1 token: an empty response has no log-prob")
        return self


@dataclass
class SampleBatch:
    """A batch of single scored responses, grouped by prompt (policy-gradient / regression losses).

    Attributes (all shape ``(B,)``):
        logps: float, log π_θ(y|x) (with gradient).
        old_logps: float, log π_old(y|x) of the policy that sampled y (no gradient); equals ``logps``
            detached for fresh on-policy samples, so the importance ratio is 1.
        ref_logps: float, log π_ref(y|x) (no gradient).
        rewards: float, scalar reward r(x, y) of the task (before any KL shaping).
        group: int64, index of the prompt/group each row belongs to (0..G-1); baselines act per group.
        weights: float, aggregation weights summing to 1.
        lengths: float, response lengths in tokens (1 on the bandit).
        greedy_rewards: float or None, reward of the greedy decode of the same prompt (ReMax baseline).
        log_partition: float or None, log Z(x) = log Σ_y π_ref(y|x) exp(r(x,y)/β) (UDRRA reward
            regression needs it: its loss matches β log π/π_ref + β log Z to r).
        population: bool, True when ``weights`` are exact probabilities π(y|x)·P(x).
    """

    logps: Tensor
    old_logps: Tensor
    ref_logps: Tensor
    rewards: Tensor
    group: Tensor
    weights: Tensor
    lengths: Tensor
    greedy_rewards: Optional[Tensor] = None
    log_partition: Optional[Tensor] = None
    population: bool = False

    def validate(self) -> "SampleBatch":
        """Check every field is ``(B,)`` and finite. Raises :class:`InputError`."""
        _check_rows(self, self.logps.shape[0])
        return self

    def with_logps(self, logps: Tensor) -> "SampleBatch":
        """A copy with new policy log-probs (PPO-style reuse of a batch over several epochs)."""
        return replace(self, logps=logps)
