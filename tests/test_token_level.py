"""The token-level loss: aggregation, micro-batch invariance, GAE, per-token KL shaping, clipping, bad input.

Every expected number is derived by hand in the comment next to it (never copied from a run of the code).
Notation: m the response mask, w the row weights, n_b = Σ_t m_bt, ρ = π/π_old, d = log π − log π_ref,
k1 = d, k3 = e^{−d} − 1 + d.
"""
import dataclasses
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import tomli_w

import udrra
from udrra import ConfigError, InputError, PairBatch, SampleBatch
from udrra.batch import Normalisers
from udrra.components.reward import gae, surrogate, whiten
from udrra.components.source import AGGREGATIONS
from udrra.loss import aggregate

D = torch.float64
MODES = ("seq_mean_token_sum", "seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def t(*rows):
    return torch.tensor(rows, dtype=D)


# The catalog files change under development, so the compositions tested here are spelled out in full: a
# REINFORCE base (Boltzmann target β = 0.5, on-policy, no baseline, k1 KL in the reward, no clip), changed by
# dotted overrides through the same override code as the CLI's --set.
BASE = {"target": {"kind": "boltzmann", "beta": 0.5}, "source": {"kind": "on_policy", "n": 4},
        "reward": {"kind": "explicit", "baseline": "none"}, "reference": {"kind": "kl_in_reward"}}
_TMP = tempfile.TemporaryDirectory(prefix="udrra_token_level_")
_BASE_PATH = Path(_TMP.name) / "base.toml"
_BASE_PATH.write_text(tomli_w.dumps(BASE), encoding="utf-8")


def compose(over=None):
    return udrra.load(str(_BASE_PATH), over or {})


def test_the_four_modes_are_the_registered_ones():
    assert set(MODES) == set(AGGREGATIONS)


# ----------------------------------------------------------------------------------------- shared batches
LENGTHS = [1, 5, 3, 2, 4, 5]          # ragged, left-aligned; total N = 20 tokens
GROUPS = [0, 0, 1, 1, 1, 0]           # two groups of 3, not contiguous: a split cuts through both groups


def random_batch(seed: int, *, critic: bool = False, fresh: bool = False) -> SampleBatch:
    """B = 6, T = 5, float64, weights 1/B. ``fresh``: old_logps = logps (ratio 1); otherwise the log-ratio is
    uniform in ±0.3 so that ρ ∈ [0.74, 1.35] and some tokens fall outside the clip band [0.8, 1.2]."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 5
    m = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).to(D)
    old = -(0.35 + 2.5 * torch.rand(B, T, generator=g, dtype=D))
    shift = torch.zeros(B, T, dtype=D) if fresh else 0.3 * (2 * torch.rand(B, T, generator=g, dtype=D) - 1)
    logps = old + shift                                           # ≤ −0.05
    ref = -(0.2 + 2.5 * torch.rand(B, T, generator=g, dtype=D))
    # finite garbage at padding: the loss must ignore it
    pad = m == 0
    logps, old, ref = logps.masked_fill(pad, -7.0), old.masked_fill(pad, -0.5), ref.masked_fill(pad, -3.0)
    rewards = torch.randn(B, generator=g, dtype=D)
    group = torch.tensor(GROUPS)
    greedy = torch.randn(2, generator=g, dtype=D)[group]
    kw = {}
    if critic:
        v = torch.randn(B, T, generator=g, dtype=D)
        kw = dict(values=v.clone().requires_grad_(True),
                  old_values=v + 0.1 * torch.randn(B, T, generator=g, dtype=D))
    return SampleBatch(logps.clone().requires_grad_(True), old, ref, rewards, group,
                       torch.full((B,), 1.0 / B, dtype=D), response_mask=m, greedy_rewards=greedy, **kw)


def leaves(batch):
    return [x for x in (batch.logps, batch.values) if x is not None and x.requires_grad]


def grads(batch, loss):
    return [g.clone() for g in torch.autograd.grad(loss, leaves(batch))]


# compositions covering kl_in_reward (both returns), kl_in_loss (token/sequence, k3/k2), clip, DAPO clip-higher,
# dual clip, a learned critic, and each outcome baseline
COMPOSITIONS = {
    "reinforce_kl_in_reward": {},
    "reinforce_kl_return_token": {"reference.kl_return": "token"},
    "rloo_clip": {"reward.baseline": "leave_one_out", "source.clip": 0.2},
    "remax_greedy": {"reward.baseline": "greedy", "source.clip": 0.2},
    "ppo_batch_norm_clip": {"reward.baseline": "batch_norm", "source.clip": 0.2, "target.beta": 0.1},
    "ppo_gae_dapo_dual": {"reward.baseline": "gae", "reward.gamma": 0.9, "reward.lam": 0.8,
                          "reward.value_clip": 0.2, "reward.whiten": True, "source.clip": 0.2,
                          "source.clip_high": 0.28, "source.dual_clip": 3.0},
    "grpo_k3_token_clip": {"reward.baseline": "group_norm", "reference.kind": "kl_in_loss", "source.clip": 0.2},
    "grpo_k3_sequence": {"reward.baseline": "group_norm", "reference.kind": "kl_in_loss",
                         "reference.level": "sequence", "source.clip": 0.2},
    "drgrpo_k2": {"reward.baseline": "group_mean", "reference.kind": "kl_in_loss", "reference.estimator": "k2"},
}
GRPO = COMPOSITIONS["grpo_k3_token_clip"]


# ------------------------------------------------------------------------ 1. micro-batch invariance
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("comp", list(COMPOSITIONS))
def test_sum_of_micro_batch_gradients_equals_the_full_batch_gradient(comp, mode):
    over = COMPOSITIONS[comp]
    algo = compose({**over, "source.aggregation": mode})
    critic = over.get("reward.baseline") == "gae"
    batch = random_batch(1, critic=critic)
    full = algo.loss(batch).loss                      # estimates advantages on the whole batch itself
    g_full = grads(batch, full)
    est = algo.estimate(batch)
    assert est.advantages.shape == (6, 5)
    # advantages are 0 on padding
    assert torch.all(est.advantages[est.response_mask == 0] == 0)
    for k in (1, 2, 3):
        parts = est.split(k)
        assert len(parts) == k and sum(p.logps.shape[0] for p in parts) == 6
        total = sum(algo.loss(p).loss for p in parts)
        g_sum = grads(batch, total)
        assert float(total.detach()) == pytest.approx(float(full.detach()), abs=1e-9)
        for a, b in zip(g_full, g_sum):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), (k, (a - b).abs().max())
    # gradient is 0 at padding (m = 0 there)
    assert torch.all(g_full[0][batch.response_mask == 0] == 0)
    # the clip must actually bite in the clipped compositions (ratios ∈ [0.74, 1.35] vs band [0.8, 1.2])
    if algo.components.source.get("clip") is not None:
        assert algo.loss(batch).metrics["clip/fraction"] > 0


def test_fresh_samples_have_ratio_one_and_still_split_exactly():
    # old = logps: ρ = 1, the surrogate gradient is −A·∇log π; invariance holds as well
    algo = compose({**GRPO, "source.aggregation": "token_mean"})
    batch = random_batch(2, fresh=True)
    g_full = grads(batch, algo.loss(batch).loss)
    parts = algo.estimate(batch).split(3)
    g_sum = grads(batch, sum(algo.loss(p).loss for p in parts))
    assert torch.allclose(g_full[0], g_sum[0], rtol=0, atol=1e-6)
    assert algo.loss(batch).metrics["clip/fraction"] == 0.0


def _naive_micro_batch_grad(algo, batch, k):
    """verl#5625-style accumulation: each micro-batch normalised by its own counts (weights 1/B_mb, no global
    Normalisers), the micro-batch losses averaged (÷k)."""
    parts = algo.estimate(batch).split(k)
    total = 0
    for p in parts:
        nb = p.logps.shape[0]
        own = dataclasses.replace(p, weights=torch.full((nb,), 1.0 / nb, dtype=D), norm=None)
        total = total + algo.loss(own).loss / k
    return grads(batch, total)[0]


@pytest.mark.parametrize("k, factors", [
    # token_mean full = Σ ℓ / N, N = 1+5+3+2+4+5 = 20. Naive = (1/k) Σ_j Σ_{mb j} ℓ / N_j, so every token of
    # micro-batch j has its gradient scaled by N / (k·N_j):
    # k = 2: rows 0–2 hold 1+5+3 = 9 tokens -> 20/18 = 10/9; rows 3–5 hold 2+4+5 = 11 -> 20/22 = 10/11
    (2, [(0, 3, 10 / 9), (3, 6, 10 / 11)]),
    # k = 3: rows 0–1: 6 tokens -> 20/18 = 10/9; rows 2–3: 5 -> 20/15 = 4/3; rows 4–5: 9 -> 20/27
    (3, [(0, 2, 10 / 9), (2, 4, 4 / 3), (4, 6, 20 / 27)]),
])
def test_per_micro_batch_token_counts_give_a_different_token_mean_gradient(k, factors):
    algo = compose({**GRPO, "source.aggregation": "token_mean"})
    batch = random_batch(3)
    g_full = grads(batch, algo.loss(batch).loss)[0]
    g_naive = _naive_micro_batch_grad(algo, batch, k)
    assert (g_naive - g_full).abs().max() > 1e-3           # the global normaliser matters
    for a, b, f in factors:
        assert torch.allclose(g_naive[a:b], f * g_full[a:b], rtol=0, atol=1e-9)


def test_per_micro_batch_normalisation_is_harmless_for_seq_mean_token_sum_with_equal_splits():
    # seq_mean_token_sum with equal micro-batches (k = 2: 3 rows each): (1/2)·Σ_{mb} (1/3) Σ_t ℓ = (1/6) Σ ℓ —
    # the same as the full batch, so the contrast above is specific to token counts.
    algo = compose({**GRPO, "source.aggregation": "seq_mean_token_sum"})
    batch = random_batch(3)
    g_full = grads(batch, algo.loss(batch).loss)[0]
    assert torch.allclose(_naive_micro_batch_grad(algo, batch, 2), g_full, rtol=0, atol=1e-9)


def test_split_refuses_a_batch_without_advantages_and_bad_part_counts():
    algo = compose(GRPO)
    batch = random_batch(4)
    with pytest.raises(InputError, match="estimate advantages"):
        batch.split(2)
    est = algo.estimate(batch)
    for k in (0, 7):
        with pytest.raises(InputError, match="valid: 1..6"):
            est.split(k)


# ----------------------------------------------------------------------------------- 2. aggregate()
# loss_mat = [[1, 2, 100], [4, 5, 6]], mask = [[1, 1, 0], [1, 1, 1]]: the 100 is padding and never counts.
# Σ_t m ℓ = [3, 15]; n = [2, 3].
LOSS_MAT = t([1.0, 2.0, 100.0], [4.0, 5.0, 6.0])
MASK = t([1.0, 1.0, 0.0], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("w, mode, expected", [
    # w = (1/4, 3/4)
    ((0.25, 0.75), "seq_mean_token_sum", 12.0),              # 0.25·3 + 0.75·15 = 0.75 + 11.25
    ((0.25, 0.75), "seq_mean_token_mean", 4.125),            # 0.25·3/2 + 0.75·15/3 = 0.375 + 3.75
    ((0.25, 0.75), "token_mean", 48 / 11),                   # tokens = 0.25·2 + 0.75·3 = 2.75; 12/2.75 = 48/11
    ((0.25, 0.75), "seq_mean_token_sum_norm", 4.0),          # max_len = T = 3: 12/3
    # w = (1/2, 1/2): the usual mini-batch
    ((0.5, 0.5), "seq_mean_token_sum", 9.0),                 # (3 + 15)/2
    ((0.5, 0.5), "seq_mean_token_mean", 3.25),               # (3/2 + 15/3)/2 = (1.5 + 5)/2
    ((0.5, 0.5), "token_mean", 3.6),                         # Σ mℓ / Σ m = 18/5 (tokens = 2.5; 9/2.5)
    ((0.5, 0.5), "seq_mean_token_sum_norm", 3.0),            # 9/3
])
def test_aggregate_by_hand(w, mode, expected):
    weights = torch.tensor(w, dtype=D)
    norm = Normalisers.of(MASK, weights)
    assert norm.max_len == 3.0
    assert float(aggregate(LOSS_MAT, MASK, weights, mode, norm)) == pytest.approx(expected, abs=1e-12)


def test_aggregate_uses_the_given_normalisers_and_refuses_unknown_modes():
    w = t(0.5, 0.5)
    # Dr. GRPO with a generation budget of 10: 9/10
    norm = Normalisers(tokens=2.5, max_len=10.0)
    assert float(aggregate(LOSS_MAT, MASK, w, "seq_mean_token_sum_norm", norm)) == pytest.approx(0.9)
    # a micro-batch (row 0 only) with the global normalisers: 0.5·3/2.5 = 0.6, and row 1: 0.5·15/2.5 = 3.0;
    # 0.6 + 3.0 = 3.6 = the full token_mean above
    assert float(aggregate(LOSS_MAT[:1], MASK[:1], w[:1], "token_mean", Normalisers.of(MASK, w))) == \
        pytest.approx(0.6)
    with pytest.raises(InputError, match="seq_mean_token_sum.*token_mean"):
        aggregate(LOSS_MAT, MASK, w, "token_sum", Normalisers.of(MASK, w))


# ------------------------------------------------------------------------------------------- 3. GAE
def test_gae_with_gamma_lambda_one_is_monte_carlo_return_minus_value():
    # r = [0.5, −1, 2]; G_t = Σ_{s≥t} r_s = [1.5, 1.0, 2.0]. With γ = λ = 1 the δ's telescope: A_t = G_t − V_t.
    r, m = t([0.5, -1.0, 2.0]), t([1.0, 1.0, 1.0])
    # V = [0.2, −0.3, 0.7]: A = [1.5 − 0.2, 1.0 + 0.3, 2.0 − 0.7] = [1.3, 1.3, 1.3]
    # (δ_2 = 2 − 0.7 = 1.3, δ_1 = −1 + 0.7 + 0.3 = 0, δ_0 = 0.5 − 0.3 − 0.2 = 0)
    adv, ret = gae(r, t([0.2, -0.3, 0.7]), m, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, t([1.3, 1.3, 1.3]), atol=1e-12)
    assert torch.allclose(ret, t([1.5, 1.0, 2.0]), atol=1e-12)          # returns = A + V = G
    # an exact critic V = G: every advantage is 0
    adv, ret = gae(r, t([1.5, 1.0, 2.0]), m, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.zeros(1, 3, dtype=D), atol=1e-12)
    assert torch.allclose(ret, t([1.5, 1.0, 2.0]), atol=1e-12)


def test_gae_gamma_09_lambda_05_by_hand():
    # r = [0.5, −1, 2], V = [0.2, −0.3, 0.7], γ = 0.9, λ = 0.5, γλ = 0.45, V after the last token = 0
    # δ_2 = 2 + 0.9·0 − 0.7 = 1.3
    # δ_1 = −1 + 0.9·0.7 + 0.3 = −0.07
    # δ_0 = 0.5 + 0.9·(−0.3) − 0.2 = 0.03
    # A_2 = 1.3; A_1 = −0.07 + 0.45·1.3 = 0.515; A_0 = 0.03 + 0.45·0.515 = 0.26175
    # returns = A + V = [0.46175, 0.215, 2.0]
    adv, ret = gae(t([0.5, -1.0, 2.0]), t([0.2, -0.3, 0.7]), t([1.0, 1.0, 1.0]), gamma=0.9, lam=0.5)
    assert torch.allclose(adv, t([0.26175, 0.515, 1.3]), atol=1e-12)
    assert torch.allclose(ret, t([0.46175, 0.215, 2.0]), atol=1e-12)


def test_gae_on_a_ragged_batch_zeroes_padding_and_ends_at_the_last_valid_token():
    # row 0 has 2 tokens; its padding holds garbage reward 9 and value 5 that must not leak in.
    # row 0: δ_1 = 2 + 0.9·0 − 0.7 = 1.3 (the next value is 0, not the padding's 5);
    #        δ_0 = 0.5 + 0.9·0.7 − 0.2 = 0.93; A_0 = 0.93 + 0.45·1.3 = 1.515; A = [1.515, 1.3, 0]
    #        returns = [1.715, 2.0, 0]
    # row 1 (full): as in the γ = 0.9, λ = 0.5 example above
    r = t([0.5, 2.0, 9.0], [0.5, -1.0, 2.0])
    v = t([0.2, 0.7, 5.0], [0.2, -0.3, 0.7])
    m = t([1.0, 1.0, 0.0], [1.0, 1.0, 1.0])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.5)
    assert torch.allclose(adv, t([1.515, 1.3, 0.0], [0.26175, 0.515, 1.3]), atol=1e-12)
    assert torch.allclose(ret, t([1.715, 2.0, 0.0], [0.46175, 0.215, 2.0]), atol=1e-12)


def _gae_algo(**over):
    base = {"reward.baseline": "gae", "reward.gamma": 0.9, "reward.lam": 0.5, "reference.kind": "none",
            "source.clip": 0.2}
    return compose({**base, **over})


def test_gae_through_estimate_places_the_reward_at_the_last_token():
    # task reward 2 for both rows, at index length − 1 (no KL: reference none); V as above
    # row 0 (2 tokens): r = [0, 2]; δ_1 = 2 − 0.7 = 1.3; δ_0 = 0 + 0.9·0.7 − 0.2 = 0.43;
    #   A_0 = 0.43 + 0.45·1.3 = 1.015; A = [1.015, 1.3, 0]; returns = [1.215, 2.0, 0]
    # row 1 (3 tokens): r = [0, 0, 2]; δ_2 = 1.3; δ_1 = 0 + 0.63 + 0.3 = 0.93; δ_0 = 0 − 0.27 − 0.2 = −0.47;
    #   A_1 = 0.93 + 0.585 = 1.515; A_0 = −0.47 + 0.45·1.515 = 0.21175; returns = [0.41175, 1.215, 2.0]
    lp = t([-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0])
    m = t([1.0, 1.0, 0.0], [1.0, 1.0, 1.0])
    v = t([0.2, 0.7, 5.0], [0.2, -0.3, 0.7])
    b = SampleBatch(lp, lp, lp, t(2.0, 2.0), torch.tensor([0, 1]), t(0.5, 0.5), response_mask=m,
                    values=v.clone(), old_values=v)
    est = _gae_algo().estimate(b)
    assert torch.allclose(est.advantages, t([1.015, 1.3, 0.0], [0.21175, 1.515, 1.3]), atol=1e-12)
    assert torch.allclose(est.returns, t([1.215, 2.0, 0.0], [0.41175, 1.215, 2.0]), atol=1e-12)


def test_whiten_by_hand():
    # one row [1, 3] (+ padding 50): mean 2, variance ((−1)² + 1²)/2 = 1 -> [−1, 1, 0]·(1 + 1e-8)^(−1/2)
    out = whiten(t([1.0, 3.0, 50.0]), t([1.0, 1.0, 0.0]), t(1.0))
    assert torch.allclose(out, t([-1.0, 1.0, 0.0]), atol=1e-7)


def test_gae_without_old_values_is_an_input_error():
    lp = t([-1.0, -1.0])
    b = SampleBatch(lp, lp, lp, t(1.0), torch.tensor([0]), t(1.0))
    with pytest.raises(InputError, match="old_values"):
        _gae_algo().loss(b)
    with pytest.raises(InputError, match="old_values"):
        _gae_algo().estimate(b)


# ---------------------------------------------------------------------------- 4. KL in the reward
# Two rows, T = 3, β = 0.5, rewards r = [2, −1].
# row 0 (length 2): old = [−1, −0.5 | −9], ref = [−1.5, −0.25 | −0.1] -> k1 = old − ref = [0.5, −0.25 | (pad)]
#   token rewards = [−β·0.5, r − β·(−0.25)] = [−0.25, 2.125], Σ = 1.875 = 2 − 0.5·0.25 = r − β·Σ k1
# row 1 (length 3 = T): old = [−0.4, −2, −1], ref = [−0.6, −1, −1.3] -> k1 = [0.2, −1, 0.3], Σ k1 = −0.5
#   token rewards = [−0.1, 0.5, −1 − 0.15] = [−0.1, 0.5, −1.15], Σ = −0.75 = −1 − 0.5·(−0.5)
KL_OLD = t([-1.0, -0.5, -9.0], [-0.4, -2.0, -1.0])
KL_REF = t([-1.5, -0.25, -0.1], [-0.6, -1.0, -1.3])
KL_MASK = t([1.0, 1.0, 0.0], [1.0, 1.0, 1.0])


def _kl_batch(**kw):
    return SampleBatch(KL_OLD.clone(), KL_OLD, KL_REF, t(2.0, -1.0), torch.tensor([0, 1]), t(0.5, 0.5),
                       response_mask=KL_MASK, **kw)


def test_kl_in_reward_sequence_return_is_reward_minus_beta_sum_k1():
    algo = compose({"target.beta": 0.5})           # baseline none, kl_return sequence
    adv = algo.estimate(_kl_batch()).advantages
    # A = R broadcast over the valid tokens: row 0 1.875, row 1 −0.75; 0 at padding
    assert torch.allclose(adv, t([1.875, 1.875, 0.0], [-0.75, -0.75, -0.75]), atol=1e-12)


def test_kl_in_reward_token_rewards_sit_at_the_last_valid_token():
    # GAE with γ = λ = 1 and V = 0 gives A_t = Σ_{s≥t} r_s, exposing each token reward:
    # row 0: A = [−0.25 + 2.125, 2.125, 0] = [1.875, 2.125, 0]. Had the reward been put at index length = 2
    #   (padding), A would be [−0.125, 0.125, 0].
    # row 1: A = [−0.1 + 0.5 − 1.15, 0.5 − 1.15, −1.15] = [−0.75, −0.65, −1.15]
    # A_0 = Σ_t r_t = r − β·Σ_t k1_t: 1.875 and −0.75
    algo = compose({"target.beta": 0.5, "reward.baseline": "gae", "reward.gamma": 1.0,
                              "reward.lam": 1.0})
    zeros = torch.zeros(2, 3, dtype=D)
    b = _kl_batch(values=zeros.clone(), old_values=zeros)
    assert b.last_token.tolist() == [1, 2]
    est = algo.estimate(b)
    assert torch.allclose(est.advantages, t([1.875, 2.125, 0.0], [-0.75, -0.65, -1.15]), atol=1e-12)


def test_kl_return_token_subtracts_each_tokens_own_k1():
    # A_t = r − β·k1_t: row 0 [2 − 0.25, 2 + 0.125, 0] = [1.75, 2.125, 0];
    # row 1 [−1 − 0.1, −1 + 0.5, −1 − 0.15] = [−1.1, −0.5, −1.15]
    algo = compose({"target.beta": 0.5, "reference.kl_return": "token"})
    adv = algo.estimate(_kl_batch()).advantages
    assert torch.allclose(adv, t([1.75, 2.125, 0.0], [-1.1, -0.5, -1.15]), atol=1e-12)


def test_kl_return_token_with_gae_is_refused_or_honoured():
    gae_over = {"target.beta": 0.5, "reward.baseline": "gae", "reward.gamma": 1.0, "reward.lam": 1.0}
    try:
        algo = compose({**gae_over, "reference.kl_return": "token"})
    except ConfigError:
        return                                                       # refusing the combination is fine
    zeros = torch.zeros(2, 3, dtype=D)
    seq = compose(gae_over).estimate(_kl_batch(values=zeros.clone(), old_values=zeros)).advantages
    tok = algo.estimate(_kl_batch(values=zeros.clone(), old_values=zeros)).advantages
    # accepted, it must change something: the per-token KL of 'token' does not accumulate over later tokens
    assert not torch.allclose(seq, tok)


# -------------------------------------------------------------------------------------------- 5. clip
def _surr(rho, adv, **kw):
    old = torch.full((len(rho),), -3.0, dtype=D)
    lp = (old + torch.log(torch.tensor(rho, dtype=D))).requires_grad_(True)
    loss = surrogate(lp, old, torch.tensor(adv, dtype=D), **kw)
    (g,) = torch.autograd.grad(loss.sum(), lp)
    return loss.detach().tolist(), g.tolist()


def test_ppo_clip_by_hand():
    # ε = 0.2: ℓ = −min(ρA, clip(ρ, 0.8, 1.2)·A); ∂ℓ/∂log π = −ρA on the unclipped branch, 0 on the clipped one
    # ρ 1.5, A +1: −min(1.5, 1.2) = −1.2, grad 0 | ρ 1.5, A −1: −min(−1.5, −1.2) = 1.5, grad 1.5
    # ρ 0.5, A +1: −min(0.5, 0.8) = −0.5, grad −0.5 | ρ 0.5, A −1: −min(−0.5, −0.8) = 0.8, grad 0
    loss, g = _surr([1.5, 1.5, 0.5, 0.5], [1.0, -1.0, 1.0, -1.0], clip=0.2)
    assert loss == pytest.approx([-1.2, 1.5, -0.5, 0.8], abs=1e-12)
    assert g == pytest.approx([0.0, 1.5, -0.5, 0.0], abs=1e-12)


def test_dapo_clip_higher_by_hand():
    # ε_low 0.2, ε_high 0.28: band [0.8, 1.28]
    # ρ 1.5, A +1: −1.28, grad 0 | ρ 1.25, A +1: −1.25 (inside the wider band), grad −1.25
    # ρ 1.5, A −1: 1.5, grad 1.5 | ρ 0.5, A +1: −0.5, grad −0.5 | ρ 0.5, A −1: 0.8, grad 0
    loss, g = _surr([1.5, 1.25, 1.5, 0.5, 0.5], [1.0, 1.0, -1.0, 1.0, -1.0], clip=0.2, clip_high=0.28)
    assert loss == pytest.approx([-1.28, -1.25, 1.5, -0.5, 0.8], abs=1e-12)
    assert g == pytest.approx([0.0, -1.25, 1.5, -0.5, 0.0], abs=1e-12)
    # with the symmetric clip ρ = 1.25, A = +1 is clipped to −1.2
    assert _surr([1.25], [1.0], clip=0.2)[0] == pytest.approx([-1.2])


def test_dual_clip_by_hand():
    # c = 3, ε = 0.2. For A < 0 the loss is min(PPO loss, −c·A) = min(·, 3|A|):
    # ρ 10, A −1: PPO −min(−10, −1.2) = 10 -> min(10, 3) = 3, grad 0
    # ρ 10, A −2: PPO 20 -> min(20, 6) = 6, grad 0
    # ρ 2, A −1: PPO 2 < 3, unchanged, grad −ρA = 2
    # ρ 10, A +1: A > 0 untouched: −min(10, 1.2) = −1.2, grad 0
    # ρ 0.5, A −1: 0.8 < 3, unchanged, grad 0
    loss, g = _surr([10.0, 10.0, 2.0, 10.0, 0.5], [-1.0, -2.0, -1.0, 1.0, -1.0], clip=0.2, dual_clip=3.0)
    assert loss == pytest.approx([3.0, 6.0, 2.0, -1.2, 0.8], abs=1e-12)
    assert g == pytest.approx([0.0, 0.0, 2.0, 0.0, 0.0], abs=1e-12)


def test_log_ratio_is_clamped_at_20():
    # log π − log π_old = −1 − (−51) = 50 -> clamped to 20, ρ = e^20; no gradient through the clamp
    e20 = math.exp(20.0)
    lp = t(-1.0).requires_grad_(True)
    old = t(-51.0)
    for kw, adv, expected in [({"clip": None}, 1.0, -e20),                      # −ρA
                              ({"clip": 0.2}, 1.0, -1.2),                       # clipped at 1.2
                              ({"clip": 0.2}, -1.0, e20),                       # −min(−e^20, −1.2)
                              ({"clip": 0.2, "dual_clip": 3.0}, -1.0, 3.0)]:    # capped at 3|A|
        loss = surrogate(lp, old, t(adv), **kw)
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
        (g,) = torch.autograd.grad(loss.sum(), lp)
        assert float(g) == 0.0


def test_log_ratio_50_through_the_algorithm_is_finite_with_zero_gradient_there():
    # reinforce, no clip, one row of 2 tokens, ref = old (k1 = 0, so A = r = 1 on both tokens), w = 1:
    # token 0: log-ratio 50 -> ρ = e^20; token 1: log-ratio −1 − (−1.2) = 0.2 -> ρ = e^0.2
    # loss = −(e^20 + e^0.2); ∂/∂log π = [0 (clamped), −e^0.2]
    lp = t([-1.0, -1.0]).requires_grad_(True)
    old = t([-51.0, -1.2])
    b = SampleBatch(lp, old, old, t(1.0), torch.tensor([0]), t(1.0))
    out = compose().loss(b)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(-(math.exp(20) + math.exp(0.2)), rel=1e-12)
    (g,) = torch.autograd.grad(out.loss, lp)
    assert g[0].tolist() == pytest.approx([0.0, -math.exp(0.2)], abs=1e-12)


# ----------------------------------------------------------------------------- 6. kl_in_loss level
# One row of 2 tokens, β = 0.5, reward 0 (so A = 0 and the surrogate contributes nothing), w = 1,
# log π = [−1, −2], log π_ref = [−1.5, −1] -> d = [0.5, −1], Σ d = −0.5.
def _kl_loss_row(level):
    lp = t([-1.0, -2.0]).requires_grad_(True)
    b = SampleBatch(lp, lp.detach(), t([-1.5, -1.0]), t(0.0), torch.tensor([0]), t(1.0))
    algo = compose({"target.beta": 0.5, "reference.kind": "kl_in_loss",
                                    "reference.estimator": "k3", "reference.level": level})
    out = algo.loss(b)
    (g,) = torch.autograd.grad(out.loss, lp)
    return out.loss.item(), g[0].tolist()


def test_kl_in_loss_token_level_k3_by_hand():
    # β·(k3(0.5) + k3(−1)) = 0.5·((e^−0.5 − 1 + 0.5) + (e − 1 − 1)) = 0.5·(0.10653066 + 0.71828183) = 0.41240624
    # ∂/∂log π_t = β·(1 − e^{−d_t}) = [0.5·(1 − e^−0.5), 0.5·(1 − e)] = [0.19673467, −0.85914091]
    loss, g = _kl_loss_row("token")
    assert loss == pytest.approx(0.5 * (math.exp(-0.5) - 0.5 + math.e - 2.0), abs=1e-12)
    assert loss == pytest.approx(0.41240624, abs=1e-8)
    assert g == pytest.approx([0.5 * (1 - math.exp(-0.5)), 0.5 * (1 - math.e)], abs=1e-12)


def test_kl_in_loss_sequence_level_k3_by_hand():
    # β·k3(Σ d) = 0.5·(e^0.5 − 1 − 0.5) = 0.5·0.14872127 = 0.07436064
    # ∂/∂log π_t = β·(1 − e^{−Σd}) = 0.5·(1 − e^0.5) = −0.32436064 for both tokens
    loss, g = _kl_loss_row("sequence")
    assert loss == pytest.approx(0.5 * (math.exp(0.5) - 1.5), abs=1e-12)
    assert loss == pytest.approx(0.07436064, abs=1e-8)
    assert g == pytest.approx([0.5 * (1 - math.exp(0.5))] * 2, abs=1e-12)


# ----------------------------------------------------------------------------------- padding garbage
def _padding_batch(pad_logp, pad_ref, dtype=D):
    # two rows in one group, row 0 padded after 2 tokens
    lp = torch.tensor([[-1.0, -2.0, pad_logp], [-1.0, -1.5, -0.5]], dtype=dtype)
    ref = torch.tensor([[-1.5, -1.0, pad_ref], [-1.2, -1.1, -1.0]], dtype=dtype)
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=dtype)
    return SampleBatch(lp, lp.clone(), ref, torch.tensor([1.0, 0.0], dtype=dtype), torch.tensor([0, 0]),
                       torch.tensor([0.5, 0.5], dtype=dtype), response_mask=m)


def test_moderate_garbage_at_padding_does_not_change_the_loss():
    algo = compose(GRPO)
    clean = algo.loss(_padding_batch(-1.0, -1.0)).loss.item()
    assert algo.loss(_padding_batch(-30.0, -0.1)).loss.item() == pytest.approx(clean, abs=1e-12)


@pytest.mark.parametrize("pad_logp, pad_ref, dtype", [
    (-800.5, -0.5, torch.float64),     # d = −800 at padding: e^800 overflows float64
    (-95.0, -2.0, torch.float32),      # d = −93 at padding: e^93 ≈ 2.5e40 overflows float32 (max 3.4e38)
])
def test_extreme_garbage_at_padding_does_not_change_the_k3_loss(pad_logp, pad_ref, dtype):
    algo = compose(GRPO)
    clean = algo.loss(_padding_batch(-1.0, -1.0, dtype)).loss.item()
    assert algo.loss(_padding_batch(pad_logp, pad_ref, dtype)).loss.item() == pytest.approx(clean, abs=1e-6)


# -------------------------------------------------------------------------------------- 7. bad input
def _sample(**kw):
    base = dict(logps=t([-1.0, -2.0], [-0.5, -0.5]), old_logps=t([-1.0, -2.0], [-0.5, -0.5]),
                ref_logps=t([-1.0, -1.0], [-1.0, -1.0]), rewards=t(1.0, 0.0), group=torch.tensor([0, 0]),
                weights=t(0.5, 0.5))
    base.update(kw)
    return SampleBatch(**base)


@pytest.mark.parametrize("kw, match", [
    (dict(weights=t(0.3, 0.3)), r"weights must sum to 1.*0\.6"),
    (dict(weights=t(1.5, -0.5)), r"weights must be >= 0"),
    (dict(logps=t([0.5, -2.0], [-0.5, -0.5])), r"logps holds log-probabilities above 0"),
    (dict(response_mask=t([1.0, 1.0], [0.0, 0.0])), r"no response token \(rows \[1\]\)"),
    (dict(response_mask=t([0.0, 1.0], [1.0, 1.0])), r"left-aligned"),
    (dict(logps=torch.zeros(0, 2, dtype=D), old_logps=torch.zeros(0, 2, dtype=D),
          ref_logps=torch.zeros(0, 2, dtype=D), rewards=torch.zeros(0, dtype=D),
          group=torch.zeros(0, dtype=torch.int64), weights=torch.zeros(0, dtype=D)), r"empty \(B = 0\)"),
])
def test_bad_sample_batches_are_input_errors(kw, match):
    with pytest.raises(InputError, match=match):
        compose(GRPO).loss(_sample(**kw))


def test_pair_labels_outside_unit_interval_are_input_errors():
    one = lambda v: torch.tensor([v], dtype=D)
    b = PairBatch(one(-1.0), one(-2.0), one(-1.5), one(-1.5), one(1.0), one(1.5), one(1.0), one(1.0))
    with pytest.raises(InputError, match=r"labels must be probabilities in \[0, 1\]"):
        udrra.load("dpo").loss(b)


def test_a_sampled_singleton_group_is_an_input_error_for_group_baselines():
    b = _sample(group=torch.tensor([0, 1]))
    for baseline in ("leave_one_out", "group_norm", "group_mean"):
        with pytest.raises(InputError, match="at least 2 samples per group"):
            compose({"reward.baseline": baseline}).loss(b)


def test_k3_overflow_is_an_input_error_not_nan():
    # log π − log π_ref = −801 − (−1) = −800 on a real token: e^800 overflows float64 -> refused
    lp = t([-801.0, -1.0], [-0.5, -0.5])
    with pytest.raises(InputError, match="k3 KL term is not finite"):
        compose(GRPO).loss(_sample(logps=lp, old_logps=lp))


@pytest.mark.parametrize("over, match", [
    ({"source.aggregation": "bogus"},
     r"aggregation = 'bogus' is not valid; valid values: seq_mean_token_sum, seq_mean_token_mean, token_mean, "
     r"seq_mean_token_sum_norm"),
    ({"reward.baseline": "group_norm", "reward.gamma": 0.9}, r"gamma only apply to baseline 'gae'"),
    ({"reward.baseline": "leave_one_out", "reward.lam": 0.5, "reward.whiten": True},
     r"lam, whiten only apply to baseline 'gae'"),
    ({"reward.baseline": "leave_one_out", "source.n": 1}, r"baseline 'leave_one_out' needs \[source\] n >= 2"),
    ({"reward.baseline": "group_norm", "source.n": 1}, r"baseline 'group_norm' needs \[source\] n >= 2"),
    ({"reward.baseline": "group_mean", "source.n": 1}, r"baseline 'group_mean' needs \[source\] n >= 2"),
    ({"target.beta": "inf"}, r"\[target\] beta = inf must be > 0 and finite"),
])
def test_bad_compositions_are_config_errors(over, match):
    with pytest.raises(ConfigError, match=match):
        compose(over)


def test_dpo_with_infinite_beta_is_a_config_error():
    with pytest.raises(ConfigError, match=r"\[target\] beta = inf must be > 0 and finite"):
        udrra.load("dpo", {"target.beta": "inf"})


def test_cli_maps_config_errors_to_exit_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "udrra.cli", "show", "grpo", "--set", "source.aggregation=bogus"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err
    assert err.startswith("udrra: error:") and "aggregation" in err and "token_mean" in err
    assert proc.stdout == ""


# ----------------------------------------------------------------------------------- 8. T = 1
ON_POLICY = [n for n in udrra.catalog_names() if udrra.load(n).components.source.kind == "on_policy"]


def test_the_on_policy_catalog_holds_the_classic_algorithms():
    assert {"grpo", "ppo", "reinforce", "remax", "rloo"} <= set(ON_POLICY)


def _t1_batch(two_d: bool):
    # B = 4, groups of 2, old ≠ logps so ratios differ from 1 (some outside the clip band); critic values for
    # the compositions with a 'gae' baseline (ignored by the others)
    lp = t(-0.7, -1.9, -0.4, -2.5)
    old = t(-0.9, -1.5, -0.45, -2.0)
    ref = t(-1.0, -1.2, -0.8, -1.6)
    v, old_v = t(0.3, -0.2, 0.5, 1.0), t(0.1, -0.4, 0.9, 0.8)
    f = (lambda x: x[:, None]) if two_d else (lambda x: x)
    leaf = f(lp).clone().requires_grad_(True)
    vleaf = f(v).clone().requires_grad_(True)
    kw = dict(response_mask=torch.ones(4, 1, dtype=D)) if two_d else {}
    b = SampleBatch(leaf, f(old), f(ref), t(1.0, -0.5, 0.3, 2.0), torch.tensor([0, 0, 1, 1]),
                    torch.full((4,), 0.25, dtype=D), greedy_rewards=t(0.2, 0.2, 1.0, 1.0), values=vleaf,
                    old_values=f(old_v), **kw)
    return b, (leaf, vleaf)


@pytest.mark.parametrize("name", ON_POLICY)
def test_t1_loss_equals_the_same_batch_as_b_by_1_for_every_mode(name):
    # at T = 1 (m = 1, n_b = 1, tokens = Σ w = 1, max_len = 1) every mode is Σ_b w_b ℓ_b
    ref_loss = ref_grad = None
    for mode in MODES:
        algo = udrra.load(name, {"source.aggregation": mode})
        b1, leaves1 = _t1_batch(False)
        b2, leaves2 = _t1_batch(True)
        assert b1.logps.shape == (4, 1) and torch.equal(b1.response_mask, b2.response_mask)
        o1, o2 = algo.loss(b1), algo.loss(b2)
        g1 = torch.autograd.grad(o1.loss, leaves1, allow_unused=True)
        g2 = torch.autograd.grad(o2.loss, leaves2, allow_unused=True)
        assert o1.loss.item() == pytest.approx(o2.loss.item(), abs=1e-12)
        assert torch.allclose(g1[0], g2[0][:, 0], rtol=0, atol=1e-12)
        if g1[1] is not None:
            assert torch.allclose(g1[1], g2[1][:, 0], rtol=0, atol=1e-12)
        assert o1.loss.item() == pytest.approx(float((b1.weights * o1.per_row).sum()), abs=1e-12)
        if ref_loss is None:
            ref_loss, ref_grad = o1.loss.item(), g1[0]
        assert o1.loss.item() == pytest.approx(ref_loss, abs=1e-12), mode
        assert torch.allclose(g1[0], ref_grad, rtol=0, atol=1e-12), mode
