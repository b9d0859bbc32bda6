"""f-DPO's Jensen–Shannon and α-divergence links (Wang et al. 2023, arXiv:2309.16240): the loss against TRL's
formulas, the derived target against the paper's closed form f'(π/π_ref) = (r − λ)/β, and training reaching it.

Expected values are written out here from the paper's Table 1 and from TRL 1.16's ``DPOTrainer`` source
(trl/trainer/dpo_trainer.py, the ``f_divergence_type`` branch), never read back from udrra's link table.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import udrra
from udrra.components.reward import preference_loss
from udrra.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trl_scores(logratios, kind, alpha_trl=0.5):
    """TRL 1.16: js f'(t) = log 2 + logsigmoid(log t); alpha f'(t) = (t^(α'−1) − 1)/(α' − 1), with α' = TRL's
    f_alpha_divergence_coef."""
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    return (torch.exp((alpha_trl - 1.0) * logratios) - 1.0) / (alpha_trl - 1.0)


@pytest.mark.parametrize("kind,alpha", [("js_divergence", None), ("alpha_divergence", 0.5),
                                        ("alpha_divergence", 0.2), ("alpha_divergence", 0.8)])
def test_loss_equals_trl_sigmoid_loss_on_f_scores(kind, alpha):
    gen = torch.Generator().manual_seed(0)
    u_w, u_l = torch.randn(64, generator=gen, dtype=torch.float64), torch.randn(64, generator=gen,
                                                                                 dtype=torch.float64)
    beta = 0.3
    ours = preference_loss(u_w, u_l, torch.ones(64, dtype=torch.float64), link=kind, beta=beta, alpha=alpha)
    a_trl = None if alpha is None else 1.0 - alpha       # TRL's coefficient is 1 − the paper's α
    trl = -F.logsigmoid(beta * (_trl_scores(u_w, kind, a_trl) - _trl_scores(u_l, kind, a_trl)))
    assert torch.allclose(ours, trl, atol=1e-12, rtol=0)


def _f_prime(rho, kind, alpha=None):
    """Wang et al. Table 1: JS f'(ρ) = log(2ρ/(1 + ρ)); α-divergence f'(ρ) = (1 − ρ^(−α))/α."""
    if kind == "js_divergence":
        return torch.log(2 * rho / (1 + rho))
    return (1 - rho ** (-alpha)) / alpha


@pytest.mark.parametrize("name,alpha", [("fdpo_js", None), ("fdpo_alpha", 0.5), ("fdpo_alpha", 0.9)])
@pytest.mark.parametrize("beta", [0.3, 1.5])
def test_target_satisfies_the_papers_closed_form(name, alpha, beta):
    """On Bradley–Terry labels the pairwise fit is r/β + const, so the target must satisfy
    f'(π(y)/π_ref(y)) − f'(π(y')/π_ref(y')) = (r(y) − r(y'))/β for every pair, and sum to 1."""
    over = {"target.beta": beta} | ({"target.alpha": alpha} if alpha else {})
    algo = udrra.load(name, over)
    kind = algo.components.target.kind
    b = udrra.Bandit.random(P=2, K=4, seed=3)
    pi = algo.target_distribution(b)
    assert torch.allclose(pi.sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-12)
    g = _f_prime(pi / b.pi_ref, kind, alpha)
    lhs = g[:, :, None] - g[:, None, :]
    r = b.reward_matrix()
    rhs = (r[:, :, None] - r[:, None, :]) / beta
    assert torch.allclose(lhs, rhs, atol=1e-8), (lhs - rhs).abs().max()
    dpo = udrra.load("dpo", {"target.beta": beta}).target_distribution(b)
    assert float((pi - dpo).abs().max()) > 1e-3          # not DPO's π_ref·exp(r/β)/Z


def test_small_alpha_approaches_reverse_kl_and_large_alpha_forward_kl():
    b = udrra.Bandit.random(P=2, K=4, seed=5)
    beta = 0.7
    dpo = udrra.load("dpo", {"target.beta": beta}).target_distribution(b)
    near0 = udrra.load("fdpo_alpha", {"target.beta": beta, "target.alpha": 1e-4}).target_distribution(b)
    near1 = udrra.load("fdpo_alpha", {"target.beta": beta, "target.alpha": 1 - 1e-4}).target_distribution(b)
    mid = udrra.load("fdpo_alpha", {"target.beta": beta, "target.alpha": 0.5}).target_distribution(b)  # in between
    assert float((near0 - dpo).abs().max()) < 1e-3
    # forward KL by hand: π = β·π_ref/(λ − r), λ > max r with Σπ = 1 (bisection written here)
    r = b.reward_matrix()
    for p in range(2):
        lo, hi = float(r[p].max()) + 1e-12, float(r[p].max()) + 100.0
        for _ in range(200):
            lam = (lo + hi) / 2
            if float((beta * b.pi_ref[p] / (lam - r[p])).sum()) > 1:
                lo = lam
            else:
                hi = lam
        by_hand = beta * b.pi_ref[p] / (lam - r[p])
        assert float((near1[p] - by_hand).abs().max()) < 1e-3
    assert float((mid - dpo).abs().max()) > 1e-3


def test_fdpo_alpha_on_the_sequence_testbed_is_the_bandit_target_over_whole_responses():
    sb = udrra.SequenceBandit.random(P=1, vocab=2, max_len=2, seed=2)
    res = udrra.verify(udrra.load("fdpo_alpha", {"target.beta": 0.5}), sb, exact=True)
    assert res.passed, (res.tv, res.steps)
    res = udrra.verify(udrra.load("fdpo_js", {"target.beta": 0.5, "reference.length_normalize": True}), sb)
    assert res.target_kind == "none" and "length-normalised" in res.note


@pytest.mark.parametrize("over,match", [
    ({"reference.kind": "none"}, "needs the ratio"),
    ({"target.alpha": 1.0}, r"alpha = 1.0 must be in \(0, 1\)"),
    ({"target.kind": "boltzmann", "target.beta": 0.1}, "inconsistent with"),
])
def test_bad_f_compositions_are_refused(over, match):
    with pytest.raises(ConfigError, match=match):
        udrra.load("fdpo_alpha", over)
