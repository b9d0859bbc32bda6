"""Convergence ablations: vary one loss component (or the algorithm) on a bandit testbed and measure what changes.

An experiment is a TOML file (see ``experiments/``)::

    [experiment]
    name = "kl_placement"              # output folder results/<name>/ by default
    description = "..."
    notes = "..."                      # markdown appended to the report (e.g. where a claim differs, and why)
    base = "ppo"                       # catalog name or .toml path (relative to the experiment file)
    mode = "exact"                     # exact (population gradients) | sampled (mini-batches)
    steps = 1500                       # optimiser steps per run (per round for reference resets)
    seeds = 3
    optimizer = "adam"                 # rprop | adam | sgd
    lr = 0.05
    batch_size = 64                    # sampled mode: pairs / samples per prompt per step
    log_every = 10
    epsilon = 0.02                     # steps-to-ε threshold on the TV metrics
    init = "reference"                 # reference | uniform | random (log π_ref + N(0, init_scale²) per seed)
                                       # | random_uniform (N(0, init_scale²) logits: mass off π_ref's support)
    set = { "target.beta" = 1.0 }      # overrides applied to the base and every variant
    base_set = { }                     # overrides for the base only (the composition tv_base measures against)
    init_scale = 1.0
    metrics = ["tv_target", "tv_base", "kl_ref", "reward", "uncovered_mass"]

    [testbed]                          # the bandit (see TESTBEDS)
    kind = "random"
    prompts = 3
    responses = 5

    [testbed]                          # or Xu et al. §4.2's synthetic bandit (see build_testbed)
    kind = "xu_synthetic"
    prompts = 8                        # P prompts × P responses, the optimal response of x is y = x
    pairs_per_prompt = 3
    hidden = 64
    init_scale = 0.1                   # std of the initial MLP's output weights
    reward_model = "fit"               # true | fit: on-policy learners see a BT MLP reward model
    reward_model_steps = 1000          # its Adam steps (lr 0.05)
    reward_model_weight_decay = 0.0    # its L2 (Adam weight_decay): shrinks r_φ toward 0 off the data
    reference = "init"                 # init: π_ref = the MLP at initialisation | sft: that MLP after SFT
    sft_data = "chosen"                # sft: maximum likelihood on the chosen responses | "pairs": both sides
    sft_steps = 300                    # sft: full-batch Adam steps
    sft_lr = 0.01                      # sft: Adam learning rate

    [testbed]                          # or the exact sequence testbed (udrra.SequenceBandit.random)
    kind = "sequence"
    prompts = 3
    vocab = 3                          # V tokens, EOS = V − 1
    max_len = 4                        # L: N = Σ_{k<L} (V−1)^k + (V−1)^L responses per prompt
    seed = 0
    reward_mode = "response"           # response | token | length (udrra.sequence.REWARD_MODES)
    reward_scale = 1.0
    ref_concentration = 2.0
    length_coef = 0.0                  # + length_coef·|y|
    reward_center = "none"             # none | length: subtract E_π_ref[r | |y|] per prompt and length

    [[variant]]                        # one composition per variant: the base with dotted overrides,
    label = "k3 in loss"               # or another algorithm
    algorithm = "grpo"
    set = { "target.beta" = 0.5 }
    testbed = { coverage = 0.5 }       # optional: testbed keys replaced for this variant
    batch_size = 256                   # optional: sampled-mode batch size for this variant

    [[claim]]                          # a paper's qualitative claim, checked on the measured numbers
    text = "DPO puts mass on the unobserved response"
    variant = "DPO"
    metric = "uncovered_mass"
    op = ">"                           # > < >= <=
    value = 0.05                       # or: than = "initial" | "<other variant label>"

How claims are judged (:func:`judge_claim`): over seeds, not on seed means alone. Each seed s gives a difference
d_s: ``than = "<variant>"``: final_s(variant) − final_s(other), paired by seed (every variant runs seeds 0 … N − 1;
a variant whose runs do not depend on the seed simply repeats its value); ``than = "initial"``: final_s − initial_s
of the same variant and seed; ``value = v``: final_s − v. The claim reads ``mean(d) op 0``, judged with the
two-sided 95 % Student-t interval mean(d) ± t(0.975, N − 1)·sd(d)/√N: **holds** when the whole interval is on the
claim's side of 0 (``>``/``>=``: lower bound > 0; ``<``/``<=``: upper bound < 0), **does not hold** when it is
wholly on the other side, **not resolved at N seeds** otherwise — the interval contains (or touches) 0, N = 1 (no
interval), a NaN metric, or a tie (d exactly 0 in every seed, e.g. two variants that are the same run; for
``>=``/``<=`` too: an interval cannot tell ``>=`` from ``>``). More seeds narrow the interval; a claim that is not
resolved says that the seeds measured do not decide it, not that it is false. Seeds that are replicas (exact
gradients from the same start and testbed) give equal d_s: a zero-width interval, and the verdict is the sign of
that difference. Each claim dict has ``measured``/``reference`` (seed means), ``against``, ``verdict``,
``diff_mean``, ``ci_low``, ``ci_high``, ``seeds``, ``note``, ``difference`` (what d is) and ``holds`` (True only for
the verdict "holds").

Metrics (per logged step, per seed; means over prompts):

- ``tv_target``: total variation to the variant's own derived target (NaN where it has none);
- ``tv_limit``: total variation to the variant's own target with the group size taken to infinity (the n → ∞
  target that exact mode used before finite groups; equal to ``tv_target`` for compositions without groups);
- ``tv_base``: total variation to the base composition's target (the distribution the ablation is measured
  against, e.g. DPO's Boltzmann target);
- ``kl_ref``: KL(π‖π_ref) in nats; ``reward``: E_π[r] under the true reward;
- ``uncovered_mass``: probability on responses that no pair of μ (or sample of d) covers;
- ``max_uncovered``: the largest probability on one uncovered response (Xu et al. §4.2's "0.11 → 0.23");
- ``max_prob``: the largest probability on one response (1 = deterministic);
- ``loss``: the training loss of the batch that step trained on, i.e. evaluated before that step's update
  (with vectorised seeds: the mean over the stacked copies);
- ``mean_length``: E_π|y|, the mean response length in tokens (EOS counted); sequence testbeds only.

On a sequence testbed every metric is taken over whole responses, on the ``(P, N)`` distribution
π(y|x) = Π_t π(y_t | x, y_<t): targets are :func:`udrra.sequence.derive_sequence`'s (n → ∞ groups, so
``tv_limit`` = ``tv_target``), ``kl_ref`` is KL(π‖π_ref) of whole responses. Its seeds run one by one (seeds change
the sampler and the initial policy, not the testbed), through :func:`udrra.sequence.SequenceProducer` and
:func:`udrra.loop.fit` exactly as :func:`udrra.verify.train` on a ``SequenceBandit`` does with
``lr_decay = average = early_stop = False``, plus the logged metrics. ``report.md`` gets a response-length table
(the mean length of each variant's final policy, of its own target and of the base target) when ``mean_length``
is measured.

Outputs in the output directory: ``metrics.csv`` (every logged step), ``summary.csv`` (final values, mean ± std
over seeds, steps-to-ε), one PNG per metric (mean over seeds with a min–max band) and ``report.md`` (with the
claims: both means, the mean difference with its 95 % interval, the verdict). :func:`report_from_results`
(``udrra ablate FILE --report-only``) rebuilds ``summary.csv``, the claims and ``report.md`` from a stored
``metrics.csv`` without training (the figures are left as they are).

Seeds are vectorised where the runs are independent per prompt (table policy, no batch-level advantage
normalisation): S seeds of a P-prompt bandit run as one S·P-prompt bandit, with the loss scaled by S so that
each copy gets exactly the gradient it would get alone.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .algorithm import Algorithm, load
from .bandit import Bandit
from .errors import ConfigError, InputError, TargetError
from .policy import POLICY_KINDS, MLPPolicy, make_policy
from .reward_model import fit_reward_model
from .verify import OPTIMIZERS, total_variation, train

__all__ = ["Experiment", "Variant", "Claim", "load_experiment", "run_experiment", "build_testbed", "METRICS",
           "TESTBEDS", "ExperimentResult", "judge_claim", "report_from_results", "claim_line", "VERDICTS",
           "CLAIM_CONFIDENCE"]

METRICS = ("tv_target", "tv_base", "kl_ref", "reward", "uncovered_mass", "max_uncovered", "max_prob", "loss",
           "tv_limit", "mean_length")
TESTBEDS = ("random", "table", "xu_synthetic", "sequence")
#: metrics that only the sequence testbed defines (a bandit's responses are one token)
SEQUENCE_METRICS = ("mean_length",)
#: the largest sequence testbed ablate builds: responses per prompt (every response is enumerated)
MAX_SEQUENCE_RESPONSES = 4096
_REWARD_CENTERS = ("none", "length")
_EXPERIMENT_KEYS = {"name", "description", "notes", "base", "base_set", "set", "mode", "steps", "seeds", "optimizer",
                    "lr", "batch_size", "log_every", "epsilon", "init", "init_scale", "metrics"}
_INITS = ("reference", "uniform", "random", "random_uniform")
_TESTBED_KEYS = {
    "random": {"kind", "prompts", "responses", "seed", "reward_scale", "ref_concentration", "coverage", "uncovered",
               "policy", "hidden", "mlp_init_scale", "reward_model", "reward_model_steps",
               "reward_model_weight_decay", "reward_model_labels"},
    "table": {"kind", "pi_ref", "reward", "preference", "pairs", "policy", "hidden", "mlp_init_scale",
              "reward_model", "reward_model_steps", "reward_model_weight_decay", "reward_model_labels"},
    "xu_synthetic": {"kind", "prompts", "pairs_per_prompt", "seed", "policy", "hidden", "reward_model",
                     "reward_model_steps", "reward_model_weight_decay", "reward_model_labels", "init_scale",
                     "reference", "sft_steps", "sft_data", "sft_lr"},
    "sequence": {"kind", "prompts", "vocab", "max_len", "seed", "reward_mode", "reward_scale", "ref_concentration",
                 "length_coef", "reward_center"},
}
#: xu_synthetic: how π_ref is made (``reference``) and, for ``sft``, which responses it imitates (``sft_data``)
XU_REFERENCES = ("init", "sft")
XU_SFT_DATA = ("chosen", "pairs")
_OPS = {">": lambda a, b: a > b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


@dataclass
class Variant:
    """One run configuration: ``label``, the algorithm name/path, dotted overrides (the experiment's ``set``
    first, then the variant's), ``testbed`` keys that replace the experiment's for this variant, and an optional
    per-variant ``batch_size``."""
    label: str
    algorithm: str
    overrides: Dict[str, Any]
    testbed: Dict[str, Any] = field(default_factory=dict)
    batch_size: Optional[int] = None


@dataclass
class Claim:
    """A qualitative claim checked on final (or initial) metric values: ``metric(variant) op value|than``."""
    text: str
    variant: str
    metric: str
    op: str
    value: Optional[float] = None
    than: Optional[str] = None


@dataclass
class Experiment:
    """A parsed experiment file (see the module docstring for every field)."""
    name: str
    description: str
    base: str
    variants: List[Variant]
    testbed: Dict[str, Any]
    base_overrides: Dict[str, Any] = field(default_factory=dict)
    mode: str = "exact"
    steps: int = 1000
    seeds: int = 3
    optimizer: str = "adam"
    lr: float = 0.05
    batch_size: int = 64
    log_every: int = 10
    epsilon: float = 0.02
    init: str = "reference"
    init_scale: float = 1.0
    metrics: List[str] = field(default_factory=lambda: ["tv_target", "tv_base", "kl_ref", "reward"])
    claims: List[Claim] = field(default_factory=list)
    path: Optional[Path] = None
    notes: str = ""


def _fail(where: str, msg: str):
    raise ConfigError(f"{where}: {msg}")


def load_experiment(path) -> Experiment:
    """Read and validate an experiment TOML file.

    Raises:
        ConfigError: missing file, malformed TOML, unknown keys or values (the message names the key and lists
            what is valid), a variant whose composition does not load, a claim on an unknown variant/metric.
    """
    import tomllib
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: malformed TOML: {e}") from None
    unknown = set(raw) - {"experiment", "testbed", "variant", "claim"}
    if unknown:
        _fail(str(p), f"unknown table(s) {sorted(unknown)}; valid: experiment, testbed, variant, claim")
    ex = dict(raw.get("experiment") or {})
    bad = set(ex) - _EXPERIMENT_KEYS
    if bad:
        _fail(f"{p} [experiment]", f"unknown key(s) {sorted(bad)}; valid: {', '.join(sorted(_EXPERIMENT_KEYS))}")
    if "base" not in ex:
        _fail(f"{p} [experiment]", "missing 'base' (a catalog algorithm name or a .toml path)")
    tb = dict(raw.get("testbed") or {"kind": "random"})
    kind = tb.get("kind", "random")
    if kind not in TESTBEDS:
        _fail(f"{p} [testbed]", f"unknown kind {kind!r}; valid: {', '.join(TESTBEDS)}")
    bad = set(tb) - _TESTBED_KEYS[kind]
    if bad:
        _fail(f"{p} [testbed]", f"unknown key(s) {sorted(bad)} for kind {kind!r}; valid: "
                                f"{', '.join(sorted(_TESTBED_KEYS[kind]))}")
    if tb.get("policy", "table") not in POLICY_KINDS:
        _fail(f"{p} [testbed]", f"unknown policy {tb['policy']!r}; valid: {', '.join(POLICY_KINDS)}")
    if tb.get("reward_model", "true") not in ("true", "fit"):
        _fail(f"{p} [testbed]", f"reward_model must be 'true' or 'fit', got {tb['reward_model']!r}")

    def resolve(name: str) -> str:
        q = Path(name)
        if q.suffix == ".toml" and not q.is_absolute():
            return str((p.parent / q).resolve())
        return name

    base = resolve(str(ex["base"]))
    common = dict(ex.get("set") or {})
    base_overrides = {**common, **dict(ex.get("base_set") or {})}
    try:
        load(base, base_overrides)
    except ConfigError as e:
        _fail(f"{p} [experiment] base", str(e))
    variants = []
    for i, v in enumerate(raw.get("variant") or []):
        vkeys = {"label", "algorithm", "set", "testbed", "batch_size"}
        vbad = set(v) - vkeys
        if vbad:
            _fail(f"{p} [[variant]] #{i + 1}", f"unknown key(s) {sorted(vbad)}; valid: {', '.join(sorted(vkeys))}")
        algo = resolve(str(v.get("algorithm", ex["base"])))
        label = str(v.get("label") or algo)
        vtb = dict(v.get("testbed") or {})
        if vtb.get("kind", kind) != kind:
            _fail(f"{p} variant {label!r}", f"testbed kind {vtb['kind']!r} differs from the experiment's {kind!r}; "
                                            "a variant may change the testbed's other keys only")
        tbad = set(vtb) - _TESTBED_KEYS[kind]
        if tbad:
            _fail(f"{p} variant {label!r}", f"unknown testbed key(s) {sorted(tbad)} for kind {kind!r}; valid: "
                                            f"{', '.join(sorted(_TESTBED_KEYS[kind]))}")
        bs = v.get("batch_size")
        if bs is not None and (not isinstance(bs, int) or bs < 1):
            _fail(f"{p} variant {label!r}", f"batch_size must be a positive integer, got {bs!r}")
        variants.append(Variant(label, algo, {**common, **dict(v.get("set") or {})}, vtb, bs))
    if not variants:
        variants = [Variant(Path(base).stem, base, dict(common))]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        _fail(str(p), f"variant labels must be unique, got {labels}")
    for v in variants:  # every composition must load before anything runs
        try:
            load(v.algorithm, v.overrides)
        except ConfigError as e:
            _fail(f"{p} variant {v.label!r}", str(e))
    if "metrics" in ex and not isinstance(ex["metrics"], list):
        _fail(f"{p} [experiment]", f"metrics must be a list such as [\"tv_base\", \"kl_ref\"], got {ex['metrics']!r}; "
                                   f"valid names: {', '.join(METRICS)}")
    metrics = list(ex.get("metrics") or ["tv_target", "tv_base", "kl_ref", "reward"])
    for m in metrics:
        if m not in METRICS:
            _fail(f"{p} [experiment] metrics", f"unknown metric {m!r}; valid: {', '.join(METRICS)}")
        if m in SEQUENCE_METRICS and kind != "sequence":
            _fail(f"{p} [experiment] metrics", f"metric {m!r} needs [testbed] kind = \"sequence\" (kind {kind!r} has "
                                               f"one-token responses); valid for {kind!r}: "
                                               f"{', '.join(x for x in METRICS if x not in SEQUENCE_METRICS)}")
    claims = []
    for i, c in enumerate(raw.get("claim") or []):
        where = f"{p} [[claim]] #{i + 1}"
        cbad = set(c) - {"text", "variant", "metric", "op", "value", "than"}
        if cbad:
            _fail(where, f"unknown key(s) {sorted(cbad)}; valid: text, variant, metric, op, value, than")
        if c.get("variant") not in labels:
            _fail(where, f"variant {c.get('variant')!r} is not one of {labels}")
        if c.get("metric") not in metrics:
            _fail(where, f"metric {c.get('metric')!r} is not among the experiment's metrics {metrics}")
        if c.get("op") not in _OPS:
            _fail(where, f"op must be one of {list(_OPS)}, got {c.get('op')!r}")
        if ("value" in c) == ("than" in c):
            _fail(where, "give exactly one of value (a number) or than ('initial' or a variant label)")
        if "than" in c and c["than"] != "initial" and c["than"] not in labels:
            _fail(where, f"than must be 'initial' or one of {labels}, got {c['than']!r}")
        claims.append(Claim(str(c.get("text", "")), c["variant"], c["metric"], c["op"],
                            None if "value" not in c else float(c["value"]), c.get("than")))
    mode = ex.get("mode", "exact")
    if mode not in ("exact", "sampled"):
        _fail(f"{p} [experiment]", f"mode must be 'exact' or 'sampled', got {mode!r}")
    opt = ex.get("optimizer", "adam")
    if opt not in OPTIMIZERS:
        _fail(f"{p} [experiment]", f"optimizer must be one of {list(OPTIMIZERS)}, got {opt!r}")
    init = ex.get("init", "reference")
    if init not in _INITS:
        _fail(f"{p} [experiment]", f"init must be one of {', '.join(_INITS)}, got {init!r}")
    for key in ("steps", "seeds", "batch_size", "log_every"):
        if key in ex and (isinstance(ex[key], bool) or not isinstance(ex[key], int) or ex[key] < 1):
            _fail(f"{p} [experiment]", f"{key} must be a positive integer, got {ex[key]!r}")
    for key in ("lr", "epsilon", "init_scale"):
        if key in ex and (isinstance(ex[key], bool) or not isinstance(ex[key], (int, float)) or ex[key] < 0):
            _fail(f"{p} [experiment]", f"{key} must be a non-negative number, got {ex[key]!r}")
    for where, table in [("[testbed]", tb)] + [(f"variant {v.label!r} testbed", v.testbed) for v in variants]:
        for key in ("prompts", "responses", "seed", "uncovered", "pairs_per_prompt", "hidden", "reward_model_steps",
                    "vocab", "max_len", "sft_steps"):
            if key in table and (isinstance(table[key], bool) or not isinstance(table[key], int)):
                _fail(f"{p} {where}", f"{key} must be an integer, got {table[key]!r}")
        for key in ("reward_scale", "ref_concentration", "coverage", "mlp_init_scale", "init_scale",
                    "reward_model_weight_decay", "length_coef", "sft_lr"):
            if key in table and (isinstance(table[key], bool) or not isinstance(table[key], (int, float))):
                _fail(f"{p} {where}", f"{key} must be a number, got {table[key]!r}")
        if kind == "xu_synthetic":
            _check_xu_testbed(f"{p} {where}", {**tb, **table})
        if kind == "sequence":
            _check_sequence_testbed(f"{p} {where}", {**tb, **table})
    return Experiment(name=str(ex.get("name") or p.stem), description=str(ex.get("description", "")), base=base,
                      variants=variants, base_overrides=base_overrides, testbed=tb, mode=mode, steps=int(ex.get("steps", 1000)),
                      seeds=int(ex.get("seeds", 3)), optimizer=opt, lr=float(ex.get("lr", 0.05)),
                      batch_size=int(ex.get("batch_size", 64)), log_every=int(ex.get("log_every", 10)),
                      epsilon=float(ex.get("epsilon", 0.02)), init=init,
                      init_scale=float(ex.get("init_scale", 1.0)), metrics=metrics, claims=claims, path=p,
                      notes=str(ex.get("notes", "")))


def _check_xu_testbed(where: str, spec: Dict[str, Any]) -> None:
    """Ranges of the xu_synthetic keys that shape the reward model and the reference (types are checked by the
    caller)."""
    if spec.get("reward_model_steps", 1) < 1:
        _fail(where, f"reward_model_steps must be >= 1, got {spec['reward_model_steps']!r}")
    if spec.get("reward_model_weight_decay", 0.0) < 0:
        _fail(where, f"reward_model_weight_decay must be >= 0 (an L2 coefficient), got "
                     f"{spec['reward_model_weight_decay']!r}")
    ref = spec.get("reference", "init")
    if ref not in XU_REFERENCES:
        _fail(where, f"reference must be one of {', '.join(XU_REFERENCES)} (π_ref = the MLP at initialisation, or "
                     f"that MLP after SFT on the pairs), got {ref!r}")
    if spec.get("sft_data", "chosen") not in XU_SFT_DATA:
        _fail(where, f"sft_data must be one of {', '.join(XU_SFT_DATA)}, got {spec['sft_data']!r}")
    if spec.get("sft_steps", 1) < 1:
        _fail(where, f"sft_steps must be >= 1, got {spec['sft_steps']!r}")
    if spec.get("sft_lr", 1.0) <= 0:
        _fail(where, f"sft_lr must be > 0, got {spec['sft_lr']!r}")


def _check_sequence_testbed(where: str, spec: Dict[str, Any]) -> None:
    """Ranges of a sequence testbed's keys (types are checked by the caller)."""
    from .sequence import REWARD_MODES
    for key, low, default in (("prompts", 1, 3), ("vocab", 2, 3), ("max_len", 1, 3)):
        if int(spec.get(key, default)) < low:
            _fail(where, f"{key} must be >= {low}, got {spec[key]!r}")
    if spec.get("reward_mode", "response") not in REWARD_MODES:
        _fail(where, f"unknown reward_mode {spec['reward_mode']!r}; valid: {', '.join(REWARD_MODES)}")
    if spec.get("reward_center", "none") not in _REWARD_CENTERS:
        _fail(where, f"unknown reward_center {spec['reward_center']!r}; valid: {', '.join(_REWARD_CENTERS)}")
    if float(spec.get("ref_concentration", 2.0)) <= 0:
        _fail(where, f"ref_concentration must be > 0, got {spec['ref_concentration']!r}")
    V, L = int(spec.get("vocab", 3)), int(spec.get("max_len", 3))
    n = sum((V - 1) ** k for k in range(L)) + (V - 1) ** L
    if n > MAX_SEQUENCE_RESPONSES:
        _fail(where, f"vocab = {V}, max_len = {L} gives {n} responses per prompt, more than the "
                     f"{MAX_SEQUENCE_RESPONSES} ablate enumerates; use a smaller vocab or max_len")


# ------------------------------------------------------------------------------------------------ testbeds
def _pairs_tensor(P: int, K: int, pairs: Sequence[Sequence[int]], where: str) -> Tensor:
    mu = torch.zeros(P, K, K, dtype=torch.float64)
    for item in pairs:
        if len(item) != 3:
            raise InputError(f"{where}: each pair is [prompt, y, y'], got {item!r}")
        x, i, j = (int(v) for v in item)
        if not (0 <= x < P and 0 <= i < K and 0 <= j < K) or i == j:
            raise InputError(f"{where}: pair {item!r} out of range for P={P}, K={K} (needs y != y')")
        mu[x, i, j] += 1.0
    return mu


@dataclass
class Testbed:
    """A built testbed: the true bandit (targets, metrics), the bandit the learners see (reward possibly a
    fitted reward model), the covered-response mask, and how to make each seed's policy."""
    bandit: Bandit
    train_bandit: Bandit
    covered: Tensor
    policy_kind: str
    hidden: int
    init_policy: Optional[torch.nn.Module] = None  # xu_synthetic: the MLP whose initial output is π_ref

    @property
    def base_logits(self) -> Optional[Tensor]:
        """xu_synthetic: the initial MLP's ``(P, K)`` logits (softmax = π_ref); ``None`` for other testbeds."""
        if self.init_policy is None:
            return None
        with torch.no_grad():
            return self.init_policy().detach().clone()


def build_testbed(spec: Dict[str, Any], seed: int = 0, *, rm_cache: Optional[Dict[Any, Tensor]] = None) -> Testbed:
    """Build the bandit described by an experiment's ``[testbed]`` table.

    Kinds: ``random`` (:meth:`Bandit.random`; ``coverage`` keeps that fraction of unordered pairs in μ and
    ``uncovered`` removes the last responses of every prompt from all pairs), ``table`` (explicit ``pi_ref``,
    ``reward`` and/or ``preference``, and ``pairs`` = [[prompt, y, y'], ...] for μ), ``xu_synthetic`` (Xu et al.
    2404.10719 §4.2: P prompts × P responses, rewards U(0, 1) off the diagonal and 1.5 on it (the optimal response
    of prompt x is y = x), ``pairs_per_prompt`` random pairs per prompt that each hold the optimal response,
    π_ref = a randomly initialised MLP policy; data and MLP are drawn from ``seed`` + the experiment seed;
    ``reference = "sft"`` first fine-tunes that MLP for ``sft_steps`` full-batch Adam steps (``sft_lr``) by maximum
    likelihood on the pairs' chosen responses (``sft_data = "pairs"``: on both responses of every pair; see
    :func:`xu_sft_distribution`), and π_ref and the starting policy are the fine-tuned MLP).
    ``sequence``: :meth:`udrra.SequenceBandit.random` (``prompts``, ``vocab``, ``max_len``, ``seed``,
    ``reward_mode``, ``reward_scale``, ``ref_concentration``, ``length_coef``); ``reward_center = "length"`` then
    subtracts, per prompt and response length k, the reference's mean reward of that length E_π_ref[r | |y| = k]
    (so that under π_ref the length of a response says nothing about its reward: every length class has mean 0).
    ``reward_model = "fit"`` makes on-policy learners see a Bradley–Terry reward model fitted on the pairs
    (same policy class) instead of the true reward (``reward_model_labels = "deterministic"``: each pair labelled
    by its better response, as a dataset holding one comparison per pair is); metrics always use the true reward.
    ``rm_cache``: a dict that keeps fitted reward models, keyed by everything the fit depends on (the pairs, the
    preferences, the model and its training settings, the seed), so that variants sharing a reward model (e.g. the
    same PPO at several β) fit it once per seed; the result is the same with or without it.

    Raises:
        InputError: inconsistent shapes or values.
    """
    kind = spec.get("kind", "random")
    policy_kind = spec.get("policy", "table")
    hidden = int(spec.get("hidden", 64))
    init = None
    if kind == "sequence":
        sb = _sequence_bandit(spec)
        covered = (sb.pair_distribution + sb.pair_distribution.transpose(1, 2)).sum(-1) > 0
        return Testbed(sb, sb, covered, "table", hidden)
    if kind == "random":
        P, K = int(spec.get("prompts", 3)), int(spec.get("responses", 5))
        b = Bandit.random(P, K, seed=int(spec.get("seed", 0)), reward_scale=float(spec.get("reward_scale", 1.0)),
                          ref_concentration=float(spec.get("ref_concentration", 2.0)))
        mu = b.pair_distribution.clone()
        n_unc = int(spec.get("uncovered", 0))
        if not 0 <= n_unc <= K - 2:
            raise InputError(f"[testbed] uncovered must be in [0, K-2] = [0, {K - 2}], got {n_unc}")
        if n_unc:
            mu[:, K - n_unc:, :] = 0
            mu[:, :, K - n_unc:] = 0
        cov = float(spec.get("coverage", 1.0))
        if not 0 < cov <= 1:
            raise InputError(f"[testbed] coverage must be in (0, 1], got {cov}")
        if cov < 1:
            g = torch.Generator().manual_seed(int(spec.get("seed", 0)) + 1)
            for x in range(P):
                live = [(i, j) for i in range(K) for j in range(i + 1, K) if mu[x, i, j] > 0]
                keep = max(1, round(cov * len(live)))
                order = torch.randperm(len(live), generator=g)[:keep].tolist()
                mask = torch.zeros(K, K, dtype=torch.float64)
                for o in order:
                    i, j = live[o]
                    mask[i, j] = mask[j, i] = 1.0
                mu[x] = mu[x] * mask
        bandit = Bandit(b.pi_ref, b.reward, b.preference, mu)
    elif kind == "table":
        if "pi_ref" not in spec:
            raise InputError("[testbed] kind 'table' needs pi_ref = [[...], ...]")
        ref = torch.as_tensor(spec["pi_ref"], dtype=torch.float64)
        if ref.dim() != 2:
            raise InputError(f"[testbed] pi_ref must be a (P, K) list of lists, got shape {tuple(ref.shape)}")
        P, K = ref.shape
        mu = None if "pairs" not in spec else _pairs_tensor(P, K, spec["pairs"], "[testbed] pairs")
        bandit = Bandit(ref, spec.get("reward"), spec.get("preference"), mu)
    else:
        P = K = int(spec.get("prompts", 8))
        n_pairs = int(spec.get("pairs_per_prompt", 2))
        if not 1 <= n_pairs <= K - 1:
            raise InputError(f"[testbed] pairs_per_prompt must be in [1, {K - 1}], got {n_pairs}")
        tb_seed = int(spec.get("seed", 0)) + seed  # each experiment seed draws its own data and initial MLP
        g = torch.Generator().manual_seed(tb_seed)
        reward = torch.rand(P, K, generator=g, dtype=torch.float64)
        reward[torch.arange(P), torch.arange(P)] = 1.5  # the optimal response is on the diagonal
        mu = torch.zeros(P, K, K, dtype=torch.float64)
        for x in range(P):
            others = [y for y in torch.randperm(K, generator=g).tolist() if y != x]
            partners = others[:n_pairs]  # each pair holds the optimal response and one other response
            for y in partners:
                mu[x, x, y] = mu[x, y, x] = 1.0
        init = MLPPolicy(P, K, hidden=hidden, zero_init_output=False, init_scale=float(spec.get("init_scale", 0.1)),
                         seed=tb_seed)
        reference = spec.get("reference", "init")
        if reference not in XU_REFERENCES:
            raise InputError(f"[testbed] reference must be one of {', '.join(XU_REFERENCES)}, got {reference!r}")
        if reference == "sft":
            sft_target = xu_sft_distribution(Bandit(torch.full((P, K), 1.0 / K, dtype=torch.float64), reward, None,
                                                    mu), spec.get("sft_data", "chosen"))
            sft_fit(init, sft_target, steps=int(spec.get("sft_steps", 300)), lr=float(spec.get("sft_lr", 0.01)))
        with torch.no_grad():
            ref = torch.softmax(init(), -1)
        bandit = Bandit(ref, reward, None, mu)
        policy_kind = "mlp"
    covered = (bandit.pair_distribution + bandit.pair_distribution.transpose(1, 2)).sum(-1) > 0
    train_bandit = bandit
    if spec.get("reward_model", "true") == "fit":
        rm_kind = "table" if policy_kind == "table" else "mlp"
        labels = spec.get("reward_model_labels", "sampled")
        if labels not in ("sampled", "deterministic"):
            raise InputError(f"[testbed] reward_model_labels must be 'sampled' or 'deterministic', got {labels!r}")
        fit = dict(kind=rm_kind, hidden=hidden, steps=int(spec.get("reward_model_steps", 2000)),
                   weight_decay=float(spec.get("reward_model_weight_decay", 0.0)),
                   deterministic=labels == "deterministic", seed=seed)
        key = None if rm_cache is None else (
            tuple(sorted(fit.items())), tuple(bandit.shape), bandit.pair_distribution.numpy().tobytes(),
            bandit.preference_matrix().numpy().tobytes())
        if key is not None and key in rm_cache:
            r_phi = rm_cache[key].clone()
        else:
            r_phi = fit_reward_model(bandit, **fit)
            if key is not None:
                rm_cache[key] = r_phi.clone()
        train_bandit = bandit.with_reward(r_phi)
    return Testbed(bandit, train_bandit, covered, policy_kind, hidden, init)


def xu_sft_distribution(bandit: Bandit, data: str = "chosen") -> Tensor:
    """The ``(P, K)`` response distribution SFT imitates on a bandit's preference pairs μ.

    ``chosen``: the chosen response of a pair drawn from μ, labelled by the bandit's preferences —
    q(y | x) ∝ Σ_y' (μ[x, y, y'] + μ[x, y', y])·p(y ≻ y' | x) (for Xu et al.'s pairs, which all hold the optimal
    response y = x: mostly y = x, and each partner y' with probability σ(r(y') − r(x))/2 per pair of its own).
    ``pairs``: both responses of every pair, q(y | x) ∝ Σ_y' (μ[x, y, y'] + μ[x, y', y]). Responses no pair holds get
    q = 0 either way.

    Raises:
        InputError: an unknown ``data`` (valid: chosen, pairs), or a prompt without pairs.
    """
    if data not in XU_SFT_DATA:
        raise InputError(f"sft_data must be one of {', '.join(XU_SFT_DATA)}, got {data!r}")
    mu = bandit.pair_distribution
    if data == "chosen":
        pref = bandit.preference_matrix()
        w = (mu * pref).sum(-1) + (mu.transpose(1, 2) * pref).sum(-1)
    else:
        w = mu.sum(-1) + mu.sum(-2)
    total = w.sum(-1, keepdim=True)
    if (total <= 0).any():
        raise InputError("SFT needs at least one pair per prompt")
    return w / total


def sft_fit(policy: torch.nn.Module, target: Tensor, *, steps: int = 300, lr: float = 0.01) -> torch.nn.Module:
    """Supervised fine-tuning of a bandit policy in place: ``steps`` full-batch Adam steps (learning rate ``lr``)
    on the exact cross-entropy −mean_x Σ_y target(y|x)·log π(y|x) (maximum likelihood on responses drawn from
    ``target``). Returns ``policy``.

    Raises:
        InputError: ``steps`` < 1 or ``lr`` <= 0.
    """
    if steps < 1 or not lr > 0:
        raise InputError(f"SFT needs steps >= 1 and lr > 0, got steps = {steps}, lr = {lr}")
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        loss = -(target * torch.log_softmax(policy(), -1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy


def _sequence_bandit(spec: Dict[str, Any]):
    from .sequence import SequenceBandit
    sb = SequenceBandit.random(int(spec.get("prompts", 3)), int(spec.get("vocab", 3)), int(spec.get("max_len", 3)),
                               seed=int(spec.get("seed", 0)), reward_scale=float(spec.get("reward_scale", 1.0)),
                               ref_concentration=float(spec.get("ref_concentration", 2.0)),
                               reward_mode=str(spec.get("reward_mode", "response")),
                               length_coef=float(spec.get("length_coef", 0.0)))
    center = spec.get("reward_center", "none")
    if center not in _REWARD_CENTERS:
        raise InputError(f"[testbed] unknown reward_center {center!r}; valid: {', '.join(_REWARD_CENTERS)}")
    if center == "length":
        lengths = sb.lengths
        r = sb.reward.clone()
        for k in lengths.unique():
            m = lengths == k
            w = sb.pi_ref_seq[:, m]
            r[:, m] -= (w * r[:, m]).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
        sb = SequenceBandit(sb.ref_state_probs, r, vocab=sb.V, max_len=sb.L)
    return sb


# ------------------------------------------------------------------------------------------------ running
def _target_or_none(algo: Algorithm, bandit: Bandit) -> Optional[Tensor]:
    from .sequence import SequenceBandit, sequence_target
    try:
        if isinstance(bandit, SequenceBandit):
            return sequence_target(algo, bandit)
        return algo.target_distribution(bandit).double()
    except TargetError:
        return None


def _limit_or_none(algo: Algorithm, bandit: Bandit) -> Optional[Tensor]:
    """The composition's target with the group size taken to n → ∞ (None where it has none)."""
    from .components.target import limit_target
    derived = limit_target(algo.components)
    if derived.solve is None:
        return None
    try:
        return derived.solve(bandit).double()
    except TargetError:
        return None


def _metric_fn(bandit: Bandit, covered: Tensor, target: Optional[Tensor], base_target: Optional[Tensor],
               copies: int, limit: Optional[Tensor] = None):
    return _metrics_of(bandit.reward, bandit.log_pi_ref, covered, target, base_target, copies, limit)


def _metrics_of(r: Optional[Tensor], log_ref: Tensor, covered: Tensor, target: Optional[Tensor],
                base_target: Optional[Tensor], copies: int, limit: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None):
    """The metrics of ``copies`` stacked ``(P, K)`` policies (K responses, or N whole responses on sequences), each
    a ``(copies,)`` tensor of means over prompts; ``mean_length`` needs the responses' ``lengths``."""
    P, K = log_ref.shape
    unc = (~covered).double()

    def fn(probs: Tensor) -> Dict[str, Tensor]:
        pr = probs.reshape(copies, P, K)
        out = {}
        nan = torch.full((copies,), float("nan"), dtype=torch.float64)
        out["tv_target"] = nan if target is None else total_variation(pr, target).mean(-1)
        out["tv_limit"] = nan if limit is None else total_variation(pr, limit).mean(-1)
        out["tv_base"] = nan if base_target is None else total_variation(pr, base_target).mean(-1)
        logp = torch.log(pr.clamp_min(1e-300))
        out["kl_ref"] = torch.where(pr > 0, pr * (logp - log_ref), torch.zeros_like(pr)).sum(-1).mean(-1)
        out["reward"] = nan if r is None else (pr * r).sum(-1).mean(-1)
        out["uncovered_mass"] = (pr * unc).sum(-1).mean(-1)
        out["max_uncovered"] = (pr * unc).amax(-1).amax(-1)
        out["max_prob"] = pr.amax(-1).mean(-1)
        out["mean_length"] = nan if lengths is None else (pr * lengths).sum(-1).mean(-1)
        return out
    return fn


def _init_logits(ex: Experiment, tb: Testbed, seed: int) -> Tensor:
    return _start_logits(ex, tb.bandit.log_pi_ref, seed)


def _start_logits(ex: Experiment, log_ref: Tensor, seed: int) -> Tensor:
    """One seed's starting logits around ``log_ref`` (``(P, K)``, or ``(P·S, V)`` per state on sequences)."""
    if ex.init == "reference":
        return log_ref.clone()
    if ex.init == "uniform":
        return torch.zeros_like(log_ref)
    g = torch.Generator().manual_seed(10_000 + seed)
    noise = torch.randn(log_ref.shape, generator=g, dtype=torch.float64) * ex.init_scale
    return noise if ex.init == "random_uniform" else log_ref + noise


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` produced: ``rows`` (one dict per logged step × seed × variant), ``summary``
    (one dict per variant), ``claims`` (dicts with the seed means, the verdict, the mean per-seed difference and
    its 95 % interval: see :func:`judge_claim`), ``files`` written."""
    experiment: Experiment
    rows: List[Dict[str, Any]]
    summary: List[Dict[str, Any]]
    claims: List[Dict[str, Any]]
    files: List[Path]
    seconds: float


def _variant_algorithm(ex: Experiment, v: Variant) -> Algorithm:
    """The variant's algorithm. An experiment's ``steps`` is the length of one run, or of one round when the
    reference is reset (``reference.every`` = ``steps`` unless the variant sets it), so that ``rounds`` rounds
    run ``rounds × steps`` steps."""
    algo = load(v.algorithm, v.overrides)
    if algo.components.reference.get("update") == "reset_every" and "reference.every" not in v.overrides:
        algo = load(v.algorithm, {**v.overrides, "reference.every": ex.steps})
    return algo


def _sequence_metric_fn(sb, covered: Tensor, target: Optional[Tensor], base_target: Optional[Tensor]):
    """The metrics of one ``(P, N)`` policy over whole responses (sequence targets are the n → ∞ ones already, so
    ``tv_limit`` is ``tv_target``)."""
    return _metrics_of(sb.reward, torch.log(sb.pi_ref_seq), covered, target, base_target, 1, target, sb.lengths)


def _sequence_init_logits(ex: Experiment, sb, seed: int) -> Tensor:
    """The ``(P·S, V)`` starting logits of one seed (``init`` as on the bandit, per state)."""
    return _start_logits(ex, sb.log_ref_logits, seed)


def _train_sequence_logged(algo: Algorithm, sb, *, exact: bool, steps: int, seed: int, lr: float, batch_size: int,
                           start: Tensor, optimizer: str, log_every: int,
                           metrics: Callable[[Tensor], Dict[str, Any]]) -> List[Dict[str, Any]]:
    """:func:`udrra.verify.train` on a ``SequenceBandit`` with ablate's settings — the given optimiser at a constant
    ``lr``, no averaging, no early stop — from the ``(P·S, V)`` logits ``start``, with ``metrics(probs)`` called on
    the ``(P, N)`` policy at every logged step. Returns the history: ``{"step", "round", "loss", **metrics}``."""
    _, _, history = train(algo, sb, exact=exact, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                          init_logits=start - sb.log_ref_logits, optimizer=optimizer, lr_decay=False,
                          average=False, early_stop=False, log_every=log_every, metrics=metrics)
    return history


def _run_sequence_variant(ex: Experiment, v: Variant, algo: Algorithm, base_algo: Algorithm,
                          progress) -> List[Dict[str, Any]]:
    """One variant on the sequence testbed, seed by seed (the testbed itself does not depend on the seed)."""
    spec = {**ex.testbed, **v.testbed}
    tb = build_testbed(spec)
    sb = tb.bandit
    target = _target_or_none(algo, sb)
    home = sb if not v.testbed else build_testbed(ex.testbed).bandit
    base_target = _target_or_none(base_algo, home if home.shape == sb.shape else sb)
    fn = _sequence_metric_fn(sb, tb.covered, target, base_target)
    rows: List[Dict[str, Any]] = []
    for s in range(ex.seeds):
        start = _sequence_init_logits(ex, sb, s)
        with torch.no_grad():
            first = fn(torch.exp(sb.sequence_logps(start)))
        first["loss"] = torch.full((1,), float("nan"), dtype=torch.float64)
        hist = _train_sequence_logged(algo, sb, exact=ex.mode == "exact", steps=ex.steps, seed=s, lr=ex.lr,
                                      batch_size=v.batch_size or ex.batch_size, start=start,
                                      optimizer=ex.optimizer, log_every=ex.log_every, metrics=fn)
        for step, rec in [(0, first)] + [(h["step"], h) for h in hist]:
            row = {"variant": v.label, "seed": s, "step": step}
            row.update({m: float(rec[m]) for m in ex.metrics})
            rows.append(row)
        progress.update(1)
    return rows


def _run_variant(ex: Experiment, v: Variant, base_algo: Algorithm, progress,
                 rm_cache: Optional[Dict[Any, Tensor]] = None) -> List[Dict[str, Any]]:
    algo = _variant_algorithm(ex, v)
    rows: List[Dict[str, Any]] = []
    spec = {**ex.testbed, **v.testbed}
    if spec.get("kind") == "sequence":
        return _run_sequence_variant(ex, v, algo, base_algo, progress)
    vectorise = (spec.get("policy", "table") == "table" and spec.get("kind") != "xu_synthetic"
                 and algo.components.reward.get("baseline") != "batch_norm"
                 and spec.get("reward_model", "true") == "true")
    seed_groups = [list(range(ex.seeds))] if vectorise else [[s] for s in range(ex.seeds)]
    for seeds in seed_groups:
        tb = build_testbed(spec, seed=seeds[0], rm_cache=rm_cache)
        target = _target_or_none(algo, tb.bandit)
        # the base target lives on the experiment's own testbed: a variant that only removes pairs (partial
        # coverage) is still measured against the distribution the full-coverage base converges to
        home = tb if not v.testbed else build_testbed(ex.testbed, seed=seeds[0], rm_cache=rm_cache)
        base_target = _target_or_none(base_algo, home.bandit if home.bandit.shape == tb.bandit.shape else tb.bandit)
        S = len(seeds)
        # S seeds stacked as S copies of the prompts (Bandit.subset with repeated indices)
        train_b = tb.train_bandit.subset(list(range(tb.bandit.shape[0])) * S)
        if tb.init_policy is not None:
            policy = copy.deepcopy(tb.init_policy)
        else:
            init = torch.cat([_init_logits(ex, tb, s) for s in seeds])
            policy = make_policy(tb.policy_kind, init, hidden=tb.hidden, seed=seeds[0],
                                 output_init_scale=float(spec.get("mlp_init_scale", 0.0)))
        fn = _metric_fn(tb.bandit, tb.covered, target, base_target, S, _limit_or_none(algo, tb.bandit))
        records: List[Dict[str, Any]] = []

        def metrics(probs, fn=fn, records=records):
            records.append({k: val.clone() for k, val in fn(probs).items()})
            return {}
        with torch.no_grad():
            records.append({k: val.clone() for k, val in fn(torch.softmax(policy(), -1)).items()})  # step 0
        _, _, hist = train(algo, train_b, exact=ex.mode == "exact", steps=ex.steps, seed=seeds[0], lr=ex.lr,
                           batch_size=v.batch_size or ex.batch_size, policy=policy, optimizer=ex.optimizer, lr_decay=False,
                           average=False, early_stop=False, metrics=metrics, log_every=ex.log_every,
                           loss_scale=float(S))
        steps = [0] + [h["step"] for h in hist]
        records[0]["loss"] = torch.full((S,), float("nan"), dtype=torch.float64)
        for rec, h in zip(records[1:], hist):  # the loss is of the stacked batch: the same for every copy only
            rec["loss"] = torch.full((S,), h["loss"], dtype=torch.float64)  # when S = 1 (else the mean)
        for rec, step in zip(records, steps):
            for si, s in enumerate(seeds):
                row = {"variant": v.label, "seed": s, "step": step}
                row.update({m: float(rec[m][si]) for m in ex.metrics})
                rows.append(row)
        progress.update(S)
    return rows


def _steps_to(rows: List[Dict[str, Any]], metric: str, eps: float) -> float:
    for r in rows:
        if r[metric] == r[metric] and r[metric] < eps:
            return float(r["step"])
    return float("nan")


def _summarise(ex: Experiment, rows: List[Dict[str, Any]], variants: List[Variant]) -> List[Dict[str, Any]]:
    out = []
    for v in variants:
        vr = [r for r in rows if r["variant"] == v.label]
        algo = load(v.algorithm, v.overrides)
        rec: Dict[str, Any] = {"variant": v.label, "composition": algo.summary()}
        for m in ex.metrics:
            finals, firsts, hits = [], [], []
            for s in range(ex.seeds):
                sr = [r for r in vr if r["seed"] == s]
                if not sr:
                    continue
                firsts.append(sr[0][m])
                finals.append(sr[-1][m])
                if m.startswith("tv_"):
                    hits.append(_steps_to(sr, m, ex.epsilon))
            t = torch.tensor(finals, dtype=torch.float64)
            rec[f"{m}_initial"] = float(torch.tensor(firsts, dtype=torch.float64).mean())
            rec[f"{m}_final"] = float(t.mean())
            rec[f"{m}_final_std"] = float(t.std()) if len(finals) > 1 else 0.0
            if hits:
                ht = torch.tensor(hits, dtype=torch.float64)
                rec[f"steps_to_eps_{m}"] = float("nan") if torch.isnan(ht).any() else float(ht.quantile(0.5))
        out.append(rec)
    return out


def _target_lengths(ex: Experiment, summary: List[Dict[str, Any]], base_algo: Algorithm) -> None:
    """Sequence testbeds measuring ``mean_length``: add the mean response length of each variant's own target and
    of the base target (on the experiment's testbed) to its summary (NaN where there is no target)."""
    if "mean_length" not in ex.metrics:
        return
    home = build_testbed(ex.testbed).bandit
    base = _target_or_none(base_algo, home)
    nan = float("nan")
    for v, rec in zip(ex.variants, summary):
        sb = build_testbed({**ex.testbed, **v.testbed}).bandit if v.testbed else home
        own = _target_or_none(_variant_algorithm(ex, v), sb)
        rec["mean_length_target"] = nan if own is None else float((own * sb.lengths).sum(-1).mean())
        rec["mean_length_base_target"] = nan if base is None else float((base * home.lengths).sum(-1).mean())


#: confidence level of the claim intervals
CLAIM_CONFIDENCE = 0.95
#: the three verdicts of a claim (``claim["verdict"]``)
VERDICTS = ("holds", "does not hold", "not resolved")


def judge_claim(diffs: Sequence[float], op: str, confidence: float = CLAIM_CONFIDENCE) -> Dict[str, Any]:
    """Judge ``d op 0`` from per-seed differences ``d_s`` (measured − reference, one per seed).

    The mean of d with a two-sided ``confidence`` Student-t interval, mean ± t(½ + confidence/2, N − 1)·s/√N
    (s the sample standard deviation of d). Verdict: ``"holds"`` when the whole interval is on the claim's side of 0
    (``>``/``>=``: lower bound > 0; ``<``/``<=``: upper bound < 0), ``"does not hold"`` when it is wholly on the
    other side, ``"not resolved"`` otherwise: the interval contains or touches 0, one seed (N = 1: no interval), a
    difference of exactly 0 in every seed (a tie: the interval is the point 0, on neither side — for ``>=``/``<=``
    too), or a NaN difference. An interval cannot tell ``>=`` from ``>``: both are judged as above. Equal
    differences in every seed (seeds that are replicas, e.g. exact gradients from the same start) give a zero-width
    interval: the verdict is then the sign of that difference.

    Returns:
        ``{"verdict", "diff_mean", "ci_low", "ci_high", "seeds", "note"}``: ``ci_low``/``ci_high`` are NaN for
        N = 1 or a NaN difference; ``note`` says why a claim is not resolved ("" otherwise).
    Raises:
        InputError: an unknown ``op``, no differences, or ``confidence`` outside (0, 1).
    """
    import statistics
    if op not in _OPS:
        raise InputError(f"op must be one of {list(_OPS)}, got {op!r}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence!r}")
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0:
        raise InputError("judge_claim needs at least one per-seed difference")
    nan = float("nan")
    out = {"verdict": "not resolved", "diff_mean": nan, "ci_low": nan, "ci_high": nan, "seeds": n, "note": ""}
    if any(x != x for x in d):
        out["note"] = "NaN difference (the metric is undefined here)"
        return out
    mean = statistics.fmean(d) if n > 1 else d[0]
    if n > 1 and all(x == d[0] for x in d):
        mean = d[0]  # replicas: exactly their common value (fmean may round in the last bit)
    out["diff_mean"] = mean
    if n == 1:
        out["note"] = "one seed: no interval"
        return out
    from scipy.stats import t as student_t
    sd = statistics.stdev(d)  # exact for equal values (0.0)
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    out["ci_low"], out["ci_high"] = lo, hi
    if lo == hi == 0.0:
        out["note"] = "tie: the difference is exactly 0 in every seed"
        return out
    side = 1 if op in (">", ">=") else -1
    if (lo > 0 and side > 0) or (hi < 0 and side < 0):
        out["verdict"] = "holds"
    elif (hi < 0 and side > 0) or (lo > 0 and side < 0):
        out["verdict"] = "does not hold"
    else:
        out["note"] = "the interval contains 0"
    return out


def _per_seed(rows: Sequence[Dict[str, Any]], variant: str, metric: str) -> Dict[int, tuple]:
    """``{seed: (initial, final)}`` of one variant's metric: its first and last logged row of each seed (in row order,
    as :func:`_summarise` takes them)."""
    out: Dict[int, list] = {}
    for r in rows:
        if r["variant"] != variant:
            continue
        s = int(r["seed"])
        if s not in out:
            out[s] = [r[metric], r[metric]]
        else:
            out[s][1] = r[metric]
    return {s: (float(a), float(b)) for s, (a, b) in out.items()}


def _check_claims(ex: Experiment, summary: List[Dict[str, Any]], rows: Sequence[Dict[str, Any]]
                  ) -> List[Dict[str, Any]]:
    """Each claim judged over seeds (:func:`judge_claim`) on per-seed differences d_s: ``than = "<variant>"``:
    final_s(variant) − final_s(than), paired by seed (variants run the same seeds; only seeds both ran count);
    ``than = "initial"``: final_s − initial_s of the variant; ``value = v``: final_s − v. ``measured``/``reference``
    are the means over seeds (as in ``summary``); ``holds`` is True only for the verdict ``"holds"``."""
    by = {s["variant"]: s for s in summary}
    out = []
    for c in ex.claims:
        got = by[c.variant][f"{c.metric}_final"]
        mine = _per_seed(rows, c.variant, c.metric)
        if c.than == "initial":
            ref, what = by[c.variant][f"{c.metric}_initial"], "its initial value"
            seeds = sorted(mine)
            diffs = [mine[s][1] - mine[s][0] for s in seeds]
            label = f"{c.variant} {c.metric} final − initial"
        elif c.than is not None:
            ref, what = by[c.than][f"{c.metric}_final"], f"{c.than}"
            other = _per_seed(rows, c.than, c.metric)
            seeds = sorted(set(mine) & set(other))
            diffs = [mine[s][1] - other[s][1] for s in seeds]
            label = f"{c.variant} − {c.than} {c.metric}"
        else:
            ref, what = c.value, f"{c.value:g}"
            seeds = sorted(mine)
            diffs = [mine[s][1] - c.value for s in seeds]
            label = f"{c.variant} {c.metric} − {c.value:g}"
        if not diffs:
            raise InputError(f"claim {c.text!r}: no seed has rows of both {c.variant!r} and {c.than!r}")
        j = judge_claim(diffs, c.op)
        out.append({"text": c.text, "variant": c.variant, "metric": c.metric, "op": c.op, "measured": got,
                    "reference": ref, "against": what, "holds": j["verdict"] == "holds", **j,
                    "difference": label})
    return out


def claim_line(c: Dict[str, Any]) -> str:
    """One claim as the CLI prints it: verdict, text, the mean difference and its interval, e.g.
    ``claim not resolved at 10 seeds: … (PPO − DPO max_uncovered = +0.005, 95% CI [-0.012, +0.022])``."""
    verdict = {"holds": "holds", "does not hold": "DOES NOT hold"}.get(
        c["verdict"], f"not resolved at {c['seeds']} seed{'s' if c['seeds'] != 1 else ''}")
    if c["diff_mean"] != c["diff_mean"]:
        interval = "NaN"
    elif c["ci_low"] != c["ci_low"]:
        interval = f"{c['diff_mean']:+.3g}, no interval at 1 seed"
    else:
        interval = (f"{c['diff_mean']:+.3g}, {CLAIM_CONFIDENCE:.0%} CI [{c['ci_low']:+.3g}, "
                    f"{c['ci_high']:+.3g}]")
    tie = " (tie in every seed)" if c["note"].startswith("tie") else ""
    return f"claim {verdict}: {c['text']} ({c['difference']} = {interval}){tie}"


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def _sfmt(x: float) -> str:
    """A difference to 3 significant digits with an explicit sign (``+0.0357``, ``-0.01``, ``0``)."""
    return "—" if x != x else f"{x:+.3g}" if x != 0 else "0"


def _claim_cells(c: Dict[str, Any]) -> List[str]:
    """The report's claim row: claim, measured (the two means), mean difference with its interval, verdict."""
    measured = f"{_fmt(c['measured'])} vs {_fmt(c['reference'])}"
    if c["diff_mean"] != c["diff_mean"]:
        diff = "—"
    elif c["ci_low"] != c["ci_low"]:
        diff = f"{_sfmt(c['diff_mean'])} (1 seed: no interval)"
    else:
        diff = f"{_sfmt(c['diff_mean'])} [{_sfmt(c['ci_low'])}, {_sfmt(c['ci_high'])}]"
    n = c["seeds"]
    verdict = {"holds": "holds", "does not hold": "**does not hold**"}.get(
        c["verdict"], f"not resolved at {n} seed{'s' if n != 1 else ''}")
    if c["note"].startswith("tie"):
        verdict += " (tie in every seed)"
    return [f"{c['text']} ({c['variant']}: {c['metric']} {c['op']} {c['against']})", measured, diff, verdict]


def _write(ex: Experiment, rows, summary, claims, out_dir: Path, seconds: Optional[float], *,
           figures: bool = True) -> List[Path]:
    """Write ``metrics.csv``, ``summary.csv``, the figures and ``report.md``. ``figures = False`` (rebuilding a
    report from a stored ``metrics.csv``) writes neither ``metrics.csv`` nor the PNGs: the report links the PNGs
    already in ``out_dir``. ``seconds = None``: the run time is unknown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    if figures:
        mpath = out_dir / "metrics.csv"
        with open(mpath, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["variant", "seed", "step"] + ex.metrics)
            w.writeheader()
            w.writerows(rows)
        files.append(mpath)
    spath = out_dir / "summary.csv"
    keys = list(summary[0].keys())
    for s in summary[1:]:
        keys += [k for k in s if k not in keys]
    with open(spath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(summary)
    files.append(spath)
    labels = {"tv_target": "TV to own target", "tv_limit": "TV to own target at n → ∞",
              "mean_length": "E_π|y| (tokens)",
              "tv_base": "TV to base target", "kl_ref": "KL(π‖π_ref) (nats)",
              "reward": "E_π[r]", "uncovered_mass": "mass on uncovered responses",
              "max_uncovered": "max prob. of one uncovered response", "max_prob": "max_y π(y)",
              "loss": "training loss"}
    figs = []
    many = len(ex.variants) > 6
    colours = plt.cm.tab20.colors if len(ex.variants) > 10 else plt.cm.tab10.colors
    for m in (ex.metrics if figures else []):
        fig, ax = plt.subplots(figsize=(9.0 if many else 6.4, 4.0))
        drew = False
        for i, v in enumerate(ex.variants):
            vr = [r for r in rows if r["variant"] == v.label]
            steps = sorted({r["step"] for r in vr})
            vals = torch.tensor([[r[m] for r in vr if r["step"] == st] for st in steps], dtype=torch.float64)
            if torch.isnan(vals).all():
                continue
            mean = vals.nanmean(1) if hasattr(vals, "nanmean") else vals.mean(1)
            c = colours[i % len(colours)]
            ax.plot(steps, mean.numpy(), label=v.label, color=c, ls=("-", "--", ":")[(i // len(colours)) % 3])
            ax.fill_between(steps, vals.min(1).values.numpy(), vals.max(1).values.numpy(), alpha=0.15, color=c)
            drew = True
        if not drew:
            plt.close(fig)
            continue
        if m.startswith("tv_") or m == "kl_ref":
            finite = [r[m] for r in rows if r[m] == r[m] and r[m] > 0]
            if finite and max(finite) / max(min(finite), 1e-300) > 100:
                ax.set_yscale("log")
        if m.startswith("tv_"):
            ax.axhline(ex.epsilon, color="grey", lw=0.8, ls="--", label=f"ε = {ex.epsilon:g}")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(labels[m])
        ax.set_title(f"{ex.name}: {labels[m]}", fontsize=10)
        if many:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fpath = out_dir / f"{m}.png"
        fig.savefig(fpath, dpi=110)
        plt.close(fig)
        files.append(fpath)
        figs.append((m, fpath.name))
    if not figures:
        figs = [(m, f"{m}.png") for m in ex.metrics if (out_dir / f"{m}.png").is_file()]
    lines = [f"# {ex.name}", ""]
    if ex.description:
        lines += [ex.description, ""]
    tb = ", ".join(f"{k} = {v}" for k, v in ex.testbed.items() if k not in ("pi_ref", "reward", "preference",
                                                                           "pairs"))
    lines += [f"- testbed: {tb}"]
    if ex.testbed.get("kind") == "sequence":
        sb = build_testbed(ex.testbed).bandit
        ref_len = float((sb.pi_ref_seq * sb.lengths).sum(-1).mean())
        lines.append(f"- sequence testbed: {sb.P} prompts, vocabulary {sb.V} (EOS = {sb.eos}), responses of at most "
                     f"{sb.L} tokens: N = {sb.N} responses and {sb.states_per_prompt} states per prompt; "
                     f"E_π_ref|y| = {ref_len:.4g} tokens; metrics over whole responses")
    for k in ("pi_ref", "reward", "pairs"):
        if k in ex.testbed:
            lines.append(f"- {k}: `{ex.testbed[k]}`")
    lines += [f"- base: `{ex.base}`; mode {ex.mode}; {ex.optimizer} lr {ex.lr:g}; {ex.steps} steps; "
              f"{ex.seeds} seeds; init {ex.init}" + (f" (scale {ex.init_scale:g})" if ex.init == "random" else ""),
              f"- ran in {seconds:.1f} s (1 torch thread)" if seconds is not None else
              "- run time not recorded (report rebuilt from metrics.csv)", "",
              "## Variants", "", "| variant | composition |", "|---|---|"]
    lines += [f"| {s['variant']} | {s['composition']} |" for s in summary]
    lines += ["", "## Final values (mean over seeds; ± std)", ""]
    cols = list(ex.metrics)
    tvs = [m for m in cols if m.startswith("tv_")]
    head = ["variant"] + cols + [f"steps to ε ({m})" for m in tvs]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        vals = [f"{_fmt(s[f'{m}_final'])} ± {_fmt(s[f'{m}_final_std'])}" for m in cols]
        hits = [_fmt(s.get(f"steps_to_eps_{m}", float("nan"))) for m in tvs]
        lines.append("| " + " | ".join([s["variant"]] + vals + hits) + " |")
    if tvs:
        lines += ["", f"Steps to ε: first logged step with the TV below ε = {ex.epsilon:g} (median over seeds; — = "
                  "not reached, or no such target)."]
    if "mean_length_target" in summary[0]:
        lines += ["", "## Response length (tokens, EOS counted)", "",
                  "| variant | E_π\\|y\\| initial | E_π\\|y\\| final | own target | base target | "
                  "final − base target |",
                  "|---|---|---|---|---|---|"]
        for s in summary:
            drift = s["mean_length_final"] - s["mean_length_base_target"]
            lines.append(f"| {s['variant']} | {_fmt(s['mean_length_initial'])} | {_fmt(s['mean_length_final'])} ± "
                         f"{_fmt(s['mean_length_final_std'])} | {_fmt(s['mean_length_target'])} | "
                         f"{_fmt(s['mean_length_base_target'])} | {'+' if drift > 0 else ''}{_fmt(drift)} |")
        lines += ["", "Own target / base target: E|y| under the variant's derived sequence-level target and under the "
                  "base composition's (— = no derived target)."]
    if claims:
        pct = f"{CLAIM_CONFIDENCE:.0%}"
        lines += ["", "## Claims checked", "",
                  f"| claim | measured (mean vs reference) | difference, {pct} CI | verdict |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(_claim_cells(c)) + " |" for c in claims]
        lines += ["", f"Difference: measured − reference per seed (the same seed of both variants; final − initial "
                  f"of the same seed for \"its initial value\"), mean over seeds with a {pct} Student-t interval "
                  "(N − 1 degrees of freedom). Holds: the whole interval is on the claim's side of 0; does not hold: "
                  "wholly on the other side; not resolved: the interval contains 0, one seed (no interval), or a tie (a "
                  "difference of exactly 0 in every seed)."]
    if ex.notes:
        lines += ["", "## Notes", "", ex.notes.strip()]
    if figs:
        lines += ["", "## Figures", ""]
        lines += [f"![{m}]({name})" for m, name in figs]
    rpath = out_dir / "report.md"
    rpath.write_text("\n".join(lines) + "\n")
    files.append(rpath)
    return files


def run_experiment(ex: Experiment, out_dir=None, *, progress: bool = True, steps: Optional[int] = None,
                   seeds: Optional[int] = None) -> ExperimentResult:
    """Run every variant × seed of an experiment and write CSV, PNG figures and ``report.md``.

    Args:
        ex: from :func:`load_experiment`.
        out_dir: output folder (default ``results/<name>``).
        progress: show a tqdm progress bar over runs (variant × seed).
        steps, seeds: override the file's values (quick runs).
    Returns:
        :class:`ExperimentResult`.
    Raises:
        InputError: a testbed the experiment cannot build; errors from training are raised unchanged after the
            runs finished so far are kept in memory (nothing is written for a failed experiment).
    """
    from tqdm.auto import tqdm
    ex = copy.copy(ex)  # quick-run overrides do not change the caller's experiment
    if steps is not None:
        ex.steps = int(steps)
    if seeds is not None:
        ex.seeds = int(seeds)
    out = Path(out_dir) if out_dir is not None else Path("results") / ex.name
    base_algo = load(ex.base, ex.base_overrides)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bandit tensors are tiny: one thread avoids OpenMP overhead on every op
    rows: List[Dict[str, Any]] = []
    rm_cache: Dict[Any, Tensor] = {}  # reward models fitted in this run, shared by variants that fit the same one
    try:
        with tqdm(total=len(ex.variants) * ex.seeds, desc=ex.name, unit="run", disable=not progress) as bar:
            for v in ex.variants:
                bar.set_postfix_str(v.label)
                rows += _run_variant(ex, v, base_algo, bar, rm_cache)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    summary = _summarise(ex, rows, ex.variants)
    _target_lengths(ex, summary, base_algo)
    claims = _check_claims(ex, summary, rows)
    files = _write(ex, rows, summary, claims, out, seconds)
    return ExperimentResult(ex, rows, summary, claims, files, seconds)


def _read_metrics_csv(ex: Experiment, path: Path) -> List[Dict[str, Any]]:
    """The rows of a stored ``metrics.csv`` (floats parsed back exactly: ``csv`` wrote their ``repr``)."""
    if not path.is_file():
        raise InputError(f"{path}: no metrics.csv to rebuild the report from (run `udrra ablate` first)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        want = ["variant", "seed", "step"] + list(ex.metrics)
        if reader.fieldnames != want:
            raise InputError(f"{path}: columns {reader.fieldnames} are not the experiment's {want} (the file was "
                             "written by a different version of the experiment; re-run it)")
        rows = [{"variant": r["variant"], "seed": int(r["seed"]), "step": int(r["step"]),
                 **{m: float(r[m]) for m in ex.metrics}} for r in reader]
    labels = [v.label for v in ex.variants]
    found = list(dict.fromkeys(r["variant"] for r in rows))
    if found != labels:
        raise InputError(f"{path}: variants {found} are not the experiment's {labels}; re-run it")
    return rows


def report_from_results(experiment_path, out_dir=None, *, steps: Optional[int] = None) -> ExperimentResult:
    """Rebuild ``summary.csv``, the claims and ``report.md`` from a stored ``metrics.csv`` without training.

    The numbers are exactly those of the run that wrote ``metrics.csv`` (its floats round-trip); the seed count is
    the file's (e.g. a ``--seeds 10`` run); the figures and ``metrics.csv`` are left as they are (the report links
    the PNGs found in ``out_dir``), and the run time is kept from the old ``report.md`` when it states one.

    Args:
        experiment_path: the experiment TOML (variants, metrics, claims, notes).
        out_dir: the run's output folder (default ``results/<name>``).
        steps: the steps per run the stored run used, when not the file's (``--steps``).
    Returns:
        :class:`ExperimentResult` (``files``: ``summary.csv`` and ``report.md``; ``seconds``: the old run time or
        NaN).
    Raises:
        ConfigError: from :func:`load_experiment`.
        InputError: no ``metrics.csv``, or one whose columns, variants, seeds or last steps do not match the
            experiment.
    """
    import re
    ex = copy.copy(load_experiment(experiment_path))
    if steps is not None:
        ex.steps = int(steps)
    out = Path(out_dir) if out_dir is not None else Path("results") / ex.name
    mpath = out / "metrics.csv"
    rows = _read_metrics_csv(ex, mpath)
    seeds = sorted({r["seed"] for r in rows})
    if seeds != list(range(len(seeds))):
        raise InputError(f"{mpath}: seeds {seeds} are not 0 … N − 1")
    ex.seeds = len(seeds)
    for v in ex.variants:
        # the last logged step is the number of steps taken: `steps`, or rounds × every with reference resets
        ref = _variant_algorithm(ex, v).components.reference
        want = (int(ref["every"]) * int(ref["rounds"]) if ref.get("update") == "reset_every" and ref.get("rounds")
                else ex.steps)
        for s in seeds:
            last = [r["step"] for r in rows if r["variant"] == v.label and r["seed"] == s][-1]
            if last != want:
                raise InputError(f"{mpath}: variant {v.label!r} seed {s} ends at step {last}, not {want}: the run "
                                 "used other steps (pass steps= / --steps)")
    seconds = None
    old = out / "report.md"
    if old.is_file():
        m = re.search(r"^- ran in ([0-9.]+) s ", old.read_text(), re.M)
        if m:
            seconds = float(m.group(1))
    summary = _summarise(ex, rows, ex.variants)
    _target_lengths(ex, summary, load(ex.base, ex.base_overrides))
    claims = _check_claims(ex, summary, rows)
    files = _write(ex, rows, summary, claims, out, seconds, figures=False)
    return ExperimentResult(ex, rows, summary, claims, files, float("nan") if seconds is None else seconds)
