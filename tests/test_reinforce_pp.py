"""REINFORCE++ (Hu 2025, arXiv:2501.03262): KL-shaped token rewards, returns-to-go G_t = Σ_{s≥t} r_s (γ = 1),
whitened over the batch's response tokens, clipped surrogate, no critic. Expected values are computed by hand."""
import math

import pytest
import torch

import udrra
from udrra.batch import SampleBatch
from udrra.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_advantages_are_whitened_returns_to_go_by_hand():
    beta = 0.5
    algo = udrra.load("reinforce_pp", {"target.beta": beta})
    # two responses: 3 tokens and 1 token (padded to T = 3); k1_t = old − ref per token
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    rewards = torch.tensor([2.0, -1.0], dtype=torch.float64)
    batch = SampleBatch(logps=old.clone(), old_logps=old, ref_logps=ref, response_mask=mask, rewards=rewards,
                        weights=torch.tensor([0.5, 0.5], dtype=torch.float64),
                        group=torch.tensor([0, 0]), population=False)
    adv = algo.estimate(batch).advantages
    # token rewards: row 0: −β·k1 = −0.5·(0.5, −1, 0) = (−0.25, 0.5, 0), + 2 at the last token → (−0.25, 0.5, 2)
    # returns-to-go: (2.25, 2.5, 2); row 1: −0.5·(−0.2) + (−1) = −0.9
    G = [2.25, 2.5, 2.0, -0.9]
    mean = sum(G) / 4                                   # equal row weights: every token counts once
    std = math.sqrt(sum((g - mean) ** 2 for g in G) / 4)
    expected = torch.tensor([[(g - mean) / std for g in G[:3]], [(G[3] - mean) / std, 0.0, 0.0]],
                            dtype=torch.float64)
    assert torch.allclose(adv, expected, atol=1e-6)


@pytest.mark.parametrize("over,match", [
    ({"reference.kind": "kl_in_loss"}, "needs \\[reference\\] kind 'kl_in_reward'"),
    ({"reference.kl_return": "token"}, "kl_return = 'token'"),
    ({"reward.lam": 0.9}, "only apply to baseline 'gae'"),
])
def test_reinforce_pp_bad_compositions_are_refused(over, match):
    with pytest.raises(ConfigError, match=match):
        udrra.load("reinforce_pp", over)


def test_sequence_target_is_boltzmann_over_whole_responses_and_is_reached():
    sb = udrra.SequenceBandit.random(P=1, vocab=2, max_len=3, seed=4)
    algo = udrra.load("reinforce_pp", {"target.beta": 0.5})
    res = udrra.verify(algo, sb, exact=True)
    boltz = torch.softmax(torch.log(sb.pi_ref_seq) + sb.reward / 0.5, -1)
    assert res.passed and float((res.target - boltz).abs().max()) < 1e-12
    with pytest.raises(udrra.TargetError, match="no derived target"):
        udrra.load("reinforce_pp", {"source.aggregation": "seq_mean_token_mean"}).derived_target() and \
            udrra.sequence.derive_sequence(udrra.load("reinforce_pp", {"source.aggregation":
                                                                         "seq_mean_token_mean"}).components)
