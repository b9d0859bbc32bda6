"""The loss's inputs: log-probs plus the structure around them.

The loss never sees "a bandit" or "an LM". A sample source (the bandit's enumerator or sampler, the sequence
testbed, or a dataset / rollout fed through a causal LM) produces one of the two batch types below, and the loss
derived from an algorithm's four components consumes it.

- :class:`PairBatch` is per sequence: every tensor is ``(B,)`` and log-probs are summed over the response tokens,
  ``log π(y | x) = Σ_t log π(y_t | x, y_<t)`` (nats). Pair losses (DPO family) only ever need that sum.
- :class:`SampleBatch` is per token: log-probs, old-policy and reference log-probs (and critic values) are
  ``(B, T)`` with a ``response_mask`` ``(B, T)``; rewards, groups and weights stay ``(B,)``. Token-level
  algorithms (PPO, GRPO, DAPO, ...) clip ratios, shape rewards and place KL terms per token. The one-token bandit
  is the ``T = 1`` case with an all-ones mask, and a ``(B,)`` log-prob tensor is read as ``(B, 1)``.

``weights`` are the aggregation weights of each row (sequence). They sum to 1 over the optimizer batch: ``1/B``
for a sampled mini-batch, or the population probability of the row (pair-distribution mass × prompt weight, or
``π(y|x)`` × prompt weight for on-policy samples) for the exact population loss. ``population`` marks the second
case: baselines then use exact expectations under ``weights`` instead of Monte-Carlo statistics. A micro-batch
cut from an optimizer batch (:meth:`SampleBatch.split`) keeps its rows' weights (summing to less than 1) and
carries the optimizer batch's :class:`Normalisers`, so that the sum of the micro-batch losses equals the loss of
the whole batch (and so does its gradient), whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import List, Optional

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["PairBatch", "SampleBatch", "Normalisers", "check_finite", "LOGP_TOL"]

#: log-probs may exceed 0 by this much (float round-off of a log-softmax) before a batch is refused
LOGP_TOL = 1e-5
#: tolerance on Σ weights = 1
WEIGHT_TOL = 1e-6


def check_finite(name: str, value: Optional[Tensor]) -> None:
    """Raise :class:`InputError` if ``value`` holds NaN or ±inf (a silent NaN poisons every later step)."""
    if value is None:
        return
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).nonzero()[:5].tolist()
        raise InputError(f"{name} contains NaN or inf at {bad}; log-probs, rewards, values and weights must be "
                         "finite")


def _check_logps(name: str, value: Optional[Tensor]) -> None:
    """Log-probs are ≤ 0 (up to :data:`LOGP_TOL` of round-off)."""
    if value is None:
        return
    top = float(value.detach().max()) if value.numel() else 0.0
    if top > LOGP_TOL:
        where = (value.detach() > LOGP_TOL).nonzero()[:3].tolist()
        raise InputError(f"{name} holds log-probabilities above 0 (max {top:.3g} at {where}); a log-probability "
                         "is ≤ 0 — pass log π, not logits or probabilities")


def _check_weights(name: str, weights: Tensor, partial: bool) -> None:
    """Weights are ≥ 0 and sum to 1 (≤ 1 for a micro-batch of a larger optimizer batch)."""
    if bool((weights < 0).any()):
        raise InputError(f"{name}.weights must be >= 0, got min {float(weights.min()):.3g}")
    total = float(weights.double().sum())
    if partial:
        if total > 1.0 + WEIGHT_TOL:
            raise InputError(f"{name}.weights of a micro-batch must sum to <= 1 (its share of the optimizer "
                             f"batch), got {total:.6g}")
    elif abs(total - 1.0) > WEIGHT_TOL:
        raise InputError(f"{name}.weights must sum to 1 over the batch (1/B each for a mini-batch, or population "
                         f"probabilities), got {total:.6g}")


def _check_labels(name: str, labels: Tensor) -> None:
    if bool(((labels < 0) | (labels > 1)).any()):
        raise InputError(f"{name}.labels must be probabilities in [0, 1] (P(chosen ≻ rejected)), got values in "
                         f"[{float(labels.min()):.3g}, {float(labels.max()):.3g}]")


def _check_rows(batch, rows: int, token_fields=()) -> None:
    """Every tensor field of ``batch`` has ``rows`` rows (``(B,)``, or ``(B, T)`` for ``token_fields``) and
    floating fields are finite."""
    name = type(batch).__name__
    if rows == 0:
        raise InputError(f"{name} is empty (B = 0): an empty batch has no loss; skip the step instead")
    T = None
    for f in fields(batch):
        v = getattr(batch, f.name)
        if not isinstance(v, Tensor):
            continue
        if f.name in token_fields:
            if v.dim() != 2 or v.shape[0] != rows:
                raise InputError(f"{name}.{f.name} must have shape (B, T) with B={rows}, got {tuple(v.shape)}")
            if T is None:
                T = v.shape[1]
            elif v.shape[1] != T:
                raise InputError(f"{name}.{f.name} has T={v.shape[1]} tokens but another per-token field has "
                                 f"T={T}; every (B, T) field shares one T")
        elif v.dim() != 1 or v.shape[0] != rows:
            raise InputError(f"{name}.{f.name} must have shape (B,)=({rows},), got {tuple(v.shape)}")
        if v.is_floating_point():
            check_finite(f"{name}.{f.name}", v.detach())


@dataclass
class PairBatch:
    """A batch of response pairs for one prompt each (DPO-style losses).

    Attributes (all shape ``(B,)``):
        chosen_logps, rejected_logps: float, log π_θ of the chosen / rejected response (with gradient), summed
            over response tokens (nats, ≤ 0).
        ref_chosen_logps, ref_rejected_logps: float, log π_ref of the same responses (no gradient).
        weights: float ≥ 0, aggregation weights summing to 1.
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
        """Check what the docstring promises. Raises :class:`InputError` naming the field and what is valid:
        an empty batch, a field not ``(B,)``, NaN/inf, log-probs above 0, lengths < 1, labels outside [0, 1],
        negative weights or weights not summing to 1."""
        _check_rows(self, self.chosen_logps.shape[0] if self.chosen_logps.dim() else 0)
        for f in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
            _check_logps(f"PairBatch.{f}", getattr(self, f))
        if (self.chosen_lengths <= 0).any() or (self.rejected_lengths <= 0).any():
            raise InputError("PairBatch lengths must be >= 1 token: an empty response has no log-prob")
        _check_labels("PairBatch", self.labels)
        _check_weights("PairBatch", self.weights, partial=False)
        return self


@dataclass(frozen=True)
class Normalisers:
    """Global counts of an optimizer batch, fixed before it is split into micro-batches (or processes).

    Attributes:
        tokens: Σ_b w_b·n_b, the weighted mean number of response tokens per sequence (n_b = Σ_t mask[b, t]).
            With ``w_b = 1/B`` it is (total response tokens)/B, so Σ_b w_b·Σ_t ℓ_bt / tokens = Σ ℓ / Σ mask:
            ``token_mean`` over the whole optimizer batch (verl ``agg_loss`` with global token counts).
        max_len: the constant ``seq_mean_token_sum_norm`` divides by (Dr. GRPO: the generation budget, e.g.
            ``max_new_tokens``; default the batch's padded length T).
    """

    tokens: float
    max_len: float

    @classmethod
    def of(cls, response_mask: Tensor, weights: Tensor, max_len: Optional[float] = None) -> "Normalisers":
        """The normalisers of a whole optimizer batch. response_mask ``(B, T)``, weights ``(B,)``."""
        n = response_mask.double().sum(-1)
        return cls(float((weights.double() * n).sum()), float(max_len if max_len is not None
                                                              else response_mask.shape[-1]))


def _as_tokens(x: Optional[Tensor]) -> Optional[Tensor]:
    """A ``(B,)`` per-sequence tensor is the ``T = 1`` case: ``(B, 1)``."""
    return x.unsqueeze(-1) if x is not None and x.dim() == 1 else x


_TOKEN_FIELDS = ("logps", "old_logps", "ref_logps", "response_mask", "values", "old_values", "advantages",
                 "returns")


@dataclass
class SampleBatch:
    """A batch of single scored responses, grouped by prompt (policy-gradient / regression losses).

    Per-token attributes, ``(B, T)`` (a ``(B,)`` tensor is read as ``(B, 1)``: the one-token bandit):
        logps: float, log π_θ(y_t | x, y_<t) (with gradient), nats ≤ 0; anything at masked positions.
        old_logps: float, log π_old of the policy that sampled y (no gradient); equals ``logps`` detached for
            fresh on-policy samples, so the importance ratio is 1.
        ref_logps: float, log π_ref(y_t | x, y_<t) (no gradient).
        response_mask: float or bool, 1 on response tokens (up to and including EOS), 0 on padding. Each row
            is left-aligned (ones, then zeros) with at least one token. Default: all ones.
        values: float or None, the critic's V(x, y_<t) (with gradient), for the ``gae`` reward estimate.
        old_values: float or None, the critic's values at rollout time (no gradient; value clipping and GAE).
        advantages, returns: float or None, filled in by the reward estimate (:meth:`udrra.Algorithm.estimate`)
            once per optimizer batch, before it is split; ``None`` until then.

    Per-sequence attributes, ``(B,)``:
        rewards: float, scalar task reward r(x, y) (before any KL shaping), placed at the last response token.
        group: int64, index of the prompt/group each row belongs to (0..G-1); baselines act per group.
        weights: float ≥ 0, aggregation weights summing to 1 (less for a micro-batch, see :meth:`split`).
        greedy_rewards: float or None, reward of the greedy decode of the same prompt (ReMax baseline).
        log_partition: float or None, log Z(x) = log Σ_y π_ref(y|x) exp(r(x,y)/β) (UDRRA reward
            regression needs it: its loss matches β log π/π_ref + β log Z to r).

    Other attributes:
        population: bool, True when ``weights`` are exact probabilities π(y|x)·P(x).
        group_size: int or None, the n of the groups a population batch stands for (finite-group baselines
            take the expectation over the other n − 1 draws); ``None`` = n → ∞.
        norm: :class:`Normalisers` of the optimizer batch this is a micro-batch of (``None``: this batch is the
            whole optimizer batch and its own counts are used).
        index: ``(B,)`` int64 or None, each row's position in the batch its producer collected, so that the
            producer can score the rows of a micro-batch again (:meth:`split` keeps it).
    """

    logps: Tensor
    old_logps: Tensor
    ref_logps: Tensor
    rewards: Tensor
    group: Tensor
    weights: Tensor
    response_mask: Optional[Tensor] = None
    greedy_rewards: Optional[Tensor] = None
    log_partition: Optional[Tensor] = None
    values: Optional[Tensor] = None
    old_values: Optional[Tensor] = None
    advantages: Optional[Tensor] = None
    returns: Optional[Tensor] = None
    population: bool = False
    group_size: Optional[int] = None
    norm: Optional[Normalisers] = None
    index: Optional[Tensor] = None

    def __post_init__(self):
        for f in _TOKEN_FIELDS:
            setattr(self, f, _as_tokens(getattr(self, f)))
        if self.response_mask is None:
            self.response_mask = torch.ones(self.logps.shape, dtype=self.logps.dtype, device=self.logps.device)
        elif self.response_mask.dtype == torch.bool or not self.response_mask.is_floating_point():
            self.response_mask = self.response_mask.to(self.logps.dtype)

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` float, response lengths in tokens (Σ_t response_mask)."""
        return self.response_mask.sum(-1)

    @property
    def last_token(self) -> Tensor:
        """``(B,)`` int64, index of each row's last response token (EOS when there is one), where the task
        reward is placed — never one past it (the placement bug of TRL's PPO, trl#3750)."""
        return (self.lengths.long() - 1).clamp_min(0)

    def sequence(self, per_token: Tensor) -> Tensor:
        """``(B,)`` masked sum over tokens of a ``(B, T)`` tensor (e.g. sequence log-probs from token ones)."""
        return (per_token * self.response_mask).sum(-1)

    def validate(self) -> "SampleBatch":
        """Check what the docstring promises. Raises :class:`InputError` naming the field and what is valid:
        an empty batch, wrong shapes, NaN/inf, log-probs above 0, a mask that is not 0/1, a row with no
        response token or not left-aligned, negative weights or weights not summing to 1 (≤ 1 with ``norm``)."""
        _check_rows(self, self.logps.shape[0], _TOKEN_FIELDS)
        m = self.response_mask
        for f in ("logps", "old_logps", "ref_logps"):
            _check_logps(f"SampleBatch.{f}", getattr(self, f) * m)
        if bool(((m != 0) & (m != 1)).any()):
            raise InputError("SampleBatch.response_mask must hold 0 or 1")
        n = m.sum(-1)
        if bool((n < 1).any()):
            rows = (n < 1).nonzero().flatten()[:5].tolist()
            raise InputError(f"SampleBatch.response_mask has rows with no response token (rows {rows}); drop "
                             "those rows (an empty response has no log-prob and no loss)")
        left = torch.arange(m.shape[1], device=m.device)[None, :] < n[:, None]
        if bool((left.to(m.dtype) != m).any()):
            raise InputError("SampleBatch.response_mask rows must be left-aligned (response tokens first, then "
                             "padding): the (B, T) tensors hold the response slice, right-padded")
        _check_weights("SampleBatch", self.weights, partial=self.norm is not None)
        if self.group.dtype != torch.int64 or bool((self.group < 0).any()):
            raise InputError("SampleBatch.group must be int64 indices >= 0")
        if self.group_size is not None and self.group_size < 1:
            raise InputError(f"SampleBatch.group_size must be >= 1, got {self.group_size}")
        return self

    def with_logps(self, logps: Tensor, values: Optional[Tensor] = None) -> "SampleBatch":
        """A copy with new policy log-probs (and critic values): PPO-style reuse of a batch over epochs."""
        return replace(self, logps=logps, values=self.values if values is None else values)

    def normalisers(self, max_len: Optional[float] = None) -> Normalisers:
        """This batch's :class:`Normalisers` (those of its optimizer batch when it is a micro-batch)."""
        return self.norm if self.norm is not None else Normalisers.of(self.response_mask, self.weights, max_len)

    def split(self, parts: int) -> List["SampleBatch"]:
        """Cut the batch into ``parts`` micro-batches of consecutive rows for gradient accumulation.

        Each micro-batch keeps its rows' weights and carries this batch's :class:`Normalisers`, so the sum of the
        micro-batch losses (and their gradients) equals the whole batch's, for every aggregation. Advantages must
        be filled in first (:meth:`udrra.Algorithm.estimate`): group baselines need whole groups.

        Raises:
            InputError: ``parts`` < 1 or more than B, or advantages not yet estimated.
        """
        B = self.logps.shape[0]
        if not 1 <= parts <= B:
            raise InputError(f"cannot split a batch of B={B} rows into {parts} micro-batches (valid: 1..{B})")
        if self.advantages is None:
            raise InputError("estimate advantages on the whole optimizer batch before splitting it "
                             "(algorithm.estimate(batch)): group baselines need whole groups")
        norm = self.normalisers()
        bounds = torch.linspace(0, B, parts + 1).round().long().tolist()
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            kw = {f.name: (getattr(self, f.name)[a:b] if isinstance(getattr(self, f.name), Tensor)
                           else getattr(self, f.name)) for f in fields(self)}
            kw["norm"] = norm
            out.append(SampleBatch(**kw))
        return out
