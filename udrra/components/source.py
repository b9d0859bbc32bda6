"""Sample source: where the responses the loss sees come from.

Kinds:

- ``offline_pairs`` — a fixed dataset of (prompt, chosen, rejected) triples drawn from a pair distribution μ
  (DPO, IPO, ...). On the bandit: pairs (y, y') ∼ μ(·|x) labelled y ≻ y' with probability p(y ≻ y')
  (``labels = "sampled"``, optionally flipped with probability ``label_noise``), or ranked by the better
  response (``labels = "deterministic"``, RSO-style ranking by a reward model).
- ``on_policy`` — ``n`` samples per prompt from the current policy (PPO, REINFORCE, ReMax, RLOO, GRPO);
  ``clip`` is PPO's ratio clip for samples reused over ``epochs`` optimiser passes (with DAPO's ``clip_high``
  and the ``dual_clip`` constant), and ``aggregation`` says how the per-token losses of the batch reduce to one
  number (``seq_mean_token_sum``: Σ_t per sequence, mean over sequences; ``seq_mean_token_mean``: GRPO's
  1/|y| per sequence; ``token_mean``: over all tokens of the batch, DAPO; ``seq_mean_token_sum_norm``: Σ_t
  divided by a constant length, Dr. GRPO).
- ``on_policy_pairs`` — two samples from the current policy labelled by a ``labeller`` (online DPO,
  Guo et al. 2402.04792; DPO-Iter, Xu et al. §4.3).
- ``offline_samples`` — scored responses from a fixed distribution d (UDRRA RA/RDA scenarios).
- ``best_of_n`` — rejection sampling (RAFT, Dong et al. 2304.06767): ``n`` samples per prompt from the round's
  sampler π_ref (the policy at the start of the round), the one with the highest reward kept (the first in draw
  order among ties). Exact mode enumerates every multiset of the n draws with its multinomial probability.

On the bandit each source enumerates its population exactly (``exact=True``: every pair or sample with its
probability as weight) or draws a mini-batch. It returns an :class:`IndexBatch` of (prompt, response)
indices; the log-prob op then turns indices into log-probs, as a tokenizer + model do for an LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from . import KindSpec, Param, half_open, positive, positive_int

#: the token-loss aggregations (verl ``agg_loss`` names; see :func:`udrra.loss.aggregate`)
AGGREGATIONS = ("seq_mean_token_sum", "seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def _above_one(v) -> Optional[str]:
    return None if v > 1 else "must be > 1"


KINDS: Dict[str, KindSpec] = {
    "offline_pairs": KindSpec("offline_pairs", "a fixed dataset of (prompt, chosen, rejected)", (
        Param("labels", str, "sampled", "how pair labels arise: Bernoulli(p(y≻y')) or the better response wins",
              choices=("sampled", "deterministic")),
        Param("label_noise", float, 0.0, "probability that a label is flipped in the data", check=half_open),
    )),
    "on_policy": KindSpec("on_policy", "n samples per prompt from the current policy", (
        Param("n", int, 4, "samples per prompt (group size)", check=positive_int),
        Param("clip", float, None, "PPO ratio clip ε (ε_low with clip_high; None = no clipping)", check=positive),
        Param("clip_high", float, None, "upper ratio clip ε_high (DAPO clip-higher; default = clip)",
              check=positive),
        Param("dual_clip", float, None, "dual-clip constant c > 1 bounding the loss of negative advantages",
              check=_above_one),
        Param("epochs", int, 1, "optimiser passes over each sampled batch (PPO epochs)", check=positive_int),
        Param("aggregation", str, "seq_mean_token_sum", "how the (B, T) token losses reduce to a scalar",
              choices=AGGREGATIONS),
    )),
    "on_policy_pairs": KindSpec("on_policy_pairs", "two policy samples per prompt labelled by a labeller", (
        Param("labeller", str, "preference", "who labels the pair: the preference oracle p(y≻y') or a "
              "Bradley–Terry reward model σ(r(y) − r(y'))", choices=("preference", "reward")),
    )),
    "offline_samples": KindSpec("offline_samples", "scored responses from a fixed distribution d", ()),
    "best_of_n": KindSpec("best_of_n", "n samples per prompt from the round's sampler π_ref, the best kept (RAFT)", (
        Param("n", int, 4, "samples per prompt among which the highest-reward one is kept", check=positive_int),
    )),
}

#: sources that yield pairs directly; ``offline_samples`` yields pairs for pair losses (RDA) too.
PAIR_SOURCES = ("offline_pairs", "on_policy_pairs")


@dataclass
class IndexBatch:
    """A batch of bandit rows as indices, before log-probs are attached.

    ``prompt`` ``(B,)`` int64; ``first``/``second`` ``(B,)`` int64 response indices (``second`` is None for
    single samples); ``weights`` ``(B,)`` float summing to 1; ``labels`` ``(B,)`` float P(first ≻ second);
    ``group`` ``(B,)`` int64 group of each row; ``population`` as in :mod:`udrra.batch`.
    """

    prompt: Tensor
    first: Tensor
    second: Optional[Tensor]
    weights: Tensor
    labels: Optional[Tensor]
    group: Tensor
    population: bool


def _all_pairs(P: int, K: int):
    i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    keep = i != j
    i, j = i[keep], j[keep]
    prompt = torch.arange(P).repeat_interleave(i.numel())
    return prompt, i.repeat(P), j.repeat(P)


def pair_labels(source, bandit, prompt: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """P(first ≻ second) as seen in the data of ``source`` (after label noise / deterministic ranking)."""
    p = bandit.preference_matrix()[prompt, first, second]
    if source.kind == "on_policy_pairs" and source["labeller"] == "reward":
        r = bandit.reward_matrix()
        p = torch.sigmoid(r[prompt, first] - r[prompt, second])
    if source.kind == "offline_pairs" and source["labels"] == "deterministic":
        p = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    noise = source.get("label_noise") or 0.0
    return (1.0 - noise) * p + noise * (1.0 - p)


def pair_population(source, bandit, probs: Tensor) -> IndexBatch:
    """Every ordered pair y ≠ y' of every prompt, weighted by its probability (prompts uniform)."""
    P, K = probs.shape
    prompt, i, j = _all_pairs(P, K)
    if source.kind == "on_policy_pairs":
        pd = probs.detach()
        w = pd[prompt, i] * pd[prompt, j]
    elif source.kind == "offline_samples":
        d = bandit.sample_distribution
        w = d[prompt, i] * d[prompt, j]
    else:
        w = bandit.pair_distribution[prompt, i, j]
    w = w / torch.zeros(P, dtype=w.dtype).index_add_(0, prompt, w)[prompt] / P
    keep = w > 0
    prompt, i, j, w = prompt[keep], i[keep], j[keep], w[keep]
    return IndexBatch(prompt, i, j, w, pair_labels(source, bandit, prompt, i, j), prompt, True)


def pair_sample(source, bandit, probs: Tensor, batch_size: int, gen: torch.Generator) -> IndexBatch:
    """``batch_size`` pairs per prompt, labels drawn, rows ordered so that ``first`` is the chosen one."""
    P, K = probs.shape
    prompt = torch.arange(P).repeat_interleave(batch_size)
    if source.kind == "on_policy_pairs":
        pd = probs.detach()[prompt]
        i = torch.multinomial(pd, 1, generator=gen).squeeze(1)
        other = pd.scatter(1, i[:, None], 0.0)  # two distinct responses: identical ones carry no preference
        j = torch.multinomial(other + 1e-300, 1, generator=gen).squeeze(1)
    else:
        if source.kind == "offline_samples":
            d = bandit.sample_distribution
            joint = (d[:, :, None] * d[:, None, :]).reshape(P, K * K)
        else:
            joint = bandit.pair_distribution.reshape(P, K * K)
        flat = torch.multinomial(joint[prompt], 1, replacement=True, generator=gen).squeeze(1)
        i, j = flat // K, flat % K
    if source.kind == "offline_samples":
        labels = torch.ones(prompt.shape[0], dtype=torch.float64)
    else:
        q = pair_labels(source, bandit, prompt, i, j)
        win = torch.rand(q.shape, generator=gen, dtype=torch.float64) < q
        i, j = torch.where(win, i, j), torch.where(win, j, i)
        labels = torch.ones_like(q)
    w = torch.full((prompt.shape[0],), 1.0 / prompt.shape[0], dtype=torch.float64)
    return IndexBatch(prompt, i, j, w, labels, prompt, False)


def sample_population(source, bandit, probs: Tensor) -> IndexBatch:
    """Every (prompt, response), weighted by π(y|x)/P (on-policy) or d(y|x)/P (offline samples)."""
    P, K = probs.shape
    prompt = torch.arange(P).repeat_interleave(K)
    y = torch.arange(K).repeat(P)
    dist = bandit.sample_distribution if source.kind == "offline_samples" else probs.detach()
    w = dist[prompt, y] / P
    return IndexBatch(prompt, y, None, w, None, prompt, True)


def sample_draw(source, bandit, probs: Tensor, batch_size: int, gen: torch.Generator) -> IndexBatch:
    """About ``batch_size`` samples per prompt: max(1, batch_size // n) groups of ``n`` (``n`` = 1 offline)."""
    P, K = probs.shape
    n = source.get("n") or 1
    batch_size = max(1, batch_size // n)
    groups = P * batch_size
    prompt = torch.arange(P).repeat_interleave(batch_size * n)
    dist = bandit.sample_distribution if source.kind == "offline_samples" else probs.detach()
    y = torch.multinomial(dist[prompt], 1, replacement=True, generator=gen).squeeze(1)
    group = torch.arange(groups).repeat_interleave(n)
    w = torch.full((prompt.shape[0],), 1.0 / prompt.shape[0], dtype=torch.float64)
    return IndexBatch(prompt, y, None, w, None, group, False)


def best_of_n_population(source, bandit, sampler: Tensor) -> IndexBatch:
    """Every (prompt, response) with weight P(the response is kept)/P: all multisets c of the n draws from
    ``sampler`` ``(P, K)`` (multinomial probability n!/Π c_j!·Π π_j^{c_j}), the kept one the highest-reward response
    present, a tie split by the draw counts (the first of the tied draws is equally likely to be any of them)."""
    import math
    from .reward import _compositions
    P, K = sampler.shape
    n = int(source["n"])
    C = _compositions(n, K)                                                # (M, K) counts
    r = bandit.reward_matrix()
    logcoef = math.lgamma(n + 1) - torch.lgamma(C + 1.0).sum(-1)           # (M,)
    keep = torch.zeros(P, K, dtype=torch.float64)
    for p in range(P):
        present = C > 0
        best = torch.where(present, r[p].expand_as(C), torch.full_like(C, -float("inf"))).amax(-1, keepdim=True)
        tied = present & (r[p].expand_as(C) == best)
        share = torch.where(tied, C, torch.zeros_like(C))
        share = share / share.sum(-1, keepdim=True)
        logpi = torch.log(sampler[p].double().clamp_min(1e-300))
        prob = torch.exp(logcoef + (C * logpi).sum(-1)).masked_fill(((sampler[p] <= 0)[None, :] & present).any(-1), 0)
        keep[p] = (prob[:, None] * share).sum(0)
    prompt = torch.arange(P).repeat_interleave(K)
    y = torch.arange(K).repeat(P)
    w = keep.flatten() / P
    nz = w > 0
    return IndexBatch(prompt[nz], y[nz], None, w[nz] / w[nz].sum(), None, prompt[nz], True)


def best_of_n_draw(source, bandit, sampler: Tensor, batch_size: int, gen: torch.Generator) -> IndexBatch:
    """``batch_size`` kept samples per prompt, each the best of ``n`` draws from ``sampler`` (first among ties)."""
    P, K = sampler.shape
    n = int(source["n"])
    prompt = torch.arange(P).repeat_interleave(batch_size)
    draws = torch.multinomial(sampler.double()[prompt], n, replacement=True, generator=gen)   # (B, n)
    rewards = bandit.reward_matrix()[prompt[:, None], draws]
    kept = draws.gather(1, rewards.argmax(-1, keepdim=True)).squeeze(1)   # argmax returns the first maximum
    w = torch.full((prompt.shape[0],), 1.0 / prompt.shape[0], dtype=torch.float64)
    return IndexBatch(prompt, kept, None, w, None, prompt, False)
