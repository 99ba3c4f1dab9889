"""``experiment=ablate_shape`` (issue #38): every row composes, passes ddpm-train's checks, changes only the shape it
names (the batch rows with the LR scaled by the square root of the batch ratio), builds its network, and keeps the
default job's 10-minute wall-time budget."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from ddpm_lightning.config import CONFIG_DIR

ROWS = OmegaConf.load(f"{CONFIG_DIR}/experiment/ablate_shape.yaml").hydra.sweeper.params["+shape"].split(",")
CHANGES = {"baseline": {}, "width64": {"model.model_channels": 64}, "mult_1_2_3": {"model.channel_mult": [1, 2, 3]},
           "depth2": {"model.num_res_blocks": 2}, "attn_16_8": {"model.attention_resolutions": [16, 8]},
           "attn_none": {"model.attention_resolutions": []},
           "batch64": {"data.batch_size": 64, "optim.lr": 2.83e-3},
           "batch16": {"data.batch_size": 16, "optim.lr": 1.41e-3}}


def _flat(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def test_the_sweep_is_every_row_over_three_training_seeds():
    params = OmegaConf.load(f"{CONFIG_DIR}/experiment/ablate_shape.yaml").hydra.sweeper.params
    assert params["seed"] == "0,1,2" and ROWS[0] == "baseline" and sorted(ROWS) == sorted(CHANGES)


@pytest.mark.parametrize("row", ROWS)
def test_each_row_changes_only_its_shape_and_builds(composed, row):
    from ddpm_lightning.cli.validate import check_run
    from ddpm_lightning.modules.builders import build_unet

    base = composed(["experiment=default"])
    cfg = composed(["experiment=ablate_shape", f"+shape={row}"])
    check_run(cfg)
    keys = ("model", "data", "optim", "diffusion", "ema", "trainer", "sample")
    before = _flat({k: OmegaConf.to_container(base[k], resolve=True) for k in keys})
    after = _flat({k: OmegaConf.to_container(cfg[k], resolve=True) for k in keys})
    changed = {k: after[k] for k in after if after[k] != before.get(k)}
    assert changed == CHANGES[row]
    assert cfg.trainer.max_time == base.trainer.max_time == "00:00:10:00"  # the budget is wall time
    if "optim.lr" in changed:  # Adam's square-root rule for the batch size
        ratio = cfg.data.batch_size / base.data.batch_size
        assert cfg.optim.lr == pytest.approx(base.optim.lr * math.sqrt(ratio), rel=5e-3)
    net = build_unet(OmegaConf.to_container(cfg.model, resolve=True), image_size=32, channels=1, num_classes=10,
                     learn_sigma=False)
    params = sum(p.numel() for p in net.parameters())
    assert (params > 1.5e6) == (row in ("width64", "mult_1_2_3", "depth2")), (row, params)
