"""Each loss formula against values computed by hand from its paper's equation."""
import math

import pytest
import torch

import udrra
from udrra import PairBatch, SampleBatch
from udrra.components.reference import kl_estimate
from udrra.components.reward import advantages, surrogate


def softplus(x):
    return math.log1p(math.exp(x))


def pair(cw=-1.0, cl=-2.0, rw=-1.5, rl=-1.5, lw=1.0, ll=1.0):
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    return PairBatch(t(cw), t(cl), t(rw), t(rl), t(1.0), t(1.0), t(lw), t(ll))


def test_dpo_loss_is_minus_logsigmoid_of_beta_times_logratio_difference():
    # u_w = -1 - (-1.5) = 0.5, u_l = -0.5, beta 0.1 -> x = 0.1 -> -log sigma(0.1) = log(1 + e^-0.1)
    out = udrra.load("dpo", {"target.beta": 0.1}).loss(pair())
    assert out.loss.item() == pytest.approx(softplus(-0.1), abs=1e-12)
    assert out.metrics["rewards/margin"] == pytest.approx(0.1)
    assert out.metrics["rewards/accuracy"] == 1.0


def test_ipo_loss_is_squared_distance_of_h_to_one_over_two_tau():
    # h = 1; tau = 0.25 -> (1 - 2)^2 = 1; tau = 0.5 -> (1 - 1)^2 = 0
    assert udrra.load("ipo", {"target.beta": 0.25}).loss(pair()).loss.item() == pytest.approx(1.0)
    assert udrra.load("ipo", {"target.beta": 0.5}).loss(pair()).loss.item() == pytest.approx(0.0, abs=1e-15)


def test_hinge_loss_is_relu_one_minus_beta_h():
    assert udrra.load("hinge", {"target.beta": 0.5}).loss(pair()).loss.item() == pytest.approx(0.5)


def test_cdpo_loss_is_label_smoothed_logsigmoid():
    x = 0.1
    expected = 0.9 * softplus(-x) + 0.1 * softplus(x)
    out = udrra.load("cdpo", {"target.beta": 0.1, "reward.epsilon": 0.1}).loss(pair())
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


def test_rdpo_loss_is_chowdhury_unbiased_combination():
    x, e = 0.1, 0.2
    expected = ((1 - e) * softplus(-x) - e * softplus(x)) / (1 - 2 * e)
    out = udrra.load("rdpo", {"target.beta": 0.1, "reward.epsilon": e}).loss(pair())
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


def test_simpo_loss_uses_length_normalised_logprobs_and_margin_without_reference():
    # beta 2, gamma 0.5: x = 2 * (-1/2 - (-2/4)) - 0.5 = -0.5
    out = udrra.load("simpo", {"target.beta": 2.0, "reference.gamma": 0.5}).loss(pair(lw=2.0, ll=4.0, rw=-9.0, rl=-0.5))
    assert out.loss.item() == pytest.approx(softplus(0.5), abs=1e-12)


def test_population_label_takes_expectation_over_orientation():
    # label q = 0.7: 0.7 * l(x) + 0.3 * l(-x)
    b = pair()
    b.labels = torch.tensor([0.7], dtype=torch.float64)
    out = udrra.load("dpo", {"target.beta": 0.1}).loss(b)
    assert out.loss.item() == pytest.approx(0.7 * softplus(-0.1) + 0.3 * softplus(0.1), abs=1e-12)


def test_kl_estimators_k1_k2_k3_values():
    d = torch.tensor([math.log(2.0)], dtype=torch.float64)
    assert kl_estimate(d, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(d, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(d, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))


def test_rloo_advantage_is_reward_minus_mean_of_the_others():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    g = torch.zeros(4, dtype=torch.long)
    a = advantages(r, baseline="leave_one_out", group=g, weights=torch.full((4,), 0.25, dtype=torch.float64),
                   population=False)
    assert a.tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3])


def test_grpo_advantage_is_group_standardised_with_unbiased_std():
    r = torch.tensor([0.0, 1.0, 0.0, 1.0, 5.0, 5.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    a = advantages(r, baseline="group_norm", group=g, weights=torch.full((6,), 1 / 6, dtype=torch.float64),
                   population=False, eps=0.0)
    s = math.sqrt(1 / 3)  # unbiased std of (0, 1, 0, 1)
    assert a[:4].tolist() == pytest.approx([-0.5 / s, 0.5 / s, -0.5 / s, 0.5 / s])
    a_eps = advantages(r, baseline="group_norm", group=g, weights=torch.full((6,), 1 / 6, dtype=torch.float64),
                       population=False, eps=1e-6)
    assert a_eps[4:].tolist() == [0.0, 0.0]  # a constant group carries no signal


def test_remax_advantage_subtracts_greedy_reward():
    r = torch.tensor([1.0, 3.0], dtype=torch.float64)
    a = advantages(r, baseline="greedy", group=torch.tensor([0, 1]), weights=torch.full((2,), 0.5, dtype=torch.float64),
                   population=False, greedy_rewards=torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert a.tolist() == [-1.0, 1.0]


def test_ppo_clipped_surrogate_takes_pessimistic_branch():
    lp = torch.log(torch.tensor([1.5, 1.5], dtype=torch.float64))
    old = torch.zeros(2, dtype=torch.float64)
    s = surrogate(lp, old, torch.tensor([1.0, -1.0], dtype=torch.float64), 0.2)
    assert s.tolist() == pytest.approx([-1.2, 1.5])


def test_kl_in_reward_shapes_reward_by_minus_beta_log_ratio():
    # one sample, no baseline: loss = -rho * (r - beta * d), rho = 1
    algo = udrra.load("reinforce", {"target.beta": 0.5})
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    b = SampleBatch(logps=t(-1.0), old_logps=t(-1.0), ref_logps=t(-2.0), rewards=t(3.0), group=torch.tensor([0]),
                    weights=t(1.0))
    assert algo.loss(b).loss.item() == pytest.approx(-(3.0 - 0.5 * 1.0))


def test_nan_logps_are_rejected_with_a_clear_error():
    b = pair(cw=float("nan"))
    with pytest.raises(udrra.InputError, match="NaN or inf"):
        udrra.load("dpo").loss(b)


def test_wrong_batch_type_is_rejected():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    b = SampleBatch(t(-1.0), t(-1.0), t(-1.0), t(0.0), torch.tensor([0]), t(1.0))
    with pytest.raises(udrra.InputError, match="consumes PairBatch"):
        udrra.load("dpo").loss(b)
