"""Proof 8: UDRRA's scenarios share the Boltzmann target (UDRRA arXiv 2502.03095, reconstructed in theory.md §1),
and Xu et al.'s Theorem 4.1 counter-example (arXiv 2404.10719, Thm 4.1, Table 1).

UDRRA scenarios in standard notation (theory.md §1, "plausible reconstruction", τ = β), u = log π/π_ref,
samples from a full-support d:

- RA  (reward approximation):  L_RA(π)  = E_{y∼d}[(β·u(y) + β·log Z − r(y))²]            (needs Z)
- RDA (reward differences):    L_RDA(π) = E_{y,y'∼d}[(β·(u(y) − u(y')) − (r(y) − r(y')))²] (Z cancels)
- PRA (preferences = DPO):     L_PRA(π) = E[−log σ(β·h(y_w, y_l))] with Bradley–Terry labels

:func:`udrra_losses_share_boltzmann_target` shows every RA/RDA error term is 0 at π* = π_ref·exp(r/β)/Z (a
sum of squares at 0 is its global minimum) and every PRA pair term is at its strictly convex minimum; the
``*_zero_loss_*`` proofs solve the zero-loss equations and get π* back (uniqueness).

Xu et al. Thm 4.1 (Π_PPO ⊊ Π_DPO), Table 1: π_ref = (½, ½, 0), one pair y1 ≻ y2. With a = π(y1), b = π(y2),
L_DPO = log(1 + (b/a)^β) (:func:`xu_dpo_loss_closed_form`), a function of b/a only, ≥ 0, with infimum 0 as
b → 0; so (0.1, 0, 0.9) is a DPO solution while every PPO solution π_ref·exp(r/β)/Z has π(y3) = 0
(:func:`xu_theorem_4_1_counterexample`). The inclusion Π_PPO ⊆ Π_DPO rests on L_DPO(π_ref·e^{r/β}/Z) = L_RM(r)
(:func:`dpo_loss_of_boltzmann_is_reward_model_loss`, Xu's f(π) = β·log π/π_ref).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import sympy as sp

from ._common import (K, boltzmann, canon, exp_of_rewards, log_ratio, logsig_loss, positive_symbols, real_symbols,
                      sigmoid)
from .dpo import pair_expected_loss


def _setup():
    return positive_symbols("pi_ref"), real_symbols("r"), sp.Symbol("beta", positive=True)


def _partition(pi_ref, r, beta):
    return sp.Add(*[p * sp.exp(ri / beta) for p, ri in zip(pi_ref, r)])


def ra_errors(pi, pi_ref, r, beta) -> List[sp.Expr]:
    """β·u(y) + β·log Z − r(y), y = 1..K (L_RA = Σ d(y)·error²)."""
    Z = _partition(pi_ref, r, beta)
    return [beta * log_ratio(pi[y], pi_ref[y]) + beta * sp.log(Z) - r[y] for y in range(K)]


def rda_errors(pi, pi_ref, r, beta) -> List[sp.Expr]:
    """β·(u(y) − u(y')) − (r(y) − r(y')), y < y' (L_RDA = Σ d(y)d(y')·error²)."""
    u = [log_ratio(pi[y], pi_ref[y]) for y in range(K)]
    return [beta * (u[i] - u[j]) - (r[i] - r[j]) for i in range(K) for j in range(i + 1, K)]


def pra_pair_derivatives(pi, pi_ref, r, beta) -> List[sp.Expr]:
    """d/dx[p ℓ(x) + (1 − p) ℓ(−x)] at x = β·h(y, y'), p = σ(r(y) − r(y')), for every pair y < y'."""
    x = sp.Symbol("x", real=True)
    p = sp.Symbol("p")
    d = sp.diff(pair_expected_loss(x, p), x)
    u = [log_ratio(pi[y], pi_ref[y]) for y in range(K)]
    return [d.subs({p: sigmoid(r[i] - r[j]), x: sp.expand(beta * (u[i] - u[j]))})
            for i in range(K) for j in range(i + 1, K)]


def udrra_losses_share_boltzmann_target(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (UDRRA arXiv 2502.03095 via theory.md §1): RA, RDA and PRA are all minimised at π_ref·exp(r/β)/Z.

    ``claim(pi_ref, r, beta) -> [π(y)]``. Returns the RA errors (K), the RDA errors (K(K−1)/2) and the PRA pair
    derivatives (K(K−1)/2) at the claim: all 0 iff the claim zeroes both squared losses (their global minimum)
    and sits at the minimum of every (strictly convex, :func:`proofs.dpo.dpo_pair_margin`) PRA pair term.
    """
    pi_ref, r, beta = _setup()
    pi = (claim or boltzmann)(pi_ref, r, beta)
    subs = exp_of_rewards(r)
    return [canon(e, subs) for e in (ra_errors(pi, pi_ref, r, beta) + rda_errors(pi, pi_ref, r, beta)
                                     + pra_pair_derivatives(pi, pi_ref, r, beta))]


def ra_zero_loss_solution(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: L_RA = 0 (d full support) forces π = π_ref·exp(r/β)/Z. Solves each error = 0 for π(y) with
    sympy ``solve`` (unique root) and returns claim(y) − root(y)."""
    pi_ref, r, beta = _setup()
    q = positive_symbols("q")
    errs = ra_errors(q, pi_ref, r, beta)
    pi = (claim or boltzmann)(pi_ref, r, beta)
    out = []
    for y in range(K):
        roots = sp.solve(errs[y], q[y])
        assert len(roots) == 1, roots
        out.append(canon(pi[y] - roots[0], exp_of_rewards(r)))
    return out


def rda_zero_loss_solution(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: L_RDA = 0 (d full support) and Σπ = 1 force π = π_ref·exp(r/β)/Z. The zero-error equations,
    exponentiated, are linear in π: π(y)·π_ref(1)·e^{r(1)/β} = π(1)·π_ref(y)·e^{r(y)/β}; with Σπ = 1 sympy
    ``solve`` finds the unique solution. Returns claim − solution."""
    pi_ref, r, beta = _setup()
    q = positive_symbols("q")
    eqs = [q[y] * pi_ref[0] * sp.exp(r[0] / beta) - q[0] * pi_ref[y] * sp.exp(r[y] / beta) for y in range(1, K)]
    # the exponentiated equations are equivalent to the RDA errors vanishing (log is injective on (0, ∞))
    errs = rda_errors(q, pi_ref, r, beta)
    for y in range(1, K):
        lhs = sp.expand_log(sp.log(q[y] * pi_ref[0] * sp.exp(r[0] / beta))
                            - sp.log(q[0] * pi_ref[y] * sp.exp(r[y] / beta)), force=True)
        assert sp.simplify(beta * lhs + errs[y - 1]) == 0       # errs[y-1] is the pair (1, y)
    sol = sp.solve(eqs + [sp.Add(*q) - 1], q, dict=True)
    assert len(sol) == 1, sol
    pi = (claim or boltzmann)(pi_ref, r, beta)
    return [canon(pi[y] - sol[0][q[y]], exp_of_rewards(r)) for y in range(K)]


def dpo_loss_of_boltzmann_is_reward_model_loss(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (Xu et al. Thm 4.1, proof of ⊆; Eq. 6): for π = π_ref·exp(r/β)/Z and any pair (y, y'),
    −log σ(β·h(y, y')) = −log σ(r(y) − r(y')), the reward-model loss L_R (Eq. 4) of r. So the PPO policy of a
    reward-model minimiser r* attains min L_DPO = min L_R. Returns the difference for every ordered pair."""
    pi_ref, r, beta = _setup()
    pi = (claim or boltzmann)(pi_ref, r, beta)
    u = [log_ratio(pi[y], pi_ref[y]) for y in range(K)]
    subs = exp_of_rewards(r)
    return [canon(sp.exp(-logsig_loss(sp.expand(beta * (u[i] - u[j])))) - sigmoid(r[i] - r[j]), subs)
            for i in range(K) for j in range(K) if i != j]


def xu_dpo_loss_closed_form(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (Xu et al. §4.1): with π_ref(y1) = π_ref(y2) = ½ and the single pair y1 ≻ y2, the DPO loss is
    log(1 + (b/a)^β), a = π(y1), b = π(y2) — a function of b/a only.

    ``claim(a, b, beta)``. Returns [DPO loss − claim, d/ds claim(s·a, s·b, β) (scale invariance)]."""
    a, b, beta, s = sp.symbols("a b beta s", positive=True)
    half = sp.Rational(1, 2)
    dpo = logsig_loss(beta * (log_ratio(a, half) - log_ratio(b, half)))
    f = claim or (lambda a, b, beta: sp.log(1 + (b / a) ** beta))
    return [sp.simplify(sp.powsimp(sp.expand_log(dpo - f(a, b, beta), force=True), force=True)),
            sp.simplify(sp.diff(f(s * a, s * b, beta), s))]


def xu_theorem_4_1_counterexample(pi: Sequence = (sp.Rational(1, 10), 0, sp.Rational(9, 10)),
                                  pi_ref: Sequence = (sp.Rational(1, 2), sp.Rational(1, 2), 0)) -> List[sp.Expr]:
    """Claim (Xu et al. Thm 4.1, Table 1): π = (0.1, 0, 0.9) minimises the DPO loss on D = {y1 ≻ y2} with
    π_ref = (½, ½, 0) but is no PPO solution.

    Returns [L_DPO(π) − inf L_DPO, π(y3) − π_PPO(y3)], with inf L_DPO = 0: log(1 + (b/a)^β) > 0 for b > 0
    and it is 0 at b = 0 (continuous there for β > 0, so the infimum over b > 0 is this limit), and π_PPO =
    π_ref·exp(r/β)/Z for a symbolic reward r. The theorem's example
    holds iff the first is 0 (π is a DPO solution) and the second is *not* 0 (π is outside Π_PPO).
    """
    beta = sp.Symbol("beta", positive=True)
    a_, b_ = sp.symbols("a b", positive=True)
    loss = sp.log(1 + (b_ / a_) ** beta)                     # verified by xu_dpo_loss_closed_form
    assert loss.is_positive                                  # L > 0 for every a, b > 0: 0 is a lower bound
    inf = loss.subs(b_, 0)                                   # = log(1 + 0**β) = 0, attained in the limit b → 0+
    a, b = sp.nsimplify(pi[0]), sp.nsimplify(pi[1])
    at_pi = sp.log(1 + (b / a) ** beta)
    r = real_symbols("r")
    ppo = boltzmann([sp.nsimplify(p) for p in pi_ref], r, beta)
    return [sp.simplify(at_pi - inf), sp.simplify(sp.nsimplify(pi[2]) - ppo[2])]
