"""Algorithm files: parsing, overrides and validation of a composition.

An algorithm file is TOML with exactly four component tables, ``[target]``, ``[source]``, ``[reward]``,
``[reference]`` (each with a ``kind`` and its parameters), and an optional ``[algorithm]`` table (``name``,
``description``, ``paper``). Every check here raises :class:`~udrra.errors.ConfigError` with a one-line
message naming the file, the table and what is valid.
"""

from __future__ import annotations

import copy
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .components import TABLES, Component, Components, resolve_params
from .components import reference as reference_mod
from .components import reward as reward_mod
from .components import source as source_mod
from .components import target as target_mod
from .errors import ConfigError

KIND_TABLES = {
    "target": target_mod.KINDS,
    "source": source_mod.KINDS,
    "reward": reward_mod.KINDS,
    "reference": reference_mod.KINDS,
}
META_KEYS = ("name", "description", "paper")

#: which sources and reference terms each reward kind can be composed with
REWARD_SOURCES = {
    "preference": ("offline_pairs", "on_policy_pairs"),
    "explicit": ("on_policy",),
    "reward_regression": ("offline_samples", "on_policy"),
    "reward_difference": ("offline_samples",),
    "noise_contrastive": ("offline_pairs",),
    "max_likelihood": ("best_of_n",),
}
REWARD_REFERENCES = {
    "preference": ("log_ratio", "none", "chosen_nll"),
    "explicit": ("kl_in_reward", "kl_in_loss", "none"),
    "reward_regression": ("log_ratio",),
    "reward_difference": ("log_ratio",),
    "noise_contrastive": ("log_ratio",),
    "max_likelihood": ("sampler",),
}
#: links whose parameter epsilon is required (and the only ones that accept it)
EPSILON_LINKS = ("smoothed_logsigmoid", "robust")
UPDATE_DEFAULTS = {"ema": {"decay": 0.99}, "reset_every": {"every": 100, "rounds": 3}}
UPDATE_PARAMS = {"decay": "ema", "every": "reset_every", "rounds": "reset_every"}


def catalog_dir():
    """The folder of the shipped algorithm files (package data ``udrra.losses``)."""
    return resources.files("udrra.losses")


def catalog_names() -> List[str]:
    """Names of the shipped algorithms, sorted."""
    return sorted(p.name[:-5] for p in catalog_dir().iterdir() if p.name.endswith(".toml"))


def read_algorithm_file(name_or_path: str) -> Tuple[Dict[str, Any], str, Optional[Path]]:
    """Read a catalog name or a path to a TOML file. Returns (raw dict, display name, path or None)."""
    text: str
    path: Optional[Path] = None
    candidate = Path(name_or_path)
    if name_or_path.endswith(".toml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"algorithm file {name_or_path!r} does not exist")
        path = candidate
        text = candidate.read_text(encoding="utf-8")
        display = str(candidate)
    else:
        entry = catalog_dir() / f"{name_or_path}.toml"
        if not entry.is_file():
            raise ConfigError(f"unknown algorithm {name_or_path!r}; catalog: {', '.join(catalog_names())} "
                              "(or give a path to a .toml file)")
        text = entry.read_text(encoding="utf-8")
        display = name_or_path
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{display}: malformed TOML: {e}") from None
    return raw, display, path


def parse_override_value(text: str) -> Any:
    """A CLI override value: a TOML literal (``0.5``, ``true``, ``"x"``) or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: Dict[str, Any], overrides: Optional[Mapping[str, Any]], display: str) -> Dict[str, Any]:
    """Apply dotted-key overrides such as ``{"target.beta": 0.5}``. Unknown tables are rejected.

    ``TABLE.kind`` overrides are applied first (a new kind starts from its own defaults), then ``reference.update``
    (a new rule drops the old rule's parameters, e.g. ``every`` and ``rounds``), then the other parameters, so
    ``{"target.beta": 0.5, "target.kind": "forward_kl"}`` keeps β whatever the order of the keys."""
    out = copy.deepcopy(raw)
    items = sorted((overrides or {}).items(),
                   key=lambda kv: (not kv[0].endswith(".kind"), kv[0] != "reference.update"))
    for key, value in items:
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in (*TABLES, "algorithm"):
            raise ConfigError(f"{display}: override {key!r} must be TABLE.PARAM with TABLE one of "
                              f"{', '.join((*TABLES, 'algorithm'))}")
        table, param = parts
        out.setdefault(table, {})
        if not isinstance(out[table], dict):
            raise ConfigError(f"{display}: [{table}] must be a table")
        if isinstance(value, str) and param != "kind" and table != "algorithm":
            value = parse_override_value(value)
        if param == "kind" and out[table].get("kind") != value:
            out[table] = {"kind": value}  # a new kind starts from its own defaults
        elif table == "reference" and param == "update" and out[table].get("update", "frozen") != value:
            # a new update rule drops the file's parameters of the old one (e.g. every/rounds of reset_every);
            # parameters given as overrides themselves are applied after this, in key order, and are kept
            out[table] = {k: v for k, v in out[table].items() if UPDATE_PARAMS.get(k, value) == value}
            out[table][param] = value
        else:
            out[table][param] = value
    return out


def build_components(raw: Dict[str, Any], display: str) -> Tuple[Components, Dict[str, Any]]:
    """Validate a raw algorithm dict and return the resolved components and the ``[algorithm]`` metadata."""
    unknown = [k for k in raw if k not in (*TABLES, "algorithm")]
    if unknown:
        raise ConfigError(f"{display}: unknown top-level key(s) {', '.join(map(repr, unknown))}; an algorithm file "
                          f"has exactly the tables {', '.join(f'[{t}]' for t in TABLES)} and optionally [algorithm]")
    meta = raw.get("algorithm", {})
    if not isinstance(meta, dict):
        raise ConfigError(f"{display}: [algorithm] must be a table with keys {', '.join(META_KEYS)}")
    bad_meta = [k for k in meta if k not in META_KEYS]
    if bad_meta:
        raise ConfigError(f"{display}: [algorithm] has unknown key(s) {', '.join(map(repr, bad_meta))}; "
                          f"valid: {', '.join(META_KEYS)}")
    comps: Dict[str, Component] = {}
    for table in TABLES:
        given = raw.get(table)
        if not isinstance(given, dict):
            raise ConfigError(f"{display}: missing table [{table}]; every algorithm file needs "
                              f"{', '.join(f'[{t}]' for t in TABLES)}")
        kind = given.get("kind")
        kinds = KIND_TABLES[table]
        if kind is None:
            raise ConfigError(f"{display}: [{table}] needs a kind; valid kinds: {', '.join(kinds)}")
        if kind not in kinds:
            raise ConfigError(f"{display}: [{table}] kind {kind!r} is unknown; valid kinds: {', '.join(kinds)}")
        given = dict(given)
        if table == "reference":
            rule = given.get("update", "frozen")
            for p, needed in UPDATE_PARAMS.items():
                if p in given and rule != needed:
                    raise ConfigError(f"{display}: [reference] {p} only applies to update = {needed!r}, "
                                      f"not {rule!r}")
            for p, v in UPDATE_DEFAULTS.get(rule, {}).items():
                given.setdefault(p, v)
        params = resolve_params(table, kinds[kind], given, display)
        if table == "reference":
            params = {k: v for k, v in params.items() if not (k in UPDATE_PARAMS and v is None)}
        comps[table] = Component(table, kind, params)
    comps = _check_composition(comps, display)
    return Components(**comps), dict(meta)


def _check_composition(c: Dict[str, Component], display: str) -> Dict[str, Component]:
    t, s, rw, ref = c["target"], c["source"], c["reward"], c["reference"]
    ok_sources = REWARD_SOURCES[rw.kind]
    if s.kind not in ok_sources:
        why = (" (it yields single samples and has no labeller)" if rw.kind == "preference" and s.kind == "on_policy"
               else "")
        raise ConfigError(f"{display}: [source] kind {s.kind!r} cannot feed [reward] kind {rw.kind!r}{why}; "
                          f"valid [source] kinds for it: {', '.join(ok_sources)}")
    ok_refs = REWARD_REFERENCES[rw.kind]
    if ref.kind not in ok_refs:
        raise ConfigError(f"{display}: [reference] kind {ref.kind!r} cannot be combined with [reward] kind "
                          f"{rw.kind!r}; valid [reference] kinds for it: {', '.join(ok_refs)}")
    if rw.kind == "preference":
        allowed = target_mod.TARGET_LINKS[t.kind]
        if not allowed:
            raise ConfigError(f"{display}: [target] kind {t.kind!r} cannot be reached from preferences; valid "
                              f"[target] kinds with [reward] kind 'preference': "
                              f"{', '.join(k for k, v in target_mod.TARGET_LINKS.items() if v)}")
        link = rw.get("link")
        if link is None:
            link = allowed[0]
        elif link not in allowed:
            consistent = [k for k, v in target_mod.TARGET_LINKS.items() if link in v]
            raise ConfigError(f"{display}: [reward] link {link!r} is inconsistent with [target] kind {t.kind!r}; "
                              f"links for {t.kind!r}: {', '.join(allowed)}; link {link!r} reaches target "
                              f"{', '.join(consistent)}")
        eps = rw.get("epsilon")
        if link in EPSILON_LINKS and eps is None:
            raise ConfigError(f"{display}: [reward] link {link!r} needs parameter 'epsilon' in [0, 0.5)")
        if link not in EPSILON_LINKS and eps is not None:
            raise ConfigError(f"{display}: [reward] epsilon only applies to links {', '.join(EPSILON_LINKS)}, "
                              f"not {link!r}")
        if ref.kind == "chosen_nll":
            if link not in ("logsigmoid", "odds_ratio"):
                raise ConfigError(f"{display}: [reference] kind 'chosen_nll' (NLL of the chosen response + λ·preference "
                                  f"term) is derived for links logsigmoid and odds_ratio, not {link!r}")
            if s.kind != "offline_pairs":
                raise ConfigError(f"{display}: [reference] kind 'chosen_nll' needs [source] kind 'offline_pairs' (the "
                                  f"NLL anchors the policy to a fixed dataset's chosen responses), got {s.kind!r}")
        if link == "odds_ratio" and ref.kind not in reference_mod.REFERENCE_FREE:
            raise ConfigError(f"{display}: [reward] link 'odds_ratio' takes the odds of P = π(y) (u = log π ≤ 0); valid "
                              f"[reference] kinds for it: {', '.join(reference_mod.REFERENCE_FREE)}")
        if ref.kind in reference_mod.REFERENCE_FREE and link in reward_mod.RATIO_LINKS:
            raise ConfigError(f"{display}: [reward] link {link!r} needs the ratio π/π_ref; valid [reference] "
                              "kind for it: log_ratio")
        c["reward"] = Component("reward", rw.kind, {**rw.params, "link": link})
    else:
        allowed_t = target_mod.TARGET_FOR_REWARD[rw.kind]
        if t.kind not in allowed_t:
            raise ConfigError(f"{display}: [target] kind {t.kind!r} cannot be the target of [reward] kind "
                              f"{rw.kind!r}; valid [target] kinds: {', '.join(allowed_t)}")
    if ref.kind != "none" and t.kind == "argmax" and t["beta"] == 0 and ref.kind != "kl_in_loss":
        raise ConfigError(f"{display}: [target] kind 'argmax' has beta = 0, but [reference] kind {ref.kind!r} "
                          "needs beta > 0; use [reference] kind 'none' for no regularisation")
    if s.kind != "on_policy" or rw.kind != "explicit":
        if any(s.get(k) is not None for k in ("clip", "clip_high", "dual_clip")) or (s.get("epochs") or 1) != 1:
            raise ConfigError(f"{display}: [source] clip/clip_high/dual_clip/epochs only apply to an 'on_policy' "
                              "source with an 'explicit' reward (PPO-style sample reuse)")
    if s.get("clip") is None and (s.get("clip_high") is not None or s.get("dual_clip") is not None):
        raise ConfigError(f"{display}: [source] clip_high and dual_clip refine the ratio clip: set [source] clip "
                          "(ε_low, e.g. 0.2) too")
    if rw.kind == "explicit":
        c["reward"] = _check_explicit(rw, s, ref, display)
    return c


def _check_explicit(rw: Component, s: Component, ref: Component, display: str) -> Component:
    """Group sizes a baseline needs, and the ``gae``-only parameters (defaults filled in for ``gae``)."""
    baseline = rw["baseline"]
    spec = reward_mod.BASELINE_TABLE.get(baseline)
    if spec is not None and s["n"] < spec.min_group:
        raise ConfigError(f"{display}: [reward] baseline {baseline!r} needs [source] n >= {spec.min_group} samples "
                          f"per prompt, got n = {s['n']}")
    given = {k for k in reward_mod.GAE_PARAMS if rw.get(k) is not None}
    if baseline == reward_mod.RETURN_TO_GO and (ref.kind != "kl_in_reward" or ref.get("kl_return") != "sequence"):
        raise ConfigError(f"{display}: [reward] baseline {baseline!r} (REINFORCE++) whitens the returns-to-go of the "
                          "KL-shaped token rewards: it needs [reference] kind 'kl_in_reward' with kl_return = "
                          f"'sequence', got {ref.kind!r}" + (f" with kl_return = {ref.get('kl_return')!r}"
                                                             if ref.kind == "kl_in_reward" else ""))
    if baseline != reward_mod.GAE:
        if given:
            raise ConfigError(f"{display}: [reward] {', '.join(sorted(given))} only apply to baseline 'gae' (a "
                              f"learned critic), not {baseline!r}")
        return rw
    if ref.kind == "kl_in_reward" and ref.get("kl_return") == "token":
        raise ConfigError(f"{display}: [reference] kl_return = 'token' (a non-cumulative per-token KL return) does "
                          "not apply to baseline 'gae', whose returns are the discounted sums of the per-token "
                          "rewards; valid with 'gae': kl_return = 'sequence'")
    params = dict(rw.params)
    for k, default in reward_mod.GAE_PARAMS.items():
        if params.get(k) is None:
            params[k] = default
    return Component("reward", rw.kind, params)
