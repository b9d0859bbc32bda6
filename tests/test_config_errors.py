"""Bad algorithm files get one clear error naming the table and what is valid."""
import subprocess
import sys

import pytest

import udrra
from udrra import ConfigError

BASE = {"target": "kind = 'boltzmann'\nbeta = 0.1", "source": "kind = 'offline_pairs'",
        "reward": "kind = 'preference'", "reference": "kind = 'log_ratio'"}


def write(tmp_path, **tables):
    t = {**BASE, **tables}
    text = "\n".join(f"[{k}]\n{v}\n" for k, v in t.items() if v is not None)
    p = tmp_path / "algo.toml"
    p.write_text(text)
    return str(p)


def test_unknown_algorithm_name_lists_the_catalog():
    with pytest.raises(ConfigError, match="unknown algorithm 'dop'.*dpo"):
        udrra.load("dop")


def test_malformed_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[target\nkind = ")
    with pytest.raises(ConfigError, match="malformed TOML"):
        udrra.load(str(p))


def test_unknown_kind_lists_valid_kinds(tmp_path):
    with pytest.raises(ConfigError, match=r"\[reward\] kind 'prefs' is unknown; valid kinds: preference"):
        udrra.load(write(tmp_path, reward="kind = 'prefs'"))


def test_missing_parameter(tmp_path):
    with pytest.raises(ConfigError, match=r"\[target\] kind 'boltzmann' needs parameter 'beta'"):
        udrra.load(write(tmp_path, target="kind = 'boltzmann'"))


def test_missing_table(tmp_path):
    with pytest.raises(ConfigError, match=r"missing table \[reference\]"):
        udrra.load(write(tmp_path, reference=None))


def test_preference_reward_with_on_policy_source_is_invalid(tmp_path):
    with pytest.raises(ConfigError, match=r"\[source\] kind 'on_policy' cannot feed \[reward\] kind 'preference'.*"
                                          r"offline_pairs, on_policy_pairs"):
        udrra.load(write(tmp_path, source="kind = 'on_policy'"))


def test_kl_in_reward_with_reward_regression_is_invalid(tmp_path):
    with pytest.raises(ConfigError, match=r"\[reference\] kind 'kl_in_reward' cannot be combined with \[reward\] "
                                          r"kind 'reward_regression'; valid \[reference\] kinds for it: log_ratio"):
        udrra.load(write(tmp_path, source="kind = 'offline_samples'", reward="kind = 'reward_regression'",
                         reference="kind = 'kl_in_reward'"))


def test_link_inconsistent_with_target_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="link 'squared' is inconsistent with \\[target\\] kind 'boltzmann'"):
        udrra.load(write(tmp_path, reward="kind = 'preference'\nlink = 'squared'"))


def test_link_is_derived_from_target_when_omitted(tmp_path):
    assert udrra.load(write(tmp_path, target="kind = 'psi'\nbeta = 0.5")).components.reward["link"] == "squared"


def test_bad_parameter_value_and_unknown_parameter(tmp_path):
    with pytest.raises(ConfigError, match="beta = -1.0 must be > 0"):
        udrra.load(write(tmp_path, target="kind = 'boltzmann'\nbeta = -1.0"))
    with pytest.raises(ConfigError, match="has no parameter 'betta'"):
        udrra.load(write(tmp_path, target="kind = 'boltzmann'\nbeta = 0.1\nbetta = 2"))


def test_overrides_set_parameters_in_one_place():
    a = udrra.load("cdpo", {"target.beta": 0.5, "reward.epsilon": 0.2})
    assert a.beta == 0.5 and a.components.reward["epsilon"] == 0.2
    with pytest.raises(ConfigError, match="TABLE.PARAM"):
        udrra.load("dpo", {"beta": 0.5})


def test_cli_usage_errors_exit_2_with_one_line():
    out = subprocess.run([sys.executable, "-m", "udrra.cli", "show", "nope"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "unknown algorithm 'nope'" in out.stderr


def test_cli_show_explains_grpo_true_fixed_point():
    out = subprocess.run([sys.executable, "-m", "udrra.cli", "show", "grpo"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "π_ref / (1 − (r − r̄_π)/(β·σ_π))" in out.stdout and "not π_ref·exp(r/β)/Z" in out.stdout


def test_bandit_rejects_bad_reference():
    with pytest.raises(udrra.InputError, match="sum to 1"):
        udrra.Bandit([[0.5, 0.6]], reward=[[0.0, 1.0]])
    with pytest.raises(udrra.InputError, match="non-negative"):
        udrra.Bandit([[1.2, -0.2]], reward=[[0.0, 1.0]])


def test_bandit_accepts_a_reference_without_full_support_and_keeps_targets_off_it():
    # Xu et al. 2404.10719 Table 1: π_ref = (½, ½, 0). Boltzmann target π_ref·e^{r/β}/Z with r = (1, 0, 5), β = 1:
    # (e, 1, 0)/(e + 1) by hand — the unsupported response gets nothing however large its reward.
    import math
    b = udrra.Bandit([[0.5, 0.5, 0.0]], reward=[[1.0, 0.0, 5.0]])
    assert not b.full_support
    assert b.log_pi_ref[0, 2] == pytest.approx(math.log(1e-30))
    t = udrra.load("ppo", {"target.beta": 1.0}).target_distribution(b)[0]
    assert t.tolist() == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1), 0.0], abs=1e-12)
