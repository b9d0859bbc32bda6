"""Bandit policies (table vs. shared MLP), the Bradley–Terry reward model, the zero-support reference and the
new knobs of ``udrra.verify.train``. Every expected value is derived in the comments (closed forms, or a
one-line re-derivation of one optimiser step), never copied from a run of the code under test."""
import math

import pytest
import torch

import udrra
from udrra import Bandit, ConfigError, InputError
from udrra.bandit import LOG_ZERO
from udrra.policy import MLPPolicy, TablePolicy, make_policy
from udrra.reward_model import fit_reward_model
from udrra.verify import train

ADAM_EPS = 1e-8  # torch.optim.Adam's default eps


def adam_first_step(grad: torch.Tensor, lr: float) -> torch.Tensor:
    # Adam's first update from m = v = 0: m1 = (1−β1)g, v1 = (1−β2)g²; with the bias corrections
    # m̂ = g and √v̂ = |g|, so Δ = −lr·g/(|g| + eps) (exactly 0 where g = 0).
    return -lr * grad / (grad.abs() + ADAM_EPS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see tests/conftest.py


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------------- policies
BASE = torch.tensor([[0.3, -0.2, 0.1], [-0.5, 0.4, 0.0]], dtype=torch.float64)


def test_table_policy_holds_a_float64_copy_of_its_logits():
    init = torch.tensor([[1.0, 2.0]], dtype=torch.float32)
    pol = TablePolicy(init)
    init[0, 0] = 99.0  # the policy must not alias the caller's tensor
    out = pol()
    assert out.dtype == torch.float64
    assert out.tolist() == [[1.0, 2.0]]


def test_mlp_with_zero_output_layer_starts_exactly_at_softmax_of_base_logits():
    # w2 = 0 and b2 = 0 ⇒ tanh(·) @ w2 + b2 = 0 exactly ⇒ logits = base, bit for bit.
    pol = MLPPolicy(2, 3, hidden=8, base_logits=BASE, zero_init_output=True, seed=3)
    assert torch.equal(pol(), BASE)
    assert torch.equal(make_policy("mlp", BASE, hidden=8, seed=3)(), BASE)
    assert torch.equal(make_policy("table", BASE)(), BASE)


def test_mlp_without_base_and_random_output_layer_is_not_uniform():
    # zero_init_output=False draws w2 ~ N(0, init_scale²): the logits are H @ w2 + 0 with H = tanh(w1 + b1)
    # (one-hot inputs), so they equal that product computed from the parameters themselves.
    pol = MLPPolicy(2, 3, hidden=8, zero_init_output=False, init_scale=0.5, seed=1)
    h = torch.tanh(pol.w1 + pol.b1)
    assert torch.allclose(pol(), h @ pol.w2, atol=1e-15)
    assert float(pol.w2.detach().abs().max()) > 0


def test_one_adam_step_on_prompt_0_moves_prompt_1_through_shared_parameters_but_not_in_the_table():
    lr = 0.1
    # Loss touching only prompt 0: L = −log π(y=0 | x=0). Its gradient on prompt 0's logits is g = π₀ − e₀
    # (softmax cross-entropy), and zero on prompt 1's.
    pi0 = torch.softmax(BASE[0], -1)
    g = pi0 - torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)

    def one_step(pol):
        opt = torch.optim.Adam(pol.parameters(), lr=lr)
        loss = -torch.log_softmax(pol(), -1)[0, 0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            return pol().detach()

    # Table: prompt 0's row moves by Adam's first step on g; prompt 1's row gets a zero gradient, so Adam
    # (m = v = 0) leaves it exactly where it was.
    table = one_step(TablePolicy(BASE))
    assert torch.equal(table[1], BASE[1])
    assert torch.allclose(table[0], BASE[0] + adam_first_step(g, lr), atol=1e-14)

    # MLP, logits = base + H @ w2 + b2 with H = tanh(onehot(x) @ w1 + b1) and w2 = b2 = 0 at the start.
    # Gradients: dL/dw2 = H[0]ᵀ g (outer product), dL/db2 = g, dL/dH = G @ w2ᵀ = 0 ⇒ w1, b1 do not move.
    # After the step every prompt x gets base[x] + H[x] @ Δw2 + Δb2, and Δw2, Δb2 are shared by prompt 1.
    mlp = MLPPolicy(2, 3, hidden=8, base_logits=BASE, zero_init_output=True, seed=5)
    with torch.no_grad():
        H = torch.tanh(mlp.w1 + mlp.b1)  # rows = hidden activations of the one-hot prompts
    d_w2 = adam_first_step(torch.outer(H[0], g), lr)
    d_b2 = adam_first_step(g, lr)
    expected = BASE + H @ d_w2 + d_b2
    after = one_step(mlp)
    assert torch.allclose(after, expected, atol=1e-12)
    # Prompt 1's logit shift is −lr·sign(g_k)·(1 + Σ_h H[1,h]·sign(H[0,h])) (up to eps): not constant in k, so
    # π(·|x=1) itself changes — by a visible amount, unlike the table's exactly-zero change.
    moved = 0.5 * (torch.softmax(after[1], -1) - torch.softmax(BASE[1], -1)).abs().sum()
    expected_moved = 0.5 * (torch.softmax(expected[1], -1) - torch.softmax(BASE[1], -1)).abs().sum()
    assert float(moved) == pytest.approx(float(expected_moved), abs=1e-12)
    assert float(moved) > 1e-3


def test_policy_errors_name_what_is_valid():
    with pytest.raises(InputError, match="valid: table, mlp"):
        make_policy("cnn", BASE)
    with pytest.raises(InputError, match=r"base_logits must have shape \(P, K\)=\(2, 3\), got \(3, 2\)"):
        MLPPolicy(2, 3, base_logits=BASE.T)
    with pytest.raises(InputError, match="responses >= 2"):
        MLPPolicy(2, 1)


# ---------------------------------------------------------------------------------------------- reward model
def test_table_reward_model_recovers_the_bradley_terry_logit_and_is_centred():
    # One prompt, two responses, p(y0 ≻ y1) = σ(1), μ uniform over the two ordered pairs. The population NLL
    # is −q·log σ(d) − (1 − q)·log σ(−d) with d = r0 − r1 (both orders give the same term), minimised where
    # σ(d) = q, i.e. d = logit(σ(1)) = 1. The table gradients on r0 and r1 are equal and opposite, so Adam
    # keeps r0 = −r1 and the (centred) answer is (½, −½).
    q = sigmoid(1.0)
    b = Bandit([[0.5, 0.5]], preference=[[[0.5, q], [1 - q, 0.5]]])
    r = fit_reward_model(b, kind="table", steps=2000, lr=0.05)
    assert r.shape == (1, 2) and r.dtype == torch.float64
    assert float(r[0, 0] - r[0, 1]) == pytest.approx(1.0, abs=1e-3)
    assert r.sum(-1).abs().max() < 1e-12
    assert r[0].tolist() == pytest.approx([0.5, -0.5], abs=1e-3)


def test_table_reward_model_leaves_untouched_responses_at_zero_minus_the_row_mean():
    # Two prompts × 3 responses, pairs only (0, 1) in each prompt; BT rewards r = (1, 0, 7) and (0, 2, −5), so
    # the MLE differences are r0 − r1 = 1 and −2. Response 2 is in no pair: its table entry gets an exactly
    # zero gradient, Adam leaves it at 0. r0 = −r1 by the symmetry above, so the raw row is (d/2, −d/2, 0),
    # its mean is 0, and after centring response 2 sits at 0 − 0 = 0 — not at its true (centred) value.
    mu = torch.zeros(2, 3, 3, dtype=torch.float64)
    mu[:, 0, 1] = 1.0
    b = Bandit(torch.full((2, 3), 1 / 3), reward=[[1.0, 0.0, 7.0], [0.0, 2.0, -5.0]], pair_distribution=mu)
    r = fit_reward_model(b, kind="table", steps=2000, lr=0.05)
    assert r[:, 2].abs().max() < 1e-12
    assert float(r[0, 0] - r[0, 1]) == pytest.approx(1.0, abs=1e-3)
    assert float(r[1, 0] - r[1, 1]) == pytest.approx(-2.0, abs=1e-3)
    assert r.sum(-1).abs().max() < 1e-12


def test_deterministic_labels_with_weight_decay_stop_at_the_regularised_optimum():
    # Deterministic labels: q = 1 for p(y0 ≻ y1) = σ(1) > ½, so the loss is −log σ(d) (both orders), which has
    # no finite minimiser; Adam's weight_decay adds wd·r to the gradient, i.e. the objective gains (wd/2)·|r|².
    # Stationarity with r0 = −r1 = d/2: σ(−d) = wd·d/2. Solve that scalar equation by bisection.
    wd = 0.1
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sigmoid(-mid) - wd * mid / 2 > 0 else (lo, mid)
    d_star = (lo + hi) / 2
    b = Bandit([[0.5, 0.5]], reward=[[1.0, 0.0]])
    r = fit_reward_model(b, kind="table", steps=3000, lr=0.05, deterministic=True, weight_decay=wd)
    assert float(r[0, 0] - r[0, 1]) == pytest.approx(d_star, abs=1e-3)


def test_mlp_reward_model_fits_each_prompts_logit():
    # The shared MLP can represent any P×K table on one-hot prompts, so the BT MLE is still d = logit(q) per
    # prompt: here d = 1 and d = −0.5 (rewards (1, 0) and (0, 0.5)).
    b = Bandit([[0.5, 0.5], [0.5, 0.5]], reward=[[1.0, 0.0], [0.0, 0.5]])
    r = fit_reward_model(b, kind="mlp", hidden=16, steps=1500, lr=0.02, seed=0)
    assert float(r[0, 0] - r[0, 1]) == pytest.approx(1.0, abs=1e-2)
    assert float(r[1, 0] - r[1, 1]) == pytest.approx(-0.5, abs=1e-2)
    assert r.sum(-1).abs().max() < 1e-12


def test_reward_model_errors():
    b = Bandit([[0.5, 0.5]], reward=[[1.0, 0.0]])
    with pytest.raises(InputError, match="valid: table, mlp"):
        fit_reward_model(b, kind="gp")
    with pytest.raises(InputError, match="steps must be >= 1"):
        fit_reward_model(b, steps=0)


# ------------------------------------------------------------------------------------- zero-support reference
def test_log_pi_ref_is_floored_at_log_1e_minus_30_and_log_partition_ignores_the_floor():
    b = Bandit([[0.5, 0.5, 0.0]], reward=[[0.0, 0.0, 100.0]])
    assert LOG_ZERO == pytest.approx(math.log(1e-30), abs=1e-12)
    assert b.log_pi_ref[0].tolist() == pytest.approx([math.log(0.5), math.log(0.5), LOG_ZERO], abs=1e-15)
    # log Z = log Σ π_ref·e^{r/β} = log(½·1 + ½·1 + 0·e^{100}) = 0 with β = 1: the unsupported response must
    # contribute 0, not e^{LOG_ZERO + 100} = e^{30.9}.
    assert float(b.log_partition(1.0)[0]) == pytest.approx(0.0, abs=1e-12)


def test_with_reward_keeps_preferences_and_pairs():
    # with_reward swaps only the scalar reward; the preference matrix stays the one given (here from r0).
    mu = torch.zeros(1, 3, 3, dtype=torch.float64)
    mu[0, 0, 1] = 1.0
    b = Bandit([[0.2, 0.3, 0.5]], reward=[[1.0, 0.0, 0.0]], pair_distribution=mu)
    b2 = b.with_reward([[0.0, 5.0, 0.0]])
    assert b2.reward.tolist() == [[0.0, 5.0, 0.0]]
    assert torch.equal(b2.preference, b.preference)
    assert float(b2.preference[0, 0, 1]) == pytest.approx(sigmoid(1.0), abs=1e-15)
    assert torch.equal(b2.pair_distribution, b.pair_distribution)
    assert torch.equal(b2.pi_ref, b.pi_ref)


# ------------------------------------------------------------------------------------------- apply_overrides
@pytest.mark.parametrize("overrides", [{"target.beta": 0.7, "target.kind": "forward_kl"},
                                       {"target.kind": "forward_kl", "target.beta": 0.7}])
def test_kind_overrides_are_applied_before_parameters_whatever_the_order(overrides):
    a = udrra.load("reinforce", overrides)
    assert a.components.target.kind == "forward_kl"
    assert a.beta == 0.7


def test_a_new_kind_starts_from_its_own_defaults_and_the_same_kind_keeps_parameters():
    # reinforce's [target] is boltzmann with beta = 0.5. Re-stating the same kind keeps beta; switching kind
    # resets the table to {kind}, so forward_kl without a beta override must be rejected for its missing beta.
    assert udrra.load("reinforce", {"target.kind": "boltzmann"}).beta == 0.5
    with pytest.raises(ConfigError, match=r"\[target\] kind 'forward_kl' needs parameter 'beta'"):
        udrra.load("reinforce", {"target.kind": "forward_kl"})


# --------------------------------------------------------------------------------------------- verify.train
def _dpo_two_response_bandit():
    return Bandit([[0.5, 0.5]], reward=[[1.0, 0.0]])


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_train_one_sgd_step_with_loss_scale(scale):
    # DPO, exact population over both ordered pairs with labels q = σ(1) and 1 − q; π_ref uniform so
    # u0 − u1 = z0 − z1 =: h. Loss L(h) = −q·log σ(βh) − (1−q)·log σ(−βh); at h = 0, dL/dh = β(1 − 2q)/2, so
    # dL/dz0 = β(1−2q)/2 = −dL/dz1. One SGD step with lr on scale·L: z0 = −lr·scale·β(1−2q)/2 = −z1.
    # The logged loss is the unscaled loss before the step: L(0) = log 2.
    beta, lr, q = 0.1, 0.5, sigmoid(1.0)
    algo = udrra.load("dpo")
    pol = TablePolicy(torch.zeros(1, 2, dtype=torch.float64))
    final, total, hist = train(algo, _dpo_two_response_bandit(), exact=True, steps=1, lr=lr, policy=pol,
                               optimizer="sgd", loss_scale=scale, early_stop=False, average=False, log_every=1)
    z0 = -lr * scale * beta * (1 - 2 * q) / 2
    assert total == 1 and len(hist) == 1 and hist[0]["step"] == 1
    assert hist[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-14)
    assert pol.logits[0].tolist() == pytest.approx([z0, -z0], abs=1e-15)
    e = math.exp(2 * z0)
    assert final[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)], abs=1e-15)


def test_train_early_stop_and_metrics_callback():
    # Equal rewards ⇒ q = ½ ⇒ the DPO gradient at π = π_ref is exactly 0 (β(1 − 2q)/2 = 0): the policy never
    # moves. With early_stop the loop stops once it has been still for 5 steps; without, it runs all 12.
    b = Bandit([[0.5, 0.5]], reward=[[0.0, 0.0]])
    algo = udrra.load("dpo")
    seen = []

    def metrics(probs):
        seen.append(probs.clone())
        return {"p0": float(probs[0, 0])}

    _, total, hist = train(algo, b, steps=12, optimizer="adam", early_stop=True, log_every=1, metrics=metrics)
    assert total == 5
    _, total, hist = train(algo, b, steps=12, optimizer="adam", early_stop=False, log_every=5)
    assert total == 12
    # logged at 0-based steps 0, 5, 10 (step % 5 == 0) and 11 (the last): records step = steps taken = 1, 6, 11, 12
    assert [h["step"] for h in hist] == [1, 6, 11, 12]
    assert len(seen) == 5 and all(s.tolist() == [[0.5, 0.5]] for s in seen)


def test_train_rejects_an_unknown_optimizer():
    with pytest.raises(InputError, match="valid: rprop, adam, sgd"):
        train(udrra.load("dpo"), _dpo_two_response_bandit(), optimizer="lbfgs")
