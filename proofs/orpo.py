"""Proof 15: ORPO's two-arm optimum (Hong et al., "ORPO: Monolithic Preference Optimization without Reference
Model", arXiv:2403.07691, Eqs. 6–8).

ORPO's loss on a pair (Eqs. 6–8) is the SFT negative log-likelihood of the chosen response plus λ times the
odds-ratio term,

    L = −log P(y_w) + λ·(−log σ(log odds(y_w) − log odds(y_l))),      odds(y) = P(y)/(1 − P(y)),

with no reference model. Two single-token arms, one pair {arm 1, arm 2}; in the population arm 1 is the chosen
response with probability q (the label frequency) and arm 2 otherwise. With p = π(arm 1), 1 − p = π(arm 2) and
the logit ℓ = log(p/(1 − p)), log odds(arm 1) − log odds(arm 2) = log(p/(1 − p)) − log((1 − p)/p) = 2ℓ, so

    L(ℓ) = q·[−log p − λ·log σ(2ℓ)] + (1 − q)·[−log(1 − p) − λ·log σ(−2ℓ)].

Derivation (checked by sympy below): d(−log p)/dℓ = −(1 − p), d(−log(1 − p))/dℓ = p, d(−log σ(±2ℓ))/dℓ =
∓2σ(∓2ℓ), and σ(2ℓ) = p²/(p² + (1 − p)²), so

    dL/dℓ · (p² + (1 − p)²) = P(p) = (p − q)·(p² + (1 − p)²) + 2λ·[(1 − q)·p² − q·(1 − p)²],

a cubic in p. P(0) = −q(1 + 2λ) < 0 and P(1) = (1 − q)(1 + 2λ) > 0 for
q ∈ (0, 1), and L is strictly convex in ℓ (a sum of convex functions of ℓ: −log σ(±ℓ), −log σ(±2ℓ)), so the
optimum is the unique root of P in (0, 1). At λ = 0 it is p = q (maximum likelihood). The odds-ratio term alone
is minimised at σ(2ℓ) = q, i.e. p_OR = σ(logit(q)/2) (the log odds ratio of two complementary arms is 2ℓ), which
is closer to ½ than q; P(q) = 2λ·q(1 − q)(2q − 1) and P(p_OR) = (p_OR − q)·(p_OR² + (1 − p_OR)²), so for q > ½ and
λ > 0 the optimum lies strictly between p_OR and q: ORPO pulls the chosen arm's probability *below* the label
frequency (and for q < ½ above it), unlike DPO with a uniform reference (p = q at β = 1).

- :func:`orpo_two_arm_cubic` — dL/dℓ·(p² + (1 − p)²) − claim (dL/dℓ derived by sympy from L(ℓ), then
  ℓ = log(p/(1 − p)) substituted), cancelled; and 0 if d²L/dℓ² > 0 (derived, as a function of p ∈ (0, 1)).
- :func:`orpo_deterministic_label_has_no_interior_optimum` — at q = 1, dL/dℓ = −(1 − p) −
  2λ·(1 − p)²/(p² + (1 − p)²) < 0 on (0, 1): L decreases along ℓ everywhere, so the two-arm optimum is the
  vertex p → 1 (ℓ → ∞; the loss tends to its infimum 0 and is never attained).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import sympy as sp

from ._common import logsig_loss, sigmoid


def _symbols():
    p = sp.Symbol("p", positive=True)
    q = sp.Symbol("q", positive=True)
    lam = sp.Symbol("lambda", positive=True)
    ell = sp.Symbol("ell", real=True)
    return p, q, lam, ell


def orpo_population_loss(ell: sp.Expr, q: sp.Expr, lam: sp.Expr) -> sp.Expr:
    """L(ℓ) = q·[−log p − λ·log σ(2ℓ)] + (1 − q)·[−log(1 − p) − λ·log σ(−2ℓ)], p = σ(ℓ) (Hong et al. Eqs. 6–8)."""
    p = sigmoid(ell)
    odds_1, odds_2 = p / (1 - p), (1 - p) / p
    log_odds_ratio = sp.log(odds_1) - sp.log(odds_2)
    chosen_1 = -sp.log(p) + lam * logsig_loss(log_odds_ratio)
    chosen_2 = -sp.log(1 - p) + lam * logsig_loss(-log_odds_ratio)
    return q * chosen_1 + (1 - q) * chosen_2


def orpo_cubic(p, q, lam):
    """P(p) = (p − q)·(p² + (1 − p)²) + 2λ·[(1 − q)·p² − q·(1 − p)²]."""
    return (p - q) * (p ** 2 + (1 - p) ** 2) + 2 * lam * ((1 - q) * p ** 2 - q * (1 - p) ** 2)


def _derivative_in_p(order: int, q, lam, p, ell) -> sp.Expr:
    """d^order L/dℓ^order as a rational function of p: sympy's derivative in ℓ, then ℓ = log z (every exponential
    becomes a power of z, every log a derivative has left cancels), then z = p/(1 − p)."""
    z = sp.Symbol("z", positive=True)
    d = sp.diff(orpo_population_loss(ell, q, lam), ell, order).subs(ell, sp.log(z))
    d = sp.cancel(sp.together(d))
    assert not d.has(sp.log), d
    return sp.factor(sp.cancel(d.subs(z, p / (1 - p))))


def orpo_two_arm_cubic(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (derived above from Hong et al. Eqs. 6–8): two arms, label frequency q, weight λ: dL/dℓ = 0 ⇔
    P(p) = 0 with P(p) = (p − q)·(p² + (1 − p)²) + 2λ·[(1 − q)·p² − q·(1 − p)²], and dL/dℓ·(p² + (1 − p)²) = P(p).

    ``claim(p, q, lam) -> polynomial`` (default :func:`orpo_cubic`). Returns [dL/dℓ·(p² + (1 − p)²) − claim
    (cancelled); 0 if d²L/dℓ² is positive for every p ∈ (0, 1) (strict convexity: unique root) else 1]."""
    p, q, lam, ell = _symbols()
    d1 = _derivative_in_p(1, q, lam, p, ell)
    P = (claim or orpo_cubic)(p, q, lam)
    residual = sp.factor(sp.cancel(d1 * (p ** 2 + (1 - p) ** 2) - P))
    d2 = _derivative_in_p(2, q, lam, p, ell)
    return [residual, sp.Integer(0 if _positive_on_unit_interval(d2, p) else 1)]


def _positive_on_unit_interval(e: sp.Expr, p: sp.Symbol) -> bool:
    """e > 0 for every p ∈ (0, 1) (and every positive value of the other symbols): with p = t/(1 + t) (t > 0 ⇔
    p ∈ (0, 1)) the numerator and the denominator of the cancelled e each expand to a sum of terms that sympy
    knows to be positive (t and the other symbols are positive) — a sufficient certificate."""
    t = sp.Symbol("t", positive=True)
    e = sp.factor(sp.cancel(e.subs(p, t / (1 + t))))
    num, den = sp.fraction(e)
    return all(_all_positive_terms(sp.expand(x)) for x in (num, den))


def _all_positive_terms(e: sp.Expr) -> bool:
    terms = sp.Add.make_args(e)
    return all(tm.is_positive for tm in terms)


def orpo_deterministic_label_has_no_interior_optimum(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: at q = 1, dL/dℓ = −(1 − p) − 2λ·(1 − p)²/(p² + (1 − p)²), strictly negative on (0, 1): no
    interior stationary point, the two-arm optimum is the vertex p → 1.

    ``claim(p, lam) -> dL/dℓ`` (default the expression above). Returns [dL/dℓ derived by sympy − claim
    (cancelled); 0 if −claim is positive on (0, 1) for every λ > 0 else 1]."""
    p, q, lam, ell = _symbols()
    d1 = _derivative_in_p(1, sp.Integer(1), lam, p, ell)
    c = (claim or (lambda p, lam: -(1 - p) - 2 * lam * (1 - p) ** 2 / (p ** 2 + (1 - p) ** 2)))(p, lam)
    return [sp.factor(sp.cancel(d1 - c)), sp.Integer(0 if _positive_on_unit_interval(-c, p) else 1)]
