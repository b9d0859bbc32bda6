"""The one log-prob path of udrra's LM training: per-sequence log π(y | x) of response tokens.

``sequence_logps`` runs the backbone (hidden states), then ``token_logps`` projects the hidden states of the
positions that predict a response token through the output embedding and takes the log-softmax in fp32.
``token_logps`` calls the fused op :func:`udrra.kernels.linear_logprobs`, the only log-prob path: everything
else (policy, reference, evaluation, the sampled KL estimate) goes through it.

Units: natural-log probabilities (nats). Shapes: ``B`` sequences of ``T`` tokens, hidden size ``H``,
vocabulary ``V``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..errors import InputError
from ..kernels import linear_logprobs

__all__ = ["token_logps", "sequence_logps", "backbone_and_head", "DEFAULT_CHUNK_TOKENS"]

#: Tokens per chunk of logits on the CPU paths (``None`` = the op's default, about 128 MiB of fp32 logits).
DEFAULT_CHUNK_TOKENS = None


def token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS) -> Tensor:
    """Per-token log-probs ``log softmax(hidden @ weight.T)[target]`` in fp32, through the fused op.

    Only the positions whose target is not ``ignore_index`` are projected, by
    :func:`udrra.kernels.linear_logprobs` (Triton on CUDA, chunked on CPU; the N×V logits are never stored).

    Args:
        hidden: ``(..., H)`` hidden states (any float dtype) of the positions that predict ``targets``.
        weight: ``(V, H)`` output-embedding (lm_head) weight.
        targets: ``(...)`` int64 token ids, same leading shape as ``hidden``; ``ignore_index`` marks positions
            whose log-prob is not wanted (prompt, padding).
        ignore_index: the id marking ignored positions.
        chunk_tokens: rows per chunk on the CPU paths.

    Returns:
        ``(...)`` float32 log-probs (nats, ≤ 0); exactly 0 at ignored positions. Differentiable with respect
        to ``hidden`` and ``weight``.
    Raises:
        InputError: mismatched shapes, or target ids outside [0, V).
    """
    if hidden.shape[:-1] != targets.shape:
        raise InputError(f"token_logps: hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} "
                         f"must share leading dimensions")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise InputError(f"token_logps: weight must be (V, H={hidden.shape[-1]}), got {tuple(weight.shape)}")
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    keep = (t != ignore_index).nonzero().squeeze(-1)
    out = torch.zeros(t.shape[0], dtype=torch.float32, device=hidden.device)
    if keep.numel() == 0:
        # keep the graph connected so backward through an all-ignored batch yields zero gradients
        return (out + 0.0 * hidden.sum().float()).reshape(lead)
    tk = t.index_select(0, keep)  # target ids are range-checked by linear_logprobs
    hk = h.index_select(0, keep)
    lp = linear_logprobs(hk, weight.to(hk.dtype), tk, ignore_index=ignore_index, chunk_tokens=chunk_tokens)
    return out.index_copy(0, keep, lp).reshape(lead)


def backbone_and_head(model: Any) -> Tuple[Any, Tensor]:
    """Split a Hugging Face causal LM into its backbone (returns hidden states after the final norm) and the
    ``(V, H)`` output-embedding weight.

    Raises:
        InputError: the model's head is not a plain linear map (bias, logit scale or soft-capping), which
            ``token_logps`` does not implement.
    """
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None or not hasattr(head, "weight"):
        raise InputError(f"{type(model).__name__} is not a causal LM with a separate backbone "
                         f"(`model.{prefix}`) and output embedding (lm_head)")
    if getattr(head, "bias", None) is not None:
        raise InputError(f"{type(model).__name__}: lm_head has a bias, which udrra's log-prob path does not support")
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        v = getattr(cfg, attr, None)
        if v not in (None, 1, 1.0):
            raise InputError(f"{type(model).__name__}: config.{attr}={v} rescales the logits, which udrra's "
                             f"log-prob path does not support")
    return backbone, head.weight


def sequence_logps(model: Any, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tuple[Tensor, Tensor]:
    """Summed log-probs of the response tokens of each sequence under ``model``.

    ``logps[b] = Σ_t loss_mask[b, t] · log π(input_ids[b, t] | input_ids[b, :t])`` for ``t ≥ 1``: the hidden
    state at position ``t-1`` predicts token ``t`` (the first token has no context and is never scored).

    Args:
        model: a Hugging Face causal LM (``LlamaForCausalLM`` etc.).
        input_ids: ``(B, T)`` int64, right-padded (prompt then response then padding).
        attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding.
        loss_mask: ``(B, T)`` 1 for response tokens to score (a subset of the attended tokens), 0 elsewhere.
        chunk_tokens: passed to :func:`token_logps`.

    Returns:
        ``(logps, n_tokens)``: both ``(B,)`` float32. ``logps`` in nats (differentiable when grad is
        enabled); ``n_tokens`` the number of scored response tokens.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise InputError(f"sequence_logps: input_ids, attention_mask and loss_mask must all be (B, T); got "
                         f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(loss_mask.shape)}")
    backbone, weight = backbone_and_head(model)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, H)
    mask = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    targets = input_ids[:, 1:].masked_fill(~mask, -100)
    per_token = token_logps(hidden[:, :-1], weight, targets, ignore_index=-100, chunk_tokens=chunk_tokens)
    return per_token.sum(-1), mask.sum(-1).float()
