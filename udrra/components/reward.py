"""Reward estimate: how the learning signal is built from data.

Kinds:

- ``preference`` — a link turns the pair logit x = β·(g(u_w) − g(u_l)) − γ into a loss (GPO, Tang et al.
  arXiv 2402.05749). The links (each = base loss ℓ, label map q → q_eff, transform g):

  ============================  ==========================  ==========================  =====================
  link                          ℓ(x)                        q_eff                       source
  ============================  ==========================  ==========================  =====================
  ``logsigmoid``                −log σ(x)  (Bradley–Terry)  q                           DPO Eq. 7
  ``smoothed_logsigmoid``       −log σ(x)                   q(1−ε) + (1−q)ε             cDPO (Mitchell 2023)
  ``robust``                    −log σ(x)                   (q − ε)/(1 − 2ε)            rDPO (2403.00409)
  ``squared``                   ((x − ½)/β)² = (h − 1/2β)²  q                           IPO Eq. 17
  ``hinge``                     max(0, 1 − x)               q                           SLiC/RSO (2309.06657)
  ``forward_kl``                −log σ(x), g(u) = −e^{−u}   q                           f-DPO (2309.16240)
  ============================  ==========================  ==========================  =====================

  A pair whose chosen response is preferred with probability q costs
  q_eff·ℓ(x₊) + (1 − q_eff)·ℓ(x₋), x₊ = β(g_w − g_l) − γ, x₋ = β(g_l − g_w) − γ (q = 1 for dataset rows).
- ``explicit`` — a reward function/model scores samples; a ``baseline`` turns rewards into advantages:
  ``none`` (REINFORCE), ``greedy`` (ReMax: r of the greedy decode), ``leave_one_out`` (RLOO),
  ``group_norm`` (GRPO: (r − mean)/std in the group), ``batch_norm`` (advantage normalisation over the batch).
- ``reward_regression`` — UDRRA RA: (β·u + β·log Z − r)² (needs log Z).
- ``reward_difference`` — UDRRA RDA: (β·(u_w − u_l) − (r_w − r_l))² (log Z cancels; REBEL-style).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import KindSpec, Param, half_open

LINKS = ("logsigmoid", "smoothed_logsigmoid", "robust", "squared", "hinge", "forward_kl")
BASELINES = ("none", "greedy", "leave_one_out", "group_norm", "batch_norm")

KINDS: Dict[str, KindSpec] = {
    "preference": KindSpec("preference", "pairwise preference through a link (DPO family)", (
        Param("link", str, None, "the link; omitted = derived from the target", choices=LINKS),
        Param("epsilon", float, None, "label-smoothing (smoothed_logsigmoid) or flip rate (robust)",
              check=half_open),
    )),
    "explicit": KindSpec("explicit", "scalar reward of each sample minus a baseline (policy gradient)", (
        Param("baseline", str, "none", "how advantages are formed from rewards", choices=BASELINES),
        Param("eps", float, 1e-6, "added to the std in group_norm / batch_norm"),
    )),
    "reward_regression": KindSpec("reward_regression", "UDRRA RA: MSE of β·u + β·log Z to r", ()),
    "reward_difference": KindSpec("reward_difference", "UDRRA RDA: MSE of β·(u_w − u_l) to r_w − r_l", ()),
}

#: reward kinds that consume pairs of responses (PairBatch); the others consume SampleBatch.
PAIR_KINDS = ("preference", "reward_difference")


# ------------------------------------------------------------------------------------------------ links
@dataclass(frozen=True)
class Link:
    """A preference link: base loss ℓ(x), label map q → q_eff, and transform g applied to u before differencing."""

    name: str
    loss: Callable[[Tensor, float], Tensor]           # (x, beta) -> elementwise loss
    label_map: Callable[[Tensor, Optional[float]], Tensor]
    transform: Callable[[Tensor], Tensor]
    formula: str


def _identity_labels(q: Tensor, eps: Optional[float]) -> Tensor:
    return q


def _smoothed_labels(q: Tensor, eps: Optional[float]) -> Tensor:
    return q * (1.0 - eps) + (1.0 - q) * eps


def _robust_labels(q: Tensor, eps: Optional[float]) -> Tensor:
    return (q - eps) / (1.0 - 2.0 * eps)


def _logistic(x: Tensor, beta: float) -> Tensor:
    return F.softplus(-x)


def _squared(x: Tensor, beta: float) -> Tensor:
    return ((x - 0.5) / beta) ** 2


def _hinge(x: Tensor, beta: float) -> Tensor:
    return torch.relu(1.0 - x)


def _ident(u: Tensor) -> Tensor:
    return u


def _neg_inv_ratio(u: Tensor) -> Tensor:
    return -torch.exp(-u)


LINK_TABLE: Dict[str, Link] = {
    "logsigmoid": Link("logsigmoid", _logistic, _identity_labels, _ident, "−log σ(x)"),
    "smoothed_logsigmoid": Link("smoothed_logsigmoid", _logistic, _smoothed_labels, _ident,
                                "−(1−ε)·log σ(x) − ε·log σ(−x)"),
    "robust": Link("robust", _logistic, _robust_labels, _ident, "[−(1−ε)·log σ(x) + ε·log σ(−x)] / (1−2ε)"),
    "squared": Link("squared", _squared, _identity_labels, _ident, "(h − 1/(2β))², h = x/β"),
    "hinge": Link("hinge", _hinge, _identity_labels, _ident, "max(0, 1 − x)"),
    "forward_kl": Link("forward_kl", _logistic, _identity_labels, _neg_inv_ratio,
                       "−log σ(x), x = β·(f'(ρ_w) − f'(ρ_l)), f'(ρ) = −1/ρ"),
}


def preference_loss(u_chosen: Tensor, u_rejected: Tensor, labels: Tensor, *, link: str, beta: float,
                    gamma: float = 0.0, epsilon: Optional[float] = None) -> Tensor:
    """Per-pair preference loss (GPO family).

    Args:
        u_chosen, u_rejected: ``(B,)`` float, u = log π/π_ref (or log π without reference), nats.
        labels: ``(B,)`` float in [0, 1], probability that the chosen response is preferred.
        link: one of :data:`LINKS`. beta: temperature β > 0. gamma: margin γ ≥ 0 (SimPO).
        epsilon: smoothing / flip rate for ``smoothed_logsigmoid`` / ``robust``.
    Returns:
        ``(B,)`` float: q_eff·ℓ(x₊) + (1 − q_eff)·ℓ(x₋).
    """
    spec = LINK_TABLE[link]
    g_w, g_l = spec.transform(u_chosen), spec.transform(u_rejected)
    delta = beta * (g_w - g_l)
    q = spec.label_map(labels, epsilon)
    x_pos, x_neg = delta - gamma, -delta - gamma
    loss = q * spec.loss(x_pos, beta)
    flipped = (1.0 - q) != 0
    if bool(flipped.any()):
        loss = loss + torch.where(flipped, (1.0 - q) * spec.loss(x_neg, beta), torch.zeros_like(loss))
    return loss


# ------------------------------------------------------------------------------------------- baselines
def _group_stats(values: Tensor, group: Tensor, weights: Tensor, population: bool, unbiased: bool):
    """Per-row mean and std of ``values`` within each row's group (weighted by ``weights`` when population)."""
    n_groups = int(group.max().item()) + 1 if group.numel() else 0
    w = weights if population else torch.ones_like(values)
    wsum = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, group, w)
    mean = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, group, w * values) / wsum
    dev2 = (values - mean[group]) ** 2
    var = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, group, w * dev2)
    if population or not unbiased:
        var = var / wsum
    else:
        var = var / (wsum - 1).clamp_min(1)
    return mean[group], var.sqrt()[group], wsum[group]


def advantages(rewards: Tensor, *, baseline: str, group: Tensor, weights: Tensor, population: bool,
               greedy_rewards: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """Advantages A = (R − b)/s for each sample (no gradient).

    Args:
        rewards: ``(B,)`` float, (shaped) returns R of each sample.
        baseline: one of :data:`BASELINES`.
        group: ``(B,)`` int64 prompt/group index. weights: ``(B,)`` float, sum 1.
        population: weights are exact probabilities; group statistics become expectations under π, and the
            leave-one-out mean becomes E_π[R] (the expectation of the other samples' mean).
        greedy_rewards: ``(B,)`` reward of the greedy decode of each row's prompt (``greedy`` baseline).
    Returns:
        ``(B,)`` float advantages.
    Raises:
        ValueError: ``greedy`` baseline without ``greedy_rewards``.
    Sources: REINFORCE (Williams 1992); ReMax (Li et al. 2310.10505, Alg. 1); RLOO (Ahmadian et al.
    2402.14740, Eq. 6); GRPO (Shao et al. 2402.03300, §4.1.2); advantage normalisation (Xu et al. §5).
    """
    R = rewards.detach()
    if baseline == "none":
        return R
    if baseline == "greedy":
        if greedy_rewards is None:
            raise ValueError("the 'greedy' baseline (ReMax) needs greedy_rewards from the sample source")
        return R - greedy_rewards.detach()
    if baseline == "leave_one_out":
        mean, _, n = _group_stats(R, group, weights, population, unbiased=True)
        if population:
            return R - mean
        if bool((n < 2).any()):
            raise ValueError("the 'leave_one_out' baseline (RLOO) needs at least 2 samples per group")
        return (R - mean) * n / (n - 1)
    if baseline == "group_norm":
        mean, std, _ = _group_stats(R, group, weights, population, unbiased=True)
        return (R - mean) / (std + eps)
    if baseline == "batch_norm":
        zeros = torch.zeros_like(group)
        mean, std, _ = _group_stats(R, zeros, weights, population, unbiased=True)
        return (R - mean) / (std + eps)
    raise ValueError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")


def surrogate(logps: Tensor, old_logps: Tensor, adv: Tensor, clip: Optional[float]) -> Tensor:
    """Per-sample policy-gradient surrogate to *minimise*: −min(ρA, clip(ρ, 1−ε, 1+ε)A), ρ = π/π_old.

    Without ``clip`` it is −ρA, whose gradient at ρ = 1 is −A·∇log π (REINFORCE). PPO: Schulman et al.
    (2017) Eq. 7; DeepSeekMath Eq. 1.
    """
    ratio = torch.exp(logps - old_logps.detach())
    if clip is None:
        return -ratio * adv
    return -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)
