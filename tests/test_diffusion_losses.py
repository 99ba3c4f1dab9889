"""training_losses over every mean x variance x loss combination, the prior term and calc_bpd_loop.

References are written from the DDPM / Improved DDPM equations in float64 torch (so they can also be
differentiated), never by calling the implementation.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from processes import PROCESSES, Process, build
from reference import LN2, Ref, decoder_loglik
from torch import nn

from ddpm_lightning.diffusion import (
    LOSS_TYPES,
    MEAN_TYPES,
    VAR_TYPES,
    GaussianDiffusion,
    make_beta_schedule,
    space_timesteps,
)

SHAPE = (4, 3, 4, 4)


class TinyModel(nn.Module):
    """1x1 conv plus a timestep-dependent bias; records the timesteps it sees."""

    def __init__(self, c, out_c, dtype=torch.float64, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(c, out_c, 1, dtype=dtype)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen, dtype=dtype) * 0.3)
            self.conv.bias.copy_(torch.randn(out_c, generator=gen, dtype=dtype) * 0.1)
        self.temb = nn.Parameter(torch.randn(out_c, generator=gen, dtype=dtype) * 0.2)
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.detach().clone())
        return self.conv(x) + self.temb.view(1, -1, 1, 1) * torch.cos(t.to(x.dtype) / 37.0).view(-1, 1, 1, 1)


def data(gen, dtype=torch.float64, shape=SHAPE):
    """Images on the 8-bit grid in [-1, 1], with both extreme values present."""
    x0 = torch.randint(0, 256, shape, generator=gen).to(dtype) / 127.5 - 1
    x0.view(-1)[:2] = torch.tensor([-1.0, 1.0], dtype=dtype)
    return x0


NAMES = ["linear100", "cosine1000-ddim10"]  # from processes.PROCESSES: one plain, one respaced


def with_ref(process, **kwargs):
    """The process and its float64 reference."""
    built = build(process, **kwargs)
    return built.diffusion, built.ref


GRID = list(itertools.product(MEAN_TYPES, VAR_TYPES, LOSS_TYPES))


# ----------------------------------------------------------------------------- training_losses grid
@pytest.mark.parametrize("process", NAMES)
@pytest.mark.parametrize("mean_type,var_type,loss_type", GRID)
def test_training_losses_values(process, mean_type, var_type, loss_type):
    diffusion, ref = with_ref(process, mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    K = diffusion.num_timesteps
    gen = torch.Generator().manual_seed(5)
    x0, noise = data(gen), torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, K // 2, K - 1])
    out_c = 6 if var_type.startswith("learned") else 3
    model = TinyModel(3, out_c)
    terms = diffusion.training_losses(model, x0, t, noise=noise)
    assert set(terms) >= {"loss", "mse", "vb"}
    for key in ("loss", "mse", "vb"):
        assert terms[key].shape == (4,) and terms[key].dtype == torch.float64
        assert torch.isfinite(terms[key]).all()
    assert model.seen[0].tolist() == [ref.kept[i] for i in t.tolist()]  # original steps

    with torch.no_grad():
        x_t = ref.q_sample(x0, t, noise)
        out = model(x_t, torch.tensor([ref.kept[i] for i in t.tolist()]))
        mse = ((ref.target(mean_type, x0, noise, t) - out[:, :3]) ** 2).flatten(1).mean(1)
        vb = ref.vb_bits(mean_type, var_type, out, x0, x_t, t)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(terms["mse"], mse, **tol)
    torch.testing.assert_close(terms["vb"], vb, **tol)
    expected = {"simple": mse, "hybrid": mse + 0.001 * K * vb, "vlb": vb}[loss_type]
    torch.testing.assert_close(terms["loss"], expected, **tol)
    assert bool((terms["vb"] > 0).all())


@pytest.mark.parametrize("process", NAMES)
@pytest.mark.parametrize("mean_type,var_type,loss_type", GRID)
def test_training_losses_float32_gradients(process, mean_type, var_type, loss_type):
    diffusion, ref = with_ref(process, mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    gen = torch.Generator().manual_seed(6)
    x0 = data(gen, torch.float32)
    t = torch.randint(0, diffusion.num_timesteps, (4,), generator=gen)
    t[0] = 0
    model = TinyModel(3, 6 if var_type.startswith("learned") else 3, dtype=torch.float32)
    terms = diffusion.training_losses(model, x0, t)
    assert terms["loss"].shape == (4,) and terms["loss"].dtype == torch.float32
    assert torch.isfinite(terms["loss"]).all()
    terms["loss"].mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.conv.weight.grad.abs().sum() > 0


def test_rescaled_vlb_and_hybrid_lambda():
    gen = torch.Generator().manual_seed(7)
    x0, noise = data(gen), torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    betas = make_beta_schedule("linear", 100)
    keep = space_timesteps(100, "20")
    t = torch.tensor([0, 3, 10, 19])
    plain = GaussianDiffusion(betas, var_type="learned_range", loss_type="vlb", use_timesteps=keep)
    rescaled = GaussianDiffusion(betas, var_type="learned_range", loss_type="vlb", rescale_vlb=True,
                                 use_timesteps=keep)
    hybrid = GaussianDiffusion(betas, var_type="learned_range", loss_type="hybrid", hybrid_lambda=0.25,
                               use_timesteps=keep)
    model = TinyModel(3, 6)
    a = plain.training_losses(model, x0, t, noise=noise)
    b = rescaled.training_losses(model, x0, t, noise=noise)
    c = hybrid.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(a["loss"], a["vb"], rtol=0, atol=0)
    torch.testing.assert_close(b["loss"], 20 * a["vb"], rtol=1e-12, atol=0)  # K = 20 kept steps, not T
    torch.testing.assert_close(c["loss"], c["mse"] + 0.25 * 20 * c["vb"], rtol=1e-12, atol=0)


def test_vb_at_t0_is_decoder_nll_and_kl_elsewhere():
    diffusion, ref = with_ref("linear100", var_type="fixed_large", loss_type="vlb")
    gen = torch.Generator().manual_seed(8)
    x0, noise = data(gen), torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    out = torch.randn(SHAPE, generator=gen, dtype=torch.float64) * 0.1

    def model(x, t):
        return out

    for k in (0, 1, 50):
        t = torch.full((4,), k)
        vb = diffusion.training_losses(model, x0, t, noise=noise)["vb"]
        x_t = ref.q_sample(x0, t, noise)
        mean, logvar, _ = ref.p("eps", "fixed_large", out, x_t, t, clip=False)
        if k == 0:
            expected = -decoder_loglik(x0, mean, 0.5 * logvar).flatten(1).mean(1) / LN2
        else:
            # KL between two isotropic Gaussians per pixel, written with the true posterior at step k
            true_mean = Ref.col(ref.coef_x0, t) * x0 + Ref.col(ref.coef_xt, t) * x_t
            s1, s2 = Ref.col(ref.post_logvar, t).exp(), logvar.exp()
            kl = 0.5 * ((s2 / s1).log() + (s1 + (true_mean - mean) ** 2) / s2 - 1)
            expected = kl.flatten(1).mean(1) / LN2
        torch.testing.assert_close(vb, expected, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- stop-gradient
def test_hybrid_fixed_variance_vb_gives_no_gradient():
    diffusion = build("linear100", var_type="fixed_small", loss_type="hybrid", hybrid_lambda=10.0).diffusion
    gen = torch.Generator().manual_seed(9)
    x0 = data(gen)
    t = torch.tensor([0, 5, 40, 99])
    model = TinyModel(3, 3)
    terms = diffusion.training_losses(model, x0, t)
    assert bool((terms["vb"] > 1e-3).all())  # the vb term is large, yet ...
    params = list(model.parameters())
    g_loss = torch.autograd.grad(terms["loss"].sum(), params, retain_graph=True)
    g_mse = torch.autograd.grad(terms["mse"].sum(), params)
    for a, b in zip(g_loss, g_mse, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # ... contributes no gradient


@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_hybrid_learned_variance_gradient_split(mean_type, var_type):
    diffusion, ref = with_ref("cosine1000-ddim10", mean_type=mean_type, var_type=var_type, loss_type="hybrid")
    gen = torch.Generator().manual_seed(10)
    x0, noise = data(gen), torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 2, 6, 9])
    var_out = torch.rand(SHAPE, generator=gen, dtype=torch.float64) * 2 - 1 - (var_type == "learned") * 3
    out = torch.cat([torch.randn(SHAPE, generator=gen, dtype=torch.float64), var_out], 1)
    out.requires_grad_(True)
    terms = diffusion.training_losses(lambda x, t_: out, x0, t, noise=noise)
    (g_loss,) = torch.autograd.grad(terms["loss"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    # mean half: only the MSE; variance half: only lambda * K * d vb / d v (the reference's autograd)
    torch.testing.assert_close(g_loss[:, :3], g_mse[:, :3], rtol=1e-10, atol=1e-12)
    out_ref = out.detach().clone().requires_grad_(True)
    x_t = ref.q_sample(x0, t, noise)
    (g_vb,) = torch.autograd.grad(ref.vb_bits(mean_type, var_type, out_ref, x0, x_t, t).sum(), out_ref)
    torch.testing.assert_close(g_loss[:, 3:], 0.001 * 10 * g_vb[:, 3:], rtol=1e-6, atol=1e-10)
    assert g_loss[:, 3:].abs().sum() > 0


@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_vlb_trains_the_mean(var_type):
    diffusion, ref = with_ref("linear100", var_type=var_type, loss_type="vlb", rescale_vlb=True)
    gen = torch.Generator().manual_seed(11)
    x0, noise = data(gen), torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 30, 99])
    c = 6 if var_type.startswith("learned") else 3
    out = (torch.rand((4, c, 4, 4), generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    loss = diffusion.training_losses(lambda x, t_: out, x0, t, noise=noise)["loss"]
    (g,) = torch.autograd.grad(loss.sum(), out)
    out_ref = out.detach().clone().requires_grad_(True)
    x_t = ref.q_sample(x0, t, noise)
    (g_ref,) = torch.autograd.grad(100 * ref.vb_bits("eps", var_type, out_ref, x0, x_t, t).sum(), out_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-10)
    assert g[:, :3].abs().sum() > 0


# ----------------------------------------------------------------------------- prior and the full bound
def test_prior_bpd_is_negligible_for_linear_1000():
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000))
    x0 = torch.linspace(-1, 1, 2 * 3 * 8 * 8, dtype=torch.float64).reshape(2, 3, 8, 8)
    x0[1] = 1.0
    prior = diffusion.prior_bpd(x0)
    assert prior.shape == (2,)
    assert bool((prior >= 0).all()) and bool((prior < 1e-4).all())
    ab = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)))
    m, v = math.sqrt(ab) * x0, 1 - ab
    expected = (0.5 * (-math.log(v) + v + m**2 - 1)).flatten(1).mean(1) / LN2
    torch.testing.assert_close(prior, expected, rtol=1e-9, atol=1e-15)


def test_prior_bpd_large_for_short_process():
    diffusion = GaussianDiffusion(make_beta_schedule("cosine", 1000), use_timesteps=range(10))
    assert diffusion.prior_bpd(torch.ones(1, 3, 2, 2, dtype=torch.float64)).item() > 1.0


@pytest.mark.parametrize("process", NAMES)
@pytest.mark.parametrize("clip", [True, False])
def test_calc_bpd_loop_columns_in_timestep_order(process, clip):
    spec = PROCESSES[process]
    if spec.respacing is None:
        spec = Process("cosine", 8)  # keep the loop short
    diffusion, ref = with_ref(spec, var_type="learned_range")
    K = diffusion.num_timesteps
    gen = torch.Generator().manual_seed(12)
    x0 = data(gen, shape=(2, 3, 4, 4))
    noise = torch.randn((K, 2, 3, 4, 4), generator=gen, dtype=torch.float64)
    model = TinyModel(3, 6)
    with torch.no_grad():
        res = diffusion.calc_bpd_loop(model, x0, clip_denoised=clip, noise=noise)
    assert set(res) == {"total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"}
    for key in ("vb", "xstart_mse", "mse"):
        assert res[key].shape == (2, K), key
    assert res["total_bpd"].shape == (2,) and res["prior_bpd"].shape == (2,)
    # evaluated from t = K-1 down to 0, with the original steps
    assert [s[0].item() for s in model.seen] == list(reversed(ref.kept))
    for k in range(K):
        t = torch.full((2,), k)
        x_t = ref.q_sample(x0, t, noise[k])
        with torch.no_grad():
            out = model(x_t, torch.full((2,), ref.kept[k]))
            vb = ref.vb_bits("eps", "learned_range", out, x0, x_t, t, clip=clip)
            _, _, x0_pred = ref.p("eps", "learned_range", out, x_t, t, clip)
            direct = diffusion._vb_terms_bpd(model, x0, x_t, t, clip_denoised=clip)["output"]
        ab = ref.ab[k]
        eps_pred = (x_t - ab.sqrt() * x0_pred) / (1 - ab).sqrt()
        torch.testing.assert_close(res["vb"][:, k], vb, rtol=1e-7, atol=1e-9, msg=f"vb column {k}")
        torch.testing.assert_close(res["vb"][:, k], direct, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["xstart_mse"][:, k], ((x0_pred - x0) ** 2).flatten(1).mean(1),
                                   rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(res["mse"][:, k], ((eps_pred - noise[k]) ** 2).flatten(1).mean(1),
                                   rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(res["prior_bpd"], diffusion.prior_bpd(x0))
    torch.testing.assert_close(res["total_bpd"], res["vb"].sum(1) + res["prior_bpd"], rtol=1e-12, atol=1e-12)
    assert bool((res["vb"] > 0).all())


def test_calc_bpd_loop_bad_noise_shape():
    diffusion = GaussianDiffusion(make_beta_schedule("cosine", 4))
    x0 = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"noise must have shape \(4, 2, 3, 2, 2\)"):
        diffusion.calc_bpd_loop(TinyModel(3, 3), x0, noise=torch.zeros(3, 2, 3, 2, 2, dtype=torch.float64))


def test_quartile_means_bucket_per_example_values_by_timestep():
    from ddpm_lightning.diffusion import quartile_means, timestep_quartile

    t = torch.tensor([0, 24, 25, 49, 50, 99, 99])
    assert timestep_quartile(t, 100).tolist() == [0, 0, 1, 1, 2, 3, 3]
    means, counts = quartile_means(torch.tensor([1.0, 3.0, 5.0, 5.0, 7.0, 2.0, 4.0]), t, 100)
    assert means.tolist() == [2.0, 5.0, 7.0, 3.0] and counts.tolist() == [2.0, 2.0, 1.0, 2.0]
    means, counts = quartile_means(torch.tensor([1.0]), torch.tensor([10]), 100)
    assert means.tolist() == [1.0, 0.0, 0.0, 0.0] and counts.tolist() == [1.0, 0.0, 0.0, 0.0]  # empty: 0, not NaN
