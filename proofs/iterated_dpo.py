"""Proof 9: iterated DPO with the reference reset each round (Xu et al. arXiv 2404.10719 §4.3 "DPO-Iter";
theory.md §4.2 last row and §5.6 item 7).

Round k + 1 runs DPO to convergence with π_ref := π_k, on on-policy pairs (full support) labelled by
Bradley–Terry preferences in r. Claim: π_k = π_0·exp(k·r/β)/Z_k (temperature β/k, → argmax r as k → ∞).

:func:`iterated_dpo_induction` proves it by induction with symbolic k: the base case π_0 (k = 0) and the step
"if π_k = claim(k) then the DPO population loss with reference π_k is stationary at claim(k + 1)", the step
checked with the DPO stationarity residual of :func:`proofs.dpo.dpo_stationary_at_boltzmann` (which is also
the unique optimum, proof 2).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import sympy as sp

from .dpo import dpo_stationary_at_boltzmann

k = sp.Symbol("k", integer=True, nonnegative=True)


def iterated_boltzmann(pi0, r, beta, k):
    """π_0·exp(k·r/β)/Z_k (π_0 given up to normalisation)."""
    w = [p * sp.exp(k * ri / beta) for p, ri in zip(pi0, r)]
    return [wi / sp.Add(*w) for wi in w]


def iterated_dpo_induction(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (Xu et al. §4.3 DPO-Iter; theory.md §5.6 item 7): after k rounds π_k = π_0·exp(k·r/β)/Z_k.

    ``claim(pi0, r, beta, k) -> [π_k(y)]`` for symbolic k. Returns the base-case residuals claim(0) − π_0 followed
    by the DPO stationarity residuals of claim(k + 1) with reference claim(k) (all 0 iff the induction holds);
    π_0 is the normalised π_ref(y)/Σπ_ref of proof 2's symbols."""
    c = claim or iterated_boltzmann
    base = []

    def step_claim(pi0, r, beta):
        return c(pi0, r, beta, k + 1)

    def step_reference(pi0, r, beta):
        z0 = sp.Add(*pi0)                       # π_0 = the (normalised) symbols π_0(y)/Σπ_0
        base.extend(sp.simplify(x - p / z0) for x, p in zip(c(pi0, r, beta, sp.Integer(0)), pi0))
        return c(pi0, r, beta, k)

    step = dpo_stationary_at_boltzmann(step_claim, reference=step_reference)
    return base + step
