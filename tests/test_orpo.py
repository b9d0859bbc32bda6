"""ORPO (Hong et al. 2024, arXiv:2403.07691): the loss against TRL's ORPO formula, the numerical target against
the two-arm closed form, and the refusals. Expected values are derived here, never read back from udrra."""
import math

import pytest
import torch
import torch.nn.functional as F

import udrra
from udrra.batch import PairBatch
from udrra.components.target import nll_regularised_fit
from udrra.errors import ConfigError, TargetError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_loss_equals_trls_orpo_formula_on_average_log_probs():
    """TRL's ORPOTrainer: log_odds = (l_w − l_l) − (log1p(−e^{l_w}) − log1p(−e^{l_l})) on average token log-probs,
    loss = NLL(chosen, per token) − λ·log σ(log_odds) (λ = TRL's beta)."""
    lam = 0.25
    algo = udrra.load("orpo", {"reference.lam": lam})
    sum_w = torch.tensor([-3.0, -12.0, -0.9], dtype=torch.float64)
    sum_l = torch.tensor([-5.0, -4.0, -2.7], dtype=torch.float64)
    len_w = torch.tensor([3.0, 6.0, 1.0], dtype=torch.float64)
    len_l = torch.tensor([4.0, 2.0, 3.0], dtype=torch.float64)
    batch = PairBatch(chosen_logps=sum_w, rejected_logps=sum_l, ref_chosen_logps=torch.zeros(3, dtype=torch.float64),
                      ref_rejected_logps=torch.zeros(3, dtype=torch.float64),
                      weights=torch.full((3,), 1 / 3, dtype=torch.float64), labels=torch.ones(3, dtype=torch.float64),
                      chosen_lengths=len_w, rejected_lengths=len_l)
    out = algo.loss(batch)
    lw, ll = sum_w / len_w, sum_l / len_l
    log_odds = (lw - ll) - (torch.log1p(-torch.exp(lw)) - torch.log1p(-torch.exp(ll)))
    trl = (-lw - lam * F.logsigmoid(log_odds)).mean()
    assert math.isclose(float(out.loss), float(trl), rel_tol=0, abs_tol=1e-12)
    assert math.isclose(out.metrics["nll"], float((-lw).mean()), abs_tol=1e-12)


@pytest.mark.parametrize("q,lam", [(0.7, 0.1), (0.9, 1.0), (0.55, 3.0), (0.3, 0.5)])
def test_two_arm_target_solves_the_cubic(q, lam):
    """Two single-token arms, one pair (both orders, weight ½ each), arm 1 wins with frequency q. With ℓ = logit p:
    dL/dℓ = (p − q) + 2λ((1 − q)p² − q(1 − p)²)/(p² + (1 − p)²) (proofs/orpo.py), so the optimum's p is a root in (0, 1)
    of (p − q)(p² + (1 − p)²) + 2λ((1 − q)p² − q(1 − p)²)."""
    M = torch.tensor([[[0.0, 0.5], [0.5, 0.0]]], dtype=torch.float64)
    Q = torch.tensor([[[0.5, q], [1 - q, 0.5]]], dtype=torch.float64)
    p = float(nll_regularised_fit(M, Q, beta=1.0, lam=lam, link="odds_ratio")[0, 0])
    cubic = (p - q) * (p ** 2 + (1 - p) ** 2) + 2 * lam * ((1 - q) * p ** 2 - q * (1 - p) ** 2)
    assert abs(cubic) < 1e-10 and 0 < p < 1
    # the NLL alone gives p = q; the odds-ratio term alone σ(2ℓ) = q, i.e. odds(p)² = q/(1 − q): p lies between them
    p_or = math.sqrt(q) / (math.sqrt(q) + math.sqrt(1 - q))
    assert min(q, p_or) < p < max(q, p_or)


def test_target_is_reached_and_moves_past_the_chosen_distribution():
    b = udrra.Bandit.random(P=2, K=4, seed=11)
    sft = udrra.load("orpo", {"reference.lam": 1e-6}).target_distribution(b)
    orpo = udrra.load("orpo", {"reference.lam": 1.0}).target_distribution(b)
    # λ → 0 leaves the chosen NLL alone: its minimiser is the chosen marginal c(y) = Σ_y' μ(y,y')p(y≻y') + μ(y',y)p(y≻y')
    mu, pref = b.pair_distribution.double(), b.preference_matrix().double()
    c = (mu * pref).sum(-1) + (mu.transpose(1, 2) * pref).sum(-1)
    c = c / c.sum(-1, keepdim=True)
    assert float((sft - c).abs().max()) < 1e-5
    assert float((orpo - c).abs().max()) > 1e-3
    assert udrra.verify(udrra.load("orpo", {"reference.lam": 1.0}), b, exact=True).passed


def test_deterministic_labels_have_no_target():
    b = udrra.Bandit.random(P=1, K=3, seed=0)
    with pytest.raises(TargetError, match="never the chosen response"):
        udrra.load("orpo", {"source.labels": "deterministic"}).target_distribution(b)


@pytest.mark.parametrize("over,match", [
    ({"reference.kind": "log_ratio"}, "odds_ratio' takes the odds"),
    ({"reward.link": "squared", "target.kind": "psi", "target.beta": 0.5}, "derived for links logsigmoid and odds_ratio"),
    ({"source.kind": "on_policy_pairs"}, "needs \\[source\\] kind 'offline_pairs'"),
    ({"reference.lam": 0.0}, "lam = 0.0 must be > 0"),
])
def test_bad_orpo_compositions_are_refused(over, match):
    with pytest.raises(ConfigError, match=match):
        udrra.load("orpo", over)


def test_orpo_has_no_sequence_target_and_says_why():
    sb = udrra.SequenceBandit.random(P=1, vocab=2, max_len=2, seed=3)
    res = udrra.verify(udrra.load("orpo"), sb)
    assert res.target_kind == "none" and "not a distribution over whole responses" in res.note
