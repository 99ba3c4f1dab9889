"""Security: pickle-requiring checkpoints and .npz files are refused without running their code, ``_target_``
is limited to known namespaces, and API keys never reach the run folder."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from run_config import TINY, compose_run

from ddpm_lightning.cli.errors import run_cli
from ddpm_lightning.cli.train import train
from ddpm_lightning.data.sources import load_npz
from ddpm_lightning.modules.checkpoint import find_resume_checkpoint, load_checkpoint_dict, load_diffusion_module
from ddpm_lightning.security import check_targets, iter_targets, redact_secrets, target_allowed

FAKE_KEY = "f" * 8 + "0123456789abcdef0123456789abcdef"  # 40 characters, the length of a W&B key
assert len(FAKE_KEY) == 40


class Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------------ malicious pickles
def test_checkpoint_with_arbitrary_pickles_is_refused_without_running_them(tmp_path, capsys):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "payload": Payload(marker)}, path)
    for load in (load_checkpoint_dict, load_diffusion_module):
        with pytest.raises(ValueError, match=r"evil\.ckpt needs arbitrary pickled objects, which are refused for "
                                             r"safety \(weights_only=True\): .*unsupported GLOBAL (posix|nt)\.system"):
            load(path)
    cfg = compose_run([*TINY, f"ckpt_path={path}"], tmp_path / "run")
    with pytest.raises(SystemExit):
        run_cli(train, cfg)
    assert "refused for safety" in capsys.readouterr().err
    assert not marker.exists()


def test_resume_auto_skips_a_malicious_checkpoint(tmp_path):
    marker, folder = tmp_path / "pwned", tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"state_dict": {"w": torch.ones(1)}, "global_step": 2}, folder / "periodic-step0000002.ckpt")
    torch.save({"state_dict": {}, "global_step": 9, "payload": Payload(marker)}, folder / "last.ckpt")
    path, checkpoint = find_resume_checkpoint(folder)
    assert path.name == "periodic-step0000002.ckpt" and checkpoint["global_step"] == 2
    assert not marker.exists()


def test_npz_with_pickled_objects_is_refused(tmp_path, capsys):
    marker, path = tmp_path / "pwned", tmp_path / "evil.npz"
    np.savez(path, np.array([Payload(marker)], dtype=object))
    with pytest.raises(ValueError, match=r"evil\.npz holds pickled Python objects, which are refused"):
        load_npz(path)
    cfg = compose_run([*[o for o in TINY if not o.startswith("data")], "data=npz", f"data.path={path}"],
                      tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, cfg)
    assert exit_info.value.code == 2 and "pickled Python objects, which are refused" in capsys.readouterr().err
    assert not marker.exists()


# -------------------------------------------------------------------------------------------- _target_
def test_target_outside_the_allowed_namespaces_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = compose_run([*TINY, "+callbacks.evil._target_=os.system", f"+callbacks.evil.command='touch {marker}'"],
                      tmp_path / "run")
    expected = ("callbacks.evil._target_ 'os.system' is outside the allowed namespaces (ddpm_lightning, torch, "
                "lightning, torchvision, torchmetrics, hydra, hydra_plugins); set allow_any_target=true to allow it")
    with pytest.raises(ValueError, match=re.escape(expected)):
        train(cfg)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, cfg)
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == f"error: {expected}"
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_target_rules():
    assert target_allowed("torch.optim.AdamW") and target_allowed("lightning.pytorch.Trainer")
    assert target_allowed("ddpm_lightning.data.DigitsDataModule") and target_allowed("torch")
    for bad in ("torchx.evil", "lightning_evil.x", "os.system", "builtins.eval", "subprocess.run", ""):
        assert not target_allowed(bad), bad
    cfg = OmegaConf.create({
        "a": {"_target_": "torch.nn.Identity"},
        "b": [{"_target_": "builtins.exec", "_args_": ["print(1)"]}],
        "c": "${oc.decode:'{_target_: os.system, _args_: [ls]}'}",  # a node built by a resolver is walked too
        "d": "${a}",
        "missing": "???",
    })
    assert [t for _, t in iter_targets(cfg)] == ["torch.nn.Identity", "builtins.exec", "os.system", "torch.nn.Identity"]
    with pytest.raises(ValueError, match=r"b\[0\]\._target_ 'builtins\.exec' is outside"):
        check_targets(cfg)
    check_targets(cfg, allow_any=True)


# ---------------------------------------------------------------------------------------------- secrets
def test_api_key_never_reaches_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # the key even pulled into the config on purpose (tags) must be redacted where the config is stored
    cfg = compose_run([*TINY, "logger=many", "trainer.max_steps=2", "trainer.val_check_interval=2",
                       "tags=[${oc.env:WANDB_API_KEY}]"], tmp_path / "run")
    train(cfg)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".ckpt" for p in files)
    leaks = [str(p) for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks, leaks
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["run_config"]["tags"] == ["<redacted:WANDB_API_KEY>"]


def test_redact_secrets():
    environ = {"WANDB_API_KEY": FAKE_KEY, "HF_TOKEN": "hf_abcdefghijk", "DEBUG": "1", "PATH": "/usr/bin"}
    config = {"logger": {"api_key": "anything", "project": "p"}, "tags": [f"k={FAKE_KEY}", "1"],
              "paths": {"root": "/usr/bin"}, "n": 3}
    assert redact_secrets(config, environ) == {
        "logger": {"api_key": "<redacted>", "project": "p"}, "tags": ["k=<redacted:WANDB_API_KEY>", "1"],
        "paths": {"root": "/usr/bin"}, "n": 3}
