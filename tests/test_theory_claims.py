"""Behaviours the theory predicts (../shared/reference/theory.md), each checked against a closed form."""
import math

import pytest
import torch

import udrra
from udrra.verify import total_variation, train as train_on_bandit


def bandit(seed=0, P=2, K=4):
    return udrra.Bandit.random(P=P, K=K, seed=seed)


def boltzmann_by_hand(b, beta, k=1):
    w = b.pi_ref * torch.exp(k * b.reward / beta)
    return w / w.sum(-1, keepdim=True)


def test_dpo_target_is_pi_ref_exp_r_over_beta():
    b = bandit()
    t = udrra.load("dpo", {"target.beta": 0.3}).target_distribution(b)
    assert torch.allclose(t, boltzmann_by_hand(b, 0.3), atol=1e-10)


def test_ipo_target_is_azar_closed_form_for_independent_pairs():
    # mu(y, y') = m(y) m(y'): pi* ∝ pi_ref exp(p(y ≻ m)/tau), p(y ≻ m) = sum_y' m(y') p(y ≻ y') (Azar Eq. 9)
    g = torch.Generator().manual_seed(3)
    K, tau = 4, 0.4
    a = torch.rand(1, K, K, generator=g, dtype=torch.float64)
    pref = torch.where(torch.eye(K, dtype=torch.bool), torch.full_like(a, 0.5), a.triu(1) + (1 - a.triu(1)).transpose(1, 2).tril(-1))
    m = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    ref = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    b = udrra.Bandit(ref, preference=pref, pair_distribution=m[:, :, None] * m[:, None, :])
    p_vs_m = (pref * m[:, None, :]).sum(-1)
    expected = ref * torch.exp(p_vs_m / tau)
    expected /= expected.sum(-1, keepdim=True)
    got = udrra.load("ipo", {"target.beta": tau}).target_distribution(b)
    assert torch.allclose(got, expected, atol=1e-10)
    assert udrra.verify(udrra.load("ipo", {"target.beta": tau}), b).tv < 1e-4


def test_ipo_two_arm_deterministic_preference_gives_sigmoid_half_over_tau():
    # Azar et al. §5.3.1: p(y1 ≻ y2) = 1, uniform pi_ref and mu -> pi*(y1) = sigma(0.5/tau)
    for tau in (0.25, 1.0):
        b = udrra.Bandit([[0.5, 0.5]], preference=[[[0.5, 1.0], [0.0, 0.5]]])
        res = udrra.verify(udrra.load("ipo", {"target.beta": tau}), b)
        assert res.learned[0, 0].item() == pytest.approx(1 / (1 + math.exp(-0.5 / tau)), abs=1e-6)


def test_deterministic_labels_drive_dpo_margin_without_bound_but_not_ipo_or_cdpo():
    b = udrra.Bandit([[0.5, 0.5]], preference=[[[0.5, 1.0], [0.0, 0.5]]])
    dpo = udrra.load("dpo", {"target.beta": 0.5})
    with pytest.raises(udrra.TargetError, match="never"):
        dpo.target_distribution(b)
    h = []
    for steps in (100, 1000):
        learned, _, _ = train_on_bandit(dpo, b, steps=steps)
        h.append(math.log(learned[0, 0] / learned[0, 1]))
    assert h[0] > 10 and (h[1] > h[0] or math.isinf(h[1]))  # still growing: no finite optimum
    eps, beta = 0.1, 0.5
    c = udrra.verify(udrra.load("cdpo", {"target.beta": beta, "reward.epsilon": eps}), b, steps=3000)
    # cDPO: beta * h* = log((1 - eps)/eps) (Mitchell 2023)
    assert beta * math.log(c.learned[0, 0] / c.learned[0, 1]) == pytest.approx(math.log((1 - eps) / eps), abs=1e-6)
    i = udrra.verify(udrra.load("ipo", {"target.beta": beta}), b, steps=3000)
    assert math.log(i.learned[0, 0] / i.learned[0, 1]) == pytest.approx(1 / (2 * beta), abs=1e-6)


def test_dpo_leaves_responses_absent_from_every_pair_unconstrained():
    # response 3 is in no pair: two initialisations reach the same (minimal) loss with different mass on it
    K = 4
    mu = torch.ones(1, K, K, dtype=torch.float64)
    mu[:, 3, :] = 0
    mu[:, :, 3] = 0
    b = udrra.Bandit([[0.25] * 4], reward=[[1.0, 0.0, -1.0, 0.5]], pair_distribution=mu)
    dpo = udrra.load("dpo", {"target.beta": 0.5})
    with pytest.raises(udrra.TargetError, match="no pair"):
        dpo.target_distribution(b)
    from udrra.bandit import bandit_batch
    res = []
    for init in (torch.tensor([[0.0, 0, 0, 0]]), torch.tensor([[0.0, 0, 0, 3.0]])):
        logits = (torch.log(b.pi_ref) + init).requires_grad_(True)
        opt = torch.optim.Rprop([logits], lr=0.05)
        for _ in range(500):
            out = dpo.loss(bandit_batch(dpo, b, logits, torch.log(b.pi_ref), exact=True))
            opt.zero_grad(); out.loss.backward(); opt.step()
        res.append((out.loss.item(), torch.softmax(logits.detach(), -1)[0, 3].item()))
    assert res[0][0] == pytest.approx(res[1][0], abs=1e-9)
    assert abs(res[0][1] - res[1][1]) > 0.1


def test_kl_in_loss_with_k1_gives_no_regularisation_argmax():
    algo = udrra.load("reinforce", {"reference.kind": "kl_in_loss", "reference.estimator": "k1",
                                     "target.beta": 0.5})
    assert algo.derived_target().kind == "argmax"
    assert "zero expected gradient" in algo.derived_target().note
    b = bandit(seed=1)
    res = udrra.verify(algo, b)
    onehot = torch.nn.functional.one_hot(b.reward.argmax(-1), 4).double()
    assert float(total_variation(res.learned, onehot).max()) < 1e-4


def test_kl_in_loss_with_k2_matches_kl_in_reward_boltzmann():
    algo = udrra.load("reinforce", {"reference.kind": "kl_in_loss", "reference.estimator": "k2",
                                     "target.beta": 0.5})
    b = bandit(seed=2)
    assert torch.allclose(algo.target_distribution(b), boltzmann_by_hand(b, 0.5), atol=1e-10)
    assert udrra.verify(algo, b).tv < 1e-4


def test_dpo_iter_after_k_rounds_equals_pi0_exp_k_r_over_beta():
    b = bandit(seed=4)
    for k in (1, 2, 3):
        algo = udrra.load("dpo_iter", {"target.beta": 1.0, "reference.rounds": k})
        res = udrra.verify(algo, b)
        assert float(total_variation(res.learned, boltzmann_by_hand(b, 1.0, k)).max()) < 1e-4


def test_grpo_target_satisfies_its_fixed_point_equation():
    # pi = pi_ref / (1 - (r - rbar_pi)/(beta sigma_pi)) with rbar, sigma the mean/std of r under pi itself
    b = bandit(seed=5, P=3, K=5)
    beta = 0.5
    pi = udrra.load("grpo", {"target.beta": beta}).target_distribution(b)
    rbar = (pi * b.reward).sum(-1, keepdim=True)
    sigma = ((pi * (b.reward - rbar) ** 2).sum(-1, keepdim=True)).sqrt()
    rhs = b.pi_ref / (1 - (b.reward - rbar) / (beta * sigma))
    assert torch.allclose(pi, rhs, atol=1e-9)
    # and it is not the nominal Boltzmann target
    assert float(total_variation(pi, boltzmann_by_hand(b, beta)).max()) > 1e-2


def test_k3_in_loss_without_std_is_forward_kl_optimum():
    algo = udrra.load("reinforce", {"reference.kind": "kl_in_loss", "reference.estimator": "k3", "target.beta": 0.7})
    b = bandit(seed=6)
    pi = algo.target_distribution(b)
    # beta * pi_ref / pi + r = lambda: the same constant for every response
    lam = 0.7 * b.pi_ref / pi + b.reward
    assert torch.allclose(lam, lam[:, :1].expand_as(lam), atol=1e-9)
    assert udrra.verify(algo, b).tv < 1e-4


def test_rdpo_on_data_flipped_at_its_epsilon_recovers_the_clean_boltzmann_target():
    b = bandit(seed=7)
    algo = udrra.load("rdpo", {"target.beta": 0.5, "reward.epsilon": 0.2, "source.label_noise": 0.2})
    assert torch.allclose(algo.target_distribution(b), boltzmann_by_hand(b, 0.5), atol=1e-9)


def test_dpo_on_noisy_labels_is_flatter_than_the_clean_target():
    b = bandit(seed=7)
    noisy = udrra.load("dpo", {"target.beta": 0.5, "source.label_noise": 0.2}).target_distribution(b)
    clean = boltzmann_by_hand(b, 0.5)
    ent = lambda p: -(p * p.log()).sum(-1)
    assert (ent(noisy) > ent(clean)).all()
