"""The run around a training loop, shared by every LM trainer (offline pairs, online RL, reward models).

- inputs: :func:`resolve_algorithm`, :func:`resolve_model` (a name / path / model object → model, tokenizer);
- the session: :func:`setup` (accelerate, seeds, dropout off, the reference copy, AdamW over the policy and an
  optional critic, the warm-up schedule) → :class:`Session`; :class:`ClippedStep` is the optimizer the loop steps;
- the output contract: :func:`check_output_dir` before anything is loaded, :func:`temp_output_dir` for the run,
  :func:`finish` (``metrics.json`` then an atomic rename into place) or :func:`discard` on failure, so a failed
  run leaves nothing behind; :func:`save_model` writes model, tokenizer and ``algorithm.toml``;
- facts for ``metrics.json``: :func:`peak_rss_mb`, :func:`versions`, :func:`mean_dicts`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from ..errors import ConfigError, InputError

__all__ = ["DTYPES", "resolve_algorithm", "resolve_model", "disable_dropout", "check_output_dir",
           "temp_output_dir", "discard", "finish", "atomic_run", "RunSettings", "Session", "setup", "ClippedStep",
           "save_model", "peak_rss_mb", "CHECKPOINTS",
           "json_default", "versions", "mean_dicts"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_algorithm(algorithm: Any) -> Any:
    if isinstance(algorithm, (str, Path)):
        import udrra

        return udrra.load(str(algorithm))
    for attr in ("name", "beta", "pair_based", "loss", "to_toml", "components"):
        if not hasattr(algorithm, attr):
            raise ConfigError(f"algorithm must be a name, a .toml path or a loaded udrra algorithm; "
                              f"{type(algorithm).__name__} has no attribute {attr!r}")
    return algorithm


def check_output_dir(output_dir: Any, overwrite: bool, resume: Any = None) -> Path:
    """The resolved output directory, refused when it exists and is not empty, unless ``overwrite`` or the run
    resumes from a checkpoint inside it (``OUTPUT/checkpoints/checkpoint-K``)."""
    if output_dir is None or str(output_dir) == "":
        raise InputError("output_dir is required")
    out = Path(output_dir).expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise InputError(f"output_dir {out} exists and is not a directory")
        rp = Path(resume).expanduser().resolve() if resume is not None else None
        inside = rp is not None and (rp == out or out in rp.parents)
        if any(out.iterdir()) and not overwrite and not inside:
            raise InputError(f"output_dir {out} exists and is not empty; pass overwrite=True (--overwrite) to "
                             f"replace it, or resume=DIR (--resume DIR) to continue from one of its checkpoints")
    return out


def resolve_model(model: Any, tokenizer: Any, dtype: torch.dtype) -> Tuple[Any, Any, str]:
    if isinstance(model, (tuple, list)) and len(model) == 2:
        model, tokenizer = model
    if isinstance(model, (str, Path)):
        from .models import load_model_and_tokenizer

        m, t = load_model_and_tokenizer(model, dtype=dtype)
        return m, (tokenizer or t), str(model)
    if tokenizer is None:
        raise InputError("pass tokenizer=... when model is a model object (or pass a name / path / "
                         "(model, tokenizer) tuple)")
    if tokenizer.eos_token_id is None:
        raise InputError("tokenizer has no eos token; responses need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return model, tokenizer, str(name)


def disable_dropout(model: Any) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def mean_dicts(ds: Sequence[Tuple[float, Dict[str, float]]]) -> Dict[str, float]:
    """Weighted mean of metric dicts [(weight, dict)]."""
    tot: Dict[str, float] = {}
    wsum: Dict[str, float] = {}
    for w, d in ds:
        for k, v in d.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            tot[k] = tot.get(k, 0.0) + w * v
            wsum[k] = wsum.get(k, 0.0) + w
    return {k: tot[k] / wsum[k] for k in tot if wsum[k] > 0}


def temp_output_dir(out_dir: Path) -> Tuple[Path, List[Path]]:
    """Create ``out_dir``'s parents and a fresh temporary sibling; returns it and the parents created (deepest
    first)."""
    created_parents = []
    p = out_dir.parent
    while not p.exists():
        created_parents.append(p)
        p = p.parent
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    return tmp_dir, created_parents


def discard(tmp_dir: Path, created_parents: List[Path], s: Optional["Session"] = None) -> None:
    """After a failure: close the session's trackers (if given), remove the temporary directory and the parents
    created for it."""
    if s is not None:
        s.close()
    shutil.rmtree(tmp_dir, ignore_errors=True)
    for q in created_parents:  # parents we made, deepest first
        try:
            q.rmdir()
        except OSError:
            break


@dataclass
class Session:
    """The prepared training objects.

    Attributes:
        accelerator: the run's ``Accelerator``. world: its processes (:class:`udrra.lm.parallel.World`).
        policy: the policy as a :class:`udrra.lm.logprobs.LogProbModel`, prepared by accelerate (DDP across
            processes): every gradient pass goes through it. model: the causal LM itself (``generate``, no-grad
            passes, evaluation, saving); ``unwrapped`` is the same object.
        reference: π_ref (None without one). critic: the prepared :class:`udrra.lm.critic.ValueModel` or None.
        optimizer, scheduler: AdamW over ``trainable`` (policy group first, then the critic's) and its schedule.
        param_names: ``id(parameter) → name`` of every trainable parameter (fault messages).
    """

    accelerator: Any
    log_with: Optional[str]
    policy: Any
    model: Any
    reference: Any
    optimizer: Any
    scheduler: Any
    trainable: List[torch.Tensor]
    n_params: int
    world: Any = None
    critic: Any = None
    param_names: Optional[Dict[int, str]] = None

    @property
    def unwrapped(self) -> Any:
        return self.model

    def close(self) -> None:
        """End the trackers (tensorboard) after a failure; never raises."""
        if self.log_with:
            try:
                self.accelerator.end_training()
            except Exception:
                pass


class RunSettings(Protocol):
    """What :func:`setup` reads from a run's typed configuration (:class:`udrra.lm.train.PairConfig`,
    :class:`udrra.lm.online.OnlineConfig`)."""

    seed: int
    disable_dropout: bool
    gradient_checkpointing: bool
    learning_rate: float
    weight_decay: float
    warmup_steps: int


def setup(policy: Any, algo: Any, cfg: RunSettings, tmp_dir: Path, critic: Any = None,
          critic_lr: Optional[float] = None, world: Any = None) -> Session:
    """Seed, accelerate (tensorboard logs into ``tmp_dir`` on the main process when available), dropout off,
    gradient checkpointing, the reference copy, AdamW and the linear warm-up schedule; the policy is wrapped in a
    :class:`udrra.lm.logprobs.LogProbModel` and prepared (DDP under ``accelerate launch``). Gradient accumulation
    is :func:`udrra.loop.fit`'s (``accumulate``), so the accelerator accumulates nothing itself. A ``critic``
    (``gae``) joins the optimizer as its own parameter group with learning rate ``critic_lr`` and is prepared
    too. Every process seeds with ``cfg.seed`` (sampling draws per-row seeds, :func:`udrra.lm.rollout.seed_of`)."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available, set_seed

    from .logprobs import LogProbModel
    from .parallel import World

    set_seed(cfg.seed)
    log_with = "tensorboard" if is_tensorboard_available() else None
    accelerator = Accelerator(log_with=log_with, project_dir=str(tmp_dir))
    _check_distributed_type(accelerator)
    world = world or World(accelerator.state)
    if cfg.disable_dropout:
        disable_dropout(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.to(accelerator.device)
    reference = None
    if bool(getattr(algo, "uses_reference", True)):
        from .models import make_reference

        reference = make_reference(policy).to(accelerator.device)
    n_params = sum(p.numel() for p in policy.parameters())
    names = {id(p): n for n, p in policy.named_parameters() if p.requires_grad}
    trainable = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"params": trainable}]
    if critic is not None:
        if cfg.disable_dropout:
            disable_dropout(critic)
        critic.to(accelerator.device)
        critic_params = [p for p in critic.parameters() if p.requires_grad]
        names.update({id(p): f"critic.{n}" for n, p in critic.named_parameters() if p.requires_grad})
        groups.append({"params": critic_params, "lr": critic_lr or cfg.learning_rate})
        trainable = trainable + critic_params
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0
                                                  else 1.0)
    if critic is not None:
        scorer, critic, optimizer, scheduler = accelerator.prepare(LogProbModel(policy), critic, optimizer,
                                                                   scheduler)
    else:
        scorer, optimizer, scheduler = accelerator.prepare(LogProbModel(policy), optimizer, scheduler)
    return Session(accelerator, log_with, scorer, policy, reference, optimizer, scheduler, trainable, n_params,
                   world=world, critic=critic, param_names=names)


#: why udrra's trainer does not run under these accelerate engines yet (configs/fsdp.yaml, zero2/3.yaml)
UNSUPPORTED_ENGINES = {
    "FSDP": "rollouts, the no-grad log-prob passes and evaluation call the model itself, whose parameters stay "
            "sharded outside the prepared module's forward (generate fails on DTensor parameters)",
    "DEEPSPEED": "accelerator.backward steps the DeepSpeed engine at every call (udrra's gradient accumulation and "
                 "micro-batches would step it too often), the engine clips all parameters together (udrra clips "
                 "the policy and the critic separately), and under ZeRO-3 the lm_head weight the fused log-prob op "
                 "reads is an empty placeholder",
}


def _check_distributed_type(accelerator: Any) -> None:
    """Refuse FSDP and DeepSpeed (:data:`UNSUPPORTED_ENGINES`) with the reason, before any step is taken."""
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind in UNSUPPORTED_ENGINES:
        raise ConfigError(f"udrra train does not support accelerate's {kind} yet: {UNSUPPORTED_ENGINES[kind]}; use "
                          f"DDP (configs/ddp.yaml, or accelerate launch --multi_gpu --num_processes N)")


class ClippedStep:
    """The optimizer :func:`udrra.loop.fit` steps: gradient clipping, then the prepared AdamW and the LR schedule,
    then the gradients are released. The policy's and the critic's parameter groups are clipped separately (as
    verl's actor and critic workers do), so value-loss gradients never shrink the policy's step; ``grad_norm``
    and ``critic_grad_norm`` keep the last norms (NaN without a critic).

    A non-finite gradient norm (NaN/inf anywhere; the same on every process, since gradients are all-reduced
    first) skips the update: no optimizer or scheduler step, gradients dropped, and ``nonfinite`` names the
    first parameter whose gradient is not finite (``None`` after a good step). The trainer then stops or counts
    the step (``on_nonfinite``)."""

    def __init__(self, s: Session, max_grad_norm: Optional[float]):
        self.s, self.max_grad_norm = s, max_grad_norm
        self.grad_norm = self.critic_grad_norm = float("nan")
        self.nonfinite: Optional[str] = None

    def zero_grad(self) -> None:
        self.s.optimizer.zero_grad(set_to_none=True)

    def _norms(self) -> List[float]:
        out = []
        for g in self.s.optimizer.param_groups:
            if self.max_grad_norm is not None:
                out.append(float(self.s.accelerator.clip_grad_norm_(g["params"], self.max_grad_norm)))
            else:
                grads = [p.grad for p in g["params"] if p.grad is not None]
                out.append(float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0)
        return out

    def _first_nonfinite(self) -> str:
        names = self.s.param_names or {}
        for g in self.s.optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    return names.get(id(p), f"parameter of shape {tuple(p.shape)}")
        return "(none found after clipping)"

    def step(self) -> None:
        norms = self._norms()
        self.grad_norm = norms[0]
        self.critic_grad_norm = norms[1] if len(norms) > 1 else float("nan")
        self.nonfinite = None
        if not all(math.isfinite(n) for n in norms):
            self.nonfinite = self._first_nonfinite()
        else:
            self.s.optimizer.step()
            self.s.scheduler.step()
        self.s.optimizer.zero_grad(set_to_none=True)


def save_model(s: Session, tok: Any, algo: Any, tmp_dir: Path, gradient_checkpointing: bool) -> None:
    """The trained model, tokenizer and ``algorithm.toml`` into ``tmp_dir`` (:func:`finish` sets the file modes).
    Every process takes part (``get_state_dict`` gathers sharded parameters); only the main process writes."""
    from .models import strip_quantization_marker

    state = s.accelerator.get_state_dict(s.policy)          # keys of the LogProbModel: "model.<name>"
    if not s.accelerator.is_main_process:
        return
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    model = s.model
    strip_quantization_marker(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.save_pretrained(str(tmp_dir), state_dict=state, safe_serialization=True)
    tok.save_pretrained(str(tmp_dir))
    (tmp_dir / "algorithm.toml").write_text(algo.to_toml())


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process in MiB (Linux ru_maxrss is in KiB); None where unavailable."""
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, AttributeError):
        return None
    return kb / (1024.0 * 1024.0) if sys.platform == "darwin" else kb / 1024.0


def json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def versions() -> Dict[str, str]:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "accelerate", "datasets"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            pass
    return v


#: the folder of an output directory that holds the run's checkpoints (``checkpoint-K``)
CHECKPOINTS = "checkpoints"


def finish(result: Dict[str, Any], tmp_dir: Path, out_dir: Path) -> None:
    """Write ``metrics.json`` into ``tmp_dir``, give every file the umask's default mode (some writers create 0600
    temporary files), and move the folder into place as ``out_dir`` (replacing an old one). The run's
    checkpoints (``out_dir/checkpoints``, written during the run) move into the new folder first."""
    (tmp_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=json_default))
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp_dir.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)
    if (out_dir / CHECKPOINTS).is_dir() and not (tmp_dir / CHECKPOINTS).exists():
        os.replace(out_dir / CHECKPOINTS, tmp_dir / CHECKPOINTS)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)


def atomic_run(out_dir: Path, body: Callable[[Path], Dict[str, Any]], t_start: float,
               world: Any = None) -> Dict[str, Any]:
    """The output contract of every trainer: ``body(tmp_dir)`` runs with a fresh temporary sibling of ``out_dir``,
    writes the run's files there and returns ``metrics.json``'s content; then :func:`finish` (with
    ``wall_time_s`` since ``t_start``), or on any failure (a bad reward, Ctrl-C) :func:`discard`, so nothing is
    left behind but the checkpoints saved under ``out_dir/checkpoints``. Returns the result plus
    ``output_dir``. ``body`` closes its own session on failure (:meth:`Session.close`).

    With several processes (``world``), the main process creates, finishes or discards the directory; the
    others run ``body`` with the same path and write nothing; everyone waits for the main process at the end."""
    main = world is None or world.is_main
    tmp_dir, created_parents = temp_output_dir(out_dir) if main else (None, [])
    if world is not None:
        tmp_dir = Path(world.broadcast_object(str(tmp_dir) if main else None))
    try:
        result = body(tmp_dir)
        result["wall_time_s"] = time.time() - t_start
        if main:
            finish(result, tmp_dir, out_dir)
    except BaseException:
        if main:
            discard(tmp_dir, created_parents)
        raise
    if world is not None:
        world.barrier()
    result["output_dir"] = str(out_dir)
    return result
