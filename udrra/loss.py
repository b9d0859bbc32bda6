"""The loss, derived from the four components.

There is no per-algorithm code here: the reference term turns log-probs into the quantity the reward estimate
needs, the reward estimate turns it into a per-row loss, the reference term may add a KL penalty, and rows are
aggregated with the batch weights. The same functions train the bandit and an LM.

Aggregation is explicit. Pair losses are per sequence: Σ_b weights[b]·ℓ_b on summed log-probs (reference terms
with ``length_normalize`` divide them by the length, SimPO's average log-likelihood). Sample losses are per token
(ratios, clipping, KL, value loss) and reduce through :func:`aggregate`, the one place a ``(B, T)`` loss becomes a
scalar, with the aggregation the ``[source]`` table declares and normalisers fixed for the whole optimizer batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict

import torch
from torch import Tensor

from .batch import Normalisers, PairBatch, SampleBatch
from .components import Components
from .components import reward as reward_mod
from .components.reference import REFERENCE_FREE, implicit_logratio, kl_estimate
from .components.reward import advantages, preference_loss, surrogate, value_loss
from .components.source import AGGREGATIONS
from .errors import InputError

__all__ = ["LossOutput", "pair_loss", "sample_loss", "estimate", "aggregate"]


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
        ``rewards/margin``, ``rewards/accuracy`` (ties count ½), ``logps/chosen``, ``logps/rejected``; ``nll``
        (the chosen responses' NLL, nats[/token]) for a ``chosen_nll`` reference, whose loss per pair is
        NLL + λ·preference term (ORPO Eq. 6).
    """
    t, _, rw, ref = components
    beta = float(t["beta"])
    uses_ref = ref.kind not in REFERENCE_FREE
    norm = bool(ref.get("length_normalize"))
    u_w = implicit_logratio(batch.chosen_logps, batch.ref_chosen_logps, batch.chosen_lengths,
                            uses_reference=uses_ref, length_normalize=norm)
    u_l = implicit_logratio(batch.rejected_logps, batch.ref_rejected_logps, batch.rejected_lengths,
                            uses_reference=uses_ref, length_normalize=norm)
    if rw.kind == "preference":
        per_row = preference_loss(u_w, u_l, batch.labels, link=rw["link"], beta=beta,
                                  gamma=float(ref.get("gamma") or 0.0), epsilon=rw.get("epsilon"),
                                  alpha=t.get("alpha"))
    elif rw.kind == "noise_contrastive":
        per_row = reward_mod.nca_pair_loss(u_w, u_l, batch.labels, beta=beta)
    else:  # reward_difference (UDRRA RDA): regress β·(u_w − u_l) on r_w − r_l
        if batch.chosen_rewards is None or batch.rejected_rewards is None:
            raise InputError("reward_difference needs chosen_rewards and rejected_rewards in the PairBatch")
        per_row = (beta * (u_w - u_l) - (batch.chosen_rewards - batch.rejected_rewards)) ** 2
    nll = None
    if ref.kind == "chosen_nll":   # ORPO Eq. 6: −log π(y_w)[/|y_w|] + λ·preference term; labels = P(first is chosen)
        nll = -(batch.labels * u_w + (1.0 - batch.labels) * u_l)
        per_row = nll + float(ref["lam"]) * per_row
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
    if nll is not None:
        metrics["nll"] = _wmean(nll, w)
    return LossOutput(loss, per_row.detach(), metrics)


def aggregate(loss_mat: Tensor, response_mask: Tensor, weights: Tensor, mode: str, norm: Normalisers) -> Tensor:
    """The one reduction of a ``(B, T)`` token loss to the scalar that is minimised.

    With ``m`` the response mask, ``w`` the row weights (Σ w = 1 over the optimizer batch; ``1/B`` for a sampled
    batch) and the optimizer batch's global :class:`~udrra.batch.Normalisers`:

    ==========================  ====================================  =============================================
    mode                        scalar                                with w = 1/B (verl ``agg_loss``)
    ==========================  ====================================  =============================================
    ``seq_mean_token_sum``      Σ_b w_b Σ_t m ℓ                       mean over sequences of the token sum
    ``seq_mean_token_mean``     Σ_b w_b Σ_t m ℓ / n_b                 GRPO's 1/|o_i| (DeepSeekMath Eq. 3)
    ``token_mean``              Σ_b w_b Σ_t m ℓ / norm.tokens         Σ m ℓ / Σ m over the batch (DAPO Eq. 8)
    ``seq_mean_token_sum_norm`` Σ_b w_b Σ_t m ℓ / norm.max_len        Dr. GRPO's constant normaliser (§3.2)
    ==========================  ====================================  =============================================

    n_b = Σ_t m_bt. Every normaliser is fixed for the whole optimizer batch before it is split, so the sum of
    micro-batch losses equals the whole batch's loss, and so does its gradient, for every mode (unlike per-micro-
    batch token counts, verl#5625). On the one-token bandit (T = 1) every mode is Σ_b w_b ℓ_b.

    Args:
        loss_mat: ``(B, T)`` float per-token loss. response_mask: ``(B, T)`` 0/1. weights: ``(B,)``.
        mode: one of :data:`udrra.components.source.AGGREGATIONS`. norm: the optimizer batch's normalisers.
    Returns:
        Scalar tensor.
    Raises:
        InputError: unknown mode (lists the valid ones).
    """
    per_seq = (loss_mat * response_mask).sum(-1)
    if mode == "seq_mean_token_sum":
        return (weights * per_seq).sum()
    if mode == "seq_mean_token_mean":
        return (weights * per_seq / response_mask.sum(-1)).sum()
    if mode == "token_mean":
        return (weights * per_seq).sum() / norm.tokens
    if mode == "seq_mean_token_sum_norm":
        return (weights * per_seq).sum() / norm.max_len
    raise InputError(f"unknown aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")


def _at_last_token(per_seq: Tensor, batch: SampleBatch) -> Tensor:
    """A ``(B,)`` sequence-level quantity placed at each row's last response token of a ``(B, T)`` tensor."""
    out = torch.zeros_like(batch.response_mask, dtype=per_seq.dtype)
    return out.scatter(1, batch.last_token[:, None], per_seq[:, None])


def _checked(name: str, x: Tensor, where: str) -> Tensor:
    """Refuse a non-finite loss term (an overflowing exp) instead of training on a NaN."""
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} is not finite ({where}); log-ratios this large overflow exp(): check the "
                         "policy, old-policy and reference log-probs")
    return x


def estimate(components: Components, batch: SampleBatch) -> SampleBatch:
    """The reward estimate: advantages ``(B, T)`` (and, for ``gae``, returns) of a whole optimizer batch.

    Steps (no gradient flows through any of them):

    1. token rewards: the task reward r at each row's last response token; with ``kl_in_reward``, −β·k1_t on
       every token, k1_t = old_logps − ref_logps (the rollout policy's log-ratio).
    2. ``gae``: GAE(γ, λ) on the token rewards with the critic's rollout values (:func:`reward.gae`), whitened
       if asked. ``whitened_return_to_go`` (REINFORCE++): G_t = Σ_{s≥t} r_s whitened over the batch's response
       tokens (:func:`reward.returns_to_go`, :func:`reward.whiten`). Outcome baselines: R = Σ_t r_t (with ``kl_return = "token"``: R = r), A = baseline(R) per
       sequence, broadcast over its tokens (``kl_return = "token"`` then subtracts β·k1_t of each token).

    Args:
        components: the algorithm's validated components (``explicit`` reward).
        batch: the whole optimizer batch (group baselines need whole groups).
    Returns:
        A copy of ``batch`` with ``advantages`` (and ``returns``) set.
    Raises:
        InputError: ``gae`` without ``old_values``; a ``greedy`` baseline without ``greedy_rewards``.
    """
    t, src, rw, ref = components
    beta = float(t["beta"])
    m = batch.response_mask
    k1 = torch.zeros_like(m)
    if ref.kind == "kl_in_reward":
        k1 = torch.where(m > 0, kl_estimate((batch.old_logps - batch.ref_logps).detach(), "k1"), 0.0)
    token_rewards = _at_last_token(batch.rewards.detach().to(m.dtype), batch) - beta * k1
    if rw["baseline"] == reward_mod.GAE:
        if batch.old_values is None:
            raise InputError("the 'gae' reward estimate needs the critic's values at rollout time "
                             "(SampleBatch.old_values, (B, T)); give the run a critic")
        adv, returns = reward_mod.gae(token_rewards, batch.old_values, m, gamma=float(rw["gamma"]),
                                      lam=float(rw["lam"]))
        if rw["whiten"]:
            adv = reward_mod.whiten(adv, m, batch.weights)
        return replace(batch, advantages=adv, returns=returns)
    if rw["baseline"] == reward_mod.RETURN_TO_GO:   # REINFORCE++: whitened returns-to-go, no critic
        returns = reward_mod.returns_to_go(token_rewards, m)
        return replace(batch, advantages=reward_mod.whiten(returns, m, batch.weights), returns=returns)
    per_token_kl = ref.kind == "kl_in_reward" and ref["kl_return"] == "token"
    R = batch.rewards.detach() if per_token_kl else token_rewards.sum(-1)
    A = advantages(R, baseline=rw["baseline"], group=batch.group, weights=batch.weights,
                   population=batch.population, greedy_rewards=batch.greedy_rewards, eps=float(rw["eps"]),
                   group_size=batch.group_size)
    adv = A[:, None] * m
    if per_token_kl:
        adv = adv - beta * k1
    return replace(batch, advantages=adv)


def sample_loss(components: Components, batch: SampleBatch) -> LossOutput:
    """Loss of a sample-based composition (``explicit`` or ``reward_regression`` reward), per token.

    ``explicit``: per token ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1−ε_low, 1+ε_high) A_t) (dual clip optional; −ρ_t A_t
    without clip), ρ_t = π(y_t|·)/π_old(y_t|·), with the advantages of :func:`estimate`; plus, for ``gae``,
    ``value_coef``·½·max((V − R)², (clip(V) − R)²); plus β·k(d_t) per token (``kl_in_loss``, d_t = log π − log π_ref;
    ``level = "sequence"``: β·k(Σ_t d_t) at the last token). ``reward_regression``: (β·u + β·log Z − r)² with
    u = Σ_t d_t, at the last token. Then :func:`aggregate` with the source's ``aggregation``.

    Args:
        components: the algorithm's validated components.
        batch: a :class:`SampleBatch` (advantages estimated here if not yet).
    Returns:
        :class:`LossOutput`; ``per_row`` is Σ_t of the token loss; metrics ``reward`` (mean task reward),
        ``kl/k1`` and ``kl/k3`` (estimates of KL(π‖π_ref) of whole responses from the batch, exact for on-policy
        population batches), ``advantage/std``, ``clip/fraction`` (share of tokens whose ratio is clipped),
        ``length`` (mean response tokens), ``value_loss`` for ``gae``.
    Raises:
        InputError: a non-finite loss term (overflowing log-ratios), missing critic values for ``gae``.
    """
    t, src, rw, ref = components
    beta = float(t["beta"])
    w, m = batch.weights, batch.response_mask
    d = torch.where(m > 0, batch.logps - batch.ref_logps, torch.zeros_like(batch.logps))  # padding holds anything
    seq_d = batch.sequence(d)
    metrics: Dict[str, float] = {"reward": _wmean(batch.rewards, w),
                                 "kl/k1": _wmean(kl_estimate(seq_d, "k1"), w),
                                 "kl/k3": _wmean(kl_estimate(seq_d, "k3"), w),
                                 "length": _wmean(batch.lengths, w)}
    if rw.kind == "explicit":
        if batch.advantages is None:
            batch = estimate(components, batch)
        adv = batch.advantages
        per_token = surrogate(batch.logps, batch.old_logps, adv, src.get("clip"), src.get("clip_high"),
                              src.get("dual_clip"))
        per_token = _checked("the policy-gradient surrogate", per_token, "ratio π/π_old")
        metrics["advantage/std"] = float(adv[m > 0].std()) if int(m.sum()) > 1 else 0.0
        if src.get("clip") is not None:
            ratio = torch.exp((batch.logps - batch.old_logps).detach())
            lo, hi = 1 - src["clip"], 1 + (src.get("clip_high") or src["clip"])
            metrics["clip/fraction"] = float((((ratio < lo) | (ratio > hi)).to(m.dtype) * m).sum() / m.sum())
        if rw["baseline"] == reward_mod.GAE:
            if batch.values is None:
                raise InputError("the 'gae' reward estimate trains a critic: SampleBatch.values (B, T) must hold "
                                 "the critic's current values (with gradient)")
            old_v = batch.old_values if batch.old_values is not None else batch.values.detach()
            vl = value_loss(batch.values, old_v, batch.returns, rw.get("value_clip"))
            metrics["value_loss"] = float(aggregate(vl.detach(), m, w, src["aggregation"], batch.normalisers()))
            per_token = per_token + float(rw["value_coef"]) * vl
    elif rw.kind == "max_likelihood":   # RAFT: SFT on the kept samples, −Σ_t log π(y_t|·)
        per_token = -batch.logps
    else:  # reward_regression (UDRRA RA), one term per sequence
        if batch.log_partition is None:
            raise InputError("reward_regression needs log_partition (log Z) in the SampleBatch")
        per_token = _at_last_token((beta * seq_d + beta * batch.log_partition - batch.rewards) ** 2, batch)
    if ref.kind == "kl_in_loss" and beta > 0:     # β = 0: no KL term at all (not 0·k, which is NaN where k = inf)
        if ref["level"] == "sequence":
            kl = _at_last_token(kl_estimate(seq_d, ref["estimator"]), batch)
        else:
            kl = kl_estimate(d, ref["estimator"])
        per_token = per_token + beta * _checked(f"the {ref['estimator']} KL term", kl, "log π − log π_ref")
    mode = src.get("aggregation") or "seq_mean_token_sum"
    loss = aggregate(per_token, m, w, mode, batch.normalisers())
    metrics["loss"] = float(loss.detach())
    return LossOutput(loss, batch.sequence(per_token).detach(), metrics)
