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
  ``js_divergence``             −log σ(x), g = log 2 + log σ(u)  q                      f-DPO Table 1 (JS)
  ``alpha_divergence``          −log σ(x), g = (1 − e^{−αu})/α   q                      f-DPO Table 1 (α)
  ``odds_ratio``                −log σ(x), g = u − log(1 − e^u)  q                      ORPO Eq. 7 (log odds)
  ============================  ==========================  ==========================  =====================

  The f-DPO links (Wang et al. 2309.16240, Thm 1) apply g = f' of the divergence's f to the ratio π/π_ref,
  written in u = log π/π_ref: reverse KL f'(ρ) = log ρ (DPO), forward KL 1 − 1/ρ, Jensen–Shannon log(2ρ/(1 + ρ)),
  α-divergence (1 − ρ^{−α})/α with α ∈ (0, 1) (the paper's α; TRL 1.16's ``f_alpha_divergence_coef`` is 1 − α).
  Additive constants of g cancel in the difference. α is the ``[target] alpha`` of an ``alpha_divergence``
  target: it defines the regulariser, and the link follows it.

  A pair whose chosen response is preferred with probability q costs
  q_eff·ℓ(x₊) + (1 − q_eff)·ℓ(x₋), x₊ = β(g_w − g_l) − γ, x₋ = β(g_l − g_w) − γ (q = 1 for dataset rows).
- ``explicit`` — a reward function/model scores samples; a ``baseline`` turns rewards into advantages:
  ``none`` (REINFORCE), ``greedy`` (ReMax: r of the greedy decode), ``leave_one_out`` (RLOO),
  ``group_mean`` (Dr. GRPO: r − mean in the group), ``group_norm`` (GRPO: (r − mean)/std in the group),
  ``batch_norm`` (advantage normalisation over the batch) — outcome baselines, one advantage per sequence,
  broadcast over its tokens — or ``gae`` (a learned critic V and generalised advantage estimation per token,
  with ``gamma``, ``lam``, ``value_coef``, ``value_clip``, ``whiten``; Schulman et al. 2016), or
  ``whitened_return_to_go`` (REINFORCE++, Hu 2501.03262: per token the return-to-go G_t = Σ_{s≥t} r_s, γ = 1, of
  the KL-shaped token rewards, whitened over the batch's response tokens; no critic).
- ``noise_contrastive`` — NCA, pairwise form (Chen et al. 2402.05369; TRL ``nca_pair``): logistic terms on each
  response's own implicit reward β·u, not on the difference: −log σ(β·u_w) − ½·log σ(−β·u_w) − ½·log σ(−β·u_l).
- ``max_likelihood`` — supervised fine-tuning on the samples the source kept: −log π(y) (RAFT's step on its
  best-of-n samples, Dong et al. 2304.06767 Alg. 1); the reward acts through the selection only.
- ``reward_regression`` — UDRRA RA: (β·u + β·log Z − r)² (needs log Z).
- ``reward_difference`` — UDRRA RDA: (β·(u_w − u_l) − (r_w − r_l))² (log Z cancels; REBEL-style).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import combinations
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from . import KindSpec, Param, half_open, nonneg, positive

LINKS = ("logsigmoid", "smoothed_logsigmoid", "robust", "squared", "hinge", "forward_kl", "js_divergence",
         "alpha_divergence", "odds_ratio")
#: links that transform the ratio π/π_ref (f-DPO): they need a reference
RATIO_LINKS = ("forward_kl", "js_divergence", "alpha_divergence")
_BASELINE_NAMES = ("none", "greedy", "leave_one_out", "group_mean", "group_norm", "batch_norm", "gae",
                   "whitened_return_to_go")

def _unit_closed(v) -> Optional[str]:
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


KINDS: Dict[str, KindSpec] = {
    "preference": KindSpec("preference", "pairwise preference through a link (DPO family)", (
        Param("link", str, None, "the link; omitted = derived from the target", choices=LINKS),
        Param("epsilon", float, None, "label-smoothing (smoothed_logsigmoid) or flip rate (robust)",
              check=half_open),
    )),
    "explicit": KindSpec("explicit", "scalar reward of each sample minus a baseline (policy gradient)", (
        Param("baseline", str, "none", "how advantages are formed from rewards ('gae': a learned critic)",
              choices=_BASELINE_NAMES),
        Param("eps", float, 1e-6, "added to the std in group_norm / batch_norm"),
        Param("gamma", float, None, "GAE discount γ in [0, 1] (baseline = 'gae'; default 1)", check=_unit_closed),
        Param("lam", float, None, "GAE λ in [0, 1] (baseline = 'gae'; default 0.95)", check=_unit_closed),
        Param("value_coef", float, None, "weight of the critic's value loss (baseline = 'gae'; default 0.1)",
              check=positive),
        Param("value_clip", float, None, "clip of V around its rollout value in the value loss (baseline = "
              "'gae'; omitted = no clip)", check=positive),
        Param("whiten", bool, None, "whiten GAE advantages over the batch's tokens (baseline = 'gae'; "
              "default false)"),
    )),
    "noise_contrastive": KindSpec("noise_contrastive", "NCA pairwise: −log σ(β·u_w) − ½·log σ(−β·u_w) − ½·log σ(−β·u_l)",
                                  ()),
    "max_likelihood": KindSpec("max_likelihood", "−log π(y) of the samples the source kept (RAFT / rejection-sampling "
                               "fine-tuning)", ()),
    "reward_regression": KindSpec("reward_regression", "UDRRA RA: MSE of β·u + β·log Z to r", ()),
    "reward_difference": KindSpec("reward_difference", "UDRRA RDA: MSE of β·(u_w − u_l) to r_w − r_l", ()),
}

#: the parameters of ``explicit`` that only a ``gae`` baseline takes, with their defaults
GAE_PARAMS = {"gamma": 1.0, "lam": 0.95, "value_coef": 0.1, "value_clip": None, "whiten": False}

#: reward kinds that consume pairs of responses (PairBatch); the others consume SampleBatch.
PAIR_KINDS = ("preference", "reward_difference", "noise_contrastive")


def nca_pair_loss(u_first: Tensor, u_second: Tensor, labels: Tensor, *, beta: float) -> Tensor:
    """NCA's pairwise loss (Chen et al. 2024, arXiv:2402.05369, §3 pairwise NCA; TRL ``loss_type="nca_pair"``).

    Args:
        u_first, u_second: ``(B,)`` float, u = log π/π_ref of the two responses (nats).
        labels: ``(B,)`` P(first is the chosen one) (1 for dataset rows). beta: β > 0.
    Returns:
        ``(B,)``: E_label[−log σ(β·u_w) − ½·log σ(−β·u_w) − ½·log σ(−β·u_l)] =
        q·softplus(−β·u_1) + (1 − q)·softplus(−β·u_2) + ½·softplus(β·u_1) + ½·softplus(β·u_2).
    """
    x1, x2 = beta * u_first, beta * u_second
    return (labels * F.softplus(-x1) + (1.0 - labels) * F.softplus(-x2)
            + 0.5 * F.softplus(x1) + 0.5 * F.softplus(x2))


# ------------------------------------------------------------------------------------------------ links
@dataclass(frozen=True)
class Link:
    """A preference link: base loss ℓ(x), label map q → q_eff, and transform g applied to u before differencing.

    ``transform(u, alpha)`` is g; ``g_text`` how ``udrra show`` writes it; ``inverse(z, alpha)`` is g⁻¹ (numpy, for
    the target: u = g⁻¹(v + c)) and ``sup(alpha)`` the supremum of g's range (g⁻¹ is defined below it), both
    ``None`` for links whose target is not of the form π_ref·exp(g⁻¹(v + c))."""

    name: str
    loss: Callable[[Tensor, float], Tensor]           # (x, beta) -> elementwise loss
    label_map: Callable[[Tensor, Optional[float]], Tensor]
    transform: Callable[[Tensor, Optional[float]], Tensor]
    formula: str
    g_text: str = "u"
    inverse: Optional[Callable] = None
    sup: Optional[Callable[[Optional[float]], float]] = None


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


def _ident(u: Tensor, alpha: Optional[float] = None) -> Tensor:
    return u


def _neg_inv_ratio(u: Tensor, alpha: Optional[float] = None) -> Tensor:
    return -torch.exp(-u)                              # f'(ρ) = 1 − 1/ρ up to the constant 1


def _js(u: Tensor, alpha: Optional[float] = None) -> Tensor:
    return math.log(2.0) + F.logsigmoid(u)             # f'(ρ) = log(2ρ/(1 + ρ)) = log 2 + log σ(log ρ)


def _alpha(u: Tensor, alpha: Optional[float] = None) -> Tensor:
    return -torch.expm1(-alpha * u) / alpha            # f'(ρ) = (1 − ρ^{−α})/α


def _log_odds(u: Tensor, alpha: Optional[float] = None) -> Tensor:
    return u - torch.log(-torch.expm1(u))              # log(P/(1 − P)), P = e^u ≤ 1 (ORPO Eq. 7)


# g⁻¹ (numpy arrays, z below sup g) for the target u = g⁻¹(v + c)
def _inv_log_odds(z, alpha=None):
    import numpy as np
    return -np.logaddexp(0.0, -z)                      # u = log σ(z)


def _inv_ident(z, alpha=None):
    return z


def _inv_neg_inv_ratio(z, alpha=None):
    import numpy as np
    return -np.log(-z)


def _inv_js(z, alpha=None):
    import numpy as np
    half = np.exp(z) / 2.0                             # σ(u) = e^z/2  ⇒  u = logit(e^z/2)
    return np.log(half) - np.log1p(-half)


def _inv_alpha(z, alpha=None):
    import numpy as np
    return -np.log1p(-alpha * z) / alpha               # 1 − e^{−αu} = αz


LINK_TABLE: Dict[str, Link] = {
    "logsigmoid": Link("logsigmoid", _logistic, _identity_labels, _ident, "−log σ(x)"),
    "smoothed_logsigmoid": Link("smoothed_logsigmoid", _logistic, _smoothed_labels, _ident,
                                "−(1−ε)·log σ(x) − ε·log σ(−x)"),
    "robust": Link("robust", _logistic, _robust_labels, _ident, "[−(1−ε)·log σ(x) + ε·log σ(−x)] / (1−2ε)"),
    "squared": Link("squared", _squared, _identity_labels, _ident, "(h − 1/(2β))², h = x/β"),
    "hinge": Link("hinge", _hinge, _identity_labels, _ident, "max(0, 1 − x)"),
    "forward_kl": Link("forward_kl", _logistic, _identity_labels, _neg_inv_ratio,
                       "−log σ(x), x = β·(f'(ρ_w) − f'(ρ_l)), f'(ρ) = −1/ρ", "−exp(−u)", _inv_neg_inv_ratio,
                       lambda alpha: 0.0),
    "js_divergence": Link("js_divergence", _logistic, _identity_labels, _js,
                          "−log σ(x), x = β·(f'(ρ_w) − f'(ρ_l)), f'(ρ) = log(2ρ/(1 + ρ))", "log 2 + log σ(u)",
                          _inv_js, lambda alpha: math.log(2.0)),
    "alpha_divergence": Link("alpha_divergence", _logistic, _identity_labels, _alpha,
                             "−log σ(x), x = β·(f'(ρ_w) − f'(ρ_l)), f'(ρ) = (1 − ρ^(−α))/α", "(1 − exp(−α·u))/α",
                             _inv_alpha, lambda alpha: 1.0 / alpha),
    "odds_ratio": Link("odds_ratio", _logistic, _identity_labels, _log_odds,
                       "−log σ(x), x = β·(log odds(y_w) − log odds(y_l)), odds = P/(1 − P), P = e^u",
                       "u − log(1 − exp(u))  (log odds of P = e^u)", _inv_log_odds, lambda alpha: float("inf")),
}
for _name in ("logsigmoid", "smoothed_logsigmoid", "robust", "squared"):
    LINK_TABLE[_name] = replace(LINK_TABLE[_name], inverse=_inv_ident, sup=lambda alpha: float("inf"))


def preference_loss(u_chosen: Tensor, u_rejected: Tensor, labels: Tensor, *, link: str, beta: float,
                    gamma: float = 0.0, epsilon: Optional[float] = None, alpha: Optional[float] = None) -> Tensor:
    """Per-pair preference loss (GPO family).

    Args:
        u_chosen, u_rejected: ``(B,)`` float, u = log π/π_ref (or log π without reference), nats.
        labels: ``(B,)`` float in [0, 1], probability that the chosen response is preferred.
        link: one of :data:`LINKS`. beta: temperature β > 0. gamma: margin γ ≥ 0 (SimPO).
        epsilon: smoothing / flip rate for ``smoothed_logsigmoid`` / ``robust``.
        alpha: α ∈ (0, 1) of the ``alpha_divergence`` link (f-DPO Table 1).
    Returns:
        ``(B,)`` float: q_eff·ℓ(x₊) + (1 − q_eff)·ℓ(x₋).
    Raises:
        InputError: ``alpha_divergence`` without ``alpha``.
    """
    spec = LINK_TABLE[link]
    if link == "alpha_divergence" and alpha is None:
        raise InputError("the 'alpha_divergence' link needs alpha in (0, 1) (the [target] alpha)")
    g_w, g_l = spec.transform(u_chosen, alpha), spec.transform(u_rejected, alpha)
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


# ------------------------------------------------------------------------------- finite groups (exact mode)
# A population batch (``population=True``) enumerates every (prompt, response) row with weight π(y|x)/P. When it
# stands for groups of a finite size n (``group_size``), the sampled loss (1/n)·Σ_i A_i·∇log π(y_i), y_i iid ∼ π,
# A detached, has expected gradient Σ_y π(y)·ā(y)·∇log π(y) with
#     ā(y) = E_{y_2..y_n ∼ π}[ A(y; {y, y_2, ..., y_n}) ],
# the advantage of a row that holds y averaged over the other n − 1 draws of its group. The other draws form a
# multiset: a composition c of n − 1 into the group's k rows, with multinomial probability
# (n − 1)!/Π c_j!·Π π_j^{c_j}. Baselines that are linear in the group mean have closed forms (leave_one_out:
# ā = R − E_π R; group_mean: ā = (n − 1)/n·(R − E_π R)); group_norm divides by the group's std and is
# enumerated (:func:`expected_group_advantages`).

#: most compositions of the n − 1 other draws into k rows enumerated per group; beyond it population group_norm
#: (and the derived target, see udrra.components.target) fall back to n → ∞ (warned once per (n, k))
FINITE_GROUP_LIMIT = 200_000
#: compositions processed at once (bounds memory: chunk × groups × k doubles per intermediate)
_CHUNK = 16_384
_WARNED = set()


def group_compositions_count(n: int, k: int) -> int:
    """Number of multisets of the n − 1 other draws of a group over k responses: C(n − 1 + k − 1, k − 1)."""
    return math.comb(n - 1 + k - 1, k - 1)


def finite_group_feasible(n: int, k: int) -> bool:
    """True when the n − 1 other draws over k responses have at most :data:`FINITE_GROUP_LIMIT` multisets."""
    return group_compositions_count(n, k) <= FINITE_GROUP_LIMIT


@lru_cache(maxsize=16)
def _compositions(total: int, k: int) -> Tensor:
    """All c ∈ ℕ^k with Σ c = total, ``(M, k)`` float64 (stars and bars: k − 1 bars among total + k − 1 slots)."""
    if k == 1:
        return torch.tensor([[float(total)]], dtype=torch.float64)
    bars = torch.tensor(list(combinations(range(total + k - 1), k - 1)), dtype=torch.int64).reshape(-1, k - 1)
    edges = torch.cat([torch.full((bars.shape[0], 1), -1, dtype=torch.int64), bars,
                       torch.full((bars.shape[0], 1), total + k - 1, dtype=torch.int64)], 1)
    return (edges.diff(dim=1) - 1).double()


def _warn_fallback(n: int, k: int) -> None:
    if (n, k) in _WARNED:
        return
    _WARNED.add((n, k))
    warnings.warn(f"exact mode: groups of n = {n} over k = {k} responses have {group_compositions_count(n, k)} "
                  f"multisets of the other n − 1 draws (limit {FINITE_GROUP_LIMIT}); the population group_norm "
                  "advantage falls back to n → ∞ (the derived target does the same)", stacklevel=4)


def _group_rows(group: Tensor):
    """Rows of each group, batched by group size: yields ``(k, idx)`` with ``idx`` ``(G, k)`` row indices."""
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group)
    starts = counts.cumsum(0) - counts
    for k in counts.unique().tolist():
        if k == 0:
            continue
        gids = (counts == k).nonzero().flatten()
        yield int(k), order[starts[gids][:, None] + torch.arange(k)[None, :]]


def _composition_advantages(D: Tensor, C: Tensor, n: int, kind: str, eps: float) -> Tensor:
    """A of a row y whose other n − 1 draws have counts C, the group's values written as D = R − R_y.

    D: ``(G, k, k)`` with D[g, y, j] = R_j − R_y (the row itself is 0). C: ``(m, k)``. Returns ``(m, G, k)``.
    Centering on R_y keeps groups of one repeated response exactly at A = 0.
    """
    G, k, _ = D.shape
    s1 = (C @ D.reshape(G * k, k).T).reshape(-1, G, k)             # Σ_others (R_j − R_y)
    if kind == "leave_one_out":
        return -s1 / (n - 1)                                        # R_y − mean of the others
    mean = s1 / n                                                   # group mean − R_y
    if kind == "group_mean":
        return -mean
    s2 = (C @ (D * D).reshape(G * k, k).T).reshape(-1, G, k)
    dev = (s2 - n * mean * mean).clamp_min(0.0)                     # Σ_group (x − mean)²
    a = -mean / ((dev / (n - 1)).sqrt() + eps)                      # unbiased std (Bessel) + eps
    return torch.where(mean == 0, torch.zeros_like(a), a)           # no spread, no signal (also at eps = 0)


def expected_group_advantages(R: Tensor, group: Tensor, weights: Tensor, n: int, kind: str,
                              eps: float = 1e-6) -> Tensor:
    """ā(y) = E_{y_2..y_n ∼ π}[A(y; {y, y_2, ..., y_n})] per row, by enumerating the other n − 1 draws.

    Args:
        R: ``(B,)`` per-row returns (may depend on π, e.g. KL-shaped: it is a function of the row).
        group: ``(B,)`` int64 group of each row; the rows of a group are its k possible responses.
        weights: ``(B,)`` population weights; π within a group = weights normalised over the group.
        n: group size ≥ 2. kind: ``group_norm`` ((R − mean)/(unbiased std + eps)), ``group_mean`` (R − mean)
            or ``leave_one_out`` (R − mean of the others): the formulas of the sampled path.
    Returns:
        ``(B,)`` float64 expected advantages; rows of groups whose multisets exceed :data:`FINITE_GROUP_LIMIT`
        are NaN (callers fall back to n → ∞ there).
    """
    R = R.double()
    out = torch.full_like(R, float("nan"))
    for k, idx in _group_rows(group):
        if not finite_group_feasible(n, k):
            continue
        Rg = R[idx]
        wg = weights.double()[idx]
        pi = wg / wg.sum(-1, keepdim=True).clamp_min(1e-300)                # (G, k)
        zero = (pi <= 0).double()
        logpi = torch.log(pi.clamp_min(1e-300)) * (1.0 - zero)
        D = Rg[:, None, :] - Rg[:, :, None]                                   # D[g, y, j] = R_j − R_y
        C_all = _compositions(n - 1, k)
        abar = torch.zeros_like(Rg)
        for a in range(0, C_all.shape[0], _CHUNK):
            C = C_all[a:a + _CHUNK]
            logp = (math.lgamma(n) - torch.lgamma(C + 1.0).sum(-1))[:, None] + C @ logpi.T   # (m, G)
            prob = torch.exp(logp).masked_fill((C @ zero.T) > 0, 0.0)
            abar += torch.einsum("mg,mgy->gy", prob, _composition_advantages(D, C, n, kind, eps))
        out[idx] = abar
    return out


# ------------------------------------------------------------------------------------------- baselines
@dataclass(frozen=True)
class Baseline:
    """An outcome baseline: how sequence returns R ``(B,)`` become advantages ``(B,)``.

    ``fn(R, group, weights, population, greedy_rewards, eps, group_size=None)``; ``min_group`` is the smallest
    group size n it accepts; ``formula`` is what ``udrra show`` prints; ``source`` the paper and equation.
    ``group_size`` is only given for population batches (the n their groups stand for; ``None`` = n → ∞).
    """

    name: str
    fn: Callable[..., Tensor]
    formula: str
    source: str
    min_group: int = 1


def _none(R, group, weights, population, greedy, eps, group_size=None):
    return R


def _greedy(R, group, weights, population, greedy, eps, group_size=None):
    if greedy is None:
        raise InputError("the 'greedy' baseline (ReMax) needs greedy_rewards (the reward of each prompt's greedy "
                         "decode) in the SampleBatch")
    return R - greedy.detach()


def _check_population_n(name: str, group_size: Optional[int]) -> None:
    if group_size is not None and group_size < 2:
        raise InputError(f"the {name!r} baseline needs groups of at least 2 samples, got group_size={group_size}")


def _leave_one_out(R, group, weights, population, greedy, eps, group_size=None):
    mean, _, n = _group_stats(R, group, weights, population, unbiased=True)
    if population:
        # E over the other n − 1 draws of their mean is E_π[R] for every n: ā = R − E_π R exactly
        _check_population_n("leave_one_out", group_size)
        return R - mean
    if bool((n < 2).any()):
        raise InputError("the 'leave_one_out' baseline (RLOO) needs at least 2 samples per group")
    return (R - mean) * n / (n - 1)


def _group_mean(R, group, weights, population, greedy, eps, group_size=None):
    mean, _, n = _group_stats(R, group, weights, population, unbiased=True)
    if population:
        _check_population_n("group_mean", group_size)
        if group_size is None:
            return R - mean
        # ā(y) = R(y) − E[(R(y) + Σ_{i≥2} R(y_i))/n] = (n − 1)/n·(R(y) − E_π R): exact, no enumeration needed
        return (R - mean) * (group_size - 1) / group_size
    if bool((n < 2).any()):
        raise InputError("the 'group_mean' baseline (Dr. GRPO) needs at least 2 samples per group")
    return R - mean


def _group_norm(R, group, weights, population, greedy, eps, group_size=None):
    mean, std, n = _group_stats(R, group, weights, population, unbiased=True)
    if population:
        _check_population_n("group_norm", group_size)
        limit = (R - mean) / (std + eps)
        if group_size is None:
            return limit
        abar = expected_group_advantages(R, group, weights, group_size, "group_norm", eps)
        sizes = torch.bincount(group)
        for k in sizes.unique().tolist():
            if k and not finite_group_feasible(group_size, int(k)):
                _warn_fallback(group_size, int(k))
                rows = sizes[group] == k
                abar = torch.where(rows, limit.to(abar.dtype), abar)
        return abar.to(R.dtype)
    if bool((n < 2).any()):
        raise InputError("the 'group_norm' baseline (GRPO) needs at least 2 samples per group: the std of one "
                         "sample is undefined")
    return (R - mean) / (std + eps)


def _batch_norm(R, group, weights, population, greedy, eps, group_size=None):
    # the batch is large: its mean and std are taken as exact (n → ∞) whatever the group size
    zeros = torch.zeros_like(group)
    mean, std, _ = _group_stats(R, zeros, weights, population, unbiased=True)
    return (R - mean) / (std + eps)


BASELINE_TABLE: Dict[str, Baseline] = {b.name: b for b in (
    Baseline("none", _none, "A = R", "REINFORCE, Williams 1992"),
    Baseline("greedy", _greedy, "A = R − r(x, ȳ_greedy)  (reward of the greedy decode)",
             "ReMax, Li et al. 2310.10505, Alg. 1"),
    Baseline("leave_one_out", _leave_one_out, "A_i = R_i − mean_{j≠i} R_j  over the n samples of the prompt",
             "RLOO, Ahmadian et al. 2402.14740, Eq. 6", min_group=2),
    Baseline("group_mean", _group_mean, "A_i = R_i − mean_group R  (no std division)",
             "Dr. GRPO, Liu et al. 2503.20783, §3.2", min_group=2),
    Baseline("group_norm", _group_norm, "A_i = (R_i − mean_group R) / (std_group R + eps)",
             "GRPO, Shao et al. 2402.03300, §4.1.2", min_group=2),
    Baseline("batch_norm", _batch_norm, "A = (R − mean_batch R) / (std_batch R + eps)",
             "advantage normalisation, Xu et al. 2404.10719, §5"),
)}
#: the ``gae`` estimate is not an outcome baseline: it needs a critic and acts per token
GAE = "gae"
#: REINFORCE++'s estimate acts per token too (returns-to-go), without a critic
RETURN_TO_GO = "whitened_return_to_go"
#: per-token estimates (see :func:`udrra.loss.estimate`), with the formula ``udrra show`` prints
TOKEN_ESTIMATES = {
    GAE: "GAE(γ, λ) with a learned critic V",
    RETURN_TO_GO: "A_t = whiten(G_t) over the batch's response tokens, G_t = Σ_{s≥t} r_s (γ = 1; REINFORCE++, Hu "
                  "2501.03262 §3; OpenRLHF masked_whiten)",
}
BASELINES = tuple(BASELINE_TABLE) + (GAE, RETURN_TO_GO)


def advantages(rewards: Tensor, *, baseline: str, group: Tensor, weights: Tensor, population: bool,
               greedy_rewards: Optional[Tensor] = None, eps: float = 1e-6,
               group_size: Optional[int] = None) -> Tensor:
    """Outcome advantages A = (R − b)/s for each sequence (no gradient).

    Args:
        rewards: ``(B,)`` float, (shaped) sequence returns R of each sample.
        baseline: a name of :data:`BASELINE_TABLE` (``gae`` is per token: see :func:`gae`).
        group: ``(B,)`` int64 prompt/group index. weights: ``(B,)`` float, sum 1.
        population: weights are exact probabilities (every response of every group enumerated, weight
            π(y|x)/P); each row's advantage is then the expectation over the group it would be drawn in.
        greedy_rewards: ``(B,)`` reward of the greedy decode of each row's prompt (``greedy`` baseline).
        eps: added to the std of ``group_norm`` / ``batch_norm``.
        group_size: population only (ignored otherwise): the n of the sampled groups the population stands for.
            Each row gets ā(y) = E_{y_2..y_n ∼ π}[A(y; {y, y_2, ..., y_n})], the expectation of the sampled
            advantage over the other n − 1 draws, so that Σ_y π(y)·ā(y)·∇log π(y) is the expected gradient of
            the sampled loss: ``leave_one_out`` R − E_π R (any n), ``group_mean`` (n − 1)/n·(R − E_π R),
            ``group_norm`` by enumerating the multisets of the other draws (:func:`expected_group_advantages`;
            beyond :data:`FINITE_GROUP_LIMIT` of them it falls back to n → ∞ with a warning). ``None``: n → ∞,
            group statistics are exact expectations under π. ``batch_norm`` is always n → ∞ (the batch is
            large), ``none`` / ``greedy`` do not depend on n.
    Returns:
        ``(B,)`` float advantages.
    Raises:
        InputError: unknown baseline (lists the valid ones), ``greedy`` without ``greedy_rewards``, a sampled
            group (or a population ``group_size``) smaller than the baseline needs.
    Sources: each entry of :data:`BASELINE_TABLE` names its paper and equation.
    """
    spec = BASELINE_TABLE.get(baseline)
    if spec is None:
        raise InputError(f"unknown outcome baseline {baseline!r}; valid: {', '.join(BASELINE_TABLE)} "
                         f"('{GAE}' and '{RETURN_TO_GO}' act per token: use udrra.loss.estimate)")
    return spec.fn(rewards.detach(), group, weights, population, greedy_rewards, eps,
                   group_size=group_size if population else None)


def gae(token_rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float, lam: float):
    """Generalised advantage estimation over the response tokens (Schulman et al. 2016, arXiv:1506.02438).

    Args:
        token_rewards: ``(B, T)`` float, r_t per response token (the task reward at the last token, −β·k1_t on
            every token when the KL is in the reward). Padding positions are ignored.
        values: ``(B, T)`` float, the critic's V(s_t) = V(x, y_<t) at rollout time (no gradient).
        response_mask: ``(B, T)`` 0/1, left-aligned (a row's response tokens come first).
        gamma: discount γ ∈ [0, 1]. lam: GAE λ ∈ [0, 1].
    Returns:
        ``(advantages, returns)``, both ``(B, T)`` float and 0 at padding. returns = advantages + values, the
        critic's regression target (λ-return).
    """
    r, v, m = token_rewards.detach(), values.detach(), response_mask.to(values.dtype)
    B, T = r.shape
    adv = torch.zeros_like(r)
    running = torch.zeros(B, dtype=r.dtype, device=r.device)      # Â_{t+1}
    for t in reversed(range(T)):
        # the state after the last response token is terminal: V = 0 there and nothing flows back from padding
        alive = m[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_v = v[:, t + 1] * alive if t + 1 < T else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_v - v[:, t]                  # δ_t = r_t + γ·V(s_{t+1}) − V(s_t)   (Eq. 11)
        running = (delta + gamma * lam * alive * running) * m[:, t]  # Â_t = δ_t + γλ·Â_{t+1}            (Eq. 16)
        adv[:, t] = running
    return adv, (adv + v) * m


def returns_to_go(token_rewards: Tensor, response_mask: Tensor) -> Tensor:
    """G_t = Σ_{s≥t} r_s over each row's response tokens (γ = 1), 0 at padding: the REINFORCE++ return (Hu
    2501.03262 Eq. 2 with γ = 1; GAE with V = 0 and λ = 1). Shapes ``(B, T)`` → ``(B, T)``."""
    r = token_rewards.detach() * response_mask
    return torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1]) * response_mask


def whiten(x: Tensor, mask: Tensor, weights: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean)/std over the response tokens of the batch, each row weighted by ``weights`` (advantage
    whitening of PPO implementations; verl ``masked_whiten``). Shapes ``(B, T)``, ``(B, T)``, ``(B,)``."""
    w = weights[:, None] * mask
    total = w.sum()
    mean = (w * x).sum() / total
    var = (w * (x - mean) ** 2).sum() / total
    return (x - mean) * torch.rsqrt(var + eps) * mask


#: log-ratios are clamped to ±LOG_RATIO_LIMIT before exp() in the importance ratio (verl clamps at ±20)
LOG_RATIO_LIMIT = 20.0


def surrogate(logps: Tensor, old_logps: Tensor, adv: Tensor, clip: Optional[float],
              clip_high: Optional[float] = None, dual_clip: Optional[float] = None) -> Tensor:
    """Per-token policy-gradient surrogate to *minimise*: −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), ρ = π/π_old.

    Without ``clip`` it is −ρA, whose gradient at ρ = 1 is −A·∇log π (REINFORCE). PPO: Schulman et al.
    (2017) Eq. 7; DeepSeekMath Eq. 1. ``clip_high`` (ε_high, default ε_low): DAPO's clip-higher (Yu et al.
    2503.14476, Eq. 10). ``dual_clip`` c > 1: for A < 0 the loss is at most −c·A (Ye et al. 1912.09729, Eq. 5;
    verl ``clip_ratio_c``).

    The log-ratio log π − log π_old is clamped to ±:data:`LOG_RATIO_LIMIT` before exp (ρ ≤ e^20 ≈ 4.9e8, no
    overflow to inf in fp32; no gradient flows through a clamped entry, as in verl).

    Args:
        logps, old_logps: ``(B, T)`` (or any equal shape) float, nats. adv: same shape (broadcastable).
    Returns:
        Per-token loss, same shape as ``logps``.
    """
    log_ratio = (logps - old_logps.detach()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    if clip is None:
        return -ratio * adv
    hi = clip if clip_high is None else clip_high
    loss = -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + hi) * adv)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    return loss


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: Optional[float]) -> Tensor:
    """Per-token clipped value loss ½·max((V − R)², (clip(V, V_old ± c) − R)²) (PPO implementations: OpenAI
    baselines ``ppo2``; verl ``compute_value_loss``; Ouyang et al. 2022 App. C). ``clip`` None: ½(V − R)².
    Shapes ``(B, T)``; returns ``(B, T)``."""
    err = (values - returns.detach()) ** 2
    if clip is None:
        return 0.5 * err
    clipped = old_values.detach() + (values - old_values.detach()).clamp(-clip, clip)
    return 0.5 * torch.maximum(err, (clipped - returns.detach()) ** 2)
