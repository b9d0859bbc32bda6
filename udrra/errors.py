"""Exceptions raised by udrra. Each message says what was wrong and what is valid."""


class UdrraError(Exception):
    """Base class of every error udrra raises on purpose."""


class ConfigError(UdrraError, ValueError):
    """An algorithm file is malformed, names an unknown kind, misses a parameter, or composes components
    that make no sense together. The message names the offending table and lists the valid choices."""


class InputError(UdrraError, ValueError):
    """Data handed to udrra is unusable (NaN/inf values, wrong shapes, empty responses, bad dataset rows)."""


class TargetError(UdrraError, ValueError):
    """The composition has no well-defined target distribution on this bandit (e.g. partial coverage)."""
