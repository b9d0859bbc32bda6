"""Shared symbolic building blocks for the proofs (sympy only; nothing from udrra is imported).

Conventions (theory.md, "Notation"): a single prompt, K responses; π_ref the reference, r the reward,
u(y) = log π(y)/π_ref(y), h(y, y') = u(y) − u(y'), σ the logistic function, ℓ(x) = −log σ(x) = log(1 + e^{−x}).

A *claim* is a callable that builds the claimed object from the symbols of a proof (for a distribution:
``claim(pi_ref, r, beta) -> list of K expressions``); each proof evaluates an optimality condition at the
claim and returns the simplified residual(s), which are identically 0 exactly when the claim is right.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import sympy as sp

K = 3


def sigmoid(x: sp.Expr) -> sp.Expr:
    """σ(x) = 1/(1 + e^{−x})."""
    return 1 / (1 + sp.exp(-x))


def logsig_loss(x: sp.Expr) -> sp.Expr:
    """ℓ(x) = −log σ(x) = log(1 + e^{−x}), the Bradley–Terry / DPO loss of the logit x."""
    return sp.log(1 + sp.exp(-x))


def positive_symbols(name: str, k: int = K) -> List[sp.Symbol]:
    return list(sp.symbols(f"{name}1:{k + 1}", positive=True))


def real_symbols(name: str, k: int = K) -> List[sp.Symbol]:
    return list(sp.symbols(f"{name}1:{k + 1}", real=True))


def on_simplex(name: str, k: int = K) -> List[sp.Expr]:
    """k − 1 free positive symbols and the last entry 1 − Σ of them (a generic point of the simplex)."""
    free = list(sp.symbols(f"{name}1:{k}", positive=True))
    return free + [1 - sum(free)]


def log_ratio(pi: sp.Expr, ref: sp.Expr) -> sp.Expr:
    """u = log(π/π_ref), with logs of products and powers expanded (all quantities are positive)."""
    return sp.expand(sp.expand_log(sp.log(pi / ref), force=True))


def expand_logs(e: sp.Expr) -> sp.Expr:
    """Expand logs of products/quotients/exponentials (every argument here is positive) and distribute."""
    return sp.expand(sp.expand_log(e, force=True))


def canon(e: sp.Expr, subs: Optional[dict] = None) -> sp.Expr:
    """A cheap canonical form for residuals built from exp/log: expand logs, optionally substitute (e.g.
    r_i = log E_i so that exp(r_i − r_j) becomes the rational E_i/E_j), split exponentials of sums, and cancel
    the resulting rational function. It returns 0 for an identically-zero residual of the kinds used here, and
    is fast on the large non-zero residuals of a wrong claim (where ``sympy.simplify`` can take minutes)."""
    e = sp.expand_log(sp.sympify(e), force=True)
    if subs:
        e = e.subs(subs)
    e = sp.expand(e, power_exp=True)
    return sp.cancel(sp.together(e))


def exp_of_rewards(r: Sequence[sp.Symbol]) -> dict:
    """{r_i: log E_i} with E_i > 0, so that exponentials of reward differences become rational in E."""
    return {ri: sp.log(sp.Symbol(f"E_{ri.name}", positive=True)) for ri in r}


def simplify_all(exprs: Iterable[sp.Expr]) -> List[sp.Expr]:
    return [sp.simplify(e) for e in exprs]


def boltzmann(pi_ref: Sequence[sp.Expr], r: Sequence[sp.Expr], beta: sp.Expr) -> List[sp.Expr]:
    """π_ref·exp(r/β)/Z, Z = Σ π_ref·exp(r/β) (Rafailov et al. DPO Eq. 4; Xu et al. Eq. 5)."""
    w = [p * sp.exp(ri / beta) for p, ri in zip(pi_ref, r)]
    z = sp.Add(*w)
    return [wi / z for wi in w]


def all_zero(residuals) -> bool:
    """True when every residual is the symbolic 0 (after the proof's own simplification)."""
    if isinstance(residuals, sp.Basic):
        residuals = [residuals]
    return all(sp.simplify(e) == 0 for e in residuals)


def witness_points(expr_list: Sequence[sp.Expr], n: int = 3):
    """Deterministic rational substitutions for every free symbol, small enough that simplex entries built as
    1 − Σ stay positive (each value in (0, 1/4))."""
    syms = sorted(set().union(*[sp.sympify(e).free_symbols for e in expr_list]), key=lambda s: s.name)
    points = []
    for t in range(n):
        points.append({s: sp.Rational(7 + 5 * ((i * 3 + t * 7) % 11), 400) for i, s in enumerate(syms)})
    return points


def nonzero_somewhere(residuals) -> bool:
    """True when some residual evaluates to a finite non-zero number at one of the witness points: a proof that
    the residual is *not* identically 0 (so the claim is rejected)."""
    if isinstance(residuals, sp.Basic):
        residuals = [residuals]
    from sympy.core.function import AppliedUndef
    # an undetermined function f(z) (a proof "for every f") is replaced by one generic function
    residuals = [sp.sympify(e).replace(lambda a: isinstance(a, AppliedUndef),
                                       lambda a: sp.exp(a.args[0]) / 3 + a.args[0] ** 3) for e in residuals]
    for point in witness_points(residuals):
        for e in residuals:
            v = complex(sp.N(e.subs(point), 30))
            if v == v and abs(v) != float("inf") and abs(v) > 1e-12:
                return True
    return False
