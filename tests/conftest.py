"""Shared test configuration: a fast Hypothesis profile, offline wandb, one torch thread per test and configs
composed once per session."""

import copy
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


@pytest.fixture(scope="session")
def composed(tmp_path_factory):
    """``composed(overrides, config_name="train", hydra=False)``: the config ``run_config.compose_run`` gives
    (``hydra=True``: ``run_config.compose_hydra``, with the ``hydra`` node), composed once per session for each
    distinct call; every call returns a deep copy, so a test may change its copy without reaching another test.

    For reading configs: a run (``train(cfg)``, ``sample(cfg)``) composes its own with ``compose_run``, which
    sets Hydra's run state for it and gives it its own output folder; keys that read that state
    (``${hydra:runtime.output_dir}``) are not to be read from these copies."""
    from run_config import compose_hydra, compose_run

    output_dir = tmp_path_factory.mktemp("composed")
    cache = {}

    def compose(overrides=(), config_name="train", hydra=False):
        key = (config_name, tuple(overrides), hydra)
        if key not in cache:
            cache[key] = (compose_hydra(list(overrides), config_name) if hydra
                          else compose_run(list(overrides), output_dir, config_name=config_name))
        return copy.deepcopy(cache[key])

    return compose
