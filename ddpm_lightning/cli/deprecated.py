"""Deprecated command-line spellings of ``ddpm-sample`` / ``ddpm-eval``, renamed before Hydra reads the command line.

Each old key keeps working for one release with one ``warning:`` line; the configs know only the new name.
"""

from __future__ import annotations

import sys

RENAMED = {"sampler": "method"}  # old key -> new key; sampler= was the CLIs' name for sample.method


def rename_deprecated_keys(args: list[str]) -> list[str]:
    """``args`` with every ``old=value`` (also in a sweep: ``old=a,b``) spelled ``new=value``; one warning line on
    stderr per old key used."""
    renamed, used = [], []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in RENAMED:
            renamed.append(f"{RENAMED[key]}={value}")
            used.append(key)
        else:
            renamed.append(arg)
    for key in dict.fromkeys(used):
        print(f"warning: {key}= is deprecated; use {RENAMED[key]}=", file=sys.stderr)
    return renamed


def apply_to_command_line() -> None:
    """Rename in ``sys.argv`` itself: Hydra reads it, and processes started later (``devices=N``) re-run it
    without warning again."""
    sys.argv[1:] = rename_deprecated_keys(sys.argv[1:])
