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
from . import KindSpec, Param, nonneg, positive
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
    "margin": ("hinge",),
    "argmax": (),
}
#: declared target kinds valid for each non-preference reward kind
TARGET_FOR_REWARD = {
    "explicit": ("boltzmann", "forward_kl", "argmax"),
    "reward_regression": ("boltzmann",),
    "reward_difference": ("boltzmann",),
}


@dataclass(frozen=True)
class DerivedTarget:
    """The target a composition actually converges to.

    Attributes:
        kind: ``boltzmann``, ``psi``, ``forward_kl``, ``argmax``, ``margin``, ``reference_free`` (a
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
        k = int(ref.get("rounds") or 1)
        inner = base.solve

        def solve_iter(bandit, inner=inner, k=k):
            pi = None
            for _ in range(k):
                pi = inner(bandit if pi is None else bandit.with_reference(pi))
            return pi
        note = (f"the reference is reset to the policy after each round; after k = {k} converged rounds the "
                f"policy is the frozen-reference target applied {k} times, e.g. π_k ∝ π_0·exp(k·r/β) for a "
                "Boltzmann base (temperature β/k): it drifts toward argmax r as k grows (Xu et al. §4.3 DPO-Iter)")
        return DerivedTarget("iterated", f"T^{k}(π_0), T = [{base.formula}]", note, solve_iter)
    if update == "ema":
        return DerivedTarget("argmax", "argmax_y r(x, y)",
                             "an EMA reference follows the policy, so the only fixed point of "
                             f"'{base.formula}' with π_ref = π is the unregularised one: argmax r", _solve_argmax)
    if base.kind != declared and base.note is None:
        base = DerivedTarget(base.kind, base.formula, f"declared '{declared}' but the components give '{base.kind}'",
                             base.solve)
    return base


def _solve_argmax(bandit) -> Tensor:
    return argmax_policy(bandit.reward_matrix())


def _derive_frozen(t, s, rw, ref, beta: float) -> DerivedTarget:
    declared = t.kind
    if rw.kind == "preference":
        return _derive_preference(t, s, rw, ref, beta)
    if rw.kind in ("reward_regression", "reward_difference"):
        return DerivedTarget("boltzmann", "π_ref·exp(r/β)/Z", None,
                             lambda b: boltzmann(b.pi_ref, b.reward_matrix() / beta))
    # explicit reward: the reference term decides the regulariser
    baseline = rw["baseline"]
    normalised = baseline in ("group_norm", "batch_norm")
    if ref.kind == "kl_in_reward":
        # the KL sits inside R, so normalising R rescales reward and KL together: same target (Xu et al. §5)
        return DerivedTarget("boltzmann", "π_ref·exp(r/β)/Z", None,
                             lambda b: boltzmann(b.pi_ref, b.reward_matrix() / beta))
    est = ref.get("estimator") if ref.kind == "kl_in_loss" else None
    if ref.kind == "none" or est == "k1" or beta == 0:
        why = ("k1 differentiated in the loss has zero expected gradient (E_π[∇log π] = 0): no regularisation"
               if est == "k1" else "no KL term: nothing regularises the policy")
        return DerivedTarget("argmax", "argmax_y r(x, y)", None if declared == "argmax" else why, _solve_argmax)
    family = boltzmann if est == "k2" else inverse_family
    kind = "boltzmann" if est == "k2" else "forward_kl"
    if not normalised:
        if est == "k2":
            return DerivedTarget(kind, "π_ref·exp(r/β)/Z",
                                 None if declared == kind else
                                 "k2 differentiated in the loss gives ∇KL(π‖π_ref): reverse-KL (Boltzmann) target",
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
    if est == "k2":
        formula = "π_ref·exp((r − r̄)/(β·σ_π))/Z, σ_π = std of r under π (fixed point)"
        note = (f"advantages divided by the reward std {where} while the KL term is not: the temperature "
                "becomes β·σ_π")
    else:
        formula = "π_ref / (1 − (r − r̄_π)/(β·σ_π)), r̄_π, σ_π = mean, std of r under π (fixed point)"
        note = ("k3 differentiated in the loss pulls in the forward-KL direction (∇KL(π_ref‖π)) and the advantage "
                f"is divided by the reward std {where} while the KL term is not, so the temperature becomes β·σ_π: "
                "the fixed point is π_ref/(1 − (r − r̄)/(β·σ)) (DeepSeekMath Eq. 21; Tang & Munos 2506.09477), "
                "not π_ref·exp(r/β)/Z")
    return DerivedTarget(kind, formula, note, solve)


def _derive_preference(t, s, rw, ref, beta: float) -> DerivedTarget:
    link_name = rw["link"]
    link = LINK_TABLE[link_name]
    eps = rw.get("epsilon")
    gamma = float(ref.get("gamma") or 0.0)
    if link_name == "hinge":
        return DerivedTarget("margin", "any π with h(y_w, y_l) ≥ 1/β on every covered pair", None, None)
    loss = "squared" if link_name == "squared" else "logistic"
    no_ref = ref.kind == "none"

    def solve(b):
        M = _pair_weights(s, b)
        P, K = b.pi_ref.shape
        i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
        Q = torch.stack([pair_labels(s, b, torch.full((K * K,), p), i.flatten(), j.flatten()).reshape(K, K)
                         for p in range(P)])
        Q = link.label_map(Q, eps)
        v = pairwise_fit(M, Q, beta=beta, gamma=gamma, loss=loss)
        if s.kind == "on_policy_pairs":
            K_ = M.shape[-1]
            skew = 1.0 + (torch.arange(K_)[:, None] + 2 * torch.arange(K_)[None, :]).remainder(3).double()
            v2 = pairwise_fit(M * skew, Q, beta=beta, gamma=gamma, loss=loss)
            if float((v - v[:, :1] - (v2 - v2[:, :1])).abs().max()) > 1e-7:
                raise TargetError("with on-policy pairs the target depends on π itself unless the labels are "
                                  "Bradley–Terry and the link is logistic; this fixed point is not implemented")
        if link_name == "forward_kl":
            return inverse_family(b.pi_ref, v)
        if no_ref:
            return _normalise(v)
        return boltzmann(b.pi_ref, v)

    if link_name == "squared":
        return DerivedTarget("psi", "π_ref·exp(g/β)/Z, g = μ-weighted least squares of g(y) − g(y') = p(y≻y') − ½ "
                             "(= p(y≻μ) for independent pairs y, y' ∼ μ)", None, solve)
    if link_name == "forward_kl":
        return DerivedTarget("forward_kl", "β·π_ref/(λ − r̂), r̂ = Bradley–Terry MLE reward of the labels", None,
                             solve)
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


def _pair_weights(s, b) -> Tensor:
    if s.kind == "offline_pairs":
        return b.pair_distribution
    if s.kind == "offline_samples":
        d = b.sample_distribution
        return d[:, :, None] * d[:, None, :] * (1 - torch.eye(d.shape[1], dtype=d.dtype))
    K = b.pi_ref.shape[1]
    return (1 - torch.eye(K, dtype=torch.float64)).expand(b.pi_ref.shape[0], K, K).clone()
