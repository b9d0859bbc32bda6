"""The exact sequence testbed (udrra.SequenceBandit): enumeration, log-probs, and sequence-level targets.

Expected values are derived by hand: closed forms on a two-token tree written out below, or the stationarity
identities of each case (module docstring of udrra.sequence) evaluated on the target with the conditional
expectations computed here by summing over responses — never read back from the solver.
"""
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import udrra
from udrra.cli import main as cli_main
from udrra.sequence import derive_sequence, sequence_target
from udrra.verify import EXACT_TOL as TOL

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tv(p, q):
    return float(0.5 * (p - q).abs().sum(-1).max())


@pytest.fixture(scope="module")
def sb():
    return udrra.SequenceBandit.random(P=2, vocab=3, max_len=3, seed=0)


def tiny(rewards, ref_root=(0.5, 0.5), ref_a=(0.3, 0.7)):
    """V = 2 (token 0 = 'a', 1 = EOS), L = 2: responses '$', 'a$', 'aa'; states '' and 'a'.
    ``rewards`` maps each response tuple to r."""
    ref = torch.tensor([[list(ref_root), list(ref_a)]], dtype=torch.float64)
    probe = udrra.SequenceBandit(ref, torch.zeros(1, 3), vocab=2, max_len=2)
    r = torch.tensor([[rewards[y] for y in probe.responses(0)]], dtype=torch.float64)
    return udrra.SequenceBandit(ref, r, vocab=2, max_len=2)


def prob(sb, dist, y, p=0):
    return float(dist.detach()[p, sb.responses(p).index(y)])


# ------------------------------------------------------------------------------------------- structure
def test_enumeration_counts_v3_l4():
    s = udrra.SequenceBandit.random(P=2, vocab=3, max_len=4, seed=1)
    ys = s.responses(0)
    assert len(ys) == 31 and len(set(ys)) == 31
    eos = [y for y in ys if y[-1] == 2]
    trunc = [y for y in ys if y[-1] != 2]
    assert len(eos) == 1 + 2 + 4 + 8 and len(trunc) == 16
    assert all(len(y) == 4 and 2 not in y for y in trunc)
    assert all(2 not in y[:-1] and len(y) <= 4 for y in eos)
    assert s.states_per_prompt == 15 and s.num_states == 30
    logits = torch.randn(s.num_states, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    total = torch.exp(s.sequence_logps(logits)).sum(-1)
    assert torch.allclose(total, torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s.pi_ref_seq.sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_sequence_logps_by_hand():
    s = tiny({(1,): 0.0, (0, 1): 0.0, (0, 0): 0.0})
    assert sorted(s.responses(0)) == [(0, 0), (0, 1), (1,)]
    # root: π(a) = 0.25, π($) = 0.75; after 'a': π(a|a) = 0.6, π($|a) = 0.4 (logits = log-probs + a constant)
    logits = torch.log(torch.tensor([[0.25, 0.75], [0.6, 0.4]], dtype=torch.float64)) + 1.7
    logits.requires_grad_(True)
    lp = s.sequence_logps(logits)
    assert prob(s, lp, (1,)) == pytest.approx(math.log(0.75), abs=1e-14)
    assert prob(s, lp, (0, 1)) == pytest.approx(math.log(0.25 * 0.4), abs=1e-14)
    assert prob(s, lp, (0, 0)) == pytest.approx(math.log(0.25 * 0.6), abs=1e-14)
    lp[0, s.responses(0).index((1,))].backward()      # d log π($)/d logits: only the root row, e_$ − π
    assert torch.allclose(logits.grad, torch.tensor([[-0.25, 0.25], [0.0, 0.0]], dtype=torch.float64))
    # the Bandit view: K = N responses with π_ref(y) = Π_t π_ref(y_t|s_t)
    view = s.to_bandit()
    assert view.pi_ref.shape == (1, 3)
    assert prob(s, view.pi_ref, (0, 0)) == pytest.approx(0.5 * 0.3)
    assert prob(s, view.pi_ref, (0, 1)) == pytest.approx(0.5 * 0.7)
    # per-state conditionals back from the sequence distribution
    back = s.state_probs_from_sequence(torch.exp(lp.detach()))
    assert torch.allclose(back[0], torch.tensor([[0.25, 0.75], [0.6, 0.4]], dtype=torch.float64), atol=1e-14)


def test_producer_batches_are_token_level(sb):
    from udrra.policy import TableCritic, TablePolicy
    from udrra.sequence import SequenceProducer
    algo = udrra.load("ppo")
    pol, ref, critic = TablePolicy(sb.log_ref_logits), TablePolicy(sb.log_ref_logits), TableCritic(sb.num_states)
    batch = SequenceProducer(algo, sb, pol, ref, critic, exact=True).collect()
    assert batch.logps.shape == (sb.P * sb.N, sb.L) and batch.old_values.shape == (sb.P * sb.N, sb.L)
    assert torch.equal(batch.lengths, sb.lengths.repeat(sb.P))
    seq = batch.sequence(batch.logps).reshape(sb.P, sb.N)
    assert torch.allclose(torch.exp(seq).reshape(-1) / sb.P, batch.weights, atol=1e-15)
    pairs = SequenceProducer(udrra.load("simpo"), sb, pol, ref, exact=True).collect()
    assert pairs.chosen_lengths.max() == sb.L and pairs.chosen_lengths.min() == 1


# ------------------------------------------------------------------------------------- catalog targets
@pytest.mark.parametrize("name", ["reinforce", "rloo", "ppo", "dpo", "ipo"])
def test_exact_training_reaches_sequence_target(sb, name):
    res = udrra.verify(udrra.load(name), sb, exact=True)
    assert res.target.shape == (sb.P, sb.N) and res.learned.shape == (sb.P, sb.N)
    assert res.tv < 1e-4 and res.passed, (name, res.tv, res.steps)
    if name in ("reinforce", "rloo", "ppo"):    # (i)/(v): Boltzmann over whole responses
        beta = udrra.load(name).beta
        boltz = torch.softmax(torch.log(sb.pi_ref_seq) + sb.reward / beta, -1)
        assert tv(res.target, boltz) < 1e-12


# --------------------------------------------------------------- (ii) per-token KL return vs (i) sequence KL
def test_per_token_kl_return_target_by_hand():
    beta = 0.5
    r = {(1,): 0.2, (0, 0): 1.0, (0, 1): -0.5}
    s = tiny(r)
    # (ii): π(·|a) ∝ π_ref(·|a)·exp(r/β); Q(root, a) = E_π[r | a]; π(·|root) ∝ π_ref·exp(Q/β) (no future KL)
    za = 0.3 * math.exp(1.0 / beta) + 0.7 * math.exp(-0.5 / beta)
    pa = {0: 0.3 * math.exp(1.0 / beta) / za, 1: 0.7 * math.exp(-0.5 / beta) / za}
    q_a = pa[0] * 1.0 + pa[1] * (-0.5)
    zr = 0.5 * math.exp(q_a / beta) + 0.5 * math.exp(0.2 / beta)
    root_a = 0.5 * math.exp(q_a / beta) / zr
    by_hand = {(1,): 1 - root_a, (0, 0): root_a * pa[0], (0, 1): root_a * pa[1]}
    algo = udrra.load("remax", {"reference.kl_return": "token", "target.beta": beta})
    target = sequence_target(algo, s)
    for y, v in by_hand.items():
        assert prob(s, target, y) == pytest.approx(v, abs=1e-12)
    # the sequence Boltzmann π_ref(y)·exp(r/β)/Z is different
    w = {(1,): 0.5, (0, 0): 0.15, (0, 1): 0.35}
    z = sum(w[y] * math.exp(r[y] / beta) for y in w)
    assert abs(by_hand[(0, 0)] - w[(0, 0)] * math.exp(1.0 / beta) / z) > 0.05
    res = udrra.verify(algo, s)
    assert res.tv < TOL


def test_remax_token_kl_reaches_per_state_target_not_sequence_boltzmann(sb):
    algo = udrra.load("remax", {"reference.kl_return": "token"})
    res = udrra.verify(algo, sb)
    boltz = torch.softmax(torch.log(sb.pi_ref_seq) + sb.reward / algo.beta, -1)
    assert res.target_kind == "per_state_boltzmann"
    assert tv(res.target, boltz) > 0.05
    assert res.tv < TOL and tv(res.learned, boltz) > 0.05
    seq = udrra.verify(udrra.load("remax"), sb)       # kl_return = "sequence": the sequence Boltzmann
    assert tv(seq.target, boltz) < 1e-12 and seq.tv < TOL


# -------------------------------------------------------------------- (iii) per-token k3 vs (iv) sequence k3
def conditional_q(sb, dist, p=0):
    """Q(s, a) = E_π[r | prefix s·a] and the mass of s·a, summed over responses: dicts keyed by prefix tuples."""
    mass, rew = {}, {}
    for y, pi, r in zip(sb.responses(p), dist[p].tolist(), sb.reward[p].tolist()):
        for t in range(1, len(y) + 1):
            mass[y[:t]] = mass.get(y[:t], 0.0) + pi
            rew[y[:t]] = rew.get(y[:t], 0.0) + pi * r
    return {k: rew[k] / mass[k] for k in mass}, mass


def test_token_k3_and_sequence_k3_targets_differ_and_are_reached(sb):
    tok = udrra.load("dr_grpo")                                   # k3 per token, r − E_π r, ω constant
    seq = udrra.load("dr_grpo", {"reference.level": "sequence"})
    beta = tok.beta
    t_tok, t_seq = sequence_target(tok, sb), sequence_target(seq, sb)
    assert tv(t_tok, t_seq) > 0.02
    ref_sv = sb.ref_state_probs
    for p in range(sb.P):
        # (iii): π_ref(a|s)/π(a|s) = 1 − (Q(s,a) − V(s))/β at every state, V(s) = E_π[Q(s, ·)]
        q, mass = conditional_q(sb, t_tok, p)
        for si, pre in enumerate(sb.prefixes):
            m_s = sum(mass.get(pre + (a,), 0.0) for a in range(sb.V))
            v_s = sum(mass[pre + (a,)] * q[pre + (a,)] for a in range(sb.V)) / m_s
            for a in range(sb.V):
                pi_as = mass[pre + (a,)] / m_s
                assert float(ref_sv[p, si, a]) / pi_as == pytest.approx(1 - (q[pre + (a,)] - v_s) / beta, abs=1e-9)
        # (iv): π_ref(y)/π(y) = 1 − (r(y) − E_π r)/β over whole responses
        rbar = float(t_seq[p] @ sb.reward[p])
        assert torch.allclose(sb.pi_ref_seq[p] / t_seq[p], 1 - (sb.reward[p] - rbar) / beta, atol=1e-9)
    for algo in (tok, seq):
        res = udrra.verify(algo, sb)
        assert res.tv < TOL, (algo.name, res.tv)
    assert tv(udrra.verify(tok, sb).learned, t_seq) > 0.02


def test_length_weighted_reinforce_is_a_length_tilt(sb):
    """(i) with ω = 1/|y| and no baseline: R(y)/|y| is the same for every response, = E_π R / E_π |y|."""
    algo = udrra.load("reinforce", {"source.aggregation": "seq_mean_token_mean"})
    target = sequence_target(algo, sb)
    R = sb.reward - algo.beta * (torch.log(target) - torch.log(sb.pi_ref_seq))
    c = R / sb.lengths
    assert float((c - c[:, :1]).abs().max()) < 1e-9
    assert torch.allclose(c[:, 0], (target * R).sum(-1) / (target * sb.lengths).sum(-1), atol=1e-9)
    assert abs(float(c[0, 0])) > 0.01
    res = udrra.verify(algo, sb)
    assert res.target_kind == "length_tilt" and res.tv < TOL


def test_discounted_critic_soft_bellman_by_hand():
    """(v) γ < 1 with the KL in the per-token reward: the discounted soft Bellman recursion."""
    beta, gamma = 0.5, 0.8
    r = {(1,): 0.2, (0, 0): 1.0, (0, 1): -0.5}
    s = tiny(r)
    v_a = beta * math.log(0.3 * math.exp(1.0 / beta) + 0.7 * math.exp(-0.5 / beta))
    q_root_a = gamma * v_a
    root_a = 0.5 * math.exp(q_root_a / beta) / (0.5 * math.exp(q_root_a / beta) + 0.5 * math.exp(0.2 / beta))
    pa0 = 0.3 * math.exp(1.0 / beta) / (0.3 * math.exp(1.0 / beta) + 0.7 * math.exp(-0.5 / beta))
    algo = udrra.load("ppo", {"reward.gamma": gamma, "target.beta": beta})
    target = sequence_target(algo, s)
    assert prob(s, target, (1,)) == pytest.approx(1 - root_a, abs=1e-12)
    assert prob(s, target, (0, 0)) == pytest.approx(root_a * pa0, abs=1e-12)
    res = udrra.verify(algo, s)
    assert res.target_kind == "discounted_soft_bellman" and res.tv < TOL


def test_no_target_is_reported_not_raised(sb):
    algo = udrra.load("ppo", {"source.aggregation": "seq_mean_token_mean"})  # GAE with ω = 1/|y|
    with pytest.raises(udrra.TargetError):
        derive_sequence(algo.components)
    res = udrra.verify(algo, sb, steps=3)
    assert res.target_kind == "none" and res.target is None and not res.passed and "gae" in res.note


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_sequence_json(capsys):
    assert cli_main(["verify", "dpo", "--testbed", "sequence", "--json", "--vocab", "2", "--max-len", "3",
                     "--prompts", "1"]) == 0
    obj = json.loads(capsys.readouterr().out.strip())
    assert obj["passed"] and obj["testbed"]["kind"] == "sequence"
    (pr,) = obj["prompts"]
    assert sorted(map(tuple, pr["responses"])) == [(0, 0, 0), (0, 0, 1), (0, 1), (1,)]
    assert sum(pr["pi_ref"]) == pytest.approx(1.0) and sum(pr["target"]) == pytest.approx(1.0)
    assert len(pr["reward"]) == len(pr["learned"]) == 4


# ----------------------------------------------------------------------------------------- property
#: sequence-level pair losses added with issue 11 whose sequence target is the bandit target over whole responses
#: (udrra.sequence._via_view), already drawn by tests/test_catalog_properties.py: each runs on one fixed testbed in
#: its own test file instead of drawn ones, to keep CI under 20 minutes. fdpo_alpha at β = 0.1 also converges
#: slowly there (its link saturates at 1/α: 6,412 exact steps on P=2, V=2, L=3, seed 1, measured).
#: orpo has no sequence target (length-normalised NLL and odds; tests/test_orpo.py checks that it says so), nor has
#: raft's reset sampler (one round is checked in tests/test_raft.py).
FIXED_SEQUENCE_ONLY = ("fdpo_js", "fdpo_alpha", "nca", "orpo", "raft")
DRAWN = [n for n in udrra.catalog_names() if n not in FIXED_SEQUENCE_ONLY]


@pytest.mark.parametrize("name", DRAWN)
@settings(max_examples=4, suppress_health_check=[HealthCheck.too_slow])
@given(P=st.integers(1, 2), V=st.integers(2, 3), L=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_exact_training_reaches_sequence_target_on_drawn_testbeds(name, P, V, L, seed):
    s = udrra.SequenceBandit.random(P=P, vocab=V, max_len=L, seed=seed)
    res = udrra.verify(udrra.load(name), s, exact=True)
    assert res.passed, (name, P, V, L, seed, res.tv, res.target_kind, res.note)


#: sampled mini-batches on the sequence testbed: TV < SEQ_SAMPLED_TOL after 1,000 Adam steps at β ∈ [0.5, 2]. Left
#: out, with their exact-mode verification above standing for them: the hinge link (its margins are reached slowly
#: from noisy pairs: margin violation 0.49 after 1,000 steps at β = 1) and SimPO (TV 0.067 there: length-normalised
#: log-ratios over 15 responses converge slowly); DAPO has no β (argmax).
SEQ_SAMPLED_TOL = 3e-2


@pytest.mark.parametrize("name", [n for n in DRAWN if n not in ("hinge", "simpo")])
@settings(max_examples=1, suppress_health_check=[HealthCheck.too_slow])
@given(P=st.integers(1, 2), V=st.integers(2, 3), L=st.integers(1, 3), seed=st.integers(0, 10_000),
       beta=st.floats(0.5, 2.0))
def test_sampled_training_reaches_sequence_target_on_drawn_testbeds(name, P, V, L, seed, beta):
    s = udrra.SequenceBandit.random(P=P, vocab=V, max_len=L, seed=seed)
    algo = udrra.load(name) if name == "dapo" else udrra.load(name, {"target.beta": beta})
    res = udrra.verify(algo, s, exact=False, seed=seed)
    assert res.tv < SEQ_SAMPLED_TOL, (name, P, V, L, seed, beta, res.tv)
