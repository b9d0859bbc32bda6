"""Proof 4: label noise — cDPO's finite margin and rDPO's unbiasedness.

- :func:`cdpo_deterministic_margin` — Mitchell's cDPO note (Eqs. 3–4): the loss of a pair always labelled
  y_w ≻ y_l is (1 − ε)·ℓ(βh) + ε·ℓ(−βh), ℓ = −log σ. Its derivative in x = βh is σ(x) − (1 − ε), so the unique
  minimiser (strictly convex) is β·h* = log((1 − ε)/ε), finite for every ε ∈ (0, ½) (DPO's margin would diverge).
- :func:`cdpo_margin_with_label_frequency` — with true preference frequency p the minimiser is
  β·h* = logit(p(1 − ε) + (1 − p)ε) (theory.md §4.2/§5.5): cDPO is DPO on label-smoothed data.
- :func:`rdpo_unbiased` — Chowdhury et al. rDPO (arXiv 2403.00409, Eq. 5): with
  L̃(x) = [(1 − ε)ℓ(x) − εℓ(−x)]/(1 − 2ε), the expectation over a label flip with probability ε,
  (1 − ε)·L̃(x) + ε·L̃(−x), equals the clean loss ℓ(x) — for *any* ℓ (proven with ℓ an undetermined function),
  hence the same population loss and the same target π_ref·exp(r/β)/Z as clean DPO.
- :func:`rdpo_effective_label` — on data whose observed label frequency is q̃, the expected rDPO loss is the
  logistic loss with the de-noised label (q̃ − ε)/(1 − 2ε); with q̃ = q(1 − ε) + (1 − q)ε that is q.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import sympy as sp

from ._common import logsig_loss


def _eps():
    return sp.Symbol("epsilon", positive=True), sp.Symbol("beta", positive=True), sp.Symbol("x", real=True)


def cdpo_loss(x, eps, loss: Callable = logsig_loss):
    return (1 - eps) * loss(x) + eps * loss(-x)


def cdpo_deterministic_margin(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (Mitchell cDPO note; theory.md §4.2): for a deterministic pair, β·h* = log((1 − ε)/ε).

    ``claim(eps) -> β·h*``. Returns [∂/∂x cDPO loss at x = claim, 0 if ∂²/∂x² > 0 for all x else 1,
    claim − (the root found by sympy ``solve``)].
    """
    eps, beta, x = _eps()
    x_star = (claim or (lambda e: sp.log((1 - e) / e)))(eps)
    f = cdpo_loss(x, eps)
    d1 = sp.diff(f, x)
    convex = sp.simplify(sp.diff(f, x, 2)).is_positive
    roots = sp.solve(sp.simplify(d1), x)
    assert len(roots) == 1, roots
    return [sp.simplify(d1.subs(x, x_star)), sp.Integer(0 if convex else 1),
            sp.simplify(sp.expand_log(x_star - roots[0], force=True))]


def cdpo_margin_with_label_frequency(claim: Optional[Callable] = None) -> sp.Expr:
    """Claim (theory.md §5.5): with preference frequency p, cDPO's per-pair minimiser is
    β·h* = logit(p(1 − ε) + (1 − p)ε). Returns the derivative of the expected loss
    p·cDPO(x) + (1 − p)·cDPO(−x) at x = claim(p, eps)."""
    eps, beta, x = _eps()
    p = sp.Symbol("p", positive=True)
    q = p * (1 - eps) + (1 - p) * eps
    x_star = (claim or (lambda p, e: sp.log(q / (1 - q))))(p, eps)
    f = p * cdpo_loss(x, eps) + (1 - p) * cdpo_loss(-x, eps)
    return sp.simplify(sp.diff(f, x).subs(x, x_star))


def rdpo_loss(x, eps, loss: Callable = logsig_loss):
    """Chowdhury et al. Eq. 5: [(1 − ε)ℓ(x) − εℓ(−x)]/(1 − 2ε)."""
    return ((1 - eps) * loss(x) - eps * loss(-x)) / (1 - 2 * eps)


def rdpo_unbiased(robust_loss: Optional[Callable] = None) -> sp.Expr:
    """Claim (Chowdhury et al. arXiv 2403.00409, Lemma/Eq. 5): E_flip[rDPO loss] = clean DPO loss.

    ``robust_loss(x, eps, loss) -> expression`` (default :func:`rdpo_loss`). The label of a pair with clean logit
    x is flipped with probability ε (then the loss sees −x). Returns (1 − ε)L̃(x) + εL̃(−x) − ℓ(x) with ℓ an
    undetermined function (so the identity holds for every base loss, −log σ included)."""
    eps, beta, x = _eps()
    ell = sp.Function("ell")
    lt = robust_loss or rdpo_loss
    expected = (1 - eps) * lt(x, eps, ell) + eps * lt(-x, eps, ell)
    return sp.simplify(expected - ell(x))


def rdpo_effective_label(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: with observed label frequency q̃ the expected rDPO loss q̃·L̃(x) + (1 − q̃)·L̃(−x) equals the
    logistic loss q_eff·ℓ(x) + (1 − q_eff)·ℓ(−x) with q_eff = (q̃ − ε)/(1 − 2ε); and for labels flipped at rate ε,
    q̃ = q(1 − ε) + (1 − q)ε, q_eff = q (the clean label). ``claim(qt, eps) -> q_eff``.
    Returns [identity residual (ℓ undetermined), q_eff(q̃(q)) − q]."""
    eps, beta, x = _eps()
    qt, q = sp.symbols("q_tilde q", positive=True)
    ell = sp.Function("ell")
    q_eff = (claim or (lambda qt, e: (qt - e) / (1 - 2 * e)))(qt, eps)
    lhs = qt * rdpo_loss(x, eps, ell) + (1 - qt) * rdpo_loss(-x, eps, ell)
    rhs = q_eff * ell(x) + (1 - q_eff) * ell(-x)
    return [sp.simplify(lhs - rhs), sp.simplify(q_eff.subs(qt, q * (1 - eps) + (1 - q) * eps) - q)]
