"""Convergence ablations (``udrra.ablate`` / ``udrra ablate``): experiment files, testbeds, seed vectorisation,
metrics, claims, outputs and errors. Expected values are derived in the comments (closed forms, a hand-written
scalar Adam recursion, or the same run done seed by seed through ``udrra.verify.train``); none is copied from a
run of the code under test. Runs are tiny (few steps, 1–3 prompts) and write under tmp_path."""
import csv
import math
import statistics
from pathlib import Path

import pytest
import torch

import udrra
from udrra import Bandit, ConfigError, InputError
from udrra.ablate import build_testbed, load_experiment, run_experiment
from udrra.bandit import LOG_ZERO
from udrra.cli import main
from udrra.policy import TablePolicy, make_policy
from udrra.verify import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see tests/conftest.py


def write(tmp_path, text, name="exp.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------------------
# Xu et al. (2404.10719) Table 1: π_ref = (½, ½, 0), one pair y1 ≻ y2, y3 never in the data, start uniform.
# ---------------------------------------------------------------------------------------------------------------
XU_TABLE = """
[experiment]
name = "xu_table1"
description = "DPO on Xu et al. Table 1"
base = "dpo"
mode = "exact"
steps = 6
seeds = 1
optimizer = "adam"
lr = 0.05
log_every = 1
init = "uniform"
metrics = ["tv_target", "kl_ref", "uncovered_mass", "max_uncovered", "max_prob", "loss"]

[testbed]
kind = "table"
pi_ref = [[0.5, 0.5, 0.0]]
reward = [[1.0, 0.0, 0.0]]
pairs = [[0, 0, 1]]

[[variant]]
label = "DPO"
set = { "source.labels" = "deterministic" }

[[variant]]
label = "DPO twin"
algorithm = "dpo"
set = { "source.labels" = "deterministic" }

[[claim]]
text = "y3 ends with most of the mass"
variant = "DPO"
metric = "uncovered_mass"
op = ">"
value = 0.5

[[claim]]
text = "y3 loses mass"
variant = "DPO"
metric = "uncovered_mass"
op = "<"
than = "initial"

[[claim]]
text = "DPO beats its twin"
variant = "DPO"
metric = "max_prob"
op = ">"
than = "DPO twin"

[[claim]]
text = "DPO matches its twin"
variant = "DPO"
metric = "max_prob"
op = ">="
than = "DPO twin"
"""


def xu_adam_trajectory(steps, lr=0.05, beta=0.1):
    """π after each Adam step, by hand.

    Logits z start at 0 (init "uniform"). The only datum is the ordered pair (y1, y2), label 1 (p = σ(1) > ½,
    deterministic), weight 1 (one prompt). u1 − u2 = (z1 − log ½) − (z2 − log ½) = z1 − z2 (the log-partition
    cancels), so L = −log σ(β(z1 − z2)): ∂L/∂z3 = 0 exactly (z3 stays 0) and ∂L/∂z1 = −∂L/∂z2 = −β·σ(−β(z1 − z2)).
    Adam is per coordinate and sees ±the same gradients, so z1 = a = −z2 with, for g = −β·σ(−2βa):
    m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², a ← a − lr/(1−β1^t) · m / (√v/√(1−β2^t) + eps).
    Then π = (e^a, e^{−a}, 1)/(2·cosh a + 1).
    """
    b1, b2, eps = 0.9, 0.999, 1e-8
    a = m = v = 0.0
    out = []
    for t in range(1, steps + 1):
        g = -beta * sigmoid(-2 * beta * a)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        a -= lr / (1 - b1 ** t) * m / (math.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
        zsum = math.exp(a) + math.exp(-a) + 1.0
        out.append((math.exp(a) / zsum, math.exp(-a) / zsum, 1.0 / zsum))
    return out


@pytest.fixture(scope="module")
def xu_result(tmp_path_factory):
    d = tmp_path_factory.mktemp("xu")
    ex = load_experiment(write(d, XU_TABLE))
    return run_experiment(ex, d / "out", progress=False), d / "out"


def test_xu_table1_dpo_follows_the_hand_derived_adam_trajectory(xu_result):
    res, _ = xu_result
    rows = [r for r in res.rows if r["variant"] == "DPO"]
    # steps 6, log_every 1: every 0-based step is logged (step % 1 == 0), each recorded as steps taken 1..6,
    # plus the step-0 row of the initial policy.
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert all(r["seed"] == 0 for r in rows)
    traj = [(1 / 3, 1 / 3, 1 / 3)] + xu_adam_trajectory(6)
    log_half = math.log(0.5)
    for r, (p1, p2, p3) in zip(rows, traj):
        # y3 is the only response no pair covers; one prompt, so uncovered_mass = max_uncovered = π(y3).
        assert r["uncovered_mass"] == pytest.approx(p3, abs=1e-12)
        assert r["max_uncovered"] == pytest.approx(p3, abs=1e-12)
        assert r["max_prob"] == pytest.approx(p1, abs=1e-12)
        # KL(π‖π_ref) with log π_ref(y3) floored at LOG_ZERO = log 1e-30.
        kl = p1 * (math.log(p1) - log_half) + p2 * (math.log(p2) - log_half) + p3 * (math.log(p3) - LOG_ZERO)
        assert r["kl_ref"] == pytest.approx(kl, abs=1e-10)
        # DPO's target is not identified when a response is in no pair (TargetError) ⇒ NaN, not a number.
        assert math.isnan(r["tv_target"])
    # loss: NaN for the initial policy; the row of step k holds the loss of the batch the k-th update was
    # computed on, i.e. at the policy before it: −log σ(2β·a_{k−1}) with a_0 = 0 (so log 2 at step 1).
    assert math.isnan(rows[0]["loss"])
    a_prev = [0.0] + [math.log(p1 / p3) for p1, _, p3 in traj[1:-1]]  # a = z1 − z3 = log(π1/π3)
    for r, a in zip(rows[1:], a_prev):
        assert r["loss"] == pytest.approx(-math.log(sigmoid(2 * 0.1 * a)), abs=1e-12)


def test_xu_table1_invariants_zero_gradient_on_the_uncovered_response(xu_result):
    res, _ = xu_result
    rows = [r for r in res.rows if r["variant"] == "DPO"]
    p2s = []
    for r in rows:
        p1, p3 = r["max_prob"], r["uncovered_mass"]
        p2 = 1.0 - p1 - p3
        p2s.append(p2)
        # z3 = 0 and z1 = −z2 (see xu_adam_trajectory) ⇒ π1·π2 = e^{z1+z2}/Z² = e^{2·z3}/Z² = π3².
        assert p1 * p2 == pytest.approx(p3 * p3, rel=1e-10)
    # a grows at every step (the gradient on z1 is always negative, so Adam's m keeps its sign) ⇒ π(y2) falls.
    assert all(later < earlier for earlier, later in zip(p2s, p2s[1:]))


def test_identical_variants_give_identical_rows(xu_result):
    res, _ = xu_result
    a = [r for r in res.rows if r["variant"] == "DPO"]
    b = [r for r in res.rows if r["variant"] == "DPO twin"]
    keys = ["step", "kl_ref", "uncovered_mass", "max_uncovered", "max_prob"]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


def test_claims_value_initial_and_other_variant(xu_result):
    res, out = xu_result
    c = {x["text"]: x for x in res.claims}
    assert len(c) == 4
    final_p3 = xu_adam_trajectory(6)[-1][2]
    final_p1 = xu_adam_trajectory(6)[-1][0]
    # One seed: the difference is measured but there is no interval (N − 1 = 0 degrees of freedom), so no claim
    # is resolved — whatever the sign of the difference.
    for x in c.values():
        assert x["verdict"] == "not resolved" and x["holds"] is False and x["seeds"] == 1
        assert math.isnan(x["ci_low"]) and math.isnan(x["ci_high"]) and x["note"] == "one seed: no interval"
    # the seed means are kept as before: measured / reference
    assert c["y3 ends with most of the mass"]["measured"] == pytest.approx(final_p3, abs=1e-12)
    assert c["y3 ends with most of the mass"]["reference"] == 0.5
    assert c["y3 ends with most of the mass"]["diff_mean"] == pytest.approx(final_p3 - 0.5, abs=1e-12)
    # than = "initial": compared with the step-0 value 1/3 (uniform start) of the same seed.
    init = c["y3 loses mass"]
    assert init["reference"] == pytest.approx(1 / 3, abs=1e-15)
    assert init["diff_mean"] == pytest.approx(final_p3 - 1 / 3, abs=1e-12)
    # The twin is the same composition ⇒ the same final max_prob: the difference is exactly 0.
    assert c["DPO beats its twin"]["diff_mean"] == 0.0
    assert c["DPO matches its twin"]["measured"] == pytest.approx(final_p1, abs=1e-12)
    report = (out / "report.md").read_text()
    lines = {t: next(line for line in report.splitlines() if line.startswith(f"| {t} (")) for t in c}
    assert all(line.endswith("| not resolved at 1 seed |") for line in lines.values())
    assert lines["y3 loses mass"].startswith("| y3 loses mass (DPO: uncovered_mass < its initial value) | ")
    assert "| claim | measured (mean vs reference) | difference, 95% CI | verdict |" in report
    assert f"{final_p3 - 1 / 3:+.3g} (1 seed: no interval)" in lines["y3 loses mass"]


def test_claims_on_replica_seeds_are_judged_by_the_sign_and_a_tie_is_not_resolved(tmp_path):
    # init "uniform", exact gradients: both seeds are the same run (replicas), so every d_s is the same number and
    # the interval has width 0 (sd = 0): the verdict is the sign of d. The twin gives d = 0 exactly in both seeds:
    # a tie, not resolved — for ">=" as well as ">".
    ex = load_experiment(write(tmp_path, XU_TABLE))
    res = run_experiment(ex, tmp_path / "out", progress=False, seeds=2)
    c = {x["text"]: x for x in res.claims}
    final_p3 = xu_adam_trajectory(6)[-1][2]
    big = c["y3 ends with most of the mass"]   # π(y3) − 0.5 < 0 in both seeds, claim ">"
    assert big["verdict"] == "does not hold" and big["holds"] is False and big["seeds"] == 2
    assert big["diff_mean"] == big["ci_low"] == big["ci_high"] == pytest.approx(final_p3 - 0.5, abs=1e-12)
    loses = c["y3 loses mass"]                 # π(y3) − 1/3 < 0 in both seeds, claim "<"
    assert loses["verdict"] == "holds" and loses["holds"] is True
    assert loses["ci_high"] == pytest.approx(final_p3 - 1 / 3, abs=1e-12)
    for t in ("DPO beats its twin", "DPO matches its twin"):
        assert c[t]["verdict"] == "not resolved" and c[t]["holds"] is False
        assert c[t]["diff_mean"] == c[t]["ci_low"] == c[t]["ci_high"] == 0.0 and c[t]["note"].startswith("tie")
    report = (tmp_path / "out" / "report.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("| DPO matches its twin ("))
    assert line.endswith("| 0 [0, 0] | not resolved at 2 seeds (tie in every seed) |")
    assert next(x for x in report.splitlines() if x.startswith("| y3 ends with")).endswith("| **does not hold** |")


# Student's t quantiles derived by hand (not from scipy): with ν = 1 the t distribution is Cauchy,
# F(t) = ½ + atan(t)/π ⇒ t(0.975, 1) = tan(0.475·π) = 12.7062…; with ν = 2, F(t) = ½ + t / (2·√(2 + t²)) ⇒
# t/√(2 + t²) = 0.95 ⇒ t² = 0.95²·2 / (1 − 0.95²) ⇒ t(0.975, 2) = 4.302652…
T1 = math.tan(0.475 * math.pi)
T2 = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2))


def test_hand_quantiles_are_the_tabulated_ones():
    assert T1 == pytest.approx(12.7062, abs=1e-4) and T2 == pytest.approx(4.302653, abs=1e-6)


def test_judge_claim_three_seeds_interval_by_hand():
    from udrra.ablate import judge_claim
    # d = (1, 2, 3): mean 2, s = 1, half-width t(0.975, 2)·1/√3 = 2.4841 ⇒ [−0.484, 4.484] holds 0: not resolved.
    j = judge_claim([1.0, 2.0, 3.0], ">")
    assert j["verdict"] == "not resolved" and j["seeds"] == 3 and j["diff_mean"] == 2.0
    assert T2 / math.sqrt(3) == pytest.approx(2.484138, abs=1e-6)
    assert j["ci_low"] == pytest.approx(2 - T2 / math.sqrt(3), abs=1e-9)
    assert j["ci_high"] == pytest.approx(2 + T2 / math.sqrt(3), abs=1e-9)
    assert j["ci_low"] == pytest.approx(-0.484138, abs=1e-6)
    # d = (1.0, 1.1, 0.9): mean 1, s = 0.1, half-width 0.24841 ⇒ [0.7516, 1.2484], wholly above 0.
    d = [1.0, 1.1, 0.9]
    for op, verdict in ((">", "holds"), (">=", "holds"), ("<", "does not hold"), ("<=", "does not hold")):
        j = judge_claim(d, op)
        assert j["verdict"] == verdict, op
        assert j["ci_low"] == pytest.approx(1 - 0.1 * T2 / math.sqrt(3), abs=1e-9)
        assert j["ci_high"] == pytest.approx(1 + 0.1 * T2 / math.sqrt(3), abs=1e-9)
    # reversed: wholly below 0
    neg = [-x for x in d]
    assert judge_claim(neg, ">")["verdict"] == "does not hold"
    assert judge_claim(neg, "<")["verdict"] == "holds"
    assert judge_claim(neg, "<=")["ci_high"] == pytest.approx(-0.751586, abs=1e-6)


def test_judge_claim_two_seeds_one_seed_ties_and_nan():
    from udrra.ablate import judge_claim
    # N = 2, d = (1, 3): mean 2, s = √2, half-width t(0.975, 1)·√2/√2 = 12.706 ⇒ [−10.71, 14.71]
    j = judge_claim([1.0, 3.0], ">")
    assert j["verdict"] == "not resolved"
    assert (j["ci_low"], j["ci_high"]) == (pytest.approx(2 - T1, abs=1e-9), pytest.approx(2 + T1, abs=1e-9))
    # N = 1: no interval, whatever the sign
    for d in ([5.0], [-5.0]):
        j = judge_claim(d, ">")
        assert j["verdict"] == "not resolved" and j["diff_mean"] == d[0] and math.isnan(j["ci_low"])
    # equal non-zero differences: zero-width interval at that value, judged by its sign
    j = judge_claim([0.25, 0.25, 0.25], "<")
    assert j["verdict"] == "does not hold" and j["ci_low"] == j["ci_high"] == 0.25
    # exactly 0 in every seed: a tie, not resolved for every op
    for op in (">", "<", ">=", "<="):
        j = judge_claim([0.0, 0.0, 0.0], op)
        assert j["verdict"] == "not resolved" and j["note"].startswith("tie"), op
    j = judge_claim([1.0, float("nan"), 2.0], ">")
    assert j["verdict"] == "not resolved" and math.isnan(j["diff_mean"]) and j["note"].startswith("NaN")
    with pytest.raises(InputError, match="op must be one of"):
        judge_claim([1.0, 2.0], "==")
    with pytest.raises(InputError, match="at least one"):
        judge_claim([], ">")


def test_claim_against_another_variant_is_paired_by_seed(tmp_path):
    # kl_placement starts each seed at log π_ref + N(0, 0.25): seeds differ, and the claim "k1 in loss max_prob >
    # k1 in reward" is judged on d_s = final_s(k1 in loss) − final_s(k1 in reward) of the same seed s.
    ex = load_experiment(REPO / "experiments" / "kl_placement.toml")
    res = run_experiment(ex, tmp_path / "out", progress=False, steps=5, seeds=2)
    c = res.claims[3]
    assert c["variant"] == "k1 in loss" and c["against"] == "k1 in reward" and c["seeds"] == 2

    def final(label, seed):
        return [r for r in res.rows if r["variant"] == label and r["seed"] == seed][-1]["max_prob"]
    d = [final("k1 in loss", s) - final("k1 in reward", s) for s in (0, 1)]
    assert d[0] != d[1]  # the seeds differ
    mean = (d[0] + d[1]) / 2
    half = T1 * abs(d[0] - d[1]) / 2  # s = |d0 − d1|/√2, half-width t·s/√2
    assert c["diff_mean"] == pytest.approx(mean, abs=1e-12)
    assert c["ci_low"] == pytest.approx(mean - half, abs=1e-9)
    assert c["ci_high"] == pytest.approx(mean + half, abs=1e-9)
    # pairing shows in the width: it is that of d = paired differences (s = |d0 − d1|/√2), not the width of an
    # interval built from the two variants' spreads
    assert c["ci_high"] - c["ci_low"] == pytest.approx(T1 * abs(d[0] - d[1]), abs=1e-9)
    assert c["verdict"] == ("holds" if mean - half > 0 else "does not hold" if mean + half < 0 else "not resolved")
    # than = "initial" of a random start: final − initial of the same seed
    ex_init = load_experiment(write(tmp_path, (REPO / "experiments" / "kl_placement.toml").read_text().replace(
        'than = "k1 in reward"', 'than = "initial"'), name="init.toml"))
    res2 = run_experiment(ex_init, tmp_path / "out2", progress=False, steps=5, seeds=2)
    c2 = res2.claims[3]
    rows = [r for r in res2.rows if r["variant"] == "k1 in loss"]
    d2 = [[r for r in rows if r["seed"] == s][-1]["max_prob"] - [r for r in rows if r["seed"] == s][0]["max_prob"]
          for s in (0, 1)]
    assert c2["diff_mean"] == pytest.approx((d2[0] + d2[1]) / 2, abs=1e-12)
    assert c2["ci_high"] - c2["ci_low"] == pytest.approx(T1 * abs(d2[0] - d2[1]), abs=1e-9)


def test_report_only_rebuilds_summary_and_report_exactly_and_leaves_the_rest(tmp_path):
    import shutil
    from udrra.ablate import report_from_results
    p = write(tmp_path, XU_TABLE)
    out = tmp_path / "run"
    res = run_experiment(load_experiment(p), out, progress=False, seeds=2)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "summary.csv").unlink()
    (copy / "report.md").write_text((out / "report.md").read_text().split("## Claims checked")[0])  # keeps "ran in"
    rebuilt = report_from_results(p, copy)
    # the file says seeds = 1; the stored run has 2: the rebuild takes the run's
    assert rebuilt.experiment.seeds == 2 and all(c["seeds"] == 2 for c in rebuilt.claims)
    assert (copy / "summary.csv").read_bytes() == before["summary.csv"]
    assert (copy / "report.md").read_bytes() == before["report.md"]
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == before  # metrics.csv and the PNGs untouched
    assert [c["verdict"] for c in rebuilt.claims] == [c["verdict"] for c in res.claims]
    assert rebuilt.files == [copy / "summary.csv", copy / "report.md"]
    # without an old report the run time is unknown
    (copy / "report.md").unlink()
    report_from_results(p, copy)
    assert "- run time not recorded (report rebuilt from metrics.csv)" in (copy / "report.md").read_text()


def test_report_only_errors(tmp_path, capsys):
    from udrra.ablate import report_from_results
    p = write(tmp_path, XU_TABLE)
    with pytest.raises(InputError, match="no metrics.csv"):
        report_from_results(p, tmp_path / "nothing")
    run_experiment(load_experiment(p), tmp_path / "run", progress=False, steps=3)
    # the stored run took 3 steps; the file says 6
    with pytest.raises(InputError, match=r"ends at step 3, not 6.*--steps"):
        report_from_results(p, tmp_path / "run")
    assert report_from_results(p, tmp_path / "run", steps=3).experiment.steps == 3
    # metrics.csv of another experiment version (a metric dropped from the file)
    q = write(tmp_path, XU_TABLE.replace('"max_prob", "loss"]', '"loss"]').split("[[claim]]")[0], name="q.toml")
    with pytest.raises(InputError, match="columns"):
        report_from_results(q, tmp_path / "run")
    rc = main(["ablate", str(p), "--output-dir", str(tmp_path / "run"), "--report-only", "--seeds", "2"])
    assert rc == 2 and "--report-only takes the seeds from metrics.csv" in capsys.readouterr().err


def test_cli_report_only_prints_the_verdicts(tmp_path, capsys):
    p = write(tmp_path, XU_TABLE)
    out = tmp_path / "o"
    run_experiment(load_experiment(p), out, progress=False, seeds=2)
    png = (out / "loss.png").read_bytes()
    rc = main(["ablate", str(p), "--output-dir", str(out), "--report-only"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("xu_table1: report rebuilt from ")
    assert "(2 variants × 2 seeds)" in stdout
    assert "claim holds: y3 loses mass (DPO uncovered_mass final − initial = -" in stdout
    assert "claim not resolved at 2 seeds: DPO matches its twin (DPO − DPO twin max_prob = +0, 95% CI [+0, +0]) " \
           "(tie in every seed)" in stdout
    assert (out / "loss.png").read_bytes() == png


def test_outputs_csv_png_report(xu_result):
    res, out = xu_result
    metrics = read_csv(out / "metrics.csv")
    # 2 variants × 1 seed × (6 logged steps + the step-0 row) = 14 rows, with the experiment's metric columns.
    assert len(metrics) == 14
    assert list(metrics[0].keys()) == ["variant", "seed", "step", "tv_target", "kl_ref", "uncovered_mass",
                                       "max_uncovered", "max_prob", "loss"]
    summary = read_csv(out / "summary.csv")
    assert [s["variant"] for s in summary] == ["DPO", "DPO twin"]
    final_p3 = xu_adam_trajectory(6)[-1][2]
    assert float(summary[0]["uncovered_mass_final"]) == pytest.approx(final_p3, abs=1e-12)
    assert float(summary[0]["uncovered_mass_initial"]) == pytest.approx(1 / 3, abs=1e-12)
    assert float(summary[0]["uncovered_mass_final_std"]) == 0.0  # one seed
    # One PNG per metric that has a number somewhere; tv_target is NaN everywhere (no target) ⇒ no figure.
    for m in ["kl_ref", "uncovered_mass", "max_uncovered", "max_prob", "loss"]:
        assert (out / f"{m}.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "tv_target.png").exists()
    report = (out / "report.md").read_text()
    assert report.startswith("# xu_table1\n")
    assert "| DPO |" in report and "| DPO twin |" in report
    assert "pi_ref: `[[0.5, 0.5, 0.0]]`" in report
    assert set(res.files) == {out / n for n in ["metrics.csv", "summary.csv", "report.md", "kl_ref.png",
                                                 "uncovered_mass.png", "max_uncovered.png", "max_prob.png",
                                                 "loss.png"]}


# ---------------------------------------------------------------------------------------------------------------
# Seed vectorisation: S stacked copies must match S separate runs.
# ---------------------------------------------------------------------------------------------------------------
VECTOR = """
[experiment]
name = "vec"
base = "dpo"
steps = 12
seeds = 3
optimizer = "adam"
lr = 0.1
log_every = 4
init = "random"
init_scale = 0.5
metrics = ["tv_target", "kl_ref", "reward", "max_prob"]

[testbed]
kind = "random"
prompts = 2
responses = 3
seed = 4
{extra}

[[variant]]
label = "dpo"

[[variant]]
label = "grpo"
algorithm = "grpo"

[[variant]]
label = "rloo k3"
algorithm = "rloo"
[variant.set]
"reference.kind" = "kl_in_loss"
"reference.estimator" = "k3"
"target.kind" = "forward_kl"
"target.beta" = 0.5
"""


def hand_metrics(probs, bandit, target):
    # Means over prompts: TV to the target, KL(π‖π_ref), E_π[r], max_y π(y).
    return {"tv_target": float((0.5 * (probs - target).abs().sum(-1)).mean()),
            "kl_ref": float((probs * (torch.log(probs) - torch.log(bandit.pi_ref))).sum(-1).mean()),
            "reward": float((probs * bandit.reward).sum(-1).mean()),
            "max_prob": float(probs.amax(-1).mean())}


@pytest.mark.parametrize("policy,optimizer", [("table", "adam"), ("table", "sgd"), ("mlp", "adam")])
def test_stacked_seeds_match_separate_runs(tmp_path, policy, optimizer):
    # table: the 2 seeds run as one 2·P-prompt bandit with the loss ×2 (vectorised); mlp: seed by seed.
    # (SGD is the case where a missing ×2 would show: Adam is nearly invariant to the gradient's scale.)
    # Either way seed s must be what train() gives alone on the testbed's bandit (Bandit.random(2, 3, seed=4),
    # full coverage) from log π_ref + 0.5·N(0, 1) drawn with generator seed 10000 + s, with an MLP hidden layer
    # seeded by s. Logged: 0-based steps 0, 4, 8 (step % 4 == 0) and 11 (the last), recorded as 1, 5, 9, 12, plus
    # the step-0 row ⇒ 5 rows per (variant, seed).
    extra = 'policy = "mlp"\nhidden = 8' if policy == "mlp" else ""
    ex = load_experiment(write(tmp_path, VECTOR.format(extra=extra).replace('"adam"', f'"{optimizer}"')))
    assert ex.variants[2].overrides == {"reference.kind": "kl_in_loss", "reference.estimator": "k3",
                                        "target.kind": "forward_kl", "target.beta": 0.5}
    res = run_experiment(ex, tmp_path / "out", progress=False, seeds=2)
    assert len(read_csv(tmp_path / "out" / "metrics.csv")) == 3 * 2 * 5
    bandit = Bandit.random(2, 3, seed=4)
    log_ref = torch.log(bandit.pi_ref)
    for v in ex.variants:
        algo = udrra.load(v.algorithm, v.overrides)
        target = algo.target_distribution(bandit).double()
        finals = []
        for s in range(2):
            g = torch.Generator().manual_seed(10_000 + s)
            init = log_ref + torch.randn(log_ref.shape, generator=g, dtype=torch.float64) * 0.5
            pol = TablePolicy(init) if policy == "table" else make_policy("mlp", init, hidden=8, seed=s)
            seen = [torch.softmax(init, -1)]
            _, _, hist = train(algo, bandit, exact=True, steps=12, lr=0.1, policy=pol, optimizer=optimizer,
                               lr_decay=False, average=False, early_stop=False, log_every=4,
                               metrics=lambda p: seen.append(p.clone()) or {})
            rows = [r for r in res.rows if r["variant"] == v.label and r["seed"] == s]
            assert [r["step"] for r in rows] == [0, 1, 5, 9, 12] == [0] + [h["step"] for h in hist]
            for r, probs in zip(rows, seen):
                want = hand_metrics(probs, bandit, target)
                for m in ex.metrics:
                    assert r[m] == pytest.approx(want[m], abs=1e-10), (v.label, s, r["step"], m)
            finals.append(hand_metrics(seen[-1], bandit, target)["kl_ref"])
        # summary: mean over seeds and the sample std (n − 1) of the final values, which for two values is |a−b|/√2
        srow = next(x for x in res.summary if x["variant"] == v.label)
        assert srow["kl_ref_final"] == pytest.approx(statistics.fmean(finals), abs=1e-10)
        assert srow["kl_ref_final_std"] == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2), abs=1e-10)
        assert finals[0] != pytest.approx(finals[1], abs=1e-6)  # the seeds really are different runs


# ---------------------------------------------------------------------------------------------------------------
# Testbeds
# ---------------------------------------------------------------------------------------------------------------
def test_random_testbed_uncovered_and_coverage():
    # uncovered = 1 removes response K−1 from every pair: covered = [T, T, T, F] in every prompt.
    tb = build_testbed({"kind": "random", "prompts": 2, "responses": 4, "seed": 1, "uncovered": 1})
    assert tb.covered.tolist() == [[True, True, True, False]] * 2
    assert float(tb.bandit.pair_distribution[:, 3, :].abs().sum() + tb.bandit.pair_distribution[:, :, 3].sum()) == 0
    assert torch.allclose(tb.bandit.pi_ref, Bandit.random(2, 4, seed=1).pi_ref, atol=1e-15)
    # coverage = 0.5 of the 6 unordered pairs of K = 4 keeps round(3) = 3 per prompt, in both orders.
    tb = build_testbed({"kind": "random", "prompts": 3, "responses": 4, "seed": 2, "coverage": 0.5})
    mu = tb.bandit.pair_distribution
    assert ((mu > 0).sum((1, 2)) == 6).all()
    assert torch.equal(mu > 0, (mu > 0).transpose(1, 2))
    assert torch.allclose(mu.sum((1, 2)), torch.ones(3, dtype=torch.float64))
    with pytest.raises(InputError, match=r"uncovered must be in \[0, K-2\] = \[0, 2\]"):
        build_testbed({"kind": "random", "responses": 4, "uncovered": 3})


def test_table_testbed_pairs_and_errors():
    tb = build_testbed({"kind": "table", "pi_ref": [[0.5, 0.5, 0.0]], "reward": [[1.0, 0.0, 0.0]],
                        "pairs": [[0, 0, 1]]})
    assert tb.covered.tolist() == [[True, True, False]]
    assert tb.bandit.pair_distribution[0, 0, 1] == 1.0 and float(tb.bandit.pair_distribution.sum()) == 1.0
    assert tb.train_bandit is tb.bandit and tb.policy_kind == "table"
    with pytest.raises(InputError, match="out of range"):
        build_testbed({"kind": "table", "pi_ref": [[0.5, 0.5]], "reward": [[1.0, 0.0]], "pairs": [[0, 0, 2]]})
    with pytest.raises(InputError, match="needs pi_ref"):
        build_testbed({"kind": "table", "reward": [[1.0, 0.0]]})


def test_xu_synthetic_testbed_structure():
    # P = K = 4; each prompt's pairs all contain its optimal response y = x (reward 1.5 > any U[0, 1) draw) and
    # pairs_per_prompt = 2 distinct partners ⇒ 3 covered responses per prompt; μ symmetric; π_ref = the
    # initial MLP policy, so base_logits reproduce it.
    tb = build_testbed({"kind": "xu_synthetic", "prompts": 4, "pairs_per_prompt": 2, "seed": 3, "hidden": 8})
    r = tb.bandit.reward
    assert r.shape == (4, 4)
    assert torch.equal(r.argmax(-1), torch.arange(4)) and (r.diagonal() == 1.5).all()
    assert tb.covered.sum(-1).tolist() == [3, 3, 3, 3] and tb.covered.diagonal().all()
    mu = tb.bandit.pair_distribution
    assert torch.equal(mu, mu.transpose(1, 2))
    off_diag_partner = (mu[torch.arange(4), torch.arange(4)] > 0).sum(-1)
    assert off_diag_partner.tolist() == [2, 2, 2, 2]
    assert torch.allclose(torch.softmax(tb.base_logits, -1), tb.bandit.pi_ref, atol=1e-15)
    assert tb.policy_kind == "mlp" and isinstance(tb.init_policy, torch.nn.Module)


def test_xu_synthetic_run_starts_at_the_reference_mlp(tmp_path):
    # The policy rebuilt for training must be the testbed's π_ref MLP: step 0 has KL(π‖π_ref) = 0, and after
    # one Adam step of lr = 1e-7 every parameter moved by ≤ 1e-7, so the KL stays ~0 (a different MLP would give
    # an O(1) KL at once).
    text = """
[experiment]
base = "dpo"
steps = 1
seeds = 1
lr = 1e-7
init = "random"
metrics = ["kl_ref", "uncovered_mass"]
[testbed]
kind = "xu_synthetic"
prompts = 4
pairs_per_prompt = 2
seed = 3
hidden = 8
"""
    res = run_experiment(load_experiment(write(tmp_path, text)), tmp_path / "out", progress=False)
    assert [r["step"] for r in res.rows] == [0, 1]
    assert abs(res.rows[0]["kl_ref"]) < 1e-12 and abs(res.rows[1]["kl_ref"]) < 1e-9
    # one uncovered response in each of 4 prompts ⇒ uncovered_mass = mean_x π_ref(x, the uncovered y)
    tb = build_testbed({"kind": "xu_synthetic", "prompts": 4, "pairs_per_prompt": 2, "seed": 3, "hidden": 8})
    want = float((tb.bandit.pi_ref * (~tb.covered)).sum(-1).mean())
    assert res.rows[0]["uncovered_mass"] == pytest.approx(want, abs=1e-12)


def test_fitted_reward_model_is_what_the_learner_optimises(tmp_path):
    # True reward r = (1, 0, 3), only the pair (y1, y2) in the data, π_ref = (¼, ¼, ½). The table BT model fits
    # r_φ = (½, −½, 0) (d = 1 split symmetrically, y3 untouched at 0; row mean 0). REINFORCE with k1 in the reward,
    # β = 1, converges to π_ref·e^{r_φ}/Z; metrics use the true reward, so tv_target measures the distance to
    # π_ref·e^{r}/Z, and reward = Σ π·r with the true r.
    text = """
[experiment]
base = "reinforce"
steps = 300
seeds = 1
optimizer = "rprop"
lr = 0.05
log_every = 300
metrics = ["tv_target", "reward"]
[testbed]
kind = "table"
pi_ref = [[0.25, 0.25, 0.5]]
reward = [[1.0, 0.0, 3.0]]
pairs = [[0, 0, 1]]
reward_model = "fit"
reward_model_steps = 2000
[[variant]]
label = "reinforce"
set = { "target.beta" = 1.0 }
"""
    res = run_experiment(load_experiment(write(tmp_path, text)), tmp_path / "out", progress=False)
    ref = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    learned = ref * torch.exp(torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64))
    learned = learned / learned.sum()
    true_target = ref * torch.exp(torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64))
    true_target = true_target / true_target.sum()
    final = res.rows[-1]
    assert final["step"] == 300
    assert final["tv_target"] == pytest.approx(float(0.5 * (learned - true_target).abs().sum()), abs=3e-3)
    assert final["reward"] == pytest.approx(float((learned * torch.tensor([1.0, 0.0, 3.0])).sum()), abs=1e-2)


def test_variant_testbed_override_is_measured_against_the_base_target_of_the_full_testbed(tmp_path):
    # Variant "partial" removes response 3 from every pair (uncovered = 1); "full" keeps the experiment's testbed.
    # At step 0 (init = reference) π = π_ref, so uncovered_mass is 0 for "full" and mean_x π_ref(x, y3) for
    # "partial", and tv_base is TV(π_ref, DPO's Boltzmann target on the *full* testbed) for both — the base
    # target does not move with the variant's coverage. Experiment-level `set` reaches every variant.
    text = """
[experiment]
base = "dpo"
set = { "target.beta" = 0.5 }
steps = 1
seeds = 1
init = "reference"
metrics = ["uncovered_mass", "tv_base"]
[testbed]
kind = "random"
prompts = 2
responses = 3
seed = 7
[[variant]]
label = "full"
[[variant]]
label = "partial"
testbed = { uncovered = 1 }
"""
    ex = load_experiment(write(tmp_path, text))
    assert [udrra.load(v.algorithm, v.overrides).beta for v in ex.variants] == [0.5, 0.5]
    res = run_experiment(ex, tmp_path / "out", progress=False)
    b = Bandit.random(2, 3, seed=7)
    target = udrra.load("dpo", {"target.beta": 0.5}).target_distribution(b).double()
    tv0 = float((0.5 * (b.pi_ref - target).abs().sum(-1)).mean())
    first = {r["variant"]: r for r in res.rows if r["step"] == 0}
    assert first["full"]["uncovered_mass"] == 0.0
    assert first["partial"]["uncovered_mass"] == pytest.approx(float(b.pi_ref[:, 2].mean()), abs=1e-12)
    assert first["full"]["tv_base"] == pytest.approx(tv0, abs=1e-12)
    assert first["partial"]["tv_base"] == pytest.approx(tv0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# The shipped example and the CLI
# ---------------------------------------------------------------------------------------------------------------
def test_kl_placement_example_loads_and_runs_short(tmp_path):
    ex = load_experiment(REPO / "experiments" / "kl_placement.toml")
    assert [v.label for v in ex.variants] == ["k1 in reward", "k3 in loss", "k1 in loss"]
    assert len(ex.claims) == 4 and ex.steps == 1500 and ex.seeds == 3
    res = run_experiment(ex, tmp_path / "out", progress=False, steps=5, seeds=2)
    # log_every = 10: 0-based step 0 (0 % 10 == 0) and 4 (the last) ⇒ recorded steps 1, 5, plus step 0:
    # 3 rows × 2 seeds × 3 variants.
    assert len(res.rows) == 18
    assert sorted({r["step"] for r in res.rows}) == [0, 1, 5]
    for m in ex.metrics:
        assert (tmp_path / "out" / f"{m}.png").read_bytes()[:8] == PNG_MAGIC
    assert len(res.claims) == 4 and all(isinstance(c["holds"], bool) for c in res.claims)


def test_cli_ablate_runs_and_overrides_steps_and_seeds(tmp_path, capsys):
    p = write(tmp_path, XU_TABLE)
    out = tmp_path / "cli_out"
    rc = main(["ablate", str(p), "--output-dir", str(out), "--steps", "2", "--seeds", "2", "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("xu_table1: 2 variants × 2 seeds")  # the seeds run, not the file's 1
    # two replica seeds (exact gradients, uniform start): zero-width intervals at the one difference
    p3 = xu_adam_trajectory(2)[-1][2]
    d = p3 - 0.5
    assert (f"claim DOES NOT hold: y3 ends with most of the mass (DPO uncovered_mass − 0.5 = {d:+.3g}, 95% CI "
            f"[{d:+.3g}, {d:+.3g}])") in stdout
    assert "claim holds: y3 loses mass (DPO uncovered_mass final − initial = " in stdout
    assert "claim not resolved at 2 seeds: DPO beats its twin" in stdout
    # steps 2, log_every 1 ⇒ rows at 0, 1, 2 ⇒ 2 variants × 2 seeds × 3 rows
    assert len(read_csv(out / "metrics.csv")) == 12
    s = read_csv(out / "summary.csv")[0]
    assert float(s["uncovered_mass_final"]) == pytest.approx(p3, abs=1e-12)


def test_cli_output_dir_takes_one_file(tmp_path, capsys):
    p = write(tmp_path, XU_TABLE)
    rc = main(["ablate", str(p), str(p), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--output-dir takes one experiment file" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# Errors: one ConfigError naming the key and listing what is valid, before anything runs
# ---------------------------------------------------------------------------------------------------------------
SMALL = """
[experiment]
base = "dpo"
steps = 2
seeds = 1
metrics = ["kl_ref", "max_prob"]
{exp}
[testbed]
kind = "{kind}"
prompts = 2
responses = 3
{tb}
[[variant]]
label = "A"
{var}
{tail}
"""


def small(exp="", kind="random", tb="", var="", tail=""):
    return SMALL.format(exp=exp, kind=kind, tb=tb, var=var, tail=tail)


CLAIM = '[[claim]]\ntext = "t"\nvariant = "{v}"\nmetric = "{m}"\nop = "{op}"\n{rest}\n'

BAD = [
    (small(exp="stepz = 3"), r"\[experiment\]: unknown key\(s\) \['stepz'\]; valid: .*\bsteps\b"),
    (small(exp='metrics_ = 1'), r"unknown key\(s\) \['metrics_'\]"),
    (small().replace('metrics = ["kl_ref", "max_prob"]', 'metrics = ["kl"]'),
     r"unknown metric 'kl'; valid: tv_target, tv_base, kl_ref, reward, uncovered_mass, max_uncovered, max_prob"),
    (small(kind="grid"), r"\[testbed\]: unknown kind 'grid'; valid: random, table, xu_synthetic"),
    (small(kind="table").replace("prompts = 2\nresponses = 3\n", 'pi_ref = [[0.5, 0.5]]\nreward = [[1.0, 0.0]]\n')
     + "", None),  # valid control case, see test below
    (small(tb="pairz = 1"), r"unknown key\(s\) \['pairz'\] for kind 'random'; valid: .*coverage"),
    (small(tb='policy = "cnn"'), r"unknown policy 'cnn'; valid: table, mlp"),
    (small(tb='reward_model = "learned"'), r"reward_model must be 'true' or 'fit', got 'learned'"),
    (small(exp='mode = "online"'), r"mode must be 'exact' or 'sampled', got 'online'"),
    (small(exp='optimizer = "lbfgs"'), r"optimizer must be one of \['rprop', 'adam', 'sgd'\], got 'lbfgs'"),
    (small(exp='init = "zeros"'), r"init must be one of reference, uniform, random.*, got 'zeros'"),
    (small().replace("steps = 2", "steps = 0"), r"steps must be a positive integer, got 0"),
    (small().replace('base = "dpo"\n', ""), r"missing 'base'"),
    (small(tail="[extra]\nx = 1"), r"unknown table\(s\) \['extra'\]; valid: experiment, testbed, variant, claim"),
    (small(var='set = { "target.beta" = -1.0 }'), r"variant 'A'.*beta = -1\.0 must be > 0"),
    (small(var='set = { "reference.kind" = "bogus" }'),
     r"variant 'A'.*\[reference\] kind 'bogus' is unknown; valid kinds"),
    (small(var='algorithm = "dop"'), r"variant 'A'.*unknown algorithm 'dop'; catalog: .*dpo"),
    (small(var='colour = "red"'), r"\[\[variant\]\] #1: unknown key\(s\) \['colour'\]; valid: algorithm, .*label, set"),
    (small(tail='[[variant]]\nlabel = "A"'), r"variant labels must be unique, got \['A', 'A'\]"),
    (small(tail=CLAIM.format(v="B", m="kl_ref", op=">", rest="value = 1")),
     r"\[\[claim\]\] #1: variant 'B' is not one of \['A'\]"),
    (small(tail=CLAIM.format(v="A", m="reward", op=">", rest="value = 1")),
     r"metric 'reward' is not among the experiment's metrics \['kl_ref', 'max_prob'\]"),
    (small(tail=CLAIM.format(v="A", m="kl_ref", op="=>", rest="value = 1")),
     r"op must be one of \['>', '<', '>=', '<='\], got '=>'"),
    (small(tail=CLAIM.format(v="A", m="kl_ref", op=">", rest='value = 1\nthan = "initial"')),
     r"give exactly one of value"),
    (small(tail=CLAIM.format(v="A", m="kl_ref", op=">", rest='than = "final"')),
     r"than must be 'initial' or one of \['A'\], got 'final'"),
]


@pytest.mark.parametrize("text,pattern", [b for b in BAD if b[1] is not None])
def test_bad_experiment_files_raise_one_config_error(tmp_path, text, pattern):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern):
        load_experiment(p)


def test_the_error_fixtures_control_case_is_valid(tmp_path):
    # The template itself (and its table-testbed variant) must load, so each BAD case fails for its own reason.
    ex = load_experiment(write(tmp_path, small()))
    assert [v.label for v in ex.variants] == ["A"] and ex.metrics == ["kl_ref", "max_prob"]
    ok = [b for b in BAD if b[1] is None][0][0]
    assert load_experiment(write(tmp_path, ok, "ok.toml")).testbed["kind"] == "table"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_experiment(write(tmp_path, "[experiment\nbase = "))


@pytest.mark.parametrize("text,needle", [
    (small(exp="stepz = 3"), "unknown key(s) ['stepz']"),
    (small(tail=CLAIM.format(v="B", m="kl_ref", op=">", rest="value = 1")), "variant 'B' is not one of ['A']"),
    # a testbed that cannot be built is only found when the run starts — still exit 2 and nothing written
    (small(kind="table").replace("prompts = 2\nresponses = 3\n",
                                 'pi_ref = [[0.5, 0.5]]\nreward = [[1.0, 0.0]]\npairs = [[0, 0, 2]]\n'),
     "out of range"),
])
def test_cli_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, text, needle):
    out = tmp_path / "out"
    rc = main(["ablate", str(write(tmp_path, text)), "--output-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("udrra: error: ") and needle in err
    assert not out.exists()


@pytest.mark.parametrize("line", ['lr = "fast"', 'epsilon = "x"', 'init_scale = "big"'])
def test_non_numeric_float_settings_are_config_errors(tmp_path, line):
    with pytest.raises(ConfigError, match=line.split(" ")[0]):
        load_experiment(write(tmp_path, small(exp=line)))


@pytest.mark.parametrize("old,new,needle", [("steps = 2", "steps = true", "steps must be a positive integer"),
                                             ('metrics = ["kl_ref", "max_prob"]', 'metrics = "kl_ref"',
                                              "metrics must be a list")])
def test_booleans_and_strings_where_lists_or_counts_belong_are_config_errors(tmp_path, old, new, needle):
    text = small()
    assert old in text
    with pytest.raises(ConfigError, match=needle):
        load_experiment(write(tmp_path, text.replace(old, new)))


# ---------------------------------------------------------------------------------------------------------------
# The sequence testbed: [testbed] kind = "sequence" (udrra.SequenceBandit), metrics over whole responses
# ---------------------------------------------------------------------------------------------------------------
SEQ = """
[experiment]
base = "grpo"
set = {{ "target.beta" = 0.5 }}
mode = "{mode}"
steps = {steps}
seeds = {seeds}
lr = 0.05
batch_size = 32
log_every = 4
metrics = ["tv_target", "tv_base", "tv_limit", "kl_ref", "reward", "max_prob", "loss", "mean_length"]
{exp}
[testbed]
kind = "sequence"
prompts = 2
vocab = 3
max_len = 3
{tb}
[[variant]]
label = "grpo"
[[variant]]
label = "ppo"
algorithm = "ppo"
set = {{ "reward.lam" = 0.0 }}
{tail}
"""


def seq(mode="sampled", steps=10, seeds=2, exp="", tb="", tail=""):
    return SEQ.format(mode=mode, steps=steps, seeds=seeds, exp=exp, tb=tb, tail=tail)


@pytest.mark.parametrize("name,overrides,exact,steps", [
    ("grpo", {"target.beta": 0.5}, False, 9),
    ("ppo", {"reward.lam": 0.9}, False, 9),                          # a critic, PPO epochs, whitening
    ("dpo_iter", {"reference.rounds": 2, "reference.every": 5}, True, 10),  # pairs, reference resets
])
def test_sequence_runs_follow_verify_train_exactly(name, overrides, exact, steps):
    # ablate trains through the producer and loop of udrra.verify.train on a SequenceBandit (which takes no metrics
    # callback): with the same settings the trajectory, and so the final policy, must be the same
    from udrra.ablate import _sequence_init_logits, _train_sequence_logged
    algo = udrra.load(name, overrides)
    sb = udrra.SequenceBandit.random(2, 3, 3, seed=1)

    class Ex:                                    # the init helper reads only these two fields of an Experiment
        init, init_scale = "random", 0.3
    start = _sequence_init_logits(Ex, sb, seed=4)
    seen = []
    hist = _train_sequence_logged(algo, sb, exact=exact, steps=steps, seed=3, lr=0.05, batch_size=16, start=start,
                                  optimizer="adam", log_every=4, metrics=lambda pr: seen.append(pr) or {})
    ref, taken, ref_hist = train(algo, sb, exact=exact, steps=steps, seed=3, lr=0.05, batch_size=16,
                                 init_logits=start - sb.log_ref_logits, optimizer="adam", lr_decay=False,
                                 average=False, early_stop=False, log_every=4)
    assert torch.allclose(seen[-1], ref, atol=1e-12, rtol=0)
    assert [h["step"] for h in hist] == [h["step"] for h in ref_hist]
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref_hist], abs=1e-12)


def test_sequence_experiment_metrics_targets_and_report(tmp_path):
    from udrra.sequence import sequence_target
    ex = load_experiment(write(tmp_path, seq(tb='reward_center = "length"')))
    res = run_experiment(ex, tmp_path / "out", progress=False)
    sb = build_testbed(ex.testbed).bandit
    assert isinstance(sb, udrra.SequenceBandit) and sb.shape == (2, 15)
    rows = res.rows
    # seeds one by one: a step-0 row and the logged steps 1, 5, 9, 10 per seed and variant
    assert [r["step"] for r in rows if r["variant"] == "grpo" and r["seed"] == 1] == [0, 1, 5, 9, 10]
    first = [r for r in rows if r["step"] == 0 and r["variant"] == "grpo"][0]
    grpo_t = sequence_target(udrra.load("grpo", {"target.beta": 0.5}), sb)
    ppo_t = sequence_target(udrra.load("ppo", {"target.beta": 0.5, "reward.lam": 0.0}), sb)
    ref = sb.pi_ref_seq
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-14)
    assert first["mean_length"] == pytest.approx(float((ref * sb.lengths).sum(-1).mean()), abs=1e-12)
    assert first["reward"] == pytest.approx(float((ref * sb.reward).sum(-1).mean()), abs=1e-12)
    assert first["tv_target"] == pytest.approx(float(0.5 * (ref - grpo_t).abs().sum(-1).mean()), abs=1e-12)
    assert first["tv_limit"] == first["tv_target"] and math.isnan(first["loss"])
    ppo0 = [r for r in rows if r["step"] == 0 and r["variant"] == "ppo"][0]
    assert ppo0["tv_target"] == pytest.approx(float(0.5 * (ref - ppo_t).abs().sum(-1).mean()), abs=1e-12)
    assert ppo0["tv_base"] == pytest.approx(first["tv_target"], abs=1e-12)     # base = grpo's target
    # reward_center = "length": under π_ref every length class has mean reward 0
    for k in sb.lengths.unique():
        m = sb.lengths == k
        assert torch.allclose((ref[:, m] * sb.reward[:, m]).sum(-1), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    by = {s["variant"]: s for s in res.summary}
    assert by["grpo"]["mean_length_target"] == pytest.approx(float((grpo_t * sb.lengths).sum(-1).mean()))
    assert by["ppo"]["mean_length_base_target"] == by["grpo"]["mean_length_target"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Response length" in report and "N = 15 responses and 7 states per prompt" in report
    assert (tmp_path / "out" / "mean_length.png").exists()


def test_sequence_seeds_differ_and_rerun_identically(tmp_path):
    ex = load_experiment(write(tmp_path, seq()))
    a = run_experiment(ex, tmp_path / "a", progress=False).rows
    b = run_experiment(ex, tmp_path / "b", progress=False).rows
    assert [{k: v for k, v in r.items() if v == v} for r in a] == [{k: v for k, v in r.items() if v == v} for r in b]
    last = {r["seed"]: r["tv_target"] for r in a if r["variant"] == "grpo" and r["step"] == 10}
    assert last[0] != last[1]


@pytest.mark.parametrize("text,pattern", [
    (small(exp='metrics = ["kl_ref", "mean_length"]').replace('metrics = ["kl_ref", "max_prob"]\n', ""),
     r"\[experiment\] metrics: metric 'mean_length' needs \[testbed\] kind = \"sequence\" .*valid for 'random': "
     r"tv_target, "),
    (seq(tb="responses = 4"), r"unknown key\(s\) \['responses'\] for kind 'sequence'; valid: .*max_len.*vocab"),
    (seq(tb='reward_mode = "binary"'), r"\[testbed\]: unknown reward_mode 'binary'; valid: response, token, length"),
    (seq(tb='reward_center = "mean"'), r"\[testbed\]: unknown reward_center 'mean'; valid: none, length"),
    (seq(tb="length_coef = \"long\""), r"length_coef must be a number, got 'long'"),
    (seq().replace("vocab = 3", "vocab = 1"), r"vocab must be >= 2, got 1"),
    (seq().replace("vocab = 3", "vocab = 3.5"), r"vocab must be an integer, got 3.5"),
    (seq().replace("max_len = 3", "max_len = 14"), r"gives 32767 responses per prompt, more than the 4096"),
    (seq(tail='[[variant]]\nlabel = "C"\ntestbed = { kind = "random" }'),
     r"variant 'C': testbed kind 'random' differs from the experiment's 'sequence'"),
    (seq(tail='[[variant]]\nlabel = "C"\ntestbed = { reward_mode = "tokens" }'),
     r"variant 'C' testbed: unknown reward_mode 'tokens'"),
])
def test_bad_sequence_experiments_raise_one_config_error(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        load_experiment(write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_sequence_variant_testbed_override_measures_against_the_experiments_base_target(tmp_path):
    from udrra.sequence import sequence_target
    text = seq(steps=4, seeds=1, tail='[[variant]]\nlabel = "tilted"\ntestbed = { length_coef = 0.5 }')
    ex = load_experiment(write(tmp_path, text))
    res = run_experiment(ex, tmp_path / "o", progress=False)
    home = build_testbed(ex.testbed).bandit
    tilted = build_testbed({**ex.testbed, "length_coef": 0.5}).bandit
    base = sequence_target(udrra.load("grpo", {"target.beta": 0.5}), home)
    r0 = [r for r in res.rows if r["variant"] == "tilted" and r["step"] == 0][0]
    assert r0["tv_base"] == pytest.approx(float(0.5 * (tilted.pi_ref_seq - base).abs().sum(-1).mean()), abs=1e-12)
    assert r0["reward"] == pytest.approx(float((tilted.pi_ref_seq * tilted.reward).sum(-1).mean()), abs=1e-12)
