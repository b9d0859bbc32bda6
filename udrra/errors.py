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


class TrainingError(UdrraError, RuntimeError):
    """A run stopped on a numerical fault (a non-finite loss or gradient). The message names the step and the
    component that produced it; the last checkpoint written before that step is intact."""


class RunInterrupted(UdrraError):
    """A run was stopped by SIGTERM / SIGINT (Ctrl-C) after finishing its current step and saving a checkpoint.

    Attributes: ``step`` (the last finished optimizer step), ``checkpoint`` (its directory, to pass to
    ``--resume``), ``signum`` (the signal received)."""

    def __init__(self, message: str, *, step: int, checkpoint: str, signum: int):
        super().__init__(message)
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
