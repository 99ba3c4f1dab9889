"""EMA through AveragedModel (plain and warm-up decay), the W&B mode fallback and the loggers built from a config."""

import sys
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ddpm_lightning.loggers import build_loggers, finish_wandb, resolve_wandb_mode, wandb_key_configured
from ddpm_lightning.modules.ema import make_ema


def test_ema_matches_closed_form_without_warmup():
    net = nn.Linear(2, 1, bias=False)
    ema = make_ema(net, decay=0.9, warmup=False)
    w0 = net.weight.detach().clone()
    ema.update_parameters(net)  # first update copies
    torch.testing.assert_close(ema.module.weight, w0)
    expected = w0.clone()
    for _ in range(1, 4):
        with torch.no_grad():
            net.weight.add_(1.0)
        ema.update_parameters(net)
        expected = 0.9 * expected + 0.1 * net.weight.detach()
        torch.testing.assert_close(ema.module.weight, expected)
    assert not any(p.requires_grad for p in ema.parameters())


def test_ema_warmup_uses_short_horizon_first():
    net = nn.Linear(1, 1, bias=False)
    ema = make_ema(net, decay=0.9999, warmup=True)
    ema.update_parameters(net)
    expected = net.weight.detach().clone()
    for n in range(1, 4):
        with torch.no_grad():
            net.weight.fill_(float(n))
        ema.update_parameters(net)
        decay = min(0.9999, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * net.weight.detach()
        torch.testing.assert_close(ema.module.weight, expected)


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match=r"ema.decay must lie in \[0, 1\]"):
        make_ema(nn.Linear(1, 1), decay=1.5)


def test_wandb_mode_falls_back_offline_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_key_configured()
    assert resolve_wandb_mode(None) == "offline"
    with pytest.raises(ValueError, match="no W&B API key"):
        resolve_wandb_mode("online")
    with pytest.raises(ValueError, match="allowed: online, offline, disabled"):
        resolve_wandb_mode("sometimes")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == "disabled"


def test_loggers_get_their_arguments_with_secrets_redacted(monkeypatch):
    """Loggers upload their arguments: a secret-looking key or a secret environment value never reaches them."""
    key = "k" * 40
    monkeypatch.setenv("WANDB_API_KEY", key)
    cfg = OmegaConf.create({"logger": {
        "plain": {"_target_": "builtins.dict", "project": "p", "api_key": "abc", "notes": f"key={key}"},
        "off": None, "no_target": {"project": "q"}}})
    assert build_loggers(cfg) == [{"project": "p", "api_key": "<redacted>", "notes": "key=<redacted:WANDB_API_KEY>"}]


@pytest.mark.parametrize(("failed", "exit_code"), [(False, 0), (True, 1)])
def test_finish_wandb_ends_the_run_with_the_outcome(monkeypatch, failed, exit_code):
    finished = []
    fake = SimpleNamespace(run=object(), finish=lambda exit_code: finished.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    finish_wandb(failed=failed)
    assert finished == [exit_code]
    fake.run = None  # no run (W&B not configured): nothing to end
    finish_wandb(failed=failed)
    assert finished == [exit_code]


def test_tensorboard_logger_writes_events(tmp_path):
    from run_config import TINY, compose_run

    from ddpm_lightning.cli.train import train

    train(compose_run([*TINY, "logger=tensorboard"], tmp_path))
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
