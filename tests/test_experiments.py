"""Every shipped experiment file loads and runs end to end (shortened) through the public API.

The full runs (minutes on 2 cores) are `udrra ablate experiments/*.toml`; here each file runs with few steps and
one seed so that a broken file or a broken testbed fails CI.
"""
import csv
from pathlib import Path

import pytest

from udrra.ablate import load_experiment, run_experiment

EXPERIMENTS = sorted((Path(__file__).resolve().parent.parent / "experiments").glob("*.toml"))


def test_the_issue_experiments_are_shipped():
    names = {p.stem for p in EXPERIMENTS}
    assert {"component_ablation", "kl_placement", "xu_table1", "xu_synthetic", "azar_bandit", "ppo_factors",
            "iterated_dpo"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_runs_shortened_and_writes_its_outputs(path, tmp_path):
    ex = load_experiment(path)
    steps = 12
    res = run_experiment(ex, tmp_path / ex.name, progress=False, steps=steps, seeds=1)
    rounds = {v.label: 1 for v in ex.variants}
    for v in ex.variants:  # reference resets run `steps` per round
        r = v.overrides.get("reference.rounds")
        if r is not None:
            rounds[v.label] = int(r)
    le = ex.log_every
    per_round = len({s for s in range(steps) if s % le == 0} | {steps - 1})
    with open(tmp_path / ex.name / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for v in ex.variants:
        # one step-0 row plus the logged steps of the last round (earlier rounds log too: all rounds count)
        expected = 1 + per_round * rounds[v.label]
        assert sum(r["variant"] == v.label for r in rows) == expected, v.label
    assert (tmp_path / ex.name / "report.md").read_text().count("|") > 0
    assert all(str(v.label) in (tmp_path / ex.name / "report.md").read_text() for v in ex.variants)
    pngs = list((tmp_path / ex.name).glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert len(res.claims) == len(ex.claims)
