"""RAFT / best-of-n fine-tuning (Dong et al. 2023, arXiv:2304.06767): the best-of-n distribution against a brute-force
enumeration of ordered draws, the source's exact population, one round and iterated rounds reaching their targets."""
import itertools

import pytest
import torch

import udrra
from udrra.bandit import draw_rows
from udrra.components.target import best_of_n_policy
from udrra.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def brute_best_of_n(pi, r, n):
    """Every ordered n-tuple of draws with its probability; the first draw with the highest reward is kept."""
    K = len(pi)
    out = [0.0] * K
    for draws in itertools.product(range(K), repeat=n):
        prob = 1.0
        for y in draws:
            prob *= pi[y]
        best = max(r[y] for y in draws)
        out[next(y for y in draws if r[y] == best)] += prob
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("rewards", [[0.3, -1.0, 2.0, 0.5], [1.0, 1.0, -0.5, 1.0]])   # distinct, and a 3-way tie
def test_best_of_n_distribution_matches_the_enumeration_of_draws(n, rewards):
    pi = [0.1, 0.4, 0.2, 0.3]
    expected = brute_best_of_n(pi, rewards, n)
    got = best_of_n_policy(torch.tensor([pi], dtype=torch.float64), torch.tensor([rewards], dtype=torch.float64), n)
    assert torch.allclose(got[0], expected, atol=1e-12)


def test_exact_source_weights_and_sampled_draws_follow_the_best_of_n_distribution():
    b = udrra.Bandit.random(P=2, K=4, seed=4)
    algo = udrra.load("raft", {"source.n": 3, "reference.update": "frozen"})
    ib = draw_rows(algo, b, b.pi_ref, exact=True)
    w = torch.zeros(2, 4, dtype=torch.float64).index_put_((ib.prompt, ib.first), ib.weights, accumulate=True) * 2
    for p in range(2):
        assert torch.allclose(w[p], brute_best_of_n(b.pi_ref[p].tolist(), b.reward_matrix()[p].tolist(), 3),
                              atol=1e-12)
    ib = draw_rows(algo, b, b.pi_ref, exact=False, batch_size=20000, generator=torch.Generator().manual_seed(0))
    freq = torch.zeros(2, 4, dtype=torch.float64).index_put_((ib.prompt, ib.first), torch.ones_like(ib.weights),
                                                            accumulate=True) / 20000
    target = best_of_n_policy(b.pi_ref, b.reward_matrix(), 3)
    assert float((freq - target).abs().max()) < 5 * (0.25 / 20000) ** 0.5      # 5 binomial standard deviations


def test_one_round_reaches_best_of_n_and_rounds_move_toward_argmax():
    b = udrra.Bandit.random(P=2, K=4, seed=9)
    one = udrra.load("raft", {"reference.update": "frozen"})
    res = udrra.verify(one, b, exact=True)
    assert res.passed and torch.allclose(res.target, best_of_n_policy(b.pi_ref, b.reward_matrix(), 4), atol=1e-12)
    three = udrra.load("raft", {"reference.rounds": 3})
    res3 = udrra.verify(three, b, exact=True)
    assert res3.passed
    top = b.reward_matrix().argmax(-1)
    mass = lambda pi: pi.gather(1, top[:, None]).squeeze(1)   # noqa: E731
    assert bool((mass(res3.target) > mass(res.target)).all()) and bool((mass(res.target) > mass(b.pi_ref)).all())
    # by hand: three rounds = the best-of-n map applied three times
    pi = b.pi_ref
    for _ in range(3):
        pi = best_of_n_policy(pi, b.reward_matrix(), 4)
    assert torch.allclose(res3.target, pi, atol=1e-12)


def test_raft_bad_compositions_are_refused():
    with pytest.raises(ConfigError, match="cannot feed \\[reward\\] kind 'max_likelihood'"):
        udrra.load("raft", {"source.kind": "on_policy"})
    with pytest.raises(ConfigError, match="\\[reference\\] kind 'log_ratio' cannot be combined"):
        udrra.load("raft", {"reference.kind": "log_ratio"})


def test_one_round_on_the_sequence_testbed_is_best_of_n_over_whole_responses():
    sb = udrra.SequenceBandit.random(P=1, vocab=2, max_len=2, seed=3)
    res = udrra.verify(udrra.load("raft", {"reference.update": "frozen"}), sb, exact=True)
    assert res.passed
    assert torch.allclose(res.target, best_of_n_policy(sb.pi_ref_seq, sb.reward, 4), atol=1e-12)
    assert udrra.verify(udrra.load("raft"), sb).target_kind == "none"
