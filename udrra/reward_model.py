"""A Bradley–Terry reward model fitted on a bandit's preference data (the first stage of RLHF).

RLHF-with-PPO never sees the true reward: it fits r_φ on the same preference pairs DPO trains on (Xu et al.,
arXiv 2404.10719, Eq. 4: L_R(r_φ) = −E_D[log σ(r_φ(x, y_w) − r_φ(x, y_l))]) and then optimises the policy
against r_φ. :func:`fit_reward_model` does that on the bandit: exact population loss over the pairs of the
bandit's pair distribution μ, labels P(y ≻ y') from its preference matrix (or the better response when
``deterministic``), a table or an MLP reward over one-hot prompts, Adam for a fixed number of steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError
from .policy import MLPPolicy

__all__ = ["fit_reward_model"]


def fit_reward_model(bandit, *, kind: str = "table", hidden: int = 64, steps: int = 2000, lr: float = 0.05,
                     deterministic: bool = False, weight_decay: float = 0.0, seed: int = 0) -> Tensor:
    """Fit r_φ by Bradley–Terry maximum likelihood on the bandit's preference pairs.

    Args:
        bandit: a :class:`udrra.Bandit`; its ``pair_distribution`` μ says which pairs the data holds.
        kind: ``table`` (one free value per response) or ``mlp`` (shared across prompts, as a real RM is).
        hidden: MLP width. steps, lr: Adam steps and learning rate. weight_decay: L2 on the parameters
            (keeps deterministic labels from driving r_φ to infinity).
        deterministic: label each pair by its better response instead of P(y ≻ y').
        seed: MLP initialisation seed.
    Returns:
        ``(P, K)`` float64 rewards, centred per prompt (a BT reward is identified up to a per-prompt constant,
        and not at all on responses that no pair touches: there it is whatever the initialisation and the
        parameter sharing leave).
    Raises:
        InputError: unknown kind (valid: table, mlp), or steps < 1.
    """
    if kind not in ("table", "mlp"):
        raise InputError(f"unknown reward model kind {kind!r}; valid: table, mlp")
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    P, K = bandit.shape
    if kind == "table":
        model = None
        values = torch.zeros(P, K, dtype=torch.float64, requires_grad=True)
        params = [values]
    else:
        model = MLPPolicy(P, K, hidden=hidden, zero_init_output=False, seed=seed)
        params = list(model.parameters())
    mu = bandit.pair_distribution
    q = bandit.preference_matrix()
    if deterministic:
        q = (q > 0.5).double() + 0.5 * (q == 0.5).double()
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        r = values if model is None else model()
        diff = r[:, :, None] - r[:, None, :]
        nll = -(q * torch.nn.functional.logsigmoid(diff) + (1 - q) * torch.nn.functional.logsigmoid(-diff))
        loss = (mu * nll).sum() / P
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        r = (values if model is None else model()).detach().clone()
    return r - r.mean(-1, keepdim=True)
