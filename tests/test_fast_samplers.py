"""DPM-Solver++ (2M, 3M, SDE-2M) and UniPC: DDIM equivalence, convergence, oracle, diffusers parity, schedules."""

import math

import numpy as np
import pytest
import torch

from ddpm_lightning.config.schema import SampleConfig
from ddpm_lightning.diffusion import (
    MEAN_TYPES,
    SOLVER_SCHEDULES,
    GaussianDiffusion,
    make_beta_schedule,
    solver_timesteps,
)
from ddpm_lightning.diffusion.samplers import SOLVERS
from ddpm_lightning.sampling import SAMPLE_METHODS, SAMPLE_SCHEDULES, sampling_process

T = 1000
SHAPE = (2, 3, 4, 4)
SOLVER_METHODS = tuple(SOLVERS)


def base(schedule="linear", **kwargs):
    return GaussianDiffusion(make_beta_schedule(schedule, T), **kwargs)


def noise(seed=0, dtype=torch.float32, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class GaussianOutput(torch.nn.Module):
    """The exact eps / x0 / v of data x_0 ~ N(0, s^2 I) at ORIGINAL steps t (float64 inside)."""

    def __init__(self, diffusion, mean_type="eps", s=0.5, learned_var=False):
        super().__init__()
        self.ab = diffusion.alphas_cumprod
        self.mean_type, self.s, self.learned_var = mean_type, s, learned_var

    def forward(self, x, t, y=None):
        ab, x64 = self.ab[t].view(-1, 1, 1, 1), x.double()
        x0 = ab.sqrt() * self.s ** 2 * x64 / (ab * self.s ** 2 + 1 - ab)
        eps = (x64 - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.mean_type].to(x.dtype)
        return torch.cat([out, torch.zeros_like(out)], 1) if self.learned_var else out


# ----------------------------------------------------------------------------- first order = DDIM
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("schedule,steps", [("adm", 10), ("uniform", 7), ("karras", 12), ("trailing", 5)])
@pytest.mark.parametrize("clip,guided", [(False, False), (True, False), (False, True)])
def test_first_order_dpm_solver_is_ddim(mean_type, schedule, steps, clip, guided):
    """Equal with clipping or with guidance; with both, the solver also clips the guided prediction (below)."""
    diffusion = base(mean_type=mean_type)
    process = sampling_process(diffusion, SampleConfig(method="ddim", steps=steps, schedule=schedule))
    model = GaussianOutput(diffusion, mean_type, s=2.0)  # s=2: the clip is active
    cond_fn = (lambda x, t, **kw: 0.1 * torch.tanh(x)) if guided else None
    kw = {"noise": noise(1), "clip_denoised": clip, "cond_fn": cond_fn}
    ddim = process.ddim_sample_loop(model, SHAPE, eta=0.0, **kw)
    dpm1 = process.dpm_solver_sample_loop(model, SHAPE, order=1, **kw)
    torch.testing.assert_close(dpm1, ddim, rtol=1e-5, atol=1e-5)
    assert (dpm1 - noise(1)).abs().max() > 0.1


@pytest.mark.parametrize("guided", [False, True])
def test_first_order_sde_dpm_solver_is_ddim_eta1(guided):
    """SDE-DPM-Solver++(1) is DDPM's posterior step = DDIM(eta=1), with the same per-step noise."""
    diffusion = base("cosine")
    process = sampling_process(diffusion, SampleConfig(method="ddim", steps=10, schedule="trailing"))
    model = GaussianOutput(diffusion)
    cond_fn = (lambda x, t, **kw: 0.3 * torch.tanh(x)) if guided else None
    runs = []
    for loop in (lambda **kw: process.ddim_sample_loop(model, SHAPE, eta=1.0, **kw),
                 lambda **kw: process.dpm_solver_sample_loop(model, SHAPE, order=1, sde=True, **kw)):
        gen = torch.Generator().manual_seed(7)
        runs.append(loop(noise=noise(1), cond_fn=cond_fn, clip_denoised=not guided,
                         noise_sampler=lambda x, g=gen: torch.randn(x.shape, generator=g)))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_solvers_clip_the_guided_data_prediction_after_the_correction(mean_type):
    """DPM-Solver's thresholding order: clip(clip(x0) + (1 - ab) / sqrt(ab) * grad); unclipped it leaves [-1, 1]."""
    diffusion = base("cosine", mean_type=mean_type)
    model = GaussianOutput(diffusion, mean_type, s=2.0)
    x, t = noise(1), torch.tensor([T - 1, T // 2])
    grad = lambda x, t, **kw: 0.5 * torch.tanh(x)  # noqa: E731
    clipped = diffusion.predict_xstart(model, x, t, clip_denoised=True)
    ab = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1).to(x.dtype)
    expected = (clipped + (1 - ab) / ab.sqrt() * grad(x, t)).clamp(-1, 1)
    guided = diffusion.predict_xstart(model, x, t, clip_denoised=True, cond_fn=grad)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)
    unclipped = diffusion.predict_xstart(model, x, t, clip_denoised=False, cond_fn=grad)
    assert unclipped.abs().max() > 5 and guided.abs().max() <= 1


# ----------------------------------------------------------------------------- convergence
def exact_ode_solution(process, x_T, s=0.5):
    """For N(0, s^2) data the probability-flow ODE keeps x_t / std_t constant; the sampler returns the exact
    x_0 prediction at its last (least noisy) step t_min."""
    ab = process.alphas_cumprod.double()
    std = lambda a: (a * s ** 2 + 1 - a).sqrt()  # noqa: E731
    ab_max, ab_min = ab[-1], ab[0]
    x_min = x_T.double() * std(ab_min) / std(ab_max)
    return ab_min.sqrt() * s ** 2 * x_min / std(ab_min) ** 2


@pytest.mark.parametrize("method", ["ddim", "dpm++2m", "dpm++3m", "unipc"])
@pytest.mark.parametrize("schedule", ["logsnr", "karras"])
def test_solvers_converge_to_the_ode_solution(method, schedule):
    """Error against the exact flow at 16, 32, 64 steps: first order halves it per doubling, the multistep
    solvers cut it > 10x over the two doublings (measured on linear T=1000: 15-70x; DDIM 3.9x).
    (Time-uniform steps on T=1000 reach this regime only at larger step counts: their logSNR gaps vary.)"""
    diffusion = base("linear")
    model = GaussianOutput(diffusion)
    x_T = noise(2, torch.float64)
    errors = []
    for steps in (16, 32, 64):
        process = sampling_process(diffusion, SampleConfig(method=method, steps=steps, schedule=schedule))
        got = process.sample_loop(process.step_fn(method, model, clip_denoised=False), SHAPE, noise=x_T)
        errors.append(float((got - exact_ode_solution(process, x_T)).abs().max()))
    assert errors[0] > errors[1] > errors[2], errors
    if method == "ddim":
        assert 3.0 < errors[0] / errors[2] < 5.0, errors
    else:
        assert errors[0] / errors[2] > 10.0 and errors[2] < 5e-3, errors


@pytest.mark.parametrize("schedule", ["logsnr", "uniform"])
def test_high_order_beats_ddim_at_equal_nfe(schedule):
    """20 network calls: measured DDIM 0.19 / 0.13, the multistep solvers 0.013-0.023 (max |error|)."""
    diffusion = base("linear")
    model = GaussianOutput(diffusion)
    x_T = noise(3, torch.float64)
    err = {}
    for method in ("ddim", "dpm++2m", "dpm++3m", "unipc"):
        process = sampling_process(diffusion, SampleConfig(method=method, steps=20, schedule=schedule))
        got = process.sample_loop(process.step_fn(method, model, clip_denoised=False), SHAPE, noise=x_T)
        err[method] = float((got - exact_ode_solution(process, x_T)).abs().max())
    assert err["dpm++2m"] < err["ddim"] / 5 and err["dpm++3m"] < err["ddim"] / 5 and err["unipc"] < err["ddim"] / 5, err


# ----------------------------------------------------------------------------- single-point oracle
def oracle(diffusion, mean_type, x_star, learned_var=False, seen=None):
    ab_orig = diffusion.alphas_cumprod

    def model(x, t):
        if seen is not None:
            seen.append(int(t[0]))
        ab, x64, star = ab_orig[t].view(-1, 1, 1, 1), x.double(), x_star.double()
        eps = (x64 - ab.sqrt() * star) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": star.expand_as(x64), "v": ab.sqrt() * eps - (1 - ab).sqrt() * star}[mean_type]
        out = out.to(x.dtype)
        return torch.cat([out, torch.zeros_like(out)], 1) if learned_var else out

    return model


@pytest.mark.parametrize("method", SOLVER_METHODS)
@pytest.mark.parametrize("schedule", SAMPLE_SCHEDULES)
@pytest.mark.parametrize("mean_type,var_type", [("eps", "fixed_small"), ("x0", "fixed_large"),
                                                ("v", "learned_range")])
def test_solvers_recover_the_single_data_point(method, schedule, mean_type, var_type):
    diffusion = base(mean_type=mean_type, var_type=var_type)
    x_star = (torch.rand((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9)
    seen = []
    model = oracle(diffusion, mean_type, x_star, learned_var=var_type == "learned_range", seen=seen)
    process = sampling_process(diffusion, SampleConfig(method=method, steps=9, schedule=schedule))
    gen = torch.Generator().manual_seed(1)
    sample = process.sample_loop(process.step_fn(method, model), SHAPE, noise=torch.randn(SHAPE, generator=gen),
                                 noise_sampler=lambda x: torch.randn(x.shape, generator=gen))
    torch.testing.assert_close(sample, x_star.expand(SHAPE), rtol=0, atol=2e-5)
    assert seen == process.timestep_map.flip(0).tolist() and len(seen) == 9  # NFE = steps, original t


# ----------------------------------------------------------------------------- diffusers parity
def tiny_unet(out_mult=1, dtype=torch.float32):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=3, out_channels=3 * out_mult, block_out_channels=(16, 32),
                      layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval().to(dtype)

    def model(x, t, y=None):
        return net(x, t).sample

    return model


PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SPACING = {"uniform": "linspace", "trailing": "trailing"}


def diffusers_loop(scheduler, model, x, timesteps, sigmas, noises=None):
    if timesteps is not None:  # logsnr / karras: our integer steps, alpha-bar of those steps
        scheduler.timesteps = torch.tensor(timesteps, dtype=torch.int64)
        scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        scheduler.num_inference_steps = len(timesteps)
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            out = model(x, t.expand(x.shape[0]))
        kwargs = {} if noises is None else {"variance_noise": noises[i]}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("method", SOLVER_METHODS)
@pytest.mark.parametrize("schedule", SOLVER_SCHEDULES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_parity_with_diffusers(method, schedule, mean_type):
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    steps = 10 if schedule != "karras" else 8
    var_type = "learned_range" if mean_type == "v" else "fixed_small"
    diffusion = base(mean_type=mean_type, var_type=var_type)
    # the network in float64: in float32 its rounding differs between CPU kernels (AVX2, AVX-512, AMX), and a
    # random eps-UNet's x_0 amplifies it over the steps past any bound; in float64 what is left is the float32
    # coefficients diffusers computes, the same on every CPU
    model = tiny_unet(out_mult=2 if var_type == "learned_range" else 1, dtype=torch.float64)
    x_T = noise(4, shape=(2, 3, 8, 8), dtype=torch.float64)
    process = sampling_process(diffusion, SampleConfig(method=method, steps=steps, schedule=schedule))
    noises = [noise(100 + i, shape=(2, 3, 8, 8), dtype=torch.float64) for i in range(steps)]
    draws = iter(noises)
    with torch.no_grad():
        ours = process.sample_loop(process.step_fn(method, model, clip_denoised=False), x_T.shape,
                                   noise=x_T.clone(), noise_sampler=lambda x: next(draws))

    common = {"num_train_timesteps": T, "trained_betas": diffusion.betas.numpy(), "solver_order": 2,
              "prediction_type": PREDICTION[mean_type], "lower_order_final": True,
              "timestep_spacing": SPACING.get(schedule, "linspace"), "final_sigmas_type": "zero"}
    if method == "unipc":
        scheduler = UniPCMultistepScheduler(**common, solver_type="bh2", predict_x0=True)
    else:
        common["solver_order"] = 3 if method == "dpm++3m" else 2
        algorithm = "sde-dpmsolver++" if method.endswith("sde") else "dpmsolver++"
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type=algorithm, solver_type="midpoint")
    scheduler.set_timesteps(steps)
    custom, sigmas = None, None
    if schedule not in SPACING:
        custom = process.timestep_map.flip(0).tolist()
        ab = process.alphas_cumprod.flip(0).numpy()
        sigmas = [*((1 - ab) / ab) ** 0.5, 0.0]
    else:
        assert scheduler.timesteps.tolist() == process.timestep_map.flip(0).tolist()
    mean_half = lambda x, t: model(x, t)[:, :3]  # noqa: E731  (diffusers: the learned variance is unused)
    theirs = diffusers_loop(scheduler, mean_half, x_T.clone(), custom, sigmas,
                            noises=noises if method.endswith("sde") else None)
    assert ours.abs().max() > 0.1
    # to ~1e-5 of the output's scale: diffusers computes its coefficients in float32, we in float64; with the
    # network in float64 the max |difference| / max(1, max |x_0|) is 3.0e-6 on AVX-512, AVX2 and plain kernels
    # alike (ATEN_CPU_CAPABILITY), ~10 float32 roundings of 10 steps' coefficients
    scale = max(float(theirs.abs().max()), 1.0)
    assert float((ours - theirs).abs().max()) <= 3e-5 * scale


@pytest.mark.parametrize("schedule", ["karras", "logsnr"])
@pytest.mark.parametrize("steps", [10, 25])
def test_schedules_match_diffusers_rounded_timesteps(schedule, steps):
    from diffusers import DPMSolverMultistepScheduler

    betas = make_beta_schedule("linear", T)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=betas.numpy(),
                                            use_karras_sigmas=schedule == "karras",
                                            use_lu_lambdas=schedule == "logsnr")
    scheduler.set_timesteps(steps)
    ab = torch.cumprod(1 - betas.double(), 0)
    theirs = scheduler.timesteps.tolist()
    ours = solver_timesteps(ab, steps, schedule)[::-1]
    if len(set(theirs)) == steps:  # no collision after rounding: the same steps
        assert ours == theirs
    else:  # diffusers repeats a step; ours stay distinct (NFE = steps) and start at the same step
        assert len(set(ours)) == steps and ours[0] == theirs[0]


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", SOLVER_SCHEDULES)
@pytest.mark.parametrize("steps", [2, 5, 50, 999, 1000])
def test_solver_timesteps_are_distinct_and_in_range(schedule, steps):
    ab = base("cosine").alphas_cumprod
    ts = solver_timesteps(ab, steps, schedule)
    assert len(ts) == steps and ts == sorted(set(ts)) and ts[0] >= 0
    assert ts[-1] == T - 1  # every solver schedule starts from the noisiest step


def test_schedule_shapes():
    ab = base("linear").alphas_cumprod
    assert solver_timesteps(ab, 4, "trailing") == [249, 499, 749, 999]
    assert solver_timesteps(ab, 4, "uniform") == [250, 500, 749, 999]
    lam = lambda t: 0.5 * math.log(ab[t] / (1 - ab[t]))  # noqa: E731
    ls = solver_timesteps(ab, 6, "logsnr")
    gaps = np.diff([lam(t) for t in ls])
    assert np.allclose(gaps, gaps.mean(), rtol=0.1)  # evenly spaced in logSNR (up to the rounding)
    ks = solver_timesteps(ab, 20, "karras")
    assert ks[0] == 0 and ks[1] - ks[0] < ks[-1] - ks[-2]  # dense near the data, sparse near the noise


def test_bad_solver_options():
    diffusion = base()
    with pytest.raises(ValueError, match="allowed: adm, uniform, logsnr, karras, trailing"):
        sampling_process(diffusion, SampleConfig(method="dpm++2m", steps=10, schedule="cosine"))
    with pytest.raises(ValueError, match="allowed: ddpm, ddim, dpm\\+\\+2m, dpm\\+\\+3m, dpm\\+\\+2m-sde, unipc"):
        sampling_process(diffusion, SampleConfig(method="euler", steps=10))
    with pytest.raises(ValueError, match="needs an integer number of steps"):
        sampling_process(diffusion, SampleConfig(method="dpm++2m", steps="ddim25", schedule="karras"))
    with pytest.raises(ValueError, match="2 <= steps <= T = 1000"):
        sampling_process(diffusion, SampleConfig(method="dpm++2m", steps=1, schedule="uniform"))
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        diffusion.dpm_solver_sample_loop(lambda x, t: x, SHAPE, order=4)
    with pytest.raises(ValueError, match="allowed: none, unipc"):
        diffusion.dpm_solver_sample_loop(lambda x, t: x, SHAPE, corrector="unic")
    assert set(SAMPLE_METHODS) >= set(SOLVER_METHODS)


# ----------------------------------------------------------------------------- the one loop
def test_a_new_step_function_plugs_into_the_loop():
    """Any ``step(x, k, noise_sampler)`` runs on the shared loop: here DDIM written as a two-line step."""
    process = sampling_process(base(), SampleConfig(method="ddim", steps=6, schedule="trailing"))
    model = GaussianOutput(base())  # the network sees original-process steps
    ab = process.alphas_cumprod
    seen = []

    def step(x, k, noise_sampler):
        seen.append(k)
        x0 = process.predict_xstart(model, x, torch.full((x.shape[0],), k), clip_denoised=False)
        ab_prev = float(ab[k - 1]) if k else 1.0
        eps = (x - float(ab[k]) ** 0.5 * x0) / float(1 - ab[k]) ** 0.5
        return {"sample": ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps, "pred_xstart": x0}

    outs = list(process.sample_loop_progressive(step, SHAPE, noise=noise(5)))
    assert seen == [5, 4, 3, 2, 1, 0] and len(outs) == 6
    ddim = process.ddim_sample_loop(model, SHAPE, noise=noise(5), clip_denoised=False)
    torch.testing.assert_close(outs[-1]["sample"], ddim, rtol=1e-5, atol=1e-5)


def test_a_multistep_step_function_restarts_with_a_new_loop():
    process = sampling_process(base(), SampleConfig(method="dpm++2m", steps=5, schedule="uniform"))
    model = GaussianOutput(base())
    step = process.dpm_solver_step_fn(model, order=2, corrector="unipc", clip_denoised=False)
    first = list(process.sample_loop_progressive(step, SHAPE, noise=noise(6)))[-1]["sample"]
    again = list(process.sample_loop_progressive(step, SHAPE, noise=noise(6)))[-1]["sample"]
    assert torch.equal(first, again)


def test_callbacks_refuse_an_unknown_method():
    from ddpm_lightning.callbacks import GenerativeMetricsCallback, SampleGridCallback

    for callback in (SampleGridCallback, GenerativeMetricsCallback):
        with pytest.raises(ValueError, match="unknown sampling method 'euler'; allowed: ddpm, ddim, dpm"):
            callback(method="euler")


@pytest.mark.parametrize("method", SAMPLE_METHODS)
def test_step_fn_is_the_adm_loops(method):
    """``step_fn(method)`` on the one loop gives, bit for bit, ADM's loop of that method (the one-line wrappers)."""
    diffusion = base(var_type="learned_range")
    model = tiny_unet(out_mult=2)
    process = sampling_process(diffusion, SampleConfig(method=method, steps=6, schedule="karras"))

    def draws():
        gen = torch.Generator().manual_seed(7)
        return {"noise": noise(8, shape=(2, 3, 8, 8)), "noise_sampler": lambda x: torch.randn(x.shape, generator=gen)}

    with torch.no_grad():
        ours = process.sample_loop(process.step_fn(method, model, eta=0.5), (2, 3, 8, 8), **draws())
        if method == "ddpm":
            adm = process.p_sample_loop(model, (2, 3, 8, 8), **draws())
        elif method == "ddim":
            adm = process.ddim_sample_loop(model, (2, 3, 8, 8), eta=0.5, **draws())
        else:
            order, sde, corrector = SOLVERS[method]
            adm = process.dpm_solver_sample_loop(model, (2, 3, 8, 8), order=order, sde=sde, corrector=corrector,
                                                 **draws())
    assert torch.equal(ours, adm)
    with pytest.raises(ValueError, match=r"unknown sampling method 'euler'; allowed: ddpm, ddim, dpm\+\+2m"):
        process.step_fn("euler", model)
