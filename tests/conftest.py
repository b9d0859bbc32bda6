import os

import pytest
import torch

from hypothesis import settings

# Deterministic example generation in CI: a failure reproduces from the same commit.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread: bandit tensors are tiny, and several OpenMP threads on a shared 2-core
    machine make every optimiser step ~15–20× slower (synchronisation, not work)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
