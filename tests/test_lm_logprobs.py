"""udrra.lm.logprobs: the one log-prob path (sequence_logps / token_logps) against hand-written references."""

import pytest
import torch

pytest.importorskip("transformers")
from lm_fixtures import one_torch_thread, tiny_llama as _tiny_llama  # noqa: E402,F401

from udrra.errors import InputError  # noqa: E402
from udrra.lm.logprobs import backbone_and_head, sequence_logps, token_logps  # noqa: E402

V = 50


def tiny_llama(seed=0, tie=False):
    return _tiny_llama(seed, vocab_size=V, tie=tie).eval()


def padded_batch(lengths, prompt_lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    att = torch.zeros_like(ids)
    lm = torch.zeros_like(ids)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        ids[i, :n] = torch.randint(3, V, (n,), generator=g)
        att[i, :n] = 1
        lm[i, p:n] = 1
    return ids, att, lm


@pytest.mark.parametrize("tie", [False, True])
def test_sequence_logps_equals_log_softmax_gather_summed_over_response_positions_only(tie):
    model = tiny_llama(tie=tie)
    ids, att, lm = padded_batch([9, 6, 12], [4, 2, 7])
    logps, ntok = sequence_logps(model, ids, att, lm)
    # independent reference: full-model logits in float64, position t-1 predicts token t
    logits = model(input_ids=ids, attention_mask=att).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = torch.stack([lp[i, p - 1:n - 1].sum() for i, (n, p) in enumerate(zip([9, 6, 12], [4, 2, 7]))])
    assert logps.dtype == torch.float32 and ntok.dtype == torch.float32
    assert logps.shape == (3,) and ntok.tolist() == [5.0, 4.0, 5.0]
    torch.testing.assert_close(logps.double(), expected, atol=1e-5, rtol=1e-5)


def test_sequence_logps_of_a_row_is_unchanged_by_right_padding_next_to_a_longer_row():
    model = tiny_llama()
    ids, att, lm = padded_batch([7, 15], [3, 5])
    both, _ = sequence_logps(model, ids, att, lm)
    alone, _ = sequence_logps(model, ids[:1, :7], att[:1, :7], lm[:1, :7])
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)


def test_sequence_logps_gradient_matches_full_logits_autograd():
    model = tiny_llama()
    ids, att, lm = padded_batch([8, 10], [3, 4])
    logps, _ = sequence_logps(model, ids, att, lm, chunk_tokens=3)  # several checkpointed chunks
    (logps * torch.tensor([1.0, -2.0])).sum().backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=att).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * lm[:, 1:]
    (lp.sum(-1) * torch.tensor([1.0, -2.0])).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(g1[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_token_logps_chunked_equals_unchunked_and_is_exactly_zero_at_ignored_positions():
    torch.manual_seed(0)
    h = torch.randn(4, 5, 8, dtype=torch.float64)
    w = torch.randn(11, 8, dtype=torch.float64)
    t = torch.randint(0, 11, (4, 5))
    t[0, :2] = -100
    t[3, 4] = -100
    expected = torch.log_softmax(h @ w.T, -1).gather(-1, t.clamp_min(0)[..., None]).squeeze(-1)
    expected = expected.masked_fill(t == -100, 0.0)
    for chunk in (1, 3, 1000):
        got = token_logps(h, w, t, chunk_tokens=chunk)
        assert got.dtype == torch.float32 and got.shape == (4, 5)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
        assert (got[t == -100] == 0).all()


def test_token_logps_upcasts_bfloat16_inputs_to_float32():
    torch.manual_seed(0)
    h = torch.randn(6, 8).bfloat16()
    w = torch.randn(13, 8).bfloat16()
    t = torch.randint(0, 13, (6,))
    expected = torch.log_softmax(h.double() @ w.double().T, -1).gather(-1, t[:, None]).squeeze(-1)
    got = token_logps(h, w, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_token_logps_rejects_out_of_vocabulary_targets():
    with pytest.raises(InputError, match="target ids must lie in"):
        token_logps(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 5, 1]))


def test_sequence_logps_with_no_response_tokens_is_zero_with_zero_count():
    model = tiny_llama()
    ids, att, lm = padded_batch([6], [6])
    logps, ntok = sequence_logps(model, ids, att, lm)
    assert logps.tolist() == [0.0] and ntok.tolist() == [0.0]


def test_backbone_and_head_refuses_an_lm_head_with_bias():
    model = tiny_llama()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(V))
    with pytest.raises(InputError, match="bias"):
        backbone_and_head(model)
