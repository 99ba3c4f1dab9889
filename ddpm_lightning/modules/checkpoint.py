"""The checkpoint owner: reading, validating and converting checkpoints, found by name.

* Safe loading: ``load_checkpoint_dict`` is the only ``torch.load`` of a checkpoint (``weights_only=True``), with
  one clear error for every way a file can be wrong (missing, a folder, text, truncated, pickle-requiring).
* Which kind: ``load_diffusion_module`` / ``load_classifier_module`` rebuild a module from its checkpoint alone
  (its ``hyper_parameters``) and refuse the other kind (``load_diffusion_checkpoint``: ours or converted ADM
  weights); ``is_converted_adm`` recognises ``ddpm-convert-adm``
  output, which ``diffusion_module_from_adm`` / ``classifier_guidance_from_adm`` turn into a module or a
  ``cond_fn`` (ADM flags -> our diffusion config: ``adm_diffusion_config``).
* Resuming: ``find_resume_checkpoint`` tries a run folder's checkpoints newest first (``last.ckpt`` first among
  equally new files), skipping unreadable ones with a warning, after ``remove_stale_temporaries``.
* Does it fit: ``check_checkpoint_fits`` (the tensors against the module built from this run's config, in one
  line naming the differing flags) and ``check_same_run`` (data set, network and diffusion settings).

Writing is ``artifacts.atomic_torch_save`` (``callbacks/checkpointing.py`` wires it into Lightning). No Lightning
at import (``ddpm-convert-adm`` stays light): the modules are imported on first use.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..artifacts import TMP_PATTERN, check_checkpoint_file
from ..models.state_dict import state_dict_mismatch

log = logging.getLogger(__name__)

LAST_NAME = "last.ckpt"


def load_checkpoint_dict(path: str | Path, map_location: str | torch.device = "cpu",
                         mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; missing, truncated or pickle-requiring files raise ValueError.
    ``mmap``: map the tensors instead of reading them (a large checkpoint of which little is needed)."""
    path = check_checkpoint_file(path)  # missing, a folder, empty or text: one line
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's message is a paragraph; the line after "WeightsUnpickler error:" says what was refused
        # torch 2.14 says "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
        first = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
        if "unsupported global" in str(error).lower():
            raise ValueError(f"checkpoint {path} needs arbitrary pickled objects, which are refused for safety "
                             f"(weights_only=True): {first[:200]}") from None
        raise ValueError(f"checkpoint {path} is corrupt or not a torch checkpoint ({first[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, IndexError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({first[:200]}); "
                         f"use another checkpoint (e.g. the previous one in the same folder)") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def checkpoint_step(path: str | Path) -> int | None:
    """The training step a checkpoint was saved at (its ``global_step``; None for converted ADM weights), read
    without loading its tensors (``mmap``): cheap for ordering a run's checkpoints."""
    step = load_checkpoint_dict(path, mmap=True).get("global_step")
    return None if step is None else int(step)


def load_diffusion_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """A DiffusionModule (EMA weights included) rebuilt from a Lightning checkpoint alone."""
    from .diffusion_module import DiffusionModule

    checkpoint = load_checkpoint_dict(path, map_location)
    hparams = checkpoint.get("hyper_parameters")
    if not hparams or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {path} is not a ddpm_lightning diffusion checkpoint "
                         f"(no hyper_parameters/state_dict); for official ADM weights use ddpm-convert-adm")
    if "diffusion" not in hparams or "model" not in hparams:
        raise ValueError(f"checkpoint {path} is not a diffusion model checkpoint (is it a classifier?)")
    module = DiffusionModule(**hparams)
    problem = state_dict_mismatch(module.state_dict(), checkpoint["state_dict"])
    if problem:
        raise ValueError(f"checkpoint {path} does not fit the architecture in its own config: {problem}")
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    return module.to(map_location).eval()


def load_diffusion_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """A DiffusionModule from a ``ddpm-train`` checkpoint or from official ADM weights converted by
    ``ddpm-convert-adm`` (its flags give the diffusion settings): what ``ckpt=`` and
    ``guidance.autoguidance_ckpt=`` name."""
    checkpoint = load_checkpoint_dict(path, map_location="cpu")
    if is_converted_adm(checkpoint):
        return diffusion_module_from_adm(checkpoint, path).to(map_location)
    del checkpoint
    return load_diffusion_module(path, map_location=map_location)


def load_classifier_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """A ClassifierModule (EMA included) rebuilt from its Lightning checkpoint alone (``weights_only``).

    Missing file: FileNotFoundError; corrupt, pickle-requiring or diffusion checkpoints: ValueError.
    """
    from .classifier_module import ClassifierModule

    checkpoint = load_checkpoint_dict(path, map_location)
    hparams = checkpoint.get("hyper_parameters")
    if not hparams or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {path} is not a ddpm_lightning checkpoint "
                         f"(no hyper_parameters/state_dict)")
    if "classifier" not in hparams:
        kind = "a diffusion model checkpoint" if "model" in hparams else "an unknown checkpoint"
        raise ValueError(f"checkpoint {path} is {kind}, not a noisy classifier; train one with "
                         f"`ddpm-train experiment=classifier_default`")
    try:
        module = ClassifierModule(**hparams)
    except TypeError as error:
        raise ValueError(f"checkpoint {path} does not fit its own classifier config: {str(error)[:200]}") from None
    problem = state_dict_mismatch(module.state_dict(), checkpoint["state_dict"])
    if problem:
        raise ValueError(f"checkpoint {path} does not fit its own classifier config: {problem}")
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint.get("run_config", {})  # not on_load_checkpoint: keep the caller's RNG
    return module.to(map_location).eval()


def is_converted_adm(checkpoint: dict[str, Any]) -> bool:
    """Whether a loaded checkpoint dict is the output of ``ddpm-convert-adm``."""
    return {"state_dict", "model_class", "model_config", "adm_flags"} <= set(checkpoint)


def adm_diffusion_config(flags: dict[str, Any]) -> dict[str, Any]:
    """ADM's diffusion flags -> our ``diffusion`` config (guided_diffusion's ``create_gaussian_diffusion``)."""
    if flags.get("rescale_timesteps"):
        raise ValueError("ADM flag rescale_timesteps=True is not supported (the published checkpoints use False)")
    learn_sigma = bool(flags.get("learn_sigma", False))
    config = {"schedule": str(flags.get("noise_schedule", "linear")),
              "num_timesteps": int(flags.get("diffusion_steps", 1000)),
              "mean_type": "x0" if flags.get("predict_xstart") else "eps",
              "var_type": "learned_range" if learn_sigma else "fixed_large",
              "loss_type": "vlb" if flags.get("use_kl") else ("hybrid" if learn_sigma else "simple")}
    return config


def diffusion_module_from_adm(checkpoint: dict[str, Any], path: str | Path = "checkpoint"):
    """A ``DiffusionModule`` (net and EMA net holding the official weights) from a converted UNet checkpoint."""
    from .diffusion_module import DiffusionModule

    if checkpoint["model_class"] != "UNet":
        raise ValueError(f"{path} is a converted ADM {checkpoint['model_class']} (a classifier?), not a diffusion "
                         f"model: give it as guidance.classifier_ckpt")
    config, flags = dict(checkpoint["model_config"]), dict(checkpoint["adm_flags"])
    num_classes = config.pop("num_classes", None)
    image_size, channels = int(config.pop("image_size")), int(config.pop("in_channels"))
    config.pop("out_channels", None)
    respacing = str(flags.get("timestep_respacing") or "")
    module = DiffusionModule(
        model={**config, "class_cond": num_classes is not None}, diffusion=adm_diffusion_config(flags),
        optim={}, ema={}, image_size=image_size, channels=channels, num_classes=num_classes,
        sample={"method": "ddpm", "steps": respacing or None},
        run_config={"adm_flags": flags, "converted_from": "ddpm-convert-adm"})
    try:
        module.net.load_state_dict(checkpoint["state_dict"])
        module.ema_net.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines()]
        detail = next((line for line in lines if "size mismatch" in line or "Missing" in line), str(error)[:200])
        raise ValueError(f"{path} does not fit its own model_config: {detail}") from None
    return module.eval()


def classifier_guidance_from_adm(checkpoint: dict[str, Any], scale: float, diffusion_hparams: dict[str, Any],
                                 path: str | Path = "checkpoint", map_location: str | torch.device = "cpu"):
    """``(cond_fn, class count)`` guiding with a converted official classifier (checked against the model)."""
    from ..diffusion import build_guidance
    from ..models import EncoderUNet
    from .builders import guidance_info

    if checkpoint["model_class"] != "EncoderUNet":
        raise ValueError(f"guidance.classifier_ckpt={path} is a converted ADM {checkpoint['model_class']}, "
                         f"not a classifier")
    config, flags = checkpoint["model_config"], checkpoint["adm_flags"]
    net = EncoderUNet(**config)
    net.load_state_dict(checkpoint["state_dict"])
    net = net.to(map_location).eval()
    info = {"num_timesteps": int(flags.get("diffusion_steps", 1000)), "schedule": str(flags.get("noise_schedule",
            "linear")), "image_size": int(config["image_size"]), "channels": int(config["in_channels"]),
            "num_classes": int(config["out_channels"])}
    cond_fn = build_guidance(net, scale, classifier_info=info, diffusion_info=guidance_info(diffusion_hparams))
    return cond_fn, info["num_classes"]


def checkpoint_candidates(folder: str | Path) -> list[Path]:
    """The ``*.ckpt`` files of ``folder``, newest first (``last.ckpt`` first among equally new files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.ckpt") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name == LAST_NAME), reverse=True)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the half-written ``.<name>.tmp-<pid>`` files a killed save left in ``folder`` (rank 0 only)."""
    from lightning.pytorch.utilities import rank_zero_only  # set by Lightning; resuming has it loaded anyway

    if getattr(rank_zero_only, "rank", 0) != 0:
        return []
    folder = Path(folder)
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        if TMP_PATTERN.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d half-written checkpoint file(s) left by a killed run: %s",
                 len(removed), ", ".join(p.name for p in removed))
    return removed


def find_resume_checkpoint(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``folder`` that loads (``weights_only=True``) and its content.

    None when the folder holds no checkpoint; ValueError naming every file when none of them loads.
    """
    folder = Path(folder)
    remove_stale_temporaries(folder)
    skipped = []
    for path in checkpoint_candidates(folder):
        try:
            checkpoint = load_checkpoint_dict(path)
            if "state_dict" not in checkpoint or "global_step" not in checkpoint:
                raise ValueError(f"checkpoint {path} is not a Lightning training checkpoint "
                                 f"(no state_dict/global_step)")
        except (ValueError, OSError) as error:
            log.warning("resume=auto: skipping %s: %s", path, error)
            skipped.append(f"{path.name}: {error}")
            continue
        if skipped:
            log.warning("resume=auto: resuming from %s (step %s) instead of the newer unreadable %s",
                        path, checkpoint.get("global_step"), ", ".join(s.split(":")[0] for s in skipped))
        return path, checkpoint
    if skipped:
        raise ValueError(f"resume=auto: none of the {len(skipped)} checkpoint(s) in {folder} loads "
                         f"({'; '.join(skipped)[:600]}); move them away to start from scratch, or give ckpt_path")
    return None


HPARAM_GROUPS = ("model", "diffusion", "classifier")
HPARAM_SIZES = ("image_size", "channels", "num_classes", "max_t")


def _hparam_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``group.key=<saved> in the checkpoint, <current> in this run`` for every differing flag."""
    out = []
    for group in HPARAM_GROUPS:
        old, new = saved.get(group) or {}, current.get(group) or {}
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                out.append(f"{group}.{key}={old.get(key)!r} in the checkpoint, {new.get(key)!r} in this run")
    for key in HPARAM_SIZES:
        if key in saved and key in current and saved[key] != current[key]:
            out.append(f"{key}={saved[key]!r} in the checkpoint, {current[key]!r} in this run")
    return out


def check_checkpoint_fits(module: torch.nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Raise ValueError when ``checkpoint``'s tensors do not fit ``module`` (a different architecture).

    The message names the file, the differing config flags (from the saved hyperparameters) and the first
    tensor that does not fit, instead of Lightning's multi-line ``load_state_dict`` error.
    """
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} has no state_dict: it is not a training checkpoint of this framework")
    detail = state_dict_mismatch(module.state_dict(), state)
    if detail is None:
        return
    saved = checkpoint.get("hyper_parameters") or {}
    current = dict(getattr(module, "hparams", {}) or {})
    flags = _hparam_differences(saved, current) if isinstance(saved, dict) else []
    kind = ""
    if isinstance(saved, dict) and ("classifier" in saved) != ("classifier" in current):
        kind = " (a classifier checkpoint for a diffusion run, or the reverse)"
    reason = "; ".join(flags[:3]) if flags else detail
    raise ValueError(f"checkpoint {path} was trained with a different architecture{kind}: {reason} "
                     f"({detail}); resume with the same model, diffusion and "
                     f"data settings, or start a new run folder")


# data-set identity: a resume with another value trains on other data than the checkpoint saw
DATA_KEYS = ("_target_", "path", "name", "image_size", "fit", "mode", "center_crop", "limit", "val_size", "seed",
             "num_classes")
EXECUTION_ONLY = ("compile", "channels_last", "use_checkpoint", "fused")  # how the network runs, not what it is

# What a resumed run (resume=auto, ckpt_path=) may change; README "Training" documents the same table.
# Refused, listing every difference: the data set and the global batch (``GLOBAL_BATCH``: the step counts, the LR
# horizon and the exact mid-epoch position are counted in it; the same global batch on fewer processes continues),
# the network, the process, the classifier, what the training draws (timestep sampler, label dropout, the seed: the
# checkpoint's random state is restored), and the post-hoc EMA snapshots (reconstructions need one profile per
# run). None: every key of the group.
RESUME_REFUSED: dict[str, tuple[str, ...] | None] = {
    "data": DATA_KEYS, "model": None, "diffusion": None, "classifier": None,
    "train": ("timestep_sampler", "p_uncond"), "ema": ("posthoc_sigma_rels", "posthoc_every_n_steps"),
    "": ("seed", "objective"),
}
# Applied from the resume step on, said in one line: the optimiser's settings (``callbacks.ResumeChanges`` sets
# them on the restored AdamW and LR schedule) and the EMA's decay (the EMA is rebuilt from the config).
RESUME_APPLIED: dict[str, tuple[str, ...]] = {
    "optim": ("lr", "weight_decay", "betas", "eps", "warmup_steps", "lr_schedule"), "ema": ("decay", "warmup"),
}


def _group(config: Mapping[str, Any], group: str) -> Mapping[str, Any] | None:
    node = config if group == "" else config.get(group)
    return node if isinstance(node, Mapping) else None


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                 table: Mapping[str, tuple[str, ...] | None]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key of ``table`` that differs."""
    out = []
    for group, keys in table.items():
        old, new = _group(saved, group), _group(current, group)
        if old is None or new is None:
            continue
        for key in keys or sorted(set(old) | set(new)):
            if key in EXECUTION_ONLY or (keys is None and (key not in old or key not in new)):
                continue
            if keys is not None and key not in old:  # a key newer than the checkpoint: nothing to compare
                continue
            if old.get(key) != new.get(key):
                out.append((f"{group}.{key}" if group else key, old.get(key), new.get(key)))
    return out


# the items of one optimizer step: their product is what a resume must keep
GLOBAL_BATCH = ("data.batch_size", "trainer.devices", "trainer.num_nodes", "trainer.accumulate_grad_batches")


def _global_batch(config: Mapping[str, Any]) -> tuple[int | None, str]:
    """(the global batch or None where a factor is not a count, e.g. ``devices=auto``; ``8 x 2 x 1 x 1``)."""
    factors = []
    for key in GLOBAL_BATCH:
        group, name = key.split(".")
        value = (config.get(group) or {}).get(name)
        factors.append(1 if value is None and key != "data.batch_size" else value)
    counts = all(isinstance(f, int) and not isinstance(f, bool) for f in factors)
    product = 1
    for factor in factors if counts else ():
        product *= factor
    return (product if counts else None), " x ".join(str(f) for f in factors)


def _batch_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The global batch when it changed (``data.batch_size`` where the global batch is not known)."""
    (old, old_shown), (new, new_shown) = _global_batch(saved), _global_batch(current)
    if old is not None and new is not None:
        if old == new:
            return []
        per_batch = new // (current.get("data") or {})["batch_size"]  # devices x nodes x accumulation now
        keeps = f" (data.batch_size={old // per_batch} keeps it)" if old % per_batch == 0 else ""
        return [f"the global batch ({' x '.join(GLOBAL_BATCH)}) {old_shown} = {old} in the checkpoint, {new_shown} = "
                f"{new} now{keeps}"]
    old_batch, new_batch = (saved.get("data") or {}).get("batch_size"), (current.get("data") or {}).get("batch_size")
    return [] if old_batch in (None, new_batch) else [f"data.batch_size={old_batch!r} in the checkpoint, "
                                                      f"{new_batch!r} now"]


def check_same_run(saved: Mapping[str, Any] | None, current: Mapping[str, Any], path: str | Path) -> list[str]:
    """ValueError listing every setting of ``current`` (this run's resolved config, a plain dict) in
    ``RESUME_REFUSED`` that differs from ``saved`` (the checkpoint's ``run_config``); else the changed settings of
    ``RESUME_APPLIED`` as ``key: old -> new`` (applied from the resume step on)."""
    if not isinstance(saved, Mapping):
        return []
    refused = _batch_difference(saved, current) + [f"{key}={old!r} in the checkpoint, {new!r} now"
                                                   for key, old, new in _differences(saved, current, RESUME_REFUSED)]
    if refused:
        listed = "; ".join(refused[:6])
        raise ValueError(f"checkpoint {path} was trained with other settings: {listed}; resume with the checkpoint's "
                         f"settings, or start a new run folder without ckpt_path")
    return [f"{key}: {old!r} -> {new!r}" for key, old, new in _differences(saved, current, RESUME_APPLIED)]
