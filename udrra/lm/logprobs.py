"""The one log-prob path of udrra's LM training: per-sequence log π(y | x) of response tokens.

``sequence_logps`` runs the backbone (hidden states), then ``token_logps`` projects the hidden states of the
positions that predict a response token through the output embedding and takes the log-softmax in fp32.
``token_logps`` calls the fused op :func:`udrra.kernels.linear_logprobs`, the only log-prob path: everything
else (policy, reference, evaluation, the sampled KL estimate) goes through it.

Units: natural-log probabilities (nats). Shapes: ``B`` sequences of ``T`` tokens, hidden size ``H``,
vocabulary ``V``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from ..errors import InputError
from ..kernels import linear_logprobs

__all__ = ["token_logps", "sequence_logps", "response_logps", "backbone_and_head", "LogProbModel",
           "DEFAULT_CHUNK_TOKENS"]

#: Tokens per chunk of logits on the CPU paths (``None`` = the op's default, about 128 MiB of fp32 logits).
DEFAULT_CHUNK_TOKENS = None


def token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS, *, temperature: float = 1.0,
                return_entropy: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-token log-probs ``log softmax(hidden @ weight.T / temperature)[target]`` in fp32, through the fused op.

    Only the positions whose target is not ``ignore_index`` are projected, by
    :func:`udrra.kernels.linear_logprobs` (Triton on CUDA, chunked on CPU; the N×V logits are never stored).

    Args:
        hidden: ``(..., H)`` hidden states (any float dtype) of the positions that predict ``targets``.
        weight: ``(V, H)`` output-embedding (lm_head) weight.
        targets: ``(...)`` int64 token ids, same leading shape as ``hidden``; ``ignore_index`` marks positions
            whose log-prob is not wanted (prompt, padding).
        ignore_index: the id marking ignored positions.
        chunk_tokens: rows per chunk on the CPU paths.
        temperature: T > 0, the sampling temperature of the rollout (logits are divided by it, as ``generate``
            does before sampling; the rollout/training mismatch of trl#3029 is a missing T here).
        return_entropy: also return each position's entropy (nats; 0 at ignored positions).

    Returns:
        ``(...)`` float32 log-probs (nats, ≤ 0); exactly 0 at ignored positions. Differentiable with respect
        to ``hidden`` and ``weight``. With ``return_entropy``, ``(logps, entropy)``.
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
        zero = (out + 0.0 * hidden.sum().float()).reshape(lead)
        return (zero, zero.detach().clone()) if return_entropy else zero
    tk = t.index_select(0, keep)  # target ids are range-checked by linear_logprobs
    hk = h.index_select(0, keep)
    res = linear_logprobs(hk, weight.to(hk.dtype), tk, ignore_index=ignore_index, chunk_tokens=chunk_tokens,
                          temperature=float(temperature), return_entropy=return_entropy)
    if not return_entropy:
        return out.index_copy(0, keep, res).reshape(lead)
    lp, ent = res
    return out.index_copy(0, keep, lp).reshape(lead), out.index_copy(0, keep, ent).reshape(lead)


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
    if _is_log_prob_model(model):
        return model("sequence", input_ids, attention_mask, loss_mask, chunk_tokens=chunk_tokens)
    backbone, weight = backbone_and_head(model)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, H)
    mask = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    targets = input_ids[:, 1:].masked_fill(~mask, -100)
    per_token = token_logps(hidden[:, :-1], weight, targets, ignore_index=-100, chunk_tokens=chunk_tokens)
    return per_token.sum(-1), mask.sum(-1).float()


def response_logps(model: Any, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, response_mask: Tensor, *,
                   temperature: float = 1.0, return_entropy: bool = False,
                   chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-token log-probs of the responses of a rollout, ``(B, T)``, aligned with its ``response_mask``.

    The rollout layout (:class:`udrra.lm.rollout.Rollout`): ``input_ids`` = ``[left-padded prompt (prompt_len
    columns) | right-padded response (T columns)]``. Response token ``t`` sits in column ``prompt_len + t`` and is
    predicted by the hidden state of column ``prompt_len + t − 1``. Position ids are ``cumsum(attention_mask) − 1``
    so that a left-padded row sees the positions it would see unpadded.

    Args:
        model: a Hugging Face causal LM. input_ids, attention_mask: ``(B, prompt_len + T)``.
        prompt_len: number of prompt columns (≥ 1). response_mask: ``(B, T)`` 0/1, 1 on response tokens.
        temperature: the sampling temperature (logits / T), as in generation.
        return_entropy: also return the entropy of each position's (tempered) distribution, ``(B, T)``.
    Returns:
        ``(B, T)`` float32 log-probs (nats; 0 where ``response_mask`` is 0), differentiable; with
        ``return_entropy``, ``(logps, entropy)``.
    Raises:
        InputError: shapes that do not match, ``prompt_len < 1``.
    """
    B, S = input_ids.shape
    T = response_mask.shape[-1]
    if attention_mask.shape != input_ids.shape or response_mask.shape[0] != B or prompt_len < 1 or prompt_len + T != S:
        raise InputError(f"response_logps: need input_ids/attention_mask (B, prompt_len + T) and response_mask "
                         f"(B, T) with prompt_len >= 1; got {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, "
                         f"prompt_len={prompt_len}, response_mask {tuple(response_mask.shape)}")
    if _is_log_prob_model(model):
        return model("response", input_ids, attention_mask, prompt_len, response_mask, temperature=temperature,
                     return_entropy=return_entropy, chunk_tokens=chunk_tokens)
    backbone, weight = backbone_and_head(model)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, S, H)
    h = hidden[:, prompt_len - 1:S - 1]                                   # predicts columns prompt_len .. S-1
    targets = input_ids[:, prompt_len:].masked_fill(response_mask <= 0, -100)
    return token_logps(h, weight, targets, ignore_index=-100, chunk_tokens=chunk_tokens, temperature=temperature,
                       return_entropy=return_entropy)


class LogProbModel(torch.nn.Module):
    """A causal LM whose ``forward`` is the log-prob op: the module the trainer hands to ``accelerator.prepare``.

    :func:`sequence_logps` and :func:`response_logps` run the backbone and multiply its hidden states by the
    lm_head weight directly (the fused op never materialises the logits), which bypasses the model's own
    ``forward``. A data-parallel wrapper (DDP, FSDP) only synchronises gradients and gathers parameters for work
    done inside ITS forward, so the trainer wraps the policy in this module and prepares that instead: the two
    functions, given a ``LogProbModel`` (or a wrapper around one), call it, and its ``forward`` runs the same op
    on ``self.model``. The parameters are the model's own (no copy).

    ``forward(kind, *args, **kwargs)``: ``kind`` = ``"sequence"`` → :func:`sequence_logps` (``args`` =
    input_ids, attention_mask, loss_mask) or ``"response"`` → :func:`response_logps` (input_ids,
    attention_mask, prompt_len, response_mask); keyword arguments as theirs.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, kind: str, *args: Any, **kwargs: Any) -> Any:
        if kind == "sequence":
            return sequence_logps(self.model, *args, **kwargs)
        if kind == "response":
            return response_logps(self.model, *args, **kwargs)
        raise InputError(f"LogProbModel.forward: kind must be 'sequence' or 'response', got {kind!r}")


def _is_log_prob_model(model: Any) -> bool:
    """A :class:`LogProbModel`, or a data-parallel wrapper (``.module``) around one."""
    return isinstance(model, LogProbModel) or isinstance(getattr(model, "module", None), LogProbModel)
