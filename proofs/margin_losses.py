"""Proofs 10–11: the two catalog targets that are not a Boltzmann distribution of π_ref.

- :func:`hinge_zero_loss_set` — SLiC-HF / RSO hinge on the DPO logit (Liu et al. RSO arXiv 2309.06657 Eq. 9;
  TRL ``hinge``): max(0, 1 − β·h) = 0 exactly on h ≥ 1/β, so with deterministic labels every policy whose margin
  on each covered pair is at least 1/β is optimal — no unique target (theory.md §4.2 SLiC row).
- :func:`simpo_two_arm_optimum` — SimPO (Meng et al. arXiv 2405.14734 Eq. 6), reference-free, single-token
  responses, two arms seen with label frequency p, margin γ: with u = β·(log π(y1) − log π(y2)) the population
  loss p·ℓ(u − γ) + (1 − p)·ℓ(−u − γ) is stationary iff z = e^u solves
  (1 − p)e^{−γ}z² + (1 − 2p)z − p·e^{−γ} = 0 (theory.md §4.2 SimPO row, §5.6 item 4). At γ = 0 the root is
  z = p/(1 − p), i.e. DPO with a uniform reference (π ∝ e^{r/β} under Bradley–Terry labels).
"""

from __future__ import annotations

from typing import Callable, Optional

import sympy as sp

from ._common import logsig_loss


def hinge_zero_loss_set(claim: Optional[Callable] = None) -> bool:
    """Claim (RSO Eq. 9 / TRL hinge): {h : max(0, 1 − β·h) = 0} = [1/β, ∞).

    ``claim(beta) -> sympy Set``. Returns True iff the set solved by sympy equals the claim."""
    beta = sp.Symbol("beta", positive=True)
    h = sp.Symbol("h", real=True)
    # max(0, z) = 0 ⇔ z ≤ 0
    solved = sp.solve_univariate_inequality(1 - beta * h <= 0, h, relational=False)
    claimed = (claim or (lambda b: sp.Interval(1 / b, sp.oo)))(beta)
    return bool(sp.simplify(sp.Complement(solved, claimed)) == sp.S.EmptySet
                and sp.simplify(sp.Complement(claimed, solved)) == sp.S.EmptySet)


def simpo_quadratic(z, p, g):
    """(1 − p)e^{−γ}z² + (1 − 2p)z − p·e^{−γ}, with g = e^{γ}."""
    return (1 - p) / g * z ** 2 + (1 - 2 * p) * z - p / g


def simpo_two_arm_optimum(claim: Optional[Callable] = None) -> sp.Expr:
    """Claim (theory.md §4.2 SimPO row, [D✓]): the stationarity condition of the two-arm SimPO population loss
    is the quadratic (1 − p)e^{−γ}z² + (1 − 2p)z − p·e^{−γ} = 0 in z = e^u.

    ``claim(z, p, g) -> polynomial`` (g = e^γ). Returns ∂/∂z of (numerator of dL/du)/claim — 0 iff the
    numerator is a z-independent multiple of the claimed quadratic, i.e. they have the same positive roots."""
    p, g, z = sp.symbols("p g z", positive=True)
    u = sp.Symbol("u", real=True)
    gamma = sp.log(g)
    L = p * logsig_loss(u - gamma) + (1 - p) * logsig_loss(-u - gamma)
    dL = sp.diff(L, u).subs(u, sp.log(z))
    num, _ = sp.fraction(sp.together(sp.expand(sp.powsimp(sp.expand(dL, power_exp=True)))))
    Q = (claim or simpo_quadratic)(z, p, g)
    ratio = sp.cancel(num / Q)
    return sp.simplify(sp.diff(ratio, z))
