"""Classifier guidance: the cond_fn gradient, its effect on DDPM/DDIM samples, CFG + classifier, checks."""

import pytest
import torch
from torch import nn

from ddpm_lightning.config.schema import SampleConfig
from ddpm_lightning.diffusion import (
    GaussianDiffusion,
    IgnoreLabels,
    build_guidance,
    check_classifier_compatible,
    classifier_cond_fn,
    make_beta_schedule,
)
from ddpm_lightning.modules.guidance import guidance_info
from ddpm_lightning.sampling import (
    SAMPLE_METHODS,
    ClassifierFreeGuidance,
    Guidance,
    sample_images,
    sampling_process,
)

T = 100


class TinyClassifier(nn.Module):
    """logits = W2 tanh(W1 flatten(x) + w_t * t / T): a smooth float64 classifier for finite differences."""

    def __init__(self, dim: int, num_classes: int = 3):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(dim, 8, generator=generator, dtype=torch.float64))
        self.wt = nn.Parameter(torch.randn(8, generator=generator, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(8, num_classes, generator=generator, dtype=torch.float64))

    def forward(self, x, t):
        return torch.tanh(x.flatten(1) @ self.w1 + self.wt * (t.to(x.dtype)[:, None] / T)) @ self.w2


class BrightClassifier(nn.Module):
    """Two classes: logit of class 1 is ``k * mean(x)`` (bright images), class 0 has logit 0."""

    def __init__(self, k: float = 4.0):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))

    def forward(self, x, t):
        bright = self.k * x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(bright), bright], dim=1)


class GaussianEps(nn.Module):
    """Exact eps of data x_0 ~ N(0, s^2 I): sqrt(1 - ab) x_t / (ab s^2 + 1 - ab), at ORIGINAL steps t."""

    def __init__(self, diffusion: GaussianDiffusion, s: float = 0.5, num_labels: int | None = None):
        super().__init__()
        self.register_buffer("alpha_bar", diffusion.alphas_cumprod.float())
        self.s = s
        # label-dependent offsets, for classifier-free guidance tests (the null label is the last one)
        self.offset = None if num_labels is None else nn.Parameter(torch.linspace(-0.3, 0.3, num_labels))

    def forward(self, x, t, y=None):
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * x / (ab * self.s ** 2 + 1 - ab)
        if self.offset is not None:
            eps = eps + self.offset[y].view(-1, 1, 1, 1)
        return eps


@pytest.fixture
def diffusion():
    return GaussianDiffusion(make_beta_schedule("linear", T))


def _log_prob(classifier, x, t, y, scale):
    return scale * torch.log_softmax(classifier(x, t), dim=-1).gather(1, y[:, None]).sum()


def test_cond_fn_matches_finite_differences():
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t, y, scale = torch.tensor([0, 40, 99]), torch.tensor([2, 0, 1]), 2.5
    classifier = TinyClassifier(dim=4)
    grad = classifier_cond_fn(classifier, scale)(x, t, y=y)
    numeric = torch.zeros_like(x)
    h = 1e-6
    for index in range(x.numel()):
        step = torch.zeros(x.numel(), dtype=torch.float64)
        step[index] = h
        step = step.view_as(x)
        numeric.view(-1)[index] = (_log_prob(classifier, x + step, t, y, scale)
                                   - _log_prob(classifier, x - step, t, y, scale)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)
    assert all(p.grad is None for p in classifier.parameters())  # no side effect on the classifier


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_cond_fn_works_without_grad_mode(context):
    classifier = TinyClassifier(dim=4)
    cond_fn = classifier_cond_fn(classifier, 1.0)
    x, t, y = torch.ones(2, 1, 2, 2, dtype=torch.float64), torch.tensor([3, 4]), torch.tensor([0, 1])
    expected = cond_fn(x, t, y=y)
    with context():
        x, t, y = torch.ones(2, 1, 2, 2, dtype=torch.float64), torch.tensor([3, 4]), torch.tensor([0, 1])
        grad = cond_fn(x, t, y=y, unused_model_kwarg=1)
    torch.testing.assert_close(grad.clone(), expected)
    assert grad.abs().sum() > 0


def test_cond_fn_needs_labels():
    cond_fn = classifier_cond_fn(BrightClassifier(), 1.0)
    with pytest.raises(ValueError, match="needs class labels y"):
        cond_fn(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"y must have shape \[2\]"):
        cond_fn(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), y=torch.zeros(3, dtype=torch.long))


class Recorder:
    """Wraps a cond_fn and records the timesteps and labels it is called with."""

    def __init__(self, cond_fn):
        self.cond_fn, self.t, self.y = cond_fn, [], []

    def __call__(self, x, t, y=None, **kwargs):
        self.t.append(t.clone())
        self.y.append(y.clone())
        return self.cond_fn(x, t, y=y, **kwargs)


@pytest.mark.parametrize("method", SAMPLE_METHODS)
def test_guidance_moves_samples_towards_the_class(diffusion, method):
    """Same noise with and without guidance: y=1 (bright) raises every sample, y=0 lowers it."""
    net = IgnoreLabels(GaussianEps(diffusion))  # an unconditional model, guided by a 2-class classifier
    classifier = BrightClassifier()
    # SDE-DPM-Solver++(2M) at 10 steps extrapolates the wildly varying guided x_0 of the first steps
    # (sqrt(1 - ab) / sqrt(ab) * grad is ~150x the gradient at t=999) into a net shift near 0: 20 steps
    steps = 20 if method == "dpm++2m-sde" else 10
    settings = SampleConfig(method=method, steps=steps, batch_size=32, clip_denoised=False)
    options = {"num_classes": 2, "seed": 5, "device": "cpu"}
    plain, _ = sample_images(net, diffusion, 32, (1, 4, 4), settings, y=1, **options)
    recorder = Recorder(classifier_cond_fn(classifier, 5.0))
    bright, _ = sample_images(net, diffusion, 32, (1, 4, 4), settings, y=1, guidance=Guidance(cond_fn=recorder),
                              **options)
    dark, _ = sample_images(net, diffusion, 32, (1, 4, 4), settings, y=0,
                            guidance=Guidance(cond_fn=classifier_cond_fn(classifier, 5.0)), **options)
    shift_up = (bright - plain).mean(dim=(1, 2, 3))
    shift_down = (dark - plain).mean(dim=(1, 2, 3))
    assert (shift_up > 0).all() and (shift_down < 0).all()
    assert shift_up.mean() > 0.05 and shift_down.mean() < -0.05  # measured: DDPM 0.10, DDIM 0.4
    p_bright = {name: torch.softmax(classifier(x, torch.zeros(32, dtype=torch.long)), -1)[:, 1].mean()
                for name, x in (("plain", plain), ("guided", bright))}
    assert p_bright["guided"] > p_bright["plain"] + 0.05  # measured: 0.51 -> 0.61 (DDPM), 0.52 -> 0.85 (DDIM)
    # the respaced sampler hands the classifier ORIGINAL timesteps, every step, with the labels
    process = sampling_process(diffusion, settings)
    assert [int(t[0]) for t in recorder.t] == process.timestep_map.flip(0).tolist()
    assert all(torch.equal(y, torch.ones(32, dtype=torch.long)) for y in recorder.y)


def test_guidance_strength_grows_with_scale(diffusion):
    net = IgnoreLabels(GaussianEps(diffusion))
    settings = SampleConfig(method="ddim", steps=10, clip_denoised=False)
    options = {"num_classes": 2, "y": 1, "seed": 2, "device": "cpu"}
    means = [sample_images(net, diffusion, 16, (1, 4, 4), settings,
                           guidance=Guidance(cond_fn=build_guidance(BrightClassifier(), s)), **options)[0].mean()
             for s in (0.0, 1.0, 4.0)]
    assert means[0] < means[1] < means[2]


def test_classifier_and_classifier_free_guidance_combine(diffusion):
    """cfg_scale and cond_fn together: the classifier sees the real labels (not the doubled CFG batch),
    its push adds to CFG's, and w=0 CFG + classifier equals classifier guidance alone."""
    net = GaussianEps(diffusion, num_labels=3)  # classes 0, 1; null label 2
    classifier = BrightClassifier()
    settings = SampleConfig(method="ddim", steps=10, clip_denoised=False)
    options = {"num_classes": 2, "y": 1, "seed": 3, "device": "cpu"}
    cfg_only, _ = sample_images(net, diffusion, 16, (1, 4, 4), settings, guidance=Guidance(cfg_scale=2.0),
                                null_label=2, **options)
    recorder = Recorder(classifier_cond_fn(classifier, 3.0))
    both, labels = sample_images(net, diffusion, 16, (1, 4, 4), settings,
                                 guidance=Guidance(cond_fn=recorder, cfg_scale=2.0), null_label=2,
                                 **options)
    assert all(torch.equal(y, labels) for y in recorder.y)
    assert ((both - cfg_only).mean(dim=(1, 2, 3)) > 0).all()
    # CFG and classifier guidance compose: the wrapped model under cond_fn equals the cfg_scale path
    wrapped, _ = sample_images(ClassifierFreeGuidance(net, 2.0, null_label=2, channels=1), diffusion, 16,
                               (1, 4, 4), settings, guidance=Guidance(cond_fn=classifier_cond_fn(classifier, 3.0)),
                               **options)
    torch.testing.assert_close(both, wrapped)
    # w = 0 leaves classifier guidance alone
    zero_cfg, _ = sample_images(ClassifierFreeGuidance(net, 0.0, null_label=2, channels=1), diffusion, 16,
                                (1, 4, 4), settings, guidance=Guidance(cond_fn=classifier_cond_fn(classifier, 3.0)),
                                **options)
    classifier_only, _ = sample_images(net, diffusion, 16, (1, 4, 4), settings,
                                       guidance=Guidance(cond_fn=classifier_cond_fn(classifier, 3.0)), **options)
    torch.testing.assert_close(zero_cfg, classifier_only)


def test_guided_sampling_runs_under_inference_mode(diffusion):
    net = IgnoreLabels(GaussianEps(diffusion))
    cond_fn = classifier_cond_fn(BrightClassifier(), 2.0)
    with torch.inference_mode():
        x, _ = sample_images(net, diffusion, 4, (1, 4, 4), SampleConfig(method="ddpm", steps=5), num_classes=2, y=1,
                             device="cpu", guidance=Guidance(cond_fn=cond_fn))
    assert torch.isfinite(x).all()


# ---------------------------------------------------------------------- compatibility and validation
INFO = {"num_timesteps": 1000, "schedule": "cosine", "image_size": 32, "channels": 1, "num_classes": 10}


@pytest.mark.parametrize("change,message", [
    ({"num_timesteps": 4000},
     "classifier was trained for T=1000 cosine, the diffusion model uses T=4000 cosine: "
     "train a classifier for this diffusion model"),
    ({"schedule": "linear"}, "trained for T=1000 cosine, the diffusion model uses T=1000 linear"),
    ({"image_size": 64}, "trained on 32x32 images, the diffusion model generates 64x64"),
    ({"channels": 3}, "trained on 1-channel images, the diffusion model generates 3 channels"),
    ({"num_classes": 100}, "classifier has 10 classes, the diffusion model's data set has 100"),
])
def test_mismatches_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        check_classifier_compatible(INFO, {**INFO, **change})


def test_compatible_infos_pass():
    check_classifier_compatible(INFO, dict(INFO))
    check_classifier_compatible(INFO, {**INFO, "num_classes": None})  # unlabelled data: classes not compared
    with pytest.raises(ValueError, match="lacks"):
        check_classifier_compatible({"num_timesteps": 1000}, INFO)


def test_guidance_info_from_hparams():
    hparams = {"diffusion": {"schedule": "cosine", "num_timesteps": 1000, "mean_type": "eps"},
               "image_size": 32, "channels": 1, "num_classes": 10, "model": {}}
    assert guidance_info(hparams) == INFO
    assert guidance_info({"diffusion": {}, "image_size": 8, "channels": 3, "num_classes": None}) == {
        "num_timesteps": 1000, "schedule": "linear", "image_size": 8, "channels": 3, "num_classes": None}


def test_build_guidance_validates():
    assert build_guidance(None, 0.0) is None
    assert build_guidance(BrightClassifier(), 0.0) is None
    with pytest.raises(ValueError, match="needs a noisy classifier"):
        build_guidance(None, 1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        build_guidance(BrightClassifier(), -1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        build_guidance(BrightClassifier(), float("nan"))
    with pytest.raises(ValueError, match="T=1000 cosine, the diffusion model uses T=50 cosine"):
        build_guidance(BrightClassifier(), 1.0, classifier_info=INFO,
                       diffusion_info={**INFO, "num_timesteps": 50})
    with pytest.raises(ValueError, match="give both"):
        build_guidance(BrightClassifier(), 1.0, classifier_info=INFO)
    classifier = BrightClassifier().train()
    cond_fn = build_guidance(classifier, 2.0, classifier_info=INFO, diffusion_info=INFO)
    assert callable(cond_fn) and not classifier.training
