"""Shared test configuration: a fast Hypothesis profile and offline wandb."""

import os

from hypothesis import settings

os.environ.setdefault("WANDB_MODE", "offline")

settings.register_profile("ci", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
