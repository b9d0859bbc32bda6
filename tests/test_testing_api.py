"""udrra.testing: the strategies draw what they promise, the assertions pass on right compositions and fail on
wrong ones with a message that shows the mismatch, and the example test file fails when its TOML is broken."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given

import udrra
from udrra.errors import InputError
from udrra.testing import (assert_reaches_target, assert_target_equals, bandits, sequence_bandits, settings)

ROOT = Path(__file__).resolve().parents[1]
#: declares Boltzmann, but k1 differentiated in the loss has zero expected gradient: the target is argmax r
WRONG = """[algorithm]
name = "wrong_k1_in_loss"
[target]
kind = "boltzmann"
beta = 0.3
[source]
kind = "on_policy"
n = 4
[reward]
kind = "explicit"
baseline = "group_mean"
[reference]
kind = "kl_in_loss"
estimator = "k1"
"""


@settings(max_examples=10)
@given(bandit=bandits(P=2, K=4, preference="random", coverage="partial"))
def test_bandits_draw_the_requested_shapes_preferences_and_coverage(bandit):
    assert bandit.shape == (2, 4)
    p, mu = bandit.preference, bandit.pair_distribution
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.allclose((p + p.transpose(1, 2))[:, off], torch.ones(1, dtype=torch.float64))
    assert ((p[:, off] > 0.04) & (p[:, off] < 0.96)).all()
    assert torch.equal(mu > 0, (mu > 0).transpose(1, 2))          # both orders of every covered pair
    for q in range(2):                                               # connected: 3 edges reach all 4 responses
        seen, frontier = {0}, [0]
        while frontier:
            a = frontier.pop()
            for b in range(4):
                if mu[q, a, b] > 0 and b not in seen:
                    seen.add(b)
                    frontier.append(b)
        assert seen == {0, 1, 2, 3}


@settings(max_examples=5)
@given(sb=sequence_bandits(P=1, vocab=3, max_len=2))
def test_sequence_bandits_draw_the_requested_testbed(sb):
    assert (sb.P, sb.V, sb.L, sb.N) == (1, 3, 2, 1 + 2 * 3)         # EOS, or one of 2 tokens then anything


def test_strategy_options_are_checked():
    with pytest.raises(InputError, match="valid values are gaussian, none"):
        bandits(reward="uniform")
    with pytest.raises(InputError, match="needs preference='random'"):
        bandits(reward="none")


def test_assert_target_equals_passes_on_the_closed_form_and_shows_a_wrong_one():
    algo = udrra.load("dpo", {"target.beta": 0.5})
    bandit = udrra.Bandit.random(P=2, K=3, seed=1)
    right = bandit.pi_ref * torch.exp(bandit.reward / 0.5)
    assert_target_equals(algo, bandit, right / right.sum(-1, keepdim=True))
    wrong = bandit.pi_ref * torch.exp(bandit.reward / 1.0)          # β forgotten
    with pytest.raises(AssertionError) as e:
        assert_target_equals(algo, bandit, lambda b: wrong / wrong.sum(-1, keepdim=True))
    msg = str(e.value)
    assert "dpo" in msg and "prompt 0" in msg and "prompt 1" in msg and "expected:" in msg and "derived:" in msg
    with pytest.raises(InputError, match=r"shape \(2, 3\)"):
        assert_target_equals(algo, bandit, torch.ones(3, 2) / 2)


def test_a_composition_that_does_not_derive_its_declared_target_fails_readably(tmp_path):
    path = tmp_path / "wrong.toml"
    path.write_text(WRONG)
    with pytest.raises(AssertionError, match=r"declares 'boltzmann', but its components derive 'argmax'.*zero "
                                             r"expected gradient"):
        assert_reaches_target(str(path), udrra.Bandit.random(P=1, K=3, seed=0))


def test_training_that_stops_short_fails_with_target_vs_learned_per_prompt():
    algo, bandit = udrra.load("dpo"), udrra.Bandit.random(P=2, K=3, seed=2)
    res = udrra.verify(algo, bandit, steps=3)                       # three Rprop steps: far from the target
    with pytest.raises(AssertionError) as e:
        assert_reaches_target(algo, bandit, steps=3)
    msg = str(e.value)
    assert f"max TV {res.tv:.3g} >= tolerance 0.0001" in msg
    assert msg.count("target:") == 2 and msg.count("learned:") == 2
    assert assert_reaches_target(algo, bandit).tv < 1e-4            # and passes when trained to convergence


def test_the_example_fails_in_pytest_when_its_toml_is_broken(tmp_path):
    """A user's test file, unchanged, on a broken composition: pytest fails and prints the mismatch."""
    shutil.copy(ROOT / "examples" / "test_my_algorithm.py", tmp_path / "test_my_algorithm.py")
    (tmp_path / "my_algorithm.toml").write_text(WRONG)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--udrra-examples", "1",
                        "-k", "declared", str(tmp_path / "test_my_algorithm.py")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "declares 'boltzmann', but its components derive 'argmax'" in r.stdout
