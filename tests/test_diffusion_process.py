"""Forward process, posterior, p_mean_variance and guidance against float64 references from the papers."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from processes import build
from reference import Ref

from ddpm_lightning.diffusion import (
    LOSS_TYPES,
    MEAN_TYPES,
    VAR_TYPES,
    GaussianDiffusion,
    make_beta_schedule,
    space_timesteps,
)

SHAPE = (4, 3, 4, 4)


def make_output(var_type, x, gen, scale=1.0):
    pred = torch.randn(x.shape, generator=gen, dtype=torch.float64) * scale
    if var_type == "learned":
        return torch.cat([pred, torch.randn(x.shape, generator=gen, dtype=torch.float64) - 4.0], 1)
    if var_type == "learned_range":
        return torch.cat([pred, torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1], 1)
    return pred


NAMES = ["linear100", "cosine1000-ddim10", "linear1000-25"]  # from processes.PROCESSES


def with_ref(process, **kwargs):
    """The process and its float64 reference."""
    built = build(process, **kwargs)
    return built.diffusion, built.ref


class Spy:
    """A model returning a fixed output and recording the timesteps it is given."""

    def __init__(self, output):
        self.output, self.seen = output, []

    def __call__(self, x, t, **kwargs):
        self.seen.append(t.clone())
        self.kwargs = kwargs
        return self.output.to(x.dtype)


# ----------------------------------------------------------------------------- q(x_t | x_0)
def test_q_sample_empirical_moments():
    diffusion, ref = with_ref("linear100")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.9, -0.5, 0.0, 0.3], dtype=torch.float64).reshape(4, 1, 1, 1).expand(4, 1, 200, 200)
    t = torch.tensor([0, 10, 50, 99])
    x_t = diffusion.q_sample(x0.contiguous(), t, generator=gen)
    n = 200 * 200
    ab = ref.ab[t]
    emp_mean, emp_var = x_t.flatten(1).mean(1), x_t.flatten(1).var(1)
    exp_mean, exp_var = ab.sqrt() * x0[:, 0, 0, 0], 1 - ab
    assert ((emp_mean - exp_mean).abs() < 5 * (exp_var / n).sqrt()).all()
    assert ((emp_var / exp_var - 1).abs() < 5 * math.sqrt(2 / n)).all()


def test_q_sample_with_noise_and_mean_variance():
    diffusion, ref = with_ref("cosine1000-ddim10")
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(SHAPE, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 7, 9])
    ab = Ref.col(ref.ab, t)
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise=noise),
                               ab.sqrt() * x0 + (1 - ab).sqrt() * noise, rtol=1e-12, atol=1e-12)
    mean, var, logvar = diffusion.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, ab.sqrt() * x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, (1 - ab).expand_as(x0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logvar, (1 - ab).log().expand_as(x0), rtol=1e-12, atol=1e-12)


def test_v_target_and_inversions():
    diffusion, ref = with_ref("linear1000-25")
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(SHAPE, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 5, 12, 24])
    ab = Ref.col(ref.ab, t)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    torch.testing.assert_close(diffusion.get_v(x0, eps, t), v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diffusion.predict_xstart_from_v(x_t, t, v), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(diffusion.predict_xstart_from_eps(x_t, t, eps), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(x_t, t, x0), eps, rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------- posterior = Bayes' rule
def bayes_posterior(ab_t, ab_prev, x0, x_t):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of two Gaussians in x_{t-1}."""
    alpha = ab_t / ab_prev
    beta = 1 - alpha
    # q(x_t|x_{t-1}) = N(x_t; sqrt(alpha) x_{t-1}, beta): as a function of x_{t-1}, precision alpha/beta.
    prec_lik, mean_lik = alpha / beta, x_t / math.sqrt(alpha)
    prec_prior, mean_prior = 1 / (1 - ab_prev), math.sqrt(ab_prev) * x0
    var = 1 / (prec_lik + prec_prior)
    return var * (prec_lik * mean_lik + prec_prior * mean_prior), var


@given(T=st.integers(3, 300), data=st.data(), name=st.sampled_from(["linear", "cosine"]),
       respaced=st.booleans())
def test_posterior_is_bayes_rule(T, data, name, respaced):
    if name == "linear":
        T = max(T, 50)  # the linear schedule is only a valid process (betas < 1) from T > 20
    betas = make_beta_schedule(name, T)
    keep = data.draw(st.sets(st.integers(0, T - 1), min_size=2, max_size=20)) if respaced else None
    diffusion = GaussianDiffusion(betas, use_timesteps=keep)
    kept = sorted(keep) if respaced else list(range(T))
    k = data.draw(st.integers(1, len(kept) - 1))
    ab_full = np.cumprod(1 - betas.numpy())
    ab_t, ab_prev = ab_full[kept[k]], ab_full[kept[k - 1]]
    x0 = torch.tensor(data.draw(st.lists(st.floats(-1, 1), min_size=3, max_size=3)), dtype=torch.float64)
    x_t = torch.tensor(data.draw(st.lists(st.floats(-3, 3), min_size=3, max_size=3)), dtype=torch.float64)
    mean, var, logvar = diffusion.q_posterior_mean_variance(x0[None], x_t[None], torch.tensor([k]))
    ref_mean, ref_var = bayes_posterior(ab_t, ab_prev, x0.numpy(), x_t.numpy())
    np.testing.assert_allclose(mean[0].numpy(), ref_mean, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(var[0].numpy(), np.full(3, ref_var), rtol=1e-7)
    if k >= 1:
        np.testing.assert_allclose(logvar[0].numpy(), np.full(3, math.log(ref_var)), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 17, 49])
def test_posterior_by_numerical_normalisation(k):
    """Normalise q(x_t|x_{t-1}) q(x_{t-1}|x_0) on a grid and read off its mean and variance."""
    betas = make_beta_schedule("linear", 50)
    diffusion = GaussianDiffusion(betas)
    b = betas.numpy()
    ab = np.cumprod(1 - b)
    x0, x_t = 0.7, -0.4
    ab_prev = ab[k - 1]
    grid = np.linspace(-4, 4, 400001)
    log_p = (-(x_t - math.sqrt(1 - b[k]) * grid) ** 2 / (2 * b[k])
             - (grid - math.sqrt(ab_prev) * x0) ** 2 / (2 * (1 - ab_prev)))
    w = np.exp(log_p - log_p.max())
    w /= w.sum()
    num_mean = (w * grid).sum()
    num_var = (w * (grid - num_mean) ** 2).sum()
    mean, var, _ = diffusion.q_posterior_mean_variance(torch.tensor([[x0]], dtype=torch.float64),
                                                       torch.tensor([[x_t]], dtype=torch.float64),
                                                       torch.tensor([k]))
    assert mean.item() == pytest.approx(num_mean, abs=1e-6)
    assert var.item() == pytest.approx(num_var, rel=1e-4)


def test_posterior_at_t0_is_x0():
    diffusion = build("cosine1000-ddim10").diffusion
    x0 = torch.rand(2, 3, dtype=torch.float64)
    x_t = torch.randn(2, 3, dtype=torch.float64)
    mean, var, logvar = diffusion.q_posterior_mean_variance(x0, x_t, torch.tensor([0, 0]))
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert bool((var == 0).all())
    # clipped log-variance at t=0 is the t=1 value
    _, var1, _ = diffusion.q_posterior_mean_variance(x0, x_t, torch.tensor([1, 1]))
    torch.testing.assert_close(logvar, var1.log(), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- p_mean_variance
@pytest.mark.parametrize("process", NAMES)
@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_p_mean_variance_matches_reference(process, var_type, mean_type, dtype):
    diffusion, ref = with_ref(process, mean_type=mean_type, var_type=var_type)
    gen = torch.Generator().manual_seed(3)
    K = diffusion.num_timesteps
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, K // 2, K - 1])
    out = make_output(var_type, x, gen, scale=0.7)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for clip in (False, True):
        model = Spy(out)
        got = diffusion.p_mean_variance(model, x.to(dtype), t, clip_denoised=clip)
        want = ref.p_mean_variance(mean_type, var_type, out.to(dtype), x.to(dtype), t, clip)
        assert set(got) == {"mean", "variance", "log_variance", "pred_xstart"}
        for key in want:
            assert got[key].dtype == dtype and got[key].shape == x.shape, key
            torch.testing.assert_close(got[key].double(), want[key], **tol, msg=lambda m, k=key: f"{k}: {m}")
        # the model sees the ORIGINAL steps
        assert model.seen[0].tolist() == [ref.kept[i] for i in t.tolist()]
        if clip:
            assert got["pred_xstart"].abs().max() <= 1.0


def test_learned_range_interpolates_between_posterior_and_beta():
    diffusion, ref = with_ref("linear1000-25", var_type="learned_range")
    x = torch.zeros(3, 2, 1, 1, dtype=torch.float64)
    t = torch.tensor([0, 7, 24])
    for v, frac in ((-1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (0.5, 0.75)):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)
        got = diffusion.p_mean_variance(Spy(out), x, t)["log_variance"][:, 0, 0, 0]
        lo, hi = ref.post_logvar[t], ref.beta[t].log()
        torch.testing.assert_close(got, frac * hi + (1 - frac) * lo, rtol=1e-12, atol=1e-12)
    assert bool((ref.beta[1:].log() > ref.post_logvar[1:]).all())  # max really is beta, min beta-tilde


def test_fixed_variances_at_t0_use_t1_posterior():
    for var_type in ("fixed_small", "fixed_large"):
        diffusion, ref = with_ref("linear100", var_type=var_type)
        x = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
        out = diffusion.p_mean_variance(Spy(torch.zeros_like(x)), x, torch.tensor([0, 1]))
        expected_t1 = ref.post_var[1] if var_type == "fixed_small" else ref.beta[1]
        assert out["log_variance"][0].item() == pytest.approx(ref.post_var[1].log().item(), rel=1e-12)
        assert out["log_variance"][1].item() == pytest.approx(expected_t1.log().item(), rel=1e-12)
        # fixed_large: beta-tilde_1 at t=0; fixed_small keeps OpenAI's unclipped variance beta-tilde_0 = 0
        expected_var0 = 0.0 if var_type == "fixed_small" else ref.post_var[1].item()
        assert out["variance"][0].item() == pytest.approx(expected_var0, rel=1e-12, abs=0)
        assert out["variance"][1].item() == pytest.approx(expected_t1.item(), rel=1e-12)


def test_clip_denoised_clips_x0_prediction():
    diffusion, ref = with_ref("linear100", mean_type="x0")
    x = torch.zeros(SHAPE, dtype=torch.float64)
    out = torch.linspace(-3, 3, x.numel(), dtype=torch.float64).reshape(SHAPE)
    t = torch.tensor([3, 3, 3, 3])
    clipped = diffusion.p_mean_variance(Spy(out), x, t, clip_denoised=True)
    raw = diffusion.p_mean_variance(Spy(out), x, t, clip_denoised=False)
    torch.testing.assert_close(clipped["pred_xstart"], out.clamp(-1, 1))
    torch.testing.assert_close(raw["pred_xstart"], out)
    torch.testing.assert_close(clipped["mean"], Ref.col(ref.coef_x0, t) * out.clamp(-1, 1))


# ----------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("process", ["linear100", "cosine1000-ddim10"])
def test_condition_mean_and_score(process):
    diffusion, ref = with_ref(process, var_type="fixed_large")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 2, 5, diffusion.num_timesteps - 1])
    out = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    grad = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    seen = []

    def cond_fn(x_, t_, y=None):
        seen.append((t_.clone(), y))
        return grad

    pmv = diffusion.p_mean_variance(Spy(out), x, t, clip_denoised=False)
    want = ref.p_mean_variance("eps", "fixed_large", out, x, t, clip=False)
    got_mean = diffusion.condition_mean(cond_fn, pmv, x, t, model_kwargs={"y": 7})
    torch.testing.assert_close(got_mean, want["mean"] + want["variance"] * grad, rtol=1e-10, atol=1e-10)

    got = diffusion.condition_score(cond_fn, pmv, x, t, model_kwargs={"y": 7})
    ab = Ref.col(ref.ab, t)
    eps = (x - ab.sqrt() * want["pred_xstart"]) / (1 - ab).sqrt()
    eps_guided = eps - (1 - ab).sqrt() * grad
    x0_guided = (x - (1 - ab).sqrt() * eps_guided) / ab.sqrt()
    torch.testing.assert_close(got["pred_xstart"], x0_guided, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got["mean"], Ref.col(ref.coef_x0, t) * x0_guided + Ref.col(ref.coef_xt, t) * x,
                               rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got["variance"], want["variance"])
    original = [ref.kept[i] for i in t.tolist()]
    assert [s[0].tolist() for s in seen] == [original, original] and all(s[1] == 7 for s in seen)


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs,match", [
    ({"mean_type": "epsilon"}, "eps, x0, v"),
    ({"var_type": "fixed"}, "fixed_small, fixed_large, learned, learned_range"),
    ({"loss_type": "mse"}, "simple, hybrid, vlb"),
])
def test_unknown_types_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianDiffusion(make_beta_schedule("linear", 100), **kwargs)


def test_type_tuples_are_the_spec():
    assert MEAN_TYPES == ("eps", "x0", "v")
    assert set(VAR_TYPES) == {"fixed_small", "fixed_large", "learned", "learned_range"}
    assert set(LOSS_TYPES) == {"simple", "hybrid", "vlb"}


@pytest.mark.parametrize("var_type,channels,match", [
    ("learned", 3, r"2\*C = 6"), ("learned_range", 5, r"2\*C = 6"), ("fixed_small", 6, "C = 3")])
def test_wrong_channel_count_raises(var_type, channels, match):
    diffusion = build("linear100", var_type=var_type).diffusion
    x = torch.zeros(2, 3, 2, 2)
    out = torch.zeros(2, channels, 2, 2)
    with pytest.raises(ValueError, match=match):
        diffusion.p_mean_variance(Spy(out), x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=match):
        diffusion.training_losses(Spy(out), x, torch.tensor([1, 2]))


@pytest.mark.parametrize("t", [[0, 100], [-1, 3], [25, 5]])
def test_t_out_of_range_raises(t):
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 100),
                                  use_timesteps=space_timesteps(100, "25") if t == [25, 5] else None)
    K = diffusion.num_timesteps
    x = torch.zeros(2, 3, 2, 2)
    with pytest.raises(ValueError, match=rf"\[0, {K - 1}\]"):
        diffusion.q_sample(x, torch.tensor(t))
    with pytest.raises(ValueError, match=rf"\[0, {K - 1}\]"):
        diffusion.p_mean_variance(Spy(torch.zeros_like(x)), x, torch.tensor(t))
    with pytest.raises(ValueError, match=rf"\[0, {K - 1}\]"):
        diffusion.training_losses(Spy(torch.zeros_like(x)), x, torch.tensor(t))


def test_bad_t_tensors_raise():
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 100))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="integer"):
        diffusion.q_sample(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="length 2"):
        diffusion.q_sample(x, torch.tensor([1, 2, 3]))


def test_wrong_noise_shape_raises():
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 100))
    x = torch.zeros(2, 3, 2, 2)
    bad = torch.zeros(2, 3, 2, 1)
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.q_sample(x, torch.tensor([1, 2]), noise=bad)
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.training_losses(Spy(torch.zeros_like(x)), x, torch.tensor([1, 2]), noise=bad)


@pytest.mark.parametrize("betas,match", [
    ([0.1], "at least 2"), ([0.1, 1.5], r"\(0, 1\]"), ([0.0, 0.1], r"\(0, 1\]"), ([[0.1, 0.2]], "1-D")])
def test_bad_betas_raise(betas, match):
    with pytest.raises(ValueError, match=match):
        GaussianDiffusion(torch.tensor(betas, dtype=torch.float64))


def test_negative_hybrid_lambda_raises():
    with pytest.raises(ValueError, match="hybrid_lambda"):
        GaussianDiffusion(make_beta_schedule("linear", 100), hybrid_lambda=-1.0)
