"""udrra.lm: preference training of causal language models with any pair-based udrra algorithm.

Modules (imported lazily, so ``import udrra.lm`` does not import transformers):

* :mod:`udrra.lm.models`   ``load_model_and_tokenizer``, ``make_reference`` (SmolLM2-135M offline, or any HF causal LM)
* :mod:`udrra.lm.data`     ``load_preference_data`` (TRL format, HH-RLHF dialogues, built-in ``hh-rlhf`` and
  ``ultrafeedback-1200``), ``tokenize_pair`` / ``tokenize_pairs`` (truncation that keeps every response),
  ``collate_pairs``
* :mod:`udrra.lm.logprobs` ``sequence_logps`` (the one log-prob path) and ``token_logps`` (its swap point)
* :mod:`udrra.lm.producers` ``OfflinePairs``: the sample source of offline pair training for :func:`udrra.loop.fit`
* :mod:`udrra.lm.train`    ``train`` (import it as ``from udrra.lm.train import train``: the name is also the submodule), ``evaluate``, ``sampled_kl``, ``add_train_arguments``, ``run_from_args``
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model_and_tokenizer": "models", "make_reference": "models", "strip_quantization_marker": "models",
    "load_preference_data": "data", "PreferencePair": "data", "PreferenceData": "data", "TokenizedPair": "data",
    "TruncationStats": "data", "tokenize_pair": "data", "tokenize_pairs": "data", "collate_pairs": "data",
    "split_hh_dialogue": "data", "stratified_split": "data", "rows_to_pairs": "data",
    "sequence_logps": "logprobs", "token_logps": "logprobs",
    "evaluate": "train", "sampled_kl": "train", "add_train_arguments": "train",
    "run_from_args": "train", "OfflinePairs": "producers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'udrra.lm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
