"""Data parallelism across processes (``accelerate launch --num_processes N``): who draws which rows, and how
per-process numbers become the global ones.

The convention is transformers' / accelerate's: ``--batch-size`` is per process, and one optimizer step sees the
global batch ``batch_size × N × gradient_accumulation_steps``. Every process draws the same global order
(:class:`udrra.lm.producers.SeededOrder`, seeded identically) and keeps its own contiguous slice
(:meth:`World.shard`): process r of N takes rows ``[r·b, (r+1)·b)`` of each global batch, so N processes with
``--batch-size b`` see exactly the rows one process sees with ``--batch-size N·b``, in the same order.

Gradients are averaged across processes by DDP (accelerate), so each process's loss must be its share of the
global loss scaled by N. That holds when each process weights its rows ``1/b`` (they sum to 1 locally) and every
normaliser that spans the batch is global:

- ``token_mean`` divides by the global weighted token count (:class:`udrra.batch.Normalisers`), the all-reduced
  mean of the processes' counts (verl ``agg_loss`` with global token counts);
- batch-wide reward estimates (``batch_norm`` advantages, whitened GAE advantages) see the whole batch:
  :func:`estimate_global` gathers the rows of every process, estimates once, and keeps the local rows.

A :class:`World` of one process (no ``accelerate launch``) makes every operation the identity.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..batch import Normalisers, SampleBatch
from ..errors import InputError

__all__ = ["World", "estimate_global", "resolve_batch_size"]


class World:
    """The processes of a run, as accelerate's ``PartialState`` sees them (``accelerate launch`` sets them up;
    a plain ``python`` / ``udrra`` run is one process).

    Attributes:
        rank: this process's index (0..size−1). size: number of processes. is_main: rank 0, the one writer.
        device: this process's device.
    """

    def __init__(self, state: Any = None):
        if state is None:
            from accelerate import PartialState

            _check_launch()
            state = PartialState(cpu=_cpu_run())
        self.state = state
        self.rank = int(state.process_index)
        self.size = int(state.num_processes)
        self.is_main = bool(state.is_main_process)
        self.device = state.device

    @classmethod
    def single(cls) -> "World":
        """One process, without setting up accelerate (the default of the producers used on their own)."""
        class _One:
            process_index, num_processes, is_main_process, device = 0, 1, True, torch.device("cpu")

        return cls(_One())

    def layout(self, batch_size: int, unit: str, accumulation: int = 1) -> Dict[str, Any]:
        """``metrics.json``'s record of the data-parallel layout (transformers' convention): processes, the batch
        per process, accumulation steps and the global batch, in ``unit`` (pairs / prompts)."""
        return {"world_size": self.size, "batch_size_per_process": batch_size,
                "gradient_accumulation_steps": accumulation, "global_batch_size": batch_size * self.size * accumulation,
                "unit": unit}

    # ----------------------------------------------------------------------------------------- sharding

    def shard(self, items: Sequence[Any]) -> List[Any]:
        """This process's contiguous slice of a global batch whose length divides by ``size``."""
        n = len(items)
        if n % self.size:
            raise InputError(f"a global batch of {n} rows does not divide over {self.size} processes")
        b = n // self.size
        return list(items[self.rank * b:(self.rank + 1) * b])

    def span(self, n: int) -> Tuple[int, int]:
        """``(start, stop)`` of this process's contiguous part of ``n`` items that need not divide (evaluation
        sets): the first ``n mod size`` processes take one item more; a process may get none."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    # ------------------------------------------------------------------------------------- collectives

    def barrier(self) -> None:
        """Wait for every process (a no-op once accelerate's ``end_training`` has closed the process group)."""
        if self.size > 1 and torch.distributed.is_initialized():
            self.state.wait_for_everyone()

    def gather_objects(self, items: List[Any]) -> List[Any]:
        """The concatenation, in rank order, of every process's list (picklable items)."""
        if self.size == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def broadcast_object(self, obj: Any) -> Any:
        """``obj`` as the main process has it, on every process."""
        if self.size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def all_reduce(self, values: Sequence[float], op: str = "mean") -> List[float]:
        """``values`` reduced elementwise over processes (``mean``, ``sum`` or ``max``) in float64."""
        if self.size == 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t = t / self.size
        return t.cpu().tolist()

    def mean(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """The mean over processes of each metric (the key set must be the same on every process)."""
        if self.size == 1 or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        return dict(zip(keys, self.all_reduce([metrics[k] for k in keys], "mean")))

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any (a stop request, a non-finite loss)."""
        return bool(self.all_reduce([1.0 if flag else 0.0], "max")[0] > 0) if self.size > 1 else bool(flag)

    def gather_rows(self, t: Tensor) -> Tensor:
        """The ``(N·B, ...)`` concatenation in rank order of every process's ``(B, ...)`` tensor (same ``B``
        everywhere); a ``(B, T)`` tensor is right-padded with zeros to the largest ``T`` first."""
        if self.size == 1:
            return t
        from accelerate.utils import gather, pad_across_processes

        if t.dim() == 2:
            t = pad_across_processes(t, dim=1, pad_index=0)
        return gather(t.contiguous())


def _cpu_run() -> bool:
    """Train on CPU processes (gloo) when asked (``ACCELERATE_USE_CPU``) or when there is no GPU: accelerate only
    sets up multi-process CPU training for a state created with ``cpu=True``."""
    import os

    from accelerate.utils import str_to_bool

    return bool(str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false"))) or not torch.cuda.is_available()


def _check_launch() -> None:
    """Refuse the one silent single-process case: ``accelerate launch --cpu --num_processes N`` (or
    ``--num_processes N`` on a machine without GPUs) runs accelerate's simple launcher, which starts ONE process
    (several CPU processes need ``mpirun``); it sets ``MASTER_ADDR`` but no ``WORLD_SIZE``/``RANK``."""
    import os

    ranks = ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ and not any(k in os.environ for k in ranks):
        raise InputError("accelerate launch started ONE process although --num_processes > 1 was asked (its simple "
                         "launcher, used with --cpu or without GPUs, needs mpirun for several CPU processes); start N "
                         "CPU processes with `accelerate launch --multi_gpu --num_processes N -m udrra.cli train ...` "
                         "(without GPUs udrra then trains on N CPU processes with gloo), `accelerate launch "
                         "--config_file configs/cpu_ddp_2proc.yaml ...` or `torchrun --nproc_per_node N -m udrra.cli "
                         "train ...`")


def resolve_batch_size(batch_size: Optional[int], global_batch_size: Optional[int], world: World,
                       accumulation: int = 1, unit: str = "pairs") -> int:
    """The per-process batch size from ``--batch-size`` (per process) or ``--global-batch-size``.

    The global batch is ``batch_size × world.size × accumulation`` (transformers' convention).

    Raises:
        InputError (one line, before anything is loaded): a global batch smaller than the number of processes,
        or one that does not divide by ``world.size × accumulation``; both options given and inconsistent.
    """
    if global_batch_size is None:
        return int(batch_size)
    g, per = int(global_batch_size), world.size * int(accumulation)
    if g < world.size:
        raise InputError(f"--global-batch-size {g} is smaller than the {world.size} processes: every process needs "
                         f"at least one of the {unit}")
    if g % per:
        raise InputError(f"--global-batch-size {g} does not divide by {world.size} processes x {accumulation} "
                         f"accumulation steps = {per}; valid: a multiple of {per}")
    b = g // per
    if batch_size is not None and int(batch_size) != b:
        raise InputError(f"--batch-size {batch_size} (per process) and --global-batch-size {g} disagree: "
                         f"{g} / ({world.size} processes x {accumulation} accumulation) = {b}; pass one of them")
    return b


def estimate_global(algorithm: Any, batch: SampleBatch, world: World) -> SampleBatch:
    """The reward estimate of this process's rows computed on the global batch.

    One process: ``algorithm.estimate(batch)``. Several: every field is gathered in rank order (``(B, T)`` fields
    right-padded to the largest ``T``; groups offset so that they stay distinct; weights ``1/(N·B)``), the
    estimate runs once on the global batch (batch-wide baselines and whitening then see every row, as one process
    with the whole batch would), and the local rows' ``advantages`` / ``returns`` are returned together with the
    global :class:`Normalisers` (``tokens`` = the global weighted mean response length).

    Args:
        batch: this process's whole optimizer batch (not a micro-batch), equal row count on every process.
    """
    if world.size == 1:
        return algorithm.estimate(batch)
    B, T = batch.response_mask.shape
    kw = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        kw[f.name] = world.gather_rows(v) if isinstance(v, Tensor) else v
    n_groups = world.all_reduce([float(batch.group.max()) + 1.0], "max")[0]
    offsets = torch.arange(world.size, device=batch.group.device).repeat_interleave(B) * int(n_groups)
    kw.update(group=kw["group"] + offsets, weights=kw["weights"] / world.size, norm=None, index=None)
    whole = algorithm.estimate(SampleBatch(**kw))
    rows = slice(world.rank * B, (world.rank + 1) * B)
    local_norm = batch.normalisers()
    norm = Normalisers(tokens=world.all_reduce([local_norm.tokens], "mean")[0], max_len=local_norm.max_len)
    returns = whole.returns[rows, :T] if whole.returns is not None else None
    return replace(batch, advantages=whole.advantages[rows, :T], returns=returns, norm=norm)
