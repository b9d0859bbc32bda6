"""The critic of ``gae`` compositions (PPO) on a causal LM: a scalar value head on its own backbone.

``V(x, y_<t)`` is read from the hidden state that predicts response token ``t`` (the state before the token is
chosen), so values line up with the token log-probs of :func:`udrra.lm.logprobs.response_logps` and with
:func:`udrra.components.reward.gae`'s ``δ_t = r_t + γ V_{t+1} − V_t``.

Initialisation (say which, as TRL and OpenRLHF do):

- ``policy`` (default; TRL's PPO with a value model from the SFT policy): a copy of the policy's backbone and a
  zero-initialised head ``Linear(H, 1)``, so every value starts at 0.
- a reward-model directory (OpenRLHF's default, ``--critic-init DIR``): that checkpoint's backbone and its
  ``score`` head, so values start at the reward model's score of each prefix.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from .logprobs import backbone_and_head

__all__ = ["ValueModel"]


class ValueModel(nn.Module):
    """A backbone and a ``Linear(H, 1)`` value head.

    Args:
        backbone: a transformers base model returning hidden states ``(B, S, H)`` (``model.model`` of a Llama).
        head: ``nn.Linear(H, 1)``.
        init: a description of where the weights came from (logged in ``metrics.json``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, init: str):
        super().__init__()
        self.backbone, self.head, self.init = backbone, head, init

    @classmethod
    def from_policy(cls, policy: Any) -> "ValueModel":
        """A copy of ``policy``'s backbone with a zero head (values start at 0)."""
        backbone, weight = backbone_and_head(policy)
        head = nn.Linear(weight.shape[1], 1).to(device=weight.device, dtype=torch.float32)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        vm = cls(copy.deepcopy(backbone), head, "policy backbone copy, zero-initialised value head")
        for p in vm.parameters():
            p.requires_grad_(True)
        return vm

    @classmethod
    def from_reward_model(cls, path: str, device: Any = "cpu") -> "ValueModel":
        """The backbone and ``score`` head of the sequence-classification checkpoint at ``path``.

        Raises:
            InputError: not a loadable one-output sequence-classification checkpoint with a ``score`` head.
        """
        from .rewards import RewardError, load_reward_model, score_head

        try:
            rm, _ = load_reward_model(path)               # one output and a score head, or RewardError
        except RewardError as e:
            raise InputError(f"--critic-init {path!r}: {e}") from e
        backbone, score = score_head(rm)
        head = nn.Linear(score.in_features, 1, bias=True)
        with torch.no_grad():
            head.weight.copy_(score.weight.float())
            head.bias.copy_(score.bias.float() if score.bias is not None else torch.zeros(1))
        vm = cls(backbone, head, f"reward model {path} (backbone and score head)").to(device)
        for p in vm.parameters():
            p.requires_grad_(True)
        return vm

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
        """``(B, T)`` float32 values V(x, y_<t) of the ``T = S − prompt_len`` response positions.

        Args:
            input_ids, attention_mask: ``(B, S)`` rollout layout (left-padded prompt, right-padded response).
            prompt_len: prompt columns (≥ 1).
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        h = hidden[:, prompt_len - 1:input_ids.shape[1] - 1]
        return self.head(h.float()).squeeze(-1)
