"""Benchmark: `udrra verify --all` (exact population loss, default bandit) on this machine.

Run: python -m pytest benchmarks/test_verify_all.py --benchmark-only
Goal (issue 2): the whole catalog verifies in under 10 s on 2 CPU cores.
"""
import torch

import udrra
from udrra.cli import DEFAULT_K, DEFAULT_P

torch.set_num_threads(1)   # as `udrra verify` does: tiny tensors, and OpenMP threads stall when the other core is busy


def verify_catalog():
    bandit = udrra.Bandit.random(P=DEFAULT_P, K=DEFAULT_K, seed=0)
    return [udrra.verify(udrra.load(name), bandit) for name in udrra.catalog_names()]


def test_verify_all_exact(benchmark):
    results = benchmark.pedantic(verify_catalog, rounds=3, iterations=1)
    assert all(r.passed for r in results)


def verify_catalog_on_sequences():
    from udrra.cli import DEFAULT_MAX_LEN, DEFAULT_SEQ_P, DEFAULT_VOCAB
    sb = udrra.SequenceBandit.random(P=DEFAULT_SEQ_P, vocab=DEFAULT_VOCAB, max_len=DEFAULT_MAX_LEN, seed=0)
    return [udrra.verify(udrra.load(name), sb) for name in udrra.catalog_names()]


def test_verify_all_sequence_testbed(benchmark):
    """`udrra verify --all --testbed sequence`. Goal (issue 8): under 60 s on 2 CPU cores."""
    results = benchmark.pedantic(verify_catalog_on_sequences, rounds=3, iterations=1)
    assert all(r.passed for r in results)
