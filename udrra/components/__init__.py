"""The four component axes of an algorithm, one module each.

- :mod:`udrra.components.target` — the distribution training converges to (and how to compute it).
- :mod:`udrra.components.source` — where responses come from (offline pairs, on-policy samples, ...).
- :mod:`udrra.components.reward` — how the learning signal is estimated (preference links, baselines, regression).
- :mod:`udrra.components.reference` — how π_ref enters (log-ratio, KL in reward, KL in loss, none) and how it
  is updated.

Each module registers its kinds as :class:`KindSpec` entries: the parameters a kind takes (with defaults,
types and valid values) and a one-line description. Validation, ``udrra show`` and the error messages are all
generated from these tables, so adding a kind is adding one entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from ..errors import ConfigError

REQUIRED = object()

TABLES = ("target", "source", "reward", "reference")


@dataclass(frozen=True)
class Param:
    """One parameter of a component kind.

    ``type`` is one of ``float``, ``int``, ``str``, ``bool``; ``choices`` restricts string values;
    ``check`` returns an error string (what is valid) or ``None``.
    """

    name: str
    type: type
    default: Any = REQUIRED
    doc: str = ""
    choices: Optional[Sequence[str]] = None
    check: Optional[Callable[[Any], Optional[str]]] = None


@dataclass(frozen=True)
class KindSpec:
    """A kind of one component table: its parameters and what it means."""

    name: str
    doc: str
    params: Sequence[Param] = ()

    def param(self, name: str) -> Optional[Param]:
        for p in self.params:
            if p.name == name:
                return p
        return None


@dataclass(frozen=True)
class Component:
    """A resolved component: its table, kind and parameters (every parameter present, defaults filled in)."""

    table: str
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    def describe(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if v is not None)
        return f"{self.kind}({inner})" if inner else self.kind


@dataclass(frozen=True)
class Components:
    """The four components of an algorithm."""

    target: Component
    source: Component
    reward: Component
    reference: Component

    def __iter__(self):
        return iter((self.target, self.source, self.reward, self.reference))


def positive(v: Any) -> Optional[str]:
    return None if 0 < v < float("inf") else "must be > 0 and finite"


def positive_int(v: Any) -> Optional[str]:
    return None if v >= 1 else "must be an integer >= 1"


def unit_open(v: Any) -> Optional[str]:
    return None if 0 < v < 1 else "must be in (0, 1)"


def half_open(v: Any) -> Optional[str]:
    return None if 0 <= v < 0.5 else "must be in [0, 0.5)"


def nonneg(v: Any) -> Optional[str]:
    return None if v >= 0 else "must be >= 0"


def resolve_params(table: str, spec: KindSpec, given: Mapping[str, Any], path: str) -> dict:
    """Check ``given`` against ``spec`` and fill in defaults. Raises :class:`ConfigError` naming the table."""
    out: dict = {}
    valid = ", ".join(p.name for p in spec.params) or "(none)"
    for key in given:
        if key == "kind":
            continue
        if spec.param(key) is None:
            raise ConfigError(f"{path}: [{table}] kind {spec.name!r} has no parameter {key!r}; valid parameters: {valid}")
    for p in spec.params:
        if p.name in given:
            v = given[p.name]
            if p.type is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if v is not None and not (isinstance(v, p.type) and not (p.type is not bool and isinstance(v, bool))):
                raise ConfigError(f"{path}: [{table}] {p.name} must be a {p.type.__name__}, got {v!r}")
            if p.choices is not None and v is not None and v not in p.choices:
                raise ConfigError(f"{path}: [{table}] {p.name} = {v!r} is not valid; valid values: "
                                  f"{', '.join(map(str, p.choices))}")
            if p.check is not None and v is not None:
                msg = p.check(v)
                if msg:
                    raise ConfigError(f"{path}: [{table}] {p.name} = {v!r} {msg}")
            out[p.name] = v
        elif p.default is REQUIRED:
            raise ConfigError(f"{path}: [{table}] kind {spec.name!r} needs parameter {p.name!r} ({p.doc})")
        else:
            out[p.name] = p.default
    return out
