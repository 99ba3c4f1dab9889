"""Shared test configuration: a fast Hypothesis profile, offline wandb and one torch thread per test."""

import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("WANDB_MODE", "offline")

settings.register_profile("ci", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tiny test models run fastest on one thread, and a shared 2-core machine stays responsive (subprocesses
# started by tests inherit OMP_NUM_THREADS).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread in every test, restored afterwards even when a test (or a benchmark it runs) changes
    it: on the shared 2-core machine two OpenMP threads per process make the tiny runs ~20x slower, and runs
    compared with each other must use the same thread count to be bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
