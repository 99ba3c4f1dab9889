"""ClassifierModule: trains a noisy classifier, logs quartile metrics, round-trips its checkpoint, guides."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.config.schema import SampleConfig
from ddpm_lightning.diffusion import (
    GaussianDiffusion,
    IgnoreLabels,
    build_guidance,
    make_beta_schedule,
    timestep_quartile,
)
from ddpm_lightning.modules.checkpoint import load_classifier_module, load_diffusion_module
from ddpm_lightning.modules.classifier_module import ClassifierModule
from ddpm_lightning.modules.guidance import guidance_info
from ddpm_lightning.sampling import Guidance, sample_images

T, SIZE, CLASSES = 100, 8, 4
CLASSIFIER = {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
              "num_head_channels": 32, "use_scale_shift_norm": True, "resblock_updown": True,
              "pool": "attention"}
DIFFUSION = {"schedule": "linear", "num_timesteps": T}


def quadrants(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark 8x8 images with one bright quadrant: the class (0..3) says which."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    x = -0.6 + 0.2 * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    half = SIZE // 2
    for k in range(CLASSES):
        row, col = divmod(k, 2)
        x[y == k, :, row * half:(row + 1) * half, col * half:(col + 1) * half] += 1.2
    return x.clamp(-1, 1), y


def make_module(**overrides) -> ClassifierModule:
    kwargs = {"classifier": CLASSIFIER, "diffusion": DIFFUSION, "optim": {"lr": 3e-3, "warmup_steps": 5},
              "ema": {"decay": 0.9, "warmup": True}, "image_size": SIZE, "channels": 1,
              "num_classes": CLASSES}
    return ClassifierModule(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """30 AdamW steps on 512 quadrant images (about 10 s on a free CPU core)."""
    folder = tmp_path_factory.mktemp("classifier")
    pl.seed_everything(0, verbose=False)
    train_loader = DataLoader(TensorDataset(*quadrants(512, seed=0)), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(*quadrants(128, seed=1)), batch_size=64)
    module = make_module(run_config={"objective": "classifier"})
    checkpoint = ModelCheckpoint(dirpath=folder, filename="best", monitor="val/acc", mode="max")
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", logger=False, callbacks=[checkpoint],
                         enable_progress_bar=False, enable_model_summary=False, val_check_interval=30,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, train_loader, val_loader)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return module.eval(), metrics, checkpoint.best_model_path


def test_accuracy_beats_chance_at_small_t_and_falls_with_t(trained):
    module, metrics, _ = trained
    x, y = quadrants(256, seed=2)  # held out
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(0, T // 4, (x.shape[0],), generator=generator)
    x_t = module.diffusion.q_sample(x, t, noise=torch.randn(x.shape, generator=generator))
    with torch.no_grad():
        accuracy = (module(x_t, t).argmax(-1) == y).float().mean()
    assert accuracy > 0.8  # chance: 0.25; measured 1.0 after 30 steps
    quartiles = [metrics[f"val/acc_q{q}"] for q in range(4)]  # measured [1.0, 0.81, 0.44, 0.34]
    assert quartiles[0] > 0.8 and quartiles[0] > quartiles[3]
    assert quartiles[0] >= quartiles[1] >= quartiles[3]


def test_metrics_are_logged(trained):
    _, metrics, _ = trained
    for stage, names in (("train", ("loss", "acc")), ("val", ("acc",))):
        for name in names:
            for q in range(4):
                assert f"{stage}/{name}_q{q}" in metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in metrics
    assert metrics["train/loss_q0"] < metrics["train/loss_q3"]


def test_checkpoint_loads_weights_only_and_rebuilds_identical_logits(trained):
    module, _, path = trained
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["diffusion"] == DIFFUSION
    assert raw["guidance_info"] == {"num_timesteps": T, "schedule": "linear", "image_size": SIZE,
                                    "channels": 1, "num_classes": CLASSES}
    assert raw["run_config"] == {"objective": "classifier"}
    assert "rng_states" in raw  # exact resume
    loaded = load_classifier_module(path)
    assert loaded.guidance_info == module.guidance_info == guidance_info(raw["hyper_parameters"])
    assert loaded.classifier_net is loaded.ema.module
    x, _ = quadrants(8, seed=3)
    t = torch.arange(8) * 12
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), module(x, t), rtol=0, atol=0)
        torch.testing.assert_close(loaded.net(x, t), module.net(x, t), rtol=0, atol=0)


def test_trained_classifier_guides_samples_to_its_class(trained):
    """An analytic eps model of N(-0.2, 0.5^2) pixels guided by the trained classifier towards class 3."""
    module, _, _ = trained
    diffusion = GaussianDiffusion(make_beta_schedule("linear", T))
    alpha_bar = diffusion.alphas_cumprod.float()

    def eps_model(x, t):
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        mean, var = -0.2, 0.25
        return (1 - ab).sqrt() * (x - ab.sqrt() * mean) / (ab * var + 1 - ab)

    net = IgnoreLabels(eps_model)
    cond_fn = build_guidance(module.classifier_net, 10.0, classifier_info=module.guidance_info,
                             diffusion_info=module.guidance_info)
    settings = SampleConfig(method="ddim", steps=10)
    options = {"num_classes": CLASSES, "y": 3, "seed": 0, "device": "cpu"}
    plain, _ = sample_images(net, diffusion, 32, (1, SIZE, SIZE), settings, **options)
    guided, _ = sample_images(net, diffusion, 32, (1, SIZE, SIZE), settings, guidance=Guidance(cond_fn=cond_fn),
                              **options)
    t0 = torch.zeros(32, dtype=torch.long)
    with torch.no_grad():
        p_plain = module(plain, t0).softmax(-1)[:, 3].mean()
        p_guided = module(guided, t0).softmax(-1)[:, 3].mean()
    assert p_guided > p_plain + 0.2  # measured: 0.30 -> 0.80
    with pytest.raises(ValueError, match="T=100 linear, the diffusion model uses T=1000 cosine"):
        build_guidance(module.classifier_net, 1.0, classifier_info=module.guidance_info,
                       diffusion_info={**module.guidance_info, "num_timesteps": 1000, "schedule": "cosine"})


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classifier_module(tmp_path / "missing.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_classifier_module(corrupt)
    diffusion_ckpt = tmp_path / "diffusion.ckpt"
    torch.save({"hyper_parameters": {"model": {}, "diffusion": DIFFUSION, "image_size": 8}, "state_dict": {}},
               diffusion_ckpt)
    with pytest.raises(ValueError, match="is a diffusion model checkpoint, not a noisy classifier"):
        load_classifier_module(diffusion_ckpt)
    empty = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {}}, empty)
    with pytest.raises(ValueError, match="not a ddpm_lightning checkpoint"):
        load_classifier_module(empty)


def test_diffusion_loader_refuses_a_classifier_checkpoint(trained):
    _, _, path = trained
    with pytest.raises(ValueError, match="is it a classifier"):
        load_diffusion_module(path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="labelled data set"):
        make_module(num_classes=None)
    with pytest.raises(ValueError, match=r"max_t must lie in \[1, 100\]"):
        make_module(max_t=101)
    with pytest.raises(ValueError, match="unknown classifier keys \\['width'\\]; allowed: model_channels"):
        make_module(classifier={**CLASSIFIER, "width": 3})
    with pytest.raises(ValueError, match="optim.lr must be > 0"):
        make_module(optim={"lr": 0.0})
    with pytest.raises(ValueError, match=r"noisy classifier keeps one EMA: set ema.posthoc_sigma_rels=\[\]"):
        make_module(ema={"decay": 0.999, "posthoc_sigma_rels": [0.05]})


@pytest.mark.parametrize("ema", [None, {"decay": 0.0}])
def test_ema_off(ema):
    module = make_module(ema=ema)
    assert module.ema is None and module.classifier_net is module.net


def test_training_draws_come_from_the_rank_and_step_stream(monkeypatch):
    """t, the noise (and dropout) of a training step depend on (seed, rank, epoch, batch) only: under DDP every rank
    draws its own (they were all the global RNG's, seeded alike on every rank), and a resume repeats them."""
    from types import SimpleNamespace

    module = make_module(ema=None)
    seen = []

    def record(diffusion, net, x, y, t, noise=None):
        seen.append((t.clone(), noise.clone()))
        return {"loss": torch.zeros(len(t), requires_grad=True), "correct": torch.zeros(len(t))}

    import ddpm_lightning.modules.classifier_module as classifier_module

    monkeypatch.setattr(classifier_module, "noisy_classifier_losses", record)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    x, y = quadrants(16, 0)

    def draws(rank: int, batch_idx: int, epoch: int = 0, global_seed: int = 0):
        module._trainer = SimpleNamespace(global_rank=rank, current_epoch=epoch)
        torch.manual_seed(global_seed)  # the global RNG's state must not matter
        module.training_step((x, y), batch_idx)
        return seen[-1]

    def same(a, b):
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    first = draws(0, 3)
    assert same(first, draws(0, 3, global_seed=99))
    for other in (draws(1, 3), draws(0, 4), draws(0, 3, epoch=1)):
        assert not torch.equal(other[1], first[1])
    module.train_seed += 1  # another run seed, other draws
    assert not torch.equal(draws(0, 3)[1], first[1])


def test_max_t_and_validation_timesteps():
    module = make_module(max_t=40, ema=None)
    assert module.max_t == 40 and module.diffusion.num_timesteps == T
    t = module.validation_timesteps(64, torch.Generator().manual_seed(1), "cpu")
    assert int(t.min()) >= 0 and int(t.max()) < 40
    assert torch.equal(timestep_quartile(t, module.max_t), torch.arange(64) % 4)  # stratified: i in quartile i % 4
    assert torch.equal(t, module.validation_timesteps(64, torch.Generator().manual_seed(1), "cpu"))
    respaced = make_module(diffusion={**DIFFUSION, "timestep_respacing": "10"})
    assert respaced.diffusion.num_timesteps == T  # the classifier always learns every original step


# ---------------------------------------------------------------------- ddpm-train objective=classifier
CLI_TINY = ["experiment=classifier_default", "debug=fast", "data=digits", "data.image_size=8",
            "data.batch_size=8", "data.limit=64", "classifier.channel_mult=[1,2]",
            "classifier.attention_resolutions=[4]", "diffusion.num_timesteps=50", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "logger=csv"]


def test_train_cli_objective_classifier_writes_a_loadable_checkpoint(tmp_path):
    from run_config import compose_run

    from ddpm_lightning.cli.train import train

    cfg = compose_run(CLI_TINY, tmp_path)
    assert cfg.objective == "classifier" and cfg.callbacks.model_checkpoint.monitor == "val/acc"
    metrics = train(cfg)
    assert {"val/acc", "val/acc_q0", "train/acc_q3"} <= set(metrics)
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert checkpoints and not list(tmp_path.glob("samples/*.png"))  # no sample grid for a classifier
    module = load_classifier_module(tmp_path / "checkpoints" / "last.ckpt")
    assert module.guidance_info == {"num_timesteps": 50, "schedule": "cosine", "image_size": 8, "channels": 1,
                                    "num_classes": 10}
    assert module.run_config["objective"] == "classifier" and module.run_config["task_name"] == "classifier"
    # the experiment's optimizer (ADM's classifier: AdamW, lr 3e-4, weight decay 0.05) is the one that trained
    group = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"]
    assert (group[0]["initial_lr"], group[0]["weight_decay"]) == (3.0e-4, 0.05)


def test_a_resumed_classifier_run_equals_an_uninterrupted_one(tmp_path):
    from run_config import compose_run

    from ddpm_lightning.cli.train import train

    steps = ["trainer.max_steps=4", "trainer.val_check_interval=2"]
    train(compose_run([*CLI_TINY, *steps], tmp_path / "whole"))
    train(compose_run([*CLI_TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"], tmp_path / "cut"))
    train(compose_run([*CLI_TINY, *steps, "resume=auto"], tmp_path / "cut"))
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert whole["global_step"] == resumed["global_step"] == 4
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_train_cli_rejects_unknown_objective(tmp_path):
    from run_config import compose_run

    from ddpm_lightning.cli.train import build_module
    from ddpm_lightning.data import DigitsDataModule

    cfg = compose_run([*CLI_TINY, "objective=denoiser"], tmp_path)
    with pytest.raises(ValueError, match="objective='denoiser'; allowed: diffusion, classifier"):
        build_module(cfg, DigitsDataModule(image_size=8, limit=16))


def test_the_noisy_classifier_loss_is_cross_entropy_on_q_sample():
    from ddpm_lightning.diffusion import noisy_classifier_losses

    module = make_module(ema=None)
    x, y = quadrants(8, 1)
    t = torch.tensor([0, 10, 20, 30, 40, 49, 5, 25])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    out = noisy_classifier_losses(module.diffusion, module.net, x, y, t, noise=noise)
    ab = torch.tensor(module.diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1).float()
    logits = module.net(ab.sqrt() * x + (1 - ab).sqrt() * noise, t)  # q(x_t | x_0) by hand
    torch.testing.assert_close(out["loss"], torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    assert torch.equal(out["correct"], (logits.argmax(1) == y).float())
