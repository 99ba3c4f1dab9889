"""DiffusionModule trained for real (a Lightning Trainer, a few steps) with every loss x variance x target family:
a learned variance trains its head (hybrid, vlb) and is refused with L_simple; the loss-aware sampler's importance
weights reach the loss; x0 / eps / v targets train."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.modules import DiffusionModule

MODEL = {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
         "num_heads": 1, "dropout": 0.1}
IMAGES = torch.rand(32, 1, 8, 8) * 2 - 1
T = 50  # (linear schedule: beta_T = 0.02 x 1000 / T, degenerate at T = 20)


def _module(timestep_sampler: str = "uniform", **diffusion) -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(model=MODEL, diffusion={"num_timesteps": T, **diffusion}, optim={"lr": 1e-3},
                           ema={"decay": 0.9}, image_size=8, channels=1, timestep_sampler=timestep_sampler)


def _fit(module: DiffusionModule, steps: int = 3, callbacks: list | None = None) -> None:
    loader = DataLoader(TensorDataset(IMAGES, torch.zeros(len(IMAGES), dtype=torch.long)), batch_size=8)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=callbacks)
    trainer.fit(module, train_dataloaders=loader)


def _variance_rows(module: DiffusionModule) -> torch.Tensor:
    """The output-conv weights that produce the variance channels (the second half of 2C outputs)."""
    return module.net.out[-1].weight[1:].detach().clone()


@pytest.mark.parametrize("var_type,loss_type", [("learned_range", "hybrid"), ("learned", "hybrid"),
                                                ("learned_range", "vlb")])
def test_a_learned_variance_trains_its_head(var_type, loss_type):
    module = _module(var_type=var_type, loss_type=loss_type)
    before = _variance_rows(module)
    assert torch.count_nonzero(before) == 0  # ADM zero-initialises the output layer
    _fit(module)
    assert module.trainer.global_step == 3
    assert torch.count_nonzero(_variance_rows(module)) > 0  # the VB term reached the variance head


def test_simple_loss_with_a_learned_variance_is_refused_before_training():
    module = _module(var_type="learned_range", loss_type="simple")
    with pytest.raises(ValueError, match=r"loss_type=simple trains no variance head.*use diffusion.loss_type=hybrid"):
        _fit(module)
    assert module.trainer.global_step == 0


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_every_target_trains(mean_type):
    module = _module(mean_type=mean_type)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    _fit(module)
    after = module.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_vlb_with_the_loss_aware_sampler_applies_its_importance_weights():
    """After warm-up t is drawn non-uniformly and each example's loss is multiplied by 1 / (K p(t))."""
    module = _module("loss-second-moment", var_type="learned_range", loss_type="vlb")
    sampler = module.schedule_sampler
    steps = torch.arange(T).repeat_interleave(sampler.history_per_term)
    sampler.update_with_all_losses(steps, 1.0 + steps.double() ** 2)  # a warm history: large t weigh more
    assert sampler.warmed_up()
    seen: dict[str, list] = {"weights": [], "t": [], "losses": [], "returned": []}
    sample, training_losses = sampler.sample, module.diffusion.training_losses

    def record_sample(*args, **kwargs):
        t, weights = sample(*args, **kwargs)
        seen["t"].append(t)
        seen["weights"].append(weights)
        return t, weights

    def record_losses(*args, **kwargs):
        losses = training_losses(*args, **kwargs)
        seen["losses"].append(losses["loss"].detach())
        return losses

    class Returned(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["returned"].append(outputs["loss"].detach())

    sampler.sample, module.diffusion.training_losses = record_sample, record_losses
    probabilities = (sampler.weights() / sampler.weights().sum()).float()
    _fit(module, steps=2, callbacks=[Returned()])
    assert len(seen["returned"]) == 2
    t, weights, losses = seen["t"][0], seen["weights"][0], seen["losses"][0]
    assert not torch.allclose(weights, torch.ones_like(weights))  # non-uniform draws, non-trivial weights
    torch.testing.assert_close(weights, 1.0 / (T * probabilities[t]))
    for returned, weights, losses in zip(seen["returned"], seen["weights"], seen["losses"], strict=True):
        torch.testing.assert_close(returned, (losses * weights).mean())  # the weighted loss is what trains
    assert not torch.allclose(seen["returned"][0], seen["losses"][0].mean())
    assert int(sampler.loss_counts.sum()) == T * sampler.history_per_term  # the history kept learning
