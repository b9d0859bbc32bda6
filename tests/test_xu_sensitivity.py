"""The xu_synthetic testbed parameters of the §4.2 sensitivity study (experiments/xu_sensitivity_*.toml):
``reference = "sft"`` (with ``sft_data``, ``sft_steps``, ``sft_lr``), ``reward_model_weight_decay`` on the MLP
reward model, the run-scoped reward-model cache, and their configuration errors."""
import math

import pytest
import torch

from udrra.ablate import build_testbed, load_experiment, run_experiment, xu_sft_distribution
from udrra.errors import ConfigError, InputError

SMALL = {"kind": "xu_synthetic", "prompts": 4, "pairs_per_prompt": 2, "seed": 3, "hidden": 8}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def partners(tb, x):
    """The two responses prompt x's pairs compare with its optimal response x."""
    return [y for y in range(tb.bandit.shape[1]) if y != x and tb.covered[x, y]]


def test_sft_distribution_by_hand(one_torch_thread):
    # Prompt x has the pairs (x, a) and (x, b), labelled by Bradley–Terry on r (r(x) = 1.5). Chosen responses:
    # q(x) = (σ(1.5 − r_a) + σ(1.5 − r_b))/2, q(a) = σ(r_a − 1.5)/2, q(b) = σ(r_b − 1.5)/2, 0 on the uncovered
    # response. Both sides of every pair: q(x) = 1/2, q(a) = q(b) = 1/4.
    tb = build_testbed(SMALL)
    r = tb.bandit.reward
    chosen, pairs = xu_sft_distribution(tb.bandit, "chosen"), xu_sft_distribution(tb.bandit, "pairs")
    for x in range(4):
        a, b = partners(tb, x)
        ra, rb = float(r[x, a]), float(r[x, b])
        want = torch.zeros(4, dtype=torch.float64)
        want[x] = (sigmoid(1.5 - ra) + sigmoid(1.5 - rb)) / 2
        want[a], want[b] = sigmoid(ra - 1.5) / 2, sigmoid(rb - 1.5) / 2
        assert torch.allclose(chosen[x], want, atol=1e-12)
        want_pairs = torch.zeros(4, dtype=torch.float64)
        want_pairs[x], want_pairs[a], want_pairs[b] = 0.5, 0.25, 0.25
        assert torch.allclose(pairs[x], want_pairs, atol=1e-12)
    with pytest.raises(InputError, match="sft_data must be one of chosen, pairs"):
        xu_sft_distribution(tb.bandit, "all")


def test_sft_reference_is_the_mlp_fitted_to_the_chosen_responses(one_torch_thread):
    # SFT minimises the cross-entropy to q, whose minimiser is π = q: after 300 full-batch Adam steps π_ref is
    # within TV 0.01 of q (the initial MLP is ~0.5 away), so it puts more mass on the chosen responses (and
    # almost none, q = 0, on the uncovered ones) than the MLP at initialisation. The data and the reward are the
    # same; the training policy starts at the SFT MLP (base_logits reproduce π_ref).
    init = build_testbed(SMALL)
    sft = build_testbed({**SMALL, "reference": "sft", "sft_steps": 300})
    q = xu_sft_distribution(init.bandit, "chosen")
    tv = lambda p: float(0.5 * (p - q).abs().sum(-1).max())
    assert tv(sft.bandit.pi_ref) < 0.01 < 0.3 < tv(init.bandit.pi_ref)
    assert (sft.bandit.pi_ref.diagonal() > init.bandit.pi_ref.diagonal()).all()
    unc = ~init.covered
    assert float(sft.bandit.pi_ref[unc].max()) < 0.01 < float(init.bandit.pi_ref[unc].min())
    assert torch.equal(sft.bandit.reward, init.bandit.reward)
    assert torch.equal(sft.bandit.pair_distribution, init.bandit.pair_distribution)
    assert torch.allclose(torch.softmax(sft.base_logits, -1), sft.bandit.pi_ref, atol=1e-15)
    pairs = build_testbed({**SMALL, "reference": "sft", "sft_data": "pairs", "sft_steps": 300})
    assert float(0.5 * (pairs.bandit.pi_ref - xu_sft_distribution(init.bandit, "pairs")).abs().sum(-1).max()) < 0.01


def test_a_run_starts_at_the_sft_reference(tmp_path, one_torch_thread):
    # Step 0 of the run is the SFT policy itself: KL(π‖π_ref) = 0 and its out-of-data mass is π_ref's.
    text = """
[experiment]
base = "dpo"
steps = 1
seeds = 1
lr = 1e-7
metrics = ["kl_ref", "uncovered_mass"]
[testbed]
kind = "xu_synthetic"
prompts = 4
pairs_per_prompt = 2
seed = 3
hidden = 8
reference = "sft"
sft_steps = 300
"""
    (tmp_path / "e.toml").write_text(text)
    res = run_experiment(load_experiment(tmp_path / "e.toml"), tmp_path / "out", progress=False)
    sft = build_testbed({**SMALL, "reference": "sft", "sft_steps": 300})
    assert abs(res.rows[0]["kl_ref"]) < 1e-12
    want = float((sft.bandit.pi_ref * (~sft.covered)).sum(-1).mean())
    assert res.rows[0]["uncovered_mass"] == pytest.approx(want, abs=1e-12) and want < 0.01


def test_reward_model_weight_decay_shrinks_out_of_data_rewards(one_torch_thread):
    # The L2 term (wd/2)·|θ|² pulls every parameter to 0 and so r_φ (centred per prompt) to 0 as wd grows: with
    # wd = 1 the out-of-data rewards are under a quarter of the unregularised fit's (mean |r_φ| over uncovered
    # responses), and the learners still see the true reward in the metrics' bandit.
    spec = {**SMALL, "reward_model": "fit", "reward_model_steps": 300}
    free = build_testbed(spec)
    decayed = build_testbed({**spec, "reward_model_weight_decay": 1.0})
    unc = ~free.covered
    a, b = float(free.train_bandit.reward[unc].abs().mean()), float(decayed.train_bandit.reward[unc].abs().mean())
    assert b < 0.25 * a and a > 0.1
    assert torch.equal(free.bandit.reward, decayed.bandit.reward)


def test_reward_model_cache_returns_the_same_fit(one_torch_thread):
    # Variants that fit the same reward model share one fit per seed: the cached r_φ equals a fresh one, a
    # different π_ref (SFT) reuses it (the fit does not depend on π_ref), other settings or seeds do not.
    spec = {**SMALL, "reward_model": "fit", "reward_model_steps": 50}
    cache = {}
    first = build_testbed(spec, seed=1, rm_cache=cache).train_bandit.reward
    assert len(cache) == 1
    again = build_testbed({**spec, "reference": "sft", "sft_steps": 5}, seed=1, rm_cache=cache).train_bandit.reward
    assert len(cache) == 1 and torch.equal(first, again)
    assert torch.equal(first, build_testbed(spec, seed=1).train_bandit.reward)
    build_testbed({**spec, "reward_model_weight_decay": 0.1}, seed=1, rm_cache=cache)
    build_testbed(spec, seed=2, rm_cache=cache)
    assert len(cache) == 3


HEAD = """
[experiment]
base = "dpo"
[testbed]
kind = "xu_synthetic"
prompts = 4
pairs_per_prompt = 2
"""


@pytest.mark.parametrize("line, message", [
    ('reference = "pretrained"', r"reference must be one of init, sft .* got 'pretrained'"),
    ('sft_data = "all"', r"sft_data must be one of chosen, pairs, got 'all'"),
    ("sft_steps = 0", r"sft_steps must be >= 1, got 0"),
    ("sft_steps = 1.5", r"sft_steps must be an integer, got 1.5"),
    ("sft_lr = 0", r"sft_lr must be > 0, got 0"),
    ("reward_model_weight_decay = -0.1", r"reward_model_weight_decay must be >= 0 .* got -0.1"),
    ("reward_model_steps = 0", r"reward_model_steps must be >= 1, got 0"),
])
def test_bad_values_are_config_errors(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(HEAD + line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_experiment(path)
    # the same value in a variant's testbed table is refused too, naming the variant
    path.write_text(HEAD + f'[[variant]]\nlabel = "v"\ntestbed = {{ {line} }}\n')
    with pytest.raises(ConfigError, match="variant 'v' testbed: " + message):
        load_experiment(path)


def test_build_testbed_refuses_an_unknown_reference():
    with pytest.raises(InputError, match="reference must be one of init, sft, got 'best'"):
        build_testbed({**SMALL, "reference": "best"})
