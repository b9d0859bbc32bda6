"""Which symbolic proof (the repository's top-level ``proofs/`` directory, sympy) establishes a composition's target.

:func:`proofs_for` decides from the components and the derived target — never from the algorithm's name — and
returns ``(node id, one-line claim)`` pairs; ``udrra show`` prints them as ``proof:`` lines. The proofs are
not part of the installed package (run them from a checkout: ``python -m pytest proofs``); this module only
names them, so it imports nothing from ``proofs/``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

#: key -> (node id, one-line claim)
PROOFS: Dict[str, Tuple[str, str]] = {
    "kl_optimum": ("proofs/kl_regularised.py::kl_optimum_stationary",
                   "max_π E_π[r] − β·KL(π‖π_ref) is attained at π_ref·exp(r/β)/Z (DPO Eq. 4)"),
    "kl_gibbs": ("proofs/kl_regularised.py::kl_objective_gibbs_identity",
                 "E_π[r] − β·KL(π‖π_ref) = β·log Z − β·KL(π‖π*): π* unique, value β·log Z"),
    "dpo_stationary": ("proofs/dpo.py::dpo_stationary_at_boltzmann",
                       "population DPO loss (Bradley–Terry labels, full-support μ) is stationary at π_ref·exp(r/β)/Z"),
    "dpo_pg": ("proofs/policy_gradient.py::dpo_gradient_is_weighted_policy_gradient",
               "∇ℓ_DPO = −β·σ(r̂_l − r̂_w)·(∇log π(y_w) − ∇log π(y_l)) (DeepSeekMath Eq. 14)"),
    "unregularised": ("proofs/policy_gradient.py::unregularised_gradient_is_mass_times_advantage",
                      "without a KL term ∂E_π[r]/∂θ_y = π_y·(r_y − E_π r): only vertices are stationary, argmax r "
                      "is the one ascent keeps"),
    "baseline": ("proofs/policy_gradient.py::score_function_baseline_invariance",
                 "a response-independent baseline leaves the policy gradient E_π[(R − b)·∇log π] = ∇E_π[R]"),
    "ipo": ("proofs/ipo.py::ipo_stationary_at_psi_target",
            "population IPO loss is stationary at h* = (p(y≻μ) − p(y'≻μ))/τ, π ∝ π_ref·exp(p(y≻μ)/τ) (Azar §5)"),
    "ipo_two_arm": ("proofs/ipo.py::ipo_two_arm_example",
                    "two arms, p(y1≻y2) = 1, uniform π_ref and μ: π*(y1) = σ(0.5/τ) (Azar §5.3.1)"),
    "cdpo": ("proofs/label_noise.py::cdpo_deterministic_margin",
             "cDPO on a deterministic pair: β·h* = log((1 − ε)/ε), finite (Mitchell's note)"),
    "cdpo_freq": ("proofs/label_noise.py::cdpo_margin_with_label_frequency",
                  "cDPO with label frequency p: β·h* = logit(p(1 − ε) + (1 − p)ε) (DPO on smoothed labels)"),
    "rdpo": ("proofs/label_noise.py::rdpo_unbiased",
             "E over label flips (rate ε) of the rDPO loss = the clean DPO loss (Chowdhury et al. 2403.00409)"),
    "rdpo_label": ("proofs/label_noise.py::rdpo_effective_label",
                   "rDPO on observed label frequency q̃ = logistic loss with the de-noised label (q̃ − ε)/(1 − 2ε)"),
    "k1_loss": ("proofs/kl_estimators.py::k1_loss_zero_expected_gradient",
                "k1 = log(π/π_ref) differentiated as a loss has zero expected gradient: no regularisation"),
    "k2_loss": ("proofs/kl_estimators.py::k2_loss_gradient_is_reverse_kl",
                "k2 = ½·log²(π/π_ref) as a loss has expected gradient ∇KL(π‖π_ref)"),
    "k3_loss": ("proofs/kl_estimators.py::k3_loss_gradient_is_forward_kl",
                "k3 as a loss has expected gradient ∇KL(π_ref‖π), the forward KL (Tang & Munos 2506.09477)"),
    "k1_reward": ("proofs/kl_estimators.py::k1_in_reward_gradient_is_reverse_kl",
                  "k1 in the reward: E_π[(r − β·k1)·∇log π] = ∇(E_π[r] − β·KL(π‖π_ref))"),
    "grpo_gc": ("proofs/grpo.py::grpo_gradient_coefficient_is_eq21",
                "GRPO's loss gives the gradient coefficient Â + β·(π_ref/π − 1) (DeepSeekMath Eq. 21)"),
    "grpo": ("proofs/grpo.py::grpo_fixed_point_stationary",
             "GRPO (k3 in loss, group-normalised, on-policy, G → ∞) is stationary at π_ref/(1 − (r − r̄)/(β·σ))"),
    "grpo_objective": ("proofs/grpo.py::grpo_objective_stationary",
                       "that point is stationary for E_π[(r − r̄)/σ] − β·KL(π_ref‖π), the objective GRPO follows"),
    "grpo_norm": ("proofs/grpo.py::grpo_fixed_point_normalisation",
                  "the fixed point sums to 1 iff r̄ = E_π[r] (σ = Std_π[r] is a separate scalar equation)"),
    "grpo_mean_only": ("proofs/grpo.py::grpo_mean_only_stationary",
                       "k3 in the loss without std division: stationary at β·π_ref/(λ − r), λ normalising"),
    "udrra": ("proofs/udrra_equivalence.py::udrra_losses_share_boltzmann_target",
              "UDRRA RA, RDA and PRA (DPO) losses are all minimised at π_ref·exp(r/β)/Z"),
    "ra_unique": ("proofs/udrra_equivalence.py::ra_zero_loss_solution",
                  "zero RA loss (full-support samples) forces π = π_ref·exp(r/β)/Z"),
    "rda_unique": ("proofs/udrra_equivalence.py::rda_zero_loss_solution",
                   "zero RDA loss (full-support samples) forces π = π_ref·exp(r/β)/Z (log Z cancels)"),
    "xu": ("proofs/udrra_equivalence.py::xu_theorem_4_1_counterexample",
           "Xu et al. Thm 4.1 / Table 1: without coverage a DPO minimiser can be no PPO solution"),
    "iterated": ("proofs/iterated_dpo.py::iterated_dpo_induction",
                 "DPO with the reference reset each round: π_k ∝ π_0·exp(k·r/β) (induction on k)"),
    "hinge": ("proofs/margin_losses.py::hinge_zero_loss_set",
              "hinge loss max(0, 1 − β·h) is zero exactly on h ≥ 1/β: any such margin is optimal"),
    "simpo": ("proofs/margin_losses.py::simpo_two_arm_optimum",
              "SimPO, two single-token arms, margin γ: e^{u*} solves (1−p)e^{−γ}z² + (1−2p)z − p·e^{−γ} = 0"),
    # token level: a two-state tree (root → a → {aa, ab}, root → b), per-state softmax logits, token-sum aggregation
    "token_seq_return": ("proofs/token_level.py::kl_in_reward_sequence_return_is_sequence_boltzmann",
                         "two-state tree, per-token k1 in the reward, return r − β·Σ_t k1_t (γ = 1, ω ≡ 1; outcome "
                         "baseline, or return-to-go minus any V(s)): the exact logit gradient vanishes at "
                         "π(y) ∝ π_ref(y)·exp(r(y)/β) over whole responses"),
    "token_kl_return": ("proofs/token_level.py::per_token_kl_return_is_per_state_boltzmann",
                        "two-state tree, token t's return r − β·k1_t only, or k2 per token in the loss (ω ≡ 1): "
                        "stationary at π(a|s) ∝ π_ref(a|s)·exp(Q(s,a)/β), Q = E_π[r|s,a] without the future KL — "
                        "not the sequence Boltzmann"),
    "token_k3": ("proofs/token_level.py::per_token_k3_is_per_state_forward_kl",
                 "two-state tree, k3 per token in the loss, advantage r − b (ω ≡ 1, no std: σ rescales β): "
                 "stationary at π(a|s) = β·π_ref(a|s)/(λ_s − Q(s,a)) per state — not β·π_ref(y)/(λ − r(y))"),
    "sequence_k3": ("proofs/token_level.py::sequence_k3_is_sequence_forward_kl",
                    "two-state tree, k3 of the sequence log-ratio once per response: stationary at "
                    "β·π_ref(y)/(λ − r(y)) over whole responses"),
    "f_prime": ("proofs/f_divergence.py::f_prime_matches_generator",
                "f' of Table 1's f (JS, α) and its inverse; TRL 1.16's α-divergence is the paper's with α' = 1 − α"),
    "f_optimum": ("proofs/f_divergence.py::f_regularised_optimum_stationary",
                  "max_π E_π[r] − β·E_π_ref[f(π/π_ref)] is attained at π_ref·(f')⁻¹((r − λ)/β) (f-DPO Thm 1; JS, α)"),
    "f_dpo": ("proofs/f_divergence.py::f_dpo_stationary",
              "the population f-DPO loss (Bradley–Terry labels, full-support μ) is stationary at that policy"),
    "orpo_cubic": ("proofs/orpo.py::orpo_two_arm_cubic",
                   "ORPO, two single-token arms, label frequency q: the optimum p solves (p − q)(p² + (1 − p)²) + "
                   "2λ((1 − q)p² − q(1 − p)²) = 0 (checked against udrra's numerical target in tests)"),
    "orpo_vertex": ("proofs/orpo.py::orpo_deterministic_label_has_no_interior_optimum",
                    "ORPO with a deterministic label (q = 1): dL/dℓ < 0 on (0, 1), the optimum is the vertex"),
    "nca_per_response": ("proofs/nca.py::nca_population_per_response",
                         "the population pairwise NCA loss = Σ_y [c(y)·softplus(−β·u_y) + ½·m(y)·softplus(β·u_y)] "
                         "(chosen and appearance marginals), the objective udrra's numerical target minimises"),
    "nca_two_arm": ("proofs/nca.py::nca_two_arm_stationary",
                    "NCA, two arms, uniform π_ref, β = 1, label frequency q: dL/dℓ·(1 + 2p)(3 − 2p) = "
                    "(p − q)(4p² − 4p + 3), so the optimum is p = q"),
    "bon_dist": ("proofs/best_of_n.py::best_of_n_distribution",
                 "best of n draws (n = 2, 3, 4, enumerated): P(kept = y) = F(y)^n − F(y−1)^n, F the reward's CDF"),
    "bon_ties": ("proofs/best_of_n.py::best_of_n_ties",
                 "a tie shares (F^n − F₋^n) in proportion to π₀ when the first best draw is kept"),
    "bon_mle": ("proofs/best_of_n.py::mle_target_is_best_of_n",
                "maximum likelihood on samples from p is stationary (strictly convex) at π = p"),
    "bon_iter": ("proofs/best_of_n.py::iterated_best_of_n_raises_top",
                 "p_n(top) − π(top) = π(1 − π)·Σ_{k<n−1}(1 − π)^k > 0: iterated rounds move mass to argmax r"),
    "group_mean_finite_n": ("proofs/token_level.py::dr_grpo_finite_group_advantage",
                            "group of n (K = 2; n = 2, 3): the group-mean advantage averaged over the other n − 1 "
                            "draws is (n − 1)/n·(R(y) − E_π R), so at finite n β acts as β' = β·n/(n − 1)"),
}


def _keys(algorithm) -> Tuple[List[str], Optional[str]]:
    t, s, rw, ref = algorithm.components
    derived = algorithm.derived_target()
    update = ref.get("update", "frozen")
    if update == "ema":
        return [], "the EMA reference follows the policy; the argmax limit is not proven symbolically"
    keys: List[str] = []
    if rw.kind == "preference":
        link = rw["link"]
        if link == "hinge":
            if derived.kind == "hinge_lp":
                return [], ("stochastic labels: the target is the optimal face of a linear program, checked "
                            "numerically (scipy linprog); the symbolic hinge proof covers deterministic labels only")
            keys = ["hinge"]
        elif link == "squared":
            keys = ["ipo", "ipo_two_arm"]
        elif link == "forward_kl":
            return [], "f-DPO's forward-KL link β·π_ref/(λ − r̂) has no symbolic proof here"
        elif ref.kind == "chosen_nll":
            if link != "odds_ratio":
                return [], "the chosen NLL with the logsigmoid link is solved numerically; no symbolic proof here"
            keys = ["orpo_cubic", "orpo_vertex"]
        elif link == "odds_ratio":
            return [], "the odds-ratio link without the NLL term: σ(r̂/β + c) has no symbolic proof here"
        elif link in ("js_divergence", "alpha_divergence"):
            keys = ["f_prime", "f_optimum", "f_dpo"]
        elif ref.kind == "none":
            keys = ["simpo"]
        elif link == "smoothed_logsigmoid":
            keys = ["cdpo", "cdpo_freq", "dpo_stationary"]
        elif link == "robust":
            keys = ["rdpo", "rdpo_label", "dpo_stationary"]
        else:
            keys = ["dpo_stationary", "dpo_pg"] + (["xu"] if s.kind == "offline_pairs" else [])
        if derived.kind == "iterated" or update == "reset_every":
            keys = ["iterated"] + keys
        return keys, None
    if rw.kind == "noise_contrastive":
        return ["nca_per_response", "nca_two_arm"], None
    if rw.kind == "max_likelihood":
        return ["bon_dist", "bon_ties", "bon_mle"] + (["bon_iter"] if update == "reset_every" else []), None
    if rw.kind == "reward_regression":
        return ["udrra", "ra_unique", "kl_optimum"], None
    if rw.kind == "reward_difference":
        return ["udrra", "rda_unique", "kl_optimum"], None
    # explicit reward: the reference term decides the regulariser
    baseline = rw.get("baseline") or "none"
    normalised = baseline in ("group_norm", "batch_norm")
    extra = ["baseline"] if baseline != "none" else []
    if baseline == "group_mean":
        extra.append("group_mean_finite_n")
    if ref.kind == "kl_in_reward":
        keys = ["kl_optimum", "kl_gibbs", "k1_reward"] + extra
        if ref.get("kl_return") == "token":
            keys.append("token_kl_return")
        elif s.kind == "on_policy" and (baseline != "gae" or float(rw.get("gamma") or 1.0) == 1.0):
            keys.append("token_seq_return")
        return keys, None
    if ref.kind == "kl_in_loss" and float(t["beta"]) > 0:
        est = ref.get("estimator")
        per_token = ref.get("level", "token") != "sequence"
        if est == "k1":
            return ["k1_loss"], None
        if est == "k2":
            return ["k2_loss", "kl_optimum"] + extra + (["token_kl_return"] if per_token else []), None
        level = ["token_k3" if per_token else "sequence_k3"]
        if normalised:
            return ["k3_loss", "grpo", "grpo_objective", "grpo_norm"] + level, None
        return ["k3_loss", "grpo_mean_only"] + extra + level, None
    return ["unregularised"] + extra, None


def proofs_for(algorithm) -> List[Tuple[str, str]]:
    """The symbolic proofs of ``algorithm``'s derived target.

    Args:
        algorithm: a :class:`udrra.Algorithm`.
    Returns:
        ``[(node id, claim)]``, node ids like ``proofs/grpo.py::grpo_fixed_point_stationary`` (a function in the
        repository's ``proofs/`` directory); empty when no proof covers the composition (see :func:`why_none`).
    """
    return [PROOFS[k] for k in _keys(algorithm)[0]]


def why_none(algorithm) -> Optional[str]:
    """Why :func:`proofs_for` is empty for ``algorithm`` (``None`` when it is not)."""
    keys, reason = _keys(algorithm)
    return None if keys else (reason or "no symbolic proof covers this composition")
