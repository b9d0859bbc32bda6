"""Finite groups: exact mode takes the expectation of the sampled group advantage over the other n − 1 draws.

With y_1..y_n iid ∼ π and A detached, the sampled loss (1/n)·Σ_i A_i·∇log π(y_i) has expected gradient
Σ_y π(y)·ā(y)·∇log π(y), ā(y) = E_{y_2..y_n ∼ π}[A(y; {y, y_2, ..., y_n})]. The expected values here come from
hand formulas or from a brute-force sum over the ordered draws, each group scored by the *sampled* path.
"""
import itertools
import math
import warnings

import pytest
import torch

import udrra
from udrra.components.reward import advantages, expected_group_advantages
from udrra.components.target import limit_target
from udrra.verify import total_variation

torch.set_num_threads(1)
F64 = torch.float64


def population(R, pi):
    """One group per row of ``R``/``pi`` ``(P, K)``: flattened rows, group = prompt, weights = π/P."""
    P, K = R.shape
    return R.flatten(), torch.arange(P).repeat_interleave(K), (pi / P).flatten()


def brute_force_abar(R, pi, n, baseline, eps=1e-6):
    """ā(y) by summing over all ordered (n − 1)-tuples of other draws, each group scored by the sampled path."""
    K = R.shape[0]
    out = torch.zeros(K, dtype=F64)
    for y in range(K):
        for others in itertools.product(range(K), repeat=n - 1):
            grp = torch.tensor((y,) + others)
            a = advantages(R[grp], baseline=baseline, group=torch.zeros(n, dtype=torch.long),
                           weights=torch.full((n,), 1.0 / n, dtype=F64), population=False, eps=eps)
            out[y] += float(torch.prod(pi[list(others)])) * float(a[0]) if others else float(a[0])
    return out


# ------------------------------------------------------------------------------------- (a) n = 2, K = 2
@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.3])
def test_group_norm_two_draws_two_responses_by_hand(eps):
    # group {y, y'}: mean (R_y + R_y')/2, unbiased std |R_y − R_y'|/√2, so A(y) = ((R_y − R_y')/2)/(|R_y − R_y'|/√2 + eps)
    # (= ±1/√2 at eps = 0); a group of two equal draws has A = 0. ā(a) = π(b)·A(a; {a, b}), ā(b) = π(a)·A(b; {a, b}).
    R = torch.tensor([[0.7, -0.4], [2.0, 5.0]], dtype=F64)
    pi = torch.tensor([[0.3, 0.7], [0.9, 0.1]], dtype=F64)
    r, g, w = population(R, pi)
    got = advantages(r, baseline="group_norm", group=g, weights=w, population=True, group_size=2, eps=eps)
    expected = []
    for p in range(2):
        d = float(R[p, 0] - R[p, 1])
        a_ab = (d / 2) / (abs(d) / math.sqrt(2) + eps)
        expected += [float(pi[p, 1]) * a_ab, float(pi[p, 0]) * -a_ab]
    assert got.tolist() == pytest.approx(expected, abs=1e-14)
    if eps == 0.0:  # ±1/√2 weighted by the other response's probability
        assert got.tolist() == pytest.approx([0.7 / math.sqrt(2), -0.3 / math.sqrt(2), -0.1 / math.sqrt(2),
                                              0.9 / math.sqrt(2)], abs=1e-14)


def test_group_norm_same_draw_group_has_zero_advantage():
    # π = one-hot on response 0: every group is {0, 0, ..., 0}, so every sampled advantage is exactly 0
    R = torch.tensor([[1.3, -2.0, 0.5]], dtype=F64)
    pi = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    r, g, w = population(R, pi)
    got = advantages(r, baseline="group_norm", group=g, weights=w, population=True, group_size=4)
    assert got[0] == 0.0
    # a row that is never drawn still gets the advantage it would have in a group of n − 1 copies of response 0
    for y in (1, 2):  # values {R_y, R_0 × 3}: mean m, unbiased std s
        vals = torch.tensor([float(R[0, y])] + [float(R[0, 0])] * 3, dtype=F64)
        m, s = vals.mean(), vals.std()
        assert float(got[y]) == pytest.approx(float((R[0, y] - m) / (s + 1e-6)), abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_group_norm_enumeration_matches_brute_force_over_ordered_draws(n):
    g = torch.Generator().manual_seed(n)
    R = torch.randn(3, generator=g, dtype=F64)
    pi = torch.softmax(torch.randn(3, generator=g, dtype=F64), 0)
    r, grp, w = population(R[None], pi[None])
    got = advantages(r, baseline="group_norm", group=grp, weights=w, population=True, group_size=n)
    assert torch.allclose(got, brute_force_abar(R, pi, n, "group_norm"), atol=1e-13)


def test_sampled_batches_ignore_group_size():
    r = torch.tensor([0.0, 1.0, 3.0, 1.0], dtype=F64)
    g = torch.zeros(4, dtype=torch.long)
    w = torch.full((4,), 0.25, dtype=F64)
    a = advantages(r, baseline="group_norm", group=g, weights=w, population=False)
    b = advantages(r, baseline="group_norm", group=g, weights=w, population=False, group_size=2)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- (b) Dr. GRPO, (c) RLOO
@pytest.mark.parametrize("n", [2, 3, 5])
def test_dr_grpo_expected_advantage_is_scaled_centred_reward(n):
    # ā(y) = R(y) − E[(R(y) + Σ_{i≥2} R(y_i))/n] = (n − 1)/n·(R(y) − E_π R)
    R = torch.tensor([[0.3, -1.2, 2.0, 0.5], [1.0, 1.0, -3.0, 0.25]], dtype=F64)
    pi = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.4, 0.1]], dtype=F64)
    expected = ((n - 1) / n * (R - (pi * R).sum(-1, keepdim=True))).flatten()
    r, g, w = population(R, pi)
    got = advantages(r, baseline="group_mean", group=g, weights=w, population=True, group_size=n)
    assert torch.allclose(got, expected, atol=1e-14)
    assert torch.allclose(expected_group_advantages(r, g, w, n, "group_mean"), expected, atol=1e-14)
    assert torch.allclose(brute_force_abar(R[0], pi[0], n, "group_mean"), expected[:4], atol=1e-13)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_rloo_enumeration_equals_reward_minus_expected_reward(n):
    R = torch.tensor([[0.3, -1.2, 2.0, 0.5], [1.0, 1.0, -3.0, 0.25]], dtype=F64)
    pi = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.4, 0.1]], dtype=F64)
    expected = (R - (pi * R).sum(-1, keepdim=True)).flatten()
    r, g, w = population(R, pi)
    assert torch.allclose(expected_group_advantages(r, g, w, n, "leave_one_out"), expected, atol=1e-14)
    assert torch.allclose(advantages(r, baseline="leave_one_out", group=g, weights=w, population=True,
                                     group_size=n), expected, atol=1e-14)
    assert torch.allclose(brute_force_abar(R[0], pi[0], n, "leave_one_out"), expected[:4], atol=1e-13)


# ------------------------------------------------------------------------------ (d) GRPO finite-n target
@pytest.mark.parametrize("n", [2, 3])
def test_grpo_finite_n_target_solves_the_stationarity_condition(n):
    # k3 in the loss: π(y)·(β + Ā − ā(y)) = β·π_ref(y), ā from the brute-force sum over ordered draws at π itself
    b = udrra.Bandit.random(P=2, K=3, seed=7)
    beta = 0.5
    pi = udrra.load("grpo", {"source.n": n, "target.beta": beta}).target_distribution(b)
    for p in range(2):
        abar = brute_force_abar(b.reward[p], pi[p], n, "group_norm")
        lhs = pi[p] * (beta + (pi[p] * abar).sum() - abar)
        assert torch.allclose(lhs, beta * b.pi_ref[p], atol=1e-11)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_exact_grpo_reaches_the_finite_n_target(n):
    b = udrra.Bandit.random(P=3, K=5, seed=0)
    algo = udrra.load("grpo", {"source.n": n})
    target = algo.target_distribution(b)
    assert f"n = {n}" in algo.derived_target().formula
    res = udrra.verify(algo, b)
    assert res.tv < 1e-4, res.tv
    # ... which is not the n → ∞ fixed point π_ref/(1 − (r − r̄)/(β·σ))
    limit = limit_target(algo.components).solve(b)
    assert float(total_variation(target, limit).max()) > 0.02


def test_grpo_k2_finite_n_target_is_reached():
    b = udrra.Bandit.random(P=2, K=4, seed=3)
    algo = udrra.load("grpo", {"source.n": 3, "reference.estimator": "k2"})
    pi = algo.target_distribution(b)
    for p in range(2):  # π ∝ π_ref·exp(ā/β): log π − log π_ref − ā/β is the same for every response
        abar = brute_force_abar(b.reward[p], pi[p], 3, "group_norm")
        c = torch.log(pi[p] / b.pi_ref[p]) - abar / algo.beta
        assert float(c.max() - c.min()) < 1e-10
    assert udrra.verify(algo, b).tv < 1e-4


@pytest.mark.parametrize("n", [2, 4])
def test_kl_in_reward_keeps_the_boltzmann_target_at_every_group_size(n):
    # ā(y) is strictly increasing in R(y) = r − β·log π/π_ref: stationary only where R is constant
    b = udrra.Bandit.random(P=2, K=4, seed=1)
    algo = udrra.load("grpo", {"source.n": n, "reference.kind": "kl_in_reward"})
    w = b.pi_ref * torch.exp(b.reward / algo.beta)
    assert torch.allclose(algo.target_distribution(b), w / w.sum(-1, keepdim=True), atol=1e-12)
    assert udrra.verify(algo, b).tv < 1e-4


# ------------------------------------------------------------------------------------ (e) sampled GRPO
def test_sampled_grpo_ends_at_the_finite_n_target_not_the_limit():
    b = udrra.Bandit.random(P=3, K=5, seed=0)
    algo = udrra.load("grpo", {"source.n": 4})
    res = udrra.verify(algo, b, exact=False, seed=0, batch_size=256, steps=1000)
    tv_finite = res.tv
    tv_limit = float(total_variation(res.learned, limit_target(algo.components).solve(b)).max())
    assert tv_finite < 0.02, tv_finite
    assert tv_limit > 0.1, tv_limit        # the bias the n → ∞ target had (0.127 at n = 4)
    assert tv_finite < tv_limit / 5


# ------------------------------------------------------------------------------ (f) Dr. GRPO closed form
@pytest.mark.parametrize("n", [2, 4])
def test_dr_grpo_target_is_forward_kl_with_beta_scaled_by_n_over_n_minus_1(n):
    beta = 0.5
    algo = udrra.load("grpo", {"source.n": n, "reward.baseline": "group_mean", "target.beta": beta})
    b = udrra.Bandit.random(P=2, K=5, seed=4)
    pi = algo.target_distribution(b)
    # β'·π_ref/π + r = λ, the same for every response, with β' = β·n/(n − 1)
    bp = beta * n / (n - 1)
    lam = bp * b.pi_ref / pi + b.reward
    assert torch.allclose(lam, lam[:, :1].expand_as(lam), atol=1e-9)
    assert "β·n/(n − 1)" in algo.derived_target().formula
    assert udrra.verify(algo, b).tv < 1e-4


# ----------------------------------------------------------------------------------- fallback (n → ∞)
def test_too_many_multisets_fall_back_to_the_limit_in_loss_and_target():
    # n = 64 over K = 5: C(67, 4) = 766480 multisets of the other draws > 200000
    b = udrra.Bandit.random(P=2, K=5, seed=0)
    algo = udrra.load("grpo", {"source.n": 64})
    assert "fall back to n → ∞" in algo.derived_target().note
    assert torch.allclose(algo.target_distribution(b), limit_target(algo.components).solve(b), atol=1e-14)
    r, g, w = population(b.reward, b.pi_ref)
    limit = advantages(r, baseline="group_norm", group=g, weights=w, population=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = advantages(r, baseline="group_norm", group=g, weights=w, population=True, group_size=64)
    assert torch.equal(got, limit)
    assert len(caught) <= 1  # warned once per (n, K) per process (possibly already, by an earlier test)
