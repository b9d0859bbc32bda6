"""Preference data for LM training: loading, validation, splitting, tokenisation and collation.

Every source ends up as :class:`PreferencePair` rows of three strings ``(prompt, chosen, rejected)``, where
``chosen`` / ``rejected`` are the response texts that follow ``prompt``. Accepted inputs:

* TRL preference format, columns ``prompt`` / ``chosen`` / ``rejected``, either plain strings or
  conversational message lists (``[{"role": ..., "content": ...}, ...]``). Conversational rows are rendered
  with the tokenizer's chat template: the prompt with ``add_generation_prompt=True``, each response as the
  final assistant message's text (the eos token is appended at tokenisation).
* The implicit-prompt form (only ``chosen`` / ``rejected``, each a full dialogue): message lists share all but
  their final assistant message; strings must be Anthropic HH-RLHF dialogues
  (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), split at the LAST ``"\\n\\nAssistant:"`` (the prompt keeps the
  marker, the response is the text after it).
* Short names of the two built-in real datasets (see :data:`BUILTIN_DATASETS`): ``hh-rlhf`` and
  ``ultrafeedback-1200``, read from ``<repo>/../shared/data`` (or ``$UDRRA_DATA_DIR``).

User data is strict: a missing column, ``chosen == rejected``, a prompt that is not a prefix of the dialogue or
an empty response raises :class:`~udrra.errors.InputError` naming the row. For the built-in datasets the
known upstream degenerate rows are dropped instead, counted by reason in ``PreferenceData.info["dropped"]``.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import InputError

__all__ = [
    "HH_ASSISTANT",
    "BUILTIN_DATASETS",
    "DEFAULT_SPLIT_SEED",
    "DEFAULT_SPLIT_FRACTIONS",
    "PreferencePair",
    "PreferenceData",
    "TokenizedPair",
    "TruncationStats",
    "data_dir",
    "split_hh_dialogue",
    "rows_to_pairs",
    "stratified_split",
    "load_preference_data",
    "tokenize_pair",
    "tokenize_pairs",
    "collate_pairs",
]

HH_ASSISTANT = "\n\nAssistant:"
DEFAULT_SPLIT_SEED = 1234
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")

BUILTIN_DATASETS: Dict[str, Dict[str, str]] = {
    "hh-rlhf": {
        "folder": "hh-rlhf",
        "hub_id": "Anthropic/hh-rlhf",
        "license": "MIT",
        "citation": "Bai et al. 2022, Training a Helpful and Harmless Assistant with RLHF, arXiv:2204.05862",
        "description": "Anthropic HH-RLHF, the four official TEST splits (8,552 pairs), re-split into "
                       "train/validation/test stratified by subset",
    },
    "ultrafeedback-1200": {
        "folder": "ultrafeedback-binarized-1200",
        "hub_id": "trl-lib/ultrafeedback_binarized",
        "license": "MIT",
        "citation": "Cui et al. 2023, UltraFeedback, arXiv:2310.01377",
        "description": "UltraFeedback binarized, 1,200-pair subset (train.jsonl 1000, eval.jsonl 200 held out)",
    },
}
_ALIASES = {"hh-rlhf": "hh-rlhf", "hh": "hh-rlhf", "anthropic/hh-rlhf": "hh-rlhf",
            "ultrafeedback-1200": "ultrafeedback-1200", "ultrafeedback": "ultrafeedback-1200",
            "ultrafeedback-binarized-1200": "ultrafeedback-1200"}


# --------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class PreferencePair:
    """One preference row: ``prompt`` followed by the preferred (``chosen``) or dispreferred (``rejected``)
    response text. ``subset`` names the source subset (HH split name) when known."""

    prompt: str
    chosen: str
    rejected: str
    subset: Optional[str] = None


@dataclass
class PreferenceData:
    """A loaded preference dataset.

    Attributes:
        name: short name or path it was loaded from.
        train: rows to train on.
        eval: held-out rows for evaluation during training (validation split).
        test: a further held-out split never used by :func:`udrra.lm.train.train` (``[]`` if none).
        info: JSON-serialisable description: source, license, format, split seed / fractions / counts
            (per subset when stratified), dropped rows by reason.
    """

    name: str
    train: List[PreferencePair]
    eval: List[PreferencePair]
    test: List[PreferencePair] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: name, split sizes, split seed and dropped rows."""
        split = self.info.get("split", {})
        seed = split.get("seed")
        dropped = self.info.get("dropped", {})
        nd = sum(dropped.values()) if dropped else 0
        s = f"{self.name}: train {len(self.train)} / eval {len(self.eval)} / test {len(self.test)} pairs"
        s += f" ({split.get('method', 'given splits')}"
        if seed is not None:
            s += f", seed {seed}, fractions {tuple(split.get('fractions', ()))}"
        s += ")"
        if nd:
            s += f"; dropped {nd} degenerate upstream rows {dict(dropped)}"
        return s


# ------------------------------------------------------------------------------------ row parsing


class _RowError(InputError):
    """A bad row; ``reason`` is the key counted when degenerate built-in rows are dropped instead."""

    def __init__(self, msg: str, reason: Optional[str] = None):
        super().__init__(msg)
        self.reason = reason


def split_hh_dialogue(text: str) -> Tuple[str, str]:
    """Split an HH-RLHF dialogue at its LAST ``"\\n\\nAssistant:"`` marker.

    Returns ``(prompt, response)``: ``prompt`` ends with the marker, ``response`` is the text after it
    (usually starting with a space). Raises :class:`InputError` if the marker is absent.
    """
    k = text.rfind(HH_ASSISTANT)
    if k < 0:
        raise _RowError(f"dialogue has no {HH_ASSISTANT!r} marker (expected HH-RLHF format "
                         f"'\\n\\nHuman: ...\\n\\nAssistant: ...'): {text[:60]!r}...")
    k += len(HH_ASSISTANT)
    return text[:k], text[k:]


def _is_messages(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(m, Mapping) and "role" in m and "content" in m
                                                for m in v) and len(v) > 0


def _norm_messages(v: Sequence[Mapping[str, Any]]) -> List[Dict[str, str]]:
    return [{"role": str(m["role"]), "content": "" if m["content"] is None else str(m["content"])} for m in v]


def _render_prompt(messages: List[Dict[str, str]], tokenizer: Any, row: int) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InputError(f"row {row}: conversational (message-list) data needs a tokenizer with a chat template "
                         f"to render the prompt")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _response_from_messages(resp: List[Dict[str, str]], prompt_msgs: Optional[List[Dict[str, str]]],
                            other: List[Dict[str, str]], which: str, row: int) -> Tuple[List[Dict[str, str]], str]:
    """Return (prompt messages, response text) for one conversational response column."""
    if len(resp) == 1:
        if prompt_msgs is None:
            raise InputError(f"row {row}: implicit-prompt {which} has a single message; it must be the full "
                             f"dialogue (prompt messages + final assistant message)")
        head = prompt_msgs
    else:
        head = resp[:-1]
        if prompt_msgs is not None and head != prompt_msgs:
            raise _RowError(f"row {row}: prompt is not a prefix of the {which} dialogue (its messages before the "
                            f"final one differ from the prompt column)", "prompt_not_prefix")
    last = resp[-1]
    if last["role"] != "assistant":
        raise InputError(f"row {row}: the final {which} message must have role 'assistant', got {last['role']!r}")
    return head, last["content"]


def _parse_row(ex: Mapping[str, Any], row: int, tokenizer: Any, explicit: bool) -> Tuple[str, str, str, str]:
    """Return (prompt, chosen, rejected, format) for one raw row; raise InputError on bad content."""
    c, r = ex["chosen"], ex["rejected"]
    p = ex["prompt"] if explicit else None
    if _is_messages(c) and _is_messages(r):
        c, r = _norm_messages(c), _norm_messages(r)
        pm = None
        if explicit:
            if isinstance(p, str):
                pm = [{"role": "user", "content": p}] if p else []
            elif _is_messages(p):
                pm = _norm_messages(p)
            else:
                raise InputError(f"row {row}: prompt must be a string or a message list when chosen/rejected are "
                                 f"message lists, got {type(p).__name__}")
        head_c, text_c = _response_from_messages(c, pm, r, "chosen", row)
        head_r, text_r = _response_from_messages(r, pm if pm is not None else head_c, c, "rejected", row)
        if head_c != head_r:
            raise _RowError(f"row {row}: prompt is not a prefix of the rejected dialogue (chosen and rejected differ "
                            f"before their final assistant message)", "prompt_not_prefix")
        prompt = _render_prompt(head_c, tokenizer, row) if head_c else ""
        return prompt, text_c, text_r, "conversational"
    if isinstance(c, str) and isinstance(r, str):
        if explicit:
            if not isinstance(p, str):
                raise InputError(f"row {row}: prompt must be a string when chosen/rejected are strings, "
                                 f"got {type(p).__name__}")
            return p, c, r, "plain"
        try:
            prompt, text_c = split_hh_dialogue(c)
        except _RowError as e:
            raise _RowError(f"row {row}: chosen {e}", "no_assistant_marker") from None
        if not r.startswith(prompt):
            raise _RowError(f"row {row}: prompt is not a prefix of the rejected dialogue (chosen and rejected do not "
                            f"share the text up to the chosen's last {HH_ASSISTANT!r})", "prompt_not_prefix")
        return prompt, text_c, r[len(prompt):], "hh-dialogue"
    raise InputError(f"row {row}: chosen/rejected must both be strings or both be message lists "
                     f"(list of {{role, content}}), got {type(c).__name__} / {type(r).__name__}")


def _check_pair(prompt: str, chosen: str, rejected: str, row: int) -> Optional[str]:
    """Return the reason a parsed row is degenerate, or None."""
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    if chosen == rejected:
        return "chosen_equals_rejected"
    return None


_REASON_TEXT = {
    "empty_response": "empty response (chosen or rejected is empty or whitespace)",
    "chosen_equals_rejected": "chosen == rejected (no preference signal)",
    "prompt_not_prefix": "prompt is not a prefix of the dialogue",
    "no_assistant_marker": f"no {HH_ASSISTANT!r} marker",
}


def rows_to_pairs(rows: Iterable[Mapping[str, Any]], tokenizer: Any = None, *, strict: bool = True,
                  subset: Optional[str] = None, columns: Optional[Sequence[str]] = None,
                  ) -> Tuple[List[PreferencePair], Counter, str]:
    """Validate and convert raw preference rows into :class:`PreferencePair` rows.

    Args:
        rows: mappings with ``prompt``/``chosen``/``rejected`` (explicit prompt) or ``chosen``/``rejected``
            (implicit prompt); values plain strings or message lists.
        tokenizer: needed only for conversational rows (chat template).
        strict: ``True`` (user data): a bad row raises :class:`InputError`. ``False`` (built-in data): degenerate
            rows (empty response, chosen == rejected, non-shared prompt prefix, missing marker) are dropped and
            counted.
        subset: recorded on each row.
        columns: the dataset's column names if known (for the missing-column message); else taken from row 0.

    Returns:
        ``(pairs, dropped, format)``: ``dropped`` counts dropped rows by reason; ``format`` is ``"plain"``,
        ``"conversational"`` or ``"hh-dialogue"``.
    """
    rows = list(rows)
    if not rows:
        raise InputError("preference dataset is empty: no rows")
    cols = list(columns) if columns is not None else list(rows[0].keys())
    if "chosen" not in cols or "rejected" not in cols:
        raise InputError(f"preference dataset is missing column(s) {[c for c in ('chosen', 'rejected') if c not in cols]}: "
                         f"it has columns {cols}; required: prompt, chosen, rejected (or chosen, rejected "
                         f"with the prompt inside each dialogue)")
    explicit = "prompt" in cols
    pairs: List[PreferencePair] = []
    dropped: Counter = Counter()
    formats = set()
    for i, ex in enumerate(rows):
        try:
            prompt, c, r, fmt = _parse_row(ex, i, tokenizer, explicit)
        except InputError as e:
            if strict:
                raise
            reason = getattr(e, "reason", None)
            if reason is None:
                raise
            dropped[reason] += 1
            continue
        bad = _check_pair(prompt, c, r, i)
        if bad is not None:
            if strict:
                raise InputError(f"row {i}: {_REASON_TEXT[bad]}; fix or remove this row")
            dropped[bad] += 1
            continue
        formats.add(fmt)
        pairs.append(PreferencePair(prompt, c, r, subset))
    if len(formats) > 1:
        raise InputError(f"preference dataset mixes row formats {sorted(formats)}; use one format for all rows")
    if not pairs:
        raise InputError(f"preference dataset has no usable rows (dropped: {dict(dropped)})")
    return pairs, dropped, (formats.pop() if formats else "plain")


# ---------------------------------------------------------------------------------------- splits


def stratified_split(pairs: Sequence[PreferencePair], fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
                     seed: int = DEFAULT_SPLIT_SEED) -> Tuple[List[List[PreferencePair]], Dict[str, Any]]:
    """Split rows into ``len(fractions)`` parts, stratified by ``PreferencePair.subset``.

    Within each subset (in sorted order of subset names) the rows are shuffled with ``random.Random(seed)``;
    part ``k > 0`` takes ``round(n · fractions[k])`` rows and part 0 the rest. Each part is then shuffled with
    the same generator so subsets interleave.

    Returns:
        ``(parts, info)``; ``info`` = ``{"method", "seed", "fractions", "counts": {subset: [n_0, n_1, ...]},
        "totals": [...]}``.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise InputError(f"split fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    rng = random.Random(seed)
    by: Dict[str, List[PreferencePair]] = {}
    for p in pairs:
        by.setdefault(p.subset or "", []).append(p)
    parts: List[List[PreferencePair]] = [[] for _ in fractions]
    counts: Dict[str, List[int]] = {}
    for name in sorted(by):
        rows = list(by[name])
        rng.shuffle(rows)
        n = len(rows)
        sizes = [int(round(n * f)) for f in fractions[1:]]
        sizes = [n - sum(sizes)] + sizes
        start = 0
        for k, size in enumerate(sizes):
            parts[k].extend(rows[start:start + size])
            start += size
        counts[name] = sizes
    for part in parts:
        rng.shuffle(part)
    info = {"method": "stratified by subset", "seed": seed, "fractions": list(fractions), "counts": counts,
            "totals": [len(p) for p in parts]}
    return parts, info


def _random_holdout(pairs: List[PreferencePair], fraction: float, seed: int) -> Tuple[List[PreferencePair],
                                                                                    List[PreferencePair], Dict]:
    rows = list(pairs)
    random.Random(seed).shuffle(rows)
    n_eval = max(1, int(round(len(rows) * fraction))) if len(rows) > 1 else 0
    if len(rows) - n_eval < 1:
        raise InputError(f"preference dataset has {len(rows)} usable row(s): too few to hold out an eval split")
    return rows[n_eval:], rows[:n_eval], {"method": "random hold-out (no eval split in the data)", "seed": seed,
                                         "fractions": [1 - fraction, fraction],
                                         "totals": [len(rows) - n_eval, n_eval]}


# --------------------------------------------------------------------------------------- loading


def data_dir() -> Path:
    """Where the built-in datasets live: ``$UDRRA_DATA_DIR`` if set, else ``<repo>/../shared/data`` where
    ``<repo>`` is the directory holding the ``udrra`` package source."""
    env = os.environ.get("UDRRA_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_hh(folder: Path, seed: int, fractions: Sequence[float]) -> PreferenceData:
    pairs: List[PreferencePair] = []
    dropped: Counter = Counter()
    per_subset_dropped: Dict[str, Dict[str, int]] = {}
    raw_counts = {}
    for s in HH_SUBSETS:
        f = folder / s / "test.jsonl.gz"
        if not f.is_file():
            raise InputError(f"hh-rlhf: missing file {f}")
        rows = _read_jsonl(f)
        raw_counts[s] = len(rows)
        p, d, _ = rows_to_pairs(rows, strict=False, subset=s)
        pairs.extend(p)
        dropped.update(d)
        per_subset_dropped[s] = dict(d)
    (train, val, test), split = stratified_split(pairs, fractions, seed)
    info = {
        "source": str(folder),
        "upstream": "anthropics/hh-rlhf, the four official TEST splits (see SOURCE.md)",
        "license": BUILTIN_DATASETS["hh-rlhf"]["license"],
        "citation": BUILTIN_DATASETS["hh-rlhf"]["citation"],
        "format": "hh-dialogue (prompt = text up to and including the last '\\n\\nAssistant:')",
        "raw_counts": raw_counts,
        "raw_total": sum(raw_counts.values()),
        "dropped": dict(dropped),
        "dropped_by_subset": per_subset_dropped,
        "split": {**split, "names": ["train", "validation", "test"]},
        "eval_split": "validation",
    }
    return PreferenceData("hh-rlhf", train, val, test, info)


def _load_ultrafeedback(folder: Path, tokenizer: Any) -> PreferenceData:
    use_chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    out = {}
    dropped_all: Counter = Counter()
    dropped_by: Dict[str, Dict[str, int]] = {}
    ties = {}
    raw = {}
    for split, fname in (("train", "train.jsonl"), ("eval", "eval.jsonl")):
        f = folder / fname
        if not f.is_file():
            raise InputError(f"ultrafeedback-1200: missing file {f}")
        rows = _read_jsonl(f)
        raw[split] = len(rows)
        ties[split] = sum(1 for r in rows if (r.get("metadata") or {}).get("score_chosen") ==
                          (r.get("metadata") or {}).get("score_rejected"))
        if use_chat:
            rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                     "chosen": [{"role": "assistant", "content": r["chosen"]}],
                     "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
        p, d, _ = rows_to_pairs(rows, tokenizer, strict=False, subset="ultrafeedback")
        out[split] = p
        dropped_all.update(d)
        dropped_by[split] = dict(d)
    info = {
        "source": str(folder),
        "upstream": "trl-lib/ultrafeedback_binarized, seed-42 sample of 1000 train + 200 eval (see SOURCE.md)",
        "license": BUILTIN_DATASETS["ultrafeedback-1200"]["license"],
        "citation": BUILTIN_DATASETS["ultrafeedback-1200"]["citation"],
        "format": ("conversational (single user turn rendered with the tokenizer's chat template)" if use_chat
                   else "plain strings (tokenizer has no chat template)"),
        "raw_counts": raw,
        "raw_total": sum(raw.values()),
        "dropped": dict(dropped_all),
        "dropped_by_split": dropped_by,
        "score_ties_kept": ties,
        "split": {"method": "given upstream splits (train.jsonl / eval.jsonl)", "seed": None,
                  "totals": [len(out["train"]), len(out["eval"])], "names": ["train", "eval"]},
        "eval_split": "eval",
    }
    return PreferenceData("ultrafeedback-1200", out["train"], out["eval"], [], info)


def _from_hf(obj: Any, tokenizer: Any, name: str, seed: int, holdout_fraction: float) -> PreferenceData:
    """From a datasets.Dataset / DatasetDict (or dict of lists of rows)."""
    import datasets

    if isinstance(obj, Mapping) and obj and all(isinstance(v, list) for v in obj.values()) and \
            not any(v and isinstance(v[0], Mapping) and "role" not in v[0] for v in obj.values()):
        obj = datasets.Dataset.from_dict(dict(obj))  # columnar {"prompt": [...], "chosen": [...], ...}
    if isinstance(obj, datasets.DatasetDict) or (isinstance(obj, Mapping) and obj and
                                                 all(isinstance(v, (list, datasets.Dataset)) for v in obj.values())):
        splits = dict(obj)
    else:
        splits = {"train": obj}
    if "train" not in splits:
        if len(splits) == 1:
            splits = {"train": next(iter(splits.values()))}
        else:
            raise InputError(f"dataset {name!r} has splits {sorted(splits)} but no 'train' split")
    ev_name = next((k for k in ("validation", "eval", "test", "valid", "dev") if k in splits), None)

    def conv(ds: Any) -> Tuple[List[PreferencePair], str]:
        cols = list(ds.column_names) if hasattr(ds, "column_names") else None
        rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
        p, _, fmt = rows_to_pairs(rows, tokenizer, strict=True, columns=cols)
        return p, fmt

    train, fmt = conv(splits["train"])
    info: Dict[str, Any] = {"source": name, "format": fmt, "dropped": {}}
    if ev_name is not None:
        ev, _ = conv(splits[ev_name])
        test: List[PreferencePair] = []
        if ev_name == "validation" and "test" in splits:
            test, _ = conv(splits["test"])
        info["split"] = {"method": "given splits", "seed": None, "totals": [len(train), len(ev)],
                         "names": ["train", ev_name]}
        info["eval_split"] = ev_name
        return PreferenceData(name, train, ev, test, info)
    train, ev, split = _random_holdout(train, holdout_fraction, seed)
    info["split"] = {**split, "names": ["train", "eval"]}
    info["eval_split"] = "eval (random hold-out)"
    return PreferenceData(name, train, ev, [], info)


def load_preference_data(source: Any, tokenizer: Any = None, *, seed: int = DEFAULT_SPLIT_SEED,
                         fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS, holdout_fraction: float = 0.1,
                         allow_hub: bool = False, cache_dir: Optional[str] = None) -> PreferenceData:
    """Load a preference dataset into train / eval (/ test) :class:`PreferencePair` rows.

    Args:
        source: one of
            * ``"hh-rlhf"``: Anthropic HH-RLHF test splits (8,552 pairs, MIT), re-split ``fractions`` into
              train / validation / test, stratified by subset, with ``seed``; ``eval`` = validation.
            * ``"ultrafeedback-1200"``: UltraFeedback binarized 1,000 train / 200 eval (MIT); rendered with the
              tokenizer's chat template when it has one.
            * a local ``.json`` / ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file or a directory (read with
              ``datasets.load_dataset``);
            * a ``datasets.Dataset`` / ``DatasetDict``, a list of row dicts, or a dict of split name → rows;
            * a Hugging Face dataset id (only if no such local path exists).
        tokenizer: renders conversational rows with its chat template (required for those).
        seed: split seed (built-in HH split, or the random hold-out of user data without an eval split).
        fractions: HH train / validation / test fractions.
        holdout_fraction: share of user data held out when it has no validation/eval/test split.
        allow_hub: for the built-in names only: if their local folder is missing, load the upstream hub
            dataset (``Anthropic/hh-rlhf`` / ``trl-lib/ultrafeedback_binarized``) instead of raising.
        cache_dir: ``datasets`` cache for files read through ``datasets.load_dataset`` (default: its own).

    Returns:
        :class:`PreferenceData` with ``info`` describing source, format, split (seed, fractions, counts) and
        dropped rows.

    Raises:
        InputError: unknown / missing source, missing column, or (user data) a bad row.
    """
    if isinstance(source, PreferenceData):
        return source
    if not isinstance(source, (str, Path)):
        return _from_hf(source, tokenizer, type(source).__name__, seed, holdout_fraction)
    name = str(source)
    key = _ALIASES.get(name.lower())
    if key is not None and not Path(name).exists():
        meta = BUILTIN_DATASETS[key]
        folder = data_dir() / meta["folder"]
        if folder.is_dir():
            data = _load_hh(folder, seed, fractions) if key == "hh-rlhf" else _load_ultrafeedback(folder, tokenizer)
            data.info["description"] = meta["description"]
            return data
        if not allow_hub:
            raise InputError(f"built-in dataset {key!r} not found at {folder} (set UDRRA_DATA_DIR to the folder "
                             f"holding {meta['folder']}/, or allow the hub fallback to {meta['hub_id']!r})")
        import datasets

        ds = datasets.load_dataset(meta["hub_id"], cache_dir=cache_dir)
        return _from_hf(ds, tokenizer, meta["hub_id"], seed, holdout_fraction)

    path = Path(name).expanduser()
    import datasets

    if path.exists():
        try:
            if path.is_dir():
                ds = datasets.load_dataset(str(path), cache_dir=cache_dir)
            else:
                suffixes = "".join(path.suffixes).lower()
                if suffixes.endswith(".parquet"):
                    ds = datasets.load_dataset("parquet", data_files=str(path), cache_dir=cache_dir)
                elif suffixes.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
                    ds = datasets.load_dataset("json", data_files=str(path), cache_dir=cache_dir)
                else:
                    raise InputError(f"dataset file {path} must be .json, .jsonl, .jsonl.gz or .parquet")
        except InputError:
            raise
        except Exception as e:  # datasets raises many types for unreadable files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"cannot read dataset {path}: {first}") from e
        return _from_hf(ds, tokenizer, str(path), seed, holdout_fraction)
    if path.suffix or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise InputError(f"dataset {name!r} not found: not a local file or directory, not a built-in name "
                         f"({', '.join(BUILTIN_DATASETS)}), not a hub id 'owner/name'")
    try:
        ds = datasets.load_dataset(name, cache_dir=cache_dir)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"dataset {name!r} is not a local path and could not be loaded from the hub: {first}") from e
    return _from_hf(ds, tokenizer, name, seed, holdout_fraction)


# ---------------------------------------------------------------------------------- tokenisation


@dataclass
class TokenizedPair:
    """Token ids of one pair: the (possibly truncated) prompt shared by both responses, then each response.

    ``chosen_ids`` / ``rejected_ids`` = ``prompt_ids + response ids``; the response part starts at
    ``len(prompt_ids)`` and is what the loss mask covers.
    """

    prompt_ids: List[int]
    chosen_ids: List[int]
    rejected_ids: List[int]
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False

    @property
    def truncated(self) -> bool:
        return self.prompt_truncated or self.chosen_truncated or self.rejected_truncated


@dataclass
class TruncationStats:
    """How many rows :func:`tokenize_pairs` truncated (a row counts once per category it falls in)."""

    rows: int = 0
    truncated_rows: int = 0
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    max_length: int = 0
    max_prompt_length: int = 0

    def add(self, tp: TokenizedPair) -> None:
        self.rows += 1
        self.truncated_rows += int(tp.truncated)
        self.prompt_truncated += int(tp.prompt_truncated)
        self.chosen_truncated += int(tp.chosen_truncated)
        self.rejected_truncated += int(tp.rejected_truncated)

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.truncated_rows}/{self.rows} rows truncated (prompt {self.prompt_truncated}, chosen "
                f"{self.chosen_truncated}, rejected {self.rejected_truncated}; max_length {self.max_length}, "
                f"max_prompt_length {self.max_prompt_length})")


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if int(max_length) < 2:
        raise InputError(f"max_length must be >= 2 tokens, got {max_length}")
    if not 1 <= int(max_prompt_length) < int(max_length):
        raise InputError(f"max_prompt_length must be in [1, max_length={max_length}) so every response keeps at "
                         f"least one token, got {max_prompt_length}")


def _assemble(prompt_ids: List[int], c_ids: List[int], r_ids: List[int], max_length: int,
              max_prompt_length: int) -> TokenizedPair:
    p_trunc = len(prompt_ids) > max_prompt_length
    if p_trunc:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end of the prompt (next to the response)
    budget = max_length - len(prompt_ids)  # >= max_length - max_prompt_length >= 1
    c_trunc, r_trunc = len(c_ids) > budget, len(r_ids) > budget
    c_ids, r_ids = c_ids[:budget], r_ids[:budget]
    return TokenizedPair(list(prompt_ids), list(prompt_ids) + c_ids, list(prompt_ids) + r_ids, p_trunc, c_trunc,
                         r_trunc)


def _special_ids(tokenizer: Any) -> Tuple[Optional[int], int]:
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("tokenizer has no eos token: responses need one to end")
    return bos, eos


def tokenize_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str, *, max_length: int = 256,
                  max_prompt_length: int = 192, append_eos: bool = True) -> TokenizedPair:
    """Tokenise one pair (prompt and responses separately, so response token boundaries never depend on the
    prompt) and truncate to fit ``max_length``.

    Texts are tokenised with ``add_special_tokens=False``; the tokenizer's bos is prepended to the prompt when
    it adds one by default (``add_bos_token``) and the prompt does not start with it already; eos is appended
    to each response (``append_eos``).

    Truncation never drops a response: the prompt is cut from the LEFT to ``max_prompt_length`` tokens (its end
    is kept), then each response from the RIGHT to ``max_length - len(prompt)`` tokens (≥ ``max_length -
    max_prompt_length`` ≥ 1). The returned flags say what was cut.

    Raises:
        InputError: ``max_prompt_length`` not in ``[1, max_length)``, an empty response, or an empty prompt
            with a tokenizer that has no bos token (the first response token would have no context).
    """
    return tokenize_pairs(tokenizer, [PreferencePair(prompt, chosen, rejected)], max_length=max_length,
                          max_prompt_length=max_prompt_length, append_eos=append_eos)[0][0]


def tokenize_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], *, max_length: int = 256,
                   max_prompt_length: int = 192, append_eos: bool = True) -> Tuple[List[TokenizedPair],
                                                                                   TruncationStats]:
    """Batch version of :func:`tokenize_pair`; returns the tokenised rows and the truncation counts."""
    _check_lengths(max_length, max_prompt_length)
    bos, eos = _special_ids(tokenizer)
    stats = TruncationStats(max_length=int(max_length), max_prompt_length=int(max_prompt_length))
    if not pairs:
        return [], stats

    def enc(texts: List[str]) -> List[List[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    P = enc([p.prompt for p in pairs])
    C = enc([p.chosen for p in pairs])
    R = enc([p.rejected for p in pairs])
    out = []
    for i, (p, c, r) in enumerate(zip(P, C, R)):
        if bos is not None and (not p or p[0] != bos):
            p = [bos] + p
        if not p:
            raise InputError(f"row {i}: the prompt is empty and the tokenizer adds no bos token, so the first "
                             f"response token has no context to be scored from")
        if not c or not r:
            raise InputError(f"row {i}: {'chosen' if not c else 'rejected'} response tokenizes to 0 tokens")
        if append_eos:
            c, r = c + [eos], r + [eos]
        tp = _assemble(p, c, r, int(max_length), int(max_prompt_length))
        stats.add(tp)
        out.append(tp)
    return out, stats


def collate_pairs(rows: Sequence[TokenizedPair], pad_token_id: int) -> Dict[str, Tensor]:
    """Right-pad a batch of ``B`` pairs into one ``2B``-row batch: rows ``0..B-1`` chosen, ``B..2B-1`` rejected.

    Returns a dict of ``(2B, T)`` int64 tensors (``T`` = longest sequence in the batch): ``input_ids``
    (padding = ``pad_token_id``), ``attention_mask`` (1 on real tokens), ``loss_mask`` (1 on response tokens
    only), plus ``n_pairs`` (a 0-d int64 tensor holding ``B``). Split with ``x[:B]`` / ``x[B:]``.
    """
    if not rows:
        raise InputError("collate_pairs: empty batch")
    seqs = [r.chosen_ids for r in rows] + [r.rejected_ids for r in rows]
    plen = [len(r.prompt_ids) for r in rows] * 2
    T = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, T), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((n, T), dtype=torch.long)
    loss_mask = torch.zeros((n, T), dtype=torch.long)
    for i, (s, pl) in enumerate(zip(seqs, plen)):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, :len(s)] = 1
        loss_mask[i, pl:len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask,
            "n_pairs": torch.tensor(len(rows), dtype=torch.long)}
