"""Proof 14: RAFT / best-of-n fine-tuning (Dong et al., "RAFT: Reward rAnked FineTuning for Generative Foundation
Model Alignment", arXiv:2304.06767, Alg. 1; the best-of-n distribution as in Beirami et al., "Theoretical
guarantees on the best-of-n alignment policy", arXiv:2401.01879, §2 "Derivation of the best-of-n policy", and Gui
et al., "BoNBoN Alignment", arXiv:2406.00832, §2, whose continuous-reward density n·F(r(y))^{n−1}·π_0(y) is the
limit of the discrete form below).

One round of RAFT on a prompt: draw n i.i.d. responses from a sampler π_0, keep the one with the highest reward,
and fit the policy by maximum likelihood on the kept responses. With rewards ordered r(1) < r(2) < … < r(K) and
F(y) = Σ_{y' ≤ y} π_0(y') the CDF of the reward under π_0, the kept response is ≤ y iff all n draws are ≤ y, so

    p_n(y) = P(kept = y) = F(y)^n − F(y − 1)^n                           (Beirami et al. §2)

— only the order of the rewards matters. With ties the kept sample is the first best one in draw order (RAFT's
``argmax`` over the n samples in sampling order), so the tied responses share the top level's mass in proportion
to π_0: a tied y gets (F^n − F_-^n)·π_0(y)/Σ_{tied} π_0 (F the CDF up to and including the level of y, F_- the
CDF strictly below it). K = 3 and π_0 a generic point of the simplex (two free symbols).

- :func:`best_of_n_distribution` — enumerate all K^n ordered n-tuples with their probabilities (n = 2, 3, 4 in
  the tests): P(kept = y) − claim, expanded, per y.
- :func:`best_of_n_ties` — rewards r1 < r2 = r3, the first best draw kept: the same enumeration against the
  tied claim (splitting the top mass evenly, or breaking ties by response index, is rejected).
- :func:`mle_target_is_best_of_n` — the cross-entropy Σ_y p(y)·(−log π(y)) (maximum likelihood on samples of p)
  is stationary on the simplex exactly at π = p (Lagrange; it is strictly convex in π, and Gibbs' inequality
  makes p the unique minimiser), so one RAFT round trained to convergence reaches p_n.
- :func:`iterated_best_of_n_raises_top` — for the top-reward response, writing π = π_0(top),
  p_n(top) − π = 1 − (1 − π)^n − π = π·(1 − π)·Q(π) with Q(π) = Σ_{k=0}^{n−2} (1 − π)^k ≥ 1 on [0, 1]: the mass
  of argmax r strictly grows for π ∈ (0, 1) and is fixed only at π ∈ {0, 1}. Iterating rounds (sampler ← the
  trained policy, i.e. π ← 1 − (1 − π)^n) gives an increasing bounded sequence whose limit is a fixed point in
  (0, 1], hence 1: the iteration concentrates on argmax r (from any π_0(top) > 0).
"""

from __future__ import annotations

import itertools
from typing import Callable, List, Optional, Sequence

import sympy as sp

from ._common import K, on_simplex, positive_symbols


def best_of_n(pi0: Sequence[sp.Expr], n: int) -> List[sp.Expr]:
    """p_n(y) = F(y)^n − F(y − 1)^n, rewards increasing in the index (Beirami et al. §2)."""
    F = [sp.Add(*pi0[: y + 1]) for y in range(len(pi0))]
    return [F[y] ** n - (F[y - 1] ** n if y else 0) for y in range(len(pi0))]


def best_of_n_with_ties(pi0: Sequence[sp.Expr], n: int, level: Sequence[int]) -> List[sp.Expr]:
    """(F^n − F_-^n)·π_0(y)/Σ_{level(y') = level(y)} π_0(y'): ties share their level's mass in proportion to π_0."""
    out = []
    for y in range(len(pi0)):
        same = sp.Add(*[pi0[j] for j in range(len(pi0)) if level[j] == level[y]])
        F = sp.Add(*[pi0[j] for j in range(len(pi0)) if level[j] <= level[y]])
        F_minus = sp.Add(*[pi0[j] for j in range(len(pi0)) if level[j] < level[y]])
        out.append((F ** n - F_minus ** n) * pi0[y] / same)
    return out


def enumerate_kept(pi0: Sequence[sp.Expr], n: int, level: Sequence[int]) -> List[sp.Expr]:
    """P(kept = y) by enumerating the K^n ordered draws: the kept draw is the first one (in draw order) whose
    reward level is the maximum of the tuple."""
    k = len(pi0)
    kept = [sp.Integer(0)] * k
    for draws in itertools.product(range(k), repeat=n):
        top = max(level[d] for d in draws)
        y = next(d for d in draws if level[d] == top)
        kept[y] += sp.Mul(*[pi0[d] for d in draws])
    return kept


def best_of_n_distribution(n: int = 2, claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (Beirami et al. §2; BoNBoN §2): with distinct rewards r1 < r2 < r3, the best of n i.i.d.
    draws from π_0 is y with probability F(y)^n − F(y − 1)^n.

    ``claim(pi0, n) -> [p_n(y)]`` (default :func:`best_of_n`). Returns [enumerated − claim, y = 1..K], expanded
    (polynomials in the two free simplex coordinates of π_0)."""
    pi0 = on_simplex("pi0")
    kept = enumerate_kept(pi0, n, list(range(K)))
    p = (claim or best_of_n)(pi0, n)
    return [sp.expand(sp.cancel(kept[y] - p[y])) for y in range(K)]


def best_of_n_ties(n: int = 2, claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: with r1 < r2 = r3 and the first best draw kept, y1 is kept with probability π_0(y1)^n and a tied y
    with (1 − π_0(y1)^n)·π_0(y)/(π_0(y2) + π_0(y3)).

    ``claim(pi0, n, level) -> [p(y)]`` with ``level = (0, 1, 1)`` the reward ranks (default
    :func:`best_of_n_with_ties`). Returns [enumerated − claim, y = 1..K] (cancelled rational functions)."""
    pi0 = on_simplex("pi0")
    level = (0, 1, 1)
    kept = enumerate_kept(pi0, n, level)
    p = (claim or best_of_n_with_ties)(pi0, n, level)
    return [sp.factor(sp.cancel(kept[y] - p[y])) for y in range(K)]


def mle_target_is_best_of_n(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: maximum likelihood on samples of p — min_π Σ_y p(y)·(−log π(y)) on the simplex — is attained at
    π = p (so a RAFT round trained to convergence on best-of-n samples returns p_n).

    ``claim(p) -> [π(y)]`` (p a generic point of the simplex). Returns [g(y) − g(1), y = 2..K] + [Σπ − 1],
    g(y) = ∂/∂π(y) of the cross-entropy at the claim (Lagrange), then the off-diagonal Hessian entries and
    H_yy·π(y)² − p(y) (the Hessian is diag(p/π²), positive definite: strictly convex, so the stationary point is
    the unique minimiser)."""
    p = on_simplex("p")
    pi = (claim or (lambda p: list(p)))(p)
    q = positive_symbols("q")
    H = sp.Add(*[-p[y] * sp.log(q[y]) for y in range(K)])
    at = dict(zip(q, pi))
    g = [sp.diff(H, q[y]).subs(at) for y in range(K)]
    res = [sp.cancel(g[y] - g[0]) for y in range(1, K)] + [sp.cancel(sp.Add(*pi) - 1)]
    hess = sp.hessian(H, q)       # diag(p(y)/q(y)²): positive definite on the open simplex (strictly convex)
    res += [hess[i, j] for i in range(K) for j in range(K) if i != j]
    res += [sp.cancel(hess[i, i] * q[i] ** 2 - p[i]) for i in range(K)]
    return res


def top_gain_factor(pi: sp.Expr, n: int) -> sp.Expr:
    """Q(π) = Σ_{k=0}^{n−2} (1 − π)^k, so that 1 − (1 − π)^n − π = π·(1 − π)·Q(π)."""
    return sp.Add(*[(1 - pi) ** k for k in range(n - 1)])


def iterated_best_of_n_raises_top(n: int = 2, claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: for the top-reward response, p_n(top) − π_0(top) = π·(1 − π)·Q(π) with Q(π) > 0 on [0, 1]
    (π = π_0(top)), so best-of-n strictly raises the mass of argmax r unless π ∈ {0, 1}.

    ``claim(pi, n) -> Q`` (default :func:`top_gain_factor`). p_n(top) is taken from the enumeration of
    :func:`best_of_n_distribution` (π_0 = ((1 − π)/2, (1 − π)/2, π)), not from the formula. Returns
    [p_n(top) − π − π(1 − π)·Q, expanded; 0 if Q has no root in [0, 1] and Q(½) > 0, else 1]."""
    pi = sp.Symbol("pi", positive=True)
    kept = enumerate_kept([(1 - pi) / 2, (1 - pi) / 2, pi], n, list(range(K)))
    Q = (claim or top_gain_factor)(pi, n)
    residual = sp.expand(kept[K - 1] - pi - pi * (1 - pi) * Q)
    poly = sp.Poly(sp.expand(Q), pi)
    positive = (poly.count_roots(0, 1) == 0 if poly.degree() > 0 else True) and Q.subs(pi, sp.Rational(1, 2)) > 0
    return [residual, sp.Integer(0 if positive else 1)]
