"""Property tests: every catalog algorithm reaches its analytic target on drawn bandits.

Drawn instances: P ≤ 3 prompts, K ≤ 6 responses, π_ref with full support, N(0, 1) rewards, β ∈ [0.05, 2].
Exact population training must reach TV < 1e-4; sampled mini-batch training TV < 2e-2.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import udrra

CATALOG = udrra.catalog_names()


def draw_bandit(P, K, seed):
    return udrra.Bandit.random(P=P, K=K, seed=seed)


@pytest.mark.parametrize("name", CATALOG)
@settings(max_examples=6, suppress_health_check=[HealthCheck.too_slow])
@given(P=st.integers(1, 3), K=st.integers(2, 6), seed=st.integers(0, 10_000), beta=st.floats(0.05, 2.0))
def test_exact_training_reaches_analytic_target(name, P, K, seed, beta):
    algo = udrra.load(name, {"target.beta": beta})
    res = udrra.verify(algo, draw_bandit(P, K, seed), exact=True)
    assert res.passed, (name, res.tv, res.margin_violation, res.steps)


@pytest.mark.parametrize("name", CATALOG)
@settings(max_examples=1, suppress_health_check=[HealthCheck.too_slow])
@given(P=st.integers(1, 3), K=st.integers(2, 6), seed=st.integers(0, 10_000), beta=st.floats(0.05, 2.0))
def test_sampled_training_reaches_analytic_target(name, P, K, seed, beta):
    algo = udrra.load(name, {"target.beta": beta})
    res = udrra.verify(algo, draw_bandit(P, K, seed), exact=False, seed=seed)
    assert res.tv < 2e-2 or (res.target is None and res.margin_violation < 2e-2), (name, res.tv, res.steps)
