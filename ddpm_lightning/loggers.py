"""The logging owner: the loggers of a training run, built from ``cfg.logger``, and everything W&B.

* W&B runs offline unless an API key is configured (``resolve_wandb_mode``), so a run never hangs without network;
  online with an unreachable W&B host (a 3 s connect) or a key the host refuses (``wandb.login(verify=True)``), or
  a run that fails to start online, falls back to offline with one ``warning:`` line (``wandb_run_mode``,
  ``start_wandb``); a W&B folder that cannot be written is one ``error:``
  line before any work. The key itself is never passed to a logger or logged.
* One W&B run per run folder: its id, name, group and tags are created once and kept in
  ``<run folder>/wandb_run.json`` (``run_record``); ``resume=auto``, ``ckpt_path=`` and a requeue continue the same
  run (``resume="allow"``, offline too: ``wandb sync <run folder>/wandb`` uploads the segments as one run).
  ``RunFolderWandbLogger`` never logs a key at a ``trainer/global_step`` it already logged (the steps redone after
  a resume from an earlier checkpoint are bit-identical) and keeps W&B's own step counter rising across segments.
* ``build_loggers``: every configured logger, its arguments redacted first (``security.redact_secrets``: loggers
  upload their arguments); W&B runs named by their overrides, grouped by sweep (a single run: its own group, where
  its evaluations join it), tagged (``wandb_defaults``); ``record_provenance`` adds the ``provenance`` object to the
  W&B config.
* ``finish_wandb``: end the W&B run after ``trainer.fit``, so the next job of a sweep in this process starts its own.
"""

from __future__ import annotations

import os
import secrets
import socket
import string
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from typing_extensions import override

from . import artifacts
from .config.choices import WANDB_MODES
from .security import redact_secrets

WANDB_HOST_TIMEOUT_S = 3.0  # a TCP connect to the W&B host; without network wandb itself retries ~2 minutes
DEFAULT_WANDB_URL = "https://api.wandb.ai"


def wandb_key_configured() -> bool:
    """True when W&B has a key: WANDB_API_KEY, or a netrc entry for its host (where `wandb login` writes it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(mode: str | None) -> str:
    mode = mode or os.environ.get("WANDB_MODE") or None
    if mode is None:
        return "online" if wandb_key_configured() else "offline"
    if mode == "dryrun":
        return "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"unknown W&B mode {mode!r}; allowed: {', '.join(WANDB_MODES)}")
    if mode == "online" and not wandb_key_configured():
        raise ValueError("logger.wandb.mode=online but no W&B API key is configured: run `wandb login` "
                         "or set WANDB_API_KEY, or give logger.wandb.mode=offline and `wandb sync` later")
    return mode


def wandb_host() -> tuple[str, int]:
    """(host, port) of the W&B server (``WANDB_BASE_URL``, default api.wandb.ai:443)."""
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_URL)
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def wandb_unreachable(timeout: float = WANDB_HOST_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the W&B host opens within ``timeout`` seconds, else why not. The name lookup
    runs in a daemon thread too, so a resolver that never answers cannot hold the run either."""
    host, port = wandb_host()
    outcome: dict[str, str] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = ""
        except OSError as error:
            outcome["error"] = str(error.strerror or error or type(error).__name__)

    probe = threading.Thread(target=connect, name="wandb-host-probe", daemon=True)
    probe.start()
    probe.join(timeout + 0.5)
    if "ok" in outcome:
        return None
    return f"{host}:{port} unreachable: {outcome.get('error') or f'no answer within {timeout:g} s'}"


def _warn_offline(reason: str, save_dir: str | Path) -> None:
    if rank_zero_only.rank == 0:
        folder = Path(save_dir) / "wandb"
        print(f"warning: W&B {reason}; logging offline to {folder} (upload later: wandb sync {folder})",
              file=sys.stderr, flush=True)


def wandb_key_refused() -> str | None:
    """None when the W&B host accepts the configured key (``wandb.login(verify=True)``: one request, no run), else
    what it answered."""
    import wandb

    try:
        wandb.login(verify=True)
    except Exception as error:  # noqa: BLE001 - wandb's auth/communication errors have no common public base
        return _first_line(error)
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def wandb_run_mode(mode: str | None, save_dir: str | Path) -> str:
    """``resolve_wandb_mode``, then offline (one ``warning:`` line) when online is asked for but the W&B host cannot
    be reached within ``WANDB_HOST_TIMEOUT_S`` or refuses the key: a run never waits for a network that is not
    there, and never fails later for a key that does not work."""
    resolved = resolve_wandb_mode(mode)
    if resolved == "online" and rank_zero_only.rank == 0:  # the other ranks never start a run: no probe
        problem = wandb_unreachable()
        if problem is None:
            refused = wandb_key_refused()
            problem = None if refused is None else f"could not start online ({refused})"
        if problem is not None:
            _warn_offline(problem, save_dir)
            resolved = "offline"
    return resolved


def check_wandb_dir(save_dir: str | Path) -> None:
    """A ValueError (one line) when W&B could not write its files under ``<save_dir>/wandb``."""
    folder = Path(save_dir) / "wandb"
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"logger.wandb.save_dir={save_dir}: cannot write W&B files into {folder} "
                         f"({error.strerror or error}); set logger.wandb.save_dir to a writable folder") from None


def new_run_id() -> str:
    """A W&B-style run id: 8 characters of [a-z0-9]."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def run_record(run_dir: str | Path, file: str = artifacts.WANDB_RUN_FILE, **identity: Any) -> dict[str, Any]:
    """The W&B run of ``run_dir``: ``<run_dir>/<file>`` (``wandb_run.json``) if it exists, else a new record
    (written by rank 0).

    ``identity`` (project, name, group, tags, job_type) fills a new record; a kept record keeps its own, so a resumed
    or requeued run keeps its name, group and tags whatever the continuing command line says. An explicit ``id``
    that differs from the kept one starts a new record with that id."""
    path = Path(run_dir) / file
    kept = artifacts.read_json(path)
    wanted = identity.pop("id", None)
    if kept and kept.get("id") and wanted in (None, kept["id"]):
        return kept
    record = {"id": wanted or new_run_id(), **identity, "logged": {}, "step": 0}
    if record.get("group") is None:  # a run of its own: its own group, which its evaluations join
        record["group"] = f"run-{record['id']}"
    if rank_zero_only.rank == 0:
        artifacts.write_json(path, record)
    return record


class RunFolderWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` for the run kept in ``record_path`` (``run_record``): ``id=record["id"]``,
    ``resume="allow"``; a key is never logged at a ``trainer/global_step`` it was already logged at (in this or an
    earlier segment of the run), and W&B's own step continues from the last segment's (offline it would restart).
    The record is rewritten (atomically) after each logged row, so a kill loses no mark."""

    def __init__(self, record_path: str | Path, record: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(id=record["id"], resume="allow", **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)  # wandb warns about the setting even when it is None
        self._record_path = Path(record_path)
        self._record = record

    @property
    @rank_zero_experiment
    def experiment(self):
        fresh = self._experiment is None
        run = super().experiment
        if fresh and int(self._record.get("step") or 0) > run.step:
            run.log({}, step=int(self._record["step"]))  # W&B's step counter continues from the last segment
        return run

    @override
    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        if step is not None:
            logged = self._record.setdefault("logged", {})
            metrics = {key: value for key, value in metrics.items() if step > logged.get(key, -1)}
            if not metrics:
                return
            logged.update(dict.fromkeys(metrics, int(step)))
        super().log_metrics(metrics, step)
        self._record["step"] = self.experiment.step
        artifacts.write_json(self._record_path, self._record)


def _fall_back_offline(error: BaseException, save_dir: str | Path) -> None:
    """After a failed online start: one ``warning:`` line, the attempt's service ended (it holds the run id; one this
    process did not start, inherited through ``WANDB_SERVICE``, is left and a new one started), offline from now on
    in this process."""
    import wandb

    _warn_offline(f"could not start online ({_first_line(error)})", save_dir)
    os.environ.pop("WANDB_SERVICE", None)
    wandb.teardown()
    os.environ["WANDB_MODE"] = "offline"


def start_wandb(logger: RunFolderWandbLogger, save_dir: str | Path) -> RunFolderWandbLogger:
    """Open the W&B run now, on rank 0: a key the host refuses (or any failure to start online) falls back to an
    offline run of the same id with one ``warning:`` line, instead of failing the run later."""
    if rank_zero_only.rank != 0 or logger._wandb_init.get("mode") != "online":
        return logger
    try:
        logger.experiment  # noqa: B018 - wandb.init
        return logger
    except Exception as error:  # noqa: BLE001 - wandb's auth/communication errors have no common public base
        _fall_back_offline(error, save_dir)
    logger._wandb_init["mode"] = "offline"
    logger._experiment = None
    return logger


def wandb_logger(project: str = "ddpm_lightning", save_dir: str = ".", name: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, mode: str | None = None,
                 log_model: bool = False, run_dir: str | None = None, job_type: str | None = "train",
                 id: str | None = None, **kwargs) -> RunFolderWandbLogger:  # noqa: A002 - wandb's name
    """Lightning's WandbLogger for the run kept in ``<run_dir>/wandb_run.json`` (default ``save_dir``), with the
    mode resolved as above. The key itself is never passed or logged."""
    check_wandb_dir(save_dir)
    resolved = wandb_run_mode(mode, save_dir)
    os.environ["WANDB_MODE"] = resolved  # wandb reads it in service processes too
    folder = Path(run_dir or save_dir)
    record = run_record(folder, id=id, project=project, name=name, group=group,
                        tags=list(tags or []) or None, job_type=job_type)
    logger = RunFolderWandbLogger(folder / artifacts.WANDB_RUN_FILE, record, project=record.get("project", project),
                                  save_dir=str(save_dir), name=record.get("name"), group=record.get("group"),
                                  tags=record.get("tags"), job_type=record.get("job_type"), mode=resolved,
                                  log_model=log_model, **kwargs)
    return start_wandb(logger, save_dir)


def wandb_run_info(loggers: list) -> dict[str, Any] | None:
    """The W&B run of ``loggers`` as ``summary.json`` records it (id, project, group, name, job type, mode, the
    folder ``wandb sync`` takes), or None; read from the kept record, so it never starts a run."""
    for logger in loggers:
        if isinstance(logger, RunFolderWandbLogger):
            record, init = logger._record, logger._wandb_init
            return {"id": record["id"], "project": init.get("project"), "group": init.get("group"),
                    "name": init.get("name"), "job_type": init.get("job_type"), "mode": init.get("mode"),
                    "dir": str(Path(init.get("dir") or ".") / "wandb"),
                    "record": str(logger._record_path)}
    return None


class KeptWandbRun:
    """A plain W&B run (``ddpm-eval``, ``ddpm-report``) kept like a training run's: its id in ``record_path``, so the
    same command into the same folder continues it; every ``log`` is one row at the next W&B step (offline too)."""

    def __init__(self, run: Any, record: dict[str, Any], record_path: Path) -> None:
        self.run, self.record, self.record_path = run, record, record_path

    @property
    def id(self) -> str:
        return self.record["id"]

    def log(self, data: dict[str, Any]) -> None:
        step = max(int(self.record.get("step") or 0), int(getattr(self.run, "step", 0) or 0))
        self.run.log(data, step=step)
        self.record["step"] = step + 1
        artifacts.write_json(self.record_path, self.record)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_wandb_run(save_dir: str | Path, *, record_file: str, project: str, name: str | None, group: str | None,
                   job_type: str, tags: list[str] | None = None, config: dict[str, Any] | None = None,
                   mode: str | None = None) -> KeptWandbRun:
    """Start (or continue: the id kept in ``<save_dir>/<record_file>``) a W&B run outside Lightning, with the same
    rules as ``wandb_logger``: offline unless a key is set and the host answers, one ``warning:`` line when online
    fails, one ``error:`` line (ValueError) when ``<save_dir>/wandb`` cannot be written."""
    import wandb

    check_wandb_dir(save_dir)
    resolved = wandb_run_mode(mode, save_dir)
    os.environ["WANDB_MODE"] = resolved
    record = run_record(save_dir, file=record_file, project=project, name=name, group=group,
                        tags=list(tags or []) or None, job_type=job_type)
    init = dict(id=record["id"], resume="allow", project=record.get("project", project), name=record.get("name"),
                group=record.get("group"), job_type=record.get("job_type"), tags=record.get("tags"),
                dir=str(save_dir), config=redact_secrets(config or {}), mode=resolved)
    try:
        run = wandb.init(**init)
    except Exception as error:  # noqa: BLE001 - wandb's auth/communication errors have no common public base
        if resolved != "online":
            raise
        _fall_back_offline(error, save_dir)
        run = wandb.init(**{**init, "mode": "offline"})
    return KeptWandbRun(run, record, Path(save_dir) / record_file)


def record_provenance(loggers: list, provenance: dict[str, Any]) -> None:
    """The ``provenance`` object into the config of every W&B run among ``loggers`` (rank 0)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_hyperparams({"provenance": provenance})


def build_loggers(cfg: DictConfig) -> list:
    """The configured loggers (``cfg.logger``), their arguments redacted (loggers upload them); W&B named, grouped
    and tagged by ``wandb_defaults``."""
    nodes = cfg.get("logger") or {}
    loggers = []
    for name, node in nodes.items():
        if node is None or "_target_" not in node:
            continue
        if name == "wandb":
            node = wandb_defaults(node, cfg)
        plain = OmegaConf.to_container(node, resolve=True)
        loggers.append(instantiate(redact_secrets(plain)))  # loggers upload their arguments
    return loggers


def wandb_defaults(node: DictConfig, cfg: DictConfig) -> DictConfig:
    """Name W&B runs by their overrides and group them by sweep, when Hydra is running."""
    node = node.copy()
    if not HydraConfig.initialized():
        return node
    hydra_cfg = HydraConfig.get()
    overrides = hydra_cfg.job.override_dirname
    with_flag = OmegaConf.to_container(node, resolve=True)
    if with_flag.get("name") is None:
        node.name = overrides or cfg.task_name
    multirun = hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
    if with_flag.get("group") is None and multirun:  # e.g. ablate_arch-2026-11-25_09-00-00
        sweep = Path(hydra_cfg.sweep.dir).name
        node.group = sweep if str(cfg.task_name) in sweep else f"{cfg.task_name}-{sweep}"
    # the config's tags plus the overrides (W&B allows 64 characters per tag)
    node.tags = list(dict.fromkeys(str(t)[:64] for t in [*(with_flag.get("tags") or []),
                                                          *hydra_cfg.overrides.task]))[:64]
    if with_flag.get("config") is None:  # filter / group runs by override in the W&B UI: overrides.<key>
        with open_dict(node):
            node.config = {"overrides": {k.lstrip("+~"): v for k, _, v in
                                         (o.partition("=") for o in hydra_cfg.overrides.task)}}
            node._convert_ = "all"  # wandb.init needs a plain dict
    return node


def finish_wandb(failed: bool = False) -> None:
    """End the W&B run: the next job of a sweep in this process starts its own (Lightning would reuse it)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
