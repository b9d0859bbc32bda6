"""udrra.lm: training causal language models with any udrra composition, offline or online, through the loop
and the losses the bandit and the sequence testbed verify.

Modules (imported lazily, so ``import udrra.lm`` does not import transformers), in data-flow order:

* :mod:`udrra.lm.models`    ``load_model_and_tokenizer``, ``make_reference`` (SmolLM2-135M offline, or any HF causal LM)
* :mod:`udrra.lm.data`      ``load_preference_data`` (TRL format, HH-RLHF dialogues, built-in ``hh-rlhf`` and
  ``ultrafeedback-1200``), ``tokenize_pair`` / ``tokenize_pairs`` (truncation that keeps every response),
  ``collate_pairs``
* :mod:`udrra.lm.prompts`   ``load_prompts`` (prompt-only data for on-policy rollouts: built-in ``tinystories``,
  ``hh-rlhf``, ``ultrafeedback-1200`` or TRL prompt-only rows), ``tokenize_prompts`` (left truncation)
* :mod:`udrra.lm.rollout`   ``generate`` (n samples per prompt, left padding, KV cache, a seed per row), ``seed_of``,
  ``Sampling``, ``Rollout``,
  ``shape_rewards`` (truncated responses: keep, penalty, DAPO overlong shaping)
* :mod:`udrra.lm.rewards`   ``load_reward`` (``vader``, a reward-model checkpoint, ``module:function``,
  ``file.py:function``), ``last_token_scores``
* :mod:`udrra.lm.logprobs`  ``response_logps`` / ``sequence_logps`` (the one log-prob op, at the sampling
  temperature) and ``token_logps`` (its swap point)
* :mod:`udrra.lm.critic`    ``ValueModel`` (the ``gae`` critic: value head on a policy or reward-model backbone)
* :mod:`udrra.lm.producers` the sample source of each ``[source]`` kind for :func:`udrra.loop.fit`:
  ``OfflinePairs``, ``OnPolicy``, ``OnPolicyPairs``
* :mod:`udrra.lm.parallel`  ``World`` (the processes of an ``accelerate launch`` run: shards, gathers),
  ``estimate_global`` (batch-wide reward estimates over every process), ``resolve_batch_size``
* :mod:`udrra.lm.runner`    ``StepRunner`` (the step loop of every LM trainer: logging, evaluation, checkpoints,
  ``--resume``, non-finite steps, SIGTERM / Ctrl-C), ``Checkpointing``, ``find_checkpoint``
* :mod:`udrra.lm.run`       the run around the loop: session, output directory, saving
* :mod:`udrra.lm.train`     ``train`` (offline pairs; import it as ``from udrra.lm.train import train``: the name is
  also the submodule), ``evaluate``, ``sampled_kl``, and the ``udrra train`` CLI (``add_train_arguments``,
  ``run_from_args``), which sends online compositions to
* :mod:`udrra.lm.online`    ``train_online``, ``OnlineConfig``, ``evaluate_generations``
* :mod:`udrra.lm.train_rm`  ``train_reward_model`` (``udrra train-rm``: a Bradley–Terry reward model)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model_and_tokenizer": "models", "make_reference": "models", "strip_quantization_marker": "models",
    "load_preference_data": "data", "PreferencePair": "data", "PreferenceData": "data", "TokenizedPair": "data",
    "TruncationStats": "data", "tokenize_pair": "data", "tokenize_pairs": "data", "collate_pairs": "data",
    "split_hh_dialogue": "data", "stratified_split": "data", "rows_to_pairs": "data",
    "load_prompts": "prompts", "tokenize_prompts": "prompts", "PromptData": "prompts", "PromptTruncation": "prompts",
    "BUILTIN_PROMPTS": "prompts", "DEFAULT_EVAL_PROMPTS": "prompts",
    "sequence_logps": "logprobs", "token_logps": "logprobs",
    "evaluate": "train", "sampled_kl": "train", "add_train_arguments": "train",
    "run_from_args": "train", "OfflinePairs": "producers", "OnPolicy": "producers", "OnPolicyPairs": "producers",
    "PromptStream": "producers", "RolloutContext": "producers",
    "generate": "rollout", "Sampling": "rollout", "Rollout": "rollout", "shape_rewards": "rollout",
    "response_logps": "logprobs", "ValueModel": "critic",
    "train_online": "online", "OnlineConfig": "online", "evaluate_generations": "online",
    "load_reward": "rewards", "Reward": "rewards", "RewardError": "rewards", "last_token_scores": "rewards",
    "train_reward_model": "train_rm", "seed_of": "rollout", "LogProbModel": "logprobs",
    "World": "parallel", "estimate_global": "parallel", "resolve_batch_size": "parallel",
    "StepRunner": "runner", "Checkpointing": "runner", "find_checkpoint": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'udrra.lm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
