"""Proof 3: the IPO population optimum (Azar et al. arXiv 2310.12036, §5, Eqs. 9–13; §5.3.1).

Azar's setting: pairs y, y' ∼ μ independently, the label says y ≻ y' with probability p(y≻y') (any preference
matrix: p(y'≻y) = 1 − p(y≻y'), p(y≻y) = ½; *not* Bradley–Terry), and the IPO loss of a labelled pair is
(h(y_w, y_l) − τ⁻¹/2)² (Eq. 17). The population loss is therefore

    L(u) = Σ_{y≠y'} μ(y)μ(y')·[p(y≻y')·(h(y,y') − 1/(2τ))² + (1 − p(y≻y'))·(h(y,y') + 1/(2τ))²]

(a pair with y = y' has h = 0 and does not depend on u). Claim: L is stationary at
h*(y, y') = τ⁻¹(p(y≻μ) − p(y'≻μ)), p(y≻μ) = Σ_{y'} μ(y')p(y≻y'), i.e. at π* ∝ π_ref·exp(p(y≻μ)/τ)
(Azar Eqs. 9–13). K = 3 with a symbolic preference matrix (3 free entries), symbolic μ on the simplex, π_ref, τ.

- :func:`ipo_stationary_at_psi_target` — ∂L/∂u(y) = 0 at the claim for every y;
- :func:`ipo_hessian_sum_of_squares` — the Hessian in u is 4× the graph Laplacian of the weights μ(y)μ(y')
  (its quadratic form is a positive sum of squares of differences), so the stationary point is the minimiser,
  unique in π when μ has full support (Azar Thm 2);
- :func:`ipo_two_arm_example` — two arms, uniform π_ref and μ, p(y1≻y2) = 1: solving ∂L/∂h = 0 gives
  π*(y1) = σ(0.5/τ) (Azar §5.3.1; DPO instead gives π*(y1) = 1 for every τ).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import sympy as sp

from ._common import K, canon, log_ratio, on_simplex, positive_symbols, sigmoid


def preference_matrix():
    """Symbolic p(i≻j) with p(j≻i) = 1 − p(i≻j) and p(i≻i) = ½ (3 free entries for K = 3)."""
    P = [[sp.Rational(1, 2)] * K for _ in range(K)]
    for i in range(K):
        for j in range(i + 1, K):
            s = sp.Symbol(f"p{i + 1}{j + 1}", positive=True)
            P[i][j], P[j][i] = s, 1 - s
    return P


def p_vs_mu(P, mu) -> List[sp.Expr]:
    """p(y≻μ) = Σ_{y'} μ(y')·p(y≻y') (including y' = y with p = ½, Azar's convention)."""
    return [sp.Add(*[mu[j] * P[i][j] for j in range(K)]) for i in range(K)]


def ipo_target(pi_ref, P, mu, tau) -> List[sp.Expr]:
    """π_ref·exp(p(y≻μ)/τ)/Z (Azar Eq. 9 with Ψ = identity)."""
    pm = p_vs_mu(P, mu)
    w = [pi_ref[i] * sp.exp(pm[i] / tau) for i in range(K)]
    return [wi / sp.Add(*w) for wi in w]


def ipo_population_loss(u, P, mu, tau) -> sp.Expr:
    half = 1 / (2 * tau)
    return sp.Add(*[mu[i] * mu[j] * (P[i][j] * (u[i] - u[j] - half) ** 2 + (1 - P[i][j]) * (u[i] - u[j] + half) ** 2)
                    for i in range(K) for j in range(K) if i != j])


def _setup():
    return positive_symbols("pi_ref"), preference_matrix(), on_simplex("mu"), sp.Symbol("tau", positive=True)


def ipo_stationary_at_psi_target(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (Azar et al. §5, Eqs. 9–13): the population IPO loss is stationary at π* ∝ π_ref·exp(p(y≻μ)/τ),
    equivalently h*(y, y') = τ⁻¹(p(y≻μ) − p(y'≻μ)).

    ``claim(pi_ref, P, mu, tau) -> [π(y)]``. Returns ∂L/∂u(y) at u = log(π/π_ref), y = 1..K (all 0 iff stationary).
    """
    pi_ref, P, mu, tau = _setup()
    pi = (claim or ipo_target)(pi_ref, P, mu, tau)
    v = list(sp.symbols(f"v1:{K + 1}", real=True))
    L = ipo_population_loss(v, P, mu, tau)
    at = {v[i]: log_ratio(pi[i], pi_ref[i]) for i in range(K)}
    return [canon(sp.diff(L, vi).subs(at)) for vi in v]


def ipo_hessian_sum_of_squares(weight: Optional[Callable] = None) -> sp.Expr:
    """Claim (Azar Thm 2): for any direction x, xᵀ(∇²L)x = Σ_{y<y'} 4·μ(y)μ(y')·(x(y) − x(y'))², i.e. the
    Hessian of L in u is 4× the Laplacian of the complete graph with weights μ(y)μ(y') > 0: positive
    semi-definite, zero only along constants (which do not change π). So the stationary point is the minimiser
    and π* is unique when μ has full support.

    ``weight(mu_i, mu_j) -> w`` (default 4·μ_i·μ_j). Returns xᵀHx − Σ_{i<j} w_ij (x_i − x_j)², expanded.
    """
    pi_ref, P, mu, tau = _setup()
    v = list(sp.symbols(f"v1:{K + 1}", real=True))
    x = list(sp.symbols(f"x1:{K + 1}", real=True))
    H = sp.hessian(ipo_population_loss(v, P, mu, tau), v)
    quad = (sp.Matrix([x]) * H * sp.Matrix(x))[0, 0]
    w = weight or (lambda a, b: 4 * a * b)
    sos = sp.Add(*[w(mu[i], mu[j]) * (x[i] - x[j]) ** 2 for i in range(K) for j in range(i + 1, K)])
    return sp.expand(quad - sos)


def ipo_two_arm_example(claim: Optional[Callable] = None) -> sp.Expr:
    """Claim (Azar §5.3.1): two arms, uniform π_ref and μ, p(y1≻y2) = 1 ⇒ π*(y1) = σ(0.5/τ).

    Solves ∂L/∂h = 0 for h = u(y1) − u(y2) (sympy ``solve``), forms π*(y1) = σ(h*) (uniform π_ref), and returns
    π*(y1) − claim(τ) (default σ(1/(2τ))).
    """
    tau = sp.Symbol("tau", positive=True)
    h = sp.Symbol("h", real=True)
    mu = [sp.Rational(1, 2)] * 2
    P = [[sp.Rational(1, 2), 1], [0, sp.Rational(1, 2)]]
    half = 1 / (2 * tau)
    L = sp.Add(*[mu[i] * mu[j] * (P[i][j] * (s * h - half) ** 2 + (1 - P[i][j]) * (s * h + half) ** 2)
                 for i, j, s in ((0, 1, 1), (1, 0, -1))])
    roots = sp.solve(sp.diff(L, h), h)
    assert len(roots) == 1, roots
    pi1 = sp.exp(roots[0]) / (sp.exp(roots[0]) + 1)       # π ∝ π_ref·e^u, π_ref uniform, u(y2) = 0
    claimed = (claim or (lambda tau: sigmoid(sp.Rational(1, 2) / tau)))(tau)
    return sp.simplify(pi1 - claimed)
