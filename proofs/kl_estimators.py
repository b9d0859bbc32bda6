"""Proof 6: what a KL estimator does when it is differentiated (Tang & Munos arXiv 2506.09477; DeepSeekMath
arXiv 2402.03300 Eqs. 19–21; theory.md §5.4).

Setting: on-policy samples y ∼ π_θ (the sampling distribution is *not* differentiated, as in an autograd
loss), softmax policy π_θ(y) = e^{θ_y}/Σe^θ, K = 3, symbolic θ and π_ref. With k a per-sample estimator of
the ratio π(y)/π_ref(y):

- k1 = log(π/π_ref) *as a loss*: E_π[∇_θ k1] = E_π[∇ log π] = 0 — no regularisation at all
  (:func:`k1_loss_zero_expected_gradient`);
- k3 = π_ref/π − 1 − log(π_ref/π) *as a loss* (GRPO): E_π[∇_θ k3] = ∇_θ KL(π_ref‖π), the forward
  (mass-covering) KL, not KL(π‖π_ref) (:func:`k3_loss_gradient_is_forward_kl`);
- k1 *in the reward* (PPO/RLOO/ReMax/REINFORCE: R = r − β·k1, no gradient through the shaping) with the
  score-function gradient: E_π[(r − β·k1)·∇ log π] = ∇_θ(E_π[r] − β·KL(π‖π_ref)), the exact gradient of the
  reverse-KL objective of proof 1 (:func:`k1_in_reward_gradient_is_reverse_kl`);
- k2 = ½·log²(π/π_ref) *as a loss*: E_π[∇_θ k2] = ∇_θ KL(π‖π_ref) (:func:`k2_loss_gradient_is_reverse_kl`).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import sympy as sp

from ._common import K, canon, positive_symbols, real_symbols


def k1(pi, ref):
    return sp.log(pi / ref)


def k2(pi, ref):
    return sp.log(pi / ref) ** 2 / 2


def k3(pi, ref):
    return ref / pi - 1 - sp.log(ref / pi)


def kl_pi_ref(pi, ref):
    """KL(π‖π_ref) = Σ π log(π/π_ref) (reverse KL, the RLHF regulariser)."""
    return sp.Add(*[p * sp.log(p / q) for p, q in zip(pi, ref)])


def kl_ref_pi(pi, ref):
    """KL(π_ref‖π) = Σ π_ref log(π_ref/π) (forward KL)."""
    return sp.Add(*[q * sp.log(q / p) for p, q in zip(pi, ref)])


def zero_divergence(pi, ref):
    return sp.Integer(0)


def _softmax():
    theta = list(sp.symbols(f"theta1:{K + 1}", real=True))
    s = sp.Add(*[sp.exp(t) for t in theta])
    return theta, [sp.exp(t) / s for t in theta]


def _setup():
    pi_ref = positive_symbols("pi_ref")
    return pi_ref, *_softmax()


def loss_expected_gradient(estimator: Callable, pi, ref, theta) -> List[sp.Expr]:
    """E_{y∼π}[∇_θ k(π_θ(y), π_ref(y))] = Σ_y π(y)·∂_θ k(π_θ(y)) (the weights π(y) are not differentiated)."""
    return [sp.Add(*[pi[y] * sp.diff(sp.expand_log(estimator(pi[y], ref[y]), force=True), t) for y in range(K)])
            for t in theta]


def estimator_loss_gradient(estimator: Callable, divergence: Callable) -> List[sp.Expr]:
    """Residuals E_π[∇_θ k] − ∇_θ D(π_θ, π_ref) for each logit θ_k (all 0 iff the claim holds)."""
    pi_ref, theta, pi = _setup()
    g = loss_expected_gradient(estimator, pi, pi_ref, theta)
    d = sp.expand_log(divergence(pi, pi_ref), force=True)
    return [canon(gi - sp.diff(d, t)) for gi, t in zip(g, theta)]


def k1_loss_zero_expected_gradient(estimator: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (Tang & Munos 2506.09477; theory.md §5.4): k1 = log(π/π_ref) differentiated as a loss has zero
    expected gradient on-policy, E_π[∇ log π] = 0. Returns E_π[∇_θ k] for ``estimator`` (default k1)."""
    return estimator_loss_gradient(estimator or k1, zero_divergence)


def k3_loss_gradient_is_forward_kl(estimator: Optional[Callable] = None,
                                   divergence: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (Tang & Munos 2506.09477; DeepSeekMath Eq. 21): the k3 estimator differentiated as a loss has
    expected gradient ∇_θ KL(π_ref‖π). Returns E_π[∇_θ k] − ∇_θ D (defaults k = k3, D = KL(π_ref‖π))."""
    return estimator_loss_gradient(estimator or k3, divergence or kl_ref_pi)


def k2_loss_gradient_is_reverse_kl(estimator: Optional[Callable] = None,
                                   divergence: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (theory.md §5.4, Liu et al. 2510.01555): k2 = ½ log²(π/π_ref) as a loss has expected gradient
    ∇_θ KL(π‖π_ref). Returns E_π[∇_θ k] − ∇_θ D (defaults k = k2, D = KL(π‖π_ref))."""
    return estimator_loss_gradient(estimator or k2, divergence or kl_pi_ref)


def k1_in_reward_gradient_is_reverse_kl(objective_divergence: Optional[Callable] = None,
                                        estimator: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim (PPO/RLHF, Ouyang et al. Eq. 2; Xu et al. Eq. 2; theory.md §5.4): with the shaped reward
    R = r − β·k1 treated as a constant, the score-function gradient E_π[R·∇_θ log π] equals
    ∇_θ(E_π[r] − β·D(π, π_ref)) with D = KL(π‖π_ref) — so its stationary point is the optimum of proof 1.

    Returns E_π[(r − β k)∇ log π] − ∇(E_π[r] − β D) per logit (defaults k = k1, D = KL(π‖π_ref))."""
    pi_ref, theta, pi = _setup()
    r = real_symbols("r")
    beta = sp.Symbol("beta", positive=True)
    est = estimator or k1
    div = objective_divergence or kl_pi_ref
    s = sp.Add(*[sp.exp(t) for t in theta])
    logpi = [t - sp.log(s) for t in theta]
    J = sp.Add(*[pi[y] * r[y] for y in range(K)]) - beta * sp.expand_log(div(pi, pi_ref), force=True)
    out = []
    for t in theta:
        g = sp.Add(*[pi[y] * (r[y] - beta * sp.expand_log(est(pi[y], pi_ref[y]), force=True)) * sp.diff(logpi[y], t)
                     for y in range(K)])
        out.append(canon(g - sp.diff(J, t)))
    return out
