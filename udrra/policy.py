"""Bandit policies: a table of logits, or an MLP on one-hot prompts (function approximation).

Both are ``torch.nn.Module`` s whose ``forward()`` returns the ``(P, K)`` float64 logits of π(y|x) for every
prompt; :func:`udrra.bandit.response_logps` turns them into log-probs (the bandit's log-prob op). The table gives
each prompt its own free parameters, so a response that no pair or sample touches gets no gradient. The MLP shares
parameters across prompts, as a language model does, so training on one prompt moves the others — the setting of
Xu et al. (arXiv 2404.10719, §4.2), where DPO raises the probability of responses outside the preference data.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .errors import InputError

__all__ = ["TablePolicy", "TableCritic", "MLPPolicy", "POLICY_KINDS", "make_policy"]

POLICY_KINDS = ("table", "mlp")


class TablePolicy(nn.Module):
    """π(y|x) = softmax(θ[x])_y with one free logit per (prompt, response).

    Args:
        init_logits: ``(P, K)`` starting logits (float64 copy is made).
    """

    def __init__(self, init_logits: Tensor):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(init_logits, dtype=torch.float64).clone())

    def forward(self) -> Tensor:
        """``(P, K)`` float64 logits."""
        return self.logits


class TableCritic(nn.Module):
    """A table value function: one free value per state (V(x) on the one-token bandit: ``states = P``).

    The critic of the ``gae`` reward estimate on the testbeds, trained through the same clipped value loss as an
    LM's value head.

    Args:
        states: number of states. init: starting value of every state (default 0).
    """

    def __init__(self, states: int, init: float = 0.0):
        super().__init__()
        self.values = nn.Parameter(torch.full((states,), float(init), dtype=torch.float64))

    def forward(self) -> Tensor:
        """``(states,)`` float64 values."""
        return self.values


class MLPPolicy(nn.Module):
    """π(y|x) = softmax(base[x] + MLP(onehot(x)))_y: a two-layer tanh MLP shared by every prompt.

    Args:
        prompts, responses: P and K.
        hidden: hidden width.
        base_logits: ``(P, K)`` logits added to the MLP output (e.g. log π_ref); ``None`` = 0.
        zero_init_output: start the output layer at zero, so the initial policy is exactly softmax(base_logits)
            (gradients still reach every layer after the first step).
        init_scale: standard deviation of the output layer's initial weights when not zero-initialised.
        seed: initialisation seed.
    Raises:
        InputError: non-positive sizes, or base_logits of the wrong shape.
    """

    def __init__(self, prompts: int, responses: int, *, hidden: int = 64, base_logits: Optional[Tensor] = None,
                 zero_init_output: bool = True, init_scale: float = 0.1, seed: int = 0):
        super().__init__()
        if prompts < 1 or responses < 2 or hidden < 1:
            raise InputError(f"MLPPolicy needs prompts >= 1, responses >= 2, hidden >= 1; got {prompts}, "
                             f"{responses}, {hidden}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("eye", torch.eye(prompts, dtype=torch.float64))
        base = torch.zeros(prompts, responses, dtype=torch.float64) if base_logits is None else \
            torch.as_tensor(base_logits, dtype=torch.float64).clone()
        if base.shape != (prompts, responses):
            raise InputError(f"base_logits must have shape (P, K)={(prompts, responses)}, got {tuple(base.shape)}")
        self.register_buffer("base", base)
        bound1 = 1.0 / prompts ** 0.5
        self.w1 = nn.Parameter((torch.rand(prompts, hidden, generator=g, dtype=torch.float64) * 2 - 1) * bound1)
        self.b1 = nn.Parameter((torch.rand(hidden, generator=g, dtype=torch.float64) * 2 - 1) * bound1)
        w2 = torch.zeros(hidden, responses, dtype=torch.float64) if zero_init_output else \
            torch.randn(hidden, responses, generator=g, dtype=torch.float64) * init_scale
        self.w2 = nn.Parameter(w2)
        self.b2 = nn.Parameter(torch.zeros(responses, dtype=torch.float64))

    def forward(self) -> Tensor:
        """``(P, K)`` float64 logits for every prompt (one-hot inputs)."""
        return self.base + torch.tanh(self.eye @ self.w1 + self.b1) @ self.w2 + self.b2


def make_policy(kind: str, init_logits: Tensor, *, hidden: int = 64, seed: int = 0,
                output_init_scale: float = 0.0) -> nn.Module:
    """A ``table`` or ``mlp`` policy around ``init_logits``.

    With ``output_init_scale = 0`` (default) the MLP's output layer starts at zero and the policy starts exactly
    at softmax(init_logits); a positive value draws the output weights from N(0, scale²), so the MLP starts
    elsewhere and — as in a real network — moving one response's logit moves the others through the shared
    hidden layer.

    Raises:
        InputError: unknown kind (valid: table, mlp).
    """
    if kind == "table":
        return TablePolicy(init_logits)
    if kind == "mlp":
        P, K = init_logits.shape
        return MLPPolicy(P, K, hidden=hidden, base_logits=init_logits, seed=seed,
                         zero_init_output=output_init_scale == 0, init_scale=output_init_scale)
    raise InputError(f"unknown policy kind {kind!r}; valid: {', '.join(POLICY_KINDS)}")
