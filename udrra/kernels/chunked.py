"""udrra's chunked CPU path of the linear log-prob op (any device; used on CPU when the entropy is needed).

Rows are processed in chunks of ``chunk_tokens``: one chunk of fp32 logits (``chunk × V``) exists at a time, in
forward and again in backward (recomputed from the saved hidden states, weight and per-row log-sum-exp), so the
extra memory is O(N·H + V·H) plus one bounded chunk, never O(N·V).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["chunked_linear_logprobs", "default_chunk_tokens"]

#: Floor for the log-terms multiplied by a probability in the entropy (forward) and its gradient (backward).
#: A masked logit (−inf, e.g. from a −inf bias entry) has p = 0 and log p = −inf, and 0·(−inf) is NaN; clamping
#: the log-term to this floor makes the product 0 (0·log 0 = 0). Exact: exp(x) is already 0 in fp32 for
#: x < −104, so every clamped entry has p = 0 anyway; and small enough in magnitude that (floor + H)·e cannot
#: overflow for any realistic upstream entropy gradient e. The clamp writes the buffer copy the step made anyway
#: (same cost as the plain copy).
LOG_FLOOR = -1.0e4

#: fp32 logits per chunk (elements): 32 Mi elements = 128 MiB. Measured on 2 CPU cores (smollm2 head): the
#: matmuls dominate and run faster on taller chunks (measured: 64 MiB chunks ~1.3× naive's time, 128 MiB ~1.2×).
CHUNK_ELEMENTS = 1 << 25


def default_chunk_tokens(vocab: int, rows: Optional[int] = None) -> int:
    """Rows per chunk so that one chunk of fp32 logits is about 128 MiB (at least 16 rows); with ``rows`` given,
    the chunks are balanced (equal sizes, none larger than that budget)."""
    chunk = max(16, CHUNK_ELEMENTS // max(1, vocab))
    if rows:
        n_chunks = -(-rows // chunk)
        chunk = -(-rows // n_chunks)
    return chunk


def _logits_into(out: Tensor, h: Tensor, w32: Tensor, b32: Optional[Tensor], temperature: float) -> Tensor:
    """out ← (h·Wᵀ + b) / T in fp32, written into a reused chunk buffer (no fresh N×V allocation per chunk)."""
    inv_t = 1.0 / temperature
    if b32 is None:
        torch.mm(h.float(), w32.t(), out=out)
        if temperature != 1.0:
            out.mul_(inv_t)
    else:
        torch.addmm(b32, h.float(), w32.t(), beta=inv_t, alpha=inv_t, out=out)
    return out


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, temperature, ignore_index, want_entropy, chunk):
        N, V = hidden.shape[0], weight.shape[0]
        w32 = weight.float()
        b32 = None if bias is None else bias.float()
        keep = targets != ignore_index
        safe_t = torch.where(keep, targets, torch.zeros_like(targets))
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        picked = torch.empty_like(lse)
        ent = torch.zeros_like(lse)
        zbuf = torch.empty(min(chunk, N), V, dtype=torch.float32, device=hidden.device)
        ubuf = torch.empty_like(zbuf) if want_entropy else None
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z = _logits_into(zbuf[:e - s], hidden[s:e], w32, b32, temperature)
            picked[s:e] = z.gather(1, safe_t[s:e, None]).squeeze(1)
            m = z.amax(-1, keepdim=True)
            z.sub_(m)                                          # u = z − max
            if want_entropy:
                u = torch.clamp(z, min=LOG_FLOOR, out=ubuf[:e - s])   # −inf (masked) → floor: 0·log 0 = 0
            z.exp_()
            sum_e = z.sum(-1)
            lse[s:e] = m.squeeze(1) + sum_e.log()
            if want_entropy:
                # H = log Σe^u − Σ e^u·u / Σe^u with u = z − max ≤ 0: no cancellation when |z| is large
                ent[s:e] = sum_e.log() - z.mul_(u).sum(-1) / sum_e
        del zbuf, ubuf
        logp = torch.where(keep, picked - lse, torch.zeros_like(lse))
        ent = torch.where(keep, ent, torch.zeros_like(ent))
        ctx.save_for_backward(hidden, weight, safe_t, keep, bias, lse, ent)
        ctx.temperature, ctx.want_entropy, ctx.chunk = temperature, want_entropy, chunk
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, t, keep, bias, lse, ent = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        N, V = hidden.shape[0], weight.shape[0]
        w32 = weight.float()
        b32 = None if bias is None else bias.float()
        kf = keep.float() / T                                  # d z / d(logits) = 1/T folded into the weights
        g = (g_logp.float() if g_logp is not None else torch.zeros_like(lse)) * kf
        e = (g_ent.float() * kf) if (ctx.want_entropy and g_ent is not None) else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        dh = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.zeros_like(w32) if need_w else None
        db = torch.zeros_like(b32) if (need_b and b32 is not None) else None
        zbuf = torch.empty(min(chunk, N), V, dtype=torch.float32, device=hidden.device)
        ubuf = torch.empty_like(zbuf) if e is not None else None
        for s in range(0, N, chunk):
            end = min(s + chunk, N)
            hs = hidden[s:end]
            z = _logits_into(zbuf[:end - s], hs, w32, b32, T)
            z.sub_(lse[s:end, None])                          # log p
            gs = g[s:end, None]
            if e is not None:
                lp = torch.clamp(z, min=LOG_FLOOR, out=ubuf[:end - s])  # −inf (masked) → floor; p = 0 there
            z.exp_()                                           # p
            if e is not None:
                # dH/dz = −p·(log p + H): total dz = g·(onehot − p) − e·p·(log p + H)
                lp.add_(ent[s:end, None]).mul_(e[s:end, None]).add_(gs)
                z.mul_(lp).neg_()
            else:
                z.mul_(-gs)                                    # −g·p
            z.scatter_add_(1, t[s:end, None], gs)              # + g at the target
            if dh is not None:
                torch.mm(z, w32, out=dh[s:end])
            if dw is not None:
                dw.addmm_(z.t(), hs.float())
            if db is not None:
                db += z.sum(0)
        del zbuf, ubuf
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype), None,
                None if db is None else db.to(bias.dtype), None, None, None, None)


def chunked_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                            temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                            chunk_tokens: Optional[int] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """The chunked path of :func:`udrra.kernels.linear_logprobs` (same arguments and results; inputs checked
    there). ``chunk_tokens`` rows per chunk (default :func:`default_chunk_tokens`)."""
    chunk = int(chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.shape[0]))
    logp, ent = _ChunkedLogprobs.apply(hidden, weight, targets, bias, float(temperature), int(ignore_index),
                                      bool(return_entropy), chunk)
    return (logp, ent) if return_entropy else logp
