"""The step loop of every LM trainer (offline pairs and online RL) around :func:`udrra.loop.fit`: metrics across
processes, logging windows, evaluation between steps, checkpoints and resume, non-finite steps, and signals.

One step as this module adds to :func:`udrra.loop.fit`'s collect → estimate → loss → optimizer step → reference
update:

- ``before``: the held-out evaluation due after the previous step (``eval_steps``), the step's clock;
- ``backward``: ``accelerator.backward`` (DDP all-reduces the gradients); a non-finite loss is only recorded here,
  so that every process reaches the gradient check (:class:`udrra.lm.run.ClippedStep`), which skips the update;
- ``after``: a skipped update stops the run with the step and the component at fault (``on_nonfinite = "stop"``)
  or is counted (``"skip"``); otherwise the step's metrics, averaged over processes, join the logging window;
- ``end`` (after the reference update): a checkpoint every ``save_steps`` steps, or at once when SIGTERM /
  SIGINT arrived during the step (then :class:`udrra.errors.RunInterrupted`).

Checkpoints (``OUTPUT/checkpoints/checkpoint-K``) are accelerate's ``save_state``: the prepared policy (and
critic), AdamW, the LR schedule and every process's RNG states, plus, registered with
``register_for_checkpointing``, this runner's :class:`RunState` (data order and counters, metric and evaluation
history, the open logging window) and an ``ema`` / ``reset_every`` reference (a frozen one is rebuilt from the
initial model). A checkpoint is written under a temporary name and renamed once complete, with
``udrra_checkpoint.json`` (step, world size and the run's fingerprint) written last: ``--resume`` loads only
directories that have it, and refuses one whose fingerprint differs from the new run's (another algorithm,
model, data, batch size or world size would not continue the same run).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import InputError, RunInterrupted, TrainingError
from ..loop import ReferenceUpdate, fit
from .run import CHECKPOINTS, ClippedStep, mean_dicts

__all__ = ["Checkpointing", "RunState", "StepRunner", "ON_NONFINITE", "MARKER", "find_checkpoint",
           "read_checkpoint", "run_fingerprint", "check_fingerprint", "stop_signals"]

#: what a non-finite loss or gradient does: stop the run (default) or skip the update and count it
ON_NONFINITE = ("stop", "skip")
#: the file a complete checkpoint has (written last)
MARKER = "udrra_checkpoint.json"
#: options that may change between a checkpoint and its resumed run
RESUMABLE_CHANGES = ("max_steps", "save_steps", "save_total_limit", "resume", "on_nonfinite", "threads")


@dataclass(frozen=True)
class Checkpointing:
    """A run's checkpoint and fault options (``--save-steps --save-total-limit --resume --on-nonfinite``).

    Attributes:
        save_steps: write a checkpoint every K optimizer steps (0 = only when interrupted).
        save_total_limit: keep only the newest N checkpoints (None = all).
        resume: a checkpoint directory, or a run's output / ``checkpoints`` directory (its newest complete
            checkpoint), to continue from.
        on_nonfinite: ``"stop"`` or ``"skip"`` (:data:`ON_NONFINITE`).
    """

    save_steps: int = 0
    save_total_limit: Optional[int] = None
    resume: Optional[str] = None
    on_nonfinite: str = "stop"

    @classmethod
    def of(cls, cfg: Any) -> "Checkpointing":
        """The validated options of a run's typed config (``save_steps``, ``save_total_limit``, ``resume``,
        ``on_nonfinite``: :class:`udrra.lm.train.PairConfig`, :class:`udrra.lm.online.OnlineConfig`)."""
        return cls(save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
                   resume=None if cfg.resume is None else str(cfg.resume), on_nonfinite=cfg.on_nonfinite).validate()

    def validate(self) -> "Checkpointing":
        """Raise :class:`InputError` naming the first bad option and what is valid."""
        if isinstance(self.save_steps, bool) or not isinstance(self.save_steps, int) or self.save_steps < 0:
            raise InputError(f"save_steps must be an integer >= 0 (0 = only when interrupted), got {self.save_steps!r}")
        if self.save_total_limit is not None and (not isinstance(self.save_total_limit, int)
                                                  or self.save_total_limit < 1):
            raise InputError(f"save_total_limit must be an integer >= 1 or None (keep all), got "
                             f"{self.save_total_limit!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise InputError(f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}, got {self.on_nonfinite!r}")
        return self


# ------------------------------------------------------------------------------------- finding checkpoints


def _step_of(d: Path) -> int:
    try:
        return int(d.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def find_checkpoint(path: Any) -> Path:
    """The checkpoint directory ``path`` names: itself when it holds :data:`MARKER`, else the newest complete
    ``checkpoint-K`` in it or in its ``checkpoints/`` folder.

    Raises:
        InputError: no such directory, or no complete checkpoint in it (a half-written one has no marker).
    """
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise InputError(f"--resume {path}: no such directory")
    if (p / MARKER).is_file():
        return p
    for base in (p / CHECKPOINTS, p):
        found = sorted((d for d in base.glob("checkpoint-*") if (d / MARKER).is_file()), key=_step_of) \
            if base.is_dir() else []
        if found:
            return found[-1]
    raise InputError(f"--resume {path}: no complete checkpoint there (a checkpoint directory has {MARKER}; "
                     f"a run's output directory has them under {CHECKPOINTS}/checkpoint-K)")


def read_checkpoint(path: Path) -> Dict[str, Any]:
    return json.loads((path / MARKER).read_text())


def run_fingerprint(algo: Any, model_name: str, world: Any, cfg: Any, **inputs: str) -> Dict[str, Any]:
    """What a resumed run must share with its checkpoint's run (:func:`check_fingerprint`): the algorithm file,
    the model, the named inputs (data / prompts / reward), the number of processes and every config option."""
    return {"algorithm": algo.to_toml(), "model": model_name, **inputs, "world_size": world.size, **cfg.as_dict()}


def check_fingerprint(saved: Dict[str, Any], current: Dict[str, Any], path: Path) -> None:
    """Refuse to resume when anything but :data:`RESUMABLE_CHANGES` differs; the message lists the first
    differences as ``key: checkpoint → now``."""
    diffs = []
    for k in sorted(set(saved) | set(current)):
        if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k):
            a, b = str(saved.get(k)), str(current.get(k))
            long = any("\n" in x or len(x) > 60 for x in (a, b))
            diffs.append(f"{k} differs" if long else f"{k}: {a} -> {b}")
    if diffs:
        raise InputError(f"--resume {path}: the checkpoint belongs to a different run ({'; '.join(diffs[:4])}); "
                         f"resume with the same options (only {', '.join(RESUMABLE_CHANGES)} may change)")


# ----------------------------------------------------------------------------------------------- signals


@contextmanager
def stop_signals() -> Iterator[Dict[str, Optional[int]]]:
    """While active, SIGTERM and the first SIGINT (Ctrl-C) only set ``flag["signum"]``: the runner finishes the
    step, saves a checkpoint and stops. A second Ctrl-C interrupts at once (no checkpoint). Outside the main
    thread (where Python cannot install handlers) signals keep their usual effect."""
    flag: Dict[str, Optional[int]] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signum"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signum"] = signum

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


# ---------------------------------------------------------------------------------------------- the runner


@dataclass
class RunState:
    """Everything of a run that a checkpoint holds besides accelerate's own state: the last finished step, the
    metric history and open logging window, step times, skipped steps, the evaluation before training, and the
    ``producer``'s / ``evaluator``'s own state (data order, counters, evaluation history)."""

    producer: Any
    evaluator: Any
    step: int = 0
    log_history: List[Dict[str, Any]] = field(default_factory=list)
    window: List[Tuple[float, Dict[str, float]]] = field(default_factory=list)
    step_times: List[float] = field(default_factory=list)
    skipped_steps: List[int] = field(default_factory=list)
    eval_before: Dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "log_history": self.log_history, "window": self.window,
                "step_times": self.step_times, "skipped_steps": self.skipped_steps, "eval_before": self.eval_before,
                "producer": self.producer.state_dict(), "eval_history": self.evaluator.history}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.step, self.log_history, self.window = int(d["step"]), list(d["log_history"]), list(d["window"])
        self.step_times, self.skipped_steps = list(d["step_times"]), list(d["skipped_steps"])
        self.eval_before = dict(d["eval_before"])
        self.producer.load_state_dict(d["producer"])
        self.evaluator.history = list(d["eval_history"])


class StepRunner:
    """Runs ``max_steps`` steps of :func:`udrra.loop.fit` for a trainer (see the module docstring).

    Args:
        s: the :class:`udrra.lm.run.Session`. algo: the algorithm. producer: the sample source (with
            ``state_dict`` / ``load_state_dict``). evaluator: ``evaluator(step) -> metrics`` with ``history``.
        cfg: the run's typed config (``max_steps``, ``logging_steps``, ``eval_steps``, ``max_grad_norm``).
        ckpt: :class:`Checkpointing`. out_dir: the run's output directory (checkpoints go to its
            ``checkpoints/``). fingerprint: what a resumed run must share (:func:`check_fingerprint`).
        step_metrics(step, out): this process's metrics of a step (the loss's and the producer's).
        log_extra(): counters added to each logged window (``train/...``). on_step(step): after each good step
            (samples). postfix(metrics): the progress bar's postfix. fit_kwargs: passed to :func:`fit`.
    """

    def __init__(self, s: Any, algo: Any, producer: Any, evaluator: Any, cfg: Any, ckpt: Checkpointing,
                 out_dir: Path, fingerprint: Dict[str, Any], *, step_metrics: Callable[[int, Any], Dict[str, float]],
                 log_extra: Callable[[], Dict[str, float]], on_step: Optional[Callable[[int], None]] = None,
                 postfix: Callable[[Dict[str, float]], Dict[str, str]] = lambda m: {}, progress: bool = False,
                 fit_kwargs: Optional[Dict[str, Any]] = None):
        self.s, self.algo, self.producer, self.evaluator, self.cfg, self.ckpt = s, algo, producer, evaluator, cfg, ckpt
        self.out_dir, self.fingerprint = out_dir, fingerprint
        self.step_metrics, self.log_extra, self.on_step, self.postfix = step_metrics, log_extra, on_step, postfix
        self.progress, self.fit_kwargs = progress, dict(fit_kwargs or {})
        self.world = s.world
        self.state = RunState(producer, evaluator)
        self.opt = ClippedStep(s, cfg.max_grad_norm)
        self.update = ReferenceUpdate.of(algo.components.reference)
        self.saved_reference = s.reference is not None and self.update.rule != "frozen"
        s.accelerator.register_for_checkpointing(self.state)
        if self.saved_reference:
            s.accelerator.register_for_checkpointing(s.reference)
        self.bad_loss: Optional[float] = None
        self.last_checkpoint: Optional[Path] = None
        self.resumed_from: Optional[Path] = None
        self.extra_files: List[Path] = []            # copied into every checkpoint (samples.jsonl)
        self.train_time = 0.0

    # ---------------------------------------------------------------------------------------- checkpoints

    def resume(self, path: Path) -> int:
        """Load a checkpoint that :func:`find_checkpoint` found, after :func:`check_fingerprint` (InputError for a
        checkpoint of another run); returns its step."""
        check_fingerprint(read_checkpoint(path)["fingerprint"], self.fingerprint, path)
        self.s.accelerator.load_state(str(path))
        self.last_checkpoint = self.resumed_from = path
        return self.state.step

    def save(self, step: int) -> Path:
        """Write ``checkpoints/checkpoint-<step>`` atomically (every process saves its part; the main process
        writes the marker last and renames); then drop the oldest beyond ``save_total_limit``."""
        root = self.out_dir / CHECKPOINTS
        final, tmp = root / f"checkpoint-{step}", root / f".checkpoint-{step}.tmp"
        if self.world.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.world.barrier()
        self.state.step = step
        self.s.accelerator.save_state(str(tmp), safe_serialization=True)
        self.world.barrier()
        if self.world.is_main:
            for f in self.extra_files:
                if f.is_file():
                    shutil.copyfile(f, tmp / f.name)
            marker = {"step": step, "world_size": self.world.size, "fingerprint": self.fingerprint,
                      "saved": datetime.now().isoformat(timespec="seconds")}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune(root)
        self.world.barrier()
        self.last_checkpoint = final
        return final

    def _prune(self, root: Path) -> None:
        limit = self.ckpt.save_total_limit
        if limit is None:
            return
        done = sorted((d for d in root.glob("checkpoint-*") if (d / MARKER).is_file()), key=_step_of)
        for d in done[:-limit]:
            shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ the hooks

    def _before(self, step: int) -> None:
        e = self.cfg.eval_steps
        if e and step > 1 and (step - 1) % e == 0:
            self.evaluator(step - 1)                 # after step − 1's reference update (a resumed run too)
        self._t0 = time.time()

    def _backward(self, loss: torch.Tensor) -> None:
        v = float(loss.detach())
        if not math.isfinite(v):
            self.bad_loss = v                          # decided at the gradient check, on every process alike
        self.s.accelerator.backward(loss)

    def _after(self, step: int, out: Any) -> bool:
        self.state.step_times.append(time.time() - self._t0)
        if self.opt.nonfinite is not None:
            self._nonfinite(step, out)
            return False
        sm = self.step_metrics(step, out)
        sm.update(grad_norm=self.opt.grad_norm, lr=float(self.s.scheduler.get_last_lr()[0]),
                  seconds=self.state.step_times[-1])
        if not math.isnan(self.opt.critic_grad_norm):
            sm["critic_grad_norm"] = self.opt.critic_grad_norm
        sm = self.world.mean(sm)
        self.state.window.append((1.0, sm))
        self._bar.update(1)
        self._bar.set_postfix(**self.postfix(sm))
        if self.on_step is not None:
            self.on_step(step)
        self._flush(step)
        return False

    def _flush(self, step: int) -> None:
        """Log the window's mean metrics at the end of a logging window (every ``logging_steps`` and the last)."""
        if step % self.cfg.logging_steps and step != self.cfg.max_steps:
            return
        lm = {f"train/{k}": v for k, v in mean_dicts(self.state.window).items()}
        lm.update(self.log_extra())
        if self.state.skipped_steps:
            lm["train/skipped_steps"] = float(len(self.state.skipped_steps))
        self.s.accelerator.log(lm, step=step)
        self.state.log_history.append({"step": step, **lm})
        self.state.window.clear()

    def _nonfinite(self, step: int, out: Any) -> None:
        """A step whose gradient was not finite (its update was not applied)."""
        bad_loss = self.world.any(self.bad_loss is not None)
        terms = [k for k, v in dict(out.metrics).items() if not _finite(v)]
        where = (f"the loss was not finite (non-finite terms: {', '.join(terms) or 'loss'})" if bad_loss else
                 "the loss was finite")
        where += f" and the gradient of {self.opt.nonfinite} is not finite"
        self.bad_loss = None
        if self.ckpt.on_nonfinite == "skip":
            self.state.skipped_steps.append(step)
            self._bar.update(1)
            self._flush(step)
            return
        last = f"; the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        raise TrainingError(f"step {step}: {where}; the update was not applied and the run stopped (the model is as "
                            f"after step {step - 1}{last}). Lower the learning rate, check the reward and data, or "
                            f"pass --on-nonfinite skip to skip such steps")

    def _end(self, step: int) -> bool:
        self.state.step = step
        signum = self._signals["signum"]
        stop = self.world.any(signum is not None)                    # every process stops at the same step
        due = self.ckpt.save_steps and step % self.ckpt.save_steps == 0
        if due or stop:
            path = self.save(step)
            if stop:
                name = signal.Signals(signum or signal.SIGTERM).name
                raise RunInterrupted(f"{name} received: stopped after step {step} of {self.cfg.max_steps}; checkpoint "
                                     f"{path}; continue with --resume {path}", step=step, checkpoint=str(path),
                                     signum=int(signum or signal.SIGTERM))
        return False

    # --------------------------------------------------------------------------------------------- the run

    def run(self) -> None:
        """Steps ``state.step + 1 .. max_steps`` (all of them for a fresh run)."""
        from tqdm.auto import tqdm

        self._first = self.state.step + 1
        remaining = self.cfg.max_steps - self.state.step
        if remaining < 1:
            raise InputError(f"the checkpoint is at step {self.state.step}, which max_steps={self.cfg.max_steps} "
                             f"does not exceed: pass a larger --max-steps to continue")
        self._bar = tqdm(total=self.cfg.max_steps, initial=self.state.step, desc=f"udrra {self.algo.name}",
                         disable=not self.progress)
        self.s.policy.train()
        t0 = time.time()
        try:
            with stop_signals() as flag:
                self._signals = flag
                fit(self.algo, self.producer, self.opt, steps=remaining, first_step=self._first, policy=self.s.model,
                    reference=self.s.reference, reference_update=self.update, before_step=self._before,
                    after_step=self._after, backward=self._backward, end_step=self._end, **self.fit_kwargs)
        finally:
            self._bar.close()
            self.train_time = time.time() - t0

    def summary(self) -> Dict[str, Any]:
        """The runner's part of ``metrics.json``."""
        times = self.state.step_times
        timed = times[1:] if len(times) > 1 else times
        return {"log_history": self.state.log_history, "eval_history": self.evaluator.history,
                "train_time_s": self.train_time, "seconds_per_step": sum(timed) / max(len(timed), 1),
                "seconds_per_step_note": "mean over steps after the first" if len(times) > 1 else "one step",
                "skipped_steps": self.state.skipped_steps,
                "resumed_from": None if self.resumed_from is None else str(self.resumed_from)}


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return True
