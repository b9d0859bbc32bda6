"""Human-readable descriptions of a composition: its components, the loss written out, and its target."""

from __future__ import annotations

from typing import List

from .components.reward import BASELINE_TABLE, GAE, LINK_TABLE, RETURN_TO_GO, TOKEN_ESTIMATES
from .proof_index import proofs_for, why_none

_AGG_TEXT = {
    "seq_mean_token_sum": "mean over sequences of Σ_t ℓ_t",
    "seq_mean_token_mean": "mean over sequences of (1/|y|)·Σ_t ℓ_t  (GRPO's per-response length normalisation)",
    "token_mean": "Σ_{b,t} ℓ_bt / (response tokens of the optimizer batch)",
    "seq_mean_token_sum_norm": "mean over sequences of Σ_t ℓ_t / T_max  (Dr. GRPO's constant normaliser)",
}
_KL_TEXT = {"k1": "log(π/π_ref)", "k2": "½·log²(π/π_ref)", "k3": "π_ref/π − 1 − log(π_ref/π)"}
#: what the exact population loss uses for each group baseline: the sampled advantage averaged over the other
#: n − 1 draws of the group (udrra.components.reward.advantages with group_size)
_EXACT_GROUP_TEXT = {
    "leave_one_out": "A(y) → ā(y) = E_{{y_2..y_n ∼ π}}[A] = R(y) − E_π R  (unbiased: the same for every n = {n})",
    "group_mean": "A(y) → ā(y) = E_{{y_2..y_n ∼ π}}[A] = (n − 1)/n·(R(y) − E_π R)  at n = {n}",
    "group_norm": "A(y) → ā(y) = E_{{y_2..y_n ∼ π}}[A(y; {{y, y_2, ..., y_n}})]  at n = {n}: the {m} other draws "
                  "enumerated as multisets (n → ∞ beyond 200000 of them, with a warning)",
    "batch_norm": "mean and std over the batch taken as expectations under π (n → ∞: the batch is large)",
}


def loss_lines(algorithm) -> List[str]:
    """The derived loss, one line per stage of the data flow."""
    t, s, rw, ref = algorithm.components
    lines: List[str] = []
    norm = "/|y|" if ref.get("length_normalize") else ""
    if rw.kind == "max_likelihood":
        lines.append(f"y = the highest-reward of n = {s['n']} samples from π_ref (the round's sampler)")
        lines.append("loss = E_(x, y)[ −log π(y|x) ]   (maximum likelihood on the kept samples)")
    elif rw.kind == "explicit":
        lines += _sample_loss_lines(algorithm)
    elif ref.kind in ("none", "chosen_nll"):
        lines.append(f"u(y) = log π(y){norm}   (no reference model)")
    else:
        lines.append(f"u(y) = (log π(y) − log π_ref(y)){norm}")
    if rw.kind == "preference":
        link = LINK_TABLE[rw["link"]]
        g = link.g_text + (f", α = {t['alpha']}" if rw["link"] == "alpha_divergence" else "")
        gamma = ref.get("gamma") or 0.0
        lines.append(f"x = β·(g(u_w) − g(u_l))" + (f" − γ, γ = {gamma}" if gamma else "") + f",  g(u) = {g}")
        eps = f", ε = {rw['epsilon']}" if rw.get("epsilon") is not None else ""
        if ref.kind == "chosen_nll":
            lines.append(f"loss = E_(x, y_w, y_l)[ −u(y_w) + λ·[{link.formula}] ]   (chosen NLL + λ·link {link.name}, "
                         f"λ = {ref['lam']}, β = {algorithm.beta})")
        else:
            lines.append(f"loss = E_(x, y_w, y_l)[ {link.formula} ]   (link {link.name}{eps}, β = {algorithm.beta})")
    elif rw.kind == "noise_contrastive":
        lines.append(f"loss = E_(x, y_w, y_l)[ −log σ(β·u_w) − ½·log σ(−β·u_w) − ½·log σ(−β·u_l) ]   (NCA, "
                     f"β = {algorithm.beta})")
    elif rw.kind == "reward_difference":
        lines.append(f"loss = E_(y, y' ∼ d)[ (β·(u(y) − u(y')) − (r(y) − r(y')))² ]   (β = {algorithm.beta})")
    elif rw.kind == "reward_regression":
        lines.append(f"loss = E_(y ∼ d)[ (β·u(y) + β·log Z(x) − r(y))² ]   (β = {algorithm.beta}; needs log Z)")
    upd = ref.get("update", "frozen")
    if upd == "ema":
        lines.append(f"π_ref ← {ref['decay']}·π_ref + (1 − {ref['decay']})·π_θ after every step (parameters)")
    elif upd == "reset_every":
        lines.append(f"π_ref ← π_θ every {ref['every']} steps on an LM; {ref['rounds']} converged rounds on the bandit")
    return lines


def _sample_loss_lines(algorithm) -> List[str]:
    """The token-level loss of an ``explicit``-reward composition, stage by stage."""
    t, s, rw, ref = algorithm.components
    beta = algorithm.beta
    lines: List[str] = ["d_t = log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t),  per response token t"]
    if ref.kind == "kl_in_reward":
        lines.append(f"r_t = −β·d_t (rollout policy, no gradient) + r(x, y) at the last response token (EOS), "
                     f"β = {beta}")
    else:
        lines.append("r_t = r(x, y) at the last response token (EOS), 0 elsewhere")
    if rw["baseline"] == RETURN_TO_GO:
        lines.append(TOKEN_ESTIMATES[RETURN_TO_GO])
    elif rw["baseline"] == GAE:
        lines.append(f"A_t = GAE: δ_t = r_t + γ·V(s_t+1) − V(s_t), A_t = δ_t + γλ·A_t+1  (γ = {rw['gamma']}, "
                     f"λ = {rw['lam']}{', whitened over the batch' if rw['whiten'] else ''}); critic V learned")
    else:
        per_token = ref.kind == "kl_in_reward" and ref["kl_return"] == "token"
        ret = "R = r(x, y)" if per_token or ref.kind != "kl_in_reward" else "R = Σ_t r_t = r − β·log π(y)/π_ref(y)"
        lines.append(f"{ret};  {BASELINE_TABLE[rw['baseline']].formula}  (one A per response, on every token"
                     + ("; token t also gets −β·d_t of its own token only (non-cumulative)" if per_token else "")
                     + ")")
        exact = _EXACT_GROUP_TEXT.get(rw["baseline"])
        if exact:
            lines.append("exact (population) loss: " + exact.format(n=s["n"], m=s["n"] - 1))
    clip = s.get("clip")
    if clip is not None:
        hi = s.get("clip_high") or clip
        pg = f"−min(ρ_t·A_t, clip(ρ_t, 1−{clip}, 1+{hi})·A_t)"
        if s.get("dual_clip"):
            pg += f", at most −{s['dual_clip']}·A_t when A_t < 0 (dual clip)"
    else:
        pg = "−ρ_t·A_t"
    lines.append(f"ℓ_t = {pg},  ρ_t = π(y_t|·)/π_old(y_t|·)   (n = {s['n']} samples per prompt, "
                 f"{s['epochs']} epoch{'s' if s['epochs'] > 1 else ''})")
    if rw["baseline"] == GAE:
        vc = rw.get("value_clip")
        lines.append(f"ℓ_t += {rw['value_coef']}·½·" + (f"max((V − R_t)², (clip(V, V_old ± {vc}) − R_t)²)" if vc
                                                        else "(V − R_t)²") + ",  R_t = A_t + V_old (λ-return)")
    if ref.kind == "kl_in_loss":
        if ref["level"] == "sequence":
            lines.append(f"ℓ_last += β·k(Σ_t d_t),  k = {_KL_TEXT[ref['estimator']]} of the sequence log-ratio")
        else:
            lines.append(f"ℓ_t += β·{_KL_TEXT[ref['estimator']]} of the token's log-ratio")
    lines.append(f"loss = {_AGG_TEXT[s['aggregation']]}   (aggregation {s['aggregation']})")
    return lines


def _sequence_target_lines(algorithm) -> List[str]:
    """The target over whole multi-token responses (the sequence testbed, T > 1), or why there is none."""
    from .errors import TargetError
    from .sequence import derive_sequence
    head = "target (whole responses, T > 1):"
    try:
        seq = derive_sequence(algorithm.components)
    except TargetError as e:
        return [f"{head} none — {e}"]
    lines = [f"{head} {seq.kind}: {seq.formula}"]
    if seq.note:
        lines.append(f"  note: {seq.note}")
    return lines


def describe(algorithm) -> str:
    """Multi-line text for ``udrra show``."""
    c = algorithm.components
    tgt = algorithm.derived_target()
    out = [f"{algorithm.name}: {algorithm.description}" if algorithm.description else algorithm.name, ""]
    out.append("components")
    for comp in c:
        out.append(f"  [{comp.table:9s}] {comp.describe()}")
    out += ["", "data flow: source → log-probs → reward estimate → reference term → loss"]
    out += [f"  {ln}" for ln in loss_lines(algorithm)]
    out += ["", f"target (declared): {c.target.kind}",
            f"target (derived):  {tgt.kind}: {tgt.formula}"]
    if tgt.note:
        out.append(f"  note: {tgt.note}")
    out += _sequence_target_lines(algorithm)
    proofs = proofs_for(algorithm)
    out += [f"proof: {node} — {claim}" for node, claim in proofs] or [f"proof: none ({why_none(algorithm)})"]
    if algorithm.paper:
        out += ["", f"paper: {algorithm.paper}"]
    if algorithm.path is not None:
        out.append(f"file:  {algorithm.path}")
    return "\n".join(out)
