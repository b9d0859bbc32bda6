"""The contextual-bandit testbed: P prompts × K responses, a tabular softmax policy.

A bandit is the smallest world in which every composition has a computable target: π_ref, a reward r and/or a
preference matrix p(y ≻ y'), the pair distribution μ that offline pairs are drawn from and the distribution d
that offline samples are drawn from. Training on it goes through exactly the loss code an LM uses: the sample
source yields (prompt, response) indices, one log-prob op turns them into per-sequence log-probs, and the
derived loss consumes a :class:`~udrra.batch.PairBatch` or :class:`~udrra.batch.SampleBatch`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .batch import PairBatch, SampleBatch
from .components import source as source_mod
from .errors import InputError, TargetError

__all__ = ["Bandit", "response_logps", "draw_indices", "draw_rows", "make_batch", "bandit_batch", "LOG_ZERO"]

#: log π_ref used for responses outside the reference's support: log(1e-30) ≈ −69.1 nats, so log-ratios stay
#: finite while exp(LOG_ZERO) is negligible next to any supported response.
LOG_ZERO = -69.07755278982137


def _as64(name: str, x, ndim: int) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if t.dim() != ndim:
        raise InputError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError(f"{name} contains NaN or inf")
    return t


class Bandit:
    """A contextual bandit with P prompts and K responses per prompt.

    Args:
        pi_ref: ``(P, K)`` reference policy, rows summing to 1, entries ≥ 0. Zero entries are allowed (a
            response the reference never produces, as in Xu et al. 2404.10719 Table 1); in log space they are
            floored at :data:`LOG_ZERO` so that k1 = log π/π_ref stays finite (a penalty of ≈ 69 nats).
        reward: ``(P, K)`` reward r(x, y) (units of the reward model), or ``None``.
        preference: ``(P, K, K)`` with ``preference[x, y, y'] = P(y ≻ y' | x)``; must satisfy
            p[y, y'] + p[y', y] = 1 off the diagonal. Default: Bradley–Terry σ(r(y) − r(y')) from ``reward``.
        pair_distribution: ``(P, K, K)`` μ over ordered pairs (y, y') per prompt (normalised per prompt; the
            diagonal is ignored). Default: uniform over y ≠ y'.
        sample_distribution: ``(P, K)`` d for ``offline_samples`` sources. Default: uniform.
    Raises:
        InputError: shapes that disagree, non-finite values, rows not summing to 1, negative reference mass
            or a prompt with fewer than one response in the reference's support,
            a preference matrix that is not a probability (0 ≤ p ≤ 1, p + pᵀ = 1), or neither reward nor
            preference given.
    """

    def __init__(self, pi_ref, reward=None, preference=None, pair_distribution=None, sample_distribution=None):
        ref = _as64("pi_ref", pi_ref, 2)
        P, K = ref.shape
        if K < 2:
            raise InputError(f"a bandit needs K >= 2 responses per prompt, got K={K}")
        if (ref < 0).any():
            raise InputError("pi_ref must be non-negative")
        if ((ref > 0).sum(-1) < 1).any():
            raise InputError("pi_ref must give some response positive probability in every prompt")
        if not torch.allclose(ref.sum(-1), torch.ones(P, dtype=torch.float64), atol=1e-6):
            raise InputError(f"pi_ref rows must sum to 1, got sums {ref.sum(-1).tolist()}")
        self.pi_ref = ref / ref.sum(-1, keepdim=True)
        self.reward = None if reward is None else _as64("reward", reward, 2)
        if self.reward is not None and self.reward.shape != (P, K):
            raise InputError(f"reward must have shape (P, K)={(P, K)}, got {tuple(self.reward.shape)}")
        if preference is None and self.reward is None:
            raise InputError("a bandit needs a reward (P, K) or a preference matrix (P, K, K)")
        if preference is None:
            r = self.reward
            preference = torch.sigmoid(r[:, :, None] - r[:, None, :])
        pref = _as64("preference", preference, 3)
        if pref.shape != (P, K, K):
            raise InputError(f"preference must have shape (P, K, K)={(P, K, K)}, got {tuple(pref.shape)}")
        off = ~torch.eye(K, dtype=torch.bool).expand(P, K, K)
        if ((pref < 0) | (pref > 1)).any() or not torch.allclose((pref + pref.transpose(1, 2))[off],
                                                                   torch.ones(1, dtype=torch.float64), atol=1e-9):
            raise InputError("preference must hold probabilities with p[y, y'] + p[y', y] = 1 for y != y'")
        self.preference = pref
        if pair_distribution is None:
            pair_distribution = off.double()
        mu = _as64("pair_distribution", pair_distribution, 3)
        if mu.shape != (P, K, K) or (mu < 0).any():
            raise InputError(f"pair_distribution must be non-negative with shape (P, K, K)={(P, K, K)}")
        mu = mu * off
        if (mu.sum((1, 2)) <= 0).any():
            raise InputError("pair_distribution puts no mass on any pair y != y' for some prompt")
        self.pair_distribution = mu / mu.sum((1, 2), keepdim=True)
        if sample_distribution is None:
            sample_distribution = torch.full((P, K), 1.0 / K, dtype=torch.float64)
        d = _as64("sample_distribution", sample_distribution, 2)
        if d.shape != (P, K) or (d < 0).any():
            raise InputError(f"sample_distribution must be non-negative with shape (P, K)={(P, K)}")
        self.sample_distribution = d / d.sum(-1, keepdim=True)

    @property
    def log_pi_ref(self) -> Tensor:
        """``(P, K)`` log π_ref, with zero-probability responses floored at :data:`LOG_ZERO` (finite)."""
        return torch.log(self.pi_ref).clamp_min(LOG_ZERO)

    @property
    def full_support(self) -> bool:
        """True when π_ref gives every response positive probability."""
        return bool((self.pi_ref > 0).all())

    def with_reward(self, reward) -> "Bandit":
        """The same bandit (π_ref, preferences, μ, d) with another scalar reward, e.g. a fitted reward model."""
        return Bandit(self.pi_ref, reward, self.preference, self.pair_distribution, self.sample_distribution)

    @property
    def shape(self):
        return tuple(self.pi_ref.shape)

    def reward_matrix(self) -> Tensor:
        """``(P, K)`` rewards. Raises :class:`TargetError` if the bandit has only preferences."""
        if self.reward is None:
            raise TargetError("this composition needs a scalar reward r(x, y), but the bandit only has a preference "
                              "matrix; pass reward=...")
        return self.reward

    def preference_matrix(self) -> Tensor:
        """``(P, K, K)`` preference probabilities P(y ≻ y')."""
        return self.preference

    def log_partition(self, beta: float) -> Tensor:
        """``(P,)`` log Z(x) = log Σ_y π_ref(y|x)·exp(r(x,y)/β)."""
        return torch.logsumexp(torch.log(self.pi_ref) + self.reward_matrix() / beta, dim=-1)

    def with_reference(self, pi_ref: Tensor) -> "Bandit":
        """The same bandit with another reference policy (used for reference resets)."""
        return Bandit(pi_ref.detach(), self.reward, self.preference, self.pair_distribution, self.sample_distribution)

    def subset(self, prompts: Sequence[int]) -> "Bandit":
        """The bandit restricted to some prompts."""
        idx = list(prompts)
        return Bandit(self.pi_ref[idx], None if self.reward is None else self.reward[idx], self.preference[idx],
                      self.pair_distribution[idx], self.sample_distribution[idx])

    @classmethod
    def random(cls, P: int = 3, K: int = 5, seed: int = 0, *, reward_scale: float = 1.0,
               ref_concentration: float = 2.0) -> "Bandit":
        """A random bandit: π_ref ∼ Dirichlet(ref_concentration) (floored at 0.02 and renormalised),
        r ∼ N(0, reward_scale²), Bradley–Terry preferences, uniform μ and d."""
        g = torch.Generator().manual_seed(seed)
        conc = torch.full((P, K), float(ref_concentration), dtype=torch.float64)
        gam = torch._standard_gamma(conc, generator=g)
        ref = gam / gam.sum(-1, keepdim=True)
        ref = (ref + 0.02) / (ref + 0.02).sum(-1, keepdim=True)
        r = torch.randn(P, K, generator=g, dtype=torch.float64) * reward_scale
        return cls(ref, r)

    def __repr__(self) -> str:
        P, K = self.shape
        return f"Bandit(P={P}, K={K}, reward={'yes' if self.reward is not None else 'no'})"


def response_logps(logits: Tensor, prompt: Tensor, response: Tensor) -> Tensor:
    """The bandit's log-prob op: log π(y|x) = log_softmax(logits[x])[y].

    Args:
        logits: ``(P, K)`` float policy logits. prompt, response: ``(B,)`` int64.
    Returns:
        ``(B,)`` float, differentiable in ``logits``.
    """
    return torch.log_softmax(logits, dim=-1)[prompt, response]


def draw_indices(algorithm, bandit: Bandit, logits: Tensor, *, exact: bool, batch_size: int = 64,
                 generator: Optional[torch.Generator] = None, ref_logits: Optional[Tensor] = None
                 ) -> source_mod.IndexBatch:
    """The sample source's step: which (prompt, response[s]) rows the next batch holds.

    Args:
        algorithm: a loaded :class:`udrra.Algorithm`. logits: ``(P, K)`` current policy logits.
        ref_logits: ``(P, K)`` current reference logits (the sampler of a ``best_of_n`` source).
        exact: enumerate the population (weights = probabilities) instead of sampling.
        batch_size: pairs, or groups of ``n`` samples, per prompt when sampling.
    """
    return draw_rows(algorithm, bandit, torch.softmax(logits.detach(), -1), exact=exact, batch_size=batch_size,
                     generator=generator, ref_probs=None if ref_logits is None else torch.softmax(ref_logits, -1))


def draw_rows(algorithm, bandit: Bandit, probs: Tensor, *, exact: bool, batch_size: int = 64,
              generator: Optional[torch.Generator] = None, ref_probs: Optional[Tensor] = None
              ) -> source_mod.IndexBatch:
    """:func:`draw_indices` from the policy's ``(P, K)`` probabilities (the sequence testbed passes π(y|x) over
    whole responses, with its bandit view as ``bandit``). ``ref_probs``: the current reference's ``(P, K)``
    probabilities, the sampler of a ``best_of_n`` source (default: the bandit's π_ref)."""
    src = algorithm.components.source
    if src.kind == "best_of_n":
        sampler = bandit.pi_ref if ref_probs is None else ref_probs.detach().double()
        return (source_mod.best_of_n_population(src, bandit, sampler) if exact
                else source_mod.best_of_n_draw(src, bandit, sampler, batch_size, generator))
    if algorithm.pair_based:
        return (source_mod.pair_population(src, bandit, probs) if exact
                else source_mod.pair_sample(src, bandit, probs, batch_size, generator))
    return (source_mod.sample_population(src, bandit, probs) if exact
            else source_mod.sample_draw(src, bandit, probs, batch_size, generator))


def make_batch(algorithm, bandit: Bandit, ib: source_mod.IndexBatch, logits: Tensor, ref_logits: Tensor,
               old_logits: Optional[Tensor] = None):
    """Attach log-probs (the one log-prob op) and rewards to an index batch: a PairBatch or SampleBatch.

    Args:
        logits, ref_logits: ``(P, K)`` policy logits (with grad) and reference logits.
        old_logits: logits of the policy that drew the samples (PPO epochs); default ``logits`` detached.
    """
    if algorithm.pair_based:
        ones = torch.ones_like(ib.weights)
        kw = {}
        if algorithm.components.reward.kind == "reward_difference":
            r = bandit.reward_matrix()
            kw = dict(chosen_rewards=r[ib.prompt, ib.first], rejected_rewards=r[ib.prompt, ib.second])
        return PairBatch(
            chosen_logps=response_logps(logits, ib.prompt, ib.first),
            rejected_logps=response_logps(logits, ib.prompt, ib.second),
            ref_chosen_logps=response_logps(ref_logits, ib.prompt, ib.first).detach(),
            ref_rejected_logps=response_logps(ref_logits, ib.prompt, ib.second).detach(),
            weights=ib.weights, labels=ib.labels, chosen_lengths=ones, rejected_lengths=ones,
            group=ib.group, population=ib.population, **kw)
    logps = response_logps(logits, ib.prompt, ib.first)
    old = logps.detach() if old_logits is None else response_logps(old_logits, ib.prompt, ib.first).detach()
    r = bandit.reward_matrix()
    probs = torch.softmax((logits if old_logits is None else old_logits).detach(), -1)
    greedy = r.gather(1, probs.argmax(-1, keepdim=True)).squeeze(1)[ib.prompt]
    log_z = None
    if algorithm.components.reward.kind == "reward_regression":
        log_z = bandit.log_partition(algorithm.beta)[ib.prompt]
    return SampleBatch(
        logps=logps, old_logps=old, ref_logps=response_logps(ref_logits, ib.prompt, ib.first).detach(),
        rewards=r[ib.prompt, ib.first], group=ib.group, weights=ib.weights,
        greedy_rewards=greedy, log_partition=log_z, population=ib.population,
        group_size=algorithm.components.source.get("n") if ib.population else None)


def bandit_batch(algorithm, bandit: Bandit, logits: Tensor, ref_logits: Tensor, *, exact: bool,
                 batch_size: int = 64, generator: Optional[torch.Generator] = None):
    """One batch for ``algorithm`` on ``bandit``: source → indices → log-probs → Pair/SampleBatch."""
    ib = draw_indices(algorithm, bandit, logits, exact=exact, batch_size=batch_size, generator=generator,
                      ref_logits=ref_logits.detach())
    return make_batch(algorithm, bandit, ib, logits, ref_logits)


class BanditProducer:
    """The bandit's sample source for :func:`udrra.loop.fit` (see :mod:`udrra.loop`).

    ``collect`` draws the step's (prompt, response) indices from the algorithm's ``[source]`` (the exact
    population, or a sampled mini-batch) under the current policy and builds the batch without gradient
    (old-policy log-probs, reference log-probs, rewards, greedy rewards, the critic's rollout values);
    ``attach`` rebuilds the same rows with the current policy's log-probs (and critic values) with gradient.

    Args:
        algorithm: a loaded :class:`udrra.Algorithm`. bandit: the :class:`Bandit`.
        policy, reference: modules whose ``forward()`` gives ``(P, K)`` logits (reference: log π_ref).
        critic: a :class:`~udrra.policy.TableCritic` over the P prompts, for ``gae`` (else ``None``).
        exact: enumerate the population instead of sampling. batch_size: pairs or samples per prompt.
        generator: the sampling RNG.
    """

    def __init__(self, algorithm, bandit: Bandit, policy, reference, critic=None, *, exact: bool,
                 batch_size: int = 64, generator: Optional[torch.Generator] = None):
        self.algorithm, self.bandit, self.policy, self.reference, self.critic = algorithm, bandit, policy, \
            reference, critic
        self.exact, self.batch_size, self.generator = exact, batch_size, generator
        self._rows: Optional[source_mod.IndexBatch] = None
        self._old: Optional[Tensor] = None

    @torch.no_grad()
    def collect(self):
        logits, ref_logits = self.policy().detach(), self.reference().detach()
        self._rows = draw_indices(self.algorithm, self.bandit, logits, exact=self.exact,
                                  batch_size=self.batch_size, generator=self.generator, ref_logits=ref_logits)
        self._old = logits
        batch = make_batch(self.algorithm, self.bandit, self._rows, logits, ref_logits)
        if self.critic is not None:
            batch.old_values = self.critic().detach()[self._rows.prompt][:, None]
        return batch

    def attach(self, batch):
        logits = self.policy()
        fresh = make_batch(self.algorithm, self.bandit, self._rows, logits, self.reference().detach(),
                           old_logits=self._old)
        if isinstance(fresh, PairBatch):
            return fresh
        values = None if self.critic is None else self.critic()[self._rows.prompt][:, None]
        return batch.with_logps(fresh.logps, values)
