"""Reference term: how π_ref enters the loss, and how π_ref itself is updated.

Kinds:

- ``log_ratio`` — π_ref sits inside the link through u(y) = log π(y) − log π_ref(y) (DPO, Rafailov et al.
  2023, Eq. 7; UDRRA RA/RDA).
- ``kl_in_reward`` — the reward is shaped per token by r_t = −β·k1_t, k1_t = log π_old(y_t|·) − log π_ref(y_t|·),
  with the task reward added at the last response token (PPO/RLOO/ReMax; Ouyang et al. 2022 Eq. 2; Xu et al.
  2404.10719 Eq. 2). The shaping is treated as part of the reward (no gradient through it). ``kl_return``:
  ``sequence`` — with γ = 1 the return is R = r − β·log π(y)/π_ref(y) exactly (Σ_t k1_t); ``token`` — token t
  sees r − β·k1_t only (the per-token, non-cumulative KL of the ReMax code; theory.md §4.1).
- ``kl_in_loss`` — β·k(log π/π_ref) is added to the loss and differentiated directly (GRPO, DeepSeekMath
  2402.03300 Eq. 19 with k3), per token (``level = "token"``) or on the sequence log-ratio (``"sequence"``).
  Which estimator decides the direction of the regularisation (Tang & Munos, arXiv 2506.09477): k1 gives no
  regularisation, k2 the reverse KL, k3 the forward KL KL(π_ref‖π) — per state when applied per token.
- ``sampler`` — π_ref is the round's sampling policy and enters only through the samples (RAFT): the loss has no
  π_ref term; ``update = "reset_every"`` makes the trained policy the next round's sampler, ``frozen`` is one round.
- ``none`` — no reference (SimPO, Meng et al. 2024 Eq. 6): u(y) = log π(y), optionally divided by the
  response length, with a target margin ``gamma``.
- ``chosen_nll`` — no reference model; the negative log-likelihood of the chosen response, −log π(y_w)
  (divided by |y_w| with ``length_normalize``), anchors the policy to the data instead, and the preference term
  is weighted by ``lam``: loss = −log π(y_w)[/|y_w|] + λ·ℓ(x) (ORPO, Hong et al. 2403.07691 Eq. 6). The NLL is
  the cross-entropy to the chosen responses' distribution c, i.e. KL(c‖π) up to a constant: the data's chosen
  marginal takes π_ref's place as the regulariser.

Update rules (parameter ``update``), applied by :class:`udrra.loop.ReferenceUpdate` in every world: ``frozen``
(default), ``ema`` (π_ref's parameters ← decay·π_ref + (1−decay)·π_θ after every step; Xu et al. §5),
``reset_every`` (π_ref ← π_θ every ``every`` optimiser steps; Xu et al.'s DPO-Iter; the derived target assumes
``rounds`` converged rounds, and the testbeds run ``rounds`` × ``every`` steps, ending an exact round early once it
has converged).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor

from . import KindSpec, Param, nonneg, positive, positive_int, unit_open

UPDATE_RULES = ("frozen", "ema", "reset_every")

_update_params = (
    Param("update", str, "frozen", "how π_ref changes during training", choices=UPDATE_RULES),
    Param("decay", float, None, "EMA decay of the reference parameters (update = 'ema')", check=unit_open),
    Param("every", int, None, "optimiser steps between reference resets, in every world (update = "
          "'reset_every')", check=positive_int),
    Param("rounds", int, None, "rounds of `every` steps the derived target assumes (π_k after k = rounds "
          "rounds); the testbeds run rounds × every steps (update = 'reset_every')", check=positive_int),
)

#: reference kinds that use no π_ref model (u = log π)
REFERENCE_FREE = ("none", "chosen_nll")

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_RETURNS = ("sequence", "token")
KL_LEVELS = ("token", "sequence")

KINDS: Dict[str, KindSpec] = {
    "log_ratio": KindSpec("log_ratio", "π_ref inside the link: u = log π − log π_ref (DPO)", (
        Param("length_normalize", bool, False, "divide u by the response length in tokens"),
        *_update_params)),
    "kl_in_reward": KindSpec("kl_in_reward", "reward shaped by −β·k1, k1 = log π/π_ref (PPO, RLOO, ReMax)", (
        Param("estimator", str, "k1", "KL estimator used in the reward", choices=("k1",)),
        Param("kl_return", str, "sequence", "what token t's return holds of the per-token KL: 'sequence' = "
              "r − β·Σ_t k1_t (every token; γ = 1 PPO/RLOO), 'token' = r − β·k1_t of token t only (ReMax code)",
              choices=KL_RETURNS),
        *_update_params)),
    "kl_in_loss": KindSpec("kl_in_loss", "β·E[k] added to the loss and differentiated (GRPO: k3)", (
        Param("estimator", str, "k3", "KL estimator differentiated in the loss", choices=KL_ESTIMATORS),
        Param("level", str, "token", "'token': β·k(d_t) on every token (GRPO as implemented); 'sequence': "
              "β·k(Σ_t d_t) once per response (Tang & Munos 2506.09477)", choices=KL_LEVELS),
        *_update_params)),
    "chosen_nll": KindSpec("chosen_nll", "no reference model; NLL of the chosen response + λ·preference term (ORPO)", (
        Param("lam", float, 0.1, "weight λ of the preference term against the chosen NLL (ORPO Eq. 6; TRL's beta)",
              check=positive),
        Param("length_normalize", bool, True, "average log-probs per token (u = log π/|y|) in both terms, as ORPO"),
        Param("update", str, "frozen", "must stay 'frozen': there is no reference to update", choices=("frozen",)),
    )),
    "sampler": KindSpec("sampler", "π_ref is the round's sampler, in the samples only (RAFT)", (*_update_params,)),
    "none": KindSpec("none", "no reference model: u = log π (SimPO)", (
        Param("length_normalize", bool, True, "divide log π by the response length in tokens"),
        Param("gamma", float, 0.0, "target reward margin γ subtracted inside the link", check=nonneg),
        Param("update", str, "frozen", "must stay 'frozen': there is no reference to update", choices=("frozen",)),
    )),
}


def implicit_logratio(logps: Tensor, ref_logps: Tensor, lengths: Tensor, *, uses_reference: bool,
                      length_normalize: bool) -> Tensor:
    """The per-sequence quantity u(y) that a link or regression sees.

    Args:
        logps, ref_logps, lengths: ``(B,)`` float; sequence log-probs (nats) and lengths (tokens).
        uses_reference: subtract ``ref_logps`` (``log_ratio``) or not (``none``).
        length_normalize: divide by ``lengths`` (SimPO, Meng et al. 2024 Eq. 4).
    Returns:
        ``(B,)`` float: u = (log π − log π_ref)[/|y|] or log π[/|y|].
    """
    u = logps - ref_logps if uses_reference else logps
    return u / lengths if length_normalize else u


def kl_estimate(log_ratio: Tensor, estimator: str) -> Tensor:
    """Per-sample KL(π‖π_ref) estimators of Schulman (2020), for samples y ∼ π.

    Args:
        log_ratio: ``(B,)`` or ``(B, T)`` float, d = log π(y) − log π_ref(y) (nats).
        estimator: ``"k1"`` = d; ``"k2"`` = d²/2; ``"k3"`` = exp(−d) − 1 + d (always ≥ 0).
    Returns:
        Same shape as ``log_ratio``. Differentiated as a loss: k1 has zero expected gradient, k2 gives
        ∇KL(π‖π_ref) and k3 gives ∇KL(π_ref‖π) (Tang & Munos, arXiv 2506.09477).
    Raises:
        KeyError: unknown estimator (valid: k1, k2, k3).
    """
    return _ESTIMATORS[estimator](log_ratio)


_ESTIMATORS: Dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda d: d,
    "k2": lambda d: 0.5 * d * d,
    "k3": lambda d: torch.expm1(-d) + d,
}
