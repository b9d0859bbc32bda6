"""Proof 1: the KL-regularised optimum (Rafailov et al. DPO Eq. 4; Azar et al. App. A.1; Xu et al. Eq. 5).

    max_π  J(π) = E_π[r] − β·KL(π‖π_ref)   is attained at   π* = π_ref·exp(r/β)/Z,   J(π*) = β·log Z.

Three independent checks, K = 3 with symbolic π_ref, r, β:

- :func:`kl_optimum_stationary` — the Lagrangian gradient ∂J/∂π(y) − λ is the same for every y at the claim
  (first-order condition on the simplex), and the claim sums to 1;
- :func:`kl_objective_gibbs_identity` — for *every* π on the simplex, J(π) = β·log Z − β·KL(π‖π*); with
  Gibbs' inequality KL ≥ 0 (equality iff π = π*) this proves π* is the unique maximiser and the value is β·log Z;
- :func:`kl_objective_strictly_concave` — the Hessian of J in R^K is diag(−β/π(y)), negative definite, so the
  stationary point is the maximum (second-order condition).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import sympy as sp

from ._common import K, boltzmann, expand_logs, log_ratio, on_simplex, positive_symbols, real_symbols

Claim = Callable[[list, list, sp.Expr], List[sp.Expr]]


def _setup():
    pi_ref = positive_symbols("pi_ref")
    r = real_symbols("r")
    beta = sp.Symbol("beta", positive=True)
    return pi_ref, r, beta


def objective(q, pi_ref, r, beta) -> sp.Expr:
    """J(q) = Σ q·r − β Σ q·log(q/π_ref)."""
    return sp.Add(*[qi * ri - beta * qi * sp.log(qi / p) for qi, ri, p in zip(q, r, pi_ref)])


def kl_optimum_stationary(claim: Optional[Claim] = None) -> List[sp.Expr]:
    """Claim (DPO Eq. 4): the maximiser of E_π[r] − β·KL(π‖π_ref) is π_ref·exp(r/β)/Z.

    Returns the residuals [g(y) − g(1) for y = 2..K] + [Σ π − 1], g(y) = ∂J/∂π(y) at the claim: all 0 iff the
    claim satisfies the Lagrange conditions of max J subject to Σ π = 1.
    """
    claim = claim or boltzmann
    pi_ref, r, beta = _setup()
    pi = claim(pi_ref, r, beta)
    q = positive_symbols("q")
    J = objective(q, pi_ref, r, beta)
    at = dict(zip(q, pi))
    g = [expand_logs(sp.diff(J, qi).subs(at)) for qi in q]
    res = [sp.simplify(g[i] - g[0]) for i in range(1, K)]
    res.append(sp.simplify(sp.Add(*pi) - 1))
    return res


def kl_optimal_value(value: Optional[Callable] = None) -> sp.Expr:
    """Claim (DPO Eq. 4 / Azar App. A.1): J(π*) = β·log Z, Z = Σ π_ref·exp(r/β). Returns J(π*) − claimed value."""
    pi_ref, r, beta = _setup()
    pi = boltzmann(pi_ref, r, beta)
    Z = sp.Add(*[p * sp.exp(ri / beta) for p, ri in zip(pi_ref, r)])
    claimed = (value or (lambda Z, beta: beta * sp.log(Z)))(Z, beta)
    J = sp.Add(*[pi[i] * (r[i] - beta * log_ratio(pi[i], pi_ref[i])) for i in range(K)])
    return sp.simplify(J - claimed)


def kl_objective_gibbs_identity(claim: Optional[Claim] = None) -> sp.Expr:
    """Claim: for every π on the simplex, J(π) = β·log Z − β·KL(π‖π*) with π* = π_ref·exp(r/β)/Z.

    Returns J(π) + β·KL(π‖π*) − β·log Z for a generic π (symbolic, K = 3): identically 0 iff the claim is right.
    Since KL(π‖π*) ≥ 0 with equality iff π = π* (Gibbs), π* is the unique maximiser and J(π*) = β·log Z.
    """
    claim = claim or boltzmann
    pi_ref, r, beta = _setup()
    pi_star = claim(pi_ref, r, beta)
    Z = sp.Add(*[p * sp.exp(ri / beta) for p, ri in zip(pi_ref, r)])
    q = on_simplex("q")
    kl = sp.Add(*[qi * (log_ratio(qi, pi_ref[i]) - log_ratio(pi_star[i], pi_ref[i])) for i, qi in enumerate(q)])
    J = sp.Add(*[qi * (r[i] - beta * log_ratio(qi, pi_ref[i])) for i, qi in enumerate(q)])
    return sp.simplify(sp.expand(J + beta * kl - beta * sp.log(Z)))


def kl_objective_strictly_concave(kl_weight: Optional[Callable] = None) -> bool:
    """Claim: J(π) = E_π[r] − β·KL(π‖π_ref) is strictly concave (Hessian diag(−β/π(y)) negative definite).

    ``kl_weight(beta)`` is the coefficient of KL in J (default −β). Returns True iff the Hessian of J in R^K is
    diagonal with every diagonal entry provably negative for all positive π, β.
    """
    pi_ref, r, beta = _setup()
    w = (kl_weight or (lambda b: -b))(beta)
    q = positive_symbols("q")
    J = sp.Add(*[qi * ri + w * qi * sp.log(qi / p) for qi, ri, p in zip(q, r, pi_ref)])
    H = sp.hessian(J, q)
    off_diag_zero = all(sp.simplify(H[i, j]) == 0 for i in range(K) for j in range(K) if i != j)
    return bool(off_diag_zero and all(sp.simplify(H[i, i]).is_negative for i in range(K)))
