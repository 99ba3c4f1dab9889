"""normal_kl and the discretized Gaussian decoder likelihood against closed forms."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ddpm_lightning.diffusion import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)

finite = st.floats(min_value=-5, max_value=5, allow_nan=False)
log_vars = st.floats(min_value=-8, max_value=3, allow_nan=False)


def ref_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) in nats, from the textbook formula."""
    return 0.5 * (math.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def tanh_cdf(z):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))


def test_normal_kl_equal_gaussians_is_zero():
    m = torch.randn(3, 4, dtype=torch.float64)
    lv = torch.randn(3, 4, dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().max().item() < 1e-15


@given(m1=finite, m2=finite, lv1=log_vars, lv2=log_vars)
def test_normal_kl_nonnegative_and_closed_form(m1, m2, lv1, lv2):
    kl = normal_kl(torch.tensor(m1, dtype=torch.float64), torch.tensor(lv1, dtype=torch.float64),
                   torch.tensor(m2, dtype=torch.float64), torch.tensor(lv2, dtype=torch.float64))
    assert kl.item() >= -1e-12
    assert kl.item() == pytest.approx(ref_kl(m1, math.exp(lv1), m2, math.exp(lv2)), rel=1e-9, abs=1e-12)


def test_normal_kl_broadcasts_python_scalars():
    m = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    lv = torch.tensor([0.0, -1.0, 0.5], dtype=torch.float64)
    expected = [ref_kl(mi, math.exp(li), 0.0, 1.0) for mi, li in zip(m.tolist(), lv.tolist(), strict=True)]
    np.testing.assert_allclose(normal_kl(m, lv, 0.0, 0.0).numpy(), expected, rtol=1e-12)


def test_normal_kl_needs_a_tensor():
    with pytest.raises(ValueError, match="tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_approx_cdf_close_to_exact():
    z = torch.linspace(-6, 6, 241, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    assert (approx_standard_normal_cdf(z) - exact).abs().max() < 5e-4
    np.testing.assert_allclose(approx_standard_normal_cdf(z).numpy(), tanh_cdf(z.numpy()),
                               rtol=1e-12, atol=1e-15)


@given(mean=st.floats(-1.5, 1.5), log_scale=st.floats(-7.0, 1.0))
def test_discretized_likelihood_sums_to_one_over_256_bins(mean, log_scale):
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    means = torch.full_like(x, mean)
    log_scales = torch.full_like(x, log_scale)
    ll = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    assert bool((ll <= 1e-12).all())
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_matches_bin_integral():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 4, 4), generator=gen).double() / 127.5 - 1.0
    x[0, 0, 0, :2] = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # both edge bins present
    means = x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * 0.02
    log_scales = torch.randn(x.shape, generator=gen, dtype=torch.float64) * 0.3 - 3.5
    xn, mn, sn = x.numpy(), means.numpy(), np.exp(log_scales.numpy())
    lower = np.where(xn <= -1 + 1e-9, -np.inf, xn - 1 / 255)
    upper = np.where(xn >= 1 - 1e-9, np.inf, xn + 1 / 255)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = np.log(tanh_cdf((upper - mn) / sn) - tanh_cdf((lower - mn) / sn))
    ll = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    assert np.isfinite(expected).all() and expected.min() < -3  # non-trivial, no underflow
    np.testing.assert_allclose(ll.numpy(), expected, rtol=1e-9, atol=1e-10)
    # A bin far from the mean gets the floor log(1e-12) instead of -inf.
    far = discretized_gaussian_log_likelihood(torch.zeros(1, dtype=torch.float64),
                                              means=torch.ones(1, dtype=torch.float64),
                                              log_scales=torch.full((1,), -5.0, dtype=torch.float64))
    assert far.item() == pytest.approx(math.log(1e-12))


def test_discretized_likelihood_shape_mismatch():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shapes differ"):
        discretized_gaussian_log_likelihood(x, means=torch.zeros(2, 1), log_scales=torch.zeros(2, 3))


def test_mean_flat():
    x = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    np.testing.assert_allclose(mean_flat(x).numpy(), [5.5, 17.5])
