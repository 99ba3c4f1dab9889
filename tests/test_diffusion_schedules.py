"""Beta schedules, timestep respacing and the tables of a (respaced) process, against closed forms."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ddpm_lightning.diffusion import (
    GaussianDiffusion,
    make_beta_schedule,
    respace_betas,
    space_timesteps,
)


# ----------------------------------------------------------------------------- references
def cosine_alpha_bar(t, T, s=0.008):
    """Improved DDPM eq. 17 (unnormalised f(t)); alpha_bar_t = f(t) / f(0)."""
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


def openai_space_timesteps(num_timesteps, section_counts):
    """Transcription of improved-diffusion's ``space_timesteps`` (float stride accumulated)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired:
                    return set(range(0, num_timesteps, i))
            raise AssertionError("unreachable in these tests")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def ref_tables(betas):
    b = np.asarray(betas, dtype=np.float64)
    a = 1.0 - b
    ab = np.cumprod(a)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = b * (1.0 - ab_prev) / (1.0 - ab)
    return {
        "betas": b,
        "alphas_cumprod": ab,
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "posterior_mean_coef1": b * np.sqrt(ab_prev) / (1.0 - ab),
        "posterior_mean_coef2": (1.0 - ab_prev) * np.sqrt(a) / (1.0 - ab),
    }


# ----------------------------------------------------------------------------- beta schedules
def test_linear_golden_values():
    betas = make_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    # DDPM's well-known alpha_bar_T for the 1000-step linear schedule.
    assert torch.prod(1 - betas).item() == pytest.approx(4.035829765375676e-05, rel=1e-9)


@pytest.mark.parametrize("T", [50, 250, 500, 4000])
def test_linear_scales_with_T(T):
    betas = make_beta_schedule("linear", T).numpy()
    scale = 1000 / T
    assert betas.shape == (T,)
    assert betas[0] == pytest.approx(scale * 1e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(scale * 0.02, rel=1e-12)
    np.testing.assert_allclose(np.diff(betas), np.full(T - 1, scale * (0.02 - 1e-4) / (T - 1)), rtol=1e-8)


@pytest.mark.parametrize("T", [4, 100, 1000, 4000])
def test_cosine_alpha_bar_formula_and_clip(T):
    betas = make_beta_schedule("cosine", T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    b = betas.numpy()
    f0 = cosine_alpha_bar(0, T)
    expected = np.array([min(1 - cosine_alpha_bar(i + 1, T) / cosine_alpha_bar(i, T), 0.999)
                         for i in range(T)])
    np.testing.assert_allclose(b, expected, rtol=1e-10, atol=1e-15)
    ab = np.cumprod(1 - b)
    # alpha_bar_t = f(t)/f(0) wherever the clip did not act (everything but the final step).
    ref_ab = np.array([cosine_alpha_bar(i + 1, T) / f0 for i in range(T)])
    np.testing.assert_allclose(ab[:-1], ref_ab[:-1], rtol=1e-9)
    # f(T) = 0 so the last beta would be 1: it is clipped to exactly 0.999.
    assert b[-1] == 0.999 and b.max() == 0.999
    assert (b[:-1] < 0.999).all() or T < 10


@given(name=st.sampled_from(["linear", "cosine"]), T=st.integers(min_value=50, max_value=3000))
def test_alpha_bar_strictly_decreasing_in_unit_interval(name, T):
    betas = make_beta_schedule(name, T)
    assert betas.shape == (T,) and betas.dtype == torch.float64
    assert bool(((betas > 0) & (betas < 1)).all())
    ab = torch.cumprod(1 - betas, 0)
    assert bool((ab[1:] < ab[:-1]).all())
    assert 0 < ab[-1].item() < ab[0].item() < 1


@pytest.mark.parametrize("name", ["quadratic", "Linear", ""])
def test_unknown_schedule_names_allowed(name):
    with pytest.raises(ValueError, match="linear, cosine"):
        make_beta_schedule(name, 100)


# ----------------------------------------------------------------------------- space_timesteps
def test_ddim_respacing():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))


def test_ddim_impossible_count_raises():
    # strides 1..9 of range(10) give 10, 5, 4, 3, 2, 2, ... steps: 7 is impossible.
    with pytest.raises(ValueError, match="ddim7"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError, match="ddimN"):
        space_timesteps(10, "ddimx")


def test_section_semantics_10_15_20():
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    sections = [sorted(k for k in kept if lo <= k < lo + 100) for lo in (0, 100, 200)]
    assert [len(s) for s in sections] == [10, 15, 20]
    for lo, s in zip((0, 100, 200), sections, strict=True):
        assert s[0] == lo and s[-1] == lo + 99  # each section spans its whole third
    assert sections[0] == [round(j * 11) for j in range(10)]  # stride 99/9 = 11 exactly


def test_uneven_sections_first_ones_longer():
    # T=10 in 3 sections: sizes 4, 3, 3.
    assert space_timesteps(10, "2,2,2") == {0, 3, 4, 6, 7, 9}
    assert space_timesteps(10, "1,1,1") == {0, 4, 7}


@pytest.mark.parametrize("T,spec,count", [(1000, "250", 250), (1000, "25", 25), (4000, "100", 100),
                                          (1000, "1000", 1000), (100, "10,10", 20)])
def test_counts_and_endpoints(T, spec, count):
    kept = space_timesteps(T, spec)
    assert len(kept) == count
    assert min(kept) == 0 and max(kept) == T - 1
    assert kept == space_timesteps(T, [int(c) for c in spec.split(",")])


def test_int_argument():
    assert space_timesteps(1000, 250) == space_timesteps(1000, "250")


@pytest.mark.parametrize("T,spec", [(500, "25"), (100, "15"), (16, "15"), (2000, "25"), (1000, "250"),
                                    (4000, "250"), (1000, "ddim25"), (300, "10,15,20"), (1000, "7,9,11,13")])
def test_matches_openai_reference(T, spec):
    assert space_timesteps(T, spec) == openai_space_timesteps(T, spec)


@given(T=st.integers(min_value=2, max_value=1200), data=st.data())
def test_matches_openai_reference_random(T, data):
    n_sections = data.draw(st.integers(1, min(4, T)))
    size = T // n_sections
    counts = data.draw(st.lists(st.integers(1, size), min_size=n_sections, max_size=n_sections))
    spec = ",".join(map(str, counts))
    kept = space_timesteps(T, spec)
    assert kept == openai_space_timesteps(T, spec)
    assert len(kept) == sum(counts) and all(0 <= k < T for k in kept)


@pytest.mark.parametrize("spec", ["abc", "10,x", "0", "5,0", "-3"])
def test_bad_respacing_strings(spec):
    with pytest.raises(ValueError, match="respacing"):
        space_timesteps(100, spec)


def test_section_too_small_raises():
    with pytest.raises(ValueError, match="cannot take 50 steps"):
        space_timesteps(100, "50,50,50")


# ----------------------------------------------------------------------------- respaced processes
@given(name=st.sampled_from(["linear", "cosine"]), T=st.integers(min_value=50, max_value=400), data=st.data())
def test_respacing_keeps_alpha_bar(name, T, data):
    keep = data.draw(st.sets(st.integers(0, T - 1), min_size=2, max_size=40))
    betas = make_beta_schedule(name, T)
    diffusion = GaussianDiffusion(betas, use_timesteps=keep)
    kept = sorted(keep)
    full_ab = np.cumprod(1 - betas.numpy())
    assert diffusion.num_timesteps == len(kept)
    assert diffusion.timestep_map.dtype == torch.int64
    assert diffusion.timestep_map.tolist() == kept
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), full_ab[kept], rtol=1e-10, atol=1e-15)
    # The respaced betas are those of the process whose marginals are the kept ones.
    ab = full_ab[kept]
    np.testing.assert_allclose(diffusion.betas.numpy(), 1 - ab / np.append(1.0, ab[:-1]),
                               rtol=1e-10, atol=1e-15)


def test_respace_betas_errors():
    betas = make_beta_schedule("linear", 100)
    with pytest.raises(ValueError, match="empty"):
        respace_betas(betas, [])
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        respace_betas(betas, [0, 100])
    with pytest.raises(ValueError, match="at least 2"):
        GaussianDiffusion(betas, use_timesteps=[5])


@pytest.mark.parametrize("name,T,keep", [("linear", 1000, None), ("cosine", 100, None),
                                         ("linear", 1000, "ddim25"), ("cosine", 300, "10,15,20")])
def test_tables_match_closed_forms(name, T, keep):
    betas = make_beta_schedule(name, T)
    use = None if keep is None else space_timesteps(T, keep)
    diffusion = GaussianDiffusion(betas, use_timesteps=use)
    kept = list(range(T)) if use is None else sorted(use)
    ab_full = np.cumprod(1 - betas.numpy())[kept]
    ref = ref_tables(1 - ab_full / np.append(1.0, ab_full[:-1]))
    K = len(kept)
    assert diffusion.num_timesteps == K
    assert diffusion.timestep_map.dtype == torch.int64 and diffusion.timestep_map.tolist() == kept
    for key, value in ref.items():
        table = getattr(diffusion, key)
        assert table.dtype == torch.float64 and table.shape == (K,), key
        np.testing.assert_allclose(table.numpy(), value, rtol=1e-10, atol=1e-300, err_msg=key)
    assert np.isfinite(diffusion.posterior_log_variance_clipped.numpy()).all()
    # at t=0 the clipped log-variance is the t=1 posterior value
    assert diffusion.posterior_log_variance_clipped[0] == diffusion.posterior_log_variance_clipped[1]
    assert diffusion.posterior_variance[0] == 0.0


def test_a_linear_schedule_that_would_reach_beta_one_is_refused():
    """ADM scales the linear betas by 1000/T: at T <= 20 beta_T >= 1 erases x_0 in one step (alpha_bar_T = 0, NaN
    VLB); T = 21 is the shortest linear schedule with every beta < 1."""
    with pytest.raises(ValueError, match=r"num_timesteps=20 gives beta_T = 1 >= 1"):
        make_beta_schedule("linear", 20)
    betas = make_beta_schedule("linear", 21)
    assert float(betas.max()) < 1.0 and float(torch.cumprod(1 - betas, 0)[-1]) > 0
