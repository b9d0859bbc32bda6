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

#: fp32 logits per chunk (elements): 16 Mi elements = 64 MiB
CHUNK_ELEMENTS = 1 << 24


def default_chunk_tokens(vocab: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits is about 64 MiB (at least 16 rows)."""
    return max(16, CHUNK_ELEMENTS // max(1, vocab))


def _logits(h: Tensor, w32: Tensor, b32: Optional[Tensor], temperature: float) -> Tensor:
    z = h.float() @ w32.t()
    if b32 is not None:
        z = z + b32
    return z / temperature if temperature != 1.0 else z


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, temperature, ignore_index, want_entropy, chunk):
        N = hidden.shape[0]
        w32 = weight.float()
        b32 = None if bias is None else bias.float()
        logp = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros_like(logp)
        ent = torch.zeros_like(logp)
        keep = targets != ignore_index
        safe_t = torch.where(keep, targets, torch.zeros_like(targets))
        for s in range(0, N, chunk):
            z = _logits(hidden[s:s + chunk], w32, b32, temperature)
            l = torch.logsumexp(z, dim=-1)
            lse[s:s + chunk] = l
            logp[s:s + chunk] = z.gather(1, safe_t[s:s + chunk, None]).squeeze(1) - l
            if want_entropy:
                logp_all = z - l[:, None]
                # −Σ p·log p on log p = z − lse: no cancellation between lse and Σ p·z when |z| is large
                ent[s:s + chunk] = -(torch.exp(logp_all) * logp_all).sum(-1)
            del z
        logp = torch.where(keep, logp, torch.zeros_like(logp))
        ent = torch.where(keep, ent, torch.zeros_like(ent))
        ctx.save_for_backward(hidden, weight, safe_t, keep, bias, lse, ent)
        ctx.temperature, ctx.want_entropy, ctx.chunk = temperature, want_entropy, chunk
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, t, keep, bias, lse, ent = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        w32 = weight.float()
        b32 = None if bias is None else bias.float()
        kf = keep.float()
        g = (g_logp.float() if g_logp is not None else torch.zeros_like(lse)) * kf
        e = (g_ent.float() * kf) if (ctx.want_entropy and g_ent is not None) else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.zeros_like(w32) if need_w else None
        db = torch.zeros_like(b32) if (need_b and b32 is not None) else None
        for s in range(0, hidden.shape[0], chunk):
            hs = hidden[s:s + chunk]
            z = _logits(hs, w32, b32, T)
            p = torch.exp(z - lse[s:s + chunk, None])
            gs = g[s:s + chunk, None]
            dz = -gs * p                                                    # g·(onehot − p)
            dz.scatter_add_(1, t[s:s + chunk, None], gs)
            if e is not None:
                es = e[s:s + chunk, None]
                dz -= es * p * (z - lse[s:s + chunk, None] + ent[s:s + chunk, None])  # −e·p·(log p + H)
            del z, p
            if T != 1.0:
                dz /= T
            if dh is not None:
                dh[s:s + chunk] = dz @ w32
            if dw is not None:
                dw.addmm_(dz.t(), hs.float())
            if db is not None:
                db += dz.sum(0)
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype), None,
                None if db is None else db.to(bias.dtype), None, None, None, None)


def chunked_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                            temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                            chunk_tokens: Optional[int] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """The chunked path of :func:`udrra.kernels.linear_logprobs` (same arguments and results; inputs checked
    there). ``chunk_tokens`` rows per chunk (default :func:`default_chunk_tokens`)."""
    chunk = int(chunk_tokens or default_chunk_tokens(weight.shape[0]))
    logp, ent = _ChunkedLogprobs.apply(hidden, weight, targets, bias, float(temperature), int(ignore_index),
                                      bool(return_entropy), chunk)
    return (logp, ent) if return_entropy else logp
