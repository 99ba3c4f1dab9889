"""Shared test configuration: a fast Hypothesis profile and offline wandb."""

import os

import torch
from hypothesis import settings

os.environ.setdefault("WANDB_MODE", "offline")

settings.register_profile("ci", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tiny test models run fastest on one thread, and a shared 2-core machine stays responsive (subprocesses
# started by tests inherit OMP_NUM_THREADS).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
