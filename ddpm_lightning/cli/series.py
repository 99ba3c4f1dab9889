"""``ddpm-eval ckpts=<run>``: score every kept checkpoint of a run, in training-step order, in one process.

``ckpts`` is a run folder (its ``checkpoints/``), a folder of ``.ckpt`` files or a glob. Each checkpoint's step is
read without its tensors (``checkpoint_step``); ``last.ckpt`` (and any other file of a step already listed) is
scored once. Checkpoint N is scored into ``<output_dir>/step<N>/`` (its ``results.json`` records ``ckpt_step``),
and ``series.json`` lists them. The data set, the feature extractor and the reference statistics are built once
and reused by every checkpoint (``benchmarks/checkpoint_series.py`` measures what that saves). Rerunning the same
command into the same folder skips the scored checkpoints and continues a half-sampled one from its shards; other
settings into that folder are refused. Seeds are a sweep axis as usual: ``ddpm-eval -m ckpts=<run>
sample.seed=0,1,2``; ``ddpm-report`` draws every metric against the step with the seed interval as a band.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ..artifacts import RESULTS_FILE, write_json
from ..modules.checkpoint import LAST_NAME, checkpoint_step
from ..reporting.read import SERIES_FILE

# keys that do not change a checkpoint's scores: left out of the settings a rerun must match
NOT_SETTINGS = ("output_dir", "cache_dir", "ckpt", "ckpts", "ckpt_step", "device", "devices")


def step_folder(step: int) -> str:
    return f"step{step:07d}"


def series_checkpoints(spec: str, only_step: int | None = None) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint ``spec`` names, in step order, one per step (a named file before
    ``last.ckpt``); ``only_step``: that step's alone."""
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        files = sorted(folder.glob("*.ckpt"))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path)) if p.endswith(".ckpt"))
    if not files:
        raise ValueError(f"ckpts={spec}: no .ckpt files there; give a ddpm-train run folder, its checkpoints/ "
                         f"folder or a glob such as <run>/checkpoints/periodic-*.ckpt")
    by_step: dict[int, Path] = {}
    for file in sorted(files, key=lambda f: f.name == LAST_NAME):  # last.ckpt after the step-named files
        step = checkpoint_step(file)
        if step is None:
            raise ValueError(f"ckpts={spec}: {file} records no training step (converted ADM weights?); "
                             f"score it with ckpt={file}")
        by_step.setdefault(step, file.resolve())
    if only_step is not None:
        if only_step not in by_step:
            raise ValueError(f"ckpt_step={only_step}: no checkpoint of that step in ckpts={spec}; "
                             f"allowed: {', '.join(map(str, sorted(by_step)))}")
        by_step = {only_step: by_step[only_step]}
    return sorted(by_step.items())


def _settings(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True)
    return {key: value for key, value in container.items() if key not in NOT_SETTINGS}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_same_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    earlier = _read_json(out_dir / SERIES_FILE)
    if earlier is None or earlier.get("settings") == settings:
        return
    changed = sorted(k for k in set(settings) | set(earlier.get("settings") or {})
                     if settings.get(k) != (earlier.get("settings") or {}).get(k))
    raise ValueError(f"{out_dir} holds a checkpoint series scored with other settings ({', '.join(changed[:6])}); "
                     f"rerun with those settings to continue it, or give another hydra.run.dir")


def evaluate_series(cfg: DictConfig, evaluate_one: Callable[[DictConfig, Path, dict], dict]) -> dict:
    """Score every checkpoint of ``cfg.ckpts`` with ``evaluate_one(cfg of one checkpoint, its folder, reuse)``
    (``reuse``: what the checkpoints share, filled by the first), skipping those already scored here."""
    if int(cfg.get("devices", 1)) != 1:
        raise ValueError("ckpts= runs in one process: drop devices= (or score each checkpoint with ckpt=)")
    out_dir = Path(cfg.output_dir)
    series = series_checkpoints(cfg.ckpts, None if cfg.get("ckpt_step") is None else int(cfg.ckpt_step))
    settings = _settings(cfg)
    _check_same_settings(out_dir, settings)
    record = {"ckpts": str(cfg.ckpts), "settings": settings, "checkpoints": []}
    reuse: dict[str, Any] = {}
    for step, path in series:
        folder = out_dir / step_folder(step)
        results = _finished(folder, path)
        if results is None:
            one = cfg.copy()
            with open_dict(one):
                one.ckpt, one.ckpts, one.ckpt_step, one.output_dir = str(path), None, None, str(folder)
            print(f"checkpoint series: step {step} ({path.name}), {len(record['checkpoints']) + 1} of {len(series)}")
            results = evaluate_one(one, folder, reuse)
        record["checkpoints"].append({"step": step, "ckpt": str(path), "folder": folder.name,
                                      "metrics": results.get("metrics", {})})
        write_json(out_dir / SERIES_FILE, record, default=str)
    print(f"checkpoint series: {out_dir / SERIES_FILE} ({len(series)} checkpoints)")
    return record


def _finished(folder: Path, path: Path) -> dict | None:
    """The ``results.json`` of ``path`` already scored into ``folder``, else None."""
    results = _read_json(folder / RESULTS_FILE)
    return results if results is not None and results.get("ckpt") == str(path) else None
