"""Triton fused linear log-prob kernels (``udrra.kernels.triton_logprobs``) against an fp64 torch reference.

The kernels run on CPU tensors through the Triton interpreter, so ``TRITON_INTERPRET=1`` must be set before
triton (and the kernel module) is imported. Every expected value comes from ``_reference``: the materialised
fp64 ``log_softmax((X·Wᵀ + b)/T)`` gathered at the targets, its entropy, and torch.autograd gradients of
``Σ_t g_t·logp_t + e_t·entropy_t`` with random per-row upstream gradients ``g`` and ``e``.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from udrra.kernels import triton_logprobs as K  # noqa: E402

IGNORE = -100
# small tiles keep the interpreter fast; H = 24/40 and V = 37/130/200 are not multiples of them
TILES = dict(block_n=16, block_v=32, block_h=16)


# ----------------------------------------------------------------------------------------------------------
# independent fp64 reference


def _reference(x, w, y, b, temperature, g, e, ignore_index=IGNORE):
    """fp64 logp, lse, entropy and autograd gradients (dX, dW, db) of Σ g·logp + e·entropy."""
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if b is not None else None
    z = xd @ wd.t()
    if bd is not None:
        z = z + bd
    z = z / temperature
    logz = torch.log_softmax(z, dim=-1)
    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    logp = torch.where(valid, logz.gather(1, safe_y[:, None])[:, 0], torch.zeros((), dtype=torch.float64))
    ent = torch.where(valid, -(logz.exp() * logz).sum(-1), torch.zeros((), dtype=torch.float64))
    lse = torch.logsumexp(z, dim=-1)
    loss = (g.double() * logp).sum()
    if e is not None:
        loss = loss + (e.double() * ent).sum()
    leaves = [xd, wd] + ([bd] if bd is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    dx, dw = grads[0], grads[1]
    db = grads[2] if bd is not None else None
    return dict(logp=logp.detach(), lse=lse.detach(), entropy=ent.detach(), z=z.detach(), dx=dx, dw=dw, db=db)


def _draw(n, v, h, dtype, *, bias, ignore_rows=(), x_scale=1.0, bias_shift=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=gen) * x_scale).to(dtype)
    w = (torch.randn(v, h, generator=gen) / h ** 0.5).to(dtype)
    b = (torch.randn(v, generator=gen) + bias_shift).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    for r in ignore_rows:
        y[r] = IGNORE
    g = torch.randn(n, generator=gen)
    e = torch.randn(n, generator=gen)
    return x, w, b, y, g, e


def _max_err(actual, expected):
    return (actual.double() - expected).abs().max().item()


def _assert_close(actual, expected, *, rtol, atol, what):
    """|actual − expected| ≤ atol + rtol·|expected| elementwise, with the worst element in the message."""
    diff = (actual.double() - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = diff > bound
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, max |err| {diff.max().item():.3e} "
                           f"(atol {atol:.1e}, rtol {rtol:.1e})")


def _assert_grad_close(actual, expected, *, tol, what):
    """Gradient check relative to the gradient's scale: |err| ≤ tol·(max|expected| + 1e-12) elementwise."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() + 1e-12
    _assert_close(actual, expected, rtol=0.0, atol=tol * scale, what=what)


def _run(x, w, b, y, g, e, temperature, **kw):
    fkw = {k: kw[k] for k in ("block_n", "block_v", "block_h", "num_splits") if k in kw}
    bkw = {k: kw[k] for k in ("block_n", "block_v", "block_h", "chunk_rows") if k in kw}
    logp, lse, ent = K.forward(x, w, y, b, temperature=temperature, ignore_index=IGNORE, return_entropy=True,
                               **fkw)
    dx, dw, db = K.backward(x, w, y, b, lse, ent, g, e, temperature=temperature, ignore_index=IGNORE, **bkw)
    return logp, lse, ent, dx, dw, db


# (N, V, H, bias, temperature, ignored rows, extra kernel kwargs)
CASES = [
    pytest.param(1, 37, 24, True, 0.7, (), {}, id="N1-V37-H24-bias-T0.7"),
    pytest.param(40, 130, 40, False, 1.0, (0, 7, 39), {}, id="N40-V130-H40-nobias-T1-ignored"),
    pytest.param(64, 200, 64, True, 1.3, (5,), dict(num_splits=3, chunk_rows=24),
                 id="N64-V200-H64-bias-T1.3-3splits-chunk24"),
    pytest.param(23, 37, 16, True, 2.0, (22,), dict(num_splits=2, chunk_rows=7), id="N23-V37-H16-2splits-chunk7"),
]


# ----------------------------------------------------------------------------------------------------------


def test_triton_available_reports_true_when_triton_imports():
    assert K.triton_available() is True


@pytest.mark.parametrize("n,v,h,bias,temperature,ignored,extra", CASES)
def test_fp32_logp_lse_entropy_and_grads_match_fp64_reference(n, v, h, bias, temperature, ignored, extra):
    x, w, b, y, g, e = _draw(n, v, h, torch.float32, bias=bias, ignore_rows=ignored, seed=n * 1000 + v)
    ref = _reference(x, w, y, b, temperature, g, e)
    logp, lse, ent, dx, dw, db = _run(x, w, b, y, g, e, temperature, **TILES, **extra)

    assert logp.dtype == lse.dtype == ent.dtype == torch.float32 and logp.shape == (n,)
    _assert_close(logp, ref["logp"], rtol=1e-5, atol=1e-5, what="logp")
    _assert_close(lse, ref["lse"], rtol=1e-5, atol=1e-5, what="lse")
    _assert_close(ent, ref["entropy"], rtol=1e-5, atol=1e-5, what="entropy")
    assert dx.dtype == dw.dtype == torch.float32
    _assert_grad_close(dx, ref["dx"], tol=1e-4, what="d_hidden")
    _assert_grad_close(dw, ref["dw"], tol=1e-4, what="d_weight")
    if bias:
        assert db.dtype == torch.float32
        _assert_grad_close(db, ref["db"], tol=1e-4, what="d_bias")
    else:
        assert db is None


@pytest.mark.parametrize("n,v,h,bias,temperature,ignored,extra", CASES[1:3])
def test_bf16_logp_entropy_and_grads_match_fp64_reference_within_1e_2(n, v, h, bias, temperature, ignored, extra):
    x, w, b, y, g, e = _draw(n, v, h, torch.bfloat16, bias=bias, ignore_rows=ignored, seed=7 + n)
    ref = _reference(x, w, y, b, temperature, g, e)  # fp64 on the same (bf16-rounded) values
    logp, lse, ent, dx, dw, db = _run(x, w, b, y, g, e, temperature, **TILES, **extra)

    assert logp.dtype == torch.float32  # log-probs are fp32 whatever the input dtype
    _assert_close(logp, ref["logp"], rtol=1e-2, atol=1e-2, what="logp")
    _assert_close(lse, ref["lse"], rtol=1e-2, atol=1e-2, what="lse")
    _assert_close(ent, ref["entropy"], rtol=1e-2, atol=1e-2, what="entropy")
    assert dx.dtype == dw.dtype == torch.bfloat16
    _assert_grad_close(dx, ref["dx"], tol=1e-2, what="d_hidden")
    _assert_grad_close(dw, ref["dw"], tol=1e-2, what="d_weight")
    if bias:
        assert db.dtype == torch.bfloat16
        _assert_grad_close(db, ref["db"], tol=1e-2, what="d_bias")


def test_fp16_inputs_match_fp64_reference_within_1e_2():
    x, w, b, y, g, e = _draw(20, 37, 24, torch.float16, bias=True, ignore_rows=(3,), seed=11)
    ref = _reference(x, w, y, b, 0.8, g, e)
    logp, lse, ent, dx, dw, db = _run(x, w, b, y, g, e, 0.8, **TILES)
    _assert_close(logp, ref["logp"], rtol=1e-2, atol=1e-2, what="logp")
    _assert_close(ent, ref["entropy"], rtol=1e-2, atol=1e-2, what="entropy")
    assert dx.dtype == dw.dtype == db.dtype == torch.float16
    _assert_grad_close(dx, ref["dx"], tol=1e-2, what="d_hidden")
    _assert_grad_close(dw, ref["dw"], tol=1e-2, what="d_weight")
    _assert_grad_close(db, ref["db"], tol=1e-2, what="d_bias")


@pytest.mark.parametrize("kind", ["scaled-hidden-T0.5", "bias-shift-1e4"])
def test_large_logits_about_1e4_stay_finite_and_match_fp64_reference(kind):
    # |z| ~ 1e4: exp(z) overflows fp32, so only a correct online max keeps the sums finite. The fp32 logits
    # themselves carry ~1e-7·|z| rounding, so errors are judged relative to the logit scale.
    if kind == "scaled-hidden-T0.5":
        x, w, b, y, g, e = _draw(24, 130, 40, torch.float32, bias=False, ignore_rows=(2,), x_scale=1200.0, seed=3)
        temperature = 0.5
    else:
        x, w, b, y, g, e = _draw(24, 130, 40, torch.float32, bias=True, ignore_rows=(2,), bias_shift=1e4, seed=4)
        temperature = 1.0
    ref = _reference(x, w, y, b, temperature, g, e)
    zmax = ref["z"].abs().max().item()
    assert 3e3 < zmax < 1e5  # the case really has logits of order 1e4
    logp, lse, ent, dx, dw, db = _run(x, w, b, y, g, e, temperature, **TILES, num_splits=2, chunk_rows=16)

    tol = 1e-5 * zmax  # relative 1e-5 of the logit scale
    _assert_close(logp, ref["logp"], rtol=0.0, atol=tol, what="logp")
    _assert_close(lse, ref["lse"], rtol=0.0, atol=tol, what="lse")
    _assert_close(ent, ref["entropy"], rtol=0.0, atol=tol, what="entropy")
    _assert_grad_close(dx, ref["dx"], tol=1e-3, what="d_hidden")
    _assert_grad_close(dw, ref["dw"], tol=1e-3, what="d_weight")
    if b is not None:
        _assert_grad_close(db, ref["db"], tol=1e-3, what="d_bias")


def test_ignored_rows_give_exact_zero_logp_entropy_and_hidden_grad():
    n, v, h = 12, 37, 24
    ignored = (0, 4, 5, 11)
    x, w, b, y, g, e = _draw(n, v, h, torch.float32, bias=True, ignore_rows=ignored, seed=5)
    ref = _reference(x, w, y, b, 1.0, g, e)
    logp, lse, ent, dx, dw, db = _run(x, w, b, y, g, e, 1.0, **TILES)
    rows = list(ignored)
    assert torch.equal(logp[rows], torch.zeros(len(rows)))
    assert torch.equal(ent[rows], torch.zeros(len(rows)))
    assert torch.equal(dx[rows], torch.zeros(len(rows), h))
    # the kept rows alone determine dW and db (reference autograd already excludes the ignored ones)
    _assert_grad_close(dw, ref["dw"], tol=1e-4, what="d_weight")
    _assert_grad_close(db, ref["db"], tol=1e-4, what="d_bias")
    kept = [r for r in range(n) if r not in ignored]
    _assert_close(logp[kept], ref["logp"][kept], rtol=1e-5, atol=1e-5, what="logp (kept rows)")


def test_all_rows_ignored_gives_zero_outputs_and_zero_grads():
    n, v, h = 5, 37, 24
    x, w, b, y, g, e = _draw(n, v, h, torch.float32, bias=True, ignore_rows=range(n), seed=6)
    ref = _reference(x, w, y, b, 1.0, g, e)
    logp, lse, ent, dx, dw, db = _run(x, w, b, y, g, e, 1.0, **TILES)
    assert torch.equal(logp, torch.zeros(n)) and torch.equal(ent, torch.zeros(n))
    _assert_close(lse, ref["lse"], rtol=1e-5, atol=1e-5, what="lse")  # lse is still reported for every row
    assert torch.equal(dx, torch.zeros(n, h))
    assert torch.equal(dw, torch.zeros(v, h))
    assert torch.equal(db, torch.zeros(v))


def test_grad_entropy_none_matches_logp_only_reference_and_forward_without_entropy():
    n, v, h = 30, 130, 40
    x, w, b, y, g, _ = _draw(n, v, h, torch.float32, bias=True, ignore_rows=(1,), seed=8)
    ref = _reference(x, w, y, b, 0.9, g, None)
    logp, lse, ent = K.forward(x, w, y, b, temperature=0.9, return_entropy=False, **TILES)
    assert ent is None
    _assert_close(logp, ref["logp"], rtol=1e-5, atol=1e-5, what="logp")
    dx, dw, db = K.backward(x, w, y, b, lse, None, g, None, temperature=0.9, ignore_index=IGNORE, **TILES)
    _assert_grad_close(dx, ref["dx"], tol=1e-4, what="d_hidden")
    _assert_grad_close(dw, ref["dw"], tol=1e-4, what="d_weight")
    _assert_grad_close(db, ref["db"], tol=1e-4, what="d_bias")


def test_non_contiguous_hidden_and_weight_views_match_fp64_reference():
    # strided views (every other hidden feature; a transposed weight) exercise the stride arguments
    gen = torch.Generator().manual_seed(9)
    x_big = torch.randn(18, 48, generator=gen)
    x = x_big[:, ::2]  # (18, 24), stride (48, 2)
    w = (torch.randn(24, 37, generator=gen) / 24 ** 0.5).t()  # (37, 24), stride (1, 37)
    y = torch.randint(0, 37, (18,), generator=gen)
    g, e = torch.randn(18, generator=gen), torch.randn(18, generator=gen)
    assert not x.is_contiguous() and not w.is_contiguous()
    ref = _reference(x, w, y, None, 1.1, g, e)
    logp, lse, ent, dx, dw, db = _run(x, w, None, y, g, e, 1.1, **TILES)
    _assert_close(logp, ref["logp"], rtol=1e-5, atol=1e-5, what="logp")
    _assert_close(ent, ref["entropy"], rtol=1e-5, atol=1e-5, what="entropy")
    _assert_grad_close(dx, ref["dx"], tol=1e-4, what="d_hidden")
    _assert_grad_close(dw, ref["dw"], tol=1e-4, what="d_weight")


def test_default_tile_sizes_match_fp64_reference():
    # the GPU defaults (64/128/64) exceed these small shapes: every tile is masked on some side
    x, w, b, y, g, e = _draw(10, 37, 24, torch.float32, bias=True, ignore_rows=(4,), seed=10)
    ref = _reference(x, w, y, b, 1.0, g, e)
    logp, lse, ent, dx, dw, db = _run(x, w, b, y, g, e, 1.0)
    _assert_close(logp, ref["logp"], rtol=1e-5, atol=1e-5, what="logp")
    _assert_close(ent, ref["entropy"], rtol=1e-5, atol=1e-5, what="entropy")
    _assert_grad_close(dx, ref["dx"], tol=1e-4, what="d_hidden")
    _assert_grad_close(dw, ref["dw"], tol=1e-4, what="d_weight")
    _assert_grad_close(db, ref["db"], tol=1e-4, what="d_bias")


def test_empty_batch_returns_empty_outputs_and_zero_weight_grad():
    x = torch.zeros(0, 24)
    w = torch.randn(37, 24)
    y = torch.zeros(0, dtype=torch.int64)
    logp, lse, ent = K.forward(x, w, y, return_entropy=True, **TILES)
    assert logp.shape == lse.shape == ent.shape == (0,)
    dx, dw, db = K.backward(x, w, y, None, lse, ent, torch.zeros(0), torch.zeros(0), temperature=1.0,
                            ignore_index=IGNORE, **TILES)
    assert dx.shape == (0, 24) and torch.equal(dw, torch.zeros(37, 24)) and db is None


# ----------------------------------------------------------------------------------------------------------
# input validation


def _valid_inputs():
    x = torch.randn(4, 24)
    w = torch.randn(37, 24)
    y = torch.tensor([0, 5, IGNORE, 36])
    return x, w, y


@pytest.mark.parametrize("mutate,match", [
    (lambda x, w, y, b: (x[0], w, y, b, 1.0), "hidden must be a 2-D"),
    (lambda x, w, y, b: (x, w[:, :20], y, b, 1.0), "weight must be a 2-D"),
    (lambda x, w, y, b: (x, w.double(), y, b, 1.0), "weight dtype"),
    (lambda x, w, y, b: (x.double(), w.double(), y, b, 1.0), "hidden dtype"),
    (lambda x, w, y, b: (x, w, y[:3], b, 1.0), "targets must be a 1-D"),
    (lambda x, w, y, b: (x, w, y.float(), b, 1.0), "targets dtype"),
    (lambda x, w, y, b: (x, w, y, b[:5], 1.0), "bias must be a 1-D"),
    (lambda x, w, y, b: (x, w, y, b.bfloat16(), 1.0), "bias dtype"),
    (lambda x, w, y, b: (x, w, torch.tensor([0, 5, 37, 1]), b, 1.0), r"target ids must lie in \[0, 37\)"),
    (lambda x, w, y, b: (x, w, torch.tensor([0, -1, 2, 1]), b, 1.0), r"target ids must lie in \[0, 37\)"),
    (lambda x, w, y, b: (x, w, y, b, 0.0), "temperature must be a positive"),
    (lambda x, w, y, b: (x, w, y, b, -2.0), "temperature must be a positive"),
    (lambda x, w, y, b: (x, w, y, b, float("nan")), "temperature must be a positive"),
])
def test_forward_and_backward_reject_bad_inputs_with_value_error(mutate, match):
    x, w, y = _valid_inputs()
    b = torch.randn(37)
    x2, w2, y2, b2, t2 = mutate(x, w, y, b)
    with pytest.raises(ValueError, match=match):
        K.forward(x2, w2, y2, b2, temperature=t2, **TILES)
    lse = torch.zeros(4)
    with pytest.raises(ValueError, match=match):
        K.backward(x2, w2, y2, b2, lse, None, torch.ones(4), None, temperature=t2, ignore_index=IGNORE, **TILES)


def test_bad_tile_sizes_and_backward_arguments_raise_value_error():
    x, w, y = _valid_inputs()
    with pytest.raises(ValueError, match="block_v must be a power of two >= 16"):
        K.forward(x, w, y, block_n=16, block_v=24, block_h=16)
    with pytest.raises(ValueError, match="block_h must be a power of two >= 16"):
        K.forward(x, w, y, block_n=16, block_v=16, block_h=8)
    with pytest.raises(ValueError, match="lse must be a 1-D"):
        K.backward(x, w, y, None, torch.zeros(3), None, torch.ones(4), None, temperature=1.0,
                   ignore_index=IGNORE, **TILES)
    with pytest.raises(ValueError, match="grad_entropy was given but entropy is None"):
        K.backward(x, w, y, None, torch.zeros(4), None, torch.ones(4), torch.ones(4), temperature=1.0,
                   ignore_index=IGNORE, **TILES)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        K.backward(x, w, y, None, torch.zeros(4), None, torch.ones(4), None, temperature=1.0,
                   ignore_index=IGNORE, chunk_rows=0, **TILES)


# ----------------------------------------------------------------------------------------------------------
# masked vocabulary: −inf bias entries (0·log 0 = 0 in the entropy and its gradient)


def _masked_draw(n, v, h, masked, ignore_rows, seed):
    """fp32 inputs with bias = −inf at ``masked``; targets drawn among the finite entries only."""
    x, w, b, _, g, e = _draw(n, v, h, torch.float32, bias=True, seed=seed)
    b[list(masked)] = float("-inf")
    finite = torch.isfinite(b).nonzero()[:, 0]
    gen = torch.Generator().manual_seed(seed + 1)
    y = finite[torch.randint(0, finite.numel(), (n,), generator=gen)]
    for r in ignore_rows:
        y[r] = IGNORE
    return x, w, b, y, g, e


def _masked_reference(x, w, y, b, temperature, g, e):
    """``_reference`` on the finite sub-vocabulary alone (the −inf columns never enter it): log-probs and entropy
    of the softmax over the finite logits and their autograd gradients; dW rows and db entries of the masked
    columns are 0."""
    v = w.shape[0]
    idx = torch.isfinite(b).nonzero()[:, 0]
    remap = torch.full((v,), -1, dtype=torch.int64)
    remap[idx] = torch.arange(idx.numel())
    valid = y != IGNORE
    assert bool((remap[y[valid]] >= 0).all()), "targets must be finite entries"
    ys = torch.where(valid, remap[y.clamp_min(0)], torch.full_like(y, IGNORE))
    ref = _reference(x, w[idx], ys, b[idx], temperature, g, e)
    dw = torch.zeros(v, w.shape[1], dtype=torch.float64)
    dw[idx] = ref["dw"]
    db = torch.zeros(v, dtype=torch.float64)
    db[idx] = ref["db"]
    return dict(ref, dw=dw, db=db)


# with TILES (block_v = 32): V = 130 is tiles [0,32) [32,64) [64,96) [96,128) [128,130)
MASKED_CASES = [
    pytest.param((0, 5, 31, 32, 63, 64, 96, 127, 128, 129), 1, None, id="tile-edges-1split"),
    # vocabulary split 0 (tiles 0 and 1) entirely masked: its partial (m, s, a) is the empty one; plus the first
    # column of split 2 and the last column
    pytest.param(tuple(range(64)) + (128, 129), 3, 16, id="whole-split-masked-3splits-chunk16"),
]


@pytest.mark.parametrize("upstream", ["logp", "entropy", "both"])
@pytest.mark.parametrize("masked,splits,chunk_rows", MASKED_CASES)
def test_masked_vocabulary_kernels_give_finite_entropy_and_grads_matching_finite_subvocab_reference(
        masked, splits, chunk_rows, upstream):
    n, v, h, temperature, ignored = 40, 130, 40, 0.7, (0, 7, 39)
    x, w, b, y, g, e = _masked_draw(n, v, h, masked, ignored, seed=len(masked))
    g_in = g if upstream in ("logp", "both") else None
    # "logp": a zero entropy gradient, as autograd hands the op when only logp is used (the path that gave NaN)
    e_in = e if upstream in ("entropy", "both") else torch.zeros(n)
    ref = _masked_reference(x, w, y, b, temperature, g if g_in is not None else torch.zeros(n), e_in)
    kw = dict(TILES, num_splits=splits) | ({} if chunk_rows is None else dict(chunk_rows=chunk_rows))
    logp, lse, ent, dx, dw, db = _run(x, w, b, y, g_in, e_in, temperature, **kw)

    _assert_close(logp, ref["logp"], rtol=1e-5, atol=1e-5, what="logp")
    _assert_close(lse, ref["lse"], rtol=1e-5, atol=1e-5, what="lse")
    _assert_close(ent, ref["entropy"], rtol=1e-5, atol=1e-5, what="entropy")
    _assert_grad_close(dx, ref["dx"], tol=1e-4, what="d_hidden")
    _assert_grad_close(dw, ref["dw"], tol=1e-4, what="d_weight")
    _assert_grad_close(db, ref["db"], tol=1e-4, what="d_bias")
    m = list(masked)
    assert torch.equal(db[m], torch.zeros(len(m))) and torch.equal(dw[m], torch.zeros(len(m), h))
    rows = list(ignored)
    assert torch.equal(logp[rows], torch.zeros(len(rows))) and torch.equal(ent[rows], torch.zeros(len(rows)))
    assert torch.equal(dx[rows], torch.zeros(len(rows), h))


@pytest.mark.parametrize("upstream", ["logp", "entropy"])
def test_masked_vocabulary_through_linear_logprobs_triton_backend_matches_finite_subvocab_reference(upstream):
    # the public op with its default tiles (block_v = 128): masked columns on both sides of the 128 and 256
    # boundaries; upstream gradient on one output only, the other getting autograd's zero gradient
    from udrra.kernels import linear_logprobs

    n, v, h, temperature, ignored = 20, 300, 24, 1.3, (4, 19)
    masked = (1, 126, 127, 128, 129, 255, 256, 299)
    x, w, b, y, g, e = _masked_draw(n, v, h, masked, ignored, seed=21)
    xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    logp, ent = linear_logprobs(xr, wr, y, bias=br, temperature=temperature, return_entropy=True, backend="triton")
    if upstream == "logp":
        (logp * g).sum().backward()
        ref = _masked_reference(x, w, y, b, temperature, g, torch.zeros(n))
    else:
        (ent * e).sum().backward()
        ref = _masked_reference(x, w, y, b, temperature, torch.zeros(n), e)
    _assert_close(logp, ref["logp"], rtol=1e-5, atol=1e-5, what="logp")
    _assert_close(ent, ref["entropy"], rtol=1e-5, atol=1e-5, what="entropy")
    _assert_grad_close(xr.grad, ref["dx"], tol=1e-4, what="d_hidden")
    _assert_grad_close(wr.grad, ref["dw"], tol=1e-4, what="d_weight")
    _assert_grad_close(br.grad, ref["db"], tol=1e-4, what="d_bias")
    assert torch.equal(br.grad[list(masked)], torch.zeros(len(masked)))
