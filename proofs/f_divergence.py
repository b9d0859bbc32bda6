"""Proof 13: f-DPO — DPO under an f-divergence constraint (Wang et al., "Beyond Reverse KL: Generalizing Direct
Preference Optimization with Diverse Divergence Constraints", arXiv:2309.16240, Thm 1 / Eq. 11; Table 1).

The regularised problem. For a convex f with f(1) = 0 (an f-divergence D_f(π‖π_ref) = E_{π_ref}[f(π/π_ref)]),

    max_π  E_π[r] − β·E_{π_ref}[f(π/π_ref)]      subject to Σ_y π(y) = 1.

Its Lagrangian gradient in π(y) is r(y) − β·f'(π(y)/π_ref(y)) − λ (the derivative of π_ref·f(π/π_ref) in π is
f'(π/π_ref)), so with f' strictly increasing (f strictly convex) the optimum is

    π*(y) = π_ref(y)·(f')⁻¹((r(y) − λ)/β),       λ the normaliser (Σ π* = 1)              (Wang et al. Thm 1)

— reverse KL f(u) = u log u gives (f')⁻¹(z) = e^{z−1}, the Boltzmann π_ref·exp(r/β)/Z of DPO. Inverting it,
r(y) = β·f'(π*(y)/π_ref(y)) + λ; substituted into the Bradley–Terry model λ cancels and the f-DPO loss
(Eq. 11) is the logistic loss of the logit

    x(y_w, y_l) = β·(f'(π(y_w)/π_ref(y_w)) − f'(π(y_l)/π_ref(y_l))).

Divergences (Table 1), f from the table and f' derived here by sympy (:func:`f_prime_matches_generator`):

- Jensen–Shannon: f(u) = u·log u − (u + 1)·log((u + 1)/2), f'(u) = log(2u/(1 + u)) < log 2, so
  (f')⁻¹(z) = e^z/(2 − e^z) for z < log 2;
- α-divergence, α ∈ (0, 1): f(u) = (u^{1−α} − (1 − α)u − α)/(α(α − 1)), f'(u) = (1 − u^{−α})/α < 1/α, so
  (f')⁻¹(z) = (1 − α·z)^{−1/α} for z < 1/α (α → 0 is reverse KL, α → 1 forward KL up to a constant).
  TRL 1.16 (``DPOConfig.f_divergence_type = "alpha_divergence"``, ``f_alpha_divergence_coef`` = α') computes
  f'(t) = (t^{α'−1} − 1)/(α' − 1), which is the paper's f' with α = 1 − α' (its α' → 1 is reverse KL); the
  config's help text calls α' "the α of the u^−α regulariser", which agrees with the code only at the default
  α' = ½. :func:`f_prime_matches_generator` checks TRL's form with α' = 1 − α and rejects it with α' = α.

Coordinates (exact, no numbers substituted; K = 3, symbolic π_ref, β, λ and α > 0). The rewards are written
relative to the claim's λ: JS r(y) = λ + β·log E(y), 0 < E(y) < 2; α r(y) = λ + β·(1 − w(y))/α, w(y) > 0. For
every λ these are bijections onto the rewards at which the claim is defined (z = (r − λ)/β < log 2, resp.
< 1/α), so a residual identically 0 in (π_ref, β, λ, α, E or w) is 0 for every λ and every admissible reward
vector; and every witness point of ``_common.nonzero_somewhere`` (all values in (0, ¼)) lies in that domain, so a
rejected claim is rejected by a real number.

- :func:`f_regularised_optimum_stationary` — the Lagrange condition r(y) − β·f'(π(y)/π_ref(y)) = λ for every y
  at the claim π = π_ref·(f')⁻¹((r − λ)/β), λ free (the gradient of the objective is derived by sympy).
  Returns [g(y) − g(1), y = 2..K] + [g(1) − λ], g(y) the Lagrangian gradient without λ: a claim that ignores λ
  (DPO's Boltzmann, normalised by Z) is rejected by the first K − 1 residuals, i.e. for every λ.
- :func:`f_dpo_stationary` — the population f-DPO loss, Bradley–Terry labels p(y≻y') = σ(r(y) − r(y')) and six
  symbolic ordered-pair weights μ_ij > 0 (as in proof 2): its gradient in the values φ(y) = f'(π(y)/π_ref(y)) —
  dpo.population_gradient with u = φ — vanishes at the same claim for ANY λ: the pair logits are
  β·(φ(y) − φ(y')) = r(y) − r(y'). With φ'(y) = ∂φ(y)/∂π(y) = f''(ρ)/π_ref(y) > 0 (f strictly convex), the
  Lagrange condition on the simplex is ∂L/∂φ(y)·φ'(y) = ν for every y; L depends on φ only through differences,
  so Σ_y ∂L/∂φ(y) = 0 = ν·Σ_y 1/φ'(y), hence ν = 0: a point of the simplex is stationary iff ∂L/∂φ = 0.
  Normalisation only fixes λ: (f')⁻¹ is increasing, so Σ π* is increasing in −λ and one λ gives Σ π* = 1 (not
  checked here).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import sympy as sp

from ._common import K, canon, positive_symbols, sigmoid, witness_points
from .dpo import population_gradient

Claim = Callable[[list, list, sp.Expr, sp.Expr, sp.Expr], List[sp.Expr]]
DIVERGENCES = ("js", "alpha")


def generator(divergence: str, u: sp.Expr, alpha: sp.Expr) -> sp.Expr:
    """f(u) of Wang et al. Table 1 (f(1) = 0, convex)."""
    if divergence == "js":
        return u * sp.log(u) - (u + 1) * sp.log((u + 1) / 2)
    if divergence == "alpha":
        return (u ** (1 - alpha) - (1 - alpha) * u - alpha) / (alpha * (alpha - 1))
    raise ValueError(divergence)


def f_prime(divergence: str, u: sp.Expr, alpha: sp.Expr) -> sp.Expr:
    """The stated closed form of f': JS log(2u/(1 + u)); α (1 − u^{−α})/α."""
    if divergence == "js":
        return sp.log(2 * u / (1 + u))
    if divergence == "alpha":
        return (1 - u ** (-alpha)) / alpha
    raise ValueError(divergence)


def f_prime_inverse(divergence: str, z: sp.Expr, alpha: sp.Expr) -> sp.Expr:
    """(f')⁻¹(z): JS e^z/(2 − e^z) (z < log 2); α (1 − α·z)^{−1/α} (z < 1/α)."""
    if divergence == "js":
        return sp.exp(z) / (2 - sp.exp(z))
    if divergence == "alpha":
        return (1 - alpha * z) ** (-1 / alpha)
    raise ValueError(divergence)


def trl_alpha_f_prime(u: sp.Expr, coef: sp.Expr) -> sp.Expr:
    """TRL 1.16's α-divergence f'(t) = (t^{α'−1} − 1)/(α' − 1), α' = ``f_alpha_divergence_coef``."""
    return (u ** (coef - 1) - 1) / (coef - 1)


def f_optimum(divergence: str) -> Claim:
    """The claim of Wang et al. Thm 1: ``(pi_ref, r, beta, lam, alpha) -> [π_ref·(f')⁻¹((r − λ)/β)]``."""
    def claim(pi_ref, r, beta, lam, alpha):
        return [p * f_prime_inverse(divergence, (ri - lam) / beta, alpha) for p, ri in zip(pi_ref, r)]
    return claim


def _tidy(e: sp.Expr) -> sp.Expr:
    """Cancel and factor every log's argument, then expand the logs (all arguments here are positive)."""
    e = e.replace(lambda a: isinstance(a, sp.log), lambda a: sp.log(sp.factor(sp.cancel(a.args[0]))))
    return sp.expand(sp.expand_log(e, force=True))


def _settle(e: sp.Expr, simplify: Callable = sp.simplify) -> sp.Expr:
    """``simplify(e)`` (0 for an identically-zero residual), unless e is already non-zero at the first witness
    point of ``_common.witness_points`` — then e is returned as it is (a wrong claim's residual can take many
    seconds to simplify, and that value already shows it is not identically 0); as ``token_level._settle``."""
    point = witness_points([e], 1)[0]
    v = complex(sp.N(e.subs(point), 30))
    if v == v and abs(v) != float("inf") and abs(v) > 1e-12:
        return e
    return simplify(e)


def _setup(divergence: str):
    """π_ref, β, λ, α and the rewards in the claim's exact coordinates (see the module docstring)."""
    if divergence not in DIVERGENCES:
        raise ValueError(divergence)
    pi_ref = positive_symbols("pi_ref")
    beta = sp.Symbol("beta", positive=True)
    lam = sp.Symbol("lambda", real=True)
    alpha = sp.Symbol("alpha", positive=True)
    if divergence == "js":
        coords = positive_symbols("E")
        r = [lam + beta * sp.log(c) for c in coords]
    else:
        coords = positive_symbols("w")
        r = [lam + beta * (1 - c) / alpha for c in coords]
    return pi_ref, beta, lam, alpha, r


def f_prime_matches_generator(divergence: str = "js", claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: the closed forms used here follow from Table 1's f: d f/du = f'(u) (the stated form), f(1) = 0,
    and (f')⁻¹(f'(u)) = u. For ``divergence = "alpha"`` also TRL's f' with α' = 1 − α equals the paper's f'.

    ``claim(u, alpha) -> f'(u)`` (default the stated closed form). Returns the simplified residuals
    [f'(u) from sympy − claim, f(1), (f')⁻¹(claim(u)) − u] (+ [TRL's f' at α' = 1 − α − claim] for α)."""
    u = sp.Symbol("u", positive=True)
    alpha = sp.Symbol("alpha", positive=True)
    fp = (claim or (lambda u, a: f_prime(divergence, u, a)))(u, alpha)
    f = generator(divergence, u, alpha)
    res = [sp.simplify(_tidy(sp.diff(f, u) - fp)), sp.simplify(f.subs(u, 1)),
           sp.simplify(_tidy(f_prime_inverse(divergence, fp, alpha)) - u)]
    if divergence == "alpha":
        res.append(sp.simplify(trl_alpha_f_prime(u, 1 - alpha) - fp))
    return res


def f_regularised_optimum_stationary(divergence: str = "js", claim: Optional[Claim] = None) -> List[sp.Expr]:
    """Claim (Wang et al. Thm 1): max_π E_π[r] − β·E_{π_ref}[f(π/π_ref)] on the simplex is stationary at
    π = π_ref·(f')⁻¹((r − λ)/β), i.e. r(y) − β·f'(π(y)/π_ref(y)) = λ for every y.

    ``claim(pi_ref, r, beta, lam, alpha) -> [π(y)]`` (default :func:`f_optimum`). Returns [g(y) − g(1),
    y = 2..K] + [g(1) − λ] with g(y) = ∂/∂π(y) of the objective (sympy's derivative of the f from Table 1)."""
    pi_ref, beta, lam, alpha, r = _setup(divergence)
    pi = (claim or f_optimum(divergence))(pi_ref, r, beta, lam, alpha)
    q = positive_symbols("q")
    J = sp.Add(*[q[y] * r[y] - beta * pi_ref[y] * generator(divergence, q[y] / pi_ref[y], alpha) for y in range(K)])
    at = dict(zip(q, pi))
    g = [_tidy(sp.diff(J, q[y]).subs(at)) for y in range(K)]
    res = [g[y] - g[0] for y in range(1, K)] + [g[0] - lam]
    return [_settle(e) for e in res]


def f_dpo_stationary(divergence: str = "js", claim: Optional[Claim] = None) -> List[sp.Expr]:
    """Claim (Wang et al. Eq. 11 with Thm 1): the population f-DPO loss Σ_{i≠j} μ_ij·[p_ij·ℓ(x_ij) +
    (1 − p_ij)·ℓ(−x_ij)], x_ij = β·(f'(ρ_i) − f'(ρ_j)), ρ = π/π_ref, Bradley–Terry p_ij = σ(r_i − r_j), is
    stationary at π = π_ref·(f')⁻¹((r − λ)/β) for every λ.

    ``claim(pi_ref, r, beta, lam, alpha) -> [π(y)]``. Returns ∂L/∂φ(y), y = 1..K, at φ = f'(claim/π_ref)
    (``_common.canon``): all 0 iff the claim is stationary (∂φ/∂π > 0, see the module docstring)."""
    pi_ref, beta, lam, alpha, r = _setup(divergence)
    pi = (claim or f_optimum(divergence))(pi_ref, r, beta, lam, alpha)
    phi = [_tidy(f_prime(divergence, pi[y] / pi_ref[y], alpha)) for y in range(K)]
    mu = {(i, j): sp.Symbol(f"mu{i + 1}{j + 1}", positive=True) for i in range(K) for j in range(K) if i != j}
    pref = {(i, j): sigmoid(r[i] - r[j]) for i in range(K) for j in range(K) if i != j}
    return [_settle(g, canon) for g in population_gradient(phi, pref, mu, beta)]
