"""Target distribution: what training must converge to, declared and derived.

Declared kinds (the ``[target]`` table; ``beta`` is the one temperature every component reads):

- ``boltzmann`` — π*(y|x) = π_ref(y|x)·exp(r(x,y)/β)/Z(x), the optimum of E_π[r] − β·KL(π‖π_ref)
  (Rafailov et al. 2023 Eq. 4; Xu et al. 2404.10719 Eq. 5).
- ``psi`` with ψ = identity — π*(y) ∝ π_ref(y)·exp(p(y≻μ)/β), p(y≻μ) = E_{y'∼μ} p(y≻y') (Azar et al.
  2310.12036, Eqs. 7–13; IPO). Depends on the pair distribution μ.
- ``forward_kl`` — π*(y) = β·π_ref(y)/(λ − r(y)), λ > max r normalising: the optimum of
  E_π[r] − β·KL(π_ref‖π) (f-DPO with f'(u) = −1/u, Wang et al. 2309.16240).
- ``argmax`` — no regularisation: all mass on argmax_y r(x, y).
- ``margin`` — no unique optimum (hinge): every covered pair reaches the margin h ≥ 1/β.

The *derived* target is computed from all four components, never from the algorithm's name. Where it differs
from the declared kind (GRPO's k3-in-loss with std-normalised advantages; k1 differentiated in the loss;
label smoothing; a reference reset every round), :func:`derive` says so in ``note``.

Solvers used here are independent of the loss code: closed forms, Newton's method on the population
pairwise objective written with analytic derivatives, and scalar root finding (scipy's ``brentq``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from scipy.optimize import brentq
from torch import Tensor

from ..errors import TargetError
from . import KindSpec, Param, nonneg, positive, unit_open
from .reward import LINK_TABLE
from .source import pair_labels

KINDS: Dict[str, KindSpec] = {
    "boltzmann": KindSpec("boltzmann", "π_ref·exp(r/β)/Z (reverse-KL regularised)", (
        Param("beta", float, doc="temperature β > 0", check=positive),)),
    "psi": KindSpec("psi", "π_ref·exp(E_μ ψ(p(y≻y'))/β)/Z (ΨPO; ψ = identity is IPO)", (
        Param("beta", float, doc="temperature β (= IPO's τ) > 0", check=positive),
        Param("psi", str, "identity", "the map ψ of preference probabilities", choices=("identity",)))),
    "forward_kl": KindSpec("forward_kl", "β·π_ref/(λ − r) (forward-KL regularised)", (
        Param("beta", float, doc="temperature β > 0", check=positive),)),
    "js_divergence": KindSpec("js_divergence", "π_ref·(f')⁻¹((r − λ)/β), f' of Jensen–Shannon (f-DPO)", (
        Param("beta", float, doc="temperature β > 0", check=positive),)),
    "alpha_divergence": KindSpec("alpha_divergence", "π_ref·(1 − α(r − λ)/β)^(−1/α) (α-divergence, f-DPO)", (
        Param("beta", float, doc="temperature β > 0", check=positive),
        Param("alpha", float, 0.5, "α of the α-divergence, in (0, 1) (→ 0: reverse KL, → 1: forward KL; "
              "Wang et al. 2309.16240 Table 1)", check=unit_open))),
    "odds_ratio": KindSpec("odds_ratio", "the ORPO optimum: chosen NLL + λ·odds-ratio preference term (numerical)", (
        Param("beta", float, 1.0, "scale β of the log-odds difference inside the link (ORPO: 1)", check=positive),)),
    "noise_contrastive": KindSpec("noise_contrastive", "the NCA optimum: per-response logistic terms on β·u (numerical)", (
        Param("beta", float, doc="temperature β > 0", check=positive),)),
    "best_of_n": KindSpec("best_of_n", "the best-of-n distribution of the sampler, F(r)^n − F⁻(r)^n (RAFT, one round)", (
        Param("beta", float, 0.0, "unused: no KL term (kept so every target has a β)", check=nonneg),)),
    "argmax": KindSpec("argmax", "all mass on argmax r (unregularised)", (
        Param("beta", float, 0.0, "KL coefficient, if a reference term uses one", check=nonneg),)),
    "margin": KindSpec("margin", "every covered pair at margin h ≥ 1/β (hinge: no unique optimum)", (
        Param("beta", float, doc="β > 0; the margin is 1/β in log-ratio units", check=positive),)),
}

#: declared target kind -> the preference links consistent with it (the first is derived when omitted)
TARGET_LINKS = {
    "boltzmann": ("logsigmoid", "smoothed_logsigmoid", "robust"),
    "psi": ("squared",),
    "forward_kl": ("forward_kl",),
    "js_divergence": ("js_divergence",),
    "alpha_divergence": ("alpha_divergence",),
    "odds_ratio": ("odds_ratio",),
    "noise_contrastive": (),
    "best_of_n": (),
    "margin": ("hinge",),
    "argmax": (),
}
#: declared target kinds valid for each non-preference reward kind
TARGET_FOR_REWARD = {
    "explicit": ("boltzmann", "forward_kl", "argmax"),
    "reward_regression": ("boltzmann",),
    "reward_difference": ("boltzmann",),
    "noise_contrastive": ("noise_contrastive",),
    "max_likelihood": ("best_of_n",),
}


@dataclass(frozen=True)
class DerivedTarget:
    """The target a composition actually converges to.

    Attributes:
        kind: ``boltzmann``, ``psi``, ``forward_kl``, ``argmax``, ``margin``, ``hinge_lp`` (the optimal face of the
            population hinge objective's linear program: stochastic labels), ``reference_free`` (a
            Boltzmann target with a uniform reference: no π_ref in the loss) or ``iterated`` (reference reset).
        formula: the target written out.
        note: why it differs from the declared kind, or ``None``.
        solve: ``bandit -> (P, K) float64 tensor`` (``None`` for ``margin``).
    """

    kind: str
    formula: str
    note: Optional[str]
    solve: Optional[Callable[[object], Tensor]]


# ------------------------------------------------------------------------------------------- solvers
def _normalise(logits: Tensor) -> Tensor:
    return torch.softmax(logits, dim=-1)


def boltzmann(ref: Tensor, v: Tensor) -> Tensor:
    """π ∝ π_ref·exp(v) per prompt. ref, v: ``(P, K)``; returns ``(P, K)`` float64."""
    return _normalise(torch.log(ref) + v)


def inverse_family(ref: Tensor, v: Tensor) -> Tensor:
    """π = π_ref/(λ − v), λ > max v chosen per prompt so that Σπ = 1 (forward-KL optimum with v = r/β)."""
    out = torch.empty_like(ref)
    for p in range(ref.shape[0]):
        vp, rp = v[p].double(), ref[p].double()
        top = float(vp[rp > 0].max())  # responses outside π_ref's support get π = 0 whatever v is

        def excess(lam: float) -> float:
            return float((rp / (lam - vp)).sum()) - 1.0
        hi = top + 1.0  # every term ≤ π_ref there, so Σ ≤ 1; Σ → ∞ as λ → max v
        gap = 1.0
        while excess(top + gap) < 0 and gap > 1e-300:
            gap *= 1e-3
        lam = brentq(excess, top + gap, hi, xtol=1e-300, rtol=1e-15, maxiter=1000)
        out[p] = rp / (lam - vp)
    return out / out.sum(-1, keepdim=True)


def f_family(ref: Tensor, v: Tensor, link, alpha: Optional[float] = None) -> Tensor:
    """π = π_ref·exp(g⁻¹(v + c)) per prompt, c chosen so that Σπ = 1: the f-DPO target (Wang et al. 2309.16240,
    Thm 1: f'(π/π_ref) = (r − λ)/β with g = f' written in u = log π/π_ref and v = r̂/β the pairwise fit).

    ref, v: ``(P, K)``; link: a :class:`udrra.components.reward.Link` with ``inverse`` and ``sup``. Σπ is increasing
    in c, → 0 as c → −∞ and → ∞ as c → sup g − max v, so one root (scipy ``brentq``). Returns ``(P, K)`` float64.
    """
    import numpy as np
    top = link.sup(alpha)
    out = torch.empty_like(ref, dtype=torch.float64)
    for p in range(ref.shape[0]):
        rp, vp = ref[p].double().numpy(), v[p].double().numpy()
        supp = rp > 0
        vmax = float(vp[supp].max())

        def log_mass(c: float) -> float:
            z = np.log(rp[supp]) + link.inverse(vp[supp] + c, alpha)
            m = z.max()
            return float(m + np.log(np.exp(z - m).sum()))
        hi = top - vmax
        if not np.isfinite(hi):
            hi = 1.0
            while log_mass(hi) < 0:
                hi *= 2.0
        else:
            gap = 1.0
            while log_mass(hi - gap) < 0 and gap > 1e-300:
                gap *= 1e-3
            hi = hi - gap
        lo = hi - 1.0
        while log_mass(lo) > 0:
            lo = hi - 2.0 * (hi - lo)
        c = brentq(log_mass, lo, hi, xtol=1e-300, rtol=1e-15, maxiter=1000)
        row = np.zeros_like(rp)
        row[supp] = np.exp(np.log(rp[supp]) + link.inverse(vp[supp] + c, alpha))
        out[p] = torch.as_tensor(row / row.sum())
    return out


def argmax_policy(r: Tensor) -> Tensor:
    """One-hot at argmax_y r(x, y). r: ``(P, K)``."""
    return torch.nn.functional.one_hot(r.argmax(-1), r.shape[-1]).double()


def _check_connected(W: Tensor, p: int, what: str) -> None:
    """All K responses reachable from response 0 along edges with W[i, j] > 0 (and, for directed, back)."""
    K = W.shape[0]
    for direction in (W, W.T):
        seen = {0}
        stack = [0]
        while stack:
            i = stack.pop()
            for j in range(K):
                if direction[i, j] > 0 and j not in seen:
                    seen.add(j)
                    stack.append(j)
        if len(seen) < K:
            missing = sorted(set(range(K)) - seen)
            raise TargetError(f"prompt {p}: {what} (responses {missing}); the target is not identified "
                              "(Xu et al. 2404.10719 Thm 4.1; Azar et al. App. A.2)")


def pairwise_fit(M: Tensor, Q: Tensor, *, beta: float, gamma: float, loss: str) -> Tensor:
    """Minimise the population pairwise objective over v ∈ R^K for each prompt, by Newton's method.

    F(v) = Σ_ij M_ij [Q_ij·ℓ(β(v_i − v_j) − γ) + (1 − Q_ij)·ℓ(β(v_j − v_i) − γ)] with
    ℓ(x) = −log σ(x) (``loss="logistic"``: the Bradley–Terry MLE, DPO/cDPO/rDPO/f-DPO/SimPO) or
    ℓ(x) = ((x − ½)/β)² (``loss="squared"``: IPO's least squares, Azar et al. Eq. 13).

    Args:
        M: ``(P, K, K)`` pair weights (0 = pair never seen). Q: ``(P, K, K)`` P(i ≻ j) in [0, 1].
    Returns:
        ``(P, K)`` float64 minimiser (defined up to a constant per prompt; first entry 0).
    Raises:
        TargetError: labels outside [0, 1]; a response in no pair; for the logistic loss, a comparison
            graph that is not strongly connected (some set of responses never loses: the margin grows without
            bound, Azar et al. §4.2).
    """
    M, Q = M.double(), Q.double()
    P, K, _ = M.shape
    if bool(((Q < -1e-12) | (Q > 1 + 1e-12))[M > 0].any()):
        raise TargetError("effective preference labels fall outside [0, 1] (robust link with epsilon larger "
                          "than the data's flip rate?): the loss is unbounded below, no target exists")
    Q = Q.clamp(0.0, 1.0)
    v = torch.zeros(P, K, dtype=torch.float64)
    for p in range(P):
        m, q = M[p], Q[p]
        _check_connected(m + m.T, p, "some responses appear in no pair")
        if loss == "logistic":
            beats = m * q + (m * (1 - q)).T
            _check_connected(beats, p, "some responses never win (or never lose) a comparison: deterministic labels")
        v[p] = _newton(m, q, beta, gamma, loss)
    return v


def _pair_terms(vp: Tensor, m: Tensor, q: Tensor, beta: float, gamma: float, loss: str):
    d = vp[:, None] - vp[None, :]
    xp, xn = beta * d - gamma, -beta * d - gamma
    if loss == "logistic":
        f = q * torch.nn.functional.softplus(-xp) + (1 - q) * torch.nn.functional.softplus(-xn)
        c = -q * torch.sigmoid(-xp) + (1 - q) * torch.sigmoid(-xn)       # dF/d(d) / β
        a = q * torch.sigmoid(xp) * torch.sigmoid(-xp) + (1 - q) * torch.sigmoid(xn) * torch.sigmoid(-xn)
    else:
        f = q * ((xp - 0.5) / beta) ** 2 + (1 - q) * ((xn - 0.5) / beta) ** 2
        c = (q * 2 * (xp - 0.5) - (1 - q) * 2 * (xn - 0.5)) / beta ** 2
        a = torch.full_like(d, 2.0 / beta ** 2)
    return float((m * f).sum()), m * c * beta, m * a * beta ** 2


def _newton(m: Tensor, q: Tensor, beta: float, gamma: float, loss: str) -> Tensor:
    K = m.shape[0]
    vp = torch.zeros(K, dtype=torch.float64)
    for _ in range(200):
        f, c, a = _pair_terms(vp, m, q, beta, gamma, loss)
        g = c.sum(1) - c.sum(0)
        H = -(a + a.T)
        H.diagonal().copy_((a + a.T).sum(1))
        if float(g.abs().max()) < 1e-13:
            break
        step = torch.zeros(K, dtype=torch.float64)
        step[1:] = torch.linalg.solve(H[1:, 1:], -g[1:])
        t = 1.0
        while t > 1e-12:
            if _pair_terms(vp + t * step, m, q, beta, gamma, loss)[0] <= f + 1e-4 * t * float(g @ step):
                break
            t *= 0.5
        vp = vp + t * step
        if float((t * step).abs().max()) < 1e-15:
            break
    return vp


def _scale_fixed_point(r: Tensor, v_of_scale: Callable[[float], Tensor], pooled: bool) -> Tensor:
    """Solve s = std_π(r) where π = π(s) (std-normalised advantages rescale the temperature to β·s).

    ``pooled``: one s over all prompts (batch_norm); otherwise one per prompt (group_norm).
    Returns the per-prompt scales ``(P,)``.
    """
    P = r.shape[0]

    def std(pi: Tensor, rows) -> float:
        pr, rr = pi[rows], r[rows]
        m = (pr * rr).sum() / len(rows)
        return float(((pr * (rr - m) ** 2).sum() / len(rows)).sqrt())

    def solve(rows) -> float:
        def h(log_s: float) -> float:
            s = float(torch.exp(torch.tensor(log_s)))
            pi = v_of_scale(s)
            return std(pi, rows) / s - 1.0
        lo, hi = -30.0, 30.0
        if h(hi) > 0 or h(lo) < 0:
            raise TargetError("no std-normalised fixed point found (rewards constant under π_ref?)")
        return float(torch.exp(torch.tensor(brentq(h, lo, hi, xtol=1e-14, maxiter=500))))

    if pooled:
        return torch.full((P,), solve(list(range(P))), dtype=torch.float64)
    return torch.tensor([solve([p]) for p in range(P)], dtype=torch.float64)


# ----------------------------------------------------------------------------------------- derivation
def derive(components) -> DerivedTarget:
    """The target that the composition converges to on a bandit (exact population gradients).

    Args:
        components: :class:`udrra.components.Components` (validated).
    Returns:
        :class:`DerivedTarget`.
    """
    t, s, rw, ref = components
    beta = float(t["beta"])
    declared = t.kind
    base = _derive_frozen(t, s, rw, ref, beta)
    update = ref.get("update", "frozen")
    if update == "reset_every" and base.solve is not None:
        return derive_iterated(base, int(ref.get("rounds") or 1), lambda bandit, pi: bandit.with_reference(pi))
    if update == "ema":
        return _derive_ema(base)
    if base.kind != declared and base.note is None:
        base = DerivedTarget(base.kind, base.formula, f"declared '{declared}' but the components give '{base.kind}'",
                             base.solve)
    return base


def derive_iterated(base: DerivedTarget, k: int, with_reference: Callable[[object, Tensor], object]
                    ) -> DerivedTarget:
    """A reference reset after each of ``k`` converged rounds: the frozen-reference target applied k times.

    ``with_reference(world, pi)`` is the testbed with π as its reference (``Bandit.with_reference``, or the
    sequence testbed's ``with_reference_sequence``)."""
    def solve_iter(world, inner=base.solve):
        pi = None
        for _ in range(k):
            pi = inner(world if pi is None else with_reference(world, pi))
        return pi
    note = (f"the reference is reset to the policy after each round; after k = {k} converged rounds the "
            f"policy is the frozen-reference target applied {k} times, e.g. π_k ∝ π_0·exp(k·r/β) for a "
            "Boltzmann base (temperature β/k): it drifts toward argmax r as k grows (Xu et al. §4.3 DPO-Iter)")
    return DerivedTarget("iterated", f"T^{k}(π_0), T = [{base.formula}]", note, solve_iter)


def _derive_ema(base: DerivedTarget, pi_ref_of: Callable[[object], Tensor] = lambda b: b.pi_ref
                ) -> DerivedTarget:
    """An EMA reference follows the policy. With a frozen reference the composition reaches π* with a log-ratio
    v = log π*/π_ref; tracking the policy, each round multiplies the policy by e^{v} again (π_k ∝ π_0·e^{k·v}), so
    the limit puts all mass on argmax_y v(x, y) within π_0's support — argmax r for the KL-regularised
    compositions, argmax of the fitted preference score for IPO-type links (Xu et al. 2404.10719 §5, Ref-EMA).
    ``pi_ref_of(world)`` gives the reference over the world's responses (whole responses on the sequence testbed).
    """
    if base.solve is None:
        def none(bandit):
            raise TargetError(f"an EMA reference with target '{base.formula}': the frozen-reference target is a set, "
                              "not one distribution, so the limit the EMA drifts to depends on the path; udrra "
                              "claims no target here")
        return DerivedTarget("argmax", "argmax_y v(x, y) of the frozen target (none: that target is a set)",
                             "EMA reference over a set-valued target: no unique limit", none)

    def solve(world, inner=base.solve):
        pi, ref = inner(world), pi_ref_of(world)
        v = torch.log(pi.clamp_min(1e-300)) - torch.log(ref.clamp_min(1e-300))
        v = torch.where(ref > 0, v, torch.full_like(v, -float("inf")))
        return argmax_policy(v)
    return DerivedTarget("argmax", "argmax_y v(x, y), v = log π*/π_ref of the frozen-reference target π*",
                         "an EMA reference follows the policy: with a frozen reference the composition reaches π* = "
                         "π_ref·e^{v}, and each time π_ref catches up the policy is multiplied by e^{v} again "
                         f"(π_k ∝ π_0·e^{{k·v}}), so it drifts to argmax v — here π* = {base.formula}; for a "
                         "Boltzmann π* that is argmax r", solve)


def _solve_argmax(bandit) -> Tensor:
    return argmax_policy(bandit.reward_matrix())


# ------------------------------------------------------------------------------------------- finite groups
# Group baselines with groups of n samples. The exact population loss weights each response y by π(y) and gives it
# the advantage ā(y) = E_{y_2..y_n ∼ π}[A(y; {y, y_2, ..., y_n})], the sampled advantage averaged over the other
# n − 1 draws of its group (udrra.components.reward.advantages with group_size). Its stationarity condition in the
# logits θ (gradient of −Σ_y π(y)·ā(y)·log π(y), ā and the weights held fixed, plus the KL term):
#   k3 in the loss:  −π(y)·(ā(y) − Ā) + β·(π(y) − π_ref(y)) = 0   ⇒  π(y) = β·π_ref(y)/(β + Ā − ā(y)), Ā = E_π ā
#   k2 in the loss (or the per-token KL in the return, kl_return = "token"):
#                    −π(y)·(ā(y) − Ā) + β·π(y)·(u(y) − E_π u) = 0   ⇒  π ∝ π_ref·exp(ā/β)
# ā depends on π, so both are fixed points; here ā is computed from the multisets of the other n − 1 draws written
# out explicitly (numpy, the sample std with ddof = 1), independently of the loss code's sufficient statistics.
_FINITE_BASELINES = ("leave_one_out", "group_mean", "group_norm")


def _group_size(s) -> Optional[int]:
    """The group size n of an ``on_policy`` source; ``None`` (n → ∞) for other sources or when unset."""
    n = s.get("n") if s.kind == "on_policy" else None
    return None if n is None else int(n)


def limit_target(components) -> DerivedTarget:
    """The derived target with the group size taken to infinity (n → ∞): group statistics are exact expectations
    under π. Equal to :func:`derive` for compositions whose target does not depend on n."""
    from dataclasses import replace
    src = components.source
    if src.get("n") is None:
        return derive(components)
    return derive(replace(components, source=replace(src, params={**dict(src.params), "n": None})))


def _max_feasible_k(n: int) -> int:
    """The most responses K for which the n − 1 other draws have at most FINITE_GROUP_LIMIT multisets."""
    from .reward import finite_group_feasible
    lo, hi = 1, 2
    while finite_group_feasible(n, hi):  # C(n − 2 + k, k − 1) grows with k: bracket, then bisect
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if finite_group_feasible(n, mid) else (lo, mid)
    return lo


def _fallback_text(n: int) -> str:
    from .reward import FINITE_GROUP_LIMIT
    k_max = _max_feasible_k(n)
    return (f"ā is exact: the C(n + K − 2, K − 1) multisets of the other n − 1 = {n - 1} draws are enumerated, "
            f"which stays within {FINITE_GROUP_LIMIT} for K ≤ {k_max} responses; with more responses the exact "
            "population loss and this target both fall back to n → ∞ (the population loss warns)")


def _other_draws(n: int, K: int):
    """The multisets of n − 1 draws over K responses: ``(idx (M, n−1), counts (M, K), log multinomial coef (M,))``."""
    import numpy as np
    from itertools import combinations_with_replacement
    from scipy.special import gammaln
    key = (n, K)
    hit = _DRAWS_CACHE.get(key)
    if hit is None:
        idx = np.array(list(combinations_with_replacement(range(K), n - 1)), dtype=np.int64).reshape(-1, n - 1)
        counts = np.stack([(idx == j).sum(1) for j in range(K)], 1).astype(np.float64)
        logcoef = gammaln(n) - gammaln(counts + 1.0).sum(1)
        hit = (idx, counts, logcoef)
        if len(_DRAWS_CACHE) > 8:
            _DRAWS_CACHE.clear()
        _DRAWS_CACHE[key] = hit
    return hit


_DRAWS_CACHE: Dict[tuple, tuple] = {}


def _draw_advantages(r, n: int, eps: float):
    """A(y; {y} ∪ c) = (r(y) − mean)/(std + eps) for every multiset c of the other draws: ``(M, K)`` numpy."""
    import numpy as np
    idx, _, _ = _other_draws(n, len(r))
    others = r[idx]
    table = np.empty((idx.shape[0], len(r)))
    for y in range(len(r)):
        group = np.concatenate([np.full((idx.shape[0], 1), r[y]), others], 1)
        table[:, y] = (r[y] - group.mean(1)) / (group.std(1, ddof=1) + eps)
    return table


def _finite_group_policy(ref, r, start, n: int, beta: float, eps: float, family: str) -> Tensor:
    """Solve the finite-n stationarity condition on one prompt (see the comment above), from ``start``.

    ref, r, start: ``(K,)``. family: ``"k3"`` (π(y)·(β + Ā − ā(y)) = β·π_ref(y)) or ``"k2"`` (π ∝ π_ref·exp(ā/β)).
    Unknowns: the logits u of π on π_ref's support with u_0 = 0 (K' − 1 of them); scipy's ``hybr`` (Powell's
    hybrid method), then a damped fixed-point iteration if that does not reach a residual below 1e-12.
    """
    import numpy as np
    from scipy.optimize import root
    ref, r, start = (np.asarray(x.detach().double().cpu() if isinstance(x, Tensor) else x, dtype=np.float64)
                     for x in (ref, r, start))
    supp = ref > 0
    out = np.zeros_like(ref)
    rs, fs = r[supp], ref[supp] / ref[supp].sum()
    Ks = len(rs)
    if Ks == 1:
        out[supp] = 1.0
        return torch.as_tensor(out)
    _, counts, logcoef = _other_draws(n, Ks)
    table = _draw_advantages(rs, n, eps)

    def log_policy(x):
        u = np.concatenate([[0.0], x])
        u = u - u.max()
        return u - np.log(np.exp(u).sum())

    def policy(x):
        return np.exp(log_policy(x))

    def abar(p, logp=None):
        logp = np.log(np.clip(p, 1e-300, None)) if logp is None else logp
        return np.exp(logcoef + counts @ logp) @ table

    def residual(x):
        logp = log_policy(x)
        p = np.exp(logp)
        a = abar(p, logp)
        if family == "k3":
            return (p * (beta + p @ a - a) - beta * fs)[1:]
        return x - (np.log(fs[1:]) - np.log(fs[0])) - (a[1:] - a[0]) / beta

    def step(p):  # one fixed-point map T(π) (used when hybr fails)
        a = abar(p)
        if family == "k3":
            q = inverse_family(torch.as_tensor(fs)[None], torch.as_tensor(a / beta)[None])[0].numpy()
        else:
            q = np.exp(np.log(fs) + a / beta - (a / beta).max())
            q = q / q.sum()
        return q

    s0 = np.clip(start[supp], 1e-300, None)
    x0 = np.log(s0[1:]) - np.log(s0[0])
    sol = root(residual, x0, method="hybr", options={"xtol": 1e-15, "maxfev": 20000})
    x = sol.x
    if not np.all(np.isfinite(x)) or np.abs(residual(x)).max() > 1e-12:
        p = s0 / s0.sum()
        for _ in range(20000):
            q = step(p)
            if np.abs(q - p).max() < 1e-14:
                break
            p = 0.5 * p + 0.5 * q
        p = np.clip(p, 1e-300, None)
        sol = root(residual, np.log(p[1:]) - np.log(p[0]), method="hybr", options={"xtol": 1e-15, "maxfev": 20000})
        x = sol.x
        if not np.all(np.isfinite(x)) or np.abs(residual(x)).max() > 1e-12:
            raise TargetError(f"no finite-group fixed point found at group size n = {n} (residual "
                              f"{np.abs(residual(x)).max():.2e})")
    p = policy(x)
    a = abar(p, log_policy(x))
    if family == "k3" and np.any(beta + p @ a - a <= 0):
        raise TargetError(f"the finite-group fixed point at n = {n} is not a distribution (β + Ā − ā(y) ≤ 0)")
    out[supp] = p
    return torch.as_tensor(out)


def _finite_group_solver(limit_solve, n: int, beta: float, eps: float, family: str):
    """Per-bandit solver of the finite-n group_norm target, starting from the n → ∞ one; falls back to it (as the
    population loss does) when the multisets of the other n − 1 draws exceed the enumeration limit."""
    def solve(b):
        from .reward import finite_group_feasible
        r = b.reward_matrix()
        P, K = r.shape
        if not finite_group_feasible(n, K):
            return limit_solve(b)
        out = torch.empty_like(r, dtype=torch.float64)
        for p in range(P):
            sub = b.subset([p])
            try:
                start = limit_solve(sub)[0]
            except TargetError:  # e.g. constant rewards: no std-normalised n → ∞ fixed point; start at π_ref
                start = sub.pi_ref[0]
            out[p] = _finite_group_policy(sub.pi_ref[0], sub.reward_matrix()[0], start, n, beta, eps, family)
        return out
    return solve


def _derive_frozen(t, s, rw, ref, beta: float) -> DerivedTarget:
    declared = t.kind
    if rw.kind == "preference":
        return _derive_preference(t, s, rw, ref, beta)
    if rw.kind == "noise_contrastive":
        return _derive_nca(s, rw, beta)
    if rw.kind == "max_likelihood":
        return _derive_best_of_n(s)
    if rw.kind in ("reward_regression", "reward_difference"):
        return DerivedTarget("boltzmann", "π_ref·exp(r/β)/Z", None,
                             lambda b: boltzmann(b.pi_ref, b.reward_matrix() / beta))
    # explicit reward: the reference term decides the regulariser
    baseline = rw["baseline"]
    normalised = baseline in ("group_norm", "batch_norm")
    # groups of n samples (exact mode takes the expectation over the other n − 1 draws); None = n → ∞.
    # leave_one_out is unbiased (ā = R − E_π R for every n) and batch_norm is over the whole (large) batch.
    n = _group_size(s) if baseline in ("group_mean", "group_norm") else None
    at_n = f"group size n = {n}" if n is not None else ""
    token_kl = ref.kind == "kl_in_reward" and ref.get("kl_return") == "token"
    if ref.kind == "kl_in_reward" and not token_kl:
        # the KL sits inside R, so normalising R rescales reward and KL together: same target (Xu et al. §5).
        # Finite groups: ā(y) = E over the other draws of A(R(y), others) is strictly increasing in R(y) (the other
        # draws do not depend on y), so ā(y) = const, the stationarity condition, forces R = r − β·log π/π_ref
        # constant: π_ref·exp(r/β)/Z for every n.
        note = None
        if n is not None:
            note = (f"at {at_n} the population advantage is the expectation over the other n − 1 draws, ā(y) = "
                    f"E[A(R(y), R(y_2), ..., R(y_n))], a strictly increasing function of R(y) = r(y) − β·log π(y)/"
                    "π_ref(y) alone; stationarity needs ā constant, i.e. R constant: the same target "
                    "π_ref·exp(r/β)/Z for every n")
        return DerivedTarget("boltzmann", "π_ref·exp(r/β)/Z", note,
                             lambda b: boltzmann(b.pi_ref, b.reward_matrix() / beta))
    est = ref.get("estimator") if ref.kind == "kl_in_loss" else ("k2" if token_kl else None)
    if ref.kind == "none" or est == "k1" or beta == 0:
        why = ("k1 differentiated in the loss has zero expected gradient (E_π[∇log π] = 0): no regularisation"
               if est == "k1" else "no KL term: nothing regularises the policy")
        return DerivedTarget("argmax", "argmax_y r(x, y)", None if declared == "argmax" else why, _solve_argmax)
    family = boltzmann if est == "k2" else inverse_family
    kind = "boltzmann" if est == "k2" else "forward_kl"
    reg = ("the per-token KL added to each token's return (kl_return = 'token') has the gradient of k2 in the "
           "loss, ∇KL(π‖π_ref)" if token_kl else "k2 differentiated in the loss gives ∇KL(π‖π_ref)")
    if not normalised:
        if baseline == "group_mean" and n is not None:
            bp = beta * n / (n - 1)
            why = (f"at {at_n} the Dr. GRPO advantage averaged over the other n − 1 draws is exactly "
                   "ā(y) = (n − 1)/n·(r(y) − E_π r) (the row's own reward is in the group mean), so the reward is "
                   f"scaled by (n − 1)/n: the n → ∞ target with β' = β·n/(n − 1) = {bp:.6g}")
            if est == "k2":
                return DerivedTarget(kind, f"π_ref·exp(r/β')/Z, β' = β·n/(n − 1) = {bp:.6g} (group size n = {n})",
                                     f"{reg}: reverse-KL (Boltzmann) target; {why}",
                                     lambda b: family(b.pi_ref, b.reward_matrix() / bp))
            return DerivedTarget(kind, f"β'·π_ref/(λ − r), λ normalising, β' = β·n/(n − 1) = {bp:.6g} "
                                       f"(group size n = {n})",
                                 "k3 differentiated in the loss gives ∇KL(π_ref‖π) (forward KL, Tang & Munos "
                                 f"2506.09477): the fixed point is β'·π_ref/(λ − r); {why}",
                                 lambda b: family(b.pi_ref, b.reward_matrix() / bp))
        if est == "k2":
            return DerivedTarget(kind, "π_ref·exp(r/β)/Z",
                                 None if declared == kind else f"{reg}: reverse-KL (Boltzmann) target",
                                 lambda b: family(b.pi_ref, b.reward_matrix() / beta))
        return DerivedTarget(kind, "β·π_ref/(λ − r), λ normalising",
                             None if declared == kind else
                             "k3 differentiated in the loss gives ∇KL(π_ref‖π) (forward KL, Tang & Munos "
                             "2506.09477): the fixed point is β·π_ref/(λ − r), not π_ref·exp(r/β)/Z",
                             lambda b: family(b.pi_ref, b.reward_matrix() / beta))
    pooled = baseline == "batch_norm"
    where = "over the batch" if pooled else "within each group"

    def solve(b, family=family, pooled=pooled):
        r = b.reward_matrix()

        def pi_of(sc: float) -> Tensor:
            return family(b.pi_ref, r / (beta * sc))
        if pooled:
            sc = _scale_fixed_point(r, pi_of, True)
            return pi_of(float(sc[0]))
        out = torch.empty_like(r)
        for p in range(r.shape[0]):
            sub = b.subset([p])
            rp = sub.reward_matrix()
            scp = _scale_fixed_point(rp, lambda sc: family(sub.pi_ref, rp / (beta * sc)), False)
            out[p] = family(sub.pi_ref, rp / (beta * float(scp[0])))[0]
        return out
    abar = ("ā(y) = E_{y_2..y_n ∼ π}[(r(y) − mean)/(std + eps)] over the group {y, y_2, ..., y_n} (unbiased std)")
    if est == "k2":
        formula = "π_ref·exp((r − r̄)/(β·σ_π))/Z, σ_π = std of r under π (fixed point)"
        note = (f"advantages divided by the reward std {where} while the KL term is not: the temperature "
                "becomes β·σ_π" + (f" ({reg})" if token_kl else ""))
        if n is not None:
            formula = (f"π_ref·exp(ā(y)/β)/Z, {abar}: fixed point at group size n = {n} (expectation over the "
                       f"other n − 1 draws); as n → ∞ it tends to {formula}")
            note += (f"; at {at_n} the population advantage is the expectation of the sampled one over the other "
                     "n − 1 draws, ā(y), not (r − r̄_π)/σ_π (a small group's std is biased and holds the row's own "
                     "reward): stationarity gives ā(y) − β·log π(y)/π_ref(y) = const, a fixed point in π; "
                     f"{_fallback_text(n)}")
    else:
        formula = "π_ref / (1 − (r − r̄_π)/(β·σ_π)), r̄_π, σ_π = mean, std of r under π (fixed point)"
        note = ("k3 differentiated in the loss pulls in the forward-KL direction (∇KL(π_ref‖π)) and the advantage "
                f"is divided by the reward std {where} while the KL term is not, so the temperature becomes β·σ_π: "
                "the fixed point is π_ref/(1 − (r − r̄)/(β·σ)) (DeepSeekMath Eq. 21; Tang & Munos 2506.09477), "
                "not π_ref·exp(r/β)/Z")
        if n is not None:
            formula = (f"β·π_ref/(β + Ā − ā(y)), {abar}, Ā = E_π ā: fixed point at group size n = {n} "
                       f"(expectation over the other n − 1 draws); as n → ∞ it tends to {formula}")
            note += (f"; at {at_n} the population advantage is the expectation of the sampled one over the other "
                     "n − 1 draws, ā(y), not (r − r̄_π)/σ_π (a small group's std is biased and holds the row's own "
                     "reward): stationarity of the exact population loss, −π(y)·(ā(y) − Ā) + β·(π(y) − π_ref(y)) "
                     f"= 0, gives π(y) = β·π_ref(y)/(β + Ā − ā(y)), a fixed point in π; {_fallback_text(n)}")
    if n is not None:
        solve = _finite_group_solver(solve, n, beta, float(rw["eps"]), "k2" if est == "k2" else "k3")
    return DerivedTarget(kind, formula, note, solve)


def _pair_data(s, rw, b):
    """Pair weights M ``(P, K, K)`` and labels Q = P(i ≻ j) ``(P, K, K)`` of the source on bandit b, through the
    preference link's label map when ``rw`` has a link (smoothing, de-noising)."""
    M = _pair_weights(s, b)
    P, K = b.pi_ref.shape
    i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    Q = torch.stack([pair_labels(s, b, torch.full((K * K,), p), i.flatten(), j.flatten()).reshape(K, K)
                     for p in range(P)])
    link = rw.get("link")
    return M, (Q if link is None else LINK_TABLE[link].label_map(Q, rw.get("epsilon")))


def _minimise_on_simplex(parts: Callable, x0, p: int, what: str) -> Tensor:
    """Minimise a per-prompt objective over the simplex, parametrised by logits θ with θ_0 = 0.

    ``parts(x) -> (f, ∇_x f)`` with x = θ_1..θ_{K−1} (numpy). scipy BFGS, then Powell's hybrid root finder on the
    gradient (kept when it lowers the gradient). Returns softmax(θ) ``(K,)`` float64.
    Raises:
        TargetError: the gradient stays above 1e-9 (no stationary point of ``what`` found on prompt ``p``).
    """
    import numpy as np
    from scipy.optimize import minimize, root
    res = minimize(parts, x0, jac=True, method="BFGS", options={"gtol": 1e-10, "maxiter": 10000})
    sol = root(lambda x: parts(x)[1], res.x, method="hybr", options={"xtol": 1e-15})
    x = sol.x if np.all(np.isfinite(sol.x)) and np.abs(parts(sol.x)[1]).max() <= np.abs(parts(res.x)[1]).max() \
        else res.x
    if np.abs(parts(x)[1]).max() > 1e-9:
        raise TargetError(f"prompt {p}: no stationary point of {what} found (gradient "
                          f"{np.abs(parts(x)[1]).max():.2e})")
    theta = np.concatenate([[0.0], x])
    return torch.as_tensor(np.exp(theta - np.logaddexp.reduce(theta)))


def nll_regularised_fit(M: Tensor, Q: Tensor, *, beta: float, lam: float, link: str) -> Tensor:
    """Minimise, per prompt, F(π) = −Σ_y c(y)·log π(y) + λ·Σ_ij M_ij [Q_ij ℓ(β(g_i − g_j)) + (1 − Q_ij) ℓ(β(g_j − g_i))]
    over the simplex, ℓ = −log σ, g(π) = log π (``logsigmoid``: CPO-style) or log(π/(1 − π)) (``odds_ratio``:
    ORPO Eq. 6–7), c(y) = Σ_j M_yj Q_yj + M_jy (1 − Q_jy) the probability that y is the chosen response (M
    normalised per prompt).

    Written out here with analytic gradients (numpy; no loss code): scipy BFGS on the logits θ (θ_0 = 0), then
    Powell's hybrid root finder on the gradient for a residual below 1e-12.

    Returns:
        ``(P, K)`` float64.
    Raises:
        TargetError: a response that is never the chosen one (c(y) = 0, e.g. deterministic labels): the loss
            drives its probability toward 0 without reaching it; or no stationary point found.
    """
    import numpy as np
    P, K, _ = M.shape
    out = torch.empty(P, K, dtype=torch.float64)
    for p in range(P):
        m = M[p].double().numpy()
        m = m / m.sum()
        q = Q[p].double().numpy()
        c = (m * q).sum(1) + (m * (1 - q)).sum(0)
        if np.any(c <= 0):
            never = [int(y) for y in np.flatnonzero(c <= 0)]
            raise TargetError(f"prompt {p}: responses {never} are never the chosen response, so the chosen NLL "
                              "never lifts them and the preference term pushes their probability toward 0 without "
                              "reaching it; udrra claims no target (use sampled labels)")

        def parts(x):
            theta = np.concatenate([[0.0], x])
            u = theta - np.logaddexp.reduce(theta)
            pi = np.exp(u)
            if link == "odds_ratio":
                g, dg = u - np.log(-np.expm1(u)), 1.0 / (-np.expm1(u))    # d/du log(e^u/(1 − e^u)) = 1/(1 − π)
            else:
                g, dg = u, np.ones_like(u)
            d = beta * (g[:, None] - g[None, :])
            f = -(c * u).sum() + lam * (m * (q * np.logaddexp(0, -d) + (1 - q) * np.logaddexp(0, d))).sum()
            D = m * (-q / (1 + np.exp(d)) + (1 - q) / (1 + np.exp(-d)))   # M_ij · ∂[pair]/∂d_ij
            dF_du = -c + lam * beta * dg * (D.sum(1) - D.sum(0))
            grad = dF_du - pi * dF_du.sum()
            return f, grad[1:]

        out[p] = _minimise_on_simplex(parts, np.zeros(K - 1), p, "the NLL-regularised objective")
    return out


def nca_fit(M: Tensor, Q: Tensor, ref: Tensor, *, beta: float) -> Tensor:
    """Minimise, per prompt, the population pairwise NCA loss written per response,
    L(π) = Σ_y [c(y)·softplus(−β·u_y) + ½·m(y)·softplus(β·u_y)], u = log π/π_ref, over the simplex; c(y) = the
    probability that y is a pair's chosen response, m(y) = Σ_j M_yj + M_jy its expected appearances (M normalised
    per prompt; proofs/nca.py::nca_population_per_response). Stationarity: G_k = π_k·Σ_y G_y with
    G_y = β·(−c_y·σ(−β·u_y) + ½·m_y·σ(β·u_y)); solved with scipy BFGS on the logits, then root finding on the
    analytic gradient (numpy; no loss code).

    Returns:
        ``(P, K)`` float64.
    Raises:
        TargetError: a response in the data that is never chosen (its probability only falls toward 0), or no
            stationary point found.
    """
    import numpy as np
    P, K, _ = M.shape
    out = torch.empty(P, K, dtype=torch.float64)
    for p in range(P):
        mm = M[p].double().numpy()
        mm = mm / mm.sum()
        q = Q[p].double().numpy()
        c = (mm * q).sum(1) + (mm * (1 - q)).sum(0)
        m = mm.sum(1) + mm.sum(0)
        lref = np.log(ref[p].double().numpy())
        if np.any((c <= 0) & (m > 0)):
            never = [int(y) for y in np.flatnonzero((c <= 0) & (m > 0))]
            raise TargetError(f"prompt {p}: responses {never} appear in pairs but are never chosen: NCA's ½·softplus(β·u) "
                              "term pushes their probability toward 0 without reaching it; udrra claims no target")

        def parts(x):
            theta = np.concatenate([[0.0], x])
            lp = theta - np.logaddexp.reduce(theta)
            u = lp - lref
            f = (c * np.logaddexp(0, -beta * u) + 0.5 * m * np.logaddexp(0, beta * u)).sum()
            G = beta * (-c / (1 + np.exp(beta * u)) + 0.5 * m / (1 + np.exp(-beta * u)))
            return f, (G - np.exp(lp) * G.sum())[1:]

        out[p] = _minimise_on_simplex(parts, (lref - lref[0])[1:], p, "the NCA objective")
    return out


def best_of_n_policy(sampler: Tensor, r: Tensor, n: int) -> Tensor:
    """The distribution of the kept sample when the best of n i.i.d. draws from ``sampler`` is kept, per prompt:
    p_n(y) = F(r_y)^n − F⁻(r_y)^n with F(t) = Σ_{r(y') ≤ t} π(y'), F⁻(t) = Σ_{r(y') < t} π(y') (the CDF of the reward
    under the sampler, Beirami et al. 2401.01879 §2), a tie's mass shared in proportion to π(y) (the first of the
    tied draws is kept). sampler, r: ``(P, K)``; returns ``(P, K)`` float64."""
    sampler, r = sampler.double(), r.double()
    below_eq = (r[:, None, :] <= r[:, :, None]).double()                    # [p, y, y'] = 1 if r(y') ≤ r(y)
    below = (r[:, None, :] < r[:, :, None]).double()
    F = (below_eq * sampler[:, None, :]).sum(-1)
    Fm = (below * sampler[:, None, :]).sum(-1)
    tied = F - Fm                                                           # mass of y's tie class
    share = torch.where(tied > 0, sampler / tied.clamp_min(1e-300), torch.zeros_like(sampler))
    return (F ** n - Fm ** n) * share


def _derive_best_of_n(s) -> DerivedTarget:
    n = int(s["n"])
    formula = (f"p_n(y) = F(r(y))^n − F⁻(r(y))^n, n = {n}, F = the CDF of the reward under the sampler π_ref (ties "
               "share their class's mass in proportion to π_ref)")
    note = ("maximum likelihood on the kept samples converges to the distribution of the kept sample, the best-of-n "
            "distribution of the sampler; no KL term: β plays no role")
    return DerivedTarget("best_of_n", formula, note,
                         lambda b: best_of_n_policy(b.pi_ref, b.reward_matrix(), n))


def _derive_nca(s, rw, beta: float) -> DerivedTarget:
    def solve(b):
        M, Q = _pair_data(s, rw, b)
        return nca_fit(M, Q, b.pi_ref, beta=beta)
    formula = ("argmin_π Σ_y [c(y)·softplus(−β·u(y)) + ½·m(y)·softplus(β·u(y))], u = log π/π_ref, c = chosen "
               "marginal, m = appearance marginal of the pairs: the stationarity condition solved numerically")
    note = ("NCA scores each response's own implicit reward β·u, not the difference, so the target depends on how "
            "often each response is chosen (c) and appears (m), not on a Bradley–Terry reward: it is not "
            "π_ref·exp(r/β)/Z; chosen-often responses get u > 0 and the others are pushed below π_ref")
    return DerivedTarget("noise_contrastive", formula, note, solve)


def _derive_chosen_nll(s, rw, ref, beta: float) -> DerivedTarget:
    link_name, lam = rw["link"], float(ref["lam"])

    def solve(b):
        M, Q = _pair_data(s, rw, b)
        return nll_regularised_fit(M, Q, beta=beta, lam=lam, link=link_name)
    g = "log(π/(1 − π))" if link_name == "odds_ratio" else "log π"
    formula = (f"argmin_π E_(y_w)[−log π(y_w)] + λ·E_(y_w, y_l)[−log σ(β·(g(y_w) − g(y_l)))], g = {g}, λ = {lam}: "
               "the stationarity condition solved numerically (BFGS + root finding on the analytic gradient)")
    note = ("no reference model: the NLL of the chosen responses is the cross-entropy to their distribution c, "
            "KL(c‖π) up to a constant, so c takes π_ref's place as the anchor and the preference term tilts the "
            "policy away from it; not a Boltzmann distribution" +
            ("; ORPO's odds ratio: odds(y) = π(y)/(1 − π(y))" if link_name == "odds_ratio" else ""))
    return DerivedTarget("odds_ratio" if link_name == "odds_ratio" else "nll_regularised", formula, note, solve)


def _derive_preference(t, s, rw, ref, beta: float) -> DerivedTarget:
    link_name = rw["link"]
    link = LINK_TABLE[link_name]
    gamma = float(ref.get("gamma") or 0.0)
    if link_name == "hinge":
        return _derive_hinge(s, ref, gamma)
    if ref.kind == "chosen_nll":
        return _derive_chosen_nll(s, rw, ref, beta)
    loss = "squared" if link_name == "squared" else "logistic"
    no_ref = ref.kind == "none"

    def solve(b):
        M, Q = _pair_data(s, rw, b)

        def policy_of(v: Tensor) -> Tensor:
            if link_name == "forward_kl":
                return inverse_family(b.pi_ref, v)
            if link_name in ("js_divergence", "alpha_divergence", "odds_ratio"):
                return f_family(torch.ones_like(b.pi_ref) if no_ref else b.pi_ref, v, link, t.get("alpha"))
            return _normalise(v) if no_ref else boltzmann(b.pi_ref, v)
        pi = policy_of(pairwise_fit(M, Q, beta=beta, gamma=gamma, loss=loss))
        if s.kind == "on_policy_pairs":
            pi = _on_policy_pairs_fixed_point(pi, lambda w: policy_of(pairwise_fit(w, Q, beta=beta, gamma=gamma,
                                                                                  loss=loss)))
        return pi

    if link_name == "squared":
        return DerivedTarget("psi", "π_ref·exp(g/β)/Z, g = μ-weighted least squares of g(y) − g(y') = p(y≻y') − ½ "
                             "(= p(y≻μ) for independent pairs y, y' ∼ μ)", None, solve)
    if link_name == "forward_kl":
        return DerivedTarget("forward_kl", "β·π_ref/(λ − r̂), r̂ = Bradley–Terry MLE reward of the labels", None,
                             solve)
    if link_name == "odds_ratio":
        return DerivedTarget("odds_ratio", "σ(r̂/β + c), c normalising: log odds(π(y)) = r̂(y)/β + c, r̂ = "
                             "Bradley–Terry MLE reward of the labels (the odds-ratio term alone, no NLL)",
                             "reference-free odds-ratio link without ORPO's NLL term: π(y)/(1 − π(y)) ∝ exp(r̂/β)",
                             solve)
    if link_name == "js_divergence":
        return DerivedTarget("js_divergence", "π_ref·e^z/(2 − e^z), z = (r̂ − λ)/β, λ normalising: f'(π/π_ref) = "
                             "(r̂ − λ)/β with f'(ρ) = log(2ρ/(1 + ρ)) (f-DPO Thm 1, JS row of Table 1), r̂ = "
                             "Bradley–Terry MLE reward of the labels", None, solve)
    if link_name == "alpha_divergence":
        a = t.get("alpha")
        return DerivedTarget("alpha_divergence", f"π_ref·(1 − α·(r̂ − λ)/β)^(−1/α), α = {a}, λ normalising: "
                             "f'(π/π_ref) = (r̂ − λ)/β with f'(ρ) = (1 − ρ^(−α))/α (f-DPO Thm 1, α row of Table 1), "
                             "r̂ = Bradley–Terry MLE reward of the labels", None, solve)
    smoothing = {"smoothed_logsigmoid": "label-smoothed labels q(1−ε) + (1−q)ε",
                 "robust": "de-noised labels (q − ε)/(1 − 2ε)"}.get(link_name)
    if no_ref:
        formula = "exp(r̂/β)/Z" + (" shifted by the margin γ" if gamma else "") + \
            ", r̂ = Bradley–Terry MLE reward (uniform implicit reference)"
        note = ("reference-free: the loss has no π_ref, so the implicit reference is uniform"
                + (f"; the margin γ = {gamma} makes the per-pair optimum β·Δ* solve a margin-shifted logistic "
                   "equation, so the target is found numerically" if gamma else ""))
        return DerivedTarget("reference_free", formula, note, solve)
    formula = "π_ref·exp(r̂/β)/Z, r̂ = Bradley–Terry MLE reward" + (f" of the {smoothing}" if smoothing else
                                                                   " (= r when labels are Bradley–Terry in r)")
    note = None
    if link_name == "smoothed_logsigmoid":
        note = ("cDPO is DPO on label-smoothed data: its target is Boltzmann in the Bradley–Terry reward of the "
                "smoothed labels, which is flatter than π_ref·exp(r/β) (finite margin log((1−ε)/ε) even for "
                "deterministic labels)")
    if link_name == "robust":
        note = ("rDPO is unbiased for labels flipped with the known rate ε (Chowdhury et al. 2403.00409): on data "
                "whose flip rate equals ε its target is the clean π_ref·exp(r/β)/Z")
    return DerivedTarget("boltzmann", formula, note, solve)


# ----------------------------------------------------------------------------------------------- hinge
# The hinge link's population objective, per prompt, in x = β·u (u = log π − log π_ref, or log π without a
# reference) and c = 1 + γ:
#     F(x) = Σ_{i≠j} w_ij [q_ij·max(0, c − (x_i − x_j)) + (1 − q_ij)·max(0, c + (x_i − x_j))],
# w = the pair weights the source gives (normalised per prompt), q = P(i ≻ j) in the data. F is convex and
# piecewise linear, so its minimiser set is the optimal face of a linear program. One pair alone is minimised at
# x_i − x_j = sign(2q − 1)·c (any value in [−c, c] at q = ½; ≥ c for q = 1), theory §5.5; the K(K−1)/2 margins
# must however be differences of one potential x, so for K ≥ 3 they cannot all sit at ±c and the pairs trade off.

def _derive_hinge(s, ref, gamma: float) -> DerivedTarget:
    no_ref = ref.kind == "none"
    c = "(1 + γ)" if gamma else "1"
    with_gamma = f", γ = {gamma}" if gamma else ""
    u = "log π(y)" if no_ref else "log π(y)/π_ref(y)"
    if ref.get("length_normalize"):
        u = f"({u})/|y|"
    dist = "exp(u)/Z" if no_ref else "π_ref·exp(u)/Z"
    noise = float(s.get("label_noise") or 0.0)
    resets = ref.get("update", "frozen") == "reset_every"
    if s.kind == "offline_pairs" and s["labels"] == "deterministic" and noise == 0.0:
        formula = (f"{dist} for any u with h(y_w, y_l) = u(y_w) − u(y_l) ≥ {c}/β on every covered pair ordered as "
                   f"labelled, u = {u}{with_gamma} (the zero-loss set; no unique optimum)")
        note = ("deterministic labels put each pair in the data in one orientation only, so max(0, 1 − β·h) "
                "reaches zero on a whole half-line; if the ranking has ties or cycles the zero-loss set is empty and "
                "the target is the minimiser set of the population hinge objective (a linear program), as for "
                "sampled labels")
        if resets:
            note += ("; with the reference reset each round every round adds such a margin, so the average "
                     "log-ratio per round satisfies it")
        return DerivedTarget("margin", formula, note, None)
    data = "pairs drawn from the current policy π" if s.kind == "on_policy_pairs" else "the pair distribution μ"
    formula = (f"{dist} for any u minimising F(u) = Σ_(y,y') w(y, y')·[q·max(0, {c} − β·h) + (1 − q)·max(0, {c} + "
               f"β·h)], h = u(y) − u(y'), u = {u}{with_gamma}, w = {data}, q = P(y ≻ y') in the data: a linear "
               "program whose optimal face is the target set")
    per_pair = "sign(2q − 1)·(1 + γ)" if gamma else "sign(2q − 1)"
    lattice = "an integer multiple of 1 + γ" if gamma else "an integer"
    note = ("with stochastic labels both orientations of a pair are in the data, so a pair alone is optimal at "
            f"β·h = {per_pair} (any |β·h| ≤ {c} at q = ½; theory §5.5), not h ≥ {c}/β; the h = u(y) − u(y') must "
            "come from one potential u, so with K ≥ 3 responses the pairs trade off: the minimisers are the optimal "
            f"face of a linear program (at its vertices every β·(u(y) − u(y')) is {lattice}; the face can be more "
            "than a point, e.g. when q = ½); verify checks that the learned policy attains the LP optimum")
    if s.kind == "on_policy_pairs":
        note += ("; with on-policy pairs the weights w = π(y)·π(y') move with the policy, so a limit must be a fixed "
                 "point u ∈ argmin F_(w = π_u ⊗ π_u): one exists (Kakutani) but, for K ≥ 3, the LP's minimiser jumps "
                 "between vertices as the weights move and exact training can cycle around it instead of converging "
                 "(seen on random 3-response bandits), so udrra claims no target there (TargetError); with K = 2 "
                 "there is one pair and the weights do not matter")
    if resets:
        note += ("; with the reference reset each round every round ends at a minimiser, so the average log-ratio "
                 "per round (log π_k − log π_0)/k lies in the (convex) minimiser set")
    return DerivedTarget("hinge_lp", formula, note, None)


def hinge_identified(components, bandit) -> None:
    """Raise :class:`TargetError` where udrra claims no hinge target on ``bandit``: on-policy pairs with K ≥ 3
    responses (the pair weights π(y)·π(y') move the LP's minimiser and exact training can cycle)."""
    t, s, rw, ref = components
    K = bandit.pi_ref.shape[1]
    if s.kind == "on_policy_pairs" and K >= 3:
        raise TargetError(f"hinge link with on-policy pairs and K = {K} >= 3 responses: the population hinge "
                          "objective's minimiser depends on the pair weights π(y)·π(y'), which move with the policy; "
                          "exact training can cycle around the fixed point, so there is no target to check (use "
                          "offline_pairs, or K = 2)")


def hinge_problem(components, bandit, probs: Tensor):
    """The population hinge objective's data on ``bandit`` at the policy ``probs``.

    Returns:
        ``(x, M, Q, c)``: x = β·u ``(P, K)`` with u = log π − log π_ref (log π without a reference), divided by
        the number of rounds when the reference is reset each round; M ``(P, K, K)`` pair weights normalised per
        prompt (π(y)·π(y') for on-policy pairs); Q ``(P, K, K)`` P(i ≻ j) in the data; c = 1 + γ.
    Raises:
        TargetError: see :func:`hinge_identified`.
    """
    t, s, rw, ref = components
    hinge_identified(components, bandit)
    beta = float(t["beta"])
    probs = probs.double()
    logp = torch.log(probs)
    u = logp if ref.kind == "none" else logp - bandit.log_pi_ref
    if ref.get("update", "frozen") == "reset_every":
        u = u / int(ref.get("rounds") or 1)
    P, K = probs.shape
    off = 1.0 - torch.eye(K, dtype=torch.float64)
    if s.kind == "on_policy_pairs":
        M = probs[:, :, None] * probs[:, None, :] * off
    else:
        M = _pair_weights(s, bandit).double() * off
    M = M / M.sum((1, 2), keepdim=True)
    i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    Q = torch.stack([pair_labels(s, bandit, torch.full((K * K,), p), i.flatten(), j.flatten()).reshape(K, K)
                     for p in range(P)]).double()
    Q = LINK_TABLE["hinge"].label_map(Q, None)
    c = 1.0 + float(ref.get("gamma") or 0.0)
    return beta * u, M, Q, c


def hinge_objective(x: Tensor, M: Tensor, Q: Tensor, c: float) -> Tensor:
    """Per-prompt population hinge objective F(x) (see above). x: ``(P, K)``; returns ``(P,)`` float64."""
    d = x[:, :, None] - x[:, None, :]
    f = Q * torch.relu(c - d) + (1.0 - Q) * torch.relu(c + d)
    return (M * f).sum((1, 2))


def hinge_lp(M: Tensor, Q: Tensor, c: float):
    """Minimise the population hinge objective exactly, by a linear program per prompt (HiGHS).

    Variables x ∈ R^K (x_0 = 0: F depends on differences only) and one slack per hinge term with positive weight:
    s ≥ c − (x_i − x_j), s ≥ 0 (weight w_ij·q_ij + w_ji·(1 − q_ji)) and t ≥ c + (x_i − x_j), t ≥ 0 (weight
    w_ij·(1 − q_ij) + w_ji·q_ji) for each unordered pair i < j.

    Returns:
        ``(F*, x*)``: ``(P,)`` optimal values (evaluated by :func:`hinge_objective` at x*) and ``(P, K)`` one
        minimiser (a vertex when the comparison graph is connected).
    """
    import numpy as np
    from scipy.optimize import linprog
    M, Q = M.double(), Q.double()
    P, K, _ = M.shape
    xs = torch.zeros(P, K, dtype=torch.float64)
    for p in range(P):
        m, q = M[p].numpy(), Q[p].numpy()
        cost, rows, rhs = [], [], []
        for i in range(K):
            for j in range(i + 1, K):
                a = m[i, j] * q[i, j] + m[j, i] * (1.0 - q[j, i])   # weight of max(0, c − (x_i − x_j))
                b = m[i, j] * (1.0 - q[i, j]) + m[j, i] * q[j, i]   # weight of max(0, c + (x_i − x_j))
                for weight, sign in ((a, 1.0), (b, -1.0)):
                    if weight <= 0:
                        continue
                    row = {K + len(cost): -1.0, i: -sign, j: sign}  # −slack ∓ (x_i − x_j) ≤ −c
                    cost.append(weight)
                    rows.append(row)
                    rhs.append(-c)
        n = K + len(cost)
        A = np.zeros((len(rows), n))
        for r, row in enumerate(rows):
            for k, v in row.items():
                A[r, k] = v
        obj = np.concatenate([np.zeros(K), np.asarray(cost, dtype=float)])
        bounds = [(0.0, 0.0)] + [(None, None)] * (K - 1) + [(0.0, None)] * len(cost)
        res = linprog(obj, A_ub=A if len(rows) else None, b_ub=np.asarray(rhs) if len(rows) else None,
                      bounds=bounds, method="highs")
        if res.status != 0:
            raise TargetError(f"prompt {p}: the hinge linear program failed ({res.message})")
        xs[p] = torch.as_tensor(res.x[:K], dtype=torch.float64)
    return hinge_objective(xs, M, Q, c), xs


def hinge_gap(components, bandit, probs: Tensor):
    """How far ``probs`` is from the hinge target: per-prompt F(x) − F* ≥ 0 (0 exactly on the minimiser set).

    Returns:
        ``(gap, optimum)``: ``(P,)`` excess of the learned policy's population hinge objective over the LP optimum,
        and the optimum F* itself (0 when every covered pair can reach its margin, i.e. deterministic acyclic labels).
    """
    x, M, Q, c = hinge_problem(components, bandit, probs)
    opt, _ = hinge_lp(M, Q, c)
    return hinge_objective(x, M, Q, c) - opt, opt


def _on_policy_pairs_fixed_point(pi: Tensor, fit: Callable[[Tensor], Tensor], tol: float = 1e-11,
                                 max_iter: int = 2000) -> Tensor:
    """The target of on-policy pairs: the pair weights are μ(y, y') ∝ π(y)·π(y') of the policy itself, so the target
    is a fixed point π = T(π), T(π) = the frozen-μ target with μ = π ⊗ π (off the diagonal). For a logistic link on
    Bradley–Terry labels T does not depend on μ (one step, to round-off); for the squared link (IPO's p(y ≻ μ)), label smoothing,
    the robust link or a margin γ it does. Solved by geometrically damped iteration (π ← √(π·T(π)), renormalised).

    Raises:
        TargetError: no convergence to ``tol`` within ``max_iter`` iterations.
    """
    off = 1.0 - torch.eye(pi.shape[-1], dtype=torch.float64)
    for _ in range(max_iter):
        w = pi[:, :, None] * pi[:, None, :] * off
        # scaled so the heaviest pair weighs 1 (Newton's stopping rule is absolute), floored at 1e-12: pairs of
        # near-zero mass barely weigh in the loss, but a singular weight matrix would stop Newton's method
        w = (w / w.amax((1, 2), keepdim=True)).clamp_min(1e-12) * off
        new = fit(w)
        if float((new - pi).abs().max()) < tol:
            return new
        pi = torch.sqrt(pi * new)
        pi = pi / pi.sum(-1, keepdim=True)
    raise TargetError("on-policy pairs: the fixed point π = T(π) (pair weights π(y)·π(y') of the policy itself) did "
                      f"not converge within {max_iter} damped iterations; udrra claims no target here")


def _pair_weights(s, b) -> Tensor:
    if s.kind == "offline_pairs":
        return b.pair_distribution
    if s.kind == "offline_samples":
        d = b.sample_distribution
        return d[:, :, None] * d[:, None, :] * (1 - torch.eye(d.shape[1], dtype=d.dtype))
    K = b.pi_ref.shape[1]
    return (1 - torch.eye(K, dtype=torch.float64)).expand(b.pi_ref.shape[0], K, K).clone()
