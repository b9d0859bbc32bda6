"""Rollouts: the on-policy sample source on a causal LM (transformers ``generate``, KV cache, left padding).

A :class:`Rollout` holds one step's sampled responses in the layout every later stage reads::

    input_ids = [ left-padded prompt (P columns) | right-padded response (T columns) ]

Row ``b`` answers prompt ``group[b]``; the ``n`` responses of one prompt are consecutive rows (RLOO / GRPO
groups). ``response_mask`` is 1 on response tokens up to and including the first EOS and 0 after it (SmolLM2's
pad token is its EOS token, so the mask, never the token id, says where a response ends). A response that used
all ``max_new_tokens`` without an EOS is ``truncated``.

Sampling follows :class:`Sampling` exactly: a fresh ``GenerationConfig`` (the checkpoint's own sampling defaults
never apply), temperature / top-p / top-k as given. The training log-probs divide the logits by the same
temperature (:func:`udrra.lm.logprobs.response_logps`), so at step 0 they equal the log-probs of generation to
fp32 round-off whenever top-k and top-p are off; with top-k / top-p on, training scores the tempered full
distribution (as verl and TRL do), not the truncated one that sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["Sampling", "Rollout", "generate", "shape_rewards"]


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled (run options ``--temperature --top-p --top-k --max-new-tokens``).

    Attributes:
        temperature: T > 0; logits are divided by T before sampling and in the training log-probs.
        top_p: nucleus mass in (0, 1] (1 = off). top_k: 0 = off.
        max_new_tokens: response budget in tokens (≥ 1); a response that reaches it without EOS is truncated.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 24

    def validate(self) -> "Sampling":
        """Raise :class:`InputError` naming the bad option and the valid range."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1 (every response needs a token to be scored), "
                             f"got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and self.temperature < float("inf")):
            raise InputError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        return self


@dataclass
class Rollout:
    """One step's sampled responses (see the module docstring for the layout).

    Attributes:
        prompt_ids: ``(B, P)`` int64, left-padded prompts. prompt_mask: ``(B, P)`` int64, 1 on prompt tokens.
        response_ids: ``(B, T)`` int64, right-padded responses. response_mask: ``(B, T)`` float32 0/1, 1 up to
            and including the first EOS.
        truncated: ``(B,)`` bool, the response hit ``max_new_tokens`` without an EOS.
        group: ``(B,)`` int64, the prompt (0..G−1) each row answers; a group's rows are consecutive.
        prompts: the ``G`` prompt texts; responses: the ``B`` decoded response texts (special tokens skipped).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    truncated: Tensor
    group: Tensor
    prompts: List[str]
    responses: List[str]

    @property
    def input_ids(self) -> Tensor:
        """``(B, P + T)`` prompt and response ids."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """``(B, P + T)``: the prompt mask, then the response mask."""
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.shape[1])

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` float, response tokens per row."""
        return self.response_mask.sum(-1)

    def row_prompts(self) -> List[str]:
        """The prompt text of every row (``B`` entries)."""
        return [self.prompts[int(g)] for g in self.group]


def _left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int):
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), int(pad_token_id), dtype=torch.long)
    att = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} has no tokens; every prompt needs at least one token (a bos) to sample "
                             f"from")
        ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        att[i, L - len(p):] = 1
    return ids, att


def _response_mask(resp: Tensor, eos_token_id: int):
    """1 up to and including the first EOS; truncated rows have no EOS."""
    is_eos = resp == int(eos_token_id)
    has_eos = is_eos.any(-1)
    first = torch.where(has_eos, is_eos.float().argmax(-1), torch.full_like(has_eos, resp.shape[1], dtype=torch.long))
    cols = torch.arange(resp.shape[1])[None, :]
    mask = (cols <= first[:, None]) & (cols < resp.shape[1])
    return mask.float(), ~has_eos


@torch.no_grad()
def generate(policy: Any, prompt_ids: Sequence[Sequence[int]], prompts: Sequence[str], sampling: Sampling, *,
             n: int = 1, greedy: bool = False, pad_token_id: int, eos_token_id: int, tokenizer: Any = None) -> Rollout:
    """Sample ``n`` responses to each prompt with ``policy.generate`` (batched, left-padded, KV cache).

    Args:
        policy: a Hugging Face causal LM (put in eval mode for the call, restored after).
        prompt_ids: ``G`` token-id lists (already truncated to the prompt budget). prompts: their ``G`` texts.
        sampling: :class:`Sampling`. n: responses per prompt (rows ``g·n … g·n + n − 1`` answer prompt ``g``).
        greedy: decode greedily instead (ReMax's baseline response; ``n`` must be 1).
        pad_token_id, eos_token_id: the tokenizer's ids (they may be equal). tokenizer: decodes the responses
            (``responses`` are empty strings without one).
    Returns:
        :class:`Rollout` with ``B = G·n`` rows, the global torch RNG advanced.
    Raises:
        InputError: no prompts, an empty prompt, ``n`` < 1, greedy with ``n`` > 1, invalid ``sampling``.
    """
    from transformers import GenerationConfig

    sampling.validate()
    if not prompt_ids:
        raise InputError("generate needs at least one prompt")
    if n < 1 or (greedy and n != 1):
        raise InputError(f"n must be >= 1 (and 1 for a greedy decode), got n={n}, greedy={greedy}")
    device = next(policy.parameters()).device
    ids, att = _left_pad(prompt_ids, pad_token_id)
    ids, att = ids.repeat_interleave(n, 0), att.repeat_interleave(n, 0)
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=float(sampling.temperature),
                                                   top_p=float(sampling.top_p), top_k=int(sampling.top_k))
    gc = GenerationConfig(max_new_tokens=int(sampling.max_new_tokens), pad_token_id=int(pad_token_id),
                          eos_token_id=int(eos_token_id), **kw)
    was_training = policy.training
    policy.eval()
    try:
        out = policy.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=gc)
    finally:
        policy.train(was_training)
    resp = out[:, ids.shape[1]:].cpu()
    mask, truncated = _response_mask(resp, eos_token_id)
    T = max(int(mask.sum(-1).max()), 1)
    resp, mask = resp[:, :T].masked_fill(mask[:, :T] == 0, int(pad_token_id)), mask[:, :T]
    texts = ([tokenizer.decode(r[m > 0].tolist(), skip_special_tokens=True) for r, m in zip(resp, mask)]
             if tokenizer is not None else [""] * resp.shape[0])
    group = torch.arange(len(prompt_ids)).repeat_interleave(n)
    return Rollout(ids.to(device), att.to(device), resp.to(device), mask.to(device), truncated.to(device),
                   group.to(device), list(prompts), texts)


def shape_rewards(rewards: Tensor, rollout: Rollout, *, truncated_penalty: float = 0.0,
                  overlong_buffer: int = 0, max_new_tokens: Optional[int] = None) -> Tensor:
    """The task reward after the run's treatment of long responses.

    - ``truncated_penalty`` p ≥ 0: a truncated response (no EOS within the budget) gets r − p (TRL's
      ``missing_eos_penalty``; 0 keeps truncated responses as they are).
    - ``overlong_buffer`` L_c ≥ 1: DAPO's soft overlong punishment (Yu et al. 2503.14476, Eq. 13) with
      L_max = ``max_new_tokens``: r + ((L_max − L_c) − |y|)/L_c for L_max − L_c < |y| ≤ L_max, else r
      (a truncated response has |y| = L_max: −1).

    Returns ``(B,)`` float32.
    """
    r = rewards.float()
    if truncated_penalty:
        r = r - float(truncated_penalty) * rollout.truncated.float()
    if overlong_buffer:
        if max_new_tokens is None:
            raise InputError("overlong_buffer needs max_new_tokens (L_max)")
        lc, lmax = float(overlong_buffer), float(max_new_tokens)
        over = rollout.lengths.float() - (lmax - lc)
        r = r + torch.where(over > 0, -over / lc, torch.zeros_like(over))
    return r
