"""Every proof accepts its true claim (residuals identically 0) and rejects perturbed claims (a residual that
evaluates to a non-zero number at a concrete point, so it is not identically 0)."""

import sympy as sp

from proofs import dpo, grpo, ipo, iterated_dpo, kl_estimators, kl_regularised, label_noise, margin_losses
from proofs import policy_gradient, token_level, udrra_equivalence
from proofs import best_of_n, f_divergence, nca, orpo
from proofs._common import K, all_zero, boltzmann, nonzero_somewhere, sigmoid


def half_temperature(pi_ref, r, beta):
    """π_ref·exp(r/(2β))/Z — the Boltzmann policy at the wrong temperature."""
    return boltzmann(pi_ref, r, 2 * beta)


def wrong_sign(pi_ref, r, beta):
    """π_ref·exp(−r/β)/Z."""
    return boltzmann(pi_ref, [-x for x in r], beta)


def reference_only(pi_ref, r, beta):
    """π_ref itself (no reward tilt), normalised."""
    z = sp.Add(*pi_ref)
    return [p / z for p in pi_ref]


# ------------------------------------------------------------------------------------------ 1 KL optimum
def test_1_kl_regularised_optimum():
    assert all_zero(kl_regularised.kl_optimum_stationary())
    assert all_zero(kl_regularised.kl_optimal_value())
    assert all_zero(kl_regularised.kl_objective_gibbs_identity())
    assert kl_regularised.kl_objective_strictly_concave() is True


def test_1_kl_regularised_optimum_rejects_wrong_claims():
    for wrong in (half_temperature, wrong_sign, reference_only):
        assert nonzero_somewhere(kl_regularised.kl_optimum_stationary(wrong))
        assert nonzero_somewhere(kl_regularised.kl_objective_gibbs_identity(wrong))
    assert nonzero_somewhere(kl_regularised.kl_optimal_value(lambda Z, beta: sp.log(Z)))
    assert nonzero_somewhere(kl_regularised.kl_optimal_value(lambda Z, beta: beta * Z))
    # with the KL sign flipped (E[r] + β·KL) the objective is convex, not concave
    assert kl_regularised.kl_objective_strictly_concave(lambda b: b) is False


# ------------------------------------------------------------------------------------------------ 2 DPO
def test_2_dpo_stationary_at_boltzmann():
    assert all_zero(dpo.dpo_stationary_at_boltzmann())
    assert all_zero(dpo.dpo_pair_margin())


def test_2_dpo_rejects_wrong_claims():
    for wrong in (half_temperature, wrong_sign, reference_only):
        assert nonzero_somewhere(dpo.dpo_stationary_at_boltzmann(wrong))
    assert nonzero_somewhere(dpo.dpo_pair_margin(lambda dr, beta: dr / (2 * beta)))
    assert nonzero_somewhere(dpo.dpo_pair_margin(lambda dr, beta: dr))          # β·h* = β·Δr: β forgotten


# ------------------------------------------------------------------------------------------------ 3 IPO
def test_3_ipo_stationary_at_psi_target():
    assert all_zero(ipo.ipo_stationary_at_psi_target())
    assert all_zero(ipo.ipo_hessian_sum_of_squares())
    assert all_zero(ipo.ipo_two_arm_example())


def test_3_ipo_rejects_wrong_claims():
    def half_tau(pi_ref, P, mu, tau):
        return ipo.ipo_target(pi_ref, P, mu, 2 * tau)

    def without_self_comparison(pi_ref, P, mu, tau):
        # p(y≻μ) without the y' = y term (p(y≻y) = ½): shifts each arm by μ(y)/2, not a constant
        pm = [sp.Add(*[mu[j] * P[i][j] for j in range(K) if j != i]) for i in range(K)]
        w = [pi_ref[i] * sp.exp(pm[i] / tau) for i in range(K)]
        return [x / sp.Add(*w) for x in w]

    def dpo_answer(pi_ref, P, mu, tau):
        # Boltzmann in the Bradley–Terry reward log p/(1 − p) relative to arm 1 — DPO's target, not IPO's
        v = [sp.Integer(0)] + [sp.log(P[i][0] / (1 - P[i][0])) for i in range(1, K)]
        w = [pi_ref[i] * sp.exp(v[i] / tau) for i in range(K)]
        return [x / sp.Add(*w) for x in w]

    for wrong in (half_tau, without_self_comparison, dpo_answer):
        assert nonzero_somewhere(ipo.ipo_stationary_at_psi_target(wrong))
    assert nonzero_somewhere(ipo.ipo_hessian_sum_of_squares(lambda a, b: 2 * a * b))
    assert nonzero_somewhere(ipo.ipo_two_arm_example(lambda tau: sigmoid(1 / tau)))
    assert nonzero_somewhere(ipo.ipo_two_arm_example(lambda tau: sp.Integer(1)))   # DPO's answer


# ------------------------------------------------------------------------------------- 4 cDPO and rDPO
def test_4_cdpo_margin_and_rdpo_unbiased():
    assert all_zero(label_noise.cdpo_deterministic_margin())
    assert all_zero(label_noise.cdpo_margin_with_label_frequency())
    assert all_zero(label_noise.rdpo_unbiased())
    assert all_zero(label_noise.rdpo_effective_label())


def test_4_label_noise_rejects_wrong_claims():
    assert nonzero_somewhere(label_noise.cdpo_deterministic_margin(lambda e: sp.log(e / (1 - e))))
    assert nonzero_somewhere(label_noise.cdpo_deterministic_margin(lambda e: sp.log(1 / e)))
    assert nonzero_somewhere(label_noise.cdpo_margin_with_label_frequency(lambda p, e: sp.log(p / (1 - p))))
    # cDPO's smoothed loss is not unbiased; nor is rDPO without its 1/(1 − 2ε) normalisation
    assert nonzero_somewhere(label_noise.rdpo_unbiased(lambda x, e, l: label_noise.cdpo_loss(x, e, l)))
    assert nonzero_somewhere(label_noise.rdpo_unbiased(lambda x, e, l: (1 - e) * l(x) - e * l(-x)))
    assert nonzero_somewhere(label_noise.rdpo_effective_label(lambda qt, e: qt * (1 - e) + (1 - qt) * e))


# ------------------------------------------------------------------------------- 5 DPO policy gradient
def test_5_dpo_gradient_is_weighted_policy_gradient():
    assert all_zero(policy_gradient.dpo_gradient_is_weighted_policy_gradient())
    assert all_zero(policy_gradient.score_function_baseline_invariance())


def test_5_policy_gradient_rejects_wrong_claims():
    pg = policy_gradient.dpo_gradient_is_weighted_policy_gradient
    assert nonzero_somewhere(pg(lambda w, l: sigmoid(w - l)))                      # σ(r̂_w − r̂_l): wrong sign
    assert nonzero_somewhere(pg(lambda w, l: sp.Integer(1)))                       # unweighted
    # a baseline that depends on the sampled response biases the gradient
    assert nonzero_somewhere(policy_gradient.score_function_baseline_invariance(lambda R, y: R[y] / 2))
    assert all_zero(policy_gradient.unregularised_gradient_is_mass_times_advantage())
    assert nonzero_somewhere(policy_gradient.unregularised_gradient_is_mass_times_advantage(
        lambda pi, r, y: r[y] - sum(p * q for p, q in zip(pi, r))))              # forgets the π_y factor


# ------------------------------------------------------------------------------------- 6 KL estimators
def test_6_kl_estimators():
    assert all_zero(kl_estimators.k1_loss_zero_expected_gradient())
    assert all_zero(kl_estimators.k3_loss_gradient_is_forward_kl())
    assert all_zero(kl_estimators.k1_in_reward_gradient_is_reverse_kl())
    assert all_zero(kl_estimators.k2_loss_gradient_is_reverse_kl())


def test_6_kl_estimators_reject_wrong_claims():
    ke = kl_estimators
    assert nonzero_somewhere(ke.k1_loss_zero_expected_gradient(ke.k3))              # k3 does regularise
    assert nonzero_somewhere(ke.k3_loss_gradient_is_forward_kl(ke.k1))              # k1 where k3 is claimed
    assert nonzero_somewhere(ke.k3_loss_gradient_is_forward_kl(divergence=ke.kl_pi_ref))  # k3 ≠ ∇KL(π‖π_ref)
    assert nonzero_somewhere(ke.k2_loss_gradient_is_reverse_kl(divergence=ke.kl_ref_pi))
    assert nonzero_somewhere(ke.k1_in_reward_gradient_is_reverse_kl(ke.kl_ref_pi))
    assert nonzero_somewhere(ke.k1_in_reward_gradient_is_reverse_kl(estimator=ke.k3))


# -------------------------------------------------------------------------------------------- 7 GRPO
def test_7_grpo_fixed_point():
    assert all_zero(grpo.grpo_gradient_coefficient_is_eq21())
    assert all_zero(grpo.grpo_fixed_point_stationary())
    assert all_zero(grpo.grpo_objective_stationary())
    assert all_zero(grpo.grpo_fixed_point_normalisation())
    assert all_zero(grpo.grpo_mean_only_stationary())


def test_7_grpo_rejects_wrong_claims():
    def double_beta(pi_ref, r, beta, rbar, sigma):
        return grpo.grpo_fixed_point(pi_ref, r, 2 * beta, rbar, sigma)

    def plus_sign(pi_ref, r, beta, rbar, sigma):
        return [p / (1 + (ri - rbar) / (beta * sigma)) for p, ri in zip(pi_ref, r)]

    # the reverse-KL (k2-like) coefficient Â − β·log(π/π_ref) is not what k3 in the loss gives
    assert nonzero_somewhere(grpo.grpo_gradient_coefficient_is_eq21(
        lambda adv, pi, ref, beta: adv - beta * sp.log(pi / ref)))
    for wrong in (grpo.boltzmann_in_advantage, double_beta, plus_sign):
        assert nonzero_somewhere(grpo.grpo_fixed_point_stationary(wrong))
        assert nonzero_somewhere(grpo.grpo_objective_stationary(wrong))
    assert nonzero_somewhere(grpo.grpo_fixed_point_normalisation(double_beta))
    assert nonzero_somewhere(grpo.grpo_mean_only_stationary(lambda pi_ref, r, beta, lam: boltzmann(pi_ref, r, beta)))
    assert nonzero_somewhere(grpo.grpo_mean_only_stationary(
        lambda pi_ref, r, beta, lam: [beta * p / (lam + ri) for p, ri in zip(pi_ref, r)]))


# ---------------------------------------------------------------------------------- 8 UDRRA and Xu 4.1
def test_8_udrra_scenarios_share_boltzmann_target():
    assert all_zero(udrra_equivalence.udrra_losses_share_boltzmann_target())
    assert all_zero(udrra_equivalence.ra_zero_loss_solution())
    assert all_zero(udrra_equivalence.rda_zero_loss_solution())
    assert all_zero(udrra_equivalence.dpo_loss_of_boltzmann_is_reward_model_loss())


def test_8_udrra_rejects_wrong_claims():
    ue = udrra_equivalence
    for wrong in (half_temperature, wrong_sign, reference_only):
        assert nonzero_somewhere(ue.udrra_losses_share_boltzmann_target(wrong))
        assert nonzero_somewhere(ue.ra_zero_loss_solution(wrong))
        assert nonzero_somewhere(ue.rda_zero_loss_solution(wrong))
        assert nonzero_somewhere(ue.dpo_loss_of_boltzmann_is_reward_model_loss(wrong))


def test_8_xu_theorem_4_1_counterexample():
    assert all_zero(udrra_equivalence.xu_dpo_loss_closed_form())
    dpo_gap, ppo_gap = udrra_equivalence.xu_theorem_4_1_counterexample()
    assert dpo_gap == 0                       # (0.1, 0, 0.9) attains inf L_DPO = 0
    assert nonzero_somewhere(ppo_gap)         # ... but π(y3) = 0.9 while every PPO solution has π(y3) = 0


def test_8_xu_counterexample_rejects_wrong_claims():
    ue = udrra_equivalence
    assert nonzero_somewhere(ue.xu_dpo_loss_closed_form(lambda a, b, beta: sp.log(1 + (a / b) ** beta)))
    assert nonzero_somewhere(ue.xu_dpo_loss_closed_form(lambda a, b, beta: sp.log(1 + (b - a) ** beta)))
    # (0.1, 0.9, 0) is not a DPO solution; (1, 0, 0) is a (limit) PPO solution, so neither is a counter-example
    dpo_gap, _ = ue.xu_theorem_4_1_counterexample((sp.Rational(1, 10), sp.Rational(9, 10), 0))
    assert nonzero_somewhere(dpo_gap)
    _, ppo_gap = ue.xu_theorem_4_1_counterexample((1, 0, 0))
    assert ppo_gap == 0
    # with π_ref(y3) > 0 a PPO solution can put mass on y3: the residual is then no longer the constant 0.9
    _, ppo_gap = ue.xu_theorem_4_1_counterexample(pi_ref=(sp.Rational(1, 3),) * 3)
    assert ppo_gap.free_symbols


# ------------------------------------------------------------------------------------ 9 iterated DPO
def test_9_iterated_dpo_induction():
    assert all_zero(iterated_dpo.iterated_dpo_induction())


def test_9_iterated_dpo_rejects_wrong_claims():
    def half(pi0, r, beta, k):
        return iterated_dpo.iterated_boltzmann(pi0, r, 2 * beta, k)      # right base case, wrong step

    def no_k(pi0, r, beta, k):
        return iterated_dpo.iterated_boltzmann(pi0, r, beta, 1)          # the reference never moves

    def doubling(pi0, r, beta, k):
        return iterated_dpo.iterated_boltzmann(pi0, r, beta, 2 ** k - 1)  # right at k = 0 and 1, wrong step

    for wrong in (half, no_k, doubling):
        assert nonzero_somewhere(iterated_dpo.iterated_dpo_induction(wrong))


# -------------------------------------------------------------------------------- 10–11 hinge, SimPO
def test_10_hinge_zero_loss_set():
    assert margin_losses.hinge_zero_loss_set() is True
    assert margin_losses.hinge_zero_loss_set(lambda b: sp.Interval(1 / (2 * b), sp.oo)) is False
    assert margin_losses.hinge_zero_loss_set(lambda b: sp.Interval.open(1 / b, sp.oo)) is False


def test_11_simpo_two_arm_quadratic():
    assert all_zero(margin_losses.simpo_two_arm_optimum())
    assert nonzero_somewhere(margin_losses.simpo_two_arm_optimum(
        lambda z, p, g: (1 - p) / g * z ** 2 - (1 - 2 * p) * z - p / g))
    assert nonzero_somewhere(margin_losses.simpo_two_arm_optimum(
        lambda z, p, g: (1 - p) * g * z ** 2 + (1 - 2 * p) * z - p * g))


# ----------------------------------------------------------------- 12 token-level losses on a two-state tree
def test_12_logit_gradient_is_autograd():
    for loss in token_level.LOSSES:                  # the chain-rule gradient every proof 12 uses is sympy's own
        assert all_zero(token_level.logit_gradient_is_autograd(loss)), loss


def test_12_token_level_targets():
    tl = token_level
    assert all_zero(tl.kl_in_reward_sequence_return_is_sequence_boltzmann())
    assert all_zero(tl.kl_in_reward_sequence_return_is_sequence_boltzmann(reward_to_go=True))
    assert all_zero(tl.kl_in_reward_sequence_return_is_sequence_boltzmann(reward_to_go=True, critic=True))
    assert all_zero(tl.per_token_kl_return_is_per_state_boltzmann())
    assert all_zero(tl.per_token_k3_is_per_state_forward_kl())
    assert all_zero(tl.sequence_k3_is_sequence_forward_kl())
    for n in (2, 3):
        assert all_zero(tl.dr_grpo_finite_group_advantage(n))


def _with(t, beta=None, lam=None):
    return token_level.Tree(t.ref, t.r, t.beta if beta is None else beta, t.lam if lam is None else lam)


def test_12_token_level_rejects_wrong_claims():
    tl = token_level

    def half(target):                                # the right form at temperature 2β
        return lambda t: target(_with(t, beta=2 * t.beta))

    # (1) the sequence return's target is the sequence Boltzmann, not the per-state one (no future KL in Q)
    for wrong in (tl.per_state_boltzmann, half(tl.sequence_boltzmann)):
        assert nonzero_somewhere(tl.kl_in_reward_sequence_return_is_sequence_boltzmann(wrong))
        assert nonzero_somewhere(tl.kl_in_reward_sequence_return_is_sequence_boltzmann(wrong, reward_to_go=True))
        assert nonzero_somewhere(tl.kl_in_reward_sequence_return_is_sequence_boltzmann(wrong, True, critic=True))
    # (2) the per-token KL return / k2 per token: per-state Boltzmann, not the sequence Boltzmann
    for wrong in (tl.sequence_boltzmann, half(tl.per_state_boltzmann)):
        res = tl.per_token_kl_return_is_per_state_boltzmann(wrong)
        assert nonzero_somewhere(res[:4]) and nonzero_somewhere(res[4:])      # both losses reject it
    # (3) k3 per token: per state, not the sequence-level forward-KL optimum (λ free) ...
    for wrong in (tl.sequence_forward_kl, half(tl.per_state_forward_kl), tl.per_state_boltzmann):
        assert nonzero_somewhere(tl.per_token_k3_is_per_state_forward_kl(wrong))
    # ... for any λ: state a is stationary only at λ = λ_a (among λ > max r; the sequence conditional there is
    # then the per-state target), and with that λ the root is not
    res = tl.per_token_k3_is_per_state_forward_kl(
        lambda t: tl.sequence_forward_kl(_with(t, lam={"root": t.lam["a"], "a": t.lam["a"]})))
    assert res[1] == 0 and res[3] == 0 and nonzero_somewhere(res[0])
    # k3 of the sequence log-ratio: the sequence-level optimum, not the per-state one
    def plus_sign(t):
        """β·π_ref(y)/(λ + r(y)). (β → 2β is no perturbation here: as per-state policies it equals β's.)"""
        return tl.conditionals({y: t.beta * tl.response_prob(t.ref, y) / (t.lam["root"] + t.r[y])
                                for y in tl.RESPONSES})

    for wrong in (tl.per_state_forward_kl, tl.sequence_boltzmann, plus_sign):
        assert nonzero_somewhere(tl.sequence_k3_is_sequence_forward_kl(wrong))
    # (4) the group mean holds the sample's own reward: not the n → ∞ advantage R − E_π R
    for n in (2, 3):
        assert nonzero_somewhere(tl.dr_grpo_finite_group_advantage(n, lambda R, m, n: R - m))
        assert nonzero_somewhere(tl.dr_grpo_finite_group_advantage(n, lambda R, m, n: (n - 1) * (R - m) / (n + 1)))


# --------------------------------------------------------------------------------------- 13 f-DPO (Wang et al.)
def _boltzmann_f(pi_ref, r, beta, lam, alpha):
    """DPO's target π_ref·exp(r/β)/Z (reverse KL) — ignores λ, so it is rejected for every λ."""
    return boltzmann(pi_ref, r, beta)


def _forward_kl_f(pi_ref, r, beta, lam, alpha):
    """β·π_ref/(λ − r): the forward-KL optimum (proof 7d), not the JS one."""
    return [beta * p / (lam - ri) for p, ri in zip(pi_ref, r)]


def _alpha_scaled(c):
    def claim(pi_ref, r, beta, lam, alpha):
        return f_divergence.f_optimum("alpha")(pi_ref, r, beta, lam, c * alpha)
    return claim


def _real_nonzero_at(residuals, values):
    """Some residual is a real non-zero number at the point ``values`` (symbol name → number; other symbols 1/5)."""
    for e in residuals:
        v = complex(sp.N(e.subs({s: values.get(s.name, sp.Rational(1, 5)) for s in e.free_symbols}), 30))
        if abs(v.imag) < 1e-20 and abs(v.real) > 1e-12:
            return True
    return False


def test_13_f_dpo_targets():
    for d in f_divergence.DIVERGENCES:
        assert all_zero(f_divergence.f_prime_matches_generator(d)), d
        assert all_zero(f_divergence.f_regularised_optimum_stationary(d)), d
        assert all_zero(f_divergence.f_dpo_stationary(d)), d


def test_13_f_divergence_rejects_wrong_generators():
    fd = f_divergence
    assert nonzero_somewhere(fd.f_prime_matches_generator("js", lambda u, a: sp.log(u / (1 + u))))
    # TRL's f' with its coefficient read as the paper's α (α' = α instead of 1 − α)
    assert nonzero_somewhere(fd.f_prime_matches_generator("alpha", lambda u, a: fd.trl_alpha_f_prime(u, a)))


def _rejected_for_every_lambda(residuals):
    """The Lagrange residuals g(y) − g(1) (λ eliminated) are non-zero, and their values do not move with λ — so
    no normaliser λ makes the claim stationary (checked at two values of λ, the other symbols at 1/5)."""
    diffs = residuals[:-1]
    at = [[complex(sp.N(e.subs({s: (lam if s.name == "lambda" else sp.Rational(1, 5)) for s in e.free_symbols}), 30))
           for e in diffs] for lam in (sp.Rational(1, 7), sp.Rational(5, 3))]
    return nonzero_somewhere(diffs) and all(abs(a - b) < 1e-20 for a, b in zip(*at))


def test_13_f_dpo_rejects_wrong_claims_js():
    fd = f_divergence
    res = fd.f_regularised_optimum_stationary("js", _boltzmann_f)
    assert _rejected_for_every_lambda(res)
    assert nonzero_somewhere(fd.f_regularised_optimum_stationary("js", _forward_kl_f))
    for wrong in (_boltzmann_f, _forward_kl_f):
        assert nonzero_somewhere(fd.f_dpo_stationary("js", wrong))


def test_13_f_dpo_rejects_wrong_claims_alpha():
    fd = f_divergence
    assert _rejected_for_every_lambda(fd.f_regularised_optimum_stationary("alpha", _boltzmann_f))
    assert nonzero_somewhere(fd.f_regularised_optimum_stationary("alpha", _alpha_scaled(sp.Rational(1, 2))))
    for wrong in (_boltzmann_f, _alpha_scaled(sp.Rational(1, 2))):
        assert nonzero_somewhere(fd.f_dpo_stationary("alpha", wrong))
    # α → 2α: (1 − 2αz)^{−1/(2α)} is complex at the witness points (z ≥ 1/(2α) there), so also check a point
    # inside its own domain (w > ½ ⇔ z < 1/(2α)) where the residual is real and non-zero
    point = {"alpha": sp.Rational(1, 3), "w1": sp.Rational(3, 5), "w2": sp.Rational(7, 10), "w3": sp.Rational(4, 5),
             "beta": sp.Rational(1, 2), "lambda": sp.Rational(1, 7)}
    for proof in (fd.f_regularised_optimum_stationary, fd.f_dpo_stationary):
        res = proof("alpha", _alpha_scaled(2))
        assert nonzero_somewhere(res) and _real_nonzero_at(res, point)


# ------------------------------------------------------------------------------------ 14 RAFT / best-of-n
def test_14_best_of_n():
    for n in (2, 3, 4):
        assert all_zero(best_of_n.best_of_n_distribution(n))
    for n in (2, 3):
        assert all_zero(best_of_n.best_of_n_ties(n))
    assert all_zero(best_of_n.mle_target_is_best_of_n())
    for n in (2, 3, 4, 5):
        assert all_zero(best_of_n.iterated_best_of_n_raises_top(n))


def test_14_best_of_n_rejects_wrong_claims():
    bn = best_of_n

    def power_normalised(pi0, n):
        return [p ** n / sp.Add(*[x ** n for x in pi0]) for p in pi0]

    def cdf_power(pi0, n):
        return [sp.Add(*pi0[: y + 1]) ** n for y in range(len(pi0))]

    def one_fewer(pi0, n):
        return bn.best_of_n(pi0, n - 1)

    for n in (2, 3, 4):
        for wrong in (power_normalised, cdf_power, one_fewer):
            assert nonzero_somewhere(bn.best_of_n_distribution(n, wrong))
    for n in (2, 3):
        # ties split evenly, or broken by response index instead of draw order
        assert nonzero_somewhere(bn.best_of_n_ties(n, lambda p, n, lv: [p[0] ** n, (1 - p[0] ** n) / 2,
                                                                          (1 - p[0] ** n) / 2]))
        assert nonzero_somewhere(bn.best_of_n_ties(n, lambda p, n, lv: bn.best_of_n(p, n)))
    assert nonzero_somewhere(bn.mle_target_is_best_of_n(lambda p: [sp.Rational(1, 3)] * K))
    assert nonzero_somewhere(bn.mle_target_is_best_of_n(lambda p: [x ** 2 / sp.Add(*[y ** 2 for y in p]) for x in p]))
    for n in (3, 4):
        assert nonzero_somewhere(bn.iterated_best_of_n_raises_top(n, lambda pi, n: bn.top_gain_factor(pi, n - 1)))
    assert nonzero_somewhere(bn.iterated_best_of_n_raises_top(3, lambda pi, n: 1 - 2 * pi))   # Q = 2 − π, not 1 − 2π
    assert bn.iterated_best_of_n_raises_top(3, lambda pi, n: 1 - 2 * pi)[1] == 1             # ... and not > 0


# ------------------------------------------------------------------------------------------------ 15 ORPO
def test_15_orpo_two_arm():
    assert all_zero(orpo.orpo_two_arm_cubic())
    assert all_zero(orpo.orpo_deterministic_label_has_no_interior_optimum())
    # q = 3/4, λ = 1: the root lies strictly between the odds-ratio optimum σ(logit(q)/2) and q
    p = sp.Symbol("p")
    roots = [x for x in sp.Poly(orpo.orpo_cubic(p, sp.Rational(3, 4), 1), p).real_roots() if 0 < x < 1]
    assert len(roots) == 1 and sp.sqrt(3) / (1 + sp.sqrt(3)) < roots[0] < sp.Rational(3, 4)


def test_15_orpo_rejects_wrong_claims():
    def dpo_answer(p, q, lam):
        return p - q

    def half_lambda(p, q, lam):
        return orpo.orpo_cubic(p, q, lam / 2)

    def flipped_sign(p, q, lam):
        return orpo.orpo_cubic(p, q, -lam)

    for wrong in (dpo_answer, half_lambda, flipped_sign):
        assert nonzero_somewhere(orpo.orpo_two_arm_cubic(wrong))
    det = orpo.orpo_deterministic_label_has_no_interior_optimum
    assert nonzero_somewhere(det(lambda p, lam: -(1 - p) - lam * (1 - p) ** 2 / (p ** 2 + (1 - p) ** 2)))
    res = det(lambda p, lam: (1 - 2 * p) - 2 * lam * (1 - p) ** 2 / (p ** 2 + (1 - p) ** 2))
    assert nonzero_somewhere(res) and res[1] == 1                      # wrong, and not negative on (0, 1)


# ------------------------------------------------------------------------------------------------- 16 NCA
def test_16_nca():
    assert all_zero(nca.nca_population_per_response())
    assert all_zero(nca.nca_two_arm_stationary())
    assert all_zero(nca.nca_two_arm_optimum())


def test_16_nca_rejects_wrong_claims():
    def no_half(u, beta, mu, q):
        return sp.Add(*[nca.chosen_marginal(mu, q, y) * nca.softplus(-beta * u[y])
                        + nca.appearance_marginal(mu, y) * nca.softplus(beta * u[y]) for y in range(K)])

    def first_slot_only(u, beta, mu, q):
        c = [sp.Add(*[mu[(y, j)] * q[(y, j)] for j in range(K) if j != y]) for y in range(K)]
        return sp.Add(*[c[y] * nca.softplus(-beta * u[y])
                        + nca.appearance_marginal(mu, y) * nca.softplus(beta * u[y]) / 2 for y in range(K)])

    for wrong in (no_half, first_slot_only):
        assert nonzero_somewhere(nca.nca_population_per_response(wrong))
    assert nonzero_somewhere(nca.nca_two_arm_stationary(lambda p, q: p - q))            # right root, wrong polynomial
    assert nonzero_somewhere(nca.nca_two_arm_stationary(lambda p, q: (p - q) * (4 * p ** 2 + 4 * p + 3)))
    assert nonzero_somewhere(nca.nca_two_arm_optimum(lambda q, beta: q ** 2))
    # at β = 2 the optimum is neither q nor DPO's σ(logit(q)/β)
    dpo = lambda q, beta: sigmoid(sp.log(q / (1 - q)) / beta)                         # noqa: E731
    assert all_zero(nca.nca_two_arm_optimum(dpo))                                       # β = 1: the same point
    assert nonzero_somewhere(nca.nca_two_arm_optimum(beta=2))
    assert nonzero_somewhere(nca.nca_two_arm_optimum(dpo, beta=2))
