"""NCA, pairwise (Chen et al. 2024, arXiv:2402.05369; TRL ``nca_pair``): the loss against TRL's formula and the
numerical target against closed forms derived by hand (proofs/nca.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

import udrra
from udrra.batch import PairBatch
from udrra.components.target import nca_fit
from udrra.errors import ConfigError, TargetError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_loss_equals_trls_nca_pair_formula():
    beta = 0.3
    algo = udrra.load("nca", {"target.beta": beta})
    gen = torch.Generator().manual_seed(1)
    lw, ll, rw, rl = (-torch.rand(5, generator=gen, dtype=torch.float64) * 5 for _ in range(4))
    one = torch.ones(5, dtype=torch.float64)
    out = algo.loss(PairBatch(chosen_logps=lw, rejected_logps=ll, ref_chosen_logps=rw, ref_rejected_logps=rl,
                              weights=one / 5, labels=one, chosen_lengths=one, rejected_lengths=one))
    cr, rr = beta * (lw - rw), beta * (ll - rl)          # TRL: chosen_rewards, rejected_rewards
    trl = (-F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)).mean()
    assert math.isclose(float(out.loss), float(trl), abs_tol=1e-12)


@pytest.mark.parametrize("q", [0.6, 0.8, 0.95])
def test_two_arm_optimum_at_beta_one_is_the_label_frequency(q):
    """proofs/nca.py: two arms, uniform π_ref, β = 1: dL/dℓ ∝ (p − q)(4p² − 4p + 3), whose only real root is p = q."""
    M = torch.tensor([[[0.0, 0.5], [0.5, 0.0]]], dtype=torch.float64)
    Q = torch.tensor([[[0.5, q], [1 - q, 0.5]]], dtype=torch.float64)
    p = nca_fit(M, Q, torch.tensor([[0.5, 0.5]], dtype=torch.float64), beta=1.0)[0, 0]
    assert abs(float(p) - q) < 1e-10


def test_target_differs_from_dpo_and_is_reached():
    b = udrra.Bandit.random(P=2, K=4, seed=2)
    nca = udrra.load("nca", {"target.beta": 0.5})
    pi = nca.target_distribution(b)
    dpo = udrra.load("dpo", {"target.beta": 0.5}).target_distribution(b)
    assert float((pi - dpo).abs().max()) > 1e-3
    assert udrra.verify(nca, b, exact=True).passed


def test_never_chosen_responses_have_no_target_and_bad_sources_are_refused():
    with pytest.raises(TargetError, match="never chosen"):
        udrra.load("nca", {"source.labels": "deterministic"}).target_distribution(udrra.Bandit.random(P=1, K=3))
    with pytest.raises(ConfigError, match="cannot feed \\[reward\\] kind 'noise_contrastive'"):
        udrra.load("nca", {"source.kind": "on_policy"})


def test_nca_on_the_sequence_testbed_is_the_bandit_target_over_whole_responses():
    sb = udrra.SequenceBandit.random(P=1, vocab=2, max_len=2, seed=3)
    res = udrra.verify(udrra.load("nca", {"target.beta": 0.5}), sb, exact=True)
    assert res.passed and "whole responses" in res.note, (res.tv, res.steps)
