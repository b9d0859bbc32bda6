"""Human-readable descriptions of a composition: its components, the loss written out, and its target."""

from __future__ import annotations

from typing import List

from .components.reward import LINK_TABLE
from .proof_index import proofs_for, why_none

_BASELINE_TEXT = {
    "none": "A = R",
    "greedy": "A = R − r(x, ȳ_greedy)  (ReMax: reward of the greedy decode)",
    "leave_one_out": "A_i = R_i − mean_{j≠i} R_j  over the n samples of the prompt  (RLOO)",
    "group_norm": "A_i = (R_i − mean_group R) / std_group R  (GRPO)",
    "batch_norm": "A = (R − mean_batch R) / std_batch R  (advantage normalisation)",
}
_KL_TEXT = {"k1": "log(π/π_ref)", "k2": "½·log²(π/π_ref)", "k3": "π_ref/π − 1 − log(π_ref/π)"}


def loss_lines(algorithm) -> List[str]:
    """The derived loss, one line per stage of the data flow."""
    t, s, rw, ref = algorithm.components
    lines: List[str] = []
    norm = "/|y|" if ref.get("length_normalize") else ""
    if ref.kind == "none":
        lines.append(f"u(y) = log π(y){norm}   (no reference model)")
    else:
        lines.append(f"u(y) = (log π(y) − log π_ref(y)){norm}")
    if rw.kind == "preference":
        link = LINK_TABLE[rw["link"]]
        g = "−exp(−u)" if rw["link"] == "forward_kl" else "u"
        gamma = ref.get("gamma") or 0.0
        lines.append(f"x = β·(g(u_w) − g(u_l))" + (f" − γ, γ = {gamma}" if gamma else "") + f",  g(u) = {g}")
        eps = f", ε = {rw['epsilon']}" if rw.get("epsilon") is not None else ""
        lines.append(f"loss = E_(x, y_w, y_l)[ {link.formula} ]   (link {link.name}{eps}, β = {algorithm.beta})")
    elif rw.kind == "reward_difference":
        lines.append(f"loss = E_(y, y' ∼ d)[ (β·(u(y) − u(y')) − (r(y) − r(y')))² ]   (β = {algorithm.beta})")
    elif rw.kind == "reward_regression":
        lines.append(f"loss = E_(y ∼ d)[ (β·u(y) + β·log Z(x) − r(y))² ]   (β = {algorithm.beta}; needs log Z)")
    else:
        if ref.kind == "kl_in_reward":
            lines.append(f"R = r(x, y) − β·{_KL_TEXT[ref['estimator']]}   (no gradient through the shaping, β = "
                         f"{algorithm.beta})")
        else:
            lines.append("R = r(x, y)")
        lines.append(_BASELINE_TEXT[rw["baseline"]])
        clip = s.get("clip")
        ratio = "ρ = π(y)/π_old(y)"
        if clip is not None:
            pg = f"−min(ρ·A, clip(ρ, 1−{clip}, 1+{clip})·A)"
        else:
            pg = "−ρ·A"
        kl = f" + β·({_KL_TEXT[ref['estimator']]})" if ref.kind == "kl_in_loss" else ""
        lines.append(f"loss = E_(y ∼ π_old)[ {pg}{kl} ],  {ratio}   (n = {s['n']} samples per prompt)")
    upd = ref.get("update", "frozen")
    if upd == "ema":
        lines.append(f"π_ref ← {ref['decay']}·π_ref + (1 − {ref['decay']})·π_θ after every step (parameters)")
    elif upd == "reset_every":
        lines.append(f"π_ref ← π_θ every {ref['every']} steps on an LM; {ref['rounds']} converged rounds on the bandit")
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
    proofs = proofs_for(algorithm)
    out += [f"proof: {node} — {claim}" for node, claim in proofs] or [f"proof: none ({why_none(algorithm)})"]
    if algorithm.paper:
        out += ["", f"paper: {algorithm.paper}"]
    if algorithm.path is not None:
        out.append(f"file:  {algorithm.path}")
    return "\n".join(out)
