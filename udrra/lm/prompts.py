"""Prompt-only datasets for online RL: the prompts a policy is rolled out on, split into train / held-out eval.

Every source ends up as :class:`PromptData`: lists of prompt strings exactly as the policy sees them (conversational
prompts already rendered with the tokenizer's chat template, ``add_generation_prompt=True``; no bos, which
:func:`tokenize_prompts` adds). Prompts are de-duplicated in first-seen order and ``eval`` is always disjoint from
``train``. Accepted sources (see :func:`load_prompts`):

* the built-in prompt sets of :data:`BUILTIN_PROMPTS`, read from :func:`udrra.lm.data.data_dir`:
  ``tinystories`` (story openings of 4..8 words, a fixed rule), ``hh-rlhf`` and ``ultrafeedback-1200`` (the prompt
  side of the built-in preference data of :func:`udrra.lm.data.load_preference_data`);
* TRL's prompt-only format: any rows with a ``prompt`` column holding strings or message lists
  (``[{"role": ..., "content": ...}, ...]``), other columns ignored: a local ``.json`` / ``.jsonl`` /
  ``.jsonl.gz`` / ``.parquet`` file or a directory, a list of row dicts, a ``datasets.Dataset`` / ``DatasetDict``,
  or (only with ``allow_hub=True``) a Hugging Face dataset id ``owner/name``.

Bad input raises :class:`~udrra.errors.InputError` saying what was wrong, what is valid, and naming the row.
"""

from __future__ import annotations

import json
import operator
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import InputError
from .data import (_ALIASES, DEFAULT_SPLIT_SEED, HH_ASSISTANT, _is_messages, _norm_messages, _read_jsonl,
                   _render_prompt, _special_ids, data_dir, load_preference_data)

__all__ = [
    "DEFAULT_EVAL_PROMPTS",
    "BUILTIN_PROMPTS",
    "check_prompt_source",
    "TINYSTORIES_RULE",
    "PromptData",
    "PromptTruncation",
    "load_prompts",
    "tokenize_prompts",
]

DEFAULT_EVAL_PROMPTS = 64

TINYSTORIES_RULE = ("every blank-line-separated paragraph of tinystories_val.txt except the first (partial) one; "
                    "paragraph i (0-based, in file order) gives the prompt of its first k = 4 + (i mod 5) "
                    "whitespace-separated words joined by single spaces; paragraphs with fewer than k + 1 words "
                    "are dropped")

BUILTIN_PROMPTS: Dict[str, Dict[str, str]] = {
    "tinystories": {
        "folder": "tinystories-val-subset",
        "file": "tinystories_val.txt",
        "license": "CDLA-Sharing-1.0",
        "citation": "Eldan & Li 2023, TinyStories: How Small Can Language Models Be and Still Speak Coherent "
                    "English?, arXiv:2305.07759",
        "description": "TinyStories validation fragment (~0.8 MB): story openings of 4..8 words as completion "
                       "prompts (like TRL's sentiment example's 2-8 token prefixes); seeded random eval hold-out",
    },
    "hh-rlhf": {
        "folder": "hh-rlhf",
        "license": "MIT",
        "citation": "Bai et al. 2022, Training a Helpful and Harmless Assistant with RLHF, arXiv:2204.05862",
        "description": "Anthropic HH-RLHF test splits: the dialogue prompts (ending with '\\n\\nAssistant:') of the "
                       "built-in preference data's train split (train) and validation split (eval)",
    },
    "ultrafeedback-1200": {
        "folder": "ultrafeedback-binarized-1200",
        "license": "MIT",
        "citation": "Cui et al. 2023, UltraFeedback, arXiv:2310.01377",
        "description": "UltraFeedback binarized 1,200-pair subset: the prompts of train.jsonl (train) and eval.jsonl "
                       "(eval), rendered with the tokenizer's chat template when it has one",
    },
}
_PROMPT_ALIASES = {**_ALIASES, "tinystories": "tinystories", "tiny-stories": "tinystories",
                   "tinystories-val": "tinystories", "tinystories-val-subset": "tinystories"}
_EVAL_SPLITS = ("validation", "eval", "test", "valid", "dev")
_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclass
class PromptData:
    """A loaded prompt set for on-policy rollouts.

    Attributes:
        name: short name or path it was loaded from.
        train: prompt texts exactly as the policy sees them (message lists already rendered with the chat
            template, ``add_generation_prompt=True``; no bos), unique, in source order.
        eval: held-out prompts, unique and disjoint from ``train``, fixed by the ``seed`` of :func:`load_prompts`.
        info: JSON-serialisable description: source, rule, format, row / prompt counts, dropped duplicates and
            rows, split method and seed, license and citation of built-ins.
    """

    name: str
    train: List[str]
    eval: List[str]
    info: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: name, number of train and eval prompts, and the rule that made them."""
        return (f"{self.name}: {len(self.train)} train / {len(self.eval)} eval prompts "
                f"(rule: {self.info.get('rule', 'unknown')})")


# ------------------------------------------------------------------------------------------ helpers


def _dedupe(prompts: Sequence[str]) -> Tuple[List[str], int]:
    """Unique prompts in first-seen order, and how many duplicates were dropped."""
    out = list(dict.fromkeys(prompts))
    return out, len(prompts) - len(out)


def _random_holdout(prompts: List[str], eval_prompts: int, seed: int, name: str) -> Tuple[List[str], List[str],
                                                                                         Dict[str, Any]]:
    """Hold out ``eval_prompts`` prompts drawn with ``random.Random(seed)`` (max(1, 10%) if there are too few);
    both parts keep source order."""
    n = len(prompts)
    if n == 0:
        raise InputError(f"no prompts in {name!r}")
    split: Dict[str, Any] = {"method": "seeded random hold-out", "seed": seed, "eval_prompts": eval_prompts}
    n_eval = eval_prompts
    if eval_prompts > 0 and n < eval_prompts + 1:
        n_eval = max(1, int(round(0.1 * n)))
        if n - n_eval < 1:
            raise InputError(f"prompt set {name!r} has {n} unique prompt(s): too few to hold out an eval prompt and "
                             f"keep one to train on (pass eval_prompts=0 to train on all of them)")
        split["note"] = (f"only {n} unique prompts (< eval_prompts + 1 = {eval_prompts + 1}): held out "
                         f"max(1, 10%) = {n_eval} instead of {eval_prompts}")
    held = set(random.Random(seed).sample(range(n), n_eval))
    train = [p for i, p in enumerate(prompts) if i not in held]
    ev = [p for i, p in enumerate(prompts) if i in held]
    split.update(train=len(train), eval=len(ev))
    return train, ev, split


def _given_split(train: Sequence[str], ev: Sequence[str], eval_prompts: int, seed: Optional[int],
                 method: str) -> Tuple[List[str], List[str], Dict[str, Any]]:
    """Use a source's own eval split: its first ``eval_prompts`` unique prompts (source order); prompts that also
    occur there are removed from train."""
    tr, dup_tr = _dedupe(train)
    ev_all, dup_ev = _dedupe(ev)
    ev_sel = ev_all[:eval_prompts]
    chosen = set(ev_sel)
    tr_out = [p for p in tr if p not in chosen]
    split = {"method": method, "seed": seed, "eval_prompts": eval_prompts, "eval_split_prompts": len(ev_all),
             "overlap_dropped_from_train": len(tr) - len(tr_out), "train": len(tr_out), "eval": len(ev_sel)}
    return tr_out, ev_sel, {"split": split, "duplicates_dropped": {"train": dup_tr, "eval": dup_ev}}


def _check_nonempty(train: List[str], ev: List[str], name: str) -> None:
    if not train and not ev:
        raise InputError(f"no prompts in {name!r}")
    if not train:
        raise InputError(f"no prompts in {name!r} left to train on after holding out the eval prompts "
                         f"(lower eval_prompts)")


# ------------------------------------------------------------------------------------------ tinystories


def _tinystories_prompts(path: Path) -> Tuple[List[str], Dict[str, Any]]:
    paragraphs = [p.strip() for p in _BLANK_LINES.split(path.read_text(encoding="utf-8"))]
    paragraphs = [p for p in paragraphs if p]
    prompts: List[str] = []
    short = 0
    for i, para in enumerate(paragraphs):
        if i == 0:
            continue  # the file starts mid-story
        words = para.split()
        k = 4 + i % 5
        if len(words) < k + 1:
            short += 1
            continue
        prompts.append(" ".join(words[:k]))
    return prompts, {"paragraphs": len(paragraphs), "stories": len(paragraphs) - 1, "dropped": {"too_short": short}}


def _load_tinystories(folder: Path, seed: int, eval_prompts: int) -> PromptData:
    meta = BUILTIN_PROMPTS["tinystories"]
    f = folder / meta["file"]
    if not f.is_file():
        raise InputError(f"tinystories: missing file {f}")
    raw, counts = _tinystories_prompts(f)
    prompts, dups = _dedupe(raw)
    train, ev, split = _random_holdout(prompts, eval_prompts, seed, "tinystories")
    info = {"source": str(f), "rule": TINYSTORIES_RULE, "format": "text", **counts, "rows": len(raw),
            "duplicates_dropped": dups, "prompts": len(prompts), "split": split}
    return PromptData("tinystories", train, ev, info)


# ------------------------------------------------------------------------------------------ row sources


def _row_prompts(rows: Sequence[Any], tokenizer: Any, name: str,
                 columns: Optional[Sequence[str]] = None) -> Tuple[List[str], str]:
    """The ``prompt`` of each row (message lists rendered with the chat template) and the format."""
    if not rows:
        raise InputError(f"no prompts in {name!r}: it has no rows")
    if not isinstance(rows[0], Mapping):
        raise InputError(f"prompt dataset {name!r}: rows must be mappings with a 'prompt' key (TRL prompt-only "
                         f"format), got {type(rows[0]).__name__}; wrap plain prompts as [{{'prompt': p}}, ...]")
    if columns is None:
        columns = list(rows[0].keys())
    if "prompt" not in columns:
        raise InputError(f"prompt dataset {name!r} has no 'prompt' column: it has columns {list(columns)}; required: "
                         f"prompt (TRL prompt-only format: a string or a message list [{{role, content}}] per row)")
    out: List[str] = []
    formats = set()
    for i, ex in enumerate(rows):
        if not isinstance(ex, Mapping) or "prompt" not in ex:
            raise InputError(f"row {i} of {name!r} has no 'prompt' (rows must be mappings with a 'prompt' key)")
        p = ex["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise InputError(f"row {i} of {name!r}: empty or whitespace-only prompt; every prompt needs text")
            out.append(p)
            formats.add("plain")
        elif _is_messages(p):
            msgs = _norm_messages(p)
            if not any(m["content"].strip() for m in msgs):
                raise InputError(f"row {i} of {name!r}: empty prompt (every message's content is empty or "
                                 f"whitespace); every prompt needs text")
            out.append(_render_prompt(msgs, tokenizer, i))
            formats.add("conversational")
        else:
            raise InputError(f"row {i} of {name!r}: prompt must be a non-empty string or a non-empty message list "
                             f"[{{role, content}}, ...], got {type(p).__name__}: {str(p)[:60]!r}")
    if len(formats) > 1:
        raise InputError(f"prompt dataset {name!r} mixes strings and message lists in its 'prompt' column; use one "
                         f"format for all rows")
    return out, formats.pop()


class _Rows(list):
    """Rows built from a columnar dict, remembering its column names (for the missing-column message)."""

    def __init__(self, rows: List[Dict[str, Any]], columns: List[str]):
        super().__init__(rows)
        self.column_names = columns


def _rows_of(ds: Any) -> Tuple[List[Any], Optional[List[str]]]:
    if isinstance(ds, _Rows):
        return list(ds), list(ds.column_names)
    if hasattr(ds, "column_names") and hasattr(ds, "to_list"):
        return ds.to_list(), list(ds.column_names)
    return list(ds), None


def _is_rows(v: Any) -> bool:
    return hasattr(v, "column_names") or (isinstance(v, (list, tuple)) and (not v or isinstance(v[0], Mapping)))


def _from_rows(obj: Any, tokenizer: Any, name: str, seed: int, eval_prompts: int) -> PromptData:
    """From rows (list of dicts / datasets.Dataset), a dict of splits (DatasetDict) or a columnar dict."""
    if isinstance(obj, Mapping) and obj and ("prompt" in obj or not all(_is_rows(v) for v in obj.values())):
        cols = [str(c) for c in obj]  # columnar {"prompt": [...], ...}
        lengths = {len(v) if isinstance(v, (list, tuple)) else -1 for v in obj.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise InputError(f"prompt dataset {name!r}: a dict must map split names to rows or column names to "
                             f"equal-length lists, got keys {cols}")
        obj = _Rows([dict(zip(cols, vals)) for vals in zip(*obj.values())], cols)
    if isinstance(obj, Mapping):
        splits = dict(obj)
        if "train" not in splits and len(splits) == 1:
            splits = {"train": next(iter(splits.values()))}
        if "train" not in splits:
            raise InputError(f"prompt dataset {name!r} has splits {sorted(splits)} but no 'train' split")
    else:
        splits = {"train": obj}
    ev_name = next((k for k in _EVAL_SPLITS if k in splits), None)
    rows, cols = _rows_of(splits["train"])
    train_raw, fmt = _row_prompts(rows, tokenizer, name, cols)
    info: Dict[str, Any] = {"source": name, "format": fmt, "rows": len(rows)}
    if ev_name is not None:
        ev_rows, ev_cols = _rows_of(splits[ev_name])
        ev_raw, _ = _row_prompts(ev_rows, tokenizer, f"{name}[{ev_name}]", ev_cols)
        train, ev, extra = _given_split(train_raw, ev_raw, eval_prompts, None,
                                        f"given split {ev_name!r}: its first eval_prompts unique prompts")
        info.update(rows={"train": len(rows), ev_name: len(ev_rows)},
                    rule=f"the 'prompt' column of split 'train' (train) and the first {eval_prompts} unique "
                         f"prompts of split {ev_name!r} (eval)", **extra)
    else:
        prompts, dups = _dedupe(train_raw)
        train, ev, split = _random_holdout(prompts, eval_prompts, seed, name)
        info.update(rule=f"the 'prompt' column, de-duplicated; {split['eval']} prompts held out with "
                         f"random.Random({seed})", duplicates_dropped=dups, prompts=len(prompts), split=split)
    _check_nonempty(train, ev, name)
    return PromptData(name, train, ev, info)


def _read_file(path: Path) -> Any:
    suffixes = "".join(path.suffixes).lower()
    if not suffixes.endswith((".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".json")):
        raise InputError(f"prompt file {path} must be .json, .jsonl, .jsonl.gz or .parquet")
    try:
        if suffixes.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(str(path)).to_pylist()
        if suffixes.endswith(".json"):
            try:
                return json.loads(path.read_text(encoding="utf-8"))  # a list of rows or {column: values}
            except json.JSONDecodeError:
                pass  # JSON lines in a .json file
        return _read_jsonl(path)
    except Exception as e:  # json / gzip / pyarrow raise their own types for unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot read prompt file {path}: {first}") from e


def _count(v: Any, what: str, low: int, hint: str = "") -> int:
    try:
        n = None if isinstance(v, bool) else operator.index(v)
    except TypeError:
        n = None
    if n is None or n < low:
        raise InputError(f"{what} must be an integer >= {low}{hint}, got {v!r}")
    return int(n)


# ------------------------------------------------------------------------------------------ loading


def _load_builtin(key: str, tokenizer: Any, seed: int, eval_prompts: int, allow_hub: bool) -> PromptData:
    """A built-in prompt set (:data:`BUILTIN_PROMPTS`): TinyStories' rule, or the prompt side of a built-in
    preference dataset with its own eval split."""
    meta = BUILTIN_PROMPTS[key]
    folder = data_dir() / meta["folder"]
    if key == "tinystories":
        if not folder.is_dir():
            raise InputError(f"built-in prompt set 'tinystories' not found at {folder} (set UDRRA_DATA_DIR to "
                             f"the folder holding {meta['folder']}/; it has no hub fallback)")
        data = _load_tinystories(folder, seed, eval_prompts)
    else:
        pref = load_preference_data(key, tokenizer, seed=seed, allow_hub=allow_hub)
        eval_split = pref.info.get("eval_split", "eval")
        train, ev, extra = _given_split([p.prompt for p in pref.train], [p.prompt for p in pref.eval],
                                        eval_prompts, seed if key == "hh-rlhf" else None,
                                        f"given split {eval_split!r} of load_preference_data({key!r}): "
                                        f"its first eval_prompts unique prompts")
        _check_nonempty(train, ev, key)
        rule = (f"the prompt side of load_preference_data({key!r}"
                + (f", seed={seed}" if key == "hh-rlhf" else "")
                + f"): its train split's unique prompts (train) and the first {eval_prompts} unique prompts of "
                  f"its {eval_split} split (eval)")
        if key == "hh-rlhf":
            rule += f"; each prompt ends with {HH_ASSISTANT!r}"
        info = {"source": pref.info.get("source", key), "rule": rule, "format": pref.info.get("format"),
                "rows": {"train": len(pref.train), "eval": len(pref.eval)},
                "dropped": pref.info.get("dropped", {}), **extra}
        data = PromptData(key, train, ev, info)
    data.info.update(license=meta["license"], citation=meta["citation"], description=meta["description"])
    return data


def check_prompt_source(source: Any, allow_hub: bool = False) -> None:
    """The cheap part of :func:`load_prompts`'s checks, before any model is loaded: a name that is neither a
    built-in, nor an existing path, nor (with ``allow_hub``) a hub id ``owner/name`` raises :class:`InputError`.
    Non-string sources (rows, datasets) pass."""
    if not isinstance(source, (str, Path)):
        return
    name = str(source)
    if name.lower() in _PROMPT_ALIASES or Path(name).expanduser().exists():
        return
    builtins = ", ".join(BUILTIN_PROMPTS)
    if Path(name).suffix or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise InputError(f"prompt source {name!r} not found: not a local file or directory, not a built-in name "
                         f"({builtins}), not a hub id 'owner/name'")
    if not allow_hub:
        raise InputError(f"prompt source {name!r} is not a local path or a built-in name ({builtins}); to load it "
                         f"as a Hugging Face hub dataset pass allow_hub=True")


def load_prompts(source: Any, tokenizer: Any = None, *, seed: int = DEFAULT_SPLIT_SEED,
                 eval_prompts: int = DEFAULT_EVAL_PROMPTS, allow_hub: bool = False) -> PromptData:
    """Load a prompt-only dataset for on-policy rollouts into unique train / held-out eval prompt strings.

    Args:
        source: one of
            * ``"tinystories"`` (CDLA-Sharing-1.0, ``<data_dir>/tinystories-val-subset/tinystories_val.txt``): the
              fixed rule :data:`TINYSTORIES_RULE`: every blank-line-separated paragraph except the first (the file
              starts mid-story); paragraph ``i`` (0-based in file order, so the first prompt comes from ``i = 1``)
              gives its first ``k = 4 + (i mod 5)`` whitespace-separated words joined by single spaces, i.e. 4..8
              words (as TRL's sentiment example used 2-8 token prefixes of reviews); paragraphs with fewer than
              ``k + 1`` words are dropped and counted (``info["dropped"]["too_short"]``). A TinyStories story can
              span several paragraphs, so some prompts open a later paragraph of a story. After de-duplication
              ``eval_prompts`` prompts are chosen with ``random.Random(seed)`` as eval, the rest are train.
            * ``"hh-rlhf"`` (MIT): the prompts (dialogues up to and including the last ``"\\n\\nAssistant:"``) of
              :func:`~udrra.lm.data.load_preference_data`'s ``hh-rlhf`` train split (train) and validation split
              (eval, its first ``eval_prompts`` unique prompts); ``seed`` is that loader's split seed.
            * ``"ultrafeedback-1200"`` (MIT): the prompts of ``train.jsonl`` (train) and the first ``eval_prompts``
              unique prompts of ``eval.jsonl`` (eval) via ``load_preference_data``, rendered with the tokenizer's
              chat template when it has one (plain strings otherwise).
            * rows in TRL's prompt-only format, a ``prompt`` column of strings (kept as they are) or message lists
              (rendered with ``tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True)``),
              other columns ignored: a local ``.json`` / ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file or a
              directory (``datasets.load_dataset``), a list of row dicts, a ``{column: values}`` dict, a
              ``datasets.Dataset`` / ``DatasetDict`` or a dict of split name -> rows, or a Hugging Face id
              ``owner/name`` (only with ``allow_hub``). With an eval split (``validation`` / ``eval`` / ``test`` /
              ``valid`` / ``dev``) its first ``eval_prompts`` unique prompts are eval; otherwise ``eval_prompts``
              unique prompts drawn with ``random.Random(seed)`` are (``max(1, 10%)`` of them if there are fewer
              than ``eval_prompts + 1``, noted in ``info["split"]["note"]``). Both keep source order.
            * a :class:`PromptData` (returned as is).
        tokenizer: renders message-list prompts with its chat template (required for those).
        seed: fixes the eval hold-out (and the ``hh-rlhf`` preference split).
        eval_prompts: number of held-out prompts (``0``: none, everything is train).
        allow_hub: let a hub id be loaded from the Hugging Face hub, and let ``hh-rlhf`` /
            ``ultrafeedback-1200`` fall back to their hub datasets if their local folder is missing.

    Returns:
        :class:`PromptData`: ``train`` / ``eval`` unique, disjoint prompt strings; ``info`` records the source,
        ``rule``, format, counts, dropped duplicates / rows and the split (method, seed, sizes).

    Raises:
        InputError: unknown name or missing path (the message lists the built-ins), a hub id without
            ``allow_hub``, an unreadable file, a missing ``prompt`` column (the message lists the columns found),
            an empty / whitespace-only or malformed prompt (naming the row), message lists without a tokenizer
            with a chat template, no prompts at all, too few to hold one out, or ``eval_prompts < 0``.
    """
    if isinstance(source, PromptData):
        return source
    eval_prompts = _count(eval_prompts, "eval_prompts", 0, " (0 = no held-out prompts)")
    if not isinstance(source, (str, Path)):
        return _from_rows(source, tokenizer, type(source).__name__, seed, eval_prompts)
    name = str(source)
    key = _PROMPT_ALIASES.get(name.lower())
    if key is not None and not Path(name).exists():
        return _load_builtin(key, tokenizer, seed, eval_prompts, allow_hub)

    check_prompt_source(name, allow_hub)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            import datasets

            try:
                ds = datasets.load_dataset(str(path))
            except Exception as e:  # datasets raises many types for unreadable folders
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InputError(f"cannot read prompt dataset folder {path}: {first}") from e
            return _from_rows(ds, tokenizer, str(path), seed, eval_prompts)
        return _from_rows(_read_file(path), tokenizer, str(path), seed, eval_prompts)
    import datasets

    try:
        ds = datasets.load_dataset(name)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"prompt source {name!r} is not a local path and could not be loaded from the hub: "
                         f"{first}") from e
    return _from_rows(ds, tokenizer, name, seed, eval_prompts)


# ---------------------------------------------------------------------------------- tokenisation


@dataclass
class PromptTruncation:
    """What :func:`tokenize_prompts` cut: prompts longer than ``max_prompt_length`` lose their leftmost tokens."""

    max_prompt_length: int
    rows: int = 0
    truncated: int = 0
    tokens_dropped: int = 0

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.truncated}/{self.rows} prompts truncated from the left to {self.max_prompt_length} tokens "
                f"({self.tokens_dropped} tokens dropped)")


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], *,
                     max_prompt_length: int) -> Tuple[List[List[int]], PromptTruncation]:
    """Tokenise prompts for generation, cutting long ones from the LEFT.

    Each prompt is tokenised with ``add_special_tokens=False``; the tokenizer's bos is prepended when it adds one
    by default (``add_bos_token``) and the prompt does not already start with it (the rule of
    :func:`udrra.lm.data.tokenize_pairs`). A prompt longer than ``max_prompt_length`` tokens keeps its LAST
    ``max_prompt_length`` tokens (the end, next to the response; a prepended bos is cut with the rest, as in
    ``tokenize_pairs``).

    Returns:
        ``(ids, stats)``: one list of token ids per prompt (``1 <= len <= max_prompt_length``), and a
        :class:`PromptTruncation` counting the rows, the truncated prompts and the tokens dropped.

    Raises:
        InputError: ``max_prompt_length < 1``, a prompt that is not a string, a prompt that tokenises to nothing
            with a tokenizer that adds no bos (naming the row), or a tokenizer without an eos token (rollouts
            need one to end).
    """
    max_prompt_length = _count(max_prompt_length, "max_prompt_length", 1, " token")
    bos, _ = _special_ids(tokenizer)
    stats = PromptTruncation(max_prompt_length=max_prompt_length)
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"row {i}: prompt must be a string, got {type(p).__name__}")
    if not prompts:
        return [], stats
    out: List[List[int]] = []
    for i, ids in enumerate(tokenizer(prompts, add_special_tokens=False)["input_ids"]):
        ids = list(ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids:
            raise InputError(f"row {i}: the prompt tokenizes to 0 tokens and the tokenizer adds no bos token, so the "
                             f"first response token would have no context; give every prompt some text")
        stats.rows += 1
        if len(ids) > max_prompt_length:
            stats.truncated += 1
            stats.tokens_dropped += len(ids) - max_prompt_length
            ids = ids[-max_prompt_length:]
        out.append(ids)
    return out, stats
