"""Does a checkpoint's state dict fit a model? One line that says how it does not.

The one comparison behind every weight-loading error (our checkpoints, resumed runs, official ADM weights):
the first tensor whose shape differs, then the missing and the unexpected keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

SHOWN_KEYS = 5  # keys named per list; the rest are counted


def _head(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def state_dict_mismatch(model: Mapping[str, torch.Tensor], checkpoint: Mapping[str, torch.Tensor]) -> str | None:
    """None when ``checkpoint`` has exactly ``model``'s keys and shapes; else one line, e.g.
    ``first differing tensor out.2.weight: checkpoint [10, 64] vs model [3, 64]; 2 missing keys: a, b``."""
    problems = []
    for key, ours in model.items():
        theirs = checkpoint.get(key)
        if theirs is not None and tuple(theirs.shape) != tuple(ours.shape):
            shapes = f"checkpoint {list(theirs.shape)} vs model {list(ours.shape)}"
            problems.append(f"first differing tensor {key}: {shapes}")
            break
    missing = [key for key in model if key not in checkpoint]
    unexpected = [key for key in checkpoint if key not in model]
    if missing:
        problems.append(f"{len(missing)} missing keys: {_head(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_head(unexpected)}")
    return "; ".join(problems) or None
