"""Proof 5 (and the baseline lemma used for PPO/REINFORCE/ReMax/RLOO): gradients as weighted policy gradients.

- :func:`dpo_gradient_is_weighted_policy_gradient` — DeepSeekMath (arXiv 2402.03300) Eq. 14 / theory.md §4.2:
  for ℓ = −log σ(β(log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l))) (DPO Eq. 7),

      ∇_θ ℓ = −β·σ(r̂_l − r̂_w)·(∇_θ log π(y_w) − ∇_θ log π(y_l)),   r̂ = β·log π/π_ref,

  i.e. a policy gradient with coefficient GC = σ(r̂_l − r̂_w), + on y_w and − on y_l (DeepSeekMath's Eq. 14
  absorbs the constant β into the step size). Proven for an *arbitrary* parametrisation: log π(y_w) and
  log π(y_l) are undetermined functions of θ (so it holds per sequence, summed over tokens, for any model).
- :func:`score_function_baseline_invariance` — E_π[(R − b)∇log π] = ∇E_π[R] for any baseline b that does not
  depend on the sampled response (REINFORCE b = 0, ReMax greedy reward, RLOO leave-one-out mean, batch/group
  mean); dividing by a positive scalar (advantage std) only rescales the gradient, so the stationary points are
  unchanged. Softmax logits, K = 3.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import sympy as sp

from ._common import K, real_symbols, sigmoid


def dpo_gradient_is_weighted_policy_gradient(coefficient: Optional[Callable] = None) -> sp.Expr:
    """Claim (DeepSeekMath Eq. 14): ∇_θ ℓ_DPO = −β·GC·(∇log π(y_w) − ∇log π(y_l)), GC = σ(r̂_l − r̂_w).

    ``coefficient(rw_hat, rl_hat) -> GC`` (default σ(r̂_l − r̂_w)). Returns the simplified residual
    ∂ℓ/∂θ − (−β·GC·(∂log π_w/∂θ − ∂log π_l/∂θ)).
    """
    theta = sp.Symbol("theta", real=True)
    beta = sp.Symbol("beta", positive=True)
    lw, ll = sp.Function("logpi_w")(theta), sp.Function("logpi_l")(theta)
    rw, rl = sp.symbols("logref_w logref_l", real=True)
    rw_hat, rl_hat = beta * (lw - rw), beta * (ll - rl)
    loss = -sp.log(sigmoid(rw_hat - rl_hat))
    gc = (coefficient or (lambda w, l: sigmoid(l - w)))(rw_hat, rl_hat)
    claimed = -beta * gc * (sp.diff(lw, theta) - sp.diff(ll, theta))
    res = sp.diff(loss, theta) - claimed
    # name the undetermined quantities: log π_w, log π_l and their θ-derivatives (the score functions)
    dw, dl, a, b = sp.symbols("dlogpi_w dlogpi_l logpi_w logpi_l", real=True)
    res = res.subs({sp.diff(lw, theta): dw, sp.diff(ll, theta): dl}).subs({lw: a, ll: b})
    return sp.simplify(res)


def softmax_policy():
    theta = list(sp.symbols(f"theta1:{K + 1}", real=True))
    s = sp.Add(*[sp.exp(t) for t in theta])
    pi = [sp.exp(t) / s for t in theta]
    logpi = [t - sp.log(s) for t in theta]
    return theta, pi, logpi


def score_function_baseline_invariance(baseline: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: Σ_y π(y)·(R(y) − b)·∇_θ log π(y) = ∇_θ Σ_y π(y)·R(y) when b does not depend on y.

    ``baseline(R, y) -> b`` (default a free symbol b, the same for every y). Returns the simplified residual for
    each logit θ_k (softmax policy, K = 3, symbolic rewards R).
    """
    theta, pi, logpi = softmax_policy()
    R = real_symbols("R")
    b_sym = sp.Symbol("b", real=True)
    b = baseline or (lambda R, y: b_sym)
    out = []
    target = sp.Add(*[pi[y] * R[y] for y in range(K)])
    for t in theta:
        g = sp.Add(*[pi[y] * (R[y] - b(R, y)) * sp.diff(logpi[y], t) for y in range(K)])
        out.append(sp.simplify(g - sp.diff(target, t)))
    return out


def unregularised_gradient_is_mass_times_advantage(claim: Optional[Callable] = None) -> List[sp.Expr]:
    """Claim: without a KL term, ∂E_π[r]/∂θ_y = π(y)·(r(y) − E_π[r]) for a softmax policy (K = 3).

    ``claim(pi, r, y) -> expression`` (default π_y·(r_y − Σ π r)). Returns the residual per logit. Consequence
    (no regulariser: DAPO, k1 in the loss, β = 0): the gradient vanishes only where every response with π(y) > 0
    has r(y) = E_π[r], so with distinct rewards the only stationary points are the vertices, and the only one
    that gradient ascent does not leave is the argmax vertex: the target is argmax r.
    """
    theta, pi, _ = softmax_policy()
    r = real_symbols("r")
    mean = sp.Add(*[pi[y] * r[y] for y in range(K)])
    claim = claim or (lambda pi, r, y: pi[y] * (r[y] - mean))
    return [sp.simplify(sp.diff(mean, theta[y]) - claim(pi, r, y)) for y in range(K)]
