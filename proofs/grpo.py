"""Proof 7: GRPO's fixed point (DeepSeekMath arXiv 2402.03300 Eqs. 19–21; Tang & Munos arXiv 2506.09477;
theory.md §4.1 and §5.6 item 3).

GRPO's per-sample loss (Eq. 19, one response, on-policy so ρ = π/π_old = 1 at the evaluation point, where the
clip is inactive) is −ρ·Â + β·k3, Â = (r − r̄)/σ, k3 = π_ref/π − 1 − log(π_ref/π). With G → ∞ the group mean r̄
and std σ are E_π[r] and Std_π[r]; they carry no gradient. Differentiating the expected loss
F(π) = Σ_y π_old(y)·[−(π(y)/π_old(y))·Â(y) + β·k3(π(y))] in π(y) at π_old = π gives −GC(y) with

    GC(y) = Â(y) + β·(π_ref(y)/π(y) − 1)      (DeepSeekMath Eq. 21),

and a point of the simplex is stationary iff GC(y) is the same for every y (Lagrange). K = 3, symbolic π_ref,
r, β, and r̄, σ held fixed (free symbols):

- :func:`grpo_gradient_coefficient_is_eq21` — the coefficient derived by sympy from the loss is Eq. 21's;
- :func:`grpo_fixed_point_stationary` — at the claim π = π_ref/(1 − (r − r̄)/(βσ)), GC(y) − GC(1) = 0 for every
  y (in fact GC ≡ 0);
- :func:`grpo_objective_stationary` — the same claim is a stationary point of E_π[(r − r̄)/σ] − β·KL(π_ref‖π),
  and the GRPO expected loss gradient is minus that objective's gradient plus a constant (so GRPO optimises the
  forward-KL objective, not E_π[r] − β·KL(π‖π_ref));
- :func:`grpo_fixed_point_normalisation` — for the claim, Σπ − 1 = E_π[r − r̄]/(βσ) identically, so the claim is
  a probability vector iff r̄ = E_π[r]: the mean is self-consistent. (The std fixed point σ = Std_π[r] is a
  separate scalar equation in σ, solved numerically by udrra.)
- :func:`grpo_mean_only_stationary` — without the std division (Â = r − r̄), the stationary points of
  E_π[r] − β·KL(π_ref‖π) are π = β·π_ref/(λ − r), λ > max r normalising (the forward-KL / f-DPO family).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import sympy as sp

from ._common import K, boltzmann, positive_symbols, real_symbols
from .kl_estimators import k3, kl_ref_pi


def grpo_fixed_point(pi_ref, r, beta, rbar, sigma) -> List[sp.Expr]:
    """π = π_ref/(1 − (r − r̄)/(β·σ)) (theory.md §4.1, §5.6 item 3)."""
    return [p / (1 - (ri - rbar) / (beta * sigma)) for p, ri in zip(pi_ref, r)]


def boltzmann_in_advantage(pi_ref, r, beta, rbar, sigma) -> List[sp.Expr]:
    """The *paper's* reading π_ref·exp(Â/β)/Z (what a reverse-KL penalty would give) — used as a wrong claim."""
    return boltzmann(pi_ref, [(ri - rbar) / sigma for ri in r], beta)


def _setup():
    return (positive_symbols("pi_ref"), real_symbols("r"), sp.Symbol("beta", positive=True),
            sp.Symbol("rbar", real=True), sp.Symbol("sigma", positive=True))


def gradient_coefficients(pi, pi_ref, r, beta, rbar, sigma, estimator: Callable = k3,
                          advantage: Optional[Callable] = None) -> List[sp.Expr]:
    """GC(y) = −∂F/∂π(y) at π_old = π, F = Σ_y π_old(y)[−(π(y)/π_old(y))Â(y) + β k(π(y))], derived by sympy."""
    q = positive_symbols("q")
    old = positive_symbols("o")
    adv = advantage or (lambda ri: (ri - rbar) / sigma)
    F = sp.Add(*[old[y] * (-(q[y] / old[y]) * adv(r[y]) + beta * estimator(q[y], pi_ref[y])) for y in range(K)])
    at = {**dict(zip(q, pi)), **dict(zip(old, pi))}
    return [-sp.diff(F, q[y]).subs(at) for y in range(K)]


def grpo_gradient_coefficient_is_eq21(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (DeepSeekMath Eq. 21): differentiating GRPO's per-sample loss (Eq. 19, k3 in the loss) gives the
    gradient coefficient GC(y) = Â(y) + β·(π_ref(y)/π(y) − 1) on ∇log π(y).

    ``claim(adv, pi, pi_ref, beta) -> GC``. Returns GC derived by sympy − claim, for a generic π, y = 1..K.
    Since ∂F/∂π(y) = −GC(y) and ∇_θ F = Σ_y π(y)·(∂F/∂π(y))·∇_θ log π(y), GC is the coefficient on ∇log π(y)."""
    pi_ref, r, beta, rbar, sigma = _setup()
    q = positive_symbols("q")
    gc = gradient_coefficients(q, pi_ref, r, beta, rbar, sigma)
    f = claim or (lambda adv, pi, ref, beta: adv + beta * (ref / pi - 1))
    return [sp.simplify(gc[y] - f((r[y] - rbar) / sigma, q[y], pi_ref[y], beta)) for y in range(K)]


def grpo_fixed_point_stationary(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (theory.md §4.1 GRPO row, §5.6 item 3; DeepSeekMath Eq. 21): on-policy with G → ∞, GRPO's
    expected gradient (k3 in the loss, group-normalised advantage) vanishes on the simplex at
    π = π_ref/(1 − (r − r̄)/(β·σ)), r̄ and σ held fixed.

    ``claim(pi_ref, r, beta, rbar, sigma) -> [π(y)]``. Returns [GC(y) − GC(1), y = 2..K] (simplified).
    """
    pi_ref, r, beta, rbar, sigma = _setup()
    pi = (claim or grpo_fixed_point)(pi_ref, r, beta, rbar, sigma)
    gc = gradient_coefficients(pi, pi_ref, r, beta, rbar, sigma)
    return [sp.simplify(gc[y] - gc[0]) for y in range(1, K)]


def grpo_objective_stationary(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: the GRPO fixed point is a stationary point of J(π) = E_π[(r − r̄)/σ] − β·KL(π_ref‖π) (σ, r̄ fixed),
    and GRPO's expected loss gradient is −∇J + β·1 for every π (so they share stationary points on the simplex).

    Returns [∂J/∂π(y) − ∂J/∂π(1) at the claim, y = 2..K] + [∂F/∂π(y) + ∂J/∂π(y) − β at a generic π, y = 1..K].
    """
    pi_ref, r, beta, rbar, sigma = _setup()
    pi = (claim or grpo_fixed_point)(pi_ref, r, beta, rbar, sigma)
    q = positive_symbols("q")
    J = sp.Add(*[q[y] * (r[y] - rbar) / sigma for y in range(K)]) - beta * kl_ref_pi(q, pi_ref)
    dJ = [sp.diff(J, qy) for qy in q]
    at = dict(zip(q, pi))
    res = [sp.simplify(dJ[y].subs(at) - dJ[0].subs(at)) for y in range(1, K)]
    gc_generic = gradient_coefficients(q, pi_ref, r, beta, rbar, sigma)       # = −∂F/∂π at π_old = π = q
    res += [sp.simplify(-gc_generic[y] + dJ[y] - beta) for y in range(K)]
    return res


def grpo_fixed_point_normalisation(claim: Optional[Callable] = None) -> sp.Expr:
    """Claim: for π = claim (default the GRPO fixed point), Σ_y π(y) − 1 = Σ_y π(y)(r(y) − r̄)/(β·σ) when
    Σ π_ref = 1, so Σπ = 1 ⇔ r̄ = E_π[r]. Returns the difference of the two sides (π_ref on the simplex)."""
    _, r, beta, rbar, sigma = _setup()
    free = positive_symbols("pi_ref", K - 1)
    pi_ref = free + [1 - sum(free)]
    pi = (claim or grpo_fixed_point)(pi_ref, r, beta, rbar, sigma)
    lhs = sp.Add(*pi) - 1
    rhs = sp.Add(*[pi[y] * (r[y] - rbar) / (beta * sigma) for y in range(K)])
    return sp.simplify(sp.together(lhs - rhs))


def forward_kl_optimum(pi_ref, r, beta, lam) -> List[sp.Expr]:
    """π = β·π_ref/(λ − r) (f-DPO with f'(u) = −1/u; theory.md §4.1/§4.2)."""
    return [beta * p / (lam - ri) for p, ri in zip(pi_ref, r)]


def grpo_mean_only_stationary(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (theory.md §4.1, §5.4): with a mean-only baseline (Â = r − r̄, no std) and k3 in the loss, GRPO's
    stationary points are π = β·π_ref/(λ − r), λ > max r normalising — the optimum of E_π[r] − β·KL(π_ref‖π).

    ``claim(pi_ref, r, beta, lam) -> [π(y)]``. Returns [GC(y) − GC(1), y = 2..K] with λ a free symbol."""
    pi_ref, r, beta, rbar, sigma = _setup()
    lam = sp.Symbol("lambda", real=True)
    pi = (claim or forward_kl_optimum)(pi_ref, r, beta, lam)
    gc = gradient_coefficients(pi, pi_ref, r, beta, rbar, sigma, advantage=lambda ri: ri - rbar)
    return [sp.simplify(gc[y] - gc[0]) for y in range(1, K)]
