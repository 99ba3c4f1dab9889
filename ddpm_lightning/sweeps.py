"""The jobs of a basic-sweeper multirun, expanded through Hydra's public override parser.

Hydra's basic sweeper launches the cartesian product of ``hydra.sweeper.params`` followed by the command line's
task overrides: one list per key (a sweep gives its values, a plain override one value), a key given twice keeping
its first position and its last values, the last key varying fastest. ``cli/validate.py`` composes and checks every
job of a sweep before the first starts, ``ddpm-report`` lists the jobs of a partial sweep that have no folder yet;
both take the jobs from ``expand_sweep``. Standard library and Hydra only.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

# set by the scripts ddpm-report writes (report_seeds.sh, add_seeds.sh): their jobs continue the named sweep, whose
# jobs passed the sweep-wide checks; a check over the jobs of one sweep (a classifier no job guides with: the unguided
# row of a guidance sweep run alone for its held-out seeds) applies to the whole sweep, not to a continuation
CONTINUES_SWEEP_ENV = "DDPM_CONTINUES_SWEEP"


def is_basic_sweeper(target: Any) -> bool:
    """Whether ``hydra.sweeper._target_`` names Hydra's basic sweeper (the one ``expand_sweep`` follows)."""
    return str(target or "").endswith("BasicSweeper")


def expand_sweep(params: Mapping[str, Any] | None, task: Sequence[str]) -> list[list[str]]:
    """The override list of every job, in launch order, for ``hydra.sweeper.params`` and the task overrides.

    ``expand_sweep({"seed": "0,1"}, ["model=a,b", "trainer.max_steps=300"])`` gives
    ``[["seed=0", "model=a", "trainer.max_steps=300"], ["seed=0", "model=b", ...], ["seed=1", "model=a", ...], ...]``.
    Raises ``hydra.errors.HydraException`` for an override Hydra cannot parse and for a sweep the basic sweeper
    cannot enumerate (``interval(...)``; ``glob(...)``, which needs the config loader)."""
    arguments = [f"{key}={value}" for key, value in (params or {}).items()] + [str(item) for item in task]
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if not override.is_sweep_override():
            values = [override.get_value_element_as_str()]
        elif override.is_discrete_sweep():
            values = list(override.sweep_string_iterator())
        else:
            raise HydraException(f"{override.input_line or key}: the basic sweeper enumerates choice lists, "
                                 "choice(...), range(...) and glob(...), not interval(...)")
        choices[key] = [f"{key}={value}" for value in values]  # a repeated key keeps its first position
    return [list(job) for job in itertools.product(*choices.values())]
