"""An algorithm: a validated composition of four components, its derived loss and its target."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import tomli_w
from torch import Tensor

from .batch import PairBatch, SampleBatch
from .components import TABLES, Components
from .components import reward as reward_mod
from .components.target import DerivedTarget, derive
from .config import apply_overrides, build_components, read_algorithm_file
from .errors import InputError, TargetError
from .loss import LossOutput, estimate, pair_loss, sample_loss

__all__ = ["Algorithm", "load"]


class Algorithm:
    """A composition of target, source, reward and reference components.

    Build one with :func:`load`. Attributes: ``name``, ``description``, ``paper``, ``components``
    (:class:`~udrra.components.Components`), ``path`` (the file it came from, or ``None`` for the catalog).
    """

    def __init__(self, components: Components, meta: Mapping[str, Any], name: str, path: Optional[Path] = None):
        self.components = components
        self.name = str(meta.get("name") or name)
        self.description = str(meta.get("description", ""))
        self.paper = str(meta.get("paper", ""))
        self.path = path
        self._target: Optional[DerivedTarget] = None

    # ------------------------------------------------------------------------------------- properties
    @property
    def beta(self) -> float:
        """The target temperature β (``[target] beta``), read by every component."""
        return float(self.components.target["beta"])

    @property
    def pair_based(self) -> bool:
        """True when the loss consumes :class:`~udrra.batch.PairBatch` (preference / reward-difference)."""
        return self.components.reward.kind in reward_mod.PAIR_KINDS

    @property
    def uses_reference(self) -> bool:
        """False for reference kinds ``none`` and ``chosen_nll`` (no π_ref model is needed)."""
        from .components.reference import REFERENCE_FREE
        return self.components.reference.kind not in REFERENCE_FREE

    # ---------------------------------------------------------------------------------------- loss
    def loss(self, batch: Union[PairBatch, SampleBatch]) -> LossOutput:
        """The derived loss on one batch (same code for the bandit and an LM).

        Args:
            batch: a :class:`PairBatch` for pair-based compositions, else a :class:`SampleBatch`.
        Returns:
            :class:`~udrra.loss.LossOutput` with a scalar ``loss``.
        Raises:
            InputError: wrong batch type, mismatched shapes, NaN/inf in log-probs, rewards or weights.
        """
        expected = PairBatch if self.pair_based else SampleBatch
        if not isinstance(batch, expected):
            raise InputError(f"{self.name} consumes {expected.__name__} (reward kind "
                             f"{self.components.reward.kind!r}), got {type(batch).__name__}")
        batch.validate()
        fn = pair_loss if self.pair_based else sample_loss
        return fn(self.components, batch)

    def estimate(self, batch: SampleBatch) -> SampleBatch:
        """The reward estimate of a whole optimizer batch: advantages (and GAE returns), before any split.

        :meth:`loss` calls it when ``batch.advantages`` is ``None``; call it yourself before
        :meth:`SampleBatch.split` when accumulating micro-batches (group baselines need whole groups).

        Args:
            batch: a :class:`SampleBatch` (``explicit`` reward compositions).
        Returns:
            A copy with ``advantages`` ``(B, T)`` (and ``returns`` for ``gae``) set; ``batch`` itself unchanged.
        Raises:
            InputError: not an ``explicit``-reward composition, or a batch that fails validation.
        """
        if self.pair_based or self.components.reward.kind != "explicit":
            raise InputError(f"{self.name}: only 'explicit'-reward compositions estimate advantages (reward kind "
                             f"{self.components.reward.kind!r})")
        if not isinstance(batch, SampleBatch):
            raise InputError(f"{self.name} consumes SampleBatch, got {type(batch).__name__}")
        return estimate(self.components, batch.validate())

    # -------------------------------------------------------------------------------------- target
    def derived_target(self) -> DerivedTarget:
        """What this composition converges to (kind, formula, and a note where it differs from the declared)."""
        if self._target is None:
            self._target = derive(self.components)
        return self._target

    def target_distribution(self, bandit) -> Tensor:
        """The analytic target on ``bandit``.

        Args:
            bandit: a :class:`udrra.Bandit` with P prompts and K responses.
        Returns:
            ``(P, K)`` float64 tensor, rows summing to 1.
        Raises:
            TargetError: the composition has no unique target there (hinge margins or the hinge LP's optimal
                face, partial coverage,
                deterministic labels for a logistic link, a reward the bandit lacks).
        """
        t = self.derived_target()
        if t.solve is None:
            raise TargetError(f"{self.name}: target kind {t.kind!r} has no unique distribution ({t.formula}); "
                              "udrra.verify checks the margins instead")
        return t.solve(bandit)

    # ---------------------------------------------------------------------------------- rendering
    def to_dict(self) -> Dict[str, Any]:
        """The resolved composition (every parameter explicit) as a TOML-ready dict."""
        out: Dict[str, Any] = {"algorithm": {k: v for k, v in (("name", self.name), ("description", self.description),
                                                                ("paper", self.paper)) if v}}
        for table in TABLES:
            comp = getattr(self.components, table)
            out[table] = {"kind": comp.kind, **{k: v for k, v in comp.params.items() if v is not None}}
        return out

    def to_toml(self) -> str:
        """The resolved composition as TOML (loads back to an equal algorithm)."""
        return tomli_w.dumps(self.to_dict())

    def describe(self) -> str:
        """Multi-line description used by ``udrra show``: composition, derived loss, target, paper."""
        from .render import describe
        return describe(self)

    def summary(self) -> str:
        """One line: the four components and the derived target kind."""
        c = self.components
        agg = c.source.get("aggregation")
        source = c.source.kind + (f"({agg})" if agg else "")
        return (f"target={c.target.kind} source={source} reward={c.reward.describe()} "
                f"reference={c.reference.kind} -> converges to {self.derived_target().kind}")

    def __repr__(self) -> str:
        return f"Algorithm({self.name!r}: {self.summary()})"


def load(name_or_path: Union[str, Path], overrides: Optional[Mapping[str, Any]] = None) -> Algorithm:
    """Load and validate an algorithm.

    Args:
        name_or_path: a catalog name (``"dpo"``, see ``udrra list``) or a path to a ``.toml`` file.
        overrides: dotted keys to set, e.g. ``{"target.beta": 0.5, "reward.epsilon": 0.1}``; string values
            are parsed as TOML literals (as the CLI's ``--set`` does).
    Returns:
        :class:`Algorithm`.
    Raises:
        ConfigError: unknown name, missing file, malformed TOML, unknown kind or parameter, missing parameter,
            or an invalid composition (the message names the table and lists what is valid).
    """
    raw, display, path = read_algorithm_file(str(name_or_path))
    raw = apply_overrides(raw, overrides, display)
    components, meta = build_components(raw, display)
    default_name = path.stem if path is not None else str(name_or_path)
    return Algorithm(components, meta, default_name, path)
