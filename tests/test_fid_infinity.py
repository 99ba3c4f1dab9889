"""FID-infinity (Chong & Forsyth 2020): the 1/N line, its subset sizes, when it is refused, and the bias it removes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_metrics import CountingFeatures, images, reference_from

from ddpm_lightning.config.choices import POOL_DIMS
from ddpm_lightning.metrics import GenerativeMetrics, extract_features, load_feature_extractor
from ddpm_lightning.metrics.scores import (
    extrapolate_inverse_n,
    fid_from_features,
    fid_infinity,
    fid_infinity_min_samples,
    fid_infinity_sizes,
)


def test_the_line_recovers_an_exact_intercept_and_slope():
    sizes = np.array([100, 150, 250, 500])
    intercept, slope = extrapolate_inverse_n(sizes, 3.5 + 420.0 / sizes)
    assert intercept == pytest.approx(3.5, rel=1e-10)
    assert slope == pytest.approx(420.0, rel=1e-10)
    with pytest.raises(ValueError, match="distinct sizes"):
        extrapolate_inverse_n(np.array([100, 100]), np.array([1.0, 2.0]))


@pytest.mark.parametrize("n", [100, 200, 500, 50_000])
def test_sizes_run_from_a_fifth_to_all_evenly_in_inverse_n(n):
    sizes = fid_infinity_sizes(n, dim=20)
    assert sizes[-1] == n and abs(sizes[0] - n / 5) <= 1
    assert np.all(np.diff(sizes) > 0) and len(sizes) == 10
    # evenly spaced in 1/N, up to rounding to whole samples
    assert np.allclose(1.0 / sizes, np.linspace(5 / n, 1 / n, 10), rtol=0.03)


def test_subsets_smaller_than_the_feature_size_are_refused():
    assert fid_infinity_min_samples(2048) == 10_240
    fid_infinity_sizes(10_240, dim=2048)
    with pytest.raises(ValueError, match=r"needs >= 10240 samples \(5 x the 2048-d features"):
        fid_infinity_sizes(10_239, dim=2048)
    with pytest.raises(ValueError, match="needs >= 160 samples"):
        fid_infinity(torch.randn(150, 32), np.zeros(32), np.eye(32))


def test_the_feature_sizes_are_stated_once_and_match_the_extractors():
    tiny = load_feature_extractor("tiny")
    assert extract_features(tiny, images(3, 0, size=32, channels=3)).shape[1] == POOL_DIMS["tiny"]


def test_fid_infinity_removes_most_of_the_small_sample_bias():
    """Gaussian features against exact population statistics: the true distance is 1 (a unit mean shift); FID at
    500 samples of 32-d features is biased up by ~0.6, FID-infinity lands within ~0.3 of the truth on average."""
    d, errors_n, errors_inf = 32, [], []
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        shift = torch.zeros(d)
        shift[0] = 1.0
        feats = torch.randn(500, d, generator=gen) + shift
        fid_inf, fids = fid_infinity(feats, np.zeros(d), np.eye(d), seed=seed)
        assert fids[500] == pytest.approx(fid_from_features(feats, np.zeros(d), np.eye(d), method="eigh"))
        assert fids[100] > fids[500]  # the bias grows as N shrinks
        errors_n.append(fids[500] - 1.0)
        errors_inf.append(fid_inf - 1.0)
    assert np.mean(errors_n) > 0.4
    assert abs(np.mean(errors_inf)) < 0.25
    assert np.mean(np.abs(errors_inf)) < 0.5 * np.mean(np.abs(errors_n))


def test_generative_metrics_reports_fid_inf_and_is_seeded():
    real, fake = images(300, 0, channels=3), images(150, 1, channels=3, hi=200)  # 12-d features: >= 60 samples
    ref = reference_from(real)
    metrics = GenerativeMetrics(CountingFeatures(), ref, ("fid", "fid_inf"), seed=3)
    first, again = metrics.compute(fake), metrics.compute(fake)
    assert set(first) == {"fid", "fid_inf"} and first == again
    expected, fids = fid_infinity(extract_features(CountingFeatures(), fake), ref.mu, ref.sigma, seed=3)
    assert first["fid_inf"] == pytest.approx(expected, rel=1e-9)
    assert first["fid"] == pytest.approx(fids[150], rel=1e-9)
    with pytest.raises(ValueError, match="needs >= 60 samples"):
        metrics.compute(fake[:59])


def test_the_callback_refuses_fid_inf_with_too_few_samples():
    from ddpm_lightning.callbacks.generative_metrics import GenerativeMetricsCallback

    with pytest.raises(ValueError, match="fid_inf needs num_samples and in_loop_num_samples >= 10240 with "
                                         "feature=inception"):
        GenerativeMetricsCallback(num_samples=50_000, in_loop_num_samples=500, metrics=("fid", "fid_inf"))
    GenerativeMetricsCallback(num_samples=320, in_loop_num_samples=320, metrics=("fid", "fid_inf"), feature="tiny")
