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
from ..config.choices import (
    CHOICE_KEYS,
    COUNT_OR_FRACTION_KEYS,
    DEVICES,
    ETA_METHODS,
    EVAL_METRICS,
    FLOAT_RANGES,
    GENERATION_CHOICE_KEYS,
    GENERATION_INTS,
    IMAGE_SUFFIXES,
    INT_KEYS,
    MAX_SIGMA_REL,
    POOL_DIMS,
)
from ..sweeps import CONTINUES_SWEEP_ENV, expand_sweep, is_basic_sweeper

TYPED_GROUPS = {"model": schema.ModelConfig, "diffusion": schema.DiffusionConfig, "optim": schema.OptimConfig,
                "ema": schema.EMAConfig, "train": schema.TrainConfig, "sample": schema.SampleConfig}



def _suggest(word: str, options: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest option (whole name or its last ``_`` part), or ''."""
    def score(option: str) -> float:  # the whole name wins a tie with another option's last part
        return max(difflib.SequenceMatcher(None, word, option).ratio(),
                   0.99 * difflib.SequenceMatcher(None, word, option.split("_")[-1]).ratio())

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


PROGRAMS = {"train": "ddpm-train", "sample": "ddpm-sample", "eval": "ddpm-eval", "posthoc_ema": "ddpm-posthoc-ema"}


def known_keys(config_name: str, config_dir: str = CONFIG_DIR) -> tuple[list[str], dict[str, list[str]]]:
    """The top-level keys a command's primary config (``conf/<config_name>.yaml``) accepts: its own keys, its
    config groups and ``hydra`` (for ``train`` also the schema's fields); and the keys of its untyped
    sections (``guidance``, ``sample`` of ddpm-sample/-eval)."""
    primary = OmegaConf.to_container(OmegaConf.load(Path(config_dir) / f"{config_name}.yaml"), resolve=False)
    keys = {str(k) for k in primary if k != "defaults"} | {"hydra"}
    for entry in primary.get("defaults") or []:
        if isinstance(entry, dict):
            keys |= {str(k).split("@")[-1].lstrip("/").split("/")[0] for k in entry}
    sections = {}
    if config_name == "train":  # a typed schema; +lever=... adds any group
        keys |= {f.name for f in dataclasses.fields(schema.RunConfig)}
        keys |= {p.name for p in Path(config_dir).iterdir() if p.is_dir() and not p.name.startswith("_")}
    else:
        sections = {str(k): sorted(str(f) for f in v) for k, v in primary.items()
                    if isinstance(v, dict) and k not in ("hydra", "defaults")}
    return sorted(keys - {"_self_"}), sections


def check_group_choices(args: list[str], config_dir: str = CONFIG_DIR, typed_keys: bool = True,
                        config_name: str | None = None) -> str | None:
    """The error line for the first command-line override that names a key the command does not have (with
    ``config_name``), an unknown group option or (with ``typed_keys``: ddpm-train's config, whose groups have
    schemas) an unknown typed key."""
    keys, sections = known_keys(config_name, config_dir) if config_name else (None, {})
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra") or "@" in key:
            continue
        head, _, rest = key.partition(".")
        if keys is not None and head not in keys:
            program = PROGRAMS.get(config_name, config_name)
            return f"{head} is not a {program} setting{_suggest(head, keys)}; allowed: {', '.join(keys)}"
        if head in sections and rest and rest.split(".")[0] not in sections[head]:
            return _unknown_key_message(head, rest.split(".")[0], sections[head])
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
            if typed_keys and group in TYPED_GROUPS and "." not in field:
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


def check_choices(cfg: DictConfig, keys: dict[str, tuple[str, ...]] = CHOICE_KEYS) -> None:
    """ValueError naming the key and its allowed values for a choice-valued key set to something else
    (``diffusion.schedule=cosin``), before torch is imported (the lists are ``config/choices.py``'s)."""
    for key, allowed in keys.items():
        present, value = _select(cfg, key)
        if present and value is not None and str(value) not in allowed:
            raise ValueError(f"{key}={value!r} is not an option; allowed: {', '.join(allowed)}"
                             f"{_suggest(str(value), allowed)}")


def check_max_time(cfg: DictConfig) -> None:
    """``trainer.max_time``: null, "DD:HH:MM:SS" or a dict of days/hours/minutes/seconds (Lightning's Timer)."""
    present, value = _select(cfg, "trainer.max_time")
    if not present or value is None or isinstance(value, DictConfig):
        return
    parts = str(value).split(":")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts) or isinstance(value, bool):
        raise ValueError(f"trainer.max_time={value!r}; give DD:HH:MM:SS (e.g. trainer.max_time=00:01:30:00 for 90 "
                         f"minutes) or null")


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


STEPS_KEYS = ("sample.steps", "callbacks.sample_grid.steps", "callbacks.generative_metrics.steps")


def check_run(cfg: DictConfig) -> None:
    """Every ddpm-train config check that needs no heavy import (typed keys, numbers, steps, the cache folder,
    memory)."""
    check_typed_keys(cfg)
    check_choices(cfg)
    check_numbers(cfg)
    for key in STEPS_KEYS:
        present, value = _select(cfg, key)
        if present:
            check_steps(value, key)
    check_max_time(cfg)
    present, cache = _select(cfg, "paths.cache_dir")
    if present:
        check_writable_folder(cache, "paths.cache_dir")
    present, sigma_rels = _select(cfg, "ema.posthoc_sigma_rels")
    if present and OmegaConf.is_list(sigma_rels):
        for value in sigma_rels:
            check_sigma_rel(value, "ema.posthoc_sigma_rels")
    check_ignored_inputs(cfg)
    present, accelerator = _select(cfg, "trainer.accelerator")
    if present and accelerator == "cpu":  # CPU processes; a GPU count is checked once torch is loaded
        error = process_count_error(_select(cfg, "trainer.devices")[1], "trainer.devices", cpus=usable_cpus())
        if error:
            raise ValueError(error)
    if cfg.get("objective", "diffusion") == "diffusion" and present and accelerator == "cpu":
        check_memory(cfg)  # host memory; a GPU's memory is Lightning's/torch's to report


def check_run_deep(cfg: DictConfig) -> None:
    """``check_run`` plus the diffusion process's own option checks (imports torch, no Lightning)."""
    check_run(cfg)
    if isinstance(cfg.get("diffusion"), DictConfig) and cfg.get("objective", "diffusion") == "diffusion":
        from ..modules.builders import build_diffusion

        build_diffusion(OmegaConf.to_container(cfg.diffusion, resolve=True))


# --------------------------------------------------------------------------------- ddpm-sample / ddpm-eval


def check_sigma_rel(value: Any, key: str) -> None:
    """A post-hoc EMA length: the averaging profile's std relative to the run's length, in (0, sqrt(1/12)]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= MAX_SIGMA_REL:
        raise ValueError(f"{key} must be a number in (0, {MAX_SIGMA_REL:.4f}] (the EMA length relative to the run; "
                         f"{MAX_SIGMA_REL:.4f} = the plain average of every step), got {value!r}; e.g. 0.05-0.2")


def check_steps(value: Any, key: str = "steps") -> None:
    """Kept sampler steps: an integer >= 1, a respacing string ("ddim25", "10,15,20"), ``all`` or null."""
    if value is None or (isinstance(value, str) and not value.strip().lstrip("-").isdigit()):
        return
    if isinstance(value, bool) or not isinstance(value, (int, str)) or int(value) < 1:
        raise ValueError(f"{key}={value!r}: a sampler needs at least 1 step; give {key}=N (N >= 1), {key}=all "
                         f"(every one of the T steps) or leave it unset (the checkpoint's own)")


def check_writable_folder(path: Any, key: str, hint: str = " (or DDPM_CACHE_DIR)") -> None:
    """ValueError when ``path`` (or the nearest existing parent it would be created in) cannot be written; the
    advice names ``key`` (and ``hint``: the environment variable behind a cache folder's default)."""
    if path in (None, ""):
        return
    folder = Path(str(path)).absolute()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise ValueError(f"cannot write the {key} folder {folder}: {existing} is a file; set {key}{hint} to a "
                         f"writable folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the {key} folder {folder}: {existing} is read-only; set {key}{hint} to a "
                         f"writable folder")




def _npz_names(path: Path, key: str, layout: str) -> list[str]:
    """The arrays of an ``.npz`` (a zip whose directory reads), or ValueError naming ``key``."""
    import zipfile

    if path.suffix != ".npz":
        raise ValueError(f"{key}={path} is a {path.suffix or 'suffix-less'} file; give {layout}")
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{key}={path} is not a readable .npz (truncated or not a zip: {error})") from None


def check_samples_file(path: Any) -> None:
    """``samples=``: a folder with images or a whole ADM-layout ``.npz`` (a zip whose directory reads)."""
    if path in (None, ""):
        return
    path = Path(str(path))
    if not path.exists():
        return  # missing: the loader's own message
    if path.is_dir():
        if next((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), None) is None:
            raise ValueError(f"samples folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return
    names = _npz_names(path, "samples", "an ADM-layout .npz (arr_0 uint8 NHWC, optional arr_1 labels) or a folder "
                                        "of images")
    if "arr_0.npy" not in names:
        raise ValueError(f"samples={path} has no arr_0 (expected the ADM layout: arr_0 uint8 NHWC, optional arr_1)")


def check_reference_file(path: Any) -> None:
    """``reference=``: an ADM evaluator reference batch (``.npz`` with mu, sigma; optional mu_s, sigma_s, arr_0)."""
    if path in (None, ""):
        return
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise ValueError(f"reference={path} " + ("is a folder" if path.is_dir() else "does not exist")
                         + "; give an ADM reference batch .npz (e.g. VIRTUAL_imagenet64_labeled.npz)")
    names = {n.removesuffix(".npy") for n in _npz_names(path, "reference", "an ADM reference batch .npz (mu, "
                                                                              "sigma, mu_s, sigma_s, arr_0)")}
    if not {"mu", "sigma"} <= names:
        raise ValueError(f"reference={path} is not an ADM reference batch: it has {sorted(names)}, expected mu, "
                         f"sigma (and mu_s, sigma_s, arr_0)")
    import numpy as np  # no torch: the statistics are checked here, before any work

    with np.load(path, allow_pickle=False) as data:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            if key in data.files and not np.isfinite(data[key]).all():
                bad = int((~np.isfinite(data[key])).sum())
                raise ValueError(f"reference={path}: {key} holds {bad} non-finite value(s) (NaN or inf), so every "
                                 f"score against it would be nan; use another reference batch, or write one from the "
                                 f"data set (ddpm-eval data=<name> write_reference=<path.npz>)")


def check_generation(cfg: DictConfig, multirun: bool = False) -> None:
    """The keys of ``ddpm-sample`` / ``ddpm-eval``: counts, the sampler, metrics, device, labels, guidance, files,
    folders (with ``config.choices``' lists; the library checks the resolved settings again, ``SampleConfig``)."""
    for key, minimum in GENERATION_INTS.items():
        present, value = _select(cfg, key)
        if present and (not _is_int(value) or value < minimum):
            raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    present, sigma_rel = _select(cfg, "ema_sigma_rel")
    if present and sigma_rel is not None:
        check_sigma_rel(sigma_rel, "ema_sigma_rel")
    _check_generation_choices(cfg)
    _check_generation_metrics(cfg)
    device = str(cfg.get("device", "auto"))
    if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"device={device!r}; allowed: {', '.join(DEVICES)}")
    y = cfg.get("y")
    if not (y is None or y in ("random", "balanced") or (_is_int(y) and y >= 0)):
        raise ValueError(f"y={y!r}; allowed: random, balanced, or a class index >= 0")
    _check_generation_guidance(cfg.get("guidance") or {}, multirun)
    check_ignored_inputs(cfg)
    check_generation_processes(cfg)
    check_samples_file(cfg.get("samples"))
    check_reference_file(cfg.get("reference"))
    check_writable_folder(cfg.get("cache_dir"), "cache_dir")
    if _given(cfg, "write_reference") is not None:  # a file the user names: its folder, named by the key
        check_writable_folder(Path(str(cfg.write_reference)).expanduser().parent, "write_reference", hint="")
    for key in cfg:  # a mandatory key (``???``) left unset: named before torch is imported
        if OmegaConf.is_missing(cfg, key):
            raise ValueError(f"{key} is required: give {key}={MANDATORY_HINTS.get(str(key), '...')}")
    for key in ("ckpt", "guidance.classifier_ckpt", "guidance.autoguidance_ckpt"):  # a wrong path: before torch
        present, path = _select(cfg, key)
        if present and path not in (None, ""):
            from ..artifacts import check_checkpoint_file

            check_checkpoint_file(str(path))


MANDATORY_HINTS = {"ckpt": "<a ddpm-train checkpoint, or ADM weights converted by ddpm-convert-adm>"}

# (key, the key that would make it ignored, why): both given is refused, never one of them silently ignored
IGNORED_TOGETHER = (
    ("samples", "ckpt", "ckpt= scores new samples of the checkpoint, samples= scores existing ones: give one"),
    ("reference", "write_reference", "write_reference= writes the data set's own reference batch instead of "
                                     "scoring against reference=: give one"),
    ("resume", "ckpt_path", "resume=auto continues this run folder's newest checkpoint, ckpt_path= starts from the "
                            "named file: give one"),
)
# keys that act only on a checkpoint's sampling: with samples= and no ckpt= they would be ignored
SAMPLING_ONLY = ("method", "steps", "eta", "schedule", "guidance.classifier_ckpt", "guidance.scale",
                 "guidance.cfg_scale")


def _given(cfg: DictConfig, key: str) -> Any:
    """The value of ``key`` when set to something other than nothing (null, '', 0, false), else None."""
    present, value = _select(cfg, key)
    return value if present and value not in (None, "", 0, False) else None


def check_ignored_inputs(cfg: DictConfig) -> None:
    """ValueError for an input that another one would make the command ignore (``IGNORED_TOGETHER``, and the
    sampling keys of ``ddpm-eval samples=...``, which samples nothing)."""
    for key, other, why in IGNORED_TOGETHER:
        if _given(cfg, key) is not None and _given(cfg, other) is not None:
            raise ValueError(f"{key}={_given(cfg, key)} and {other}={_given(cfg, other)} both given: {why}")
    if _given(cfg, "samples") is not None and _given(cfg, "ckpt") is None:
        used = [key for key in SAMPLING_ONLY if _given(cfg, key) is not None]
        if used:
            raise ValueError(f"{used[0]}={_given(cfg, used[0])} acts on sampling, but samples= scores existing "
                             f"samples (nothing is sampled): drop {used[0]}, or give ckpt= instead of samples=")


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def process_count_error(devices: Any, key: str = "devices", *, shards: tuple[int, int, int] | None = None,
                        cpus: int | None = None, gpus: int | None = None) -> str | None:
    """Why ``devices`` processes would be more than the work or the machine can use (one line), or None: more than
    the shards of ``shards = (num_samples, shard_size, count)``, than ``cpus`` cores (CPU processes) or than
    ``gpus`` GPUs."""
    if not _is_int(devices) or devices <= 1:
        return None
    limits = []
    if shards is not None and devices > shards[2]:
        limits.append((shards[2], f"num_samples={shards[0]} makes {shards[2]} shard(s) of shard_size={shards[1]}"))
    if cpus is not None and devices > cpus:
        limits.append((cpus, f"this machine has {cpus} CPU core(s)"))
    if gpus is not None and devices > gpus:
        limits.append((gpus, f"torch sees {gpus} GPU(s)"))
    if not limits:
        return None
    usable = max(1, min(limit for limit, _ in limits))
    return (f"{key}={devices} starts more processes than can work: {' and '.join(why for _, why in limits)}; "
            f"give {key}={usable}" + (" (or a smaller shard_size)" if shards is not None and
                                       devices > shards[2] else ""))


def check_generation_processes(cfg: DictConfig) -> None:
    """``devices``: no more processes than shards to generate (and, with ``device=cpu``, than CPU cores); the
    GPU count is checked once torch is loaded (``shards.launch``), before any process starts."""
    devices, n, size = cfg.get("devices"), cfg.get("num_samples"), cfg.get("shard_size")
    if not (_is_int(n) and _is_int(size) and size > 0) or _given(cfg, "ckpt") is None:
        return
    error = process_count_error(devices, shards=(n, size, -(-n // size)),
                                cpus=usable_cpus() if str(cfg.get("device")) == "cpu" else None)
    if error:
        raise ValueError(error)


# how the library names a wrong value of these keys (the others: ``key='value'``)
GENERATION_CHOICE_WORDS = {"method": "unknown sampling method", "schedule": "unknown sampling schedule",
                           "feature": "unknown feature extractor"}


def _check_generation_choices(cfg: DictConfig) -> None:
    """The sampler overrides (``method``, ``schedule``, ``steps``, ``eta``), ``feature`` and ``precision``."""
    check_steps(cfg.get("steps"))
    for key, allowed in GENERATION_CHOICE_KEYS.items():  # every choice-valued key, with the library's own words
        present, value = _select(cfg, key)
        if present and value is not None and str(value) not in allowed:
            what = GENERATION_CHOICE_WORDS.get(key)
            shown = f"{what} {str(value)!r}" if what else f"{key}={value!r}"
            raise ValueError(f"{shown}; allowed: {', '.join(allowed)}{_suggest(str(value), allowed)}")
    present, eta = _select(cfg, "eta")
    if present and eta is not None:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta must be a number >= 0 (DDIM's stochasticity: 0 deterministic, 1 as DDPM), "
                             f"got {eta!r}")
        method = cfg.get("method")
        if method is not None and method not in ETA_METHODS:
            raise ValueError(f"eta={eta} is DDIM's; method={method} does not use it: drop eta, or give method=ddim")


def _check_generation_metrics(cfg: DictConfig) -> None:
    present, metrics = _select(cfg, "metrics")
    if not present or metrics is None:
        return
    if not OmegaConf.is_list(metrics):  # a bare string would be read letter by letter
        raise ValueError(f"metrics={metrics}: metrics is a list; give metrics=[{metrics}]")
    names = [str(m) for m in metrics]
    unknown = [m for m in names if m not in EVAL_METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {', '.join(unknown)}{_suggest(unknown[0], EVAL_METRICS)}; allowed: "
                         f"{', '.join(EVAL_METRICS)}")
    n, dim = cfg.get("num_samples"), POOL_DIMS.get(str(cfg.get("feature", "inception")))
    if "fid_inf" in names and _is_int(n) and dim and n < 5 * dim:
        raise ValueError(f"metrics fid_inf needs num_samples >= {5 * dim} (subsets down to a fifth of the samples, "
                         f"each at least the {dim}-d feature size), got {n}: raise num_samples or drop fid_inf")


def _check_generation_guidance(guidance: Any, multirun: bool) -> None:
    """The ``guidance`` group: its values as ``config.schema.GuidanceConfig`` checks them (scales are numbers >= 0,
    an interval is [lo, hi] with 0 <= lo <= hi, not classifier-free guidance and autoguidance at once; the interval
    against the model's T once it is loaded), and a classifier or guiding model that guides (a sweep may hold
    unguided rows: ``check_sweep_guidance``)."""
    if not isinstance(guidance, DictConfig):
        raise ValueError(f"guidance={guidance!r}: guidance is a group of keys; set guidance.scale=..., "
                         f"guidance.cfg_scale=... or guidance.classifier_ckpt=...")
    fields = {f.name for f in dataclasses.fields(schema.GuidanceConfig)}
    values = OmegaConf.to_container(guidance, resolve=True)
    schema.GuidanceConfig(**{key: value for key, value in values.items() if key in fields})
    if guidance.get("classifier_ckpt") and not guidance.get("scale") and not multirun:
        raise ValueError("guidance.classifier_ckpt is given but guidance.scale=0: the classifier would guide "
                         "nothing; set guidance.scale > 0 (e.g. guidance.scale=1), or drop guidance.classifier_ckpt")
    if guidance.get("autoguidance_ckpt") and guidance.get("autoguidance_scale", 1.0) == 1 and not multirun:
        raise ValueError("guidance.autoguidance_ckpt is given but guidance.autoguidance_scale=1: the guiding model "
                         "would guide nothing; set guidance.autoguidance_scale (e.g. 2), or drop "
                         "guidance.autoguidance_ckpt")


def _check(config_name: str | None, cfg: DictConfig, multirun: bool) -> None:
    if config_name == "train":
        check_run_deep(cfg)
    elif config_name in ("eval", "sample"):
        check_generation(cfg, multirun=multirun)


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_command_line(args: list[str] | None = None, typed_keys: bool = True, config_name: str = "train") -> None:
    """Exit with one ``error:`` line when the command line names a key the command does not have
    (``+foo=1`` would be ignored, ``foo=1`` is Hydra's 6 lines), an unknown group option or (``typed_keys``,
    ddpm-train) an unknown typed key."""
    args = sys.argv[1:] if args is None else args
    error = check_group_choices(args, typed_keys=typed_keys, config_name=config_name)
    if error is None:
        error = composition_error(args, config_name)
    if error is None:
        error = bare_list_error(args, config_name)
    if error is not None:
        _exit(error)


def bare_list_error(args: list[str], config_name: str, config_dir: str = CONFIG_DIR) -> str | None:
    """One line for a list-valued key given a bare value (``metrics=fid``, ``callbacks.generative_metrics.metrics=
    fid``: a string where a list is read, iterated letter by letter), whatever the key: the keys whose value in the
    config composed without these overrides is a list. Typed keys (``tags=abc``) are refused by the schema."""
    if any(arg.startswith("-") for arg in args):
        return None
    bare = {}
    for arg in args:
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if value and not value.lstrip().startswith(("[", "${")) and not key.startswith("hydra") and "@" not in key \
                and ("." in key or group_options(key, config_dir) is None):
            bare[arg] = (key, value)
    if not bare:
        return None
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            base = compose(config_name, overrides=[a for a in args if a not in bare])
    except Exception:  # noqa: BLE001  composition_error has reported what Hydra refuses
        return None
    for key, value in bare.values():
        present, default = _select(base, key)
        if present and OmegaConf.is_list(default):
            return f"{key}={value}: {key} is a list; give {key}=[{value}]"
    return None


def composition_error(args: list[str], config_name: str, config_dir: str = CONFIG_DIR) -> str | None:
    """One line for an override Hydra cannot merge (``optim.lr=fast``, ``tags=abc``: a value of the wrong type),
    found by composing the config once before Hydra does (which would print 6 lines and exit 1). Command lines
    with flags (``-m``, ``--help``, ``--cfg``) are left to Hydra; a multirun checks each job itself."""
    if any(arg.startswith("-") for arg in args):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose(config_name, overrides=list(args))
    except (ConfigCompositionException, OmegaConfBaseException) as error:
        from .errors import root_message

        cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else None
        text = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        if cause is not None and text[0].startswith("Error merging override "):
            return f"{text[0].removeprefix('Error merging override ')}: {root_message(cause)}"
        head = f"{text[0]} {text[1]}" if text[0].endswith(":") and len(text) > 1 else text[0]
        key = next((line for line in text if line.startswith("full_key:")), "")
        return f"{head} ({key})" if key else head
    except Exception:  # noqa: BLE001  anything else (e.g. a resolver that needs a running app): Hydra's to report
        return None
    return None


# ------------------------------------------------------------------------------------------------- sweeps
def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The override lists of every job the basic sweeper will launch (``sweeps.expand_sweep``, the expansion
    ``ddpm-report`` also uses); None for other sweepers."""
    if not is_basic_sweeper(OmegaConf.select(config, "hydra.sweeper._target_", default="")):
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    # unresolved: ``ckpt=runs/s${train_seed}/last.ckpt`` is each job's own, not the sweep config's (train_seed null)
    params = OmegaConf.to_container(params, resolve=False) if OmegaConf.is_config(params) else params
    return expand_sweep(params, OmegaConf.to_container(config.hydra.overrides.task, resolve=False))


class CheckConfig(Callback):
    """``ddpm-sample`` / ``ddpm-eval``: check the config before the run starts. Every command: compose and check
    every job of a multirun before the first one starts (``ddpm-train`` checks a single run in its task)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if kwargs.get("config_name") in ("eval", "sample"):
            try:
                _check(kwargs.get("config_name"), config, multirun=False)
            except (ValueError, OSError) as error:  # OSError: a checkpoint path that is missing or a folder
                _exit(str(error))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        config_name = kwargs.get("config_name")
        from hydra.core.global_hydra import GlobalHydra
        from hydra.types import RunMode

        jobs = sweep_jobs(config)
        generation = config_name in ("eval", "sample")
        if not jobs or (len(jobs) < 2 and not generation):
            return
        hydra = GlobalHydra.instance().hydra
        common = set.intersection(*(set(job) for job in jobs))  # name a job by its swept values only
        composed = []
        for number, overrides in enumerate(jobs):
            try:
                job = hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN)
                _check(config_name, job, multirun=True)
                composed.append(job)
            except Exception as error:  # noqa: BLE001  every failure here is the user's config
                from .errors import root_message

                swept = " ".join(o for o in overrides if o not in common)
                _exit(f"sweep job {number} ({swept}): {root_message(error)}; no job was started")
        if generation:
            try:
                check_sweep_guidance(composed)
            except ValueError as error:
                _exit(str(error))


def check_sweep_guidance(jobs: list[DictConfig]) -> None:
    """A sweep may keep ``guidance.scale=0`` rows next to a classifier (the unguided baseline of a guidance
    sweep), but a classifier that no job guides with is refused, as in a single run; likewise a guiding model
    (``guidance.autoguidance_ckpt``) with ``autoguidance_scale=1`` in every job. Not for the continuation of a
    sweep (``CONTINUES_SWEEP_ENV``: ddpm-report's scripts run the held-out seeds of its unguided row alone)."""
    def guidance(job: DictConfig, key: str) -> Any:
        return _select(job, f"guidance.{key}")[1]

    if os.environ.get(CONTINUES_SWEEP_ENV):  # ddpm-report's report/added seeds of rows of a checked sweep
        return
    with_classifier = [job for job in jobs if guidance(job, "classifier_ckpt")]
    if with_classifier and not any(guidance(job, "scale") for job in with_classifier):
        scales = sorted({float(guidance(job, "scale") or 0) for job in with_classifier})
        raise ValueError(f"guidance.classifier_ckpt is given but no job of the sweep has guidance.scale > 0 "
                         f"(scales: {', '.join(f'{s:g}' for s in scales)}): the classifier would guide nothing; "
                         f"sweep guidance.scale over values > 0 (e.g. guidance.scale=0,1,2), or drop "
                         f"guidance.classifier_ckpt; no job was started")
    with_guiding = [job for job in jobs if guidance(job, "autoguidance_ckpt")]
    scales = sorted({float(1.0 if guidance(job, "autoguidance_scale") is None else guidance(job, "autoguidance_scale"))
                     for job in with_guiding})
    if with_guiding and scales == [1.0]:
        raise ValueError("guidance.autoguidance_ckpt is given but no job of the sweep has guidance.autoguidance_scale "
                         "!= 1 (scales: 1): the guiding model would guide nothing; sweep guidance.autoguidance_scale "
                         "(e.g. guidance.autoguidance_scale=1,2,3), or drop guidance.autoguidance_ckpt; no job was "
                         "started")
