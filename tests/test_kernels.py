"""udrra.kernels.linear_logprobs (CPU paths) against an fp64 materialised log-softmax reference.

Error bounds (relative to the largest reference magnitude, or absolute where that is below 1): fp32 inputs 1e-5 on log-probs and entropy, 1e-4 on
gradients; bf16 inputs 1e-2 (the op accumulates in fp32; the bound covers bf16 rounding of returned gradients).
"""
import pytest
import torch

from udrra import InputError
from udrra.kernels import linear_logprobs

BOUNDS = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 1e-2)}


def draw(N, H, V, dtype, seed, scale=1.0, bias=True, ignore=()):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(N, H, generator=g) * scale).to(dtype)
    W = torch.randn(V, H, generator=g).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    for i in ignore:
        y[i] = -100
    return X, W, b, y, torch.randn(N, generator=g), torch.randn(N, generator=g)


def reference(X, W, b, y, T, g, e):
    """fp64 materialised log_softmax: values and gradients of Σ g·logp + Σ e·entropy (autograd)."""
    Xd, Wd = X.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    z = Xd @ Wd.T + (0 if bd is None else bd)
    ls = torch.log_softmax(z / T, -1)
    keep = y != -100
    lp = torch.where(keep, ls.gather(1, y.clamp_min(0)[:, None]).squeeze(1), torch.zeros_like(ls[:, 0]))
    ent = torch.where(keep, -(ls.exp() * ls).sum(-1), torch.zeros_like(lp))
    ((lp * g.double()).sum() + (ent * e.double()).sum()).backward()
    return lp.detach(), ent.detach(), Xd.grad, Wd.grad, None if bd is None else bd.grad


def rel(a, b):
    """max |a − b| / max(max |b|, 1): relative error, absolute below 1 nat (entropies of peaked rows are ~0)."""
    return float((a.detach().double() - b).abs().max() / b.abs().max().clamp_min(1.0))


CASES = [  # N, H, V, scale, T, bias, ignored rows
    (16, 24, 37, 1.0, 1.0, True, (3,)),
    (33, 40, 130, 1.0, 0.7, False, (0, 32)),
    (1, 16, 50, 1.0, 1.3, True, ()),
    (12, 32, 64, 400.0, 0.5, True, (5,)),    # |z| ~ 1e4 after temperature
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_values_entropy_and_gradients_match_fp64_reference(case, dtype, seed):
    N, H, V, scale, T, bias, ignore = case
    X, W, b, y, g, e = draw(N, H, V, dtype, seed, scale, bias, ignore)
    Xr, Wr = X.clone().requires_grad_(), W.clone().requires_grad_()
    br = None if b is None else b.clone().requires_grad_()
    lp, ent = linear_logprobs(Xr, Wr, y, bias=br, temperature=T, return_entropy=True, backend="chunked",
                              chunk_tokens=5)
    ((lp * g).sum() + (ent * e).sum()).backward()
    rlp, rent, dX, dW, db = reference(X, W, b, y, T, g, e)
    vb, gb = BOUNDS[dtype]
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == (N,)
    assert rel(lp, rlp) < vb and rel(ent, rent) < max(vb, 1e-5)
    assert rel(Xr.grad, dX) < gb and rel(Wr.grad, dW) < gb
    if b is not None:
        assert rel(br.grad, db) < gb
    for i in ignore:
        assert lp[i].item() == 0.0 and ent[i].item() == 0.0 and Xr.grad[i].abs().max().item() == 0.0


@pytest.mark.parametrize("case", CASES)
def test_torch_linear_cross_entropy_backend_matches_fp64_reference_with_per_token_gradients(case):
    N, H, V, scale, T, bias, ignore = case
    X, W, b, y, g, e = draw(N, H, V, torch.float32, 7, scale, bias, ignore)
    Xr, Wr = X.clone().requires_grad_(), W.clone().requires_grad_()
    br = None if b is None else b.clone().requires_grad_()
    lp = linear_logprobs(Xr, Wr, y, bias=br, temperature=T, backend="torch")
    (lp * g).sum().backward()
    rlp, _, dX, dW, db = reference(X, W, b, y, T, g, torch.zeros(N))
    assert rel(lp, rlp) < 1e-5 and rel(Xr.grad, dX) < 1e-4 and rel(Wr.grad, dW) < 1e-4
    if b is not None:
        assert rel(br.grad, db) < 1e-4


def test_auto_backend_on_cpu_agrees_between_torch_and_chunked_paths():
    X, W, b, y, g, _ = draw(20, 16, 45, torch.float32, 3, ignore=(2,))
    a = linear_logprobs(X, W, y, bias=b)
    c = linear_logprobs(X, W, y, bias=b, backend="chunked", chunk_tokens=3)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    X, W, b, y, _, _ = draw(4, 8, 10, torch.float32, 0)
    with pytest.raises(InputError, match="temperature must be > 0"):
        linear_logprobs(X, W, y, temperature=0.0)
    with pytest.raises(InputError, match=r"target ids must lie in \[0, 10\)"):
        linear_logprobs(X, W, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(InputError, match="same H"):
        linear_logprobs(X, W[:, :4], y)
    with pytest.raises(InputError, match="backend 'cuda' unknown"):
        linear_logprobs(X, W, y, backend="cuda")


def test_dpo_and_ppo_losses_through_the_op_equal_materialised_logits_on_a_tiny_llama():
    pytest.importorskip("transformers")
    from lm_fixtures import tiny_llama

    import udrra
    from udrra import PairBatch, SampleBatch
    from udrra.lm.logprobs import sequence_logps

    model = tiny_llama(seed=3).float()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (4, 10), generator=g)
    att = torch.ones_like(ids)
    att[3, 8:] = 0
    lm = torch.zeros_like(ids)
    lm[:, 5:] = 1
    lm = lm * att
    ref_lp = torch.tensor([-30.0, -31.0, -29.0, -20.0])

    def materialised():
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (lp * lm[:, 1:]).sum(-1), lm[:, 1:].sum(-1).float()

    def losses(lp, n):
        dpo = udrra.load("dpo").loss(PairBatch(lp[:2], lp[2:], ref_lp[:2], ref_lp[2:], torch.full((2,), 0.5),
                                               torch.ones(2), n[:2], n[2:])).loss
        ppo = udrra.load("ppo_no_critic").loss(SampleBatch(lp, lp.detach(), ref_lp, torch.tensor([1.0, 0.0, 2.0, -1.0]),
                                                 torch.zeros(4, dtype=torch.long), torch.full((4,), 0.25))).loss
        return dpo, ppo

    results = []
    for fn in (lambda: sequence_logps(model, ids, att, lm), materialised):
        out = []
        for which in (0, 1):
            model.zero_grad()
            loss = losses(*fn())[which]
            loss.backward()
            out.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        results.append(out)
    for which in (0, 1):
        (l_op, g_op), (l_mat, g_mat) = results[0][which], results[1][which]
        assert l_op == pytest.approx(l_mat, rel=1e-5, abs=1e-6)
        for a, b in zip(g_op, g_mat):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_default_chunk_is_balanced_and_within_the_128_mib_budget():
    from udrra.kernels.chunked import default_chunk_tokens
    # budget: 2**25 fp32 elements per chunk → 682 rows of V = 49152; 4096 rows need ceil(4096/682) = 7 chunks,
    # balanced to ceil(4096/7) = 586 rows (6 × 586 + 580)
    assert default_chunk_tokens(49152) == 682
    assert default_chunk_tokens(49152, 4096) == 586
    assert default_chunk_tokens(49152, 100) == 100          # one chunk when the rows fit
    assert default_chunk_tokens(1 << 24, 100) == 15         # floor of 16 rows → 7 chunks of ≤ 15


# ----------------------------------------------------------------------------------------------------------
# masked vocabulary: −inf bias entries (0·log 0 = 0 in the entropy and its gradient)


def masked_draw(N, H, V, masked, ignore, seed, deep=()):
    """fp32 inputs with bias = −inf at ``masked`` and −3e4 (finite, p = 0) at ``deep``; targets drawn among the
    finite entries only."""
    X, W, b, _, g, e = draw(N, H, V, torch.float32, seed, 1.0, True, ())
    b[list(masked)] = float("-inf")
    b[list(deep)] = -3e4
    finite = torch.isfinite(b).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed + 100)
    y = finite[torch.randint(0, finite.numel(), (N,), generator=gen)]
    for i in ignore:
        y[i] = -100
    return X, W, b, y, g, e


def masked_reference(X, W, b, y, T, g, e):
    """fp64 reference on the finite sub-vocabulary alone (the −inf columns never enter it): log-probs and entropy
    of the softmax over the finite logits, autograd gradients; masked rows of dW and entries of db are 0."""
    V = W.shape[0]
    idx = torch.isfinite(b).nonzero().squeeze(1)
    remap = torch.full((V,), -1, dtype=torch.int64)
    remap[idx] = torch.arange(idx.numel())
    keep = y != -100
    assert bool((remap[y[keep]] >= 0).all()), "targets must be finite entries"
    ys = torch.where(keep, remap[y.clamp_min(0)], torch.full_like(y, -100))
    lp, ent, dX, dWs, dbs = reference(X, W[idx], b[idx], ys, T, g, e)
    dW = torch.zeros(V, W.shape[1], dtype=torch.float64)
    dW[idx] = dWs
    db = torch.zeros(V, dtype=torch.float64)
    db[idx] = dbs
    return lp, ent, dX, dW, db


MASKED_CASES = [  # N, H, V, T, masked (−inf) vocabulary entries, ignored rows, chunk_tokens, deep (−3e4) entries
    (16, 24, 37, 0.7, (0, 1, 17, 18, 36), (3, 15), 5, ()),                 # both ends, adjacent pairs
    (13, 32, 64, 1.3, tuple(range(0, 64, 3)), (0,), 4, ()),                 # a third of the vocabulary
    (12, 32, 64, 0.5, (2, 31, 32, 63), (5,), 5, (10, 40, 41)),             # finite log p ≈ −6e4: below the floor
]


@pytest.mark.parametrize("upstream", ["logp", "entropy", "both"])
@pytest.mark.parametrize("case", MASKED_CASES)
def test_chunked_masked_vocabulary_entropy_and_gradients_are_finite_and_match_finite_subvocab_reference(
        case, upstream, one_torch_thread):
    N, H, V, T, masked, ignore, chunk, deep = case
    X, W, b, y, g, e = masked_draw(N, H, V, masked, ignore, seed=V + N, deep=deep)
    g = g if upstream in ("logp", "both") else torch.zeros(N)
    e = e if upstream in ("entropy", "both") else torch.zeros(N)
    Xr, Wr, br = X.clone().requires_grad_(), W.clone().requires_grad_(), b.clone().requires_grad_()
    lp, ent = linear_logprobs(Xr, Wr, y, bias=br, temperature=T, return_entropy=True, backend="chunked",
                              chunk_tokens=chunk)
    loss = (lp * g).sum() if upstream == "logp" else (ent * e).sum() if upstream == "entropy" else \
        (lp * g).sum() + (ent * e).sum()
    loss.backward()   # "logp": autograd hands the op a zero entropy gradient — the path that used to give NaN
    rlp, rent, dX, dW, db = masked_reference(X, W, b, y, T, g, e)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert rel(lp, rlp) < 1e-5 and rel(ent, rent) < 1e-5
    for got in (Xr.grad, Wr.grad, br.grad):
        assert torch.isfinite(got).all()
    assert rel(Xr.grad, dX) < 1e-4 and rel(Wr.grad, dW) < 1e-4 and rel(br.grad, db) < 1e-4
    m = list(masked)
    assert (br.grad[m] == 0).all() and (Wr.grad[m] == 0).all()    # p = 0 there: exactly no gradient
    for i in ignore:
        assert lp[i].item() == 0.0 and ent[i].item() == 0.0 and Xr.grad[i].abs().max().item() == 0.0
    if upstream == "logp":  # the log-prob-only call agrees with the entropy call, values and gradients
        Xo, bo = X.clone().requires_grad_(), b.clone().requires_grad_()
        lpo = linear_logprobs(Xo, W, y, bias=bo, temperature=T, backend="chunked", chunk_tokens=chunk)
        (lpo * g).sum().backward()
        assert rel(lpo, rlp) < 1e-5 and rel(Xo.grad, dX) < 1e-4 and rel(bo.grad, db) < 1e-4
