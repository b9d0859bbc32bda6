import os

import pytest
import torch

from hypothesis import settings

# The Triton kernels run on CPU tensors only under the interpreter, and triton reads TRITON_INTERPRET when a kernel
# module is first imported: set it before any test module imports triton (test modules that import udrra.lm, e.g.
# tests/test_distributed.py, are collected before tests/test_kernels_triton.py sets it itself).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
