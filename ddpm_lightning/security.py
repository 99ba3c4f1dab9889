"""What a run config may execute and what it may record.

* ``check_targets``: Hydra's ``instantiate`` imports and calls whatever a ``_target_`` names, so a config file
  or an override is code. Targets are limited to this package and the libraries it builds on unless the run
  opts out with ``allow_any_target=true``. (Hydra's own launcher/sweeper targets live in the ``hydra`` node,
  which the task config does not contain.)
* ``redact_secrets``: the resolved config is stored in checkpoints and ``summary.json``; values of secret-
  looking keys, and any string holding the value of a secret environment variable (``WANDB_API_KEY``, ...),
  are replaced before that happens.

No ``eval``/``exec`` of config strings happens anywhere: OmegaConf's resolvers (``oc.env``, ``oc.decode``, ...)
only read values and parse YAML.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

ALLOWED_TARGET_NAMESPACES: tuple[str, ...] = (
    "ddpm_lightning", "torch", "lightning", "torchvision", "torchmetrics", "hydra", "hydra_plugins",
)  # fmt: skip
SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)
MIN_SECRET_LENGTH = 8  # shorter env values ("1", "true") would redact harmless text


def target_allowed(target: str, namespaces: tuple[str, ...] = ALLOWED_TARGET_NAMESPACES) -> bool:
    """True when ``target`` is ``ns`` or ``ns.<anything>`` for one of ``namespaces``."""
    return any(target == ns or target.startswith(ns + ".") for ns in namespaces)


def iter_targets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, _target_ value)`` for every ``_target_`` in a config, interpolations followed."""
    if isinstance(node, DictConfig | ListConfig):
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            where = f"{path}[{key}]" if isinstance(node, ListConfig) else (f"{path}.{key}" if path else str(key))
            if OmegaConf.is_missing(node, key):
                continue
            if key == "_target_":
                yield path or "<root>", node[key]
                continue
            child = node._get_node(key)
            if OmegaConf.is_interpolation(node, key):
                try:  # e.g. ${oc.decode:...} can build a node; one that does not resolve is never instantiated
                    child = node[key]
                except Exception:
                    continue
            yield from iter_targets(child, where)
    elif isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_target_":
                yield path or "<root>", value
            else:
                yield from iter_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            yield from iter_targets(value, f"{path}[{index}]")


def check_targets(cfg: Any, allow_any: bool = False,
                  namespaces: tuple[str, ...] = ALLOWED_TARGET_NAMESPACES) -> None:
    """Raise ValueError for the first ``_target_`` outside ``namespaces`` (unless ``allow_any``)."""
    if allow_any:
        return
    for where, target in iter_targets(cfg):
        if not isinstance(target, str) or not target_allowed(target, namespaces):
            raise ValueError(f"{where}._target_ {target!r} is outside the allowed namespaces "
                             f"({', '.join(namespaces)}); set allow_any_target=true to allow it")


def secret_env_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{value: NAME}`` of environment variables whose name looks secret (``WANDB_API_KEY``, ``HF_TOKEN``)."""
    environ = os.environ if environ is None else environ
    return {value: name for name, value in environ.items()
            if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_LENGTH}


def redact_secrets(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of a plain config (dicts, lists, scalars) with secrets replaced by ``<redacted>`` markers."""
    secrets = secret_env_values(environ)

    def scrub(node: Any, key: str = "") -> Any:
        if isinstance(node, Mapping):
            return {k: scrub(v, str(k)) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return type(node)(scrub(v, key) for v in node)
        if isinstance(node, str):
            if key and SECRET_NAME.search(key) and node:
                return "<redacted>"
            for secret, name in secrets.items():
                if secret in node:
                    node = node.replace(secret, f"<redacted:{name}>")
        return node

    return scrub(value)
