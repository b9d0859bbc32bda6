"""Proof 12: token-level losses on the smallest multi-token tree (udrra/sequence.py, derivations (i)–(iv);
theory.md §4.1, §5.4; Tang & Munos arXiv 2506.09477; the ReMax code's per-token KL).

The tree. One prompt, a root state ``root`` with two actions: ``a`` leads to a second state ``a`` with two
terminal actions (responses ``aa``, ``ab``: two tokens), ``b`` is terminal (response ``b``: one token). The
policy is a per-state softmax of symbolic logits, π(y) = Π_t π(y_t|s_t); π_ref is symbolic per state
(π_ref(a|s) = ρ_s, π_ref(b|s) = 1 − ρ_s, ρ_s > 0 a free symbol). Aggregation is the token *sum* per response
(ω ≡ 1), the ratio π/π_old is 1 at the evaluation point (so the surrogate −(π/π_old)·A has the gradient of
−A·log π(y_t|s_t)), and the advantage is an outcome advantage R − b with a free, response-independent baseline b.

The population gradient, exactly. A response's loss ℓ(y) is a function of its token log-probs x_t =
log π(y_t|s_t) and of detached quantities (the sampling weight π(y), the k1_t inside a return). With
F = Σ_y sg[π(y)]·ℓ(y) (an autograd loss: the sampling distribution is not differentiated) and D(s, a) = ∂F/∂x(s, a)
(sympy's derivative of the loss), the softmax Jacobian ∂x(s, a)/∂θ(s, a') = δ_aa' − π(a'|s) gives

    ∂F/∂θ(s, a') = Σ_a D(s, a)·(δ_aa' − π(a'|s))         for every state s and logit a',

(:func:`logit_gradient_is_autograd` checks this against sympy's derivative of the softmax loss in the logits, for
every loss in :data:`LOSSES`). With two actions and π(a|s) + π(b|s) = 1 it is ∂F/∂θ(s, a) = −∂F/∂θ(s, b) =
π(a|s)·π(b|s)·(D(s, a)/π(a|s) − D(s, b)/π(b|s)), and D(s, a)/π(a|s) = reach(s)·G(s, a) with G(s, a) =
E_π[∂ℓ/∂x_t | s_t = s, a_t = a] the expected per-token gradient coefficient. Every proof returns, at the claimed
per-state policy, D(s, a)/π(a|s) − D(s, b)/π(b|s) for s = root, a, then the normalisation residuals
Σ_a π(a|s) − 1 (4 residuals): all identically 0 iff the claim is a policy at which the exact logit gradient of the
population loss vanishes. A claim is ``claim(tree) -> {"root": (π(a|root), π(b|root)), "a": (π(a|a), π(b|a))}``
with ``tree`` a :class:`Tree` (its ``ref``, ``r``, ``beta``, ``lam``).

Coordinates that keep every check exact and fast (all symbolic, no numbers substituted):

- Boltzmann proofs (1, 2): the rewards are r(y) = β·log E(y), E(y) > 0 a free symbol (every real r is one), so
  exp(r/β) = E and a residual is rational in E, ρ and logs of them (`_common.canon`).
- Forward-KL proofs (3, sequence k3): the rewards are written in the coordinates of the true target — its
  probabilities and normaliser — e.g. r(y) = λ − β·π_ref(y)/p(y) with p on the simplex for the sequence
  optimum (see :func:`_forward_kl_tree`, :func:`_sequence_forward_kl_tree`). For given π_ref and β each reward
  vector has exactly one such coordinate tuple (the normalising λ > max r is unique), so a residual identically 0
  in the coordinates is 0 for every reward at the true normaliser, with no closed form of a λ root needed.

The claims (udrra/sequence.py):

1. :func:`kl_in_reward_sequence_return_is_sequence_boltzmann` — k1 per token in the reward, every token's return
   R = r − β·Σ_t k1_t (γ = 1; ``kl_return = "sequence"``), score-function gradient −(R − b)·x_t: stationary at
   π(y) ∝ π_ref(y)·exp(r(y)/β) over whole responses, i.e. the per-state policies of that distribution (the soft
   Bellman recursion). ``reward_to_go=True`` lets token t's return hold only the k1 of tokens ≥ t (PPO's
   return-to-go) and ``critic=True`` subtracts an arbitrary per-state baseline V(s_t) instead of b (GAE with
   λ = 1, any critic): the past KL and V are functions of the state, the same target. (GAE with λ < 1 needs
   V = V^π, sequence.py (v); not covered.)
2. :func:`per_token_kl_return_is_per_state_boltzmann` — token t's return holds r − β·k1_t of that token only
   (``kl_return = "token"``, the ReMax code), and k2 = ½·d_t² per token in the loss: the two gradients coincide and
   are stationary at π(a|s) ∝ π_ref(a|s)·exp(Q(s,a)/β), Q(s,a) = E_π[r | s, a] with no future KL (Q(root, a) =
   π(a|a)·r_aa + π(b|a)·r_ab) — not the sequence Boltzmann.
3. :func:`per_token_k3_is_per_state_forward_kl` — k3 per token in the loss (GRPO as implemented, no std):
   stationary at π(a|s) = β·π_ref(a|s)/(λ_s − Q(s,a)), λ_s normalising per state — not the sequence-level
   forward-KL optimum β·π_ref(y)/(λ − r(y)).
   :func:`sequence_k3_is_sequence_forward_kl` — k3 of the *sequence* log-ratio D(y) = Σ_t d_t once per response
   (``level = "sequence"``): stationary at π(y) = β·π_ref(y)/(λ − r(y)) over whole responses.
4. :func:`dr_grpo_finite_group_advantage` — K = 2 responses, a group of n draws holding the sample itself: the
   group-mean advantage R(y) − mean averaged over the other n − 1 draws is (n − 1)/n·(R(y) − E_π R) (n = 2, 3:
   every ordered tuple of the other draws enumerated), so Dr. GRPO at finite n is the n → ∞ objective with
   β' = β·n/(n − 1) (with k3 in the loss: β'·π_ref/(λ − r), proof 7d with β').

Dividing the outcome advantage by a response-independent σ while a KL term in the loss is not divided (k2/k3,
group_norm) replaces β by β·σ (grpo.py, proof 7). A length-dependent ω (token mean per response) changes the
per-state targets (sequence.py (ii)/(iii)) and is not covered here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import sympy as sp

from ._common import canon, nonzero_somewhere

# ------------------------------------------------------------------------------------------------ the tree
STATES = ("root", "a")
ACTIONS = ("a", "b")
RESPONSES = ("aa", "ab", "b")
#: the (state, action) of each token of a response
PATHS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "aa": (("root", "a"), ("a", "a")),
    "ab": (("root", "a"), ("a", "b")),
    "b": (("root", "b"),),
}

Policy = Dict[str, Tuple[sp.Expr, sp.Expr]]          # state -> (π(a|s), π(b|s))


@dataclass
class Tree:
    """The symbols a claim may use: ``ref[s] = (π_ref(a|s), π_ref(b|s))``, ``r[y]``, ``beta``, ``lam[s]`` (the
    per-state normalisers of the forward-KL proofs; ``lam["root"]`` is the sequence normaliser in
    :func:`sequence_k3_is_sequence_forward_kl`)."""

    ref: Policy
    r: Dict[str, sp.Expr]
    beta: sp.Expr
    lam: Dict[str, sp.Expr]


Claim = Callable[[Tree], Policy]


def _reference() -> Policy:
    rho = {s: sp.Symbol(f"rho_{s}", positive=True) for s in STATES}
    return {s: (rho[s], 1 - rho[s]) for s in STATES}


def _beta():
    return sp.Symbol("beta", positive=True)


def _lams() -> Dict[str, sp.Symbol]:
    return {s: sp.Symbol(f"lambda_{s}", real=True) for s in STATES}


def _boltzmann_tree() -> Tree:
    """Rewards r(y) = β·log E(y) with E(y) > 0 free: exp(r/β) = E is rational."""
    beta = _beta()
    E = {y: sp.Symbol(f"E_{y}", positive=True) for y in RESPONSES}
    return Tree(_reference(), {y: beta * sp.log(E[y]) for y in RESPONSES}, beta, _lams())


def response_prob(pi: Policy, y: str) -> sp.Expr:
    """π(y) = Π_t π(y_t | s_t)."""
    return sp.Mul(*[pi[s][ACTIONS.index(a)] for s, a in PATHS[y]])


def q_values(pi: Policy, r: Dict[str, sp.Expr]) -> Dict[str, Tuple[sp.Expr, sp.Expr]]:
    """Q(s, a) = E_π[r | s, a] (task reward only, no KL): Q(a, ·) = (r_aa, r_ab), Q(root, a) = π(a|a)·r_aa +
    π(b|a)·r_ab, Q(root, b) = r_b."""
    qa = (r["aa"], r["ab"])
    return {"a": qa, "root": (pi["a"][0] * qa[0] + pi["a"][1] * qa[1], r["b"])}


def conditionals(p: Dict[str, sp.Expr]) -> Policy:
    """The per-state policies of a distribution p over the three responses (π(a|a) = p(aa)/(p(aa) + p(ab)), ...)."""
    pa = p["aa"] + p["ab"]
    return {"root": (pa / (pa + p["b"]), p["b"] / (pa + p["b"])), "a": (p["aa"] / pa, p["ab"] / pa)}


# ----------------------------------------------------------------------------------------- the claimed targets
def sequence_boltzmann(t: Tree) -> Policy:
    """π(y) ∝ π_ref(y)·exp(r(y)/β) over whole responses, as per-state policies (udrra/sequence.py (i))."""
    ref_y = response_prob(t.ref, "aa"), response_prob(t.ref, "ab"), response_prob(t.ref, "b")
    return conditionals({y: ry * sp.exp(t.r[y] / t.beta) for y, ry in zip(RESPONSES, ref_y)})


def _state_boltzmann(ref, q, beta):
    w = [ref[i] * sp.exp(q[i] / beta) for i in range(2)]
    return (w[0] / (w[0] + w[1]), w[1] / (w[0] + w[1]))


def per_state_boltzmann(t: Tree) -> Policy:
    """π(a|s) ∝ π_ref(a|s)·exp(Q(s,a)/β), Q = E_π[r | s, a] without the future KL, solved from the leaves
    (udrra/sequence.py (ii), ω ≡ 1)."""
    pa = _state_boltzmann(t.ref["a"], (t.r["aa"], t.r["ab"]), t.beta)
    q = q_values({"a": pa}, t.r)
    return {"root": _state_boltzmann(t.ref["root"], q["root"], t.beta), "a": pa}


def per_state_forward_kl(t: Tree) -> Policy:
    """π(a|s) = β·π_ref(a|s)/(λ_s − Q(s,a)), λ_s normalising (udrra/sequence.py (iii), ω ≡ 1, σ = 1)."""
    def state(s, q):
        return tuple(t.beta * t.ref[s][i] / (t.lam[s] - q[i]) for i in range(2))
    pa = state("a", (t.r["aa"], t.r["ab"]))
    return {"root": state("root", q_values({"a": pa}, t.r)["root"]), "a": pa}


def sequence_forward_kl(t: Tree) -> Policy:
    """π(y) = β·π_ref(y)/(λ − r(y)) over whole responses, λ = ``lam["root"]`` (udrra/sequence.py (iv), k3), as
    per-state policies."""
    return conditionals({y: t.beta * response_prob(t.ref, y) / (t.lam["root"] - t.r[y]) for y in RESPONSES})


# ---------------------------------------------------------------------------------------------------- the losses
def _k3(d):
    """k3 as a function of d = log π/π_ref: π_ref/π − 1 − log(π_ref/π) = e^{−d} − 1 + d."""
    return sp.exp(-d) - 1 + d


def _return_sequence(r, b, beta, x, xo, lr):
    kl = sp.Add(*[o - l for o, l in zip(xo, lr)])
    return sp.Add(*[-(r - beta * kl - b[t]) * x[t] for t in range(len(x))])


def _return_to_go(r, b, beta, x, xo, lr):
    return sp.Add(*[-(r - beta * sp.Add(*[xo[u] - lr[u] for u in range(t, len(x))]) - b[t]) * x[t]
                    for t in range(len(x))])


def _return_token(r, b, beta, x, xo, lr):
    return sp.Add(*[-(r - beta * (xo[t] - lr[t]) - b[t]) * x[t] for t in range(len(x))])


def _k2_token(r, b, beta, x, xo, lr):
    return sp.Add(*[-(r - b[t]) * x[t] + beta * (x[t] - lr[t]) ** 2 / 2 for t in range(len(x))])


def _k3_token(r, b, beta, x, xo, lr):
    return sp.Add(*[-(r - b[t]) * x[t] + beta * _k3(x[t] - lr[t]) for t in range(len(x))])


def _k3_sequence(r, b, beta, x, xo, lr):
    return sp.Add(*[-(r - b[t]) * x[t] for t in range(len(x))]) + beta * _k3(sp.Add(*x) - sp.Add(*lr))


#: name -> ℓ(r, b, β, x, x_detached, log π_ref) of one response: x are its token log-probs, b its tokens' baselines
LOSSES: Dict[str, Callable] = {
    "kl_return_sequence": _return_sequence,     # k1 in the reward, R = r − β·Σ_t k1_t on every token
    "kl_return_to_go": _return_to_go,           # ... token t's return holds the k1 of tokens ≥ t only
    "kl_return_token": _return_token,           # ... token t's return holds its own k1_t only (ReMax code)
    "k2_token": _k2_token,                      # β·k2(d_t) per token in the loss
    "k3_token": _k3_token,                      # β·k3(d_t) per token in the loss (GRPO as implemented)
    "k3_sequence": _k3_sequence,                # β·k3(Σ_t d_t) once per response
}


def _loss_symbols():
    x = {(s, a): sp.Symbol(f"x_{s}{a}", real=True) for s in STATES for a in ACTIONS}       # log π(a|s)
    xo = {(s, a): sp.Symbol(f"xo_{s}{a}", real=True) for s in STATES for a in ACTIONS}     # detached log π(a|s)
    w = {y: sp.Symbol(f"w_{y}", positive=True) for y in RESPONSES}                         # detached π(y)
    return x, xo, w


def _baseline(b) -> Callable[[str], sp.Expr]:
    """b: one expression (an outcome baseline, the same on every token) or {state: V(s)} (a state baseline)."""
    return (lambda s: b[s]) if isinstance(b, dict) else (lambda s: b)


def population_loss(loss: Callable, t: Tree, b):
    """F = Σ_y w_y·ℓ(y) with w_y the detached π(y); returns (F, x, xo, w). ``b``: see :func:`_baseline`."""
    x, xo, w = _loss_symbols()
    base = _baseline(b)
    F = 0
    for y in RESPONSES:
        path = PATHS[y]
        lr = [sp.log(t.ref[s][ACTIONS.index(a)]) for s, a in path]
        F += w[y] * loss(t.r[y], [base(s) for s, _ in path], t.beta, [x[p] for p in path], [xo[p] for p in path],
                         lr)
    return F, x, xo, w


def _coefficients(loss: Callable, t: Tree, pi: Policy, b) -> Dict[Tuple[str, str], sp.Expr]:
    """D(s, a) = ∂F/∂x(s, a), x(s, a) = log π(a|s), with the detached π(y) and k1_t evaluated at ``pi``."""
    F, x, xo, w = population_loss(loss, t, b)
    at = {}
    for s in STATES:
        for i, a in enumerate(ACTIONS):
            at[x[(s, a)]] = sp.log(pi[s][i])
            at[xo[(s, a)]] = sp.log(pi[s][i])
    at.update({w[y]: response_prob(pi, y) for y in RESPONSES})
    return {p: sp.diff(F, xp).subs(at) for p, xp in x.items()}


def logit_gradient(loss: Callable, t: Tree, pi: Policy, b) -> List[sp.Expr]:
    """∂F/∂θ(s, a') = Σ_a D(s, a)·(δ_aa' − π(a'|s)) at the per-state policy ``pi`` (D = ∂F/∂x, detached
    quantities evaluated at ``pi``), for (s, a') in (root, a), (root, b), (a, a), (a, b)."""
    D = _coefficients(loss, t, pi, b)
    return [sp.Add(*[D[(s, a)] * ((1 if a == a2 else 0) - pi[s][j]) for a in ACTIONS])
            for s in STATES for j, a2 in enumerate(ACTIONS)]


def _stationarity(loss: Callable, t: Tree, claim: Claim, critic: bool = False) -> List[sp.Expr]:
    """[∂F/∂θ(s, a)/(π(a|s)·π(b|s)) for s = root, a] + [Σ_a π(a|s) − 1 for s = root, a] at the claim, each
    passed through :func:`_settle`.

    With two actions and π(a|s) + π(b|s) = 1 the logit gradient is ∂F/∂θ(s, a) = −∂F/∂θ(s, b) =
    D(s, a)·π(b|s) − D(s, b)·π(a|s) = π(a|s)·π(b|s)·(D(s, a)/π(a|s) − D(s, b)/π(b|s)), so the first residuals are
    D(s, a)/π(a|s) − D(s, b)/π(b|s) = reach(s)·(G(s, a) − G(s, b)), G(s, a) = E_π[∂ℓ/∂x_t | s, a] the expected
    per-token gradient coefficient: all four vanish iff the claim is a policy at which the logit gradient is 0.
    The baseline is a free symbol b, or with ``critic`` a free V(s) per state."""
    b = {s: sp.Symbol(f"V_{s}", real=True) for s in STATES} if critic else sp.Symbol("b", real=True)
    pi = claim(t)
    D = _coefficients(loss, t, pi, b)
    res = [D[(s, "a")] / pi[s][0] - D[(s, "b")] / pi[s][1] for s in STATES]
    res += [pi[s][0] + pi[s][1] - 1 for s in STATES]
    return [_settle(e) for e in res]


def _settle(e: sp.Expr) -> sp.Expr:
    """``canon(e)`` (0 for an identically-zero residual), unless e is already non-zero at one of the witness points
    (then e is returned as it is: canonicalising a wrong claim's large residual can take minutes, and the value at
    that point already shows it is not identically 0). A residual whose numerator over a common denominator
    expands to 0 is 0 (the fast path for the nested rational residuals of the forward-KL proofs)."""
    if nonzero_somewhere(e):
        return e
    if sp.expand(sp.numer(sp.together(sp.expand_log(e, force=True)))) == 0:
        return sp.Integer(0)
    return canon(e)


def logit_gradient_is_autograd(loss: str = "k3_token") -> List[sp.Expr]:
    """The chain-rule form used by every proof here is the exact gradient: with softmax logits θ(s, ·), detached
    π(y) and k1_t, sympy's ∂F/∂θ of the loss minus Σ_a D(s, a)·(δ_aa' − π(a'|s)) at generic logits (4 residuals,
    all 0). ``loss`` is a key of :data:`LOSSES`."""
    t = Tree(_reference(), {y: sp.Symbol(f"r_{y}", real=True) for y in RESPONSES}, _beta(), _lams())
    b = sp.Symbol("b", real=True)
    theta = {(s, a): sp.Symbol(f"theta_{s}{a}", real=True) for s in STATES for a in ACTIONS}
    pi = {s: tuple(sp.exp(theta[(s, a)]) / sp.Add(*[sp.exp(theta[(s, c)]) for c in ACTIONS]) for a in ACTIONS)
          for s in STATES}
    F, x, xo, w = population_loss(LOSSES[loss], t, b)
    logsoft = {(s, a): theta[(s, a)] - sp.log(sp.Add(*[sp.exp(theta[(s, c)]) for c in ACTIONS]))
               for s in STATES for a in ACTIONS}
    F_theta = F.subs({x[p]: logsoft[p] for p in x})                         # differentiable log-probs
    detached = {**{xo[p]: logsoft[p] for p in xo}, **{w[y]: response_prob(pi, y) for y in RESPONSES}}
    auto = [sp.diff(F_theta, theta[(s, a)]).subs(detached) for s in STATES for a in ACTIONS]
    formula = logit_gradient(LOSSES[loss], t, pi, b)
    return [canon(u - v) for u, v in zip(auto, formula)]


# ------------------------------------------------------------------------------------------------------- proofs
def kl_in_reward_sequence_return_is_sequence_boltzmann(claim: Optional[Claim] = None, reward_to_go: bool = False,
                                                       critic: bool = False) -> List[sp.Expr]:
    """Claim (udrra/sequence.py (i); Ouyang et al. Eq. 2 with γ = 1): with k1 per token in the reward and every
    token's return R = r − β·Σ_t k1_t (detached), the score-function gradient −(R − b)·∇log π(y_t|s_t) with a
    response-independent b is stationary at π(y) ∝ π_ref(y)·exp(r(y)/β) over whole responses (default claim
    :func:`sequence_boltzmann`). ``reward_to_go``: token t's return holds the k1 of tokens ≥ t only; ``critic``:
    token t's baseline is a free V(s_t) per state (any critic; with reward_to_go the advantage of GAE at λ = 1).

    Returns [D(s, a)/π(a|s) − D(s, b)/π(b|s) for s = root, a] + [Σ_a π(a|s) − 1 for s = root, a] at the claim
    (module docstring: all 0 iff the exact logit gradient vanishes at a policy); rewards r = β·log E."""
    loss = LOSSES["kl_return_to_go" if reward_to_go else "kl_return_sequence"]
    return _stationarity(loss, _boltzmann_tree(), claim or sequence_boltzmann, critic)


def per_token_kl_return_is_per_state_boltzmann(claim: Optional[Claim] = None) -> List[sp.Expr]:
    """Claim (udrra/sequence.py (ii); the ReMax code's non-cumulative per-token KL): token t's return r − β·k1_t
    (its own k1 only, detached) with the score-function gradient, and β·k2(d_t) per token in the loss, are both
    stationary at π(a|s) ∝ π_ref(a|s)·exp(Q(s,a)/β), Q(s,a) = E_π[r | s, a] without the future KL (default claim
    :func:`per_state_boltzmann`).

    Returns the four residuals (as in proof 1) of the per-token KL return, then the four of k2 per token in the
    loss; rewards r = β·log E."""
    t = _boltzmann_tree()
    claim = claim or per_state_boltzmann
    return _stationarity(LOSSES["kl_return_token"], t, claim) + _stationarity(LOSSES["k2_token"], t, claim)


def _forward_kl_tree() -> Tree:
    """The rewards in the coordinates (λ_a, p_a, p_root) of the per-state forward-KL target: p_a = π*(a|a) and
    p_root = π*(a|root) in (0, 1), λ_a ∈ R, and r_aa = λ_a − β·ρ_a/p_a, r_ab = λ_a − β(1 − ρ_a)/(1 − p_a),
    λ_root = λ_a − β + β·ρ_root/p_root (so that λ_root − Q(root, a) = β·ρ_root/p_root, Q(root, a) = λ_a − β),
    r_b = λ_root − β(1 − ρ_root)/(1 − p_root). For given ρ, β every reward vector has exactly one such (λ_a, p_a,
    p_root) (the normalising λ_s > max_a Q(s, a) is unique), so an identity in these symbols holds for every reward,
    at the true normalisers."""
    beta, ref = _beta(), _reference()
    lam_a = sp.Symbol("lambda_a", real=True)
    p_a, p_root = sp.Symbol("p_a", positive=True), sp.Symbol("p_root", positive=True)
    rho_a, rho_root = ref["a"][0], ref["root"][0]
    lam_root = lam_a - beta + beta * rho_root / p_root
    r = {"aa": lam_a - beta * rho_a / p_a, "ab": lam_a - beta * (1 - rho_a) / (1 - p_a),
         "b": lam_root - beta * (1 - rho_root) / (1 - p_root)}
    return Tree(ref, r, beta, {"root": lam_root, "a": lam_a})


def per_token_k3_is_per_state_forward_kl(claim: Optional[Claim] = None) -> List[sp.Expr]:
    """Claim (udrra/sequence.py (iii); Tang & Munos 2506.09477; DeepSeekMath Eq. 21 per token): β·k3(d_t) per
    token in the loss plus the outcome advantage r − b (no std) is stationary at π(a|s) = β·π_ref(a|s)/(λ_s −
    Q(s,a)), λ_s normalising per state (default claim :func:`per_state_forward_kl`).

    Returns the four residuals (as in proof 1), the rewards in the target's coordinates (λ_a, π*(a|a), π*(a|root))
    of :func:`_forward_kl_tree`, so ``lam`` holds the true per-state normalisers."""
    return _stationarity(LOSSES["k3_token"], _forward_kl_tree(), claim or per_state_forward_kl)


def _sequence_forward_kl_tree() -> Tree:
    """The rewards in the coordinates (λ, p_aa, p_ab) of the sequence forward-KL target: p(y) = π*(y) on the
    simplex (p_b = 1 − p_aa − p_ab), λ ∈ R, r(y) = λ − β·π_ref(y)/p(y) — one (λ, p) per reward vector (λ > max r
    normalising), so an identity in these symbols holds for every reward. ``lam["root"]`` = λ."""
    beta, ref = _beta(), _reference()
    lam = sp.Symbol("lambda", real=True)
    p = {y: sp.Symbol(f"p_{y}", positive=True) for y in ("aa", "ab")}
    p["b"] = 1 - p["aa"] - p["ab"]
    r = {y: lam - beta * response_prob(ref, y) / p[y] for y in RESPONSES}
    return Tree(ref, r, beta, {"root": lam, "a": sp.Symbol("lambda_a", real=True)})


def sequence_k3_is_sequence_forward_kl(claim: Optional[Claim] = None) -> List[sp.Expr]:
    """Claim (udrra/sequence.py (iv); Tang & Munos 2506.09477): β·k3 of the sequence log-ratio D(y) = Σ_t d_t,
    once per response, plus the score-function term −(r − b)·log π(y), is stationary at π(y) = β·π_ref(y)/(λ −
    r(y)) over whole responses, λ normalising (default claim :func:`sequence_forward_kl`).

    Returns the four residuals (as in proof 1), the rewards in the target's coordinates (λ, π*(aa), π*(ab)) of
    :func:`_sequence_forward_kl_tree`, so ``lam["root"]`` is the true normaliser."""
    return _stationarity(LOSSES["k3_sequence"], _sequence_forward_kl_tree(), claim or sequence_forward_kl)


def dr_grpo_finite_group_advantage(n: int = 2, claim: Optional[Callable] = None, k: int = 2) -> List[sp.Expr]:
    """Claim (Liu et al. 2503.20783 §3.2; udrra's finite-n Dr. GRPO target): K = ``k`` responses with symbolic
    π (on the simplex) and returns R; a group {y, y_2, ..., y_n} of n draws whose mean holds y itself. The
    group-mean advantage R(y) − (R(y) + Σ_j R(y_j))/n averaged over the other n − 1 iid draws (every ordered
    tuple enumerated) equals (n − 1)/n·(R(y) − E_π R) — the n → ∞ advantage scaled by (n − 1)/n, so a KL weight β
    acts as β' = β·n/(n − 1).

    ``claim(R_y, mean, n) -> ā(y)`` (default (n − 1)/n·(R_y − mean)). Returns ā(y) − claim for y = 1..K."""
    free = list(sp.symbols(f"p1:{k}", positive=True))
    pi = free + [1 - sp.Add(*free)]
    R = list(sp.symbols(f"R1:{k + 1}", real=True))
    mean = sp.Add(*[p * q for p, q in zip(pi, R)])
    claim = claim or (lambda Ry, m, n: sp.Rational(n - 1, n) * (Ry - m))
    out = []
    for y in range(k):
        abar = 0
        for others in itertools.product(range(k), repeat=n - 1):
            weight = sp.Mul(*[pi[j] for j in others])
            abar += weight * (R[y] - (R[y] + sp.Add(*[R[j] for j in others])) / n)
        out.append(sp.factor(sp.expand(abar - claim(R[y], mean, n))))
    return out
