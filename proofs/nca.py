"""Proof 16: NCA, pairwise (Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards",
arXiv:2402.05369, the NCA loss with K = 2 responses and a hard preference label; TRL's ``loss_type = "nca_pair"``).

With u = log(π/π_ref) and r_θ = β·u, NCA's loss on a pair (y_w, y_l) is

    ℓ_NCA = −log σ(β·u_w) − ½·log σ(−β·u_w) − ½·log σ(−β·u_l)
          = softplus(−β·u_w) + ½·softplus(β·u_w) + ½·softplus(β·u_l),      softplus(x) = log(1 + e^x)

(Chen et al.'s NCA with soft labels softmax(r/α) → (1, 0): the chosen response's "data" term −log σ(r_θ) plus the
uniform average of the "noise" terms −log σ(−r_θ); TRL 1.16 dpo_trainer.py, ``nca_pair``). Unlike DPO the loss
is not a function of u_w − u_l: each response is pushed on its own.

- :func:`nca_population_per_response` — population over ordered pairs (y_i, y_j) drawn with weight μ_ij > 0
  (i ≠ j, six free symbols, K = 3) whose label says y_i ≻ y_j with probability q_ij (free symbols): the pair sum
  Σ_{i≠j} μ_ij·[q_ij·ℓ_NCA(w = i, l = j) + (1 − q_ij)·ℓ_NCA(w = j, l = i)] equals the per-response form

      L(u) = Σ_y [c(y)·softplus(−β·u_y) + ½·m(y)·softplus(β·u_y)],

  c(y) = Σ_j μ_yj·q_yj + Σ_i μ_iy·(1 − q_iy) the probability that y is the chosen response of a drawn pair and
  m(y) = Σ_j (μ_yj + μ_jy) the expected number of times y appears in a pair (Σ m = 2·Σ μ = 2). So the loss is
  separable in u: ignoring normalisation each u_y would sit at e^{β·u_y} = 2c(y)/m(y) (the root of
  −c·σ(−βu) + ½m·σ(βu)); on the simplex a Lagrange multiplier couples them, and π depends on the pair
  distribution through c/m — not on reward differences alone.
- :func:`nca_two_arm_stationary` — two arms, uniform π_ref = (½, ½), β = 1, one pair with label frequency q
  (arm 1 chosen with probability q), p = π(arm 1), ℓ = log(p/(1 − p)): u_1 = log 2p, u_2 = log 2(1 − p), and the
  derivative of L(ℓ) = q·[sp(−u_1) + ½sp(u_1) + ½sp(u_2)] + (1 − q)·[sp(−u_2) + ½sp(u_2) + ½sp(u_1)] is

      dL/dℓ·(1 + 2p)(3 − 2p) = P(p) = −q(1 − p)(3 − 2p) + (1 − q)·p(1 + 2p) + 2p(1 − p)(1 − 2p)
                             = 4p³ − 4(1 + q)p² + (3 + 4q)p − 3q = (p − q)·(4p² − 4p + 3),

  and 4p² − 4p + 3 = (2p − 1)² + 2 > 0, so the unique optimum is p = q — DPO's two-arm answer at β = 1 (there the
  unconstrained per-response optima e^{u_y} = 2c/m = (2q, 2(1 − q)) already sum to 1 under π_ref = (½, ½)).
  Returns [dL/dℓ·(1 + 2p)(3 − 2p) − claim; 0 if the derived polynomial is (p − q)·(positive on (0, 1)) else 1].
- :func:`nca_two_arm_optimum` — dL/dℓ at a claimed optimum p*(q) for a given rational β: 0 for p* = q at
  β = 1; at β = 2 both p* = q and DPO's σ(logit(q)/β) are rejected (the NCA optimum is then no longer DPO's:
  q = 9/10 gives p* ≈ 0.7466 against DPO's 0.75).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import sympy as sp

from ._common import K, logsig_loss, real_symbols, sigmoid
from .f_divergence import _settle
from .orpo import _positive_on_unit_interval


def softplus(x: sp.Expr) -> sp.Expr:
    """log(1 + e^x) (= −log σ(−x))."""
    return sp.log(1 + sp.exp(x))


def nca_pair_loss(uw: sp.Expr, ul: sp.Expr, beta: sp.Expr) -> sp.Expr:
    """−log σ(β·u_w) − ½·log σ(−β·u_w) − ½·log σ(−β·u_l) (TRL ``nca_pair``)."""
    return logsig_loss(beta * uw) + logsig_loss(-beta * uw) / 2 + logsig_loss(-beta * ul) / 2


def chosen_marginal(mu: Dict[Tuple[int, int], sp.Expr], q: Dict[Tuple[int, int], sp.Expr], y: int) -> sp.Expr:
    """c(y) = Σ_j μ_yj·q_yj + Σ_i μ_iy·(1 − q_iy)."""
    return (sp.Add(*[mu[(y, j)] * q[(y, j)] for j in range(K) if j != y])
            + sp.Add(*[mu[(i, y)] * (1 - q[(i, y)]) for i in range(K) if i != y]))


def appearance_marginal(mu: Dict[Tuple[int, int], sp.Expr], y: int) -> sp.Expr:
    """m(y) = Σ_j (μ_yj + μ_jy)."""
    return sp.Add(*[mu[(y, j)] + mu[(j, y)] for j in range(K) if j != y])


def per_response_loss(u, beta, mu, q) -> sp.Expr:
    """Σ_y [c(y)·softplus(−β·u_y) + ½·m(y)·softplus(β·u_y)]."""
    return sp.Add(*[chosen_marginal(mu, q, y) * softplus(-beta * u[y])
                    + appearance_marginal(mu, y) * softplus(beta * u[y]) / 2 for y in range(K)])


def nca_population_per_response(claim: Optional[Callable] = None) -> sp.Expr:
    """Claim: the population NCA pair loss (ordered-pair weights μ_ij, labels q_ij, K = 3, symbolic u and β)
    equals Σ_y [c(y)·softplus(−β·u_y) + ½·m(y)·softplus(β·u_y)].

    ``claim(u, beta, mu, q) -> expression`` (default :func:`per_response_loss`). Returns pair sum − claim,
    with −log σ(x) written as softplus(−x) and the sum expanded (log(1 + e^{±βu}) are the atoms)."""
    u = real_symbols("u")
    beta = sp.Symbol("beta", positive=True)
    pairs = [(i, j) for i in range(K) for j in range(K) if i != j]
    mu = {(i, j): sp.Symbol(f"mu{i + 1}{j + 1}", positive=True) for i, j in pairs}
    q = {(i, j): sp.Symbol(f"q{i + 1}{j + 1}", positive=True) for i, j in pairs}
    total = sp.Add(*[mu[(i, j)] * (q[(i, j)] * nca_pair_loss(u[i], u[j], beta)
                                   + (1 - q[(i, j)]) * nca_pair_loss(u[j], u[i], beta)) for i, j in pairs])
    claimed = (claim or per_response_loss)(u, beta, mu, q)
    # −log σ(x) = log(1 + e^{−x}) = softplus(−x): the same atoms on both sides
    return sp.expand(total - claimed)


def _two_arm_derivative(q: sp.Expr, p: sp.Symbol, beta: sp.Expr = sp.Integer(1)) -> sp.Expr:
    """dL/dℓ as a function of p: L written in p (u_1 = log 2p, u_2 = log 2(1 − p), so e^{±β·u} are powers of p),
    differentiated in p by sympy and multiplied by dp/dℓ = p(1 − p) (p = σ(ℓ)); rational for rational β."""
    ell = sp.Symbol("ell", real=True)
    assert sp.simplify(sp.diff(sigmoid(ell), ell) - sigmoid(ell) * (1 - sigmoid(ell))) == 0
    u1, u2 = sp.log(2 * p), sp.log(2 * (1 - p))
    L = q * nca_pair_loss(u1, u2, beta) + (1 - q) * nca_pair_loss(u2, u1, beta)
    return sp.factor(sp.cancel(sp.together(sp.diff(L, p) * p * (1 - p))))


def nca_cubic(p, q):
    """(p − q)·(4p² − 4p + 3) = 4p³ − 4(1 + q)p² + (3 + 4q)p − 3q."""
    return (p - q) * (4 * p ** 2 - 4 * p + 3)


def nca_two_arm_stationary(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (derived above): two arms, uniform π_ref, β = 1, label frequency q:
    dL/dℓ·(1 + 2p)(3 − 2p) = (p − q)·(4p² − 4p + 3), so the unique optimum is p = q.

    ``claim(p, q) -> polynomial`` (default :func:`nca_cubic`). Returns [dL/dℓ·(1 + 2p)(3 − 2p) − claim
    (cancelled); 0 if the *derived* polynomial is (p − q) times a factor positive on (0, 1) else 1]."""
    p = sp.Symbol("p", positive=True)
    q = sp.Symbol("q", positive=True)
    derived = sp.cancel(_two_arm_derivative(q, p) * (1 + 2 * p) * (3 - 2 * p))
    residual = sp.factor(sp.cancel(derived - (claim or nca_cubic)(p, q)))
    quotient, remainder = sp.div(sp.Poly(derived, p), sp.Poly(p - q, p))
    unique = remainder.is_zero and _positive_on_unit_interval(quotient.as_expr(), p)
    return [residual, sp.Integer(0 if unique else 1)]


def nca_two_arm_optimum(claim: Optional[Callable] = None, beta: sp.Expr = sp.Integer(1)) -> sp.Expr:
    """Claim: with β = 1 the two-arm NCA optimum is p* = q (for other β there is no such closed form).

    ``claim(q, beta) -> p*`` (default q). Returns dL/dℓ at p = p*, cancelled (q symbolic, β a given number)."""
    beta = sp.nsimplify(beta)
    p = sp.Symbol("p", positive=True)
    q = sp.Symbol("q", positive=True)
    d = _two_arm_derivative(q, p, beta)
    p_star = (claim or (lambda q, beta: q))(q, beta)
    return _settle(d.subs(p, p_star), lambda e: sp.factor(sp.cancel(sp.together(e))))
