"""Guidance after ADM on the one sampler: the guidance interval and scale schedules (``GuidanceSchedule``) for
classifier, classifier-free and autoguidance on every sampling method, and autoguidance's formula.

The invariants are bit-exact (``torch.equal``): an interval that holds no step the sampler visits gives the unguided
samples, the whole range [0, T-1] gives today's guided samples, and autoguidance by the model itself gives the
unguided samples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddpm_lightning.config.schema import GuidanceConfig, SampleConfig
from ddpm_lightning.diffusion import GaussianDiffusion, classifier_cond_fn, make_beta_schedule
from ddpm_lightning.diffusion.guidance_schedule import (
    GuidanceSchedule,
    check_autoguidance_compatible,
    interval_from_sigma,
    scheduled_cond_fn,
)
from ddpm_lightning.sampling import SAMPLE_METHODS, AutoGuidance, ClassifierFreeGuidance, Guidance, sample_images
from ddpm_lightning.sampling import sampling_process as respaced

T = 100
KINDS = ("classifier", "cfg", "autoguidance")


class GaussianEps(nn.Module):
    """Exact eps of data x_0 ~ N(0, s^2 I) at original steps t, plus a label offset (the last label is the null
    label of classifier-free guidance); a second ``s`` makes a worse model of the same task."""

    def __init__(self, diffusion: GaussianDiffusion, s: float = 0.5, num_labels: int = 3):
        super().__init__()
        self.register_buffer("alpha_bar", diffusion.alphas_cumprod.float())
        self.s = s
        self.offset = nn.Parameter(torch.linspace(-0.3, 0.3, num_labels))

    def forward(self, x, t, y=None):
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * x / (ab * self.s ** 2 + 1 - ab)
        return eps if y is None else eps + self.offset[y].view(-1, 1, 1, 1)


class BrightClassifier(nn.Module):
    """Two classes: the logit of class 1 is ``k * mean(x)``, class 0's is 0."""

    def forward(self, x, t):
        bright = 4.0 * x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(bright), bright], dim=1)


class Calls(nn.Module):
    """Records (original step, batch size) of every call of the wrapped network."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, **kwargs):
        self.calls.append((int(t[0]), x.shape[0]))
        return self.net(x, t, **kwargs)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(make_beta_schedule("cosine", T))


def _settings(method: str) -> SampleConfig:
    return SampleConfig(method=method, steps=8, batch_size=6, clip_denoised=method != "ddim", eta=0.0)


def _guidance(kind: str, diffusion, schedule: GuidanceSchedule | None, cond_fn=None) -> Guidance:
    if kind == "classifier":
        return Guidance(cond_fn=cond_fn or classifier_cond_fn(BrightClassifier(), 3.0), schedule=schedule)
    if kind == "cfg":
        return Guidance(cfg_scale=2.0, schedule=schedule)
    return Guidance(guiding_net=GaussianEps(diffusion, s=0.8), autoguidance_scale=2.5, schedule=schedule)


def _sample(net, diffusion, method, guidance):
    images, _ = sample_images(net, diffusion, 6, (1, 4, 4), _settings(method), guidance=guidance, num_classes=2,
                              null_label=2, y="random", seed=7, device="cpu")
    return images


def _outside_step(diffusion, method) -> int:
    """An original step that the method's respaced process never visits."""
    kept = set(respaced(diffusion, _settings(method)).timestep_map.tolist())
    return next(t for t in range(T) if t not in kept)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", SAMPLE_METHODS)
def test_empty_interval_is_unguided_and_full_interval_is_todays_guidance(diffusion, method, kind):
    net = GaussianEps(diffusion)
    unguided = _sample(net, diffusion, method, Guidance())
    today = _sample(net, diffusion, method, _guidance(kind, diffusion, None))
    assert not torch.equal(today, unguided)  # the guidance moves the samples: the invariants below can fail
    full = GuidanceSchedule(T, interval=(0, T - 1))
    assert torch.equal(_sample(net, diffusion, method, _guidance(kind, diffusion, full)), today)
    step = _outside_step(diffusion, method)
    empty = GuidanceSchedule(T, interval=(step, step))
    assert torch.equal(_sample(net, diffusion, method, _guidance(kind, diffusion, empty)), unguided)


@pytest.mark.parametrize("method", SAMPLE_METHODS)
def test_the_interval_guides_exactly_its_steps(diffusion, method):
    """Classifier-free guidance doubles the batch at the steps inside [lo, hi] only; the classifier is asked for a
    gradient at those steps only; the steps are the original ones of the respaced process."""
    kept = respaced(diffusion, _settings(method)).timestep_map.tolist()
    lo, hi = kept[2], kept[5]
    schedule = GuidanceSchedule(T, interval=(lo, hi))
    net = Calls(GaussianEps(diffusion))
    _sample(net, diffusion, method, Guidance(cfg_scale=2.0, schedule=schedule))
    assert sorted(t for t, n in net.calls if n == 12) == [t for t in kept if lo <= t <= hi]
    assert sorted(t for t, n in net.calls if n == 6) == [t for t in kept if not lo <= t <= hi]
    asked = []

    def recording(x, t, **kwargs):
        asked.append(int(t[0]))
        return classifier_cond_fn(BrightClassifier(), 3.0)(x, t, **kwargs)

    _sample(GaussianEps(diffusion), diffusion, method, _guidance("classifier", diffusion, schedule, recording))
    assert sorted(asked) == [t for t in kept if lo <= t <= hi]
    guiding = Calls(GaussianEps(diffusion, s=0.8))
    _sample(GaussianEps(diffusion), diffusion, method,
            Guidance(guiding_net=guiding, autoguidance_scale=2.0, schedule=schedule))
    assert sorted(t for t, _ in guiding.calls) == [t for t in kept if lo <= t <= hi]


@pytest.mark.parametrize("method", SAMPLE_METHODS)
def test_autoguidance_by_the_model_itself_is_unguided(diffusion, method):
    net = GaussianEps(diffusion)
    unguided = _sample(net, diffusion, method, Guidance())
    for scale in (0.0, 2.5, 7.0):
        itself = _sample(net, diffusion, method, Guidance(guiding_net=net, autoguidance_scale=scale))
        assert torch.equal(itself, unguided), scale
    worse = _sample(net, diffusion, method, _guidance("autoguidance", diffusion, None))
    assert not torch.equal(worse, unguided)


@pytest.mark.parametrize("schedule", [None, GuidanceSchedule(T, "linear"), GuidanceSchedule(T, "linear", (20, 70))])
def test_autoguidance_formula_against_float64(schedule):
    """eps_bad + w_t (eps_good - eps_bad) on the prediction channels with w_t = 1 + (w - 1) weight(t); the variance
    half is the good model's, untouched."""
    generator = torch.Generator().manual_seed(3)
    good_out, bad_out = (torch.randn(5, 6, 4, 4, generator=generator) for _ in range(2))
    t = torch.tensor([0, 20, 45, 70, 99])
    w = 2.25
    wrapper = AutoGuidance(lambda x, t, **kw: good_out, lambda x, t, **kw: bad_out, w, channels=3,
                           schedule=schedule)
    out = wrapper(torch.zeros(5, 3, 4, 4), t)
    weight = torch.ones(5, dtype=torch.float64) if schedule is None else schedule.weights(t)
    scale = (1.0 + (w - 1.0) * weight).view(-1, 1, 1, 1)
    good, bad = good_out.double()[:, :3], bad_out.double()[:, :3]
    torch.testing.assert_close(out[:, :3].double(), bad + scale * (good - bad), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, 3:], good_out[:, 3:])


def test_classifier_free_guidance_under_a_linear_schedule_against_float64():
    generator = torch.Generator().manual_seed(4)
    outputs = torch.randn(8, 1, 4, 4, generator=generator)  # 4 conditional rows, then 4 unconditional ones
    t = torch.tensor([0, 33, 66, 99])
    schedule = GuidanceSchedule(T, "linear")
    wrapper = ClassifierFreeGuidance(lambda x, t, y: outputs, 3.0, null_label=2, channels=1, schedule=schedule)
    out = wrapper(torch.zeros(4, 1, 4, 4), t, y=torch.zeros(4, dtype=torch.long))
    w = (3.0 * t.double() / (T - 1)).view(-1, 1, 1, 1)
    cond, uncond = outputs.double().chunk(2)
    torch.testing.assert_close(out.double(), (1 + w) * cond - w * uncond, rtol=1e-6, atol=1e-6)


def test_schedule_weights_and_strengths():
    t = torch.tensor([0, 10, 50, 99])
    assert GuidanceSchedule(T).weights(t).tolist() == [1, 1, 1, 1]
    assert GuidanceSchedule(T, "linear").weights(t).tolist() == pytest.approx([0, 10 / 99, 50 / 99, 1])
    assert GuidanceSchedule(T, interval=(10, 50)).weights(t).tolist() == [0, 1, 1, 0]
    assert GuidanceSchedule(T, "linear", (10, 50)).weights(t).tolist() == pytest.approx([0, 10 / 99, 50 / 99, 0])
    like = torch.zeros(4, 1, 2, 2)
    inside = GuidanceSchedule(T, interval=(10, 50))
    assert inside.strength(torch.tensor([20, 20, 20, 20]), 2.0, like) == 2.0  # the float itself: today's formula
    assert inside.strength(torch.tensor([60, 60, 60, 60]), 2.0, like) is None  # the unguided computation
    assert inside.strength(t, 2.0, like).flatten().tolist() == [0, 2, 2, 0]  # a mixed batch: per example
    assert inside.active_steps([5, 10, 50, 51]) == [False, True, True, False]
    cond_fn = scheduled_cond_fn(lambda x, t, **kw: torch.ones_like(x), GuidanceSchedule(T, "linear"))
    assert cond_fn(like, t).flatten(1)[:, 0].tolist() == pytest.approx([0, 10 / 99, 50 / 99, 1])
    assert scheduled_cond_fn(cond_fn, None) is cond_fn and scheduled_cond_fn(None, inside) is None


def test_network_calls_count_doubled_batches_and_classifier_gradients():
    steps = [90, 70, 50, 30, 10]
    band = GuidanceSchedule(T, interval=(30, 70))
    assert Guidance().network_calls(steps) == {"network_calls": 5, "classifier_gradients": 0}
    assert Guidance(cfg_scale=1.0).network_calls(steps) == {"network_calls": 10, "classifier_gradients": 0}
    assert Guidance(cfg_scale=1.0, schedule=band).network_calls(steps)["network_calls"] == 8
    net = nn.Identity()
    assert Guidance(guiding_net=net, autoguidance_scale=2.0, schedule=band).network_calls(steps)["network_calls"] == 8
    assert Guidance(guiding_net=net, autoguidance_scale=1.0).network_calls(steps)["network_calls"] == 5  # w=1: off
    assert Guidance(cond_fn=lambda *a, **k: None, schedule=band).network_calls(steps) == {
        "network_calls": 5, "classifier_gradients": 3}


def test_interval_from_sigma_is_the_band_of_steps_with_that_noise_level(diffusion):
    ab = diffusion.alphas_cumprod
    sigma = ((1 - ab) / ab).sqrt()
    lo, hi = interval_from_sigma(ab, 0.28, 5.42)  # Kynkaanniemi et al.'s EDM2 interval
    assert [t for t in range(T) if 0.28 <= float(sigma[t]) <= 5.42] == list(range(lo, hi + 1))
    with pytest.raises(ValueError, match=r"interval_sigma=\[10000, 20000\] holds no step of the model's 100-step"):
        interval_from_sigma(ab, 1e4, 2e4)


def test_autoguidance_compatibility_names_every_differing_field():
    info = {"image_size": 16, "channels": 1, "num_timesteps": 50, "schedule": "cosine", "mean_type": "v",
            "var_type": "fixed_small", "num_classes": 10}
    check_autoguidance_compatible(info, dict(info))
    with pytest.raises(ValueError, match=r"^early\.ckpt is a model of another task: num_timesteps=1000 \(the model: "
                                         r"50\), mean_type='eps' \(the model: 'v'\); autoguidance needs"):
        check_autoguidance_compatible(info, {**info, "num_timesteps": 1000, "mean_type": "eps"}, "early.ckpt")


@pytest.mark.parametrize("values,message", [
    ({"interval": [800, 200]}, r"guidance\.interval=\[800, 200\] is reversed: give \[lo, hi\] with lo <= hi"),
    ({"interval": [-1, 200]}, r"guidance\.interval=\[-1, 200\] starts below 0"),
    ({"interval": [0.5, 200]}, r"guidance\.interval must be \[lo, hi\], two integer timesteps"),
    ({"interval": "mid"}, r"guidance\.interval must be \[lo, hi\].*got 'mid'"),
    ({"interval_sigma": [5.4, 0.3]}, r"guidance\.interval_sigma=\[5\.4, 0\.3\] is reversed"),
    ({"interval": [1, 2], "interval_sigma": [0.3, 5.4]}, r"interval and guidance\.interval_sigma both set"),
    ({"autoguidance_scale": "strong", "autoguidance_ckpt": "a.ckpt"},
     r"guidance\.autoguidance_scale must be a number >= 0, got 'strong'"),
    ({"autoguidance_scale": 2.0}, r"autoguidance_scale=2 needs the guiding model: give guidance\.autoguidance_ckpt"),
    ({"autoguidance_scale": 2.0, "autoguidance_ckpt": "a.ckpt", "cfg_scale": 1.0},
     r"guidance\.cfg_scale=1 and guidance\.autoguidance_scale=2 both guide, and their combination is not defined"),
    ({"scale_schedule": "cosine"}, r"unknown guidance\.scale_schedule 'cosine'; allowed: constant, linear"),
])
def test_guidance_config_refuses_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        GuidanceConfig(**values)


def test_guidance_schedule_and_guidance_refuse_bad_values():
    with pytest.raises(ValueError, match=r"guidance\.interval=\[0, 100\] must lie within the model's steps 0\.\.99"):
        GuidanceSchedule(T, interval=(0, 100))
    with pytest.raises(ValueError, match="classifier-free guidance and autoguidance at once are not defined"):
        Guidance(cfg_scale=1.0, guiding_net=nn.Identity(), autoguidance_scale=2.0)
    assert GuidanceConfig(interval=(3, 9)).interval == [3, 9]
