"""Rewards chosen per run: one :class:`Reward` type for programmatic scores, Python functions and trained reward
models, all validated in one place.

:func:`load_reward` turns a *spec* into a :class:`Reward`:

``"vader"``
    VADER compound sentiment (Hutto & Gilbert 2014; PyPI ``vadersentiment==3.3.2``, MIT) of the RESPONSE text
    only, in [-1, 1]; the prompt is ignored. One ``SentimentIntensityAnalyzer`` per :class:`Reward`. Always the
    keyword, even if a directory called ``vader`` exists (write ``./vader`` for that).
a directory
    A sequence-classification checkpoint with one output (``num_labels == 1``), e.g. one written by
    ``udrra train-rm`` (:mod:`udrra.lm.train_rm`), loaded with ``local_files_only=True``. Scored on prompt +
    response by :func:`last_token_scores` in batches, without gradient, in eval mode (see "Reward-model
    scoring" below).
``"module.sub:function"`` / ``"path/to/file.py:function"``
    A function ``f(prompts: list[str], responses: list[str]) -> list[float]``, imported with ``importlib``
    (a spec whose part before the last ``:`` ends in ``.py`` or contains a path separator is a file, loaded
    from that file).
a Python callable
    The same signature, passed directly; its name is its ``__qualname__``.

Validation (:meth:`Reward.__call__`, the one place): a reward that raises, returns the wrong number of values,
a non-number (``str``, ``None``, ...), NaN, ±inf, or a value that overflows float32 raises :class:`RewardError`
(an :class:`~udrra.errors.InputError`) with a one-line message naming the reward and the first bad row. Python
``bool`` counts as a number (0/1).

Reward-model scoring
--------------------
The score of a sequence is the score head applied to the backbone's hidden state at the LAST REAL token of the
row, found from the attention mask (the largest position whose mask is 1), so it does not depend on the padding
side, on the batch it is in, or on whether the pad id equals the eos id. Transformers' own
``*ForSequenceClassification.forward`` locates that token from ``input_ids != pad_token_id`` (older versions:
the first pad token), which is wrong when pad == eos, as in SmolLM2 (transformers#35352): a response ending in
eos is read one token early, and one with an eos inside is read at the wrong place. udrra therefore runs the
backbone (with position ids counted over real tokens, so left padding gives the same positions as no padding)
and the ``score`` head itself.

Text convention: udrra scores ``prompt + response`` AS GIVEN, with no eos appended (TRL and OpenRLHF append eos
and read the score there). A rollout that stopped already carries its eos in the response text; one cut at the
length limit does not. ``udrra train-rm`` trains with the same convention (responses not followed by eos), so a
reward model it writes is scored exactly as it was trained. Prompt and response are tokenised separately
(``add_special_tokens=False``, the tokenizer's bos prepended when it adds one by default) and concatenated,
as :func:`udrra.lm.data.tokenize_pairs` does, so token boundaries never depend on the join.

The returned rewards are a ``(B,)`` float32 tensor on the CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["RewardError", "Reward", "load_reward", "last_token_scores", "score_head", "load_reward_model",
           "is_sequence_classification_dir", "VADER_INSTALL_HINT", "SPEC_FORMS"]

_F32_MAX = float(torch.finfo(torch.float32).max)
VADER_INSTALL_HINT = "pip install --no-deps vadersentiment==3.3.2"

#: The accepted forms of a reward spec, quoted in error messages.
SPEC_FORMS = ("'vader' (VADER compound sentiment of the response), a directory holding a sequence-classification "
              "reward model with one output, 'module.sub:function' or 'path/to/file.py:function' naming "
              "f(prompts: list[str], responses: list[str]) -> list[float], or a Python callable with that "
              "signature")


class RewardError(InputError):
    """A reward spec is invalid, or a reward function failed or returned unusable values (wrong count,
    non-number, NaN, ±inf). The message names the reward and the first bad row."""


# ------------------------------------------------------------------------------------------ helpers


def _snip(text: Any, n: int = 24) -> str:
    """A short one-line quote of ``text`` for error messages."""
    s = str(text)
    if len(s) > n:
        s = s[:n] + "…"
    return repr(s)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else ""


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:  # functools.partial, callable instances
        inner = getattr(fn, "func", None)
        name = (getattr(inner, "__qualname__", None) if inner is not None else None) or type(fn).__qualname__
    return str(name)


# ------------------------------------------------------------------------------------------- Reward


class Reward:
    """A reward function ``(prompts, responses) -> (B,) float32`` with validated output.

    Attributes:
        name: what it was loaded from (``"vader"``, ``"pkg.mod:fn"``, ``"/path/rm_dir"``, or a callable's
            ``__qualname__``); every error message names it.
        kind: ``"vader"``, ``"function"`` or ``"reward_model"``.
        fn: the underlying ``fn(prompts: list[str], responses: list[str]) -> sequence of numbers``.
        model, tokenizer: the reward model and its tokenizer (``kind == "reward_model"``), else ``None``.
    """

    def __init__(self, name: str, fn: Callable[[List[str], List[str]], Any], *, kind: str = "function",
                 model: Any = None, tokenizer: Any = None):
        if not callable(fn):
            raise RewardError(f"reward {name!r}: {type(fn).__name__} object is not callable")
        self.name, self.fn, self.kind, self.model, self.tokenizer = str(name), fn, kind, model, tokenizer

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, kind={self.kind!r})"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """Score ``responses[i]`` as a reply to ``prompts[i]``.

        Returns:
            ``(B,)`` float32 CPU tensor of finite rewards.

        Raises:
            RewardError: mismatched inputs, or the function raised / returned the wrong count, a non-number,
                NaN, ±inf or a value beyond float32's range. One line naming the reward and the first bad row.
        """
        if isinstance(prompts, str) or isinstance(responses, str):
            raise RewardError(f"reward {self.name!r}: prompts and responses must be sequences of strings, not a "
                              f"single string")
        prompts, responses = list(prompts), list(responses)
        n = len(responses)
        if len(prompts) != n:
            raise RewardError(f"reward {self.name!r}: got {len(prompts)} prompts for {n} responses")
        try:
            out = self.fn(prompts, responses)
        except Exception as e:  # any failure of user code becomes one clear error
            raise RewardError(f"reward {self.name!r} raised {type(e).__name__}: {_first_line(e)} on a batch of "
                              f"{n} responses") from e
        values = self._as_list(out, n)
        res = torch.empty(n, dtype=torch.float32)
        for i, v in enumerate(values):
            where = f"for row {i} (prompt {_snip(prompts[i])}, response {_snip(responses[i])})"
            if isinstance(v, Tensor):
                if v.numel() != 1:
                    raise RewardError(f"reward {self.name!r} returned a tensor of shape {tuple(v.shape)} {where}; "
                                      f"rewards must be finite numbers, one per response")
                v = v.item()
            elif hasattr(v, "item") and hasattr(v, "dtype") and getattr(v, "size", 1) == 1:  # numpy scalar
                v = v.item()
            if not isinstance(v, numbers.Real):
                raise RewardError(f"reward {self.name!r} returned a {type(v).__name__} ({_snip(v, 16)}) {where}; "
                                  f"rewards must be finite numbers")
            f = float(v)
            if not math.isfinite(f):
                raise RewardError(f"reward {self.name!r} returned {f} {where}; rewards must be finite numbers")
            if abs(f) > _F32_MAX:
                raise RewardError(f"reward {self.name!r} returned {f:g} {where}, which overflows float32; rewards "
                                  f"must be finite float32 numbers")
            res[i] = f
        return res

    def _as_list(self, out: Any, n: int) -> List[Any]:
        if isinstance(out, Tensor):
            if out.dim() != 1:
                raise RewardError(f"reward {self.name!r} returned a tensor of shape {tuple(out.shape)} for {n} "
                                  f"responses; expected shape ({n},)")
            out = out.detach().cpu().tolist()
        elif hasattr(out, "tolist") and hasattr(out, "ndim"):  # numpy array
            if out.ndim != 1:
                raise RewardError(f"reward {self.name!r} returned an array of shape {tuple(out.shape)} for {n} "
                                  f"responses; expected shape ({n},)")
            out = out.tolist()
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or not hasattr(out, "__iter__"):
            raise RewardError(f"reward {self.name!r} returned {type(out).__name__} ({_snip(out, 16)}); expected a "
                              f"list of {n} numbers, one per response")
        out = list(out)
        if len(out) != n:
            raise RewardError(f"reward {self.name!r} returned {len(out)} values for {n} responses")
        return out


# --------------------------------------------------------------------------------------- reward model


def score_head(model: Any) -> Tuple[Any, Any]:
    """``(backbone, score)`` of a causal sequence-classification model (``LlamaForSequenceClassification`` and
    the other ``GenericForSequenceClassification`` models: ``model.<base_model_prefix>`` and ``model.score``).

    Raises:
        InputError: the model has no ``score`` head or no separate backbone (e.g. BERT-style classifiers, which
            pool differently), naming its class.
    """
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    head = getattr(model, "score", None)
    if backbone is None or backbone is model or not isinstance(head, torch.nn.Module) or \
            not hasattr(head, "weight"):
        raise InputError(f"{type(model).__name__} is not supported as a reward model: udrra needs a causal "
                         f"sequence-classification model with a backbone (`model.{prefix}`) and a linear `score` "
                         f"head (e.g. LlamaForSequenceClassification)")
    return backbone, head


def last_token_scores(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Per-sequence scores of a reward model, read at the last real token of each row.

    Runs ``model``'s backbone with position ids counted over real tokens (``cumsum(mask) - 1``), takes the
    final hidden state at the largest position whose ``attention_mask`` is 1, and applies the ``score`` head.
    Correct for right and left padding and for pad == eos (never reads "the first pad token"). Differentiable
    when grad is enabled (used for training by :mod:`udrra.lm.train_rm`).

    Args:
        model: a causal sequence-classification model with one output (see :func:`score_head`).
        input_ids: ``(B, T)`` int64.
        attention_mask: ``(B, T)``, 1 on real tokens; every row needs at least one.

    Returns:
        ``(B,)`` float32 scores.

    Raises:
        InputError: shapes differ, a row has no real token, or the head has more than one output.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise InputError(f"last_token_scores: input_ids and attention_mask must both be (B, T); got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    backbone, head = score_head(model)
    n_out = getattr(head, "out_features", None) or head.weight.shape[0]
    if n_out != 1:
        raise InputError(f"{type(model).__name__} has {n_out} outputs (num_labels); a reward model needs exactly 1")
    mask = attention_mask.to(torch.long)
    T = input_ids.shape[1]
    pos = torch.arange(T, device=input_ids.device).expand_as(mask)
    last = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(-1).values  # (B,)
    if bool((last < 0).any()):
        bad = int((last < 0).nonzero()[0])
        raise InputError(f"last_token_scores: row {bad} has no real token (attention_mask all 0)")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, H)
    h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return head(h_last.to(head.weight.dtype)).squeeze(-1).float()


def _encode(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
            max_length: Optional[int]) -> List[List[int]]:
    """Token ids of prompt + response per row (tokenised separately, bos prepended if the tokenizer adds one);
    with ``max_length``, the LAST ``max_length`` tokens (the response end is kept)."""
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    P = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    R = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    rows = []
    for i, (p, r) in enumerate(zip(P, R)):
        if bos is not None and (not p or p[0] != bos):
            p = [bos] + list(p)
        ids = list(p) + list(r)
        if not ids:
            raise InputError(f"row {i}: prompt and response are both empty, nothing to score")
        if max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:]
        rows.append(ids)
    return rows


class _RewardModelScorer:
    """``fn(prompts, responses)`` of a reward-model :class:`Reward`: batched :func:`last_token_scores`."""

    def __init__(self, model: Any, tokenizer: Any, device: Any, batch_size: int, max_length: Optional[int]):
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.batch_size, self.max_length = int(batch_size), max_length
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)  # any id: padded positions are masked and never read

    @torch.no_grad()
    def __call__(self, prompts: List[str], responses: List[str]) -> Tensor:
        if not responses:
            return torch.zeros(0)
        rows = _encode(self.tokenizer, prompts, responses, self.max_length)
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for s in range(0, len(rows), self.batch_size):
                chunk = rows[s:s + self.batch_size]
                T = max(len(r) for r in chunk)
                ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
                att = torch.zeros((len(chunk), T), dtype=torch.long)
                for i, r in enumerate(chunk):
                    ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                    att[i, :len(r)] = 1
                out.append(last_token_scores(self.model, ids.to(self.device), att.to(self.device)).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out)


def is_sequence_classification_dir(path: Union[str, Path]) -> bool:
    """True if ``path`` is a directory whose ``config.json`` names a ``*ForSequenceClassification`` class."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        arch = json.loads(cfg.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in arch)


def load_reward_model(path: Union[str, Path], device: Any = "cpu") -> Tuple[Any, Any]:
    """Load a one-output sequence-classification checkpoint and its tokenizer from a local directory (offline).

    Returns ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer's pad set to eos if it
    had none. Raises :class:`RewardError` if it is not such a checkpoint or its ``num_labels != 1``.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise RewardError(f"reward {str(path)!r}: directory has no config.json, so it is not a model checkpoint; "
                          f"valid reward specs: {SPEC_FORMS}")
    try:
        cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise RewardError(f"reward {str(path)!r}: cannot read its config: {_first_line(e)}") from e
    if int(getattr(cfg, "num_labels", 0)) != 1:
        raise RewardError(f"reward {str(path)!r}: the checkpoint has num_labels={getattr(cfg, 'num_labels', None)}; "
                          f"a reward model needs exactly 1 output")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise RewardError(f"reward {str(path)!r}: cannot load it as a sequence-classification model: "
                          f"{_first_line(e)}") from e
    try:
        score_head(model)
    except InputError as e:
        raise RewardError(f"reward {str(path)!r}: {e}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------------- loading


def _vader() -> Callable[[List[str], List[str]], List[float]]:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise RewardError(f"reward 'vader' needs the vaderSentiment package, which is not installed: run "
                          f"`{VADER_INSTALL_HINT}`") from e
    analyzer = SentimentIntensityAnalyzer()

    def vader(prompts: List[str], responses: List[str]) -> List[float]:
        return [float(analyzer.polarity_scores(r)["compound"]) for r in responses]

    return vader


def _load_function(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise RewardError(f"reward spec {spec!r} is not valid; valid forms: {SPEC_FORMS}")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: file {str(path)!r} not found")
        mod_name = f"_udrra_reward_{path.stem}_{uuid.uuid4().hex[:8]}"
        try:
            mspec = importlib.util.spec_from_file_location(mod_name, str(path))
            if mspec is None or mspec.loader is None:
                raise ImportError(f"cannot load {path} as a Python module")
            mod = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = mod  # lets dataclasses / pickling inside the file resolve their module
            mspec.loader.exec_module(mod)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise RewardError(f"reward {spec!r}: importing {str(path)!r} raised {type(e).__name__}: "
                              f"{_first_line(e)}") from e
    else:
        try:
            mod = importlib.import_module(target)
        except Exception as e:
            raise RewardError(f"reward {spec!r}: cannot import module {target!r} ({type(e).__name__}: "
                              f"{_first_line(e)})") from e
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def load_reward(spec: Any, *, device: Any = "cpu", batch_size: int = 16,
                max_length: Optional[int] = None) -> Reward:
    """Build a :class:`Reward` from ``spec`` (see the module docstring for the forms).

    Args:
        spec: ``"vader"``, a reward-model directory (``str`` or ``Path``), ``"module.sub:function"``,
            ``"path/to/file.py:function"``, a callable, or a :class:`Reward` (returned unchanged).
        device: where a reward model runs (rewards are returned on the CPU either way).
        batch_size: sequences per reward-model forward.
        max_length: reward models only: score at most the last ``max_length`` tokens of prompt + response
            (``None``: no truncation).

    Raises:
        RewardError: an invalid spec (the message lists the valid forms), a missing module / file / attribute,
            a checkpoint with ``num_labels != 1`` or without a ``score`` head, or VADER not installed.
    """
    if isinstance(spec, Reward):
        return spec
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RewardError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise RewardError(f"max_length must be None or an integer >= 1, got {max_length!r}")
    if isinstance(spec, (str, Path)):
        s = str(spec)
        if isinstance(spec, str) and s.strip().lower() == "vader":
            return Reward("vader", _vader(), kind="vader")
        p = Path(s).expanduser()
        if p.is_dir():
            model, tok = load_reward_model(p, device)
            return Reward(s, _RewardModelScorer(model, tok, device, batch_size, max_length), kind="reward_model",
                          model=model, tokenizer=tok)
        if isinstance(spec, str) and ":" in s and not p.exists():
            return Reward(s, _load_function(s), kind="function")
        raise RewardError(f"reward spec {s!r} is not valid (not 'vader', not an existing directory, not "
                          f"'module:function' / 'file.py:function'); valid forms: {SPEC_FORMS}")
    if callable(spec):
        return Reward(_callable_name(spec), spec, kind="function")
    raise RewardError(f"reward spec of type {type(spec).__name__} is not valid; valid forms: {SPEC_FORMS}")
