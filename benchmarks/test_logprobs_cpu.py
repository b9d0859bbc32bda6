"""CPU benchmark of per-token log-probs, forward + backward with a per-token upstream gradient, fp32.

Run: python -m pytest benchmarks/test_logprobs_cpu.py --benchmark-only   (writes results/logprobs_cpu.md)
Methods: naive (logits → log_softmax → gather), TRL-style selective log-softmax, torch's chunked
linear_cross_entropy, udrra (auto backend) and udrra's chunked path. Time: pytest-benchmark, median of 3 rounds
after 1 warm-up. Memory: peak RSS over the baseline in a fresh process per method (see peak_memory.py).
Goal (issue 3): udrra peak extra memory ≤ 20% of naive at ≤ 1.1× naive's time.
"""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from logprob_methods import METHODS, SHAPES, make_inputs, step  # noqa: E402

NAIVE = {}


def peak_extra_mb(method, shape):
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "peak_memory.py"), method, shape],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", list(METHODS))
def test_logprobs_forward_backward(benchmark, record, method, shape):
    N, H, V = SHAPES[shape]
    X, W, y, up = make_inputs(N, H, V)
    benchmark.pedantic(step, args=(METHODS[method], X, W, y, up), rounds=3, warmup_rounds=1, iterations=1)
    t = benchmark.stats.stats.median
    mem = peak_extra_mb(method, shape)
    if method == "naive":
        NAIVE[shape] = (t, mem["extra_mb"])
    nt, nm = NAIVE.get(shape, (float("nan"), float("nan")))
    record("logprobs_cpu", {"shape (N, H, V)": f"{shape} {SHAPES[shape]}", "method": method,
                            "median time (s)": f"{t:.2f}", "× naive time": f"{t / nt:.2f}",
                            "peak extra RSS (MB)": f"{mem['extra_mb']:.0f}",
                            "% of naive memory": f"{100 * mem['extra_mb'] / nm:.0f}%",
                            "baseline RSS (MB)": f"{mem['baseline_mb']:.0f}"})
    assert mem["extra_mb"] >= 0
