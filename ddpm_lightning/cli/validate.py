"""Check a run config before any work (and before Lightning is imported): every key is used or refused.

* :func:`check_group_choices`: ``model=adm_adgn`` or ``experiment=defualt`` on the command line is one line
  naming the allowed options (instead of Hydra's config search path), before Hydra composes anything.
* :func:`check_typed_keys`: a key that is no field of a typed group (``+model.chanels=64``) is refused with
  the closest field (instead of a ``TypeError`` from the constructor).
* :func:`check_numbers`: counts and sizes are integers in range, named by key (``data.batch_size=0``,
  ``trainer.max_steps=abc``, ``data.batch_size=2.5`` are refused, never rounded or clamped).
* :func:`check_memory`: the training activations estimated from batch x image size x network width must fit
  the memory available.
* :class:`ValidateSweep`, a Hydra callback: a multirun composes and checks every job's config (numbers, keys,
  the diffusion options) before the first job starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..config import CONFIG_DIR, schema

TYPED_GROUPS = {"model": schema.ModelConfig, "diffusion": schema.DiffusionConfig, "optim": schema.OptimConfig,
                "ema": schema.EMAConfig, "train": schema.TrainConfig, "sample": schema.SampleConfig}

# key: (minimum, what else is allowed). Integers only unless a float range is given; None: not set is fine.
INT_KEYS: dict[str, tuple[int, tuple[Any, ...]]] = {
    "seed": (0, ()),
    "trainer.max_steps": (1, (-1,)),
    "trainer.log_every_n_steps": (1, (None,)),
    "trainer.accumulate_grad_batches": (1, (None,)),
    "trainer.num_sanity_val_steps": (-1, (None,)),
    "trainer.check_val_every_n_epoch": (1, (None,)),
    "data.batch_size": (1, ()),
    "data.num_workers": (0, (None,)),
    "data.image_size": (4, ()),
    "data.limit": (1, (None,)),
    "optim.warmup_steps": (0, ()),
    "sample.batch_size": (1, ()),
    "train.max_nonfinite_steps": (1, (None,)),
    "callbacks.sample_grid.num_samples": (1, ()),
    "callbacks.sample_grid.per_class": (0, (None,)),
    "callbacks.sample_grid.every_n_steps": (0, (None,)),
    "callbacks.periodic_checkpoint.every_n_train_steps": (1, (None,)),
    "callbacks.periodic_checkpoint.save_top_k": (-1, ()),
    "callbacks.model_checkpoint.save_top_k": (-1, ()),
    "callbacks.generative_metrics.num_samples": (1, (None,)),
    "callbacks.generative_metrics.in_loop_num_samples": (0, (None,)),
    "callbacks.generative_metrics.batch_size": (1, (None,)),
    "callbacks.generative_metrics.reference_n": (1, (None,)),
}
# keys that are an integer count (>= minimum) or a fraction in (0, 1]
COUNT_OR_FRACTION_KEYS = {"trainer.val_check_interval": 1, "trainer.limit_val_batches": 0,
                          "trainer.limit_train_batches": 1}
# floats in [low, high)
FLOAT_RANGES = {"ema.decay": (0.0, 1.0), "train.p_uncond": (0.0, 1.0), "model.dropout": (0.0, 1.0)}


def _suggest(word: str, options: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest option (whole name or its last ``_`` part), or ''."""
    def score(option: str) -> float:
        return max(difflib.SequenceMatcher(None, word, part).ratio() for part in (option, option.split("_")[-1]))

    best = max(options, key=score, default=None)
    return f" (did you mean {best}?)" if best is not None and score(best) >= 0.6 else ""


# ---------------------------------------------------------------------------------------- command line
def group_options(group: str, config_dir: str = CONFIG_DIR) -> list[str] | None:
    """The options of config group ``group`` (yaml files and ConfigStore entries), or None if it is no group."""
    folder = Path(config_dir) / group
    if not folder.is_dir():
        return None
    options = {p.stem for p in folder.glob("*.yaml")}
    from hydra.core.config_store import ConfigStore

    node = ConfigStore.instance().repo
    for part in group.split("/"):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
        options |= {name.removesuffix(".yaml") for name, value in node.items() if not isinstance(value, dict)}
    return sorted(options)


def _values(value: str) -> list[str] | None:
    """The option names of an override value (``a``, ``a,b``); None for sweep functions we do not expand."""
    if any(c in value for c in "()[]{}$"):
        return None
    return [v.strip().strip("'\"") for v in value.split(",")]


def check_group_choices(args: list[str], config_dir: str = CONFIG_DIR) -> str | None:
    """The error line for the first command-line override that names an unknown group option or typed key."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra") or "@" in key:
            continue
        values = _values(value)
        if "." not in key:
            options = group_options(key, config_dir)
            if options is None or values is None:
                continue
            for choice in values:
                if choice not in options and choice not in ("null", ""):
                    return (f"{key}={choice}: no such option in {key}/; allowed: {', '.join(options)}"
                            f"{_suggest(choice, options)}")
        else:
            group, _, field = key.partition(".")
            if group in TYPED_GROUPS and "." not in field:
                fields = [f.name for f in dataclasses.fields(TYPED_GROUPS[group])]
                if field not in fields:
                    return _unknown_key_message(group, field, fields)
    return None


def _unknown_key_message(group: str, field: str, fields: list[str]) -> str:
    return (f"{group}.{field} is not a {group} setting{_suggest(field, fields)}; allowed: "
            f"{', '.join(fields)}")


# --------------------------------------------------------------------------------------- composed config
def _select(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(present, value) of ``key``; an interpolation that does not resolve counts as absent."""
    try:
        missing = object()
        value = OmegaConf.select(cfg, key, default=missing)
    except Exception:  # e.g. ${hydra:...} outside a Hydra run: not ours to check here
        return False, None
    return value is not missing, value


def check_typed_keys(cfg: DictConfig) -> None:
    for group, schema_class in TYPED_GROUPS.items():
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        fields = [f.name for f in dataclasses.fields(schema_class)]
        for key in node:
            if key not in fields:
                raise ValueError(_unknown_key_message(group, str(key), fields))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_numbers(cfg: DictConfig) -> None:
    """ValueError naming the key for a count that is not an integer in range (floats are never rounded)."""
    for key, (minimum, extra) in INT_KEYS.items():
        present, value = _select(cfg, key)
        if not present or value in extra and (value is None or _is_int(value)):
            continue
        if not _is_int(value) or value < minimum:
            allowed = f"an integer >= {minimum}" + "".join(f" or {e if e is not None else 'null'}" for e in extra)
            raise ValueError(f"{key} must be {allowed}, got {value!r}")
    for key, minimum in COUNT_OR_FRACTION_KEYS.items():
        present, value = _select(cfg, key)
        if not present or value is None:
            continue
        ok = (_is_int(value) and value >= minimum) or (isinstance(value, float) and 0.0 < value <= 1.0)
        if not ok:
            raise ValueError(f"{key} must be an integer >= {minimum} (batches) or a fraction in (0, 1], got {value!r}")
    for key, (low, high) in FLOAT_RANGES.items():
        present, value = _select(cfg, key)
        if not present or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
            raise ValueError(f"{key} must be a number in [{low}, {high}), got {value!r}")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def training_memory_estimate(cfg: DictConfig) -> int | None:
    """Bytes of fp32 activations a training step keeps for backward, estimated from the config.

    Per image: every UNet level keeps ~(2 x blocks + 2) feature maps of its width and resolution on the way
    down and as many on the way up, each saved ~4 times (conv input, norm, activation, residual).
    """
    present, size = _select(cfg, "data.image_size")
    present_b, batch = _select(cfg, "data.batch_size")
    model = cfg.get("model")
    if not (present and present_b and _is_int(size) and _is_int(batch)) or not isinstance(model, DictConfig):
        return None
    width, blocks = int(model.get("model_channels", 64)), int(model.get("num_res_blocks", 2))
    mults = list(model.get("channel_mult") or [1])
    per_image = sum(2 * (2 * blocks + 2) * width * m * (size // 2 ** i) ** 2 for i, m in enumerate(mults))
    return 4 * 4 * per_image * batch


def check_memory(cfg: DictConfig, available: int | None = None) -> None:
    """ValueError, before any work, when the estimated training memory exceeds what is available."""
    from ..artifacts import format_bytes

    needed = training_memory_estimate(cfg)
    available = available_memory() if available is None else available
    if needed is None or available is None or needed <= available:
        return
    raise ValueError(f"this run needs about {format_bytes(needed)} of memory for training activations "
                     f"(data.batch_size={cfg.data.batch_size} x data.image_size={cfg.data.image_size} x "
                     f"model.model_channels={cfg.model.model_channels}), {format_bytes(available)} is available: "
                     f"lower data.batch_size or data.image_size")


def check_run(cfg: DictConfig) -> None:
    """Every config check that needs no heavy import (typed keys, numbers, memory)."""
    check_typed_keys(cfg)
    check_numbers(cfg)
    if cfg.get("objective", "diffusion") == "diffusion":
        check_memory(cfg)


def check_run_deep(cfg: DictConfig) -> None:
    """``check_run`` plus the diffusion process's own option checks (imports torch, no Lightning)."""
    check_run(cfg)
    if isinstance(cfg.get("diffusion"), DictConfig) and cfg.get("objective", "diffusion") == "diffusion":
        from ..modules.builders import build_diffusion

        build_diffusion(OmegaConf.to_container(cfg.diffusion, resolve=True))


# ------------------------------------------------------------------------------------------------- sweeps
def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The override lists of every job the basic sweeper will launch; None for other sweepers."""
    sweeper = OmegaConf.select(config, "hydra.sweeper._target_", default="")
    if not str(sweeper).endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


class ValidateSweep(Callback):
    """Compose and check every job of a multirun before the first one starts (train only)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        config_name = kwargs.get("config_name")
        if config_name != "train" or os.environ.get("DDPM_SKIP_SWEEP_CHECK"):
            return
        from hydra.core.global_hydra import GlobalHydra
        from hydra.types import RunMode

        jobs = sweep_jobs(config)
        if not jobs or len(jobs) < 2:
            return
        hydra = GlobalHydra.instance().hydra
        common = set.intersection(*(set(job) for job in jobs))  # name a job by its swept values only
        for number, overrides in enumerate(jobs):
            try:
                job = hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN)
                check_run_deep(job)
            except Exception as error:  # noqa: BLE001  every failure here is the user's config
                from .errors import root_message

                swept = " ".join(o for o in overrides if o not in common)
                print(f"error: sweep job {number} ({swept}): {root_message(error)}; "
                      f"no job was started", file=sys.stderr)
                sys.exit(2)
