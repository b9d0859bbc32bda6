"""The ``udrra`` pytest plugin (entry point ``pytest11``, active wherever udrra is installed).

- ``--udrra-examples N``: examples per ``@given`` target test decorated with :func:`udrra.testing.settings`
  (default :data:`udrra.testing.DEFAULT_EXAMPLES`);
- the ``udrra`` marker, for target-verification tests (``pytest -m udrra`` runs only them).
"""

from __future__ import annotations


def pytest_addoption(parser) -> None:
    parser.getgroup("udrra").addoption(
        "--udrra-examples", type=int, default=None, metavar="N",
        help="hypothesis examples per target test under udrra.testing.settings() (default 5)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "udrra: a test that trains a policy and checks its target (udrra.testing)")
    n = config.getoption("--udrra-examples", default=None)
    if n is not None:
        if n < 1:
            raise ValueError(f"--udrra-examples must be >= 1, got {n}")
        from . import testing

        testing._config["examples"] = int(n)
