"""Per-sample seeds: image i (noise, every later draw, random label) depends on (seed, i) only."""

import pytest
import torch
from torch import nn

from ddpm_lightning.config.schema import SampleConfig
from ddpm_lightning.diffusion import (
    GaussianDiffusion,
    PerSampleNoise,
    classifier_cond_fn,
    make_beta_schedule,
    sample_seed,
)
from ddpm_lightning.sampling import SAMPLE_METHODS, Guidance, sample_images

SHAPE = (1, 4, 4)


class LabelNet(nn.Module):
    """eps(x, t, y) = a x + b[y] + c t / T: elementwise, so each row is computed alone."""

    def __init__(self, num_labels: int = 5):
        super().__init__()
        self.b = nn.Parameter(torch.linspace(-0.5, 0.5, num_labels))

    def forward(self, x, t, y=None):
        out = 0.3 * x + 1e-4 * t.to(x.dtype).view(-1, 1, 1, 1)
        return out if y is None else out + self.b[y].view(-1, 1, 1, 1)


class BrightClassifier(nn.Module):
    def forward(self, x, t):
        bright = 4.0 * x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(bright), bright], dim=1)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(make_beta_schedule("linear", 100))


CLASSIFIER = Guidance(cond_fn=classifier_cond_fn(BrightClassifier(), 3.0))
# case: (sampler settings, guidance, the network's null label)
CASES = {
    "ddpm": ({"method": "ddpm", "steps": 8}, Guidance(), None),
    "ddim-eta0.5": ({"method": "ddim", "steps": 8, "eta": 0.5}, Guidance(), None),
    "ddim-classifier": ({"method": "ddim", "steps": 8}, CLASSIFIER, None),
    "ddpm-classifier": ({"method": "ddpm", "steps": 8}, CLASSIFIER, None),
    "ddpm-cfg": ({"method": "ddpm", "steps": 8}, Guidance(cfg_scale=2.0), 4),
    **{f"{m}-cfg": ({"method": m, "steps": 6, "schedule": "karras"}, Guidance(cfg_scale=1.5), 4)
       for m in SAMPLE_METHODS if m not in ("ddpm", "ddim")},
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_images_whatever_the_batch_size(diffusion, case):
    sampler, guidance, null_label = CASES[case]
    options = {"num_classes": 4 if "classifier" not in case else 2, "seed": 11, "guidance": guidance,
               "null_label": null_label}

    def settings(batch_size: int) -> SampleConfig:
        return SampleConfig(**sampler, clip_denoised=False, batch_size=batch_size)

    x3, y3 = sample_images(LabelNet(), diffusion, 8, SHAPE, settings(3), **options)
    x8, y8 = sample_images(LabelNet(), diffusion, 8, SHAPE, settings(8), **options)
    assert torch.equal(x3, x8) and torch.equal(y3, y8)
    assert len(set(y8.tolist())) > 1  # random labels, per sample
    x_other, _ = sample_images(LabelNet(), diffusion, 8, SHAPE, settings(8), **{**options, "seed": 12})
    assert not torch.equal(x8[0], x_other[0])


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpm++2m-sde"])
def test_first_index_splits_the_run(diffusion, method):
    options = {"num_classes": 4, "seed": 5}

    def settings(batch_size: int) -> SampleConfig:
        return SampleConfig(method=method, steps=6, eta=1.0, batch_size=batch_size)

    whole, labels = sample_images(LabelNet(), diffusion, 8, SHAPE, settings(4), **options)
    head, head_labels = sample_images(LabelNet(), diffusion, 5, SHAPE, settings(2), **options)
    tail, tail_labels = sample_images(LabelNet(), diffusion, 3, SHAPE, settings(8), first_index=5, **options)
    assert torch.equal(whole, torch.cat([head, tail]))
    assert torch.equal(labels, torch.cat([head_labels, tail_labels]))
    # a shard does not repeat the first samples
    assert not torch.equal(tail[0], whole[0])


def test_balanced_labels_follow_the_global_index(diffusion):
    _, labels = sample_images(LabelNet(), diffusion, 3, SHAPE, SampleConfig(steps=2), num_classes=4, y="balanced",
                              first_index=6)
    assert labels.tolist() == [2, 3, 0]


def test_bad_first_index(diffusion):
    with pytest.raises(ValueError, match="first_index must be an int >= 0"):
        sample_images(LabelNet(), diffusion, 2, SHAPE, SampleConfig(steps=2), first_index=-1)


def test_per_sample_noise_rows_depend_on_the_index_only():
    whole = PerSampleNoise(3, range(0, 6)).randn((6, 2, 3))
    part = PerSampleNoise(3, [4, 1]).randn((2, 2, 3))
    assert torch.equal(part[0], whole[4]) and torch.equal(part[1], whole[1])
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(PerSampleNoise(4, [0]).randn((1, 2, 3))[0], whole[0])
    like = PerSampleNoise(3, range(6)).randn_like(torch.zeros(6, 2, 3, dtype=torch.float64))
    assert like.dtype == torch.float64 and like.shape == (6, 2, 3)
    with pytest.raises(ValueError, match="number of samples 6"):
        PerSampleNoise(3, range(6)).randn((5, 2))


def test_sample_seed_formula():
    # distinct within a run for both streams; documented formula; the CPU generator's 32 bits
    seeds = {sample_seed(7, i, s) for i in range(1000) for s in (0, 1)}
    assert len(seeds) == 2000 and max(seeds) < 2 ** 32
    assert sample_seed(7, 10, 1) - sample_seed(7, 10, 0) == 1
    assert sample_seed(0, 0) != sample_seed(1, 0)
    with pytest.raises(ValueError, match="sample index"):
        sample_seed(0, -1)
