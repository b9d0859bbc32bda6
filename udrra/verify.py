"""Train a composition on a bandit through its derived loss and compare with its analytic target.

The loop is the generic one every trainer runs: sample source → log-probs → loss → optimiser step (→ reference
update). Exact mode uses the population loss (every pair or sample weighted by its probability) and must reach
the target to TV < 1e-4; sampled mode draws mini-batches and must reach it within 2e-2 (iterate averaging over
the second half of training removes most of the SGD noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .bandit import Bandit, BanditProducer
from .errors import InputError

__all__ = ["VerifyResult", "verify", "train", "total_variation", "EXACT_TOL", "SAMPLED_TOL", "OPTIMIZERS"]

EXACT_TOL = 1e-4
SAMPLED_TOL = 2e-2
#: Adam's initial steps, in β·u units, of the stages that continue an exact hinge run stalled on a kink (verify)
HINGE_POLISH_STEPS = (0.08, 0.02, 0.005, 0.00125)


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`.

    Attributes:
        algorithm: the algorithm's name.
        target: ``(P, K)`` float64 analytic target (``None`` for the hinge targets ``margin`` and ``hinge_lp``).
        learned: ``(P, K)`` float64 trained policy.
        tv: max over prompts of total variation ½·Σ_y |learned − target| (NaN for hinge targets).
        kl: max over prompts of KL(target ‖ learned) in nats (NaN for hinge targets).
        steps: optimiser steps taken.
        history: per-logged-step dicts with ``step``, ``loss`` and ``tv``.
        tolerance: the tolerance ``passed`` was judged against.
        passed: tv < tolerance (or, for hinge targets, margin_violation < tolerance).
        target_kind, note: the derived target kind and why it differs from the declared one, if it does.
        margin_violation: for targets without a unique distribution (the hinge link): for ``margin`` (deterministic
            labels that admit every margin), max over covered pairs of max(0, c − β·h)/c, c = 1 + γ; for
            ``hinge_lp`` (stochastic labels), and for ``margin`` when ties or cycles make the margins unreachable,
            the objective gap below (what ``passed`` is judged on).
        objective_gap: hinge targets: max over prompts of F(learned) − min F, the excess of the learned policy's
            population hinge objective over its linear-program optimum (0 exactly on the target set).
        lp_optimum: hinge targets: max over prompts of min F (0 when every covered pair can reach its margin).
    """

    algorithm: str
    target: Optional[Tensor]
    learned: Tensor
    tv: float
    kl: float
    steps: int
    history: List[Dict[str, float]] = field(default_factory=list)
    tolerance: float = EXACT_TOL
    passed: bool = False
    target_kind: str = ""
    note: Optional[str] = None
    margin_violation: Optional[float] = None
    objective_gap: Optional[float] = None
    lp_optimum: Optional[float] = None

    def to_json(self) -> dict:
        """JSON-ready dict with keys algorithm, target, learned, tv, kl, steps (+ passed, tolerance, kinds)."""
        def num(x: float):
            return None if x is None or math.isnan(x) else x
        return {"algorithm": self.algorithm,
                "target": None if self.target is None else self.target.tolist(),
                "learned": self.learned.tolist(), "tv": num(self.tv), "kl": num(self.kl), "steps": self.steps,
                "passed": self.passed, "tolerance": self.tolerance, "target_kind": self.target_kind,
                "margin_violation": self.margin_violation, "objective_gap": self.objective_gap,
                "lp_optimum": self.lp_optimum, "note": self.note}


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """Per-prompt total variation ½·Σ_y |p − q|. p, q: ``(P, K)``; returns ``(P,)``."""
    return 0.5 * (p - q).abs().sum(-1)


def _kl(p: Tensor, q: Tensor) -> Tensor:
    ratio = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.log(q.clamp_min(1e-300))),
                        torch.zeros_like(p))
    return ratio.sum(-1).clamp_min(0.0)  # KL ≥ 0; clamp round-off


def _margin_violation(algorithm, bandit: Bandit, probs: Tensor) -> float:
    """max over covered pairs, ordered as labelled (q > ½), of max(0, c − β·h), c = 1 + γ (relative to the margin).

    h = u(y_w) − u(y_l) with u = log π − log π_ref (log π without a reference), averaged over the rounds when the
    reference is reset each round (every round adds a margin)."""
    from .components.target import hinge_problem
    x, M, Q, c = hinge_problem(algorithm.components, bandit, probs)
    d = x[:, :, None] - x[:, None, :]
    covered = (M + M.transpose(1, 2)) > 0
    short = torch.where(covered & (Q > 0.5), torch.relu(c - d) / c, torch.zeros_like(d))
    return float(short.max())


def _hinge_check(algorithm, bandit: Bandit, probs: Tensor, derived, tolerance: float):
    """(passed, margin_violation, objective_gap, lp_optimum) for a hinge target (no unique distribution).

    ``margin`` (deterministic labels): every covered pair must reach its margin, if the labels allow it (LP optimum
    0); otherwise, and for ``hinge_lp``, the learned policy's population hinge objective must attain the LP optimum.
    """
    from .components.target import hinge_gap
    gap_p, opt_p = hinge_gap(algorithm.components, bandit, probs)
    gap, opt = float(gap_p.max()), float(opt_p.max())
    if derived.kind == "margin" and opt <= 1e-9:
        viol = _margin_violation(algorithm, bandit, probs)
        return viol < tolerance, viol, gap, opt
    return gap < tolerance, gap, gap, opt


OPTIMIZERS = ("rprop", "adam", "sgd")


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "rprop":
        return torch.optim.Rprop(params, lr=lr, step_sizes=(1e-12, 5.0))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def train(algorithm, bandit: Bandit, *, exact: bool = True, steps: Optional[int] = None, seed: int = 0,
          lr: Optional[float] = None, batch_size: int = 64, init_logits: Optional[Tensor] = None,
          log_every: int = 50, target: Optional[Tensor] = None, policy: Optional[torch.nn.Module] = None,
          optimizer: Optional[str] = None, lr_decay: Optional[bool] = None, average: Optional[bool] = None,
          early_stop: Optional[bool] = None, metrics: Optional[Callable[[Tensor], Dict[str, float]]] = None,
          loss_scale: float = 1.0):
    """Train a bandit policy on ``bandit`` through ``algorithm``'s derived loss, with :func:`udrra.loop.fit`.

    The generic loop (the one the LM trainer runs): source → reward estimate → log-probs → loss → optimiser step
    → reference update (:class:`udrra.loop.ReferenceUpdate`: frozen, EMA of the reference table's logits, or a
    reset every ``[reference] every`` steps). Exact mode runs Rprop on the population loss (sign-based steps suit
    its deterministic gradients and reach 1e-12 precision); sampled mode runs Adam with a 1/√t learning-rate decay
    and averages the policy over the second half of each round. ``gae`` compositions train a
    :class:`~udrra.policy.TableCritic` V(x) jointly, through the same value loss.

    With ``update = "reset_every"`` a round is ``every`` optimiser steps and the run has ``rounds`` of them (the
    number of resets the derived target assumes); an exact round that has converged ends early (its reset comes
    then).

    Args: as :func:`verify`, and
        target: ``(P, K)`` (optional) adds TV to the logged history.
        policy: a module whose ``forward()`` gives ``(P, K)`` logits (:mod:`udrra.policy`); default a
            :class:`~udrra.policy.TablePolicy` at log π_ref + ``init_logits``.
        optimizer: ``rprop`` | ``adam`` | ``sgd`` (default rprop exact, adam sampled).
        lr_decay: multiply the learning rate by 1/√(1 + t/50) (default: only for the default sampled optimiser).
        average: return the average policy over the second half of each round (default: sampled mode).
        early_stop: stop once the logits move < 1e-11 for 5 steps (default: exact mode).
        metrics: called with the ``(P, K)`` policy at every logged step; its dict joins the history record.
        loss_scale: multiplies the loss (used when independent copies of a bandit are stacked as prompts, so
            that each copy sees the gradient it would see alone).
    Returns:
        ``(learned (P, K) float64, steps taken, history list of dicts)``.
    Raises:
        InputError: ``steps`` < 1, or an unknown optimizer.
    """
    from .sequence import SequenceBandit, train_sequence
    if isinstance(bandit, SequenceBandit):                  # the sequence testbed: its own producer and policy
        if policy is not None or loss_scale != 1.0:
            raise InputError("train on a SequenceBandit takes no policy or loss_scale (its policy is a table over "
                             "the prefix states)")
        return train_sequence(algorithm, bandit, exact=exact, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                              init_logits=init_logits, log_every=log_every, target=target, optimizer=optimizer,
                              lr_decay=lr_decay, average=average, early_stop=early_stop, metrics=metrics)
    from .policy import TableCritic, TablePolicy
    if policy is None:
        start = bandit.log_pi_ref if init_logits is None else \
            bandit.log_pi_ref + torch.as_tensor(init_logits, dtype=torch.float64)
        policy = TablePolicy(start)
    critic = TableCritic(bandit.shape[0]) if algorithm.components.reward.get("baseline") == "gae" else None
    reference = TablePolicy(bandit.log_pi_ref)

    def set_average(final: Tensor) -> None:
        if isinstance(policy, TablePolicy):
            with torch.no_grad():
                policy.logits.copy_(torch.log(final))
    world = World(policy, reference, critic,
                  BanditProducer(algorithm, bandit, policy, reference, critic, exact=exact, batch_size=batch_size,
                                 generator=torch.Generator().manual_seed(seed)),
                  probs_of=lambda logits: torch.softmax(logits, -1), set_average=set_average)
    return run_rounds(algorithm, world, exact=exact, steps=steps, lr=lr, optimizer=optimizer, lr_decay=lr_decay,
                      average=average, early_stop=early_stop, log_every=log_every, target=target, metrics=metrics,
                      loss_scale=loss_scale)


@dataclass
class World:
    """What a testbed hands :func:`run_rounds`: its modules, its sample source, and how to read the policy.

    Attributes:
        policy, reference: table modules whose ``forward()`` gives logits (the reference: log π_ref).
        critic: a :class:`~udrra.policy.TableCritic` for ``gae`` compositions, else ``None``.
        producer: the testbed's :class:`udrra.loop.Producer`.
        probs_of: policy logits → ``(P, N)`` probabilities of whole responses.
        set_average: writes an averaged ``(P, N)`` policy back into ``policy`` (sampled mode's second-half average).
        recenter: re-centre each state's logits after every step (a no-op on π; see :mod:`udrra.sequence`).
    """

    policy: torch.nn.Module
    reference: torch.nn.Module
    critic: Optional[torch.nn.Module]
    producer: object
    probs_of: Callable[[Tensor], Tensor]
    set_average: Callable[[Tensor], None]
    recenter: bool = False


class _RoundOptimizer:
    """The optimizer :func:`udrra.loop.fit` steps: a fresh one per reference round, as a fresh training run."""

    def __init__(self, name: str, params, lr: float):
        self.name, self.params, self.lr, self.current = name, params, lr, None

    def new_round(self) -> None:
        self.current = _make_optimizer(self.name, self.params, self.lr)

    def zero_grad(self) -> None:
        self.current.zero_grad()

    def step(self) -> None:
        self.current.step()


def run_rounds(algorithm, world: World, *, exact: bool, steps: Optional[int] = None, lr: Optional[float] = None,
               optimizer: Optional[str] = None, lr_decay: Optional[bool] = None, average: Optional[bool] = None,
               early_stop: Optional[bool] = None, log_every: int = 50, target: Optional[Tensor] = None,
               metrics: Optional[Callable[[Tensor], Dict[str, float]]] = None, loss_scale: float = 1.0):
    """The testbeds' training schedule around :func:`udrra.loop.fit` (the one step loop): rounds of ``every``
    steps for ``reset_every`` (``rounds`` of them) or one round of ``steps``; a fresh optimiser each round; Rprop
    and an early stop once the logits move < 1e-11 for 5 steps when exact; Adam, a 1/√t decay and the average of
    the round's second half when sampled. Arguments as :func:`train`. Returns ``(learned, steps taken, history)``.
    """
    from .loop import ReferenceUpdate, fit
    if steps is not None and steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    default_opt = optimizer is None
    optimizer = optimizer or ("rprop" if exact else "adam")
    lr_decay = (default_opt and not exact) if lr_decay is None else lr_decay
    average = (not exact) if average is None else average
    early_stop = exact if early_stop is None else early_stop
    lr = lr or (0.05 if exact else 0.1)
    update = ReferenceUpdate.of(algorithm.components.reference)
    rounds = int(algorithm.components.reference["rounds"]) if update.rule == "reset_every" else 1
    round_len = int(update.every) if update.rule == "reset_every" else (steps or (3000 if exact else 1000))
    epochs = 1 if exact else int(algorithm.components.source.get("epochs") or 1)
    policy = world.policy
    params = [p for p in policy.parameters() if p.requires_grad] + \
        ([] if world.critic is None else list(world.critic.parameters()))
    opt = _RoundOptimizer(optimizer, params, lr)
    history: List[Dict[str, float]] = []
    state = {"prev": policy().detach().clone(), "still": 0, "avg": None, "n_avg": 0, "final": None, "taken": 0}

    def before(step: int) -> None:
        k = (step - 1) % round_len
        if k == 0:                              # a new round: fresh optimiser state, as a fresh training run
            opt.new_round()
            state.update(avg=None, n_avg=0, still=0)
        if lr_decay:
            for g in opt.current.param_groups:
                g["lr"] = lr / math.sqrt(1.0 + k / 50.0)

    def after(step: int, out) -> bool:
        rnd, k = (step - 1) // round_len, (step - 1) % round_len
        state["taken"] += 1
        with torch.no_grad():
            if world.recenter:
                policy.logits.sub_(policy.logits.mean(-1, keepdim=True))
            now = policy().detach()
        moved = float((now - state["prev"]).abs().max())
        state["prev"] = now.clone()
        probs = world.probs_of(now)
        if average and k >= round_len // 2:
            state["avg"] = probs if state["avg"] is None else state["avg"] + probs
            state["n_avg"] += 1
        if k % log_every == 0 or k == round_len - 1:
            rec = {"step": step, "round": rnd, "loss": float(out.loss.detach())}
            if target is not None and rnd == rounds - 1:
                rec["tv"] = float(total_variation(probs, target).max())
            if metrics is not None:
                rec.update(metrics(probs))
            history.append(rec)
        state["still"] = state["still"] + 1 if moved < 1e-11 else 0  # Rprop skips one update after each sign flip
        if k == round_len - 1 or (early_stop and state["still"] >= 5):
            end_round(probs)
        return False

    def end_round(probs: Tensor) -> None:
        """The round's policy: the average of its second half (sampled) or the last iterate."""
        final = probs
        if state["avg"] is not None:
            final = state["avg"] / state["n_avg"]
            world.set_average(final)
        state.update(final=final, avg=None, n_avg=0)

    fit(algorithm, world.producer, opt, steps=rounds * round_len, epochs=epochs, policy=policy,
        reference=world.reference, reference_update=update, loss_scale=loss_scale, before_step=before,
        after_step=after, converged=(lambda step: early_stop and state["still"] >= 5))
    return state["final"], state["taken"], history


def verify(algorithm, bandit: Bandit, *, exact: bool = True, steps: Optional[int] = None, seed: int = 0,
           lr: Optional[float] = None, batch_size: int = 64, init_logits: Optional[Tensor] = None,
           tolerance: Optional[float] = None, log_every: int = 50) -> VerifyResult:
    """Train ``algorithm`` on ``bandit`` and compare the learned policy with its analytic target.

    Args:
        algorithm: a loaded :class:`udrra.Algorithm`.
        bandit: a :class:`udrra.Bandit`.
        exact: population loss (True) or sampled mini-batches (False).
        steps: optimiser steps per round (default 3000 exact, 1000 sampled); exact training stops early once
            the policy moves less than 1e-11 per step for 5 steps.
        seed: seeds the sampler (sampled mode).
        lr: learning rate on the logits (default 0.05 exact, for Rprop; 0.1 decaying as 1/√t sampled, for Adam).
        batch_size: pairs, or samples (whole groups of n), per prompt per sampled step.
        init_logits: ``(P, K)`` added to log π_ref to start from another policy (default: start at π_ref).
        tolerance: pass threshold on TV (default 1e-4 exact, 2e-2 sampled).
    Returns:
        :class:`VerifyResult`.
    Raises:
        TargetError: the composition has no target on this bandit. InputError: bad arguments.

    Hinge targets (``margin``, ``hinge_lp``: no unique distribution) are judged as :func:`judge` says.

    A :class:`udrra.SequenceBandit` is verified by :func:`udrra.sequence.verify_sequence` (the same arguments,
    ``init_logits`` ``(P·S, V)``; learned and target ``(P, N)`` over whole responses; no derived target is reported
    as ``target_kind = "none"``, not raised).
    """
    from .sequence import SequenceBandit, verify_sequence
    if isinstance(bandit, SequenceBandit):
        return verify_sequence(algorithm, bandit, exact=exact, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                               init_logits=init_logits, tolerance=tolerance, log_every=log_every)
    derived = algorithm.derived_target()
    target = None if derived.solve is None else algorithm.target_distribution(bandit).double()
    if target is None:
        from .components.target import hinge_identified
        hinge_identified(algorithm.components, bandit)  # fail before training where there is no target
    tolerance = tolerance if tolerance is not None else (EXACT_TOL if exact else SAMPLED_TOL)
    learned, total, history = train(algorithm, bandit, exact=exact, steps=steps, seed=seed, lr=lr,
                                    batch_size=batch_size, init_logits=init_logits, log_every=log_every,
                                    target=target)

    def polish(learned: Tensor, lr: float, n: int):
        return train(algorithm, bandit, exact=True, steps=n, seed=seed, optimizer="adam", lr=lr, lr_decay=True,
                     early_stop=False, init_logits=torch.log(learned) - bandit.log_pi_ref, log_every=log_every)
    return judge(algorithm, derived, target, learned, total, history, view=bandit, exact=exact, steps=steps,
                 tolerance=tolerance, polish=polish)


def judge(algorithm, derived, target: Optional[Tensor], learned: Tensor, total: int, history: List[Dict[str, float]],
          *, view: Bandit, exact: bool, steps: Optional[int], tolerance: float,
          polish: Callable[[Tensor, float, int], Tuple[Tensor, int, List[Dict[str, float]]]],
          stages: Tuple[float, ...] = HINGE_POLISH_STEPS) -> VerifyResult:
    """The verdict of a training run against its derived target, for every testbed.

    A distribution target passes at max-over-prompts TV < ``tolerance``. Hinge targets (``margin``, ``hinge_lp``:
    no unique distribution) pass when the learned policy's population hinge objective on ``view`` (the bandit, or
    the sequence testbed's bandit view over whole responses) attains its linear-program optimum (or every covered
    margin is met). Rprop's coordinate-wise sign steps can stall on a kink of that piecewise-linear objective (the
    descent direction moves several logits together along it), so an exact run with a frozen reference that misses
    it continues with Adam, whose averaged subgradients follow the kink, in stages of shrinking steps
    (``stages``, β·u units, default :data:`HINGE_POLISH_STEPS`; ``steps`` more in all): ``polish(learned, lr, n)``
    runs one stage from ``learned`` and returns ``(learned, steps taken, history)``.
    """
    if target is not None:
        tv = float(total_variation(learned, target).max())
        kl = float(_kl(target, learned).max())
        return VerifyResult(algorithm.name, target, learned, tv, kl, total, history, tolerance, tv < tolerance,
                            derived.kind, derived.note)
    passed, viol, gap, opt = _hinge_check(algorithm, view, learned, derived, tolerance)
    if not passed and exact and algorithm.components.reference.get("update", "frozen") == "frozen":
        per_stage = max(1, (steps or 3000) // len(stages))
        for step_x in stages:
            learned, n_more, hist_more = polish(learned, step_x / algorithm.beta, per_stage)
            history = history + [{**rec, "step": rec["step"] + total} for rec in hist_more]
            total += n_more
        passed, viol, gap, opt = _hinge_check(algorithm, view, learned, derived, tolerance)
    return VerifyResult(algorithm.name, None, learned, float("nan"), float("nan"), total, history, tolerance,
                        passed, derived.kind, derived.note, viol, gap, opt)
