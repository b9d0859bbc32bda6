"""Per-row seeded sampling in :func:`udrra.lm.rollout.generate` (Gumbel-max with one generator per row).

A response must be a function of (its prompt, its seed, the model) only. The expectations here are derived
independently of the sampler: a reference decoder written from the documented algorithm (full forward each step,
no KV cache, no padding), the softmax of the model's own logits, plain argmax decoding, and properties of
``seed_of`` that any correct implementation has.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from lm_fixtures import EOS, PAD, one_torch_thread, tiny_llama  # noqa: E402,F401

from udrra.errors import InputError  # noqa: E402
from udrra.lm.rollout import Sampling, generate, seed_of  # noqa: E402

V_SMALL = 12       # tiny vocabulary: ids 0..11 (PAD=0, EOS=1, BOS=2), every category seen in a few thousand draws


def small_model(scale=12.0, seed=0):
    """A vocab-12 tiny Llama whose logits are spread out (std ≈ 1-2) by scaling the LM head, so the
    temperature, top-k and EOS all matter (the random init alone gives near-uniform next-token distributions)."""
    m = tiny_llama(seed=seed, vocab_size=V_SMALL)
    with torch.no_grad():
        m.lm_head.weight.mul_(scale)
    return m.eval()


def gen(model, prompts, sampling, **kw):
    return generate(model, prompts, [""] * len(prompts), sampling, pad_token_id=PAD, eos_token_id=EOS, **kw)


def row(ro, b):
    """Row b's response tokens (up to and including the first EOS) and its truncation flag."""
    m = ro.response_mask[b] > 0
    return ro.response_ids[b][m].tolist(), bool(ro.truncated[b])


@torch.no_grad()
def next_logits(model, ids):
    """fp32 next-token logits after ``ids`` (one unpadded sequence, full forward)."""
    return model(torch.tensor([ids])).logits[0, -1].float()


@torch.no_grad()
def reference_row(model, prompt, seed, j, sampling):
    """The documented draw of row j for a prompt with seed ``seed``, written from the spec: a generator seeded
    ``seed_of(seed, j)`` draws V float64 uniforms per step, token = argmax(warped logits − log(−log u)), with
    warped = logits / T, then top-k (everything below the k-th largest score → −inf). Stops at EOS."""
    g = torch.Generator().manual_seed(seed_of(seed, j))
    ids, out = list(prompt), []
    for _ in range(sampling.max_new_tokens):
        s = next_logits(model, ids).double() / sampling.temperature
        if sampling.top_k:
            kth = torch.topk(s, sampling.top_k).values[-1]
            s = torch.where(s < kth, torch.full_like(s, -math.inf), s)
        u = torch.rand(s.shape[0], generator=g, dtype=torch.float64)
        u = u.clamp(min=torch.finfo(torch.float64).tiny, max=1 - 2 ** -53)
        t = int(torch.argmax(s - torch.log(-torch.log(u))))
        out.append(t)
        ids.append(t)
        if t == EOS:
            break
    return out, out[-1] != EOS


A = [2, 5, 7]                                 # the prompt followed across batches
LONG1 = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]      # longer prompts: A is left-padded differently next to them
LONG2 = [2, 11, 10, 9, 8, 3]


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, max_new_tokens=12),
                                      Sampling(temperature=0.7, top_k=4, max_new_tokens=12)])
def test_a_response_depends_on_its_prompt_seed_and_row_only(sampling):
    model = small_model()
    seeds = [3, 17, 123456789, 2 ** 62 + 5, 0]
    lone = {s: gen(model, [A], sampling, n=2, seeds=[s]) for s in seeds}
    rows_differ, eos_seen = False, False
    for s in seeds:
        # A in the middle of a batch with longer prompts (other seeds), and last in a batch of a different size
        mid = gen(model, [LONG1, A, LONG2], sampling, n=2, seeds=[s + 1, s, 99])
        last = gen(model, [LONG2, A], sampling, n=2, seeds=[7, s])
        for j in range(2):
            want = reference_row(model, A, s, j, sampling)          # independent: no batch, no cache, no padding
            assert row(lone[s], j) == want
            assert row(mid, 2 + j) == want
            assert row(last, 2 + j) == want
            # the masks too: 1 exactly on the response tokens up to and including the first EOS
            for ro, b in [(lone[s], j), (mid, 2 + j), (last, 2 + j)]:
                k = len(want[0])
                assert ro.response_mask[b].tolist() == [1.0] * k + [0.0] * (ro.response_mask.shape[1] - k)
            eos_seen |= not want[1]
        rows_differ |= row(lone[s], 0) != row(lone[s], 1)
    assert rows_differ, "rows j=0 and j=1 of a prompt must get different noise"
    assert eos_seen, "the test should cover responses that end with EOS before the budget"


def test_same_seeds_reproduce_and_other_seeds_change_the_rollout():
    model = small_model()
    s = Sampling(temperature=1.0, max_new_tokens=8)
    a = gen(model, [A, LONG1], s, n=2, seeds=[5, 6])
    b = gen(model, [A, LONG1], s, n=2, seeds=[5, 6])
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.truncated, b.truncated)
    others = [gen(model, [A, LONG1], s, n=2, seeds=[5 + k, 6 + k]) for k in (1, 2, 3)]
    assert any([row(a, i) for i in range(4)] != [row(o, i) for i in range(4)] for o in others)


def test_without_seeds_the_seeds_come_from_one_draw_of_the_global_rng():
    """seeds=None ≡ seeds = torch.randint(0, 2**62, (G,)) from the global RNG (the documented contract), so
    manual_seed reproduces a run; with seeds given, or greedy, the global RNG is left untouched."""
    model = small_model()
    s = Sampling(temperature=0.9, max_new_tokens=6)
    torch.manual_seed(123)
    implicit = gen(model, [A, LONG2], s, n=3)
    after_implicit = torch.get_rng_state()
    torch.manual_seed(123)
    drawn = torch.randint(0, 2 ** 62, (2,)).tolist()
    after_draw = torch.get_rng_state()
    explicit = gen(model, [A, LONG2], s, n=3, seeds=drawn)
    assert torch.equal(implicit.response_ids, explicit.response_ids)
    assert torch.equal(implicit.response_mask, explicit.response_mask)
    assert torch.equal(after_implicit, after_draw)                         # exactly one randint draw
    assert torch.equal(torch.get_rng_state(), after_draw)                  # given seeds: untouched
    gen(model, [A], s, greedy=True)
    assert torch.equal(torch.get_rng_state(), after_draw)                  # greedy: untouched


def test_first_tokens_follow_the_tempered_softmax():
    """N = 8000 first tokens (distinct row seeds) against softmax(logits / T), T = 0.7, K = 12 categories.

    E[TV] ≤ ½ Σ_k sqrt(p_k / N) ≤ ½ sqrt(K / N) = 0.0194, and TV changes by at most 1/N when one draw changes,
    so by McDiarmid P(TV ≥ 0.05) ≤ exp(−2 N (0.05 − 0.0194)²) ≈ 3e-7 for a correct sampler. The same draws
    compared with the T = 1 distribution (a sampler that ignored the temperature) must fail that bound."""
    model = small_model()
    T, N, G = 0.7, 8000, 8
    logits = next_logits(model, A).double()
    p = torch.softmax(logits / T, -1)
    p_wrong = torch.softmax(logits, -1)
    ro = gen(model, [A] * G, Sampling(temperature=T, max_new_tokens=1), n=N // G,
             seeds=[1000 + i for i in range(G)])
    assert ro.response_ids.shape == (N, 1)
    freq = torch.bincount(ro.response_ids[:, 0], minlength=V_SMALL).double() / N
    bound = 0.05
    assert 0.5 * float((freq - p).abs().sum()) < bound
    assert 0.5 * float((p - p_wrong).abs().sum()) > 2 * bound          # the alternative is far enough ...
    assert 0.5 * float((freq - p_wrong).abs().sum()) > bound           # ... and the test does reject it


def test_top_k_and_top_p_restrict_the_support():
    model = small_model()
    T, N = 0.7, 1200
    p = torch.softmax(next_logits(model, A).double() / T, -1)
    order = torch.argsort(p, descending=True).tolist()
    top2 = set(order[:2])
    assert float(p[order[1]] / (p[order[0]] + p[order[1]])) > 0.05      # both top tokens should show up
    ro = gen(model, [A] * 4, Sampling(temperature=T, top_k=2, max_new_tokens=1), n=N // 4, seeds=[1, 2, 3, 4])
    assert set(ro.response_ids[:, 0].tolist()) == top2
    # nucleus (after the temperature, as transformers orders it): the fewest most likely tokens with mass ≥ top_p
    top_p = 0.8
    cum = torch.cumsum(p[order], 0)
    nucleus = set(order[:int((cum < top_p).sum()) + 1])
    ro = gen(model, [A] * 4, Sampling(temperature=T, top_p=top_p, max_new_tokens=1), n=N // 4, seeds=[5, 6, 7, 8])
    seen = set(ro.response_ids[:, 0].tolist())
    assert seen <= nucleus and len(seen) >= 2


def test_greedy_ignores_seeds_and_is_the_argmax():
    model = small_model(scale=4.0)
    s = Sampling(temperature=0.5, max_new_tokens=6)
    wants = []
    for prompt in (A, LONG2):
        want, ids = [], list(prompt)
        for _ in range(6):
            t = int(torch.argmax(next_logits(model, ids)))
            want.append(t)
            ids.append(t)
            if t == EOS:
                break
        wants.append(want)
    for seeds in (None, [1, 2], [99, 98]):
        ro = gen(model, [A, LONG2], s, greedy=True, seeds=seeds)
        assert [row(ro, 0)[0], row(ro, 1)[0]] == wants


def test_bad_seeds_are_input_errors():
    model = small_model()
    s = Sampling(max_new_tokens=2)
    with pytest.raises(InputError, match=r"expected 2.*got 3"):
        gen(model, [A, LONG1], s, n=2, seeds=[1, 2, 3])
    with pytest.raises(InputError, match=r"expected 1.*got 0"):
        gen(model, [A], s, seeds=[])
    for bad in ([1.5], ["3"], [True], [-1], [2 ** 64], 7):
        with pytest.raises(InputError, match="seeds"):
            gen(model, [A], s, seeds=bad)
    # integer arrays and tensors are accepted and mean the same seeds
    a = gen(model, [A, LONG1], s, seeds=[4, 9])
    for same in (np.array([4, 9]), torch.tensor([4, 9])):
        assert torch.equal(gen(model, [A, LONG1], s, seeds=same).response_ids, a.response_ids)


def test_seed_of_is_a_stable_injective_looking_63_bit_mix():
    keys = [(0,), (1,), (1, 2), (2, 1), (0, 1), (2 ** 32,), (5, 7), (5, 7, 0), (2 ** 64 - 1, 3)]
    vals = [seed_of(*k) for k in keys]
    assert vals == [seed_of(*k) for k in keys]                          # deterministic in-process
    assert len(set(vals)) == len(vals)       # incl. (2**32,) vs (0, 1) and (5, 7) vs (5, 7, 0): no word aliasing
    many = {seed_of(a, b) for a in range(40) for b in range(40)}
    assert len(many) == 1600
    assert all(isinstance(v, int) and 0 <= v < 2 ** 63 for v in vals + sorted(many))
    assert sum(v >= 2 ** 62 for v in many) > 600                        # the top bit is used (≈ half)
    assert seed_of(np.int64(5), np.uint32(7)) == seed_of(5, 7)
    for bad in [(), (-1,), (1, -2), (2 ** 64,), (1.0,), (True,)]:
        with pytest.raises(InputError):
            seed_of(*bad)
    # the same value in a fresh interpreter with a different string-hash salt (never Python's hash)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", "from udrra.lm.rollout import seed_of; print(seed_of(1, 2), "
                          "seed_of(2 ** 64 - 1, 3))"], capture_output=True, text=True, env=env, cwd=root,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(seed_of(1, 2)), str(seed_of(2 ** 64 - 1, 3))]
