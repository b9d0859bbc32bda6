"""Verifying your own composition's target in your own test suite (udrra's CI runs this file).

Copy it next to your TOML: load the algorithm, draw bandits, assert the target. ``pytest --udrra-examples 20``
draws more bandits (the ``udrra`` pytest plugin comes with the package).
"""

from pathlib import Path

import torch
from hypothesis import given

import udrra
from udrra.testing import assert_reaches_target, assert_target_equals, bandits, settings

ALGO = udrra.load(Path(__file__).with_name("my_algorithm.toml"))


@settings()
@given(bandit=bandits(P=2, K=4))
def test_reaches_its_declared_boltzmann_target_exactly(bandit):
    """The population loss converges to the target its [target] table declares (TV < 1e-4)."""
    assert_reaches_target(ALGO, bandit)


@settings(max_examples=2)
@given(bandit=bandits(P=1, K=3))
def test_sampled_training_lands_near_it(bandit):
    """Mini-batches of n = 4 samples per prompt: TV < 2e-2 after 1000 Adam steps."""
    assert_reaches_target(ALGO, bandit, exact=False)


def test_the_target_is_my_closed_form():
    """My closed form, written out here: π(y|x) = π_ref(y|x)·exp(r(x, y)/β) / Z(x)."""
    bandit = udrra.Bandit.random(P=3, K=5, seed=7)
    unnormalised = bandit.pi_ref * torch.exp(bandit.reward / 0.3)
    assert_target_equals(ALGO, bandit, unnormalised / unnormalised.sum(-1, keepdim=True))
