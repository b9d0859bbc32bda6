"""An exact sequence testbed: autoregressive table policies over a tiny vocabulary, every response enumerated.

The one-token bandit cannot tell apart compositions that differ only in *where* the KL and the advantage sit
along a response (per token or per sequence, which tokens a return sums over, how token losses are averaged).
:class:`SequenceBandit` can: P prompts, a vocabulary of V tokens of which the last (``V − 1``) is EOS, responses
of at most L tokens —

- k ≥ 0 non-EOS tokens followed by EOS (length k + 1 ≤ L), or
- L non-EOS tokens (truncated at the limit, no EOS),

so a prompt has N = Σ_{k<L} (V−1)^k + (V−1)^L responses (V = 3, L = 4: 1 + 2 + 4 + 8 = 15 with EOS and 16
truncated, N = 31). The *states* are the non-terminal prefixes (x, y_<t), t < L (S = Σ_{t<L} (V−1)^t per
prompt); each state has V actions, and at a state whose prefix has length L − 1 every action ends the response.
A policy is one logit vector per state (an ``nn.Module`` whose ``forward()`` is ``(P·S, V)``, e.g.
:class:`udrra.policy.TablePolicy`), π(y|x) = Π_t π(y_t | x, y_<t). Per-state tables can represent every
full-support distribution over whole responses, so sequence-level targets are reachable, and the per-token
structure of the loss is exactly that of an LM (token log-probs ``(B, T = L)``, a left-aligned response mask, the
task reward at the last response token, per-token KL terms, a per-state critic for GAE).

Training goes through :func:`udrra.loop.fit` with :class:`SequenceProducer` (the analogue of
:class:`udrra.bandit.BanditProducer`). Exact mode enumerates every response of every prompt with weight
π(y|x)/P (on-policy sources), or every pair with its probability (pair sources), by running the bandit's own
source code (:mod:`udrra.components.source`) on :meth:`SequenceBandit.to_bandit`, the bandit whose K "responses"
are the N sequences; sampled mode samples whole responses from π(·|x) (the same as sampling token by token).

Sequence-level targets (:func:`derive_sequence`): what training converges to, derived from the four components and
solved independently of the loss code (closed forms, per-state normalising roots by ``brentq``, backward induction
over the prefix tree, and outer fixed points on the baseline's mean / std). Notation: state s, action a;
ω(y) the aggregation weight of a response's tokens in the population loss (``seq_mean_token_sum``: 1;
``seq_mean_token_mean``: 1/|y|; ``token_mean`` and ``seq_mean_token_sum_norm``: one constant for the whole batch,
so = 1 for fixed points); A(y) = (R(y) − b)/σ the outcome advantage; w(s,a) = E_π[ω | s, a], F(s,a) =
E_π[ω·A | s, a] (expectations over the continuations of s·a under π); Q(s,a) = E_π[r | s, a].

Stationarity. With weights π(y)/P held fixed, ratio 1 and a per-token loss ℓ_t whose gradient is
g_t·∇log π(y_t|s_t), the gradient in the logits θ_s of state s is
reach(s)·Σ_a π(a|s)·G(s,a)·(e_a − π(·|s)) with G(s,a) = E_π[ω·g | s, a]; at a full-support fixed point
G(s, ·) is constant per state. The cases:

(i) ``kl_in_reward`` with ``kl_return = "sequence"`` and an outcome baseline (none, greedy, leave_one_out,
    group_mean, group_norm, batch_norm): g = −A with R = r − β·log π(y)/π_ref(y), so E_π[f | s, a] is constant
    per state for f = ω·A; at the last states that makes f equal over sibling responses, and by induction up the
    tree f ≡ c per prompt. ω ≡ 1: R constant, i.e. π(y|x) = π_ref(y|x)·exp(r/β)/Z (Boltzmann over whole
    responses) for every y-independent baseline. ω = 1/|y|: R(y) − b = σ·c·|y|, i.e.
    π ∝ π_ref·exp((r − κ|y|)/β) (a length tilt). A mean baseline b = E_π[R] (leave_one_out, group_mean,
    group_norm) gives κ·E_π|y| = 0 ⇒ κ = 0: Boltzmann again; without a baseline κ = E_π[R]/E_π[|y|] ≠ 0 and is
    solved by normalisation; batch_norm (the pooled mean) and greedy (b = r of the greedy decode) are outer
    fixed points on b.
(ii) ``kl_in_reward`` with ``kl_return = "token"`` (token t's return holds −β·k1_t of that token only) and
    ``kl_in_loss`` k2 at ``level = "token"``: G(s,a) = β·w(s,a)·d(s,a) − F(s,a), d = log π(a|s)/π_ref(a|s), so
    π(a|s) = π_ref(a|s)·exp((F(s,a) − c_s)/(β·w(s,a))), c_s normalising — per state, by backward induction from
    the leaves (F and w at s need π below s only). ω ≡ 1: π(a|s) ∝ π_ref(a|s)·exp(Q(s,a)/β) with Q the expected
    task reward only (no future KL): *not* the sequence Boltzmann, whose per-state form is the soft Bellman
    recursion π(a|s) ∝ π_ref(a|s)·exp(Q_soft(s,a)/β) with the future KL inside Q_soft.
(iii) ``kl_in_loss`` k3 at ``level = "token"`` (GRPO as implemented): k3'(d) = 1 − π_ref/π, so
    π(a|s) = β·w(s,a)·π_ref(a|s)/(λ_s + β·w(s,a) − F(s,a)), λ_s normalising (the forward-KL family per state).
    ω ≡ 1 and A = (r − r̄)/σ: π(a|s) = π_ref(a|s)/(1 − (Q(s,a) − V(s))/(β·σ)), V(s) = E_π[Q(s,·)]. With
    group_norm / batch_norm σ = std_π(r) (+ the baseline's eps) is an outer fixed point (per prompt / pooled),
    and with ω ≠ const the mean b = E_π[r] is one too (it no longer cancels in the normalisation).
(iv) ``kl_in_loss`` at ``level = "sequence"`` (β·k(Σ_t d_t) once per response): the KL gradient is a score
    function of the whole response, so f = ω·(β·k'(D(y)) − A(y)) ≡ c per prompt, D = log π(y)/π_ref(y):
    k2 → π ∝ π_ref·exp(A/β) (Boltzmann over responses), k3 → π = β·π_ref/(λ − A) (the bandit's forward-KL
    family over responses), i.e. the bandit formulas on :meth:`SequenceBandit.to_bandit` — not the per-state
    products of (ii)/(iii). ω = 1/|y| puts c·|y| inside: solved by the same normalising root.
(v) ``gae`` (a learned table critic V(x, y_<t)). The critic's fixed point is V^π (TD(λ) on-policy, tabular, every
    state visited), so E[Â_t | s, a] = Q^π_γ(s,a) − V^π_γ(s) for every λ, and the actor sees the exact
    policy gradient of the discounted return. γ = 1 with ``kl_in_reward``: the return is r − β·log π/π_ref, so
    Boltzmann over responses (whitening subtracts a constant and rescales: same target). γ < 1 with
    ``kl_in_reward``: the discounted soft Bellman recursion Q(s,a) = r(s·a) if s·a ends the response, else
    γ·V(s·a), V(s) = β·log Σ_a π_ref(a|s)·exp(Q(s,a)/β), π(a|s) ∝ π_ref(a|s)·exp(Q(s,a)/β) (the KL rewards are
    per token, so they are discounted with the task reward). ``kl_in_loss`` at token level: (ii)/(iii) with
    F = Q_γ(s,a) = E_π[γ^{|y|−1−t}·r | s, a] (σ = 1, no whitening). Length-dependent ω, whitened advantages next
    to a KL in the loss, and a sequence-level KL next to a discounted critic have no derived target.
(vi) no regulariser (``reference = none``, β = 0, or k1 differentiated in the loss, whose expected gradient is 0):
    all mass on argmax_y r(x, y) (γ^{|y|−1}·r with a discounted critic) when ω ≡ 1; otherwise no target.

Pair losses (dpo, ipo, cdpo, rdpo, hinge, online_dpo, dpo_iter) and UDRRA's RA/RDA only see sequence log-probs:
their target is the bandit's derived target on :meth:`SequenceBandit.to_bandit`. Length-normalised log-ratios
(SimPO, ``length_normalize``) see u(y) = (log π(y)/π_ref(y))/|y|: the pairwise fit v(y) pins u = g⁻¹(v + κ) up to
one constant per prompt, so π(y) = π_ref(y)·exp(|y|·g⁻¹(v(y) + κ)), κ normalising.

Finite groups: exact mode here takes groups of n → ∞ (group statistics are expectations under π; the population
batch carries ``group_size = None``), and so do the targets. Enumerating the other n − 1 draws of a group, as the
one-token bandit can, is out of reach: a group is a multiset of n draws over N responses
(C(n + N − 2, N − 1) of them per response: N = 15, n = 64 gives 8·10^14).

Where the fixed point is not unique there is no target: a ``greedy`` baseline with ω = 1/|y| sets b = r(ŷ) with
ŷ the greedy decode of π itself, and when several ŷ are self-consistent :class:`~udrra.errors.TargetError` says so.
With k2 and a std-normalised advantage the σ fixed point may be the degenerate σ ≈ eps one (π collapses toward
the best response, as training does); the solver then returns that one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from .bandit import Bandit, draw_rows
from .batch import PairBatch, SampleBatch
from .components import source as source_mod
from .components.reward import PAIR_KINDS
from .components.target import DerivedTarget, _derive_ema, derive, derive_iterated
from .errors import InputError, TargetError

__all__ = ["SequenceBandit", "SequenceProducer", "derive_sequence", "sequence_target", "train_sequence",
           "verify_sequence", "REWARD_MODES"]

#: Adam's initial steps (β·u units) of the stages that continue an exact hinge run short of its target
HINGE_POLISH_STEPS = (0.02, 0.005, 0.00125)

#: how :meth:`SequenceBandit.random` draws rewards: ``response`` iid N(0, s²) per whole response;
#: ``token`` a sum of iid N(0, s²/L) per (state, token) rewards (additive, grows with length);
#: ``length`` one iid N(0, s²) value per response length (depends on |y| only)
REWARD_MODES = ("response", "token", "length")


# --------------------------------------------------------------------------------------------- the prefix tree
@dataclass(frozen=True)
class _Tree:
    """The prefix tree shared by every prompt (local state and response indices)."""

    V: int
    L: int
    prefixes: Tuple[Tuple[int, ...], ...]       # S non-terminal prefixes, breadth first (children after parents)
    responses: Tuple[Tuple[int, ...], ...]      # N responses, in the order their last (state, action) is visited
    child: np.ndarray                           # (S, V) child state of a non-terminal (s, a), else −1
    term: np.ndarray                            # (S, V) response index of a terminal (s, a), else −1
    path_states: Tensor                         # (N, L) int64 state of each token (0 on padding)
    path_tokens: Tensor                         # (N, L) int64 token (0 on padding)
    mask: Tensor                                # (N, L) float64 response mask (left-aligned)
    lengths: Tensor                             # (N,) float64 |y|
    incidence: Tensor                           # (S·V, N) float64: 1 if response n takes action a at state s


def _build_tree(V: int, L: int) -> _Tree:
    eos = V - 1
    prefixes: List[Tuple[int, ...]] = [()]
    frontier: List[Tuple[int, ...]] = [()]
    for _ in range(1, L):
        frontier = [p + (a,) for p in frontier for a in range(V - 1)]
        prefixes.extend(frontier)
    index = {p: i for i, p in enumerate(prefixes)}
    S = len(prefixes)
    child = np.full((S, V), -1, dtype=np.int64)
    term = np.full((S, V), -1, dtype=np.int64)
    responses: List[Tuple[int, ...]] = []
    for s, pre in enumerate(prefixes):
        for a in range(V):
            if a == eos or len(pre) == L - 1:
                term[s, a] = len(responses)
                responses.append(pre + (a,))
            else:
                child[s, a] = index[pre + (a,)]
    N = len(responses)
    ps = torch.zeros(N, L, dtype=torch.int64)
    pt = torch.zeros(N, L, dtype=torch.int64)
    mask = torch.zeros(N, L, dtype=torch.float64)
    inc = torch.zeros(S * V, N, dtype=torch.float64)
    for n, y in enumerate(responses):
        for t, a in enumerate(y):
            s = index[y[:t]]
            ps[n, t], pt[n, t], mask[n, t] = s, a, 1.0
            inc[s * V + a, n] = 1.0
    return _Tree(V, L, tuple(prefixes), tuple(responses), child, term, ps, pt, mask, mask.sum(-1), inc)


def _as64(name: str, x, shape) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if tuple(t.shape) != tuple(shape):
        raise InputError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError(f"{name} contains NaN or inf")
    return t


class SequenceBandit:
    """P prompts, responses of up to ``max_len`` tokens over ``vocab`` tokens (EOS = ``vocab − 1``), a per-state
    reference π_ref(a | x, y_<t), a reward on whole responses, preferences, μ and d (see the module docstring).

    Args:
        ref_probs: ``(P, S, V)`` reference probabilities per state (rows sum to 1, all > 0: the per-state KL
            terms and the k3 targets need a full-support reference). S = :attr:`states_per_prompt`; states are
            ordered as :attr:`prefixes`.
        reward: ``(P, N)`` reward r(x, y) of every response (ordered as :meth:`responses`).
        vocab: V ≥ 2 (token V − 1 is EOS). max_len: L ≥ 1.
        preference: ``(P, N, N)`` P(y ≻ y'); default Bradley–Terry σ(r(y) − r(y')).
        pair_distribution: ``(P, N, N)`` μ over ordered pairs of distinct responses; default uniform.
        sample_distribution: ``(P, N)`` d for ``offline_samples``; default uniform.
    Raises:
        InputError: shapes, non-finite values, a reference row not summing to 1 or with a zero entry, and what
            :class:`udrra.Bandit` refuses for the sequence-level quantities.
    """

    def __init__(self, ref_probs, reward, *, vocab: int, max_len: int, preference=None, pair_distribution=None,
                 sample_distribution=None):
        if int(vocab) < 2 or int(max_len) < 1:
            raise InputError(f"a sequence bandit needs vocab >= 2 (one token is EOS) and max_len >= 1, got "
                             f"vocab={vocab}, max_len={max_len}")
        self.tree = _build_tree(int(vocab), int(max_len))
        S, V, N = self.states_per_prompt, self.V, self.N
        ref = torch.as_tensor(ref_probs, dtype=torch.float64).clone()
        if ref.dim() != 3 or ref.shape[1:] != (S, V):
            raise InputError(f"ref_probs must have shape (P, S, V) = (P, {S}, {V}), got {tuple(ref.shape)}")
        if not torch.isfinite(ref).all() or bool((ref <= 0).any()):
            raise InputError("ref_probs must be finite and > 0 in every state (a full-support reference)")
        if not torch.allclose(ref.sum(-1), torch.ones(ref.shape[:2], dtype=torch.float64), atol=1e-6):
            raise InputError("ref_probs must sum to 1 over the V actions of every state")
        self.ref_state_probs = ref / ref.sum(-1, keepdim=True)
        P = ref.shape[0]
        self.reward = _as64("reward", reward, (P, N))
        self._bandit = Bandit(self.sequence_probs(self.ref_state_probs), self.reward, preference, pair_distribution,
                              sample_distribution)

    # ------------------------------------------------------------------------------------------ structure
    @property
    def P(self) -> int:
        return int(self.ref_state_probs.shape[0])

    @property
    def V(self) -> int:
        return self.tree.V

    @property
    def L(self) -> int:
        return self.tree.L

    @property
    def eos(self) -> int:
        return self.V - 1

    @property
    def N(self) -> int:
        """Responses per prompt."""
        return len(self.tree.responses)

    @property
    def states_per_prompt(self) -> int:
        return len(self.tree.prefixes)

    @property
    def num_states(self) -> int:
        """P·S: the rows of a policy's logit table."""
        return self.P * self.states_per_prompt

    @property
    def prefixes(self) -> Tuple[Tuple[int, ...], ...]:
        """The S non-terminal prefixes of one prompt (state order)."""
        return self.tree.prefixes

    def responses(self, p: int = 0) -> List[Tuple[int, ...]]:
        """The N responses of prompt ``p`` as token tuples (EOS = V − 1 included; every prompt has the same)."""
        if not 0 <= p < self.P:
            raise InputError(f"prompt index {p} out of range 0..{self.P - 1}")
        return list(self.tree.responses)

    @property
    def lengths(self) -> Tensor:
        """``(N,)`` float64 response lengths |y| in tokens (EOS counted)."""
        return self.tree.lengths

    @property
    def shape(self):
        return (self.P, self.N)

    # --------------------------------------------------------------------------------- probabilities
    def sequence_logps(self, policy_logits: Tensor) -> Tensor:
        """Exact log π(y|x) of every response: ``(P, N)``, differentiable in ``policy_logits`` ``(P·S, V)``."""
        S, V = self.states_per_prompt, self.V
        lp = torch.log_softmax(policy_logits.reshape(-1, S, V), dim=-1)
        tok = lp[:, self.tree.path_states, self.tree.path_tokens]          # (P, N, L)
        return (tok * self.tree.mask).sum(-1)

    def sequence_probs(self, state_probs: Tensor) -> Tensor:
        """π(y|x) = Π_t π(y_t | s_t) from per-state probabilities ``(P, S, V)`` (or ``(P·S, V)``): ``(P, N)``."""
        sp = torch.as_tensor(state_probs, dtype=torch.float64).reshape(-1, self.states_per_prompt, self.V)
        tok = sp[:, self.tree.path_states, self.tree.path_tokens]
        return torch.where(self.tree.mask > 0, tok, torch.ones_like(tok)).prod(-1)

    def state_probs_from_sequence(self, probs: Tensor) -> Tensor:
        """The per-state conditionals π(a|s) = π(s·a)/π(s) of a distribution over whole responses ``(P, N)``
        (states of zero mass get uniform rows): ``(P, S, V)``."""
        mass = (torch.as_tensor(probs, dtype=torch.float64) @ self.tree.incidence.T)
        mass = mass.reshape(-1, self.states_per_prompt, self.V)
        tot = mass.sum(-1, keepdim=True)
        return torch.where(tot > 0, mass / tot.clamp_min(1e-300), torch.full_like(mass, 1.0 / self.V))

    @property
    def pi_ref_seq(self) -> Tensor:
        """``(P, N)`` π_ref(y|x) of whole responses."""
        return self._bandit.pi_ref

    @property
    def log_ref_logits(self) -> Tensor:
        """``(P·S, V)`` log π_ref(a|s): the reference table's logits."""
        return torch.log(self.ref_state_probs).reshape(-1, self.V)

    @property
    def preference(self) -> Tensor:
        return self._bandit.preference

    @property
    def pair_distribution(self) -> Tensor:
        return self._bandit.pair_distribution

    @property
    def sample_distribution(self) -> Tensor:
        return self._bandit.sample_distribution

    def reward_matrix(self) -> Tensor:
        return self.reward

    def to_bandit(self) -> Bandit:
        """The bandit whose K responses are the N sequences: π_ref = π_ref(y|x), the same r, p, μ and d (what the
        source code enumerates, and where sequence-level targets are computed)."""
        return self._bandit

    def with_reference(self, ref_probs: Tensor) -> "SequenceBandit":
        """The same testbed with another per-state reference ``(P, S, V)``."""
        b = self._bandit
        return SequenceBandit(ref_probs, self.reward, vocab=self.V, max_len=self.L, preference=b.preference,
                              pair_distribution=b.pair_distribution, sample_distribution=b.sample_distribution)

    def with_reference_sequence(self, probs: Tensor) -> "SequenceBandit":
        """The same testbed with the reference set to a distribution over whole responses ``(P, N)`` (a reference
        reset to a policy)."""
        return self.with_reference(self.state_probs_from_sequence(probs))

    def greedy_responses(self, policy_logits: Tensor) -> Tensor:
        """``(P,)`` int64 index of each prompt's greedy decode (argmax token at each state) under the logits."""
        S, V = self.states_per_prompt, self.V
        best = policy_logits.detach().reshape(-1, S, V).argmax(-1).tolist()
        out = []
        for p in range(len(best)):
            s = 0
            while True:
                a = best[p][s]
                n = int(self.tree.term[s, a])
                if n >= 0:
                    out.append(n)
                    break
                s = int(self.tree.child[s, a])
        return torch.tensor(out, dtype=torch.int64)

    def rows(self, prompt: Tensor, response: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Token tensors of rows (prompt, response index): global state ids ``(B, L)``, tokens ``(B, L)`` and the
        response mask ``(B, L)`` (padding: state and token 0, mask 0)."""
        states = prompt[:, None] * self.states_per_prompt + self.tree.path_states[response]
        return states, self.tree.path_tokens[response], self.tree.mask[response]

    # ------------------------------------------------------------------------------------------ random
    @classmethod
    def random(cls, P: int = 2, vocab: int = 3, max_len: int = 3, seed: int = 0, *, reward_scale: float = 1.0,
               ref_concentration: float = 2.0, reward_mode: str = "response",
               length_coef: float = 0.0) -> "SequenceBandit":
        """A random testbed: π_ref(·|s) ∼ Dirichlet(ref_concentration) per state (floored at 0.02 and renormalised,
        as :meth:`udrra.Bandit.random`), rewards by ``reward_mode`` (:data:`REWARD_MODES`; ``response``, the
        default, is length-independent) plus ``length_coef``·|y|, Bradley–Terry preferences, uniform μ and d."""
        if reward_mode not in REWARD_MODES:
            raise InputError(f"unknown reward_mode {reward_mode!r}; valid: {', '.join(REWARD_MODES)}")
        if P < 1:
            raise InputError(f"P must be >= 1, got {P}")
        tree = _build_tree(int(vocab), int(max_len)) if vocab >= 2 and max_len >= 1 else None
        if tree is None:
            raise InputError(f"a sequence bandit needs vocab >= 2 and max_len >= 1, got {vocab}, {max_len}")
        S, N = len(tree.prefixes), len(tree.responses)
        g = torch.Generator().manual_seed(seed)
        conc = torch.full((P, S, vocab), float(ref_concentration), dtype=torch.float64)
        gam = torch._standard_gamma(conc, generator=g)
        ref = gam / gam.sum(-1, keepdim=True)
        ref = (ref + 0.02) / (ref + 0.02).sum(-1, keepdim=True)
        if reward_mode == "response":
            r = torch.randn(P, N, generator=g, dtype=torch.float64) * reward_scale
        elif reward_mode == "token":
            rho = torch.randn(P, S, vocab, generator=g, dtype=torch.float64) * reward_scale / math.sqrt(max_len)
            r = (rho[:, tree.path_states, tree.path_tokens] * tree.mask).sum(-1)
        else:
            per_len = torch.randn(P, max_len, generator=g, dtype=torch.float64) * reward_scale
            r = per_len[:, tree.lengths.long() - 1]
        r = r + float(length_coef) * tree.lengths
        return cls(ref, r, vocab=vocab, max_len=max_len)

    def __repr__(self) -> str:
        return (f"SequenceBandit(P={self.P}, vocab={self.V}, max_len={self.L}: {self.N} responses, "
                f"{self.states_per_prompt} states per prompt)")


# ------------------------------------------------------------------------------------------------ producer
class SequenceProducer:
    """The sequence testbed's sample source for :func:`udrra.loop.fit` (as :class:`udrra.bandit.BanditProducer`).

    ``collect`` draws the step's rows from the algorithm's ``[source]`` run on :meth:`SequenceBandit.to_bandit`
    under the current π(y|x) (exact: every response with weight π(y|x)/P, or every pair with its probability;
    sampled: draws) and turns response indices into token tensors: a :class:`~udrra.batch.SampleBatch` with
    per-token ``logps``/``old_logps``/``ref_logps`` ``(B, L)`` read from the state logits, the left-aligned
    response mask, rewards, groups, weights, the greedy decode's reward (ReMax), log Z (UDRRA RA) and, with a
    critic, ``old_values`` V(x, y_<t) per token; or a :class:`~udrra.batch.PairBatch` of sequence log-probs with
    the true lengths. ``attach`` rebuilds the same rows with the current policy (and critic) with gradient.

    Args:
        algorithm: a loaded :class:`udrra.Algorithm`. sb: the :class:`SequenceBandit`.
        policy, reference: modules whose ``forward()`` gives ``(P·S, V)`` logits.
        critic: a :class:`udrra.policy.TableCritic` over the P·S states (``gae``), else ``None``.
        exact: enumerate the population. batch_size: pairs or samples per prompt when sampling.
        generator: the sampling RNG.
    """

    def __init__(self, algorithm, sb: SequenceBandit, policy, reference, critic=None, *, exact: bool,
                 batch_size: int = 64, generator: Optional[torch.Generator] = None):
        self.algorithm, self.sb, self.policy, self.reference, self.critic = algorithm, sb, policy, reference, critic
        self.exact, self.batch_size, self.generator = exact, batch_size, generator
        self._rows: Optional[source_mod.IndexBatch] = None
        self._old: Optional[Tensor] = None

    def _draw(self, logits: Tensor) -> source_mod.IndexBatch:
        probs = torch.exp(self.sb.sequence_logps(logits.detach()))
        return draw_rows(self.algorithm, self.sb.to_bandit(), probs / probs.sum(-1, keepdim=True), exact=self.exact,
                         batch_size=self.batch_size, generator=self.generator)

    def _token_logps(self, logits: Tensor, prompt: Tensor, response: Tensor) -> Tuple[Tensor, Tensor]:
        states, tokens, mask = self.sb.rows(prompt, response)
        lp = torch.log_softmax(logits, dim=-1)[states, tokens]
        return torch.where(mask > 0, lp, torch.zeros_like(lp)), mask

    def _batch(self, ib: source_mod.IndexBatch, logits: Tensor, ref_logits: Tensor, old_logits: Tensor):
        sb, algo = self.sb, self.algorithm
        if algo.pair_based:
            cw, mw = self._token_logps(logits, ib.prompt, ib.first)
            cl, ml = self._token_logps(logits, ib.prompt, ib.second)
            rcw, _ = self._token_logps(ref_logits, ib.prompt, ib.first)
            rcl, _ = self._token_logps(ref_logits, ib.prompt, ib.second)
            kw = {}
            if algo.components.reward.kind == "reward_difference":
                r = sb.reward_matrix()
                kw = dict(chosen_rewards=r[ib.prompt, ib.first], rejected_rewards=r[ib.prompt, ib.second])
            return PairBatch(chosen_logps=cw.sum(-1), rejected_logps=cl.sum(-1),
                             ref_chosen_logps=rcw.sum(-1).detach(), ref_rejected_logps=rcl.sum(-1).detach(),
                             weights=ib.weights, labels=ib.labels, chosen_lengths=mw.sum(-1),
                             rejected_lengths=ml.sum(-1), group=ib.group, population=ib.population, **kw)
        logps, mask = self._token_logps(logits, ib.prompt, ib.first)
        old, _ = self._token_logps(old_logits, ib.prompt, ib.first)
        ref, _ = self._token_logps(ref_logits, ib.prompt, ib.first)
        r = sb.reward_matrix()
        greedy = r[torch.arange(sb.P), sb.greedy_responses(old_logits)][ib.prompt]
        log_z = None
        if algo.components.reward.kind == "reward_regression":
            log_z = torch.logsumexp(sb.sequence_logps(ref_logits) + r / algo.beta, dim=-1)[ib.prompt]
        return SampleBatch(logps=logps, old_logps=old.detach(), ref_logps=ref.detach(), rewards=r[ib.prompt, ib.first],
                           group=ib.group, weights=ib.weights, response_mask=mask, greedy_rewards=greedy,
                           log_partition=log_z, population=ib.population, group_size=None)

    def _values(self, values: Tensor) -> Tensor:
        states, _, mask = self.sb.rows(self._rows.prompt, self._rows.first)
        return values[states] * mask

    @torch.no_grad()
    def collect(self):
        logits, ref_logits = self.policy().detach(), self.reference().detach()
        self._rows = self._draw(logits)
        self._old = logits
        batch = self._batch(self._rows, logits, ref_logits, logits)
        if self.critic is not None and isinstance(batch, SampleBatch):
            batch.old_values = self._values(self.critic().detach())
        return batch

    def attach(self, batch):
        logits = self.policy()
        if self.algorithm.pair_based:
            return self._batch(self._rows, logits, self.reference().detach(), self._old)
        logps, _ = self._token_logps(logits, self._rows.prompt, self._rows.first)
        values = None if self.critic is None else self._values(self.critic())
        return batch.with_logps(logps, values)


# ------------------------------------------------------------------------------------------------- solvers
def _exp_family(logref: np.ndarray, a: np.ndarray, iw: np.ndarray, beta: float) -> np.ndarray:
    """π = exp(log π_ref + (a + κ·iw)/β) with κ such that Σ π = 1 (iw > 0). Constant iw: a softmax."""
    if float(np.ptp(iw)) <= 1e-14 * float(np.max(iw)):
        z = logref + a / beta
        z = z - z.max()
        p = np.exp(z)
        return p / p.sum()
    ratio = -a / iw

    def f(kappa: float) -> float:
        z = logref + (a + kappa * iw) / beta
        m = z.max()
        return float(m + np.log(np.exp(z - m).sum()))
    lo, hi = float(ratio.min()), float(ratio.max())          # all exponents ≤ 0 at lo (Σ ≤ 1), ≥ 0 at hi
    kappa = lo if f(lo) >= 0 else (hi if f(hi) <= 0 else brentq(f, lo, hi, xtol=1e-15, rtol=1e-15, maxiter=500))
    p = np.exp(logref + (a + kappa * iw) / beta)
    return p / p.sum()


def _inverse_family(ref: np.ndarray, a: np.ndarray, iw: np.ndarray, beta: float) -> np.ndarray:
    """π = π_ref/(1 − (a + κ·iw)/β) with κ < min (β − a)/iw such that Σ π = 1 (the forward-KL family).

    Written with t = κ_max − κ > 0: π_y = β·π_ref,y/(e_y + t·iw_y), e_y = β − a_y − κ_max·iw_y ≥ 0, which is
    decreasing in t from ∞ (the binding y has e = 0) to 0."""
    kmax_each = (beta - a) / iw
    kmax = float(kmax_each.min())
    e = np.maximum(beta - a - kmax * iw, 0.0)
    star = int(np.argmin(kmax_each))

    def g(t: float) -> float:
        return float((beta * ref / (e + t * iw)).sum()) - 1.0
    hi = beta * float((ref / iw).sum())                      # every term ≤ β·π_ref/(t·iw): Σ ≤ 1
    lo = 0.5 * beta * float(ref[star] / iw[star])            # the binding term alone is 2
    while g(hi) > 0:
        hi *= 2.0
    while g(lo) < 0 and lo > 1e-300:
        lo *= 1e-3
    t = brentq(g, lo, hi, xtol=1e-300, rtol=1e-15, maxiter=1000)
    p = beta * ref / (e + t * iw)
    return p / p.sum()


def _family_solver(family: str):
    if family == "exp":
        return lambda ref, a, iw, beta: _exp_family(np.log(ref), a, iw, beta)
    return _inverse_family


def _token_policy(tree: _Tree, ref_sv: np.ndarray, A: np.ndarray, omega: np.ndarray, beta: float, family: str,
                  discount: float = 1.0) -> np.ndarray:
    """Per-state policy of one prompt by backward induction over the prefix tree ((ii) ``exp``, (iii) ``inv``).

    At each state s (deepest first): w(s,a) = ω(y), F(s,a) = ω(y)·A(y) when s·a ends the response y, else
    w(s,a) = Σ_a' π(a'|s')·w(s',a') and F(s,a) = γ·Σ_a' π(a'|s')·F(s',a') with s' = s·a (γ = ``discount``: the
    discounted Q of a GAE critic). Then π(·|s) = π_ref·exp((F − c)/(β·w)) (``exp``) or
    β·w·π_ref/(λ + β·w − F) (``inv``), with c / λ normalising — both are ``_exp_family`` / ``_inverse_family``
    with a = F/w and iw = 1/w. Returns ``(S, V)``."""
    S, V = tree.child.shape
    pi = np.empty((S, V))
    F = np.empty((S, V))
    W = np.empty((S, V))
    solve = _family_solver(family)
    for s in range(S - 1, -1, -1):          # breadth-first order: every child comes after its parent
        for a in range(V):
            n = tree.term[s, a]
            if n >= 0:
                W[s, a], F[s, a] = omega[n], omega[n] * A[n]
            else:
                c = tree.child[s, a]
                W[s, a], F[s, a] = pi[c] @ W[c], discount * (pi[c] @ F[c])
        pi[s] = solve(ref_sv[s], F[s] / W[s], 1.0 / W[s], beta)
    return pi


def _soft_bellman(tree: _Tree, ref_sv: np.ndarray, r: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """(v), γ < 1, KL in the per-token reward: π(a|s) ∝ π_ref(a|s)·exp(Q(s,a)/β), Q(s,a) = r(s·a) if it ends the
    response, else γ·V(s·a), V(s) = β·log Σ_a π_ref(a|s)·exp(Q(s,a)/β). Returns ``(S, V)``."""
    S, V = tree.child.shape
    pi = np.empty((S, V))
    val = np.empty(S)
    for s in range(S - 1, -1, -1):
        q = np.array([r[tree.term[s, a]] if tree.term[s, a] >= 0 else gamma * val[tree.child[s, a]]
                      for a in range(V)])
        z = np.log(ref_sv[s]) + q / beta
        m = z.max()
        val[s] = beta * (m + np.log(np.exp(z - m).sum()))
        pi[s] = np.exp(z - m) / np.exp(z - m).sum()
    return pi


def _seq_probs_np(tree: _Tree, pi_sv: np.ndarray) -> np.ndarray:
    """π(y) of one prompt from its per-state table ``(S, V)``: ``(N,)``."""
    tok = pi_sv[tree.path_states.numpy(), tree.path_tokens.numpy()]
    return np.where(tree.mask.numpy() > 0, tok, 1.0).prod(-1)


# --------------------------------------------------------------------------------- outer fixed points (b, σ)
_MEAN_BASELINES = ("leave_one_out", "group_mean", "group_norm")


def _outer(sb: SequenceBandit, pi_of: Callable[[int, float, float], np.ndarray], *, baseline: str, needs_b: bool,
           needs_s: bool, eps: float, R_of: Optional[Callable[[int, np.ndarray], np.ndarray]] = None) -> Tensor:
    """Solve the fixed point of the baseline's statistics: b (the mean, or r of the greedy decode) and σ (the std
    + eps), per prompt (group baselines) or pooled over prompts (``batch_norm``), around a per-prompt solver
    ``pi_of(p, b, σ) -> (N,)``. ``R_of(p, π)`` gives the returns whose statistics the baseline takes (default r).
    Returns ``(P, N)`` float64."""
    P = sb.P
    r = sb.reward.numpy()
    R_of = R_of or (lambda p, pi: r[p])
    pooled = baseline == "batch_norm"
    groups = [list(range(P))] if pooled else [[p] for p in range(P)]
    out = np.empty((P, sb.N))

    def solve_group(g: List[int]) -> None:
        def pis(b: float, s: float) -> List[np.ndarray]:
            return [pi_of(p, b, s) for p in g]

        def stats(ps: List[np.ndarray]) -> Tuple[float, float]:
            Rs = [R_of(p, pi) for p, pi in zip(g, ps)]
            mean = sum(float(pi @ R) for pi, R in zip(ps, Rs)) / len(g)
            var = sum(float(pi @ (R - mean) ** 2) for pi, R in zip(ps, Rs)) / len(g)
            return mean, math.sqrt(max(var, 0.0))

        def b_of(s: float) -> float:
            if not needs_b:
                return 0.0
            if baseline == "greedy":        # b = r(ŷ), ŷ the greedy decode of π(b) itself: try every ŷ
                (p,) = g
                consistent = [n for n in range(sb.N) if _greedy_index(sb, pi_of(p, float(r[p][n]), s)) == n]
                if len(consistent) != 1:
                    raise TargetError(f"greedy baseline with a length-dependent weight: prompt {p} has "
                                      f"{len(consistent)} self-consistent fixed points (the greedy decode ŷ of π "
                                      "sets b = r(ŷ), which moves π), no unique target")
                return float(r[p][consistent[0]])

            def h(b: float) -> float:
                return stats(pis(b, s))[0] - b
            lo, hi = float(r[g].min()) - 1.0, float(r[g].max()) + 1.0
            while h(lo) < 0:
                lo -= 2.0 * (hi - lo)
            while h(hi) > 0:
                hi += 2.0 * (hi - lo)
            return brentq(h, lo, hi, xtol=1e-14, rtol=1e-15, maxiter=500)

        if needs_s:
            def hs(log_s: float) -> float:
                s = math.exp(log_s)
                _, std = stats(pis(b_of(s), s))
                return (std + eps) / s - 1.0
            lo, hi = -30.0, 30.0
            if hs(hi) > 0 or hs(lo) < 0:
                raise TargetError("no std-normalised fixed point found (rewards constant under π_ref?)")
            s = math.exp(brentq(hs, lo, hi, xtol=1e-14, maxiter=500))
        else:
            s = 1.0
        b = b_of(s)
        for p, pi in zip(g, pis(b, s)):
            out[p] = pi

    for g in groups:
        solve_group(g)
    return torch.as_tensor(out / out.sum(-1, keepdims=True))


def _greedy_index(sb: SequenceBandit, pi_seq: np.ndarray) -> int:
    sv = sb.state_probs_from_sequence(torch.as_tensor(pi_seq)[None])[0]
    return int(sb.greedy_responses(torch.log(sv.clamp_min(1e-300)).reshape(-1, sb.V))[0])


# ------------------------------------------------------------------------------------------------ derivation
def _omega(sb: SequenceBandit, length_weighted: bool) -> np.ndarray:
    return (1.0 / sb.lengths.numpy()) if length_weighted else np.ones(sb.N)


def _boltzmann_seq(beta: float):
    def solve(sb: SequenceBandit) -> Tensor:
        return torch.softmax(torch.log(sb.pi_ref_seq) + sb.reward / beta, dim=-1)
    return solve


def _argmax_seq(gamma: float = 1.0):
    def solve(sb: SequenceBandit) -> Tensor:
        score = sb.reward * gamma ** (sb.lengths - 1.0)
        return torch.nn.functional.one_hot(score.argmax(-1), sb.N).double()
    return solve


def _via_view(d: DerivedTarget, note: Optional[str] = None) -> DerivedTarget:
    """A bandit-derived target applied to whole responses (the Bandit view)."""
    solve = None if d.solve is None else (lambda sb, f=d.solve: f(sb.to_bandit()))
    extra = "sequence-level: the loss sees whole responses only (Σ_t log π), so the bandit target applies to them"
    return DerivedTarget(d.kind, f"{d.formula}  [over whole responses]",
                         "; ".join(x for x in (d.note, note or extra) if x), solve)


def derive_sequence(components) -> DerivedTarget:
    """The target a composition converges to on a :class:`SequenceBandit` (exact population gradients, n → ∞).

    Cases (i)–(vi) and the pair / regression losses are derived in the module docstring. ``solve`` maps a
    :class:`SequenceBandit` to the ``(P, N)`` target over whole responses (``None`` for the hinge link, whose
    target is a set: checked through the bandit view's margins / LP).

    Raises:
        TargetError: the composition has no derived target on sequences (the message says why in one line).
    """
    t, s, rw, ref = components
    beta = float(t["beta"])
    update = ref.get("update", "frozen")
    if rw.kind == "max_likelihood":
        if update != "frozen":
            raise TargetError("best-of-n rounds on the sequence testbed: its sampler is the testbed's fixed π_ref over "
                              "whole responses, so a reference reset would not move it; one round (update = 'frozen') "
                              "is derived")
        return _via_view(derive(components))
    sequence_only = rw.kind in PAIR_KINDS or rw.kind == "reward_regression"
    if sequence_only and not ref.get("length_normalize"):
        return _via_view(derive(components))
    if sequence_only:
        base = _derive_length_normalised(t, s, rw, ref, beta)
    else:
        base = _derive_explicit(t, s, rw, ref, beta)
    if update == "reset_every" and base.solve is not None:
        return derive_iterated(base, int(ref.get("rounds") or 1), lambda sb, pi: sb.with_reference_sequence(pi))
    if update == "ema":
        return _derive_ema(base, lambda sb: sb.pi_ref_seq)
    return base


def _derive_length_normalised(t, s, rw, ref, beta: float) -> DerivedTarget:
    """Pair / regression losses on u(y) = (log π(y) [− log π_ref(y)])/|y| (SimPO)."""
    from .components.target import _pair_data, pairwise_fit
    if rw.kind == "preference" and rw["link"] == "hinge":
        raise TargetError("hinge link with length-normalised log-ratios: udrra checks hinge margins of the summed "
                          "log-ratio only, no target on sequences")
    if ref.kind == "chosen_nll" or (rw.kind == "preference" and rw["link"] == "odds_ratio"):
        raise TargetError("chosen NLL / odds-ratio terms with length-normalised log-probs: the per-token average "
                          "probability is not a distribution over whole responses, no target on sequences (use "
                          "length_normalize = false: the bandit target then applies to whole responses)")
    if rw.kind == "preference" and rw["link"] in ("js_divergence", "alpha_divergence"):
        raise TargetError(f"{rw['link']} link with length-normalised log-ratios: f'(ρ) of a per-token ratio is not "
                          "derived on sequences (use length_normalize = false: the bandit target then applies to "
                          "whole responses)")
    gamma = float(ref.get("gamma") or 0.0)
    no_ref = ref.kind == "none"
    link_name = rw["link"] if rw.kind == "preference" else None
    forward = link_name == "forward_kl"

    def fit(sb: SequenceBandit) -> Tensor:
        b = sb.to_bandit()
        if rw.kind == "reward_difference":
            return b.reward_matrix() / beta
        loss = "squared" if link_name == "squared" else "logistic"
        M, Q = _pair_data(s, rw, b)
        K = b.pi_ref.shape[1]
        v = pairwise_fit(M, Q, beta=beta, gamma=gamma, loss=loss)
        if s.kind == "on_policy_pairs":
            skew = 1.0 + (torch.arange(K)[:, None] + 2 * torch.arange(K)[None, :]).remainder(3).double()
            v2 = pairwise_fit(M * skew, Q, beta=beta, gamma=gamma, loss=loss)
            if float((v - v[:, :1] - (v2 - v2[:, :1])).abs().max()) > 1e-7:
                raise TargetError("with on-policy pairs the target depends on π itself unless the labels are "
                                  "Bradley–Terry and the link is logistic; this fixed point is not implemented")
        return v

    def solve(sb: SequenceBandit) -> Tensor:
        v = fit(sb).numpy()
        lens = sb.lengths.numpy()
        logref = np.zeros_like(v) if no_ref else torch.log(sb.pi_ref_seq).numpy()
        out = np.empty_like(v)
        for p in range(v.shape[0]):
            vp = v[p]
            if forward:          # g(u) = −e^{−u} = v + κ  ⇒  u = −log(λ − v), λ = −κ > max v
                def h(lam: float) -> float:
                    return float(np.exp(logref[p] - lens * np.log(lam - vp)).sum()) - 1.0
                lo, gap = float(vp.max()), 1.0
                while h(lo + gap) < 0 and gap > 1e-300:
                    gap *= 1e-3
                hi = lo + 1.0
                while h(hi) > 0:
                    hi = lo + 2.0 * (hi - lo)
                lam = brentq(h, lo + gap, hi, xtol=1e-300, rtol=1e-15, maxiter=1000)
                out[p] = np.exp(logref[p] - lens * np.log(lam - vp))
            else:                # u = v + κ, log π = log π_ref + |y|·(v + κ): increasing in κ
                def h(kappa: float) -> float:
                    z = logref[p] + lens * (vp + kappa)
                    m = z.max()
                    return float(m + np.log(np.exp(z - m).sum()))
                lo, hi = -1.0, 1.0
                while h(lo) > 0:
                    lo *= 2.0
                while h(hi) < 0:
                    hi *= 2.0
                kappa = brentq(h, lo, hi, xtol=1e-15, rtol=1e-15, maxiter=500)
                out[p] = np.exp(logref[p] + lens * (vp + kappa))
        return torch.as_tensor(out / out.sum(-1, keepdims=True))

    what = ("r/β" if rw.kind == "reward_difference" else
            "v = the pairwise fit of the labels (" + ("margin γ, " if gamma else "") + f"{link_name} link)")
    ref_part = "" if no_ref else "π_ref(y)·"
    if forward:
        formula = f"{ref_part}(λ − v(y))^(−|y|), λ normalising; v = the pairwise fit (forward_kl link)"
    else:
        formula = f"{ref_part}exp(|y|·(v(y) + κ)), κ normalising; {what}"
    note = ("length-normalised log-ratios: the loss pins u(y) = log-ratio/|y| up to one constant per prompt, so "
            "the target multiplies the fitted value by the true length |y| (on the one-token bandit |y| = 1)"
            + ("; reference-free: uniform implicit reference" if no_ref else ""))
    kind = "reference_free" if no_ref else ("forward_kl" if forward else "length_normalised")
    return DerivedTarget(kind, formula, note, solve)


def _derive_explicit(t, s, rw, ref, beta: float) -> DerivedTarget:
    """Explicit rewards (policy gradient): cases (i)–(vi) of the module docstring."""
    agg = s.get("aggregation") or "seq_mean_token_sum"
    length_weighted = agg == "seq_mean_token_mean"
    omega_note = "ω(y) = 1/|y| (seq_mean_token_mean)" if length_weighted else f"ω ≡ const ({agg})"
    baseline = rw["baseline"]
    eps = float(rw.get("eps") or 0.0)
    kl_reward = ref.kind == "kl_in_reward"
    token_return = kl_reward and ref.get("kl_return") == "token"
    est = ref.get("estimator") if ref.kind == "kl_in_loss" else None
    level = ref.get("level") if ref.kind == "kl_in_loss" else None

    if baseline == "gae":
        return _derive_gae(rw, ref, beta, length_weighted, est, level)
    if ref.kind == "none" or beta == 0 or est == "k1":
        why = ("k1 differentiated in the loss has zero expected gradient" if est == "k1" else "no KL term")
        if length_weighted:
            raise TargetError(f"{why} and a length-dependent aggregation weight ω = 1/|y|: the ascent direction "
                              "depends on the baseline and the lengths, no derived target")
        return DerivedTarget("argmax", "argmax_y r(x, y) over whole responses", f"(vi) {why}: nothing regularises "
                             "the policy, all mass on the best response", _argmax_seq())

    normalised = baseline in ("group_norm", "batch_norm")
    if baseline == "whitened_return_to_go" and length_weighted:
        raise TargetError("whitened returns-to-go (REINFORCE++) with ω = 1/|y| (seq_mean_token_mean): the batch "
                          "mean subtracted from every token no longer cancels, no derived target (use token_mean)")
    if kl_reward and not token_return:                                             # (i)
        if not length_weighted or baseline in _MEAN_BASELINES:
            why = ("ω constant: the stationarity forces R = r − β·log π/π_ref constant per prompt" if not
                   length_weighted else "ω = 1/|y| with the exact mean baseline b = E_π[R]: the tilt κ·E_π|y| = 0")
            return DerivedTarget("boltzmann", "π_ref(y|x)·exp(r(x,y)/β)/Z over whole responses",
                                 f"(i) KL in the return (sum of per-token k1); {why}", _boltzmann_seq(beta))

        def pi_of_i(sb, p, b, sc):
            lw = sb.lengths.numpy()
            return _exp_family(np.log(sb.pi_ref_seq[p].numpy()), sb.reward[p].numpy() - b, lw, beta)

        def solve_i(sb: SequenceBandit) -> Tensor:
            logref = torch.log(sb.pi_ref_seq).numpy()
            r = sb.reward.numpy()

            def R_of(p, pi):
                return r[p] - beta * (np.log(pi) - logref[p])
            return _outer(sb, lambda p, b, sc: pi_of_i(sb, p, b, sc), baseline=baseline,
                          needs_b=baseline != "none", needs_s=False, eps=eps, R_of=R_of)
        b_text = {"none": "b = 0: κ = E_π[R]/E_π|y| (normalisation)",
                  "batch_norm": "b = the pooled mean of R over prompts (outer fixed point)",
                  "greedy": "b = r of the greedy decode (outer fixed point)"}[baseline]
        return DerivedTarget("length_tilt", "π_ref(y|x)·exp((r(x,y) − b − κ·|y|)/β), κ normalising",
                             f"(i) KL in the return with ω = 1/|y|: ω·(R − b) ≡ c per prompt gives a length tilt; "
                             f"{b_text}", solve_i)

    if token_return or (est in ("k2", "k3") and level == "token"):                # (ii) / (iii)
        family = "inv" if est == "k3" else "exp"

        def solve_tok(sb: SequenceBandit, family=family) -> Tensor:
            omega = _omega(sb, length_weighted)
            ref_sv = sb.ref_state_probs.numpy()
            r = sb.reward.numpy()

            def pi_of(p, b, sc):
                return _seq_probs_np(sb.tree, _token_policy(sb.tree, ref_sv[p], (r[p] - b) / sc, omega, beta,
                                                            family))
            return _outer(sb, pi_of, baseline=baseline, needs_b=length_weighted and baseline != "none",
                          needs_s=normalised, eps=eps)
        scale = " (A = (r − r̄_π)/σ_π: σ_π a fixed point)" if normalised else ""
        stats = {"none": ", b = 0, σ = 1", "greedy": ", b = r(greedy decode of π), σ = 1",
                 "batch_norm": ", b, σ = pooled mean, std of r under π (fixed point)",
                 "group_norm": ", b, σ = mean, std of r under π (fixed point)"}.get(baseline, ", b = E_π r, σ = 1")
        if family == "exp":
            src = ("the per-token KL in the return (kl_return = 'token') has the gradient of k2 per token"
                   if token_return else "k2 per token")
            formula = ("π(a|s) = π_ref(a|s)·exp((F(s,a) − c_s)/(β·w(s,a))), per state by backward induction; "
                       "w = E_π[1/|y| | s,a], F = E_π[(r − b)/(|y|·σ) | s,a]" + stats)
            if not length_weighted:
                formula = "π(a|s) ∝ π_ref(a|s)·exp(Q(s,a)/β) per state, Q = E_π[r|s,a] without future KL"
                if normalised:
                    formula = "π(a|s) ∝ π_ref(a|s)·exp(Q(s,a)/(β·σ_π)) per state, Q = E_π[r|s,a], σ_π fixed point"
            return DerivedTarget("per_state_boltzmann", formula, f"(ii) {src}: stationarity holds per state, not over "
                                 f"whole responses; {omega_note}{scale}", solve_tok)
        formula = ("π(a|s) = β·w(s,a)·π_ref(a|s)/(λ_s + β·w(s,a) − F(s,a)), per state by backward induction; "
                   "w = E_π[1/|y| | s,a], F = E_π[(r − b)/(|y|·σ) | s,a]" + stats)
        if not length_weighted:
            formula = "π(a|s) = π_ref(a|s)/(1 − (Q(s,a) − V(s))/(β·σ)) per state, V(s) = E_π Q(s,·)" + \
                ("" if normalised else ", σ = 1")
        return DerivedTarget("per_state_forward_kl", formula, "(iii) k3 differentiated per token pulls each state "
                             f"toward π_ref in the forward-KL direction; {omega_note}{scale}", solve_tok)

    if est in ("k2", "k3") and level == "sequence":                                 # (iv)
        family = "inv" if est == "k3" else "exp"

        def solve_seq(sb: SequenceBandit, family=family) -> Tensor:
            iw = sb.lengths.numpy() if length_weighted else np.ones(sb.N)
            pr = sb.pi_ref_seq.numpy()
            r = sb.reward.numpy()
            fam = _family_solver(family)
            return _outer(sb, lambda p, b, sc: fam(pr[p], (r[p] - b) / sc, iw, beta), baseline=baseline,
                          needs_b=length_weighted and baseline != "none", needs_s=normalised, eps=eps)
        formula = ("π_ref(y)·exp(A(y)/β)/Z over whole responses" if family == "exp" else
                   "β·π_ref(y)/(λ − A(y)) over whole responses, λ normalising")
        return DerivedTarget("boltzmann" if family == "exp" else "forward_kl", formula,
                             f"(iv) the KL of the whole response β·{est}(Σ_t d_t): the bandit formula over responses "
                             f"(A = (r − b)/σ); {omega_note}", solve_seq)
    raise TargetError(f"no sequence-level target derived for reference {ref.kind!r} with {ref.params}")


def _derive_gae(rw, ref, beta: float, length_weighted: bool, est, level) -> DerivedTarget:
    gamma = float(rw.get("gamma") if rw.get("gamma") is not None else 1.0)
    if length_weighted:
        raise TargetError("gae with a length-dependent aggregation weight ω = 1/|y|: the critic's fixed point is "
                          "an ω-weighted value, no derived target")
    if ref.kind == "none" or beta == 0 or est == "k1":
        return DerivedTarget("argmax", "argmax_y γ^(|y|−1)·r(x, y)" if gamma < 1 else "argmax_y r(x, y)",
                             "(vi) no regulariser: exact policy gradient of the (discounted) task reward",
                             _argmax_seq(gamma))
    if ref.kind == "kl_in_reward":
        if gamma == 1.0:
            return DerivedTarget("boltzmann", "π_ref(y|x)·exp(r(x,y)/β)/Z over whole responses",
                                 "(v) γ = 1: the critic's fixed point is V^π, so GAE gives the exact gradient of "
                                 "E[r] − β·KL(π‖π_ref) over responses (whitening only shifts and rescales it)",
                                 _boltzmann_seq(beta))

        def solve_sb(sb: SequenceBandit) -> Tensor:
            ref_sv, r = sb.ref_state_probs.numpy(), sb.reward.numpy()
            out = np.stack([_seq_probs_np(sb.tree, _soft_bellman(sb.tree, ref_sv[p], r[p], beta, gamma))
                            for p in range(sb.P)])
            return torch.as_tensor(out / out.sum(-1, keepdims=True))
        return DerivedTarget("discounted_soft_bellman",
                             "π(a|s) ∝ π_ref(a|s)·exp(Q(s,a)/β), Q = r at the end, else γ·β·log Σ π_ref·exp(Q'/β)",
                             f"(v) γ = {gamma} < 1: the per-token KL rewards are discounted with the task reward: "
                             "the discounted soft Bellman recursion, not the sequence Boltzmann", solve_sb)
    if level == "sequence":
        if gamma < 1.0:
            raise TargetError("sequence-level KL in the loss next to a discounted critic (γ < 1): the per-state "
                              "conditions do not close over whole responses, no derived target")
        if rw.get("whiten"):
            raise TargetError("whitened GAE advantages next to a KL in the loss: the advantage is divided by a "
                              "λ-dependent std the KL term is not, no derived target")
        family = "inv" if est == "k3" else "exp"

        def solve_gs(sb: SequenceBandit, family=family) -> Tensor:
            fam = _family_solver(family)
            pr, r = sb.pi_ref_seq.numpy(), sb.reward.numpy()
            out = np.stack([fam(pr[p], r[p], np.ones(sb.N), beta) for p in range(sb.P)])
            return torch.as_tensor(out)
        return DerivedTarget("boltzmann" if family == "exp" else "forward_kl",
                             "bandit formula over whole responses (A = r − V)",
                             "(iv)+(v) sequence-level KL with an exact critic", solve_gs)
    if rw.get("whiten"):
        raise TargetError("whitened GAE advantages next to a KL in the loss: the advantage is divided by a "
                          "λ-dependent std the KL term is not, no derived target")
    family = "inv" if est == "k3" else "exp"

    def solve_gt(sb: SequenceBandit, family=family) -> Tensor:
        ref_sv, r = sb.ref_state_probs.numpy(), sb.reward.numpy()
        out = np.stack([_seq_probs_np(sb.tree, _token_policy(sb.tree, ref_sv[p], r[p], np.ones(sb.N), beta, family,
                                                             discount=gamma)) for p in range(sb.P)])
        return torch.as_tensor(out / out.sum(-1, keepdims=True))
    kind = "per_state_forward_kl" if family == "inv" else "per_state_boltzmann"
    return DerivedTarget(kind, "per-state (ii)/(iii) with F(s,a) = Q_γ(s,a) − V(s) from the exact critic",
                         f"(v) token-level {est} in the loss with a critic (γ = {gamma})", solve_gt)


def sequence_target(algorithm, sb: SequenceBandit) -> Tensor:
    """The derived target of ``algorithm`` over whole responses: ``(P, N)`` float64, rows summing to 1.

    Raises:
        TargetError: no derived target on sequences (one-line reason), or a hinge target (a set, not a
            distribution: :func:`verify_sequence` checks its margins).
    """
    d = derive_sequence(algorithm.components)
    if d.solve is None:
        raise TargetError(f"{algorithm.name}: target kind {d.kind!r} has no unique distribution ({d.formula})")
    return d.solve(sb).double()


# ------------------------------------------------------------------------------------------- train / verify
def train_sequence(algorithm, sb: SequenceBandit, *, exact: bool = True, steps: Optional[int] = None, seed: int = 0,
                   lr: Optional[float] = None, batch_size: int = 64, init_logits: Optional[Tensor] = None,
                   log_every: int = 50, target: Optional[Tensor] = None, optimizer: Optional[str] = None,
                   lr_decay: Optional[bool] = None, average: Optional[bool] = None,
                   early_stop: Optional[bool] = None,
                   metrics: Optional[Callable[[Tensor], Dict[str, float]]] = None):
    """Train a per-state table policy on ``sb`` through ``algorithm``'s derived loss with :func:`udrra.loop.fit`.

    The schedule of :func:`udrra.verify.train`, the same function (:func:`udrra.verify.run_rounds`: Rprop on the exact population loss, early stop once the logits
    move < 1e-11 for 5 steps; Adam with a 1/√t decay and second-half averaging when sampled; a fresh optimiser per
    reference round), with :class:`SequenceProducer`, a :class:`~udrra.policy.TablePolicy` over the P·S states at
    log π_ref (+ ``init_logits`` ``(P·S, V)``), the same module as the reference, and a
    :class:`~udrra.policy.TableCritic` over the states for ``gae``. Two differences from the bandit:

    - after every step each state's logits are re-centred (a no-op on π): the gradient along a state's shift
      direction is pure round-off, and Rprop's sign steps would otherwise push every logit of a converged state by
      the maximal step forever (the logits drift, the early stop never fires);
    - the hinge link trains with Adam (lr 0.2) in exact mode too: its population objective is piecewise linear in
      u(y), and through the per-state parameterisation Rprop's sign steps stall on its kinks (observed: margins
      stuck at 0.1–0.99 of 1/β after 10⁴ steps), while Adam reaches the zero-loss set (stochastic labels, whose
      target is the optimal face of a linear program, also need :func:`verify_sequence`'s polish stages).

    Returns:
        ``(learned (P, N) float64 π(y|x), steps taken, history list of dicts)``.
    """
    return _train_sequence(algorithm, sb, exact=exact, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                           init_logits=init_logits, log_every=log_every, target=target, optimizer=optimizer,
                           lr_decay=lr_decay, average=average, early_stop=early_stop, metrics=metrics)[:3]


def _train_sequence(algorithm, sb: SequenceBandit, *, exact: bool, steps: Optional[int], seed: int,
                    lr: Optional[float], batch_size: int, init_logits: Optional[Tensor], log_every: int,
                    target: Optional[Tensor], optimizer: Optional[str], lr_decay: Optional[bool],
                    average: Optional[bool], early_stop: Optional[bool],
                    metrics: Optional[Callable[[Tensor], Dict[str, float]]] = None):
    """:func:`train_sequence`, also returning the final per-state logits ``(P·S, V)`` (to continue a run): a
    4-tuple ``(learned, steps, history, logits)``. The schedule is :func:`udrra.verify.run_rounds`, the bandit's."""
    from .policy import TableCritic, TablePolicy
    from .verify import World, run_rounds
    hinge = algorithm.pair_based and algorithm.components.reward.get("link") == "hinge"
    if optimizer is None and exact and hinge:
        optimizer, lr_decay = "adam", False if lr_decay is None else lr_decay
    lr = lr or ((0.2 if hinge else 0.05) if exact else 0.1)
    reference = TablePolicy(sb.log_ref_logits)
    start = sb.log_ref_logits if init_logits is None else \
        sb.log_ref_logits + torch.as_tensor(init_logits, dtype=torch.float64)
    policy = TablePolicy(start)
    critic = TableCritic(sb.num_states) if algorithm.components.reward.get("baseline") == "gae" else None

    def set_average(final: Tensor) -> None:
        with torch.no_grad():
            policy.logits.copy_(torch.log(sb.state_probs_from_sequence(final).clamp_min(1e-300)).reshape(-1, sb.V))
    world = World(policy, reference, critic,
                  SequenceProducer(algorithm, sb, policy, reference, critic, exact=exact, batch_size=batch_size,
                                   generator=torch.Generator().manual_seed(seed)),
                  probs_of=lambda logits: torch.exp(sb.sequence_logps(logits)), set_average=set_average,
                  recenter=True)
    learned, taken, history = run_rounds(algorithm, world, exact=exact, steps=steps, lr=lr, optimizer=optimizer,
                                         lr_decay=lr_decay, average=average, early_stop=early_stop,
                                         log_every=log_every, target=target, metrics=metrics)
    return learned, taken, history, policy().detach().clone()


def verify_sequence(algorithm, sb: SequenceBandit, *, exact: bool = True, steps: Optional[int] = None, seed: int = 0,
                    lr: Optional[float] = None, batch_size: int = 64, init_logits: Optional[Tensor] = None,
                    tolerance: Optional[float] = None, log_every: int = 50):
    """Train ``algorithm`` on the sequence testbed and compare π(y|x) over whole responses with
    :func:`derive_sequence`'s target (what :func:`udrra.verify` does for a :class:`SequenceBandit`).

    Returns:
        :class:`udrra.VerifyResult` with ``target`` / ``learned`` ``(P, N)``. A composition without a derived
        target is still trained and reported, with ``target = None``, ``target_kind = "none"``, ``passed = False``
        and the reason in ``note`` (the CLI prints it as a skip). Hinge targets are judged on the Bandit view's
        margins / LP gap as on the bandit; an exact hinge run with a frozen reference that misses it continues with
        Adam in stages of shrinking steps (:data:`HINGE_POLISH_STEPS`, ``steps`` more in all).
    """
    from .verify import EXACT_TOL, SAMPLED_TOL, VerifyResult, judge
    tolerance = tolerance if tolerance is not None else (EXACT_TOL if exact else SAMPLED_TOL)
    reason = None
    target = derived = None
    try:
        derived = derive_sequence(algorithm.components)
        if derived.solve is not None:
            target = derived.solve(sb).double()
        else:
            from .components.target import hinge_identified
            hinge_identified(algorithm.components, sb.to_bandit())
    except TargetError as e:
        reason, derived = str(e), None
    learned, total, history, logits = _train_sequence(
        algorithm, sb, exact=exact, steps=steps, seed=seed, lr=lr, batch_size=batch_size, init_logits=init_logits,
        log_every=log_every, target=target, optimizer=None, lr_decay=None, average=None, early_stop=None)
    if derived is None:
        nan = float("nan")
        return VerifyResult(algorithm.name, None, learned, nan, nan, total, history, tolerance, False, "none", reason)
    state = {"logits": logits}

    def polish(learned: Tensor, lr: float, n: int):           # continue from the last run's per-state logits
        learned, taken, hist, state["logits"] = _train_sequence(
            algorithm, sb, exact=True, steps=n, seed=seed, lr=lr, batch_size=batch_size,
            init_logits=state["logits"] - sb.log_ref_logits, log_every=log_every, target=None, optimizer="adam",
            lr_decay=True, average=False, early_stop=False)
        return learned, taken, hist
    return judge(algorithm, derived, target, learned, total, history, view=sb.to_bandit(), exact=exact,
                 steps=steps, tolerance=tolerance, polish=polish, stages=HINGE_POLISH_STEPS)
