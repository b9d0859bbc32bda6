"""`udrra show` names the symbolic proof of each catalog target, and every named proof exists."""
import importlib
import sys
from pathlib import Path

import pytest

import udrra
from udrra.cli import main
from udrra.proof_index import PROOFS, proofs_for, why_none

ROOT = Path(__file__).resolve().parents[1]


def _resolve(node: str):
    """Import the function a node id ``proofs/<module>.py::<function>`` names."""
    path, func = node.split("::")
    assert (ROOT / path).is_file(), path
    assert path.startswith("proofs/") and path.endswith(".py") and path.count("/") == 1, path
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module("proofs." + Path(path).stem)
    return getattr(module, func)


@pytest.mark.parametrize("node", sorted({n for n, _ in PROOFS.values()}))
def test_every_registered_proof_exists(node):
    assert callable(_resolve(node))


@pytest.mark.parametrize("name", udrra.catalog_names())
def test_catalog_proofs_exist(name):
    algo = udrra.load(name)
    found = proofs_for(algo)
    assert found, f"{name}: {why_none(algo)}"
    for node, claim in found:
        assert callable(_resolve(node)) and claim


EXPECTED = {   # catalog algorithm -> proofs that must be among those it lists (task: which proof covers which)
    "dpo": {"dpo.py::dpo_stationary_at_boltzmann", "policy_gradient.py::dpo_gradient_is_weighted_policy_gradient"},
    "online_dpo": {"dpo.py::dpo_stationary_at_boltzmann",
                   "policy_gradient.py::dpo_gradient_is_weighted_policy_gradient"},
    "ipo": {"ipo.py::ipo_stationary_at_psi_target"},
    "cdpo": {"label_noise.py::cdpo_deterministic_margin", "dpo.py::dpo_stationary_at_boltzmann"},
    "rdpo": {"label_noise.py::rdpo_unbiased", "dpo.py::dpo_stationary_at_boltzmann"},
    "ppo": {"kl_regularised.py::kl_optimum_stationary", "kl_estimators.py::k1_in_reward_gradient_is_reverse_kl",
            "token_level.py::kl_in_reward_sequence_return_is_sequence_boltzmann"},
    "reinforce": {"kl_regularised.py::kl_optimum_stationary", "kl_estimators.py::k1_in_reward_gradient_is_reverse_kl",
                  "token_level.py::kl_in_reward_sequence_return_is_sequence_boltzmann"},
    "remax": {"kl_regularised.py::kl_optimum_stationary", "kl_estimators.py::k1_in_reward_gradient_is_reverse_kl",
              "token_level.py::kl_in_reward_sequence_return_is_sequence_boltzmann"},
    "rloo": {"kl_regularised.py::kl_optimum_stationary", "kl_estimators.py::k1_in_reward_gradient_is_reverse_kl",
             "token_level.py::kl_in_reward_sequence_return_is_sequence_boltzmann"},
    "grpo": {"kl_estimators.py::k3_loss_gradient_is_forward_kl", "grpo.py::grpo_fixed_point_stationary",
             "token_level.py::per_token_k3_is_per_state_forward_kl"},
    "dr_grpo": {"grpo.py::grpo_mean_only_stationary", "token_level.py::per_token_k3_is_per_state_forward_kl",
                "token_level.py::dr_grpo_finite_group_advantage"},
    "dpo_iter": {"iterated_dpo.py::iterated_dpo_induction"},
    "udrra_ra": {"udrra_equivalence.py::udrra_losses_share_boltzmann_target"},
    "udrra_rda": {"udrra_equivalence.py::udrra_losses_share_boltzmann_target"},
    "hinge": {"margin_losses.py::hinge_zero_loss_set"},
    "simpo": {"margin_losses.py::simpo_two_arm_optimum"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_catalog_lists_its_proof(name):
    listed = {node.removeprefix("proofs/") for node, _ in proofs_for(udrra.load(name))}
    assert EXPECTED[name] <= listed, listed


def test_proof_index_follows_components_not_names():
    # GRPO's composition with k1 in the loss: no regularisation, and the proof says so (not the GRPO fixed point)
    k1 = {n for n, _ in proofs_for(udrra.load("grpo", {"reference.estimator": '"k1"'}))}
    assert k1 == {"proofs/kl_estimators.py::k1_loss_zero_expected_gradient"}
    # an EMA reference has no symbolic proof: `show` says none, with the reason
    ema = udrra.load("ppo", {"reference.update": '"ema"', "reference.decay": 0.9})
    assert proofs_for(ema) == [] and "EMA" in why_none(ema)
    assert "proof: none (" in ema.describe()


def test_token_level_proofs_follow_kl_placement():
    def listed(name, **overrides):
        return {n.removeprefix("proofs/token_level.py::") for n, _ in
                proofs_for(udrra.load(name, {k.replace("__", "."): v for k, v in overrides.items()}))
                if n.startswith("proofs/token_level.py::")}
    seq, tok = "kl_in_reward_sequence_return_is_sequence_boltzmann", "per_token_kl_return_is_per_state_boltzmann"
    # the KL in the reward: summed into every token's return (sequence Boltzmann) or per token (per-state Boltzmann)
    assert listed("remax") == {seq}
    assert listed("remax", reference__kl_return='"token"') == {tok}
    # k2 per token in the loss has the per-token KL return's gradient; k3 per token / on the sequence log-ratio
    assert tok in listed("grpo", reference__estimator='"k2"')
    assert tok not in listed("grpo", reference__estimator='"k2"', reference__level='"sequence"')
    assert "per_token_k3_is_per_state_forward_kl" in listed("grpo")
    assert listed("grpo", reference__level='"sequence"') == {"sequence_k3_is_sequence_forward_kl"}
    # the finite-group advantage goes with the group-mean baseline only
    assert "dr_grpo_finite_group_advantage" in listed("dr_grpo")
    assert "dr_grpo_finite_group_advantage" not in listed("grpo") | listed("rloo")


def test_show_grpo_names_the_fixed_point_proof(capsys):
    assert main(["show", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "proof: proofs/grpo.py::grpo_fixed_point_stationary" in out
    assert "proof: proofs/kl_estimators.py::k3_loss_gradient_is_forward_kl" in out
    # the rest of `show` is unchanged: the proof lines sit between the target and the paper
    assert out.index("target (derived):") < out.index("proof: ") < out.index("paper: ")
