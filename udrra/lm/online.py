"""Online RL on a causal LM: any composition whose ``[source]`` is ``on_policy`` or ``on_policy_pairs``.

One step, as :func:`udrra.loop.fit` runs it (the loop the bandit, the sequence testbed and offline DPO share)::

    prompts  → rollout (generate, n per prompt)      udrra.lm.producers.OnPolicy / OnPolicyPairs .collect()
             → reward (the run's --reward)           udrra.lm.rewards.Reward
             → log-probs (old, ref; one fused op)    udrra.lm.logprobs.response_logps
             → reward estimate (advantages, GAE)     algorithm.estimate(batch)
             → (epochs ×) log-probs with gradient → loss → optimizer step      producer.attach → algorithm.loss
             → reference update (frozen / ema / reset_every)                   udrra.loop.ReferenceUpdate

The algorithm file says how the reward is used; the run says where it comes from. Nothing here looks at the
algorithm's name: PPO differs from GRPO only in the batch its ``[source]`` builds and the loss its components
derive. The run shares the offline trainer's session (accelerate, reference copy, AdamW), output contract
(atomic directory with model, tokenizer, ``algorithm.toml``, ``metrics.json``, ``tensorboard/``) and saving, and
adds ``samples.jsonl`` (generations every ``sample_steps``) and held-out generation metrics
(:func:`evaluate_generations`: mean reward, KL(π‖π_ref) k1/k3 of whole responses, length, truncation rate).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, InputError
from ..loop import ReferenceUpdate
from .data import DEFAULT_SPLIT_SEED
from .logprobs import DEFAULT_CHUNK_TOKENS, backbone_and_head, response_logps
from .parallel import World, estimate_global
from .producers import PAIR_LABELS, BestOfN, OnPolicy, OnPolicyPairs, PromptStream, RolloutContext
from .rollout import Sampling, generate
from .run import (DTYPES, atomic_run, check_output_dir, peak_rss_mb, resolve_algorithm, resolve_model, save_model,
                  setup, versions)
from .runner import Checkpointing, StepRunner, find_checkpoint, run_fingerprint

__all__ = ["OnlineConfig", "ONLINE_SOURCES", "train_online", "evaluate_generations", "is_online"]

#: the ``[source]`` kinds that sample from the policy during training
ONLINE_SOURCES = ("on_policy", "on_policy_pairs", "best_of_n")


def is_online(algo: Any) -> bool:
    """True when the algorithm's ``[source]`` samples from the policy (``on_policy``, ``on_policy_pairs``)."""
    return algo.components.source.kind in ONLINE_SOURCES


@dataclass
class OnlineConfig:
    """Options of an online run (``udrra train ALGO --prompts P --reward R ...``).

    Attributes:
        max_steps: optimizer steps; each samples ``batch_size`` prompts × ``[source] n`` responses (2 for pairs).
        batch_size: prompts per step. micro_batches: token-level batches are cut into this many micro-batches
            (one backward each, exact normalisers; memory only).
        learning_rate, critic_lr: AdamW rates of the policy and (``gae``) the critic (default: the policy's).
        max_prompt_length: prompts longer than this are cut from the left (and counted).
        sampling: :class:`udrra.lm.rollout.Sampling` (temperature, top-p, top-k, max_new_tokens).
        eval_prompts: held-out prompts evaluated before and after (and every ``eval_steps``); ``None`` =
            min(32, available); 0 = none. eval_before: also evaluate π_ref before step 1 (an ablation that
            evaluates π_ref once for many runs turns it off).
        sample_steps: write the step's generations to ``samples.jsonl`` every N steps (0 = never).
        truncated_penalty, overlong_buffer: the treatment of responses cut at ``max_new_tokens``
            (:func:`udrra.lm.rollout.shape_rewards`; 0 = keep them as they are).
        pair_labels: ``on_policy_pairs`` labels (:data:`udrra.lm.producers.PAIR_LABELS`).
        critic_init: ``"policy"`` or a reward-model directory (:class:`udrra.lm.critic.ValueModel`).
        threads: torch CPU threads for the whole run (``None``: torch's default; logged either way).
        save_steps, save_total_limit, resume, on_nonfinite: checkpoints and faults
            (:class:`udrra.lm.runner.Checkpointing`).
        Others as in :func:`udrra.lm.train.train`. ``batch_size`` is per process (the global batch is
        ``batch_size × processes``).
    """

    max_steps: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-5
    critic_lr: Optional[float] = None
    max_prompt_length: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    eval_prompts: Optional[int] = None
    eval_steps: int = 0
    eval_before: bool = True
    sample_steps: int = 10
    logging_steps: int = 1
    seed: int = 0
    split_seed: int = DEFAULT_SPLIT_SEED
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0
    weight_decay: float = 0.0
    micro_batches: int = 1
    truncated_penalty: float = 0.0
    overlong_buffer: int = 0
    pair_labels: str = "expected"
    critic_init: str = "policy"
    threads: Optional[int] = None
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    dtype: str = "float32"
    chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS
    save_steps: int = 0
    save_total_limit: Optional[int] = None
    resume: Optional[str] = None
    on_nonfinite: str = "stop"

    def validate(self) -> "OnlineConfig":
        """Raise :class:`InputError` naming the first bad option and its valid range."""
        def integer(name: str, low: int, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"{name} must be an integer >= {low}, got {v!r}")

        for name in ("max_steps", "batch_size", "micro_batches", "logging_steps", "max_prompt_length"):
            integer(name, 1)
        for name in ("eval_steps", "sample_steps", "warmup_steps", "overlong_buffer"):
            integer(name, 0)
        integer("eval_prompts", 0, allow_none=True)
        integer("threads", 1, allow_none=True)
        for name in ("learning_rate", "critic_lr"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                raise InputError(f"{name} must be a finite number > 0, got {v!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InputError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if not (isinstance(self.truncated_penalty, (int, float)) and self.truncated_penalty >= 0):
            raise InputError(f"truncated_penalty must be a number >= 0, got {self.truncated_penalty!r}")
        if self.overlong_buffer > self.sampling.max_new_tokens:
            raise InputError(f"overlong_buffer ({self.overlong_buffer}) must be <= max_new_tokens "
                             f"({self.sampling.max_new_tokens})")
        if self.pair_labels not in PAIR_LABELS:
            raise InputError(f"pair_labels must be one of {', '.join(PAIR_LABELS)}, got {self.pair_labels!r}")
        self.sampling.validate()
        Checkpointing.of(self)
        return self

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["sampling"] = asdict(self.sampling)
        return d


# ------------------------------------------------------------------------------------------------- inputs


@dataclass
class _OnlineInputs:
    """Everything validated before anything is written: algorithm, model, prompts (tokenised), reward."""

    algo: Any
    policy: Any
    tok: Any
    model_name: str
    prompts: Any               # udrra.lm.prompts.PromptData
    train_ids: List[List[int]]
    eval_texts: List[str]
    eval_ids: List[List[int]]
    truncation: Dict[str, Any]
    reward: Any                # udrra.lm.rewards.Reward


def _online_algorithm(algorithm: Any) -> Any:
    algo = resolve_algorithm(algorithm)
    kind = algo.components.source.kind
    if kind not in ONLINE_SOURCES:
        hint = ("train it on a preference dataset with --dataset" if kind == "offline_pairs" else
                "no LM sample source exists for it yet (it runs on the bandit and the sequence testbed)")
        raise ConfigError(f"algorithm {algo.name!r} has [source] kind = {kind!r}; online training needs "
                          f"{' or '.join(ONLINE_SOURCES)}: {hint}")
    rw = algo.components.reward.kind
    if not algo.pair_based and rw not in ("explicit", "max_likelihood"):
        raise ConfigError(f"algorithm {algo.name!r}: reward kind {rw!r} needs log Z(x) = log Σ_y π_ref(y|x)·"
                          f"exp(r/β), which no language model can enumerate; online LM training supports "
                          f"'explicit' rewards (policy gradient) and pair losses")
    return algo


def _load_online_inputs(algorithm: Any, model: Any, tokenizer: Any, prompts: Any, reward: Any,
                        cfg: OnlineConfig, allow_hub: bool, world: Optional[World] = None) -> _OnlineInputs:
    """Resolve and check the algorithm, reward, model and prompts (cheap checks before slow loads)."""
    from .prompts import check_prompt_source, load_prompts, tokenize_prompts
    from .rewards import load_reward

    algo = _online_algorithm(algorithm)
    reward_fn = load_reward(reward)
    check_prompt_source(prompts, allow_hub)                 # before the slow model load
    policy, tok, model_name = resolve_model(model, tokenizer, DTYPES[cfg.dtype])
    backbone_and_head(policy)
    from .prompts import PromptData

    data = prompts if isinstance(prompts, PromptData) else load_prompts(
        prompts, tok, seed=cfg.split_seed, eval_prompts=32 if cfg.eval_prompts is None else cfg.eval_prompts,
        allow_hub=allow_hub)
    n_proc = world.size if world is not None else 1
    if len(data.train) < cfg.batch_size * n_proc:
        raise InputError(f"the prompt set {data.name!r} has {len(data.train)} training prompts, fewer than the "
                         f"global batch of {cfg.batch_size * n_proc} (batch_size={cfg.batch_size} x {n_proc} processes)")
    train_ids, tstats = tokenize_prompts(tok, data.train, max_prompt_length=cfg.max_prompt_length)
    n_eval = min(32 if cfg.eval_prompts is None else cfg.eval_prompts, len(data.eval))
    eval_texts = data.eval[:n_eval]
    eval_ids, estats = tokenize_prompts(tok, eval_texts, max_prompt_length=cfg.max_prompt_length)
    return _OnlineInputs(algo, policy, tok, model_name, data, train_ids, eval_texts, eval_ids,
                         {"train": tstats.as_dict(), "eval": estats.as_dict()}, reward_fn)


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_generations(policy: Any, reference: Optional[Any], prompts: Sequence[str],
                         prompt_ids: Sequence[Sequence[int]], reward: Any, tokenizer: Any, sampling: Sampling, *,
                         seed: int, batch_size: int = 32, progress: bool = False,
                         chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS, world: Any = None) -> Dict[str, float]:
    """Held-out metrics of ``policy`` from one sampled response per prompt.

    Prompt ``i`` samples with the per-row seed ``seed_of(seed, i)`` (:func:`udrra.lm.rollout.generate`): the
    same seed at every evaluation gives common random numbers across checkpoints, and the responses do not
    depend on the batch size or on how many processes share the prompts. With several processes (``world``)
    each samples its contiguous share of the prompts and the per-response values are gathered, so every metric
    counts each prompt once. With ``d = log π(y|x) − log π_ref(y|x)`` summed over the response tokens, both at
    the sampling temperature (the KL between the distributions that actually sample), the metrics are:

    - ``reward`` (mean of the raw reward), ``reward_std``;
    - ``kl_k1`` = mean d and ``kl_k3`` = mean (e^{−d} − 1 + d): unbiased estimates of the sequence
      KL(π‖π_ref) of the first ``max_new_tokens`` tokens (DPO's frontier uses the sequence KL, §6.1 fn. 3);
      absent without a reference;
    - ``response_length`` (tokens, EOS included), ``truncated_rate``, ``distinct_2`` (distinct bigrams /
      bigrams over all responses: a reward-hacking alarm), ``n_prompts``.
    """
    if not prompts:
        return {}
    from tqdm.auto import tqdm

    from .rollout import seed_of

    start, stop = world.span(len(prompts)) if world is not None else (0, len(prompts))
    records = []                                  # (reward, length, truncated, d or None, response tokens)
    for s in tqdm(range(start, stop, batch_size), desc="eval generations", disable=not progress, leave=False):
        e = min(s + batch_size, stop)
        ro = generate(policy, prompt_ids[s:e], prompts[s:e], sampling, pad_token_id=int(tokenizer.pad_token_id),
                      eos_token_id=int(tokenizer.eos_token_id), tokenizer=tokenizer,
                      seeds=[seed_of(seed, i) for i in range(s, e)])
        r = reward(ro.row_prompts(), ro.responses).double().tolist()
        d = [None] * len(r)
        if reference is not None:
            args = (ro.input_ids, ro.attention_mask, ro.prompt_len, ro.response_mask)
            kw = dict(temperature=sampling.temperature, chunk_tokens=chunk_tokens)
            d = (response_logps(policy, *args, **kw) - response_logps(reference, *args, **kw)).sum(-1).double().tolist()
        for i, (ids, m) in enumerate(zip(ro.response_ids.tolist(), ro.response_mask.tolist())):
            toks = [t for t, k in zip(ids, m) if k > 0]
            records.append((r[i], len(toks), bool(ro.truncated[i]), d[i], toks))
    if world is not None:
        records = world.gather_objects(records)
    return _generation_metrics(records, len(prompts))


def _generation_metrics(records: List[Tuple], n_prompts: int) -> Dict[str, float]:
    """:func:`evaluate_generations`' metrics from its per-response records."""
    r = torch.tensor([x[0] for x in records], dtype=torch.float64)
    bigrams, n_bigrams = set(), 0
    for x in records:
        bigrams.update(zip(x[4], x[4][1:]))
        n_bigrams += max(len(x[4]) - 1, 0)
    out = {"reward": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
           "response_length": sum(x[1] for x in records) / len(records),
           "truncated_rate": sum(x[2] for x in records) / len(records),
           "distinct_2": len(bigrams) / max(n_bigrams, 1), "n_prompts": float(n_prompts)}
    if records[0][3] is not None:
        d = torch.tensor([x[3] for x in records], dtype=torch.float64)
        out.update(kl_k1=float(d.mean()), kl_k3=float((torch.exp(-d) - 1 + d).mean()))
    return out


class _GenerationEvaluator:
    """:func:`evaluate_generations` on the held-out prompts after a step, logged as ``eval/...``."""

    def __init__(self, inp: _OnlineInputs, s: Any, cfg: OnlineConfig, progress: bool):
        self.inp, self.s, self.cfg, self.progress = inp, s, cfg, progress
        self.history: List[Dict[str, Any]] = []

    def __call__(self, step: int) -> Dict[str, Any]:
        if not self.inp.eval_texts:
            return {}
        t0 = time.time()
        m = evaluate_generations(self.s.model, self.s.reference, self.inp.eval_texts, self.inp.eval_ids,
                                 self.inp.reward, self.inp.tok, self.cfg.sampling, seed=self.cfg.seed + 1_000_003,
                                 batch_size=max(self.cfg.batch_size, 8), progress=self.progress,
                                 chunk_tokens=self.cfg.chunk_tokens, world=self.s.world)
        m["seconds"] = time.time() - t0
        m = {f"eval/{k}": v for k, v in m.items()}
        m["step"] = step
        self.s.accelerator.log({k: v for k, v in m.items() if k != "step"}, step=step)
        self.history.append(m)
        return m


# ------------------------------------------------------------------------------------------------ training


def _epochs(algo: Any) -> int:
    return int(algo.components.source.get("epochs") or 1)


def _producer(inp: _OnlineInputs, s: Any, cfg: OnlineConfig):
    """The online producer: the gradient pass through the prepared policy (``s.policy``), generation and the
    no-grad passes on the model itself, each process drawing its shard of every global batch of prompts."""
    ctx = RolloutContext(policy=s.policy, sampler=s.model, reference=s.reference, critic=s.critic,
                         tokenizer=inp.tok, reward=inp.reward, sampling=cfg.sampling,
                         truncated_penalty=cfg.truncated_penalty, overlong_buffer=cfg.overlong_buffer,
                         pair_labels=cfg.pair_labels, chunk_tokens=cfg.chunk_tokens,
                         fuse_old_logps=_epochs(inp.algo) == 1 and (cfg.micro_batches == 1 or inp.algo.pair_based),
                         world=s.world)
    stream = PromptStream(inp.prompts.train, inp.train_ids, cfg.batch_size, cfg.seed, world=s.world)
    cls = {"on_policy_pairs": OnPolicyPairs, "best_of_n": BestOfN}.get(inp.algo.components.source.kind, OnPolicy)
    return cls(inp.algo, stream, ctx)


def _runner(inp: _OnlineInputs, s: Any, producer: Any, evaluator: _GenerationEvaluator, cfg: OnlineConfig,
            out_dir: Path, samples_path: Path, progress: bool) -> StepRunner:
    """The step loop: loss metrics + rollout statistics per step (``train/...``), generations into
    ``samples.jsonl`` every ``sample_steps`` (main process), checkpoints, faults (:class:`StepRunner`)."""
    algo = inp.algo

    def step_metrics(step: int, out: Any) -> Dict[str, float]:
        sm = {f"loss/{k}" if k != "loss" else "loss": float(v) for k, v in dict(out.metrics).items()}
        sm.update(producer.stats)
        return sm

    def on_step(step: int) -> None:
        if s.world.is_main and cfg.sample_steps and (step % cfg.sample_steps == 0 or step == 1):
            with open(samples_path, "a") as f:
                for row in producer.samples:
                    f.write(json.dumps({"step": step, **row}) + "\n")

    fit_kwargs = dict(epochs=_epochs(algo), micro_batches=cfg.micro_batches if not algo.pair_based else 1,
                      estimate=lambda batch: estimate_global(algo, batch, s.world))
    fingerprint = run_fingerprint(algo, inp.model_name, s.world, cfg, prompts=inp.prompts.name,
                                  reward=inp.reward.name)
    return StepRunner(s, algo, producer, evaluator, cfg, Checkpointing.of(cfg), out_dir, fingerprint,
                      step_metrics=step_metrics,
                      log_extra=lambda: {"train/tokens_generated": producer.tokens_generated,
                                         "train/prompts_seen": producer.prompts.prompts_seen},
                      on_step=on_step, postfix=lambda m: {"reward": f"{m['reward']:.3f}", "kl": f"{m['kl_k1']:.3f}"},
                      progress=progress, fit_kwargs=fit_kwargs)


def _make_critic(inp: _OnlineInputs, cfg: OnlineConfig) -> Any:
    if inp.algo.pair_based or inp.algo.components.reward.get("baseline") != "gae":
        return None
    from .critic import ValueModel

    if cfg.critic_init == "policy":
        return ValueModel.from_policy(inp.policy)
    return ValueModel.from_reward_model(cfg.critic_init)


def train_online(algorithm: Any, model: Any, prompts: Any, reward: Any, *, output_dir: Any, tokenizer: Any = None,
                 config: Optional[OnlineConfig] = None, overwrite: bool = False, allow_hub: bool = False,
                 progress: bool = True, verbose: bool = True) -> Dict[str, Any]:
    """Train ``model`` online with an ``on_policy`` / ``on_policy_pairs`` composition; save model and metrics.

    Under ``accelerate launch --num_processes N`` each process samples ``config.batch_size`` prompts of every
    global batch of ``N × batch_size`` (:mod:`udrra.lm.parallel`); the main process alone writes.

    Args:
        algorithm: a loaded algorithm, a catalog name or a ``.toml`` path with an online ``[source]``.
        model: as :func:`udrra.lm.train.train` (``"smollm2-135m"``, a checkpoint, a model object + ``tokenizer``).
        prompts: anything :func:`udrra.lm.prompts.load_prompts` accepts (``"tinystories"``, ``"hh-rlhf"``, ...).
        reward: anything :func:`udrra.lm.rewards.load_reward` accepts (``"vader"``, an RM directory,
            ``"module:function"``, ``"file.py:function"``, a callable).
        output_dir: written at the end via a temporary sibling (nothing is left on failure but the checkpoints
            in ``output_dir/checkpoints``).
        config: :class:`OnlineConfig` (default values when ``None``); ``save_steps`` / ``resume`` /
            ``on_nonfinite`` as in :class:`udrra.lm.runner.Checkpointing`.
    Returns:
        The ``metrics.json`` content plus ``"output_dir"``.
    Raises:
        ConfigError: the algorithm is not online, or its reward kind cannot run on an LM.
        InputError: bad options, prompts, reward or model; a reward that fails during the run (nothing written);
            a checkpoint of another run passed to ``resume``.
        TrainingError: a non-finite loss or gradient with ``on_nonfinite = "stop"``.
        RunInterrupted: SIGTERM / Ctrl-C (after a checkpoint of the last finished step).
    """
    t_start = time.time()
    cfg = (config or OnlineConfig()).validate()
    world = World()
    out_dir = check_output_dir(output_dir, overwrite, cfg.resume)
    resume = find_checkpoint(cfg.resume) if cfg.resume else None
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    inp = _load_online_inputs(algorithm, model, tokenizer, prompts, reward, cfg, allow_hub, world)
    result = atomic_run(out_dir, lambda tmp_dir: _run_online(inp, cfg, tmp_dir, out_dir, resume, world,
                                                             progress=progress, verbose=verbose), t_start, world)
    if verbose and world.is_main:
        _print_online_summary(result, out_dir)
    return result


def _run_online(inp: _OnlineInputs, cfg: OnlineConfig, tmp_dir: Path, out_dir: Path, resume: Optional[Path],
                world: World, *, progress: bool, verbose: bool) -> Dict[str, Any]:
    """Set up the session, then :func:`_train_and_save` (the session is closed if that fails)."""
    critic = _make_critic(inp, cfg)
    s = setup(inp.policy, inp.algo, cfg, tmp_dir, critic=critic, critic_lr=cfg.critic_lr, world=world)
    try:
        return _train_and_save(inp, cfg, s, critic, tmp_dir, out_dir, resume, progress=progress, verbose=verbose)
    except BaseException:
        s.close()
        raise


def _train_and_save(inp: _OnlineInputs, cfg: OnlineConfig, s: Any, critic: Any, tmp_dir: Path, out_dir: Path,
                    resume: Optional[Path], *, progress: bool, verbose: bool) -> Dict[str, Any]:
    """Evaluate, train (or resume), evaluate, save into ``tmp_dir``; returns the metrics."""
    algo = inp.algo
    if s.log_with:
        s.accelerator.init_trackers("tensorboard", config={"algorithm": str(algo.name), "beta": float(algo.beta),
                                                           "model": inp.model_name, "prompts": inp.prompts.name,
                                                           "reward": inp.reward.name})
    show = progress and s.accelerator.is_local_main_process
    if verbose and s.world.is_main:
        _print_online_header(inp, s, cfg, critic)
    evaluator = _GenerationEvaluator(inp, s, cfg, show)
    producer = _producer(inp, s, cfg)
    samples_path = tmp_dir / "samples.jsonl"
    runner = _runner(inp, s, producer, evaluator, cfg, out_dir, samples_path, show)
    if resume is not None:
        runner.resume(resume)
        if s.world.is_main and (resume / "samples.jsonl").is_file():
            shutil.copyfile(resume / "samples.jsonl", samples_path)
    else:
        runner.state.eval_before = evaluator(0) if cfg.eval_before else {}
    runner.extra_files.append(samples_path)
    runner.run()
    after = evaluator(cfg.max_steps)
    save_model(s, inp.tok, algo, tmp_dir, cfg.gradient_checkpointing)
    src = algo.components.source
    result = {
        "config": cfg.as_dict(),
        "algorithm": {"name": str(algo.name), "beta": float(algo.beta), "source": src.kind,
                      "n": 2 if src.kind == "on_policy_pairs" else int(src.get("n") or 1),
                      "reference_update": ReferenceUpdate.of(algo.components.reference).rule,
                      "target": algo.derived_target().kind},
        "model": {"name": inp.model_name, "class": type(s.model).__name__, "parameters": int(s.n_params),
                  "critic": None if critic is None else {"init": critic.init,
                                                         "parameters": sum(p.numel() for p in critic.parameters())}},
        "prompts": {"summary": inp.prompts.describe(), **inp.prompts.info, "truncation": inp.truncation},
        "reward": {"name": inp.reward.name, "kind": inp.reward.kind},
        "parallel": s.world.layout(cfg.batch_size, "prompts"),
        "eval_before": runner.state.eval_before, "eval_after": after,
        **runner.summary(),
        "prompts_seen": producer.prompts.prompts_seen, "tokens_generated": producer.tokens_generated,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(), "versions": versions(), "device": str(s.accelerator.device),
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if s.log_with:
        s.accelerator.end_training()
    return result


def _print_online_header(inp: _OnlineInputs, s: Any, cfg: OnlineConfig, critic: Any) -> None:
    algo, src = inp.algo, inp.algo.components.source
    n = 2 if src.kind == "on_policy_pairs" else int(src.get("n") or 1)
    print(f"[udrra train] {algo.name} (beta={float(algo.beta):g}, {src.kind}, n={n}) on {inp.model_name} "
          f"({s.n_params:,} parameters, {s.accelerator.device}, {torch.get_num_threads()} torch threads)")
    print(f"[udrra train] prompts: {inp.prompts.describe()}; reward: {inp.reward.name}")
    sp = cfg.sampling
    print(f"[udrra train] {cfg.batch_size} prompts x {n} responses per step, T={sp.temperature:g}, "
          f"top_p={sp.top_p:g}, top_k={sp.top_k}, max_new_tokens={sp.max_new_tokens}; "
          f"eval on {len(inp.eval_texts)} held-out prompts")
    if critic is not None:
        print(f"[udrra train] critic: {critic.init}")


def _print_online_summary(r: Dict[str, Any], out_dir: Path) -> None:
    print(f"[udrra train] done: {r['config']['max_steps']} steps in {r['train_time_s']:.1f}s "
          f"({r['seconds_per_step']:.2f}s/step), peak RSS {r['peak_rss_mb'] or float('nan'):.0f} MB -> {out_dir}")
    b, a = r.get("eval_before") or {}, r.get("eval_after") or {}
    if b or a:
        print(f"[udrra train] held-out ({int(b.get('eval/n_prompts', a.get('eval/n_prompts', 0)))} prompts, "
              f"one sample each):")
        print(f"    {'metric':<18}{'before':>12}{'after':>12}")
        for k in ("reward", "kl_k1", "kl_k3", "response_length", "truncated_rate", "distinct_2"):
            kb, ka = b.get(f"eval/{k}"), a.get(f"eval/{k}")
            if kb is None and ka is None:
                continue
            fmt = lambda x: f"{x:12.4f}" if isinstance(x, (int, float)) else f"{'-':>12}"
            print(f"    {k:<18}{fmt(kb)}{fmt(ka)}")
