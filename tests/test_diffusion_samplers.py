"""Ancestral and DDIM samplers (exact oracles, the DDIM update, guidance) and the timestep samplers."""

import math

import numpy as np
import pytest
import torch
from processes import build

from ddpm_lightning.diffusion import (
    MEAN_TYPES,
    LossAwareSampler,
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)

SHAPE = (2, 3, 4, 4)
NAMES = ["linear100", "linear1000-ddim10", "cosine1000-25"]  # from processes.PROCESSES


def with_alpha_bar(process, **kwargs):
    """The process, the ORIGINAL alpha-bar (float64) and the kept original steps in order."""
    built = build(process, **kwargs)
    return built.diffusion, built.alpha_bar, built.kept


def col(values):
    return values.reshape(-1, 1, 1, 1)


def oracle(mean_type, x_star, ab_orig, learned_var=False, log=None):
    """Exact denoiser for the one-point data set {x_star}; uses the ORIGINAL step the model is given."""

    def model(x, t):
        if log is not None:
            log.append(t.clone())
        ab, x64, star = col(ab_orig[t]), x.double(), x_star.double()  # exact in float64, then cast
        eps = (x64 - ab.sqrt() * star) / (1 - ab).sqrt()
        v = ab.sqrt() * eps - (1 - ab).sqrt() * star
        out = {"eps": eps, "x0": star.expand_as(x64), "v": v}[mean_type].to(x.dtype)
        return torch.cat([out, torch.zeros_like(out)], 1) if learned_var else out

    return model


def x_star_point(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.rand((1, *SHAPE[1:]), generator=gen, dtype=torch.float64) * 1.8 - 0.9).to(dtype)


# ----------------------------------------------------------------------------- exact oracles
@pytest.mark.parametrize("process", NAMES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("sampler", ["fixed_small", "fixed_large", "learned_range", "ddim0", "ddim1"])
def test_samplers_recover_the_single_data_point(process, mean_type, sampler):
    var_type = sampler if not sampler.startswith("ddim") else "fixed_small"
    diffusion, ab_orig, kept = with_alpha_bar(process, mean_type=mean_type, var_type=var_type)
    x_star = x_star_point()
    seen = []
    model = oracle(mean_type, x_star, ab_orig, learned_var=var_type == "learned_range", log=seen)
    gen = torch.Generator().manual_seed(1)
    if sampler.startswith("ddim"):
        sample = diffusion.ddim_sample_loop(model, SHAPE, eta=float(sampler[-1]), generator=gen)
    else:
        sample = diffusion.p_sample_loop(model, SHAPE, generator=gen)
    assert sample.shape == SHAPE and sample.dtype == torch.float32
    torch.testing.assert_close(sample, x_star.expand(SHAPE), rtol=0, atol=2e-5)
    assert [s[0].item() for s in seen] == list(reversed(kept))  # original steps, K-1 down to 0


def test_wrong_oracle_does_not_recover():
    """Sanity check that the oracle test can fail: alphas of the respaced process given to the oracle."""
    diffusion, ab_orig, kept = with_alpha_bar("linear1000-ddim10")
    x_star = x_star_point()
    wrong_ab = torch.zeros_like(ab_orig)
    wrong_ab[torch.tensor(kept)] = diffusion.alphas_cumprod[torch.arange(len(kept))].flip(0)
    sample = diffusion.ddim_sample_loop(oracle("eps", x_star, wrong_ab), SHAPE,
                                        generator=torch.Generator().manual_seed(1))
    assert (sample - x_star).abs().max() > 1e-2


# ----------------------------------------------------------------------------- DDIM update
def ddim_reference(mean_type, out, x, ab, ab_prev, eta, noise, clip, t_is_zero):
    """DDIM paper eq. 12 in float64."""
    out, x, noise = out.double(), x.double(), noise.double()
    x0 = {"eps": lambda: (x - (1 - ab).sqrt() * out) / ab.sqrt(), "x0": lambda: out,
          "v": lambda: ab.sqrt() * x - (1 - ab).sqrt() * out}[mean_type]()
    if clip:
        x0 = x0.clamp(-1, 1)
    eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
    direction = (1 - ab_prev - sigma**2).sqrt() * eps
    return ab_prev.sqrt() * x0 + direction + (0 if t_is_zero else sigma * noise)


@pytest.mark.parametrize("process", NAMES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_paper_formula(process, mean_type, eta):
    diffusion, ab_orig, kept = with_alpha_bar(process, mean_type=mean_type)
    K = diffusion.num_timesteps
    gen = torch.Generator().manual_seed(2)
    for k in (0, 1, K // 2, K - 1):
        ab = ab_orig[kept[k]]
        ab_prev = ab_orig[kept[k - 1]] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
        x = torch.randn(SHAPE, generator=gen)
        out = torch.randn(SHAPE, generator=gen)
        noise = torch.randn(SHAPE, generator=gen)
        t = torch.full((SHAPE[0],), k)
        for clip in (True, False):
            got = diffusion.ddim_sample(lambda x_, t_, o=out: o, x, t, clip_denoised=clip, eta=eta,
                                        noise=noise)
            want = ddim_reference(mean_type, out, x, ab, ab_prev, eta, noise, clip, k == 0)
            assert got["sample"].dtype == torch.float32
            torch.testing.assert_close(got["sample"].double(), want, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, k=k: f"step {k}: {m}")
            got64 = diffusion.ddim_sample(lambda x_, t_, o=out: o.double(), x.double(), t, clip_denoised=clip,
                                          eta=eta, noise=noise.double())
            torch.testing.assert_close(got64["sample"], want, rtol=1e-5, atol=1e-5)
        if k == 0:  # no noise at t=0: the sample is the (clipped) x0 prediction
            torch.testing.assert_close(got["sample"], got["pred_xstart"], rtol=0, atol=1e-6)


def test_ddim_eta0_deterministic_and_differs_from_eta1():
    diffusion = build("linear1000-ddim10").diffusion

    def model(x, t):
        return 0.5 * x + 0.01 * t.float().view(-1, 1, 1, 1) / 1000

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))

    def run(eta, seed, x_T=noise):
        return diffusion.ddim_sample_loop(model, SHAPE, eta=eta, noise=x_T.clone(),
                                          generator=torch.Generator().manual_seed(seed))

    a, b = run(0.0, 4), run(0.0, 5)
    assert torch.equal(a, b)  # eta = 0: the initial noise alone fixes the sample
    c, d, e = run(1.0, 4), run(1.0, 5), run(1.0, 4)
    assert (a - c).abs().max() > 1e-2 and (c - d).abs().max() > 1e-2
    assert torch.equal(c, e)
    assert not torch.equal(a, run(0.0, 4, x_T=noise + 0.1))


def test_p_sample_loop_reproducible_with_generator():
    diffusion = build("linear1000-ddim10", var_type="fixed_large").diffusion

    def model(x, t):
        return 0.3 * x

    runs = [diffusion.p_sample_loop(model, SHAPE, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_ddim_negative_eta_and_bad_noise_shape():
    diffusion = build("linear1000-ddim10").diffusion
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="eta"):
        diffusion.ddim_sample(lambda x_, t_: x_, x, torch.zeros(2, dtype=torch.long), eta=-0.1)
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.p_sample_loop(lambda x_, t_: x_, SHAPE, noise=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.ddim_sample_loop(lambda x_, t_: x_, SHAPE, noise=torch.zeros(2, 3, 4))


# ----------------------------------------------------------------------------- ancestral step
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_p_sample_adds_no_noise_at_t0(var_type):
    diffusion = build("cosine1000-25", var_type=var_type).diffusion
    gen = torch.Generator().manual_seed(9)
    c = 6 if var_type.startswith("learned") else 3
    out = torch.rand((2, c, 4, 4), generator=gen, dtype=torch.float64) * 2 - 1
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64) * 10

    def model(x_, t_):
        return out

    t0 = torch.zeros(2, dtype=torch.long)
    step = diffusion.p_sample(model, x, t0, noise=noise)
    pmv = diffusion.p_mean_variance(model, x, t0)
    assert torch.equal(step["sample"], pmv["mean"])
    t5 = torch.tensor([5, 24])
    step = diffusion.p_sample(model, x, t5, noise=noise)
    pmv = diffusion.p_mean_variance(model, x, t5)
    torch.testing.assert_close(step["sample"], pmv["mean"] + (0.5 * pmv["log_variance"]).exp() * noise,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step["pred_xstart"], pmv["pred_xstart"])


# ----------------------------------------------------------------------------- guidance in the samplers
def test_p_sample_with_cond_fn_shifts_mean_by_variance_times_grad():
    diffusion, _, kept = with_alpha_bar("linear1000-ddim10", var_type="fixed_large")
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    out = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    grad = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    seen = []

    def cond_fn(x_, t_, **kw):
        seen.append(t_.clone())
        return grad

    for t in (torch.tensor([0, 0]), torch.tensor([4, 9])):
        pmv = diffusion.p_mean_variance(lambda x_, t_: out, x, t)
        step = diffusion.p_sample(lambda x_, t_: out, x, t, cond_fn=cond_fn, noise=noise)
        nonzero = (t != 0).double().view(-1, 1, 1, 1)
        expected = pmv["mean"] + pmv["variance"] * grad + nonzero * (0.5 * pmv["log_variance"]).exp() * noise
        torch.testing.assert_close(step["sample"], expected, rtol=1e-12, atol=1e-12)
        assert seen[-1].tolist() == [kept[i] for i in t.tolist()]


def test_ddim_with_cond_fn_uses_score_correction():
    diffusion, ab_orig, kept = with_alpha_bar("cosine1000-25")
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    out = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    grad = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    k = 13
    t = torch.full((2,), k)
    ab, ab_prev = ab_orig[kept[k]], ab_orig[kept[k - 1]]
    seen = []

    def cond_fn(x_, t_):
        seen.append(t_.clone())
        return grad

    got = diffusion.ddim_sample(lambda x_, t_: out, x, t, clip_denoised=False, cond_fn=cond_fn)
    eps_guided = out - (1 - ab).sqrt() * grad  # Dhariwal & Nichol, Algorithm 2
    x0_guided = (x - (1 - ab).sqrt() * eps_guided) / ab.sqrt()
    want = ab_prev.sqrt() * x0_guided + (1 - ab_prev).sqrt() * eps_guided
    torch.testing.assert_close(got["sample"], want, rtol=1e-9, atol=1e-9)
    assert seen[0].tolist() == [kept[k]] * 2


def test_sample_loops_pass_original_timesteps_to_cond_fn():
    diffusion, _, kept = with_alpha_bar("linear1000-ddim10", var_type="fixed_large")
    seen = []

    def cond_fn(x, t, y=None):
        seen.append((t[0].item(), y))
        return torch.zeros_like(x)

    def model(x, t, y=None):
        return 0.1 * x

    diffusion.p_sample_loop(model, SHAPE, cond_fn=cond_fn, model_kwargs={"y": 3})
    assert seen == [(s, 3) for s in reversed(kept)]
    seen.clear()
    diffusion.ddim_sample_loop(model, SHAPE, cond_fn=cond_fn, model_kwargs={"y": 3})
    assert seen == [(s, 3) for s in reversed(kept)]


def test_progressive_yields_every_step():
    diffusion = build("linear1000-ddim10").diffusion
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(12))
    steps = list(diffusion.ddim_sample_loop_progressive(lambda x, t: 0.2 * x, SHAPE, noise=noise))
    assert len(steps) == 10
    final = diffusion.ddim_sample_loop(lambda x, t: 0.2 * x, SHAPE, noise=noise)
    assert torch.equal(steps[-1]["sample"], final)


# ----------------------------------------------------------------------------- timestep samplers
def test_uniform_sampler():
    sampler = UniformSampler(50)
    assert torch.equal(sampler.weights(), torch.ones(50, dtype=torch.float64))
    t, w = sampler.sample(4000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4000,) and t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) < 50
    assert torch.equal(w, torch.ones(4000))
    assert len(torch.unique(t)) == 50


def fill(sampler, losses_per_t, repeats):
    K = sampler.num_timesteps
    for _ in range(repeats):
        sampler.update_with_all_losses(torch.arange(K), torch.as_tensor(losses_per_t, dtype=torch.float32))


def test_loss_second_moment_uniform_before_warmup():
    sampler = LossSecondMomentResampler(6)
    fill(sampler, [1, 2, 3, 4, 5, 6], 9)
    sampler.update_with_all_losses(torch.arange(5), torch.ones(5))  # t=5 still has only 9 losses
    assert not sampler.warmed_up()
    assert torch.equal(sampler.weights(), torch.ones(6, dtype=torch.float64))
    _, w = sampler.sample(100, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, torch.ones(100))


def test_loss_second_moment_after_warmup():
    K = 5
    sampler = LossSecondMomentResampler(K, uniform_prob=0.0)
    gen = torch.Generator().manual_seed(1)
    history = [[] for _ in range(K)]
    for _ in range(13):  # more than 10 per step: only the last 10 count
        ts = torch.randperm(K, generator=gen)
        losses = torch.rand(K, generator=gen, dtype=torch.float64) * (ts.double() + 1)
        sampler.update_with_all_losses(ts, losses)
        for t_, loss in zip(ts.tolist(), losses.tolist(), strict=True):
            history[t_].append(loss)
    assert sampler.warmed_up()
    rms = np.array([math.sqrt(np.mean(np.square(h[-10:]))) for h in history])
    p = rms / rms.sum()
    w = sampler.weights()
    np.testing.assert_allclose((w / w.sum()).numpy(), p, rtol=1e-9)
    t, iw = sampler.sample(20000, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(iw.numpy(), 1 / (K * p[t.numpy()]), rtol=1e-6)
    freq = np.bincount(t.numpy(), minlength=K) / 20000
    assert np.abs(freq - p).max() < 0.02
    # E_t~p[weight * f(t)] = mean_t f(t): the importance weights unbias the uniform average
    assert abs((iw.double() * (t.double() + 1)).mean().item() - 3.0) < 0.1


def test_loss_second_moment_uniform_mixing_default():
    sampler = LossSecondMomentResampler(4)
    fill(sampler, [1.0, 1.0, 1.0, 5.0], 10)
    w = sampler.weights().numpy()
    p = np.array([1, 1, 1, 5]) / 8
    np.testing.assert_allclose(w / w.sum(), p * (1 - 0.001) + 0.001 / 4, rtol=1e-9)
    _, iw = sampler.sample(10, generator=torch.Generator().manual_seed(3))
    assert (iw.numpy() > 0).all() and not np.allclose(iw.numpy(), 1.0)


def test_loss_second_moment_state_dict_round_trip():
    sampler = LossSecondMomentResampler(4, uniform_prob=0.0)
    fill(sampler, [0.5, 1.0, 2.0, 4.0], 12)
    state = sampler.state_dict()
    restored = LossSecondMomentResampler(4, uniform_prob=0.0)
    restored.load_state_dict(state)
    assert restored.warmed_up()
    assert torch.equal(restored.weights(), sampler.weights())
    a = sampler.sample(50, generator=torch.Generator().manual_seed(4))
    b = restored.sample(50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    state["loss_history"][0, 0] = 123.0  # the sampler holds copies, not the caller's tensors
    assert restored.loss_history[0, 0] != 123.0
    with pytest.raises(ValueError, match="shape"):
        LossSecondMomentResampler(5).load_state_dict(state)


def test_timestep_sampler_factory_and_errors():
    assert LossAwareSampler is LossSecondMomentResampler
    assert isinstance(create_named_schedule_sampler("uniform", 10), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", 10), LossSecondMomentResampler)
    with pytest.raises(ValueError, match="uniform, loss-second-moment"):
        create_named_schedule_sampler("importance", 10)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        LossSecondMomentResampler(10).update_with_all_losses(torch.tensor([10]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="history_per_term"):
        LossSecondMomentResampler(10, history_per_term=0)
    with pytest.raises(ValueError, match="uniform_prob"):
        LossSecondMomentResampler(10, uniform_prob=1.5)
