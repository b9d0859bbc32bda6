"""The table of the Xu et al. §4.2 sensitivity study, from the stored runs of experiments/xu_sensitivity_*.toml.

    udrra ablate experiments/xu_sensitivity_*.toml      # the runs: results/xu_sensitivity_*/metrics.csv
    python experiments/xu_sensitivity_table.py           # prints the markdown tables (no training)

Every number is read from a run's metrics.csv and judged as `udrra ablate` judges claims (udrra.ablate.judge_claim:
paired per-seed differences, 95 % Student-t interval): for each setting, DPO's and PPO's max_uncovered and
uncovered_mass, initial (mean over seeds) → final (mean ± the 95 % t half-width over seeds), the change
final − initial of each seed and PPO − DPO of each seed with their 95 % intervals and verdicts.
"""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

from scipy.stats import t as student_t

from udrra.ablate import _per_seed, _read_metrics_csv, judge_claim, load_experiment

ROOT = Path(__file__).resolve().parent.parent
# (factor, setting, experiment file stem, DPO variant, PPO variant)
SETTINGS = [
    ("β", "β = 0.1", "xu_sensitivity_beta", "DPO β=0.1", "PPO β=0.1"),
    ("β", "β = 0.5", "xu_sensitivity_beta", "DPO β=0.5", "PPO β=0.5"),
    ("β", "β = 1 (base)", "xu_sensitivity_beta", "DPO β=1.0", "PPO β=1.0"),
    ("β", "β = 2", "xu_sensitivity_beta", "DPO β=2.0", "PPO β=2.0"),
    ("steps", "100 steps", "xu_sensitivity_steps100", "DPO 100 steps", "PPO 100 steps"),
    ("steps", "300 steps", "xu_sensitivity_steps300", "DPO 300 steps", "PPO 300 steps"),
    ("steps", "2000 steps", "xu_sensitivity_steps2000", "DPO 2000 steps", "PPO 2000 steps"),
    ("reward model", "RM 100 steps", "xu_sensitivity_rm", "DPO", "PPO RM 100 steps"),
    ("reward model", "RM 1000 steps (base)", "xu_sensitivity_rm", "DPO", "PPO RM 1000 steps"),
    ("reward model", "RM 5000 steps", "xu_sensitivity_rm", "DPO", "PPO RM 5000 steps"),
    ("reward model", "RM weight decay 0.001", "xu_sensitivity_rm", "DPO", "PPO RM wd 0.001"),
    ("reward model", "RM weight decay 0.01", "xu_sensitivity_rm", "DPO", "PPO RM wd 0.01"),
    ("reward model", "RM weight decay 0.1", "xu_sensitivity_rm", "DPO", "PPO RM wd 0.1"),
    ("reward model", "true reward (oracle)", "xu_sensitivity_rm", "DPO", "PPO true reward"),
    ("mode", "sampled, batch 16", "xu_sensitivity_sampled", "DPO batch 16", "PPO batch 16"),
    ("mode", "sampled, batch 64", "xu_sensitivity_sampled", "DPO batch 64", "PPO batch 64"),
    ("mode", "sampled, batch 256", "xu_sensitivity_sampled", "DPO batch 256", "PPO batch 256"),
    ("π_ref", "init (base)", "xu_sensitivity_reference", "DPO init", "PPO init"),
    ("π_ref", "SFT chosen, 30 steps", "xu_sensitivity_reference", "DPO SFT chosen 30 steps",
     "PPO SFT chosen 30 steps"),
    ("π_ref", "SFT chosen, 300 steps", "xu_sensitivity_reference", "DPO SFT chosen 300 steps",
     "PPO SFT chosen 300 steps"),
    ("π_ref", "SFT pairs, 300 steps", "xu_sensitivity_reference", "DPO SFT pairs 300 steps",
     "PPO SFT pairs 300 steps"),
    ("combined", "β = 0.5, PPO on the true reward", "xu_sensitivity_combined", "DPO β=0.5", "PPO β=0.5 true reward"),
    ("combined", "β = 0.5, PPO on RM wd 0.1", "xu_sensitivity_combined", "DPO β=0.5", "PPO β=0.5 RM wd 0.1"),
]
SHORT = {"holds": "holds", "does not hold": "**does not hold**", "not resolved": "not resolved"}


def fmt(x: float) -> str:
    if x != x:
        return "—"
    return f"{x:.2e}" if 0 < abs(x) < 1e-3 else f"{x:.3f}"


def sfmt(x: float) -> str:
    if x != x:
        return "—"
    return f"{x:+.2e}" if 0 < abs(x) < 1e-3 else f"{x:+.3f}"


def final_ci(values) -> str:
    n = len(values)
    mean = statistics.fmean(values)
    half = float(student_t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return f"{fmt(mean)} ± {fmt(half)}"


def change(per: dict, op: str) -> tuple:
    seeds = sorted(per)
    j = judge_claim([per[s][1] - per[s][0] for s in seeds], op)
    init = statistics.fmean(per[s][0] for s in seeds)
    text = f"{fmt(init)} → {final_ci([per[s][1] for s in seeds])}"
    return text, f"{sfmt(j['diff_mean'])} [{sfmt(j['ci_low'])}, {sfmt(j['ci_high'])}]", SHORT[j["verdict"]]


def table(metric: str, results: Path) -> list:
    cache = {}
    lines = ["| factor | setting | DPO initial → final | DPO final − initial [95% CI] | DPO raises it? | "
             "PPO initial → final | PPO final − initial [95% CI] | PPO does not raise it (≤)? | "
             "PPO − DPO [95% CI] | PPO < DPO? | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for factor, setting, stem, dpo, ppo in SETTINGS:
        out = results / stem
        if not (out / "metrics.csv").is_file():
            lines.append(f"| {factor} | {setting} | not run | | | | | | | | |")
            continue
        if stem not in cache:
            ex = load_experiment(ROOT / "experiments" / f"{stem}.toml")
            cache[stem] = _read_metrics_csv(ex, out / "metrics.csv")
        rows = cache[stem]
        d, p = _per_seed(rows, dpo, metric), _per_seed(rows, ppo, metric)
        d_text, d_ci, d_v = change(d, ">")
        p_text, p_ci, p_v = change(p, "<=")
        seeds = sorted(set(d) & set(p))
        j = judge_claim([p[s][1] - d[s][1] for s in seeds], "<")
        lines.append(f"| {factor} | {setting} | {d_text} | {d_ci} | {d_v} | {p_text} | {p_ci} | {p_v} | "
                     f"{sfmt(j['diff_mean'])} [{sfmt(j['ci_low'])}, {sfmt(j['ci_high'])}] | {SHORT[j['verdict']]} | "
                     f"{len(seeds)} |")
    return lines


def main(argv=None) -> int:
    results = Path(argv[0]) if argv else ROOT / "results"
    for metric, title in (("max_uncovered", "max_uncovered: the largest probability of one response outside a "
                                            "prompt's pairs (max over prompts and responses)"),
                          ("uncovered_mass", "uncovered_mass: the mass outside a prompt's pairs (mean over prompts)")):
        print(f"### {title}\n")
        print("\n".join(table(metric, results)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
