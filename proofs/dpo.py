"""Proof 2: the DPO population loss is stationary (and minimal) at π_ref·exp(r/β)/Z.

Rafailov et al. DPO Eq. 7 with Bradley–Terry labels p(y≻y') = σ(r(y) − r(y')) on pairs drawn from a
full-support pair distribution μ (Azar et al. Prop. 1; theory.md §5.1). For an ordered pair (y, y') drawn with
probability μ(y, y') the label says y ≻ y' with probability p(y≻y'), so the population loss is

    L(u) = Σ_{y≠y'} μ(y, y')·[p(y≻y')·ℓ(β·h(y, y')) + (1 − p(y≻y'))·ℓ(−β·h(y, y'))],   ℓ = −log σ,

a function of the log-ratios u(y) = log π(y)/π_ref(y) only (h(y, y') = u(y) − u(y')). K = 3 with symbolic
π_ref, r, β and all six ordered-pair weights μ(y, y') > 0 (no product form assumed).

- :func:`dpo_stationary_at_boltzmann` — ∂L/∂u(y) = 0 for every y at u = log(π*/π_ref), i.e. at
  β·h = r(y) − r(y');
- :func:`dpo_pair_margin` — each pair's expected loss is strictly convex in x = β·h and its unique minimiser
  (sympy ``solve``) is x* = logit p(y≻y') = r(y) − r(y'); so the claim minimises every term and hence L.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import sympy as sp

from ._common import (K, boltzmann, canon, exp_of_rewards, log_ratio, logsig_loss, positive_symbols, real_symbols,
                      sigmoid)

Claim = Callable[[list, list, sp.Expr], List[sp.Expr]]


def pair_expected_loss(x: sp.Expr, p: sp.Expr, loss: Callable = logsig_loss) -> sp.Expr:
    """p·ℓ(x) + (1 − p)·ℓ(−x): one ordered pair with logit x = β·h and label probability p."""
    return p * loss(x) + (1 - p) * loss(-x)


def population_gradient(u: List[sp.Expr], pref: Dict, mu: Dict, beta: sp.Expr,
                        loss: Callable = logsig_loss) -> List[sp.Expr]:
    """∂L/∂u(k), k = 1..K, of L = Σ_{i≠j} μ_ij·[p_ij ℓ(β h_ij) + (1 − p_ij) ℓ(−β h_ij)], evaluated at ``u``.

    Computed by differentiating the loss in free symbols v and then substituting v = u (u may contain logs)."""
    v = list(sp.symbols(f"v1:{K + 1}", real=True))
    x = sp.Symbol("x", real=True)
    dl = sp.diff(pair_expected_loss(x, sp.Symbol("p"), loss), x)      # d/dx of one pair's expected loss
    grads = []
    for k in range(K):
        g = 0
        for (i, j), m in mu.items():
            # dx/dv_k for x = β(v_i − v_j)
            coeff = beta * ((k == i) - (k == j))
            if coeff == 0:
                continue
            xij = sp.expand(beta * (u[i] - u[j]))
            g += m * coeff * dl.subs({sp.Symbol("p"): pref[(i, j)], x: xij})
        grads.append(g)
    return grads


def bt_setup():
    """Symbols: π_ref, r, β, ordered-pair weights μ_ij > 0 and Bradley–Terry labels p_ij = σ(r_i − r_j)."""
    pi_ref = positive_symbols("pi_ref")
    r = real_symbols("r")
    beta = sp.Symbol("beta", positive=True)
    mu = {(i, j): sp.Symbol(f"mu{i + 1}{j + 1}", positive=True) for i in range(K) for j in range(K) if i != j}
    pref = {(i, j): sigmoid(r[i] - r[j]) for i in range(K) for j in range(K) if i != j}
    return pi_ref, r, beta, mu, pref


def dpo_stationary_at_boltzmann(claim: Optional[Claim] = None, *, reference: Optional[Callable] = None
                                ) -> List[sp.Expr]:
    """Claim (DPO Eq. 4/7, Azar et al. Prop. 1): under Bradley–Terry labels and a full-support pair distribution μ
    the population DPO loss is stationary at π* = π_ref·exp(r/β)/Z.

    Args:
        claim: ``(pi_ref, r, beta) -> [π(y)]``, default the Boltzmann policy.
        reference: optional ``(pi_ref, r, beta) -> [π_ref(y)]`` to use another reference (iterated DPO).
    Returns:
        the simplified ∂L/∂u(y), y = 1..K, at u = log(π/π_ref): all 0 iff the claim is stationary.
    """
    claim = claim or boltzmann
    pi_ref, r, beta, mu, pref = bt_setup()
    ref = reference(pi_ref, r, beta) if reference else pi_ref
    pi = claim(pi_ref, r, beta)
    u = [log_ratio(pi[i], ref[i]) for i in range(K)]
    subs = exp_of_rewards(r)
    return [canon(g, subs) for g in population_gradient(u, pref, mu, beta)]


def dpo_pair_margin(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: with label probability p = σ(Δr), Δr = r(y) − r(y'), one pair's expected DPO loss
    p·ℓ(x) + (1 − p)·ℓ(−x) (x = β·h) has the unique minimiser x* = Δr (= logit p), so β·h* = r(y) − r(y').

    ``claim(dr, beta) -> h*`` (default Δr/β). Returns [solve-residual, second derivative > 0 ? 0 : 1]:
    the first is (β·h_claim − x_solved) for the single real root of the first-order condition.
    """
    dr = sp.Symbol("dr", real=True)
    beta = sp.Symbol("beta", positive=True)
    x = sp.Symbol("x", real=True)
    h = (claim or (lambda dr, beta: dr / beta))(dr, beta)
    f = pair_expected_loss(x, sigmoid(dr))
    roots = sp.solve(sp.Eq(sp.simplify(sp.diff(f, x)), 0), x)
    assert len(roots) == 1, roots
    convex = sp.simplify(sp.diff(f, x, 2)).is_positive
    return [sp.simplify(beta * h - roots[0]), sp.Integer(0 if convex else 1)]
