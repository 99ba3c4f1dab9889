"""sample_images: shapes, reproducibility, labels, classifier-free guidance algebra, bad input."""

import pytest
import torch
from torch import nn

from ddpm_lightning.config.schema import SampleConfig
from ddpm_lightning.diffusion import GaussianDiffusion, make_beta_schedule
from ddpm_lightning.sampling import ClassifierFreeGuidance, Guidance, sample_images, sampling_process


class LabelNet(nn.Module):
    """eps(x, t, y) = a * x + b[y]: cheap, deterministic, label-dependent."""

    def __init__(self, num_labels: int = 4, channels: int = 1, out_mult: int = 1):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3))
        self.b = nn.Parameter(torch.linspace(-1, 1, num_labels))
        self.out_mult = out_mult

    def forward(self, x, t, y=None):
        out = self.a * x + (0 if y is None else self.b[y].view(-1, 1, 1, 1))
        return torch.cat([out] * self.out_mult, dim=1)


@pytest.fixture
def diffusion():
    return GaussianDiffusion(make_beta_schedule("linear", 100))


@pytest.mark.parametrize("method,steps", [("ddim", 10), ("ddim", 7), ("ddpm", 5), ("ddpm", None), ("ddim", "ddim20")])
def test_shapes_range_and_reproducibility(diffusion, method, steps):
    net = LabelNet()
    settings = SampleConfig(method=method, steps=steps, batch_size=2)
    x1, y1 = sample_images(net, diffusion, 5, (1, 4, 4), settings, num_classes=4, seed=3)
    x2, y2 = sample_images(net, diffusion, 5, (1, 4, 4), settings, num_classes=4, seed=3)
    assert x1.shape == (5, 1, 4, 4) and y1.shape == (5,)
    assert x1.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(x1, x2)
    assert torch.equal(y1, y2)
    x3, _ = sample_images(net, diffusion, 5, (1, 4, 4), settings, num_classes=4, seed=4)
    assert not torch.allclose(x1, x3)


def test_sampling_process_respaces(diffusion):
    assert sampling_process(diffusion, SampleConfig(method="ddim", steps=10)).num_timesteps == 10
    # no exact stride: even spacing
    assert sampling_process(diffusion, SampleConfig(method="ddim", steps=7)).num_timesteps == 7
    assert sampling_process(diffusion, SampleConfig(method="ddpm", steps=None)).num_timesteps == 100
    with pytest.raises(ValueError, match="allowed: ddpm, ddim"):
        sampling_process(diffusion, SampleConfig(method="euler", steps=10))


def test_labels_options(diffusion):
    net = LabelNet()
    two = SampleConfig(steps=2)
    _, y = sample_images(net, diffusion, 8, (1, 2, 2), two, num_classes=4, y="balanced")
    assert y.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    _, y = sample_images(net, diffusion, 3, (1, 2, 2), two, num_classes=4, y=2)
    assert y.tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="out of range"):
        sample_images(net, diffusion, 3, (1, 2, 2), two, num_classes=4, y=4)
    with pytest.raises(ValueError, match="not class-conditional"):
        sample_images(net, diffusion, 3, (1, 2, 2), two, num_classes=None, y=1)
    with pytest.raises(ValueError, match="label dropout"):
        sample_images(net, diffusion, 3, (1, 2, 2), two, num_classes=4, guidance=Guidance(cfg_scale=1.0))


@pytest.mark.parametrize("out_mult", [1, 2])
def test_cfg_combines_conditional_and_null_predictions(out_mult):
    net = LabelNet(num_labels=5, out_mult=out_mult)  # label 4 is the null label
    guided = ClassifierFreeGuidance(net, scale=2.0, null_label=4, channels=1)
    x, t, y = torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2])
    cond, uncond = net(x, t, y=y), net(x, t, y=torch.full_like(y, 4))
    out = guided(x, t, y=y)
    torch.testing.assert_close(out[:, :1], 3.0 * cond[:, :1] - 2.0 * uncond[:, :1])
    if out_mult == 2:  # the variance half comes from the conditional pass
        torch.testing.assert_close(out[:, 1:], cond[:, 1:])


def test_cfg_scale_zero_equals_conditional_sampling(diffusion):
    net = LabelNet(num_labels=5)
    plain, _ = sample_images(net, diffusion, 4, (1, 2, 2), SampleConfig(steps=5), num_classes=4, seed=1)
    guided_model = ClassifierFreeGuidance(net, scale=0.0, null_label=4, channels=1)
    zero, _ = sample_images(guided_model, diffusion, 4, (1, 2, 2), SampleConfig(steps=5), num_classes=4, seed=1)
    torch.testing.assert_close(plain, zero)


def test_cond_fn_is_called_with_grad_enabled_even_in_inference_mode(diffusion):
    calls = []

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad((x_in ** 2).sum(), x_in)
        calls.append(t.clone())
        return -0.0 * grad

    with torch.inference_mode():
        x, _ = sample_images(LabelNet(), diffusion, 2, (1, 2, 2), SampleConfig(method="ddpm", steps=4),
                             num_classes=4, guidance=Guidance(cond_fn=cond_fn))
    assert len(calls) == 4 and x.shape == (2, 1, 2, 2)
    # the classifier sees original-process timesteps of the respaced process
    assert sorted({int(c[0]) for c in calls}) == sorted(
        sampling_process(diffusion, SampleConfig(method="ddpm", steps=4)).timestep_map.tolist())
