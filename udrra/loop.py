"""The one training loop and the one reference update, shared by every world (bandit, sequence testbed, LM).

One optimizer step reads like the algorithm::

    batch = producer.collect()                  # 1. sample source: rows, rewards, old/ref log-probs, critic values
    batch = algorithm.estimate(batch)           # 2. reward estimate: advantages (and GAE returns), whole batch
    for epoch in range(epochs):                 # 3. PPO epochs over the same samples
        out = algorithm.loss(producer.attach(batch))   # log-probs with gradient (the one log-prob op) → loss
        out.loss.backward(); optimizer.step()   # 4. optimizer step
    reference_update.after_step(reference, policy, step)   # 5. π_ref update (frozen / ema / reset_every)

A *producer* is the world's sample source. It owns the policy, the reference and (for ``gae``) the critic, and
implements two methods:

- ``collect() -> PairBatch | SampleBatch`` — the step's rows under ``torch.no_grad()``: for samples the
  old-policy log-probs (``logps`` = ``old_logps``), reference log-probs, rewards, groups, weights and the critic's
  rollout values (``old_values``); for pairs the pair rows with reference log-probs.
- ``attach(batch) -> PairBatch | SampleBatch`` — the same rows with the current policy's log-probs (and the
  critic's current values), differentiable.

The loop never looks at which world it runs in, nor at the algorithm's name: what differs between DPO, PPO and
GRPO is the batch the producer builds from the algorithm's ``[source]`` and the loss derived from its components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Union

import torch
from torch import nn

from .batch import PairBatch, SampleBatch
from .errors import ConfigError, InputError
from .loss import LossOutput

__all__ = ["Producer", "ReferenceUpdate", "fit", "optimizer_step", "accumulated_step", "backward_pass",
           "merge_outputs"]

Batch = Union[PairBatch, SampleBatch]


class Producer(Protocol):
    """A world's sample source (see the module docstring)."""

    def collect(self) -> Batch: ...

    def attach(self, batch: Batch) -> Batch: ...


@dataclass(frozen=True)
class ReferenceUpdate:
    """How π_ref changes during training: the ``[reference]`` table's ``update``, one meaning in every world.

    - ``frozen``: never.
    - ``ema``: after every optimizer step, every reference parameter ← decay·ref + (1 − decay)·policy (Xu et al.
      2404.10719 §5). On a table policy this is the EMA of the logits, whose softmax equals the softmax of the
      EMA of the log-probs (they differ by a per-prompt constant).
    - ``reset_every``: after every ``every``-th optimizer step, the reference's parameters ← the policy's
      (DPO-Iter, Xu et al. §4.3). A world that stops a round early once it has converged (the bandit's exact
      mode) resets there: see :func:`fit`'s ``converged``.

    The reference must have the policy's parameter list (same architecture).
    """

    rule: str = "frozen"
    decay: Optional[float] = None
    every: Optional[int] = None

    @classmethod
    def of(cls, reference_component) -> "ReferenceUpdate":
        """From an algorithm's ``[reference]`` component (validated by :mod:`udrra.config`)."""
        rule = reference_component.get("update", "frozen")
        if rule == "ema":
            return cls("ema", decay=float(reference_component["decay"]))
        if rule == "reset_every":
            return cls("reset_every", every=int(reference_component["every"]))
        if rule != "frozen":
            raise ConfigError(f"unknown reference update rule {rule!r}; valid: frozen, ema, reset_every")
        return cls()

    def due(self, step: int) -> bool:
        """True when the update changes the reference after optimizer step ``step`` (1-based)."""
        return self.rule == "ema" or (self.rule == "reset_every" and step % int(self.every) == 0)

    @torch.no_grad()
    def apply(self, reference: nn.Module, policy: nn.Module) -> None:
        """Apply the rule's update once (EMA step, or copy), parameter by parameter."""
        ref_params, pol_params = list(reference.parameters()), list(policy.parameters())
        if len(ref_params) != len(pol_params) or any(a.shape != b.shape for a, b in zip(ref_params, pol_params)):
            raise InputError("the reference and the policy have different parameter lists: ema / reset_every "
                             "need a reference of the policy's architecture")
        for pr, pp in zip(ref_params, pol_params):
            if self.rule == "ema":
                pr.lerp_(pp.detach().to(pr.dtype), 1.0 - float(self.decay))
            else:
                pr.copy_(pp.detach())

    def after_step(self, reference: Optional[nn.Module], policy: nn.Module, step: int) -> bool:
        """Update ``reference`` after optimizer step ``step`` (1-based) if the rule says so; True if it changed."""
        if reference is None or self.rule == "frozen" or not self.due(step):
            return False
        self.apply(reference, policy)
        return True


def backward_pass(algorithm, producer: Producer, batch: Batch, loss_scale: float = 1.0,
                  backward: Optional[Callable[[torch.Tensor], None]] = None, parts: int = 1) -> LossOutput:
    """Attach log-probs with gradient, derived loss, backward (into the gradients already there).

    The backpropagated loss is ``out.loss · loss_scale / parts`` (``parts`` batches accumulated into one step);
    ``backward(loss)`` replaces ``loss.backward()`` (``accelerator.backward``, a finiteness check, ...)."""
    out = algorithm.loss(producer.attach(batch))
    loss = out.loss * loss_scale if loss_scale != 1.0 else out.loss
    if parts > 1:
        loss = loss / parts
    loss.backward() if backward is None else backward(loss)
    return out


def merge_outputs(outs: List[LossOutput]) -> LossOutput:
    """One output for an accumulated step: the mean loss (detached), every row, row-weighted mean metrics."""
    if len(outs) == 1:
        return outs[0]
    rows = [float(o.per_row.numel()) for o in outs]
    metrics = {}
    for k in outs[0].metrics:
        tot = 0.0
        for w, o in zip(rows, outs):
            tot += w * float(o.metrics[k])
        metrics[k] = tot / sum(rows)
    return LossOutput(loss=torch.stack([o.loss.detach() for o in outs]).mean(),
                      per_row=torch.cat([o.per_row for o in outs]), metrics=metrics)


def optimizer_step(algorithm, producer: Producer, batch: Batch, optimizer: torch.optim.Optimizer,
                   loss_scale: float = 1.0, backward: Optional[Callable[[torch.Tensor], None]] = None,
                   micro_batches: int = 1) -> LossOutput:
    """One gradient step on ``batch``: attach log-probs with gradient, derived loss, backward, step.

    With ``micro_batches`` = k > 1 (a :class:`SampleBatch` whose advantages are estimated), the batch is cut by
    :meth:`SampleBatch.split` into k micro-batches that carry the whole batch's normalisers; each is attached and
    backpropagated in turn (activations of one micro-batch at a time) and the gradients add up to the whole
    batch's. The returned loss is the sum of the micro-batch losses (= the whole batch's loss); metrics are
    weighted by each micro-batch's share of the weights."""
    optimizer.zero_grad()
    if micro_batches <= 1:
        out = backward_pass(algorithm, producer, batch, loss_scale, backward)
    else:
        if not isinstance(batch, SampleBatch):
            raise InputError("micro_batches > 1 splits a SampleBatch (token-level losses); a pair batch is "
                             "accumulated over separately collected batches (accumulate)")
        parts = batch.split(min(micro_batches, batch.logps.shape[0]))
        outs = [backward_pass(algorithm, producer, part, loss_scale, backward) for part in parts]
        out = _sum_outputs(outs, [float(p.weights.sum()) for p in parts])
    optimizer.step()
    return out


def _sum_outputs(outs: List[LossOutput], shares: List[float]) -> LossOutput:
    """One output for micro-batches of one optimizer batch: the summed loss, every row, share-weighted metrics."""
    total = sum(shares)
    metrics = {k: sum(s * float(o.metrics[k]) for s, o in zip(shares, outs) if k in o.metrics) / total
               for k in outs[0].metrics}
    metrics["loss"] = float(sum(float(o.loss.detach()) for o in outs))
    return LossOutput(loss=torch.stack([o.loss.detach() for o in outs]).sum(),
                      per_row=torch.cat([o.per_row for o in outs]), metrics=metrics)


def accumulated_step(algorithm, producer: Producer, optimizer: torch.optim.Optimizer, parts: int, *,
                     estimates: bool, loss_scale: float = 1.0,
                     backward: Optional[Callable[[torch.Tensor], None]] = None,
                     estimate: Optional[Callable[[Batch], Batch]] = None) -> LossOutput:
    """One optimizer step over ``parts`` batches (gradient accumulation): each batch is collected, attached and
    backpropagated (loss / ``parts``) before the next is collected; then one step. Returns
    :func:`merge_outputs` of the batches' outputs."""
    optimizer.zero_grad()
    outs = []
    for _ in range(parts):
        batch = producer.collect()
        if estimates:
            batch = (estimate or algorithm.estimate)(batch)
        outs.append(backward_pass(algorithm, producer, batch, loss_scale, backward, parts))
    optimizer.step()
    return merge_outputs(outs)


def fit(algorithm, producer: Producer, optimizer: torch.optim.Optimizer, *, steps: int, epochs: int = 1,
        policy: nn.Module, reference: Optional[nn.Module] = None,
        reference_update: Optional[ReferenceUpdate] = None, loss_scale: float = 1.0,
        before_step: Optional[Callable[[int], None]] = None,
        after_step: Optional[Callable[[int, LossOutput], bool]] = None,
        converged: Optional[Callable[[int], bool]] = None, first_step: int = 1, accumulate: int = 1,
        backward: Optional[Callable[[torch.Tensor], None]] = None, micro_batches: int = 1,
        estimate: Optional[Callable[[Batch], Batch]] = None,
        end_step: Optional[Callable[[int], bool]] = None) -> int:
    """Run the step loop: collect → reward estimate → (epochs ×) log-probs → loss → optimizer step → reference.

    Args:
        algorithm: a loaded :class:`udrra.Algorithm` (its derived loss is the only loss).
        producer: the world's sample source (:class:`Producer`).
        optimizer: over the policy's (and critic's) parameters.
        steps: optimizer steps (sample batches) to run, counted from ``first_step``.
        epochs: passes over each sampled batch (PPO epochs; ``[source] epochs``).
        policy, reference: the modules the reference update acts on (``reference`` None: no reference).
        reference_update: default :meth:`ReferenceUpdate.of` the algorithm's ``[reference]``.
        loss_scale: multiplies every loss (stacked independent copies of a bandit).
        before_step(step): called before each step (learning-rate schedules).
        after_step(step, out): called after each step, before its reference update (a round's averaged policy is
            what a reset copies); returning True stops the loop.
        converged(step): returning True ends the current round early: with ``reset_every`` the reference is reset
            now and the step counter jumps to the round's end; otherwise the loop stops.
        first_step: the number of the first step (1-based; a resumed run starts later).
        accumulate: batches per optimizer step (gradient accumulation, :func:`accumulated_step`; needs
            ``epochs`` = 1); ``after_step`` then gets their :func:`merge_outputs`.
        backward(loss): replaces ``loss.backward()`` (e.g. ``accelerator.backward``).
        micro_batches: cut each estimated :class:`SampleBatch` into this many micro-batches per optimizer step
            (:func:`optimizer_step`; exact for every aggregation).
        estimate(batch): replaces ``algorithm.estimate`` (the LM trainer estimates on the batch of every process,
            :func:`udrra.lm.parallel.estimate_global`).
        end_step(step): called at the very end of each step, after its reference update (checkpoints);
            returning True stops the loop.
    Returns:
        The number of the last step run.
    Raises:
        InputError: ``steps``, ``epochs`` or ``accumulate`` < 1, or both ``epochs`` and ``accumulate`` > 1.
    """
    if steps < 1 or epochs < 1 or accumulate < 1:
        raise InputError(f"fit needs steps, epochs and accumulate >= 1, got steps={steps}, epochs={epochs}, "
                         f"accumulate={accumulate}")
    if epochs > 1 and accumulate > 1:
        raise InputError("fit accumulates batches (accumulate > 1) only with epochs = 1")
    if accumulate > 1 and not algorithm.pair_based:
        raise InputError("fit accumulates separately collected batches only for pair losses (a per-pair mean, exact "
                         "for equal batches); a token-level optimizer batch is collected whole and cut with "
                         "SampleBatch.split, whose global normalisers keep every aggregation exact")
    update = reference_update or ReferenceUpdate.of(algorithm.components.reference)
    estimates = not algorithm.pair_based and algorithm.components.reward.kind == "explicit"
    estimate = estimate or algorithm.estimate
    last = first_step + steps - 1
    step = first_step
    while step <= last:
        if before_step is not None:
            before_step(step)
        if accumulate > 1:                                           # 1-4 over `accumulate` batches, one step
            out = accumulated_step(algorithm, producer, optimizer, accumulate, estimates=estimates,
                                   loss_scale=loss_scale, backward=backward, estimate=estimate)
        else:
            batch = producer.collect()                               # 1. sample source (no gradient)
            if estimates:
                batch = estimate(batch)                              # 2. reward estimate on the whole batch
            for _ in range(epochs):                                  # 3-4. log-probs → loss → optimizer step
                out = optimizer_step(algorithm, producer, batch, optimizer, loss_scale, backward, micro_batches)
        stop = after_step is not None and after_step(step, out)      # logging, averaging (before any reset)
        update.after_step(reference, policy, step)                   # 5. reference update
        if stop or (end_step is not None and end_step(step)):       # checkpoints see the updated reference
            return step
        if converged is not None and converged(step):
            if update.rule != "reset_every":
                return step
            end = (step // update.every + 1) * update.every          # the round is over: reset and jump to its end
            if end > last:
                return step
            if reference is not None:
                update.apply(reference, policy)
            step = end
        step += 1
    return last
