"""Fused linear log-prob op: per-token log π(y_t | ·) straight from hidden states, never materialising N×V logits.

Every udrra loss consumes per-token log-probs of the policy (with gradient) and of the reference (without); this
op is the one place they are computed, for the LM trainer and the benchmarks alike.

Backends (chosen by ``backend="auto"``):

- ``triton`` — Triton kernels (forward and backward, vocabulary tiles with an online log-sum-exp, tiles recomputed
  in backward); used for CUDA tensors. Also runs on CPU tensors under ``TRITON_INTERPRET=1`` (that is how CI
  tests it).
- ``chunked`` — udrra's chunked autograd function (token chunks, fp32 log-sum-exp, recomputation in backward);
  used on CPU.
- ``torch`` — torch's own chunked ``torch.nn.functional.linear_cross_entropy`` (``reduction="none"``) with the
  temperature folded into the inputs (no entropy). Available on request only: on the 2-core CPU of
  ``benchmarks/results/logprobs_cpu.md`` it took 2.0–2.3× the time of the naive materialised path (with ~20 MB
  extra memory) where udrra's chunked path took 1.2–1.25× (with 5–10% of naive's extra memory).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..errors import InputError
from .chunked import chunked_linear_logprobs

__all__ = ["linear_logprobs", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch", "chunked")


def _check(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise InputError(f"linear_logprobs: hidden must be (N, H) and weight (V, H) with the same H; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0] or targets.dtype != torch.int64:
        raise InputError(f"linear_logprobs: targets must be (N,)=({hidden.shape[0]},) int64, got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise InputError(f"linear_logprobs: bias must be (V,)=({weight.shape[0]},), got {tuple(bias.shape)}")
    if not (temperature > 0):
        raise InputError(f"linear_logprobs: temperature must be > 0, got {temperature}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise InputError(f"linear_logprobs: hidden and weight must share a float dtype, got {hidden.dtype} and "
                         f"{weight.dtype}")


def _resolve_backend(backend: str, hidden: Tensor, return_entropy: bool) -> str:
    if backend not in BACKENDS:
        raise InputError(f"linear_logprobs: backend {backend!r} unknown; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if hidden.is_cuda:
        from .triton_logprobs import triton_available
        if triton_available():
            return "triton"
    return "chunked"


def linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                    temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                    backend: str = "auto", chunk_tokens: Optional[int] = None
                    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-token log-probs log softmax((hidden·weightᵀ + bias)/temperature)[target], fused.

    Args:
        hidden: ``(N, H)`` float (fp32, bf16 or fp16) hidden states of the positions that predict ``targets``.
        weight: ``(V, H)`` same dtype, the output embedding (lm_head; tied or not).
        targets: ``(N,)`` int64 token ids; rows equal to ``ignore_index`` are ignored.
        bias: optional ``(V,)`` lm_head bias.
        temperature: T > 0; logits are divided by it (sampling temperature of PPO/GRPO rollouts).
        ignore_index: marks ignored rows (log-prob and entropy 0, no gradient).
        return_entropy: also return the entropy of each row's distribution (nats), differentiable. Masked
            logits (−inf, e.g. −inf entries of ``bias`` for a masked vocabulary) contribute 0 to the entropy
            and to its gradient (0·log 0 = 0) in the ``chunked`` and ``triton`` backends (the ones with an
            entropy); the log-prob gradients stay finite too.
        backend: ``auto`` | ``triton`` | ``torch`` | ``chunked`` (see the module docstring).
        chunk_tokens: rows per chunk for the CPU paths (default: about 128 MiB of fp32 logits per chunk).
    Returns:
        ``logp`` ``(N,)`` float32 (nats, ≤ 0; 0 at ignored rows), or ``(logp, entropy)`` with ``return_entropy``.
        Differentiable in ``hidden``, ``weight`` and ``bias`` for any per-row upstream gradient. The log-sum-exp
        and every accumulation run in fp32 whatever the input dtype; extra memory is O(N·H + V·H) plus one
        bounded chunk, never O(N·V).
    Raises:
        InputError: shapes or dtypes that do not match, temperature ≤ 0, target ids outside [0, V), an
            unknown backend, or ``triton`` asked for where Triton is not installed.
    Source: log p(y|x) = z_y − log Σ_v exp z_v; ∂/∂z = onehot(y) − softmax(z); entropy gradient
        −p_v·(log p_v + H) (standard identities; see ../shared/reference/kernels.md).
    """
    _check(hidden, weight, targets, bias, temperature)
    keep = targets != ignore_index
    if bool(keep.any()):
        kt = targets[keep]
        if int(kt.min()) < 0 or int(kt.max()) >= weight.shape[0]:
            raise InputError(f"linear_logprobs: target ids must lie in [0, {weight.shape[0]}) or equal ignore_index "
                             f"({ignore_index}); got min {int(kt.min())}, max {int(kt.max())}")
    which = _resolve_backend(backend, hidden, return_entropy)
    if which == "triton":
        from . import triton_logprobs as tl_mod
        if not tl_mod.triton_available():
            raise InputError("linear_logprobs: backend 'triton' needs the triton package (pip install triton)")
        logp, ent = _TritonLogprobs.apply(hidden, weight, targets, bias, float(temperature), int(ignore_index),
                                         bool(return_entropy))
        return (logp, ent) if return_entropy else logp
    if which == "torch" and not return_entropy:
        return _torch_lce_logprobs(hidden, weight, targets, bias, float(temperature), int(ignore_index))
    return chunked_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                   ignore_index=ignore_index, return_entropy=return_entropy,
                                   chunk_tokens=chunk_tokens)


def _torch_lce_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], temperature: float,
                        ignore_index: int) -> Tensor:
    """torch's chunked linear_cross_entropy, reduction='none', with z/T folded in as (X/T)·Wᵀ + b/T."""
    h, w = hidden.float(), weight.float()
    if temperature != 1.0:
        h = h / temperature
    b = None if bias is None else bias.float() / temperature
    nll = torch.nn.functional.linear_cross_entropy(h, w, targets, linear_bias=b, reduction="none",
                                                   ignore_index=ignore_index,
                                                   options=torch.nn.LinearCrossEntropyOptions())
    return -nll


class _TritonLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, temperature, ignore_index, return_entropy):
        from . import triton_logprobs as tl_mod
        logp, lse, ent = tl_mod.forward(hidden, weight, targets, bias, temperature=temperature,
                                        ignore_index=ignore_index, return_entropy=return_entropy)
        ctx.save_for_backward(hidden, weight, targets, bias, lse, ent)
        ctx.temperature, ctx.ignore_index, ctx.return_entropy = temperature, ignore_index, return_entropy
        if ent is None:
            ent = torch.zeros_like(logp)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        from . import triton_logprobs as tl_mod
        hidden, weight, targets, bias, lse, ent = ctx.saved_tensors
        g_ent = grad_ent if ctx.return_entropy else None
        dh, dw, db = tl_mod.backward(hidden, weight, targets, bias, lse, ent, grad_logp.contiguous(),
                                     None if g_ent is None else g_ent.contiguous(),
                                     temperature=ctx.temperature, ignore_index=ctx.ignore_index)
        return dh, dw, None, db, None, None, None
