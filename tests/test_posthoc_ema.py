"""Post-hoc EMA (EDM2): the sigma_rel <-> gamma closed form, the power profile = the tracked recursion, the
least-squares reconstruction against directly tracked EMAs, and the run -> snapshots -> checkpoint -> ddpm-eval
/ ddpm-sample path end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_config import TINY, compose_run
from torch import nn

from ddpm_lightning.cli.posthoc_ema import COARSE_FIT
from ddpm_lightning.cli.train import train
from ddpm_lightning.diffusion.posthoc_ema import (
    gamma_to_sigma_rel,
    power_ema_weight,
    power_profile,
    sigma_rel_to_gamma,
    solve_posthoc_weights,
)
from ddpm_lightning.modules.checkpoint import load_diffusion_module
from ddpm_lightning.modules.ema import make_posthoc_emas, make_power_ema, reconstruct_ema, save_snapshot


def test_sigma_rel_gamma_closed_form():
    # EDM2's pairs: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.07, 0.2, math.sqrt(1 / 12)):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    gamma = 4.0  # sigma_rel is the profile's std / t
    k = torch.arange(1, 100_001, dtype=torch.float64)
    w = power_profile(100_000, gamma, k)
    mean = (w * k).sum()
    assert math.sqrt(float((w * (k - mean) ** 2).sum())) / 100_000 == pytest.approx(gamma_to_sigma_rel(gamma),
                                                                                    rel=1e-3)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match=r"sigma_rel must lie in \(0, 0.2887\]"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("gamma", [0.0, 6.94, 16.97])
def test_power_profile_is_the_tracked_recursion(gamma):
    """Unrolling theta_hat(t) = beta(t) theta_hat(t-1) + (1 - beta(t)) theta(t) gives w_{gamma,t}(k); sums to 1."""
    t = 40
    weights = torch.zeros(t, dtype=torch.float64)
    for step in range(1, t + 1):
        update = power_ema_weight(torch.tensor(step), gamma)
        weights *= 1 - update
        weights[step - 1] = update
    profile = power_profile(t, gamma, torch.arange(1, t + 1))
    torch.testing.assert_close(profile, weights, rtol=1e-12, atol=1e-15)
    assert float(profile.sum()) == pytest.approx(1.0, rel=1e-12)
    assert float(power_profile(t, gamma, torch.tensor([t + 1]))) == 0.0


def _toy_run(folder: Path, steps: int, every: int, direct_sigma_rels, record_at=()):
    """A parameter trajectory with momentum (like training), power EMAs snapshotted every ``every`` steps, and
    EMAs of other lengths tracked directly by the same update rule."""
    torch.manual_seed(0)
    net = nn.Linear(16, 16)
    emas = make_posthoc_emas(net, [0.05, 0.10], every)
    direct = {s: make_power_ema(net, s) for s in direct_sigma_rels}
    velocity = torch.zeros(sum(p.numel() for p in net.parameters()))
    recorded = {}
    for step in range(1, steps + 1):
        with torch.no_grad():
            velocity = 0.9 * velocity + 0.1 * torch.randn_like(velocity)
            flat = nn.utils.parameters_to_vector(net.parameters()) + 0.01 * velocity
            nn.utils.vector_to_parameters(flat, net.parameters())
        for ema in [*emas, *direct.values()]:
            ema.update_parameters(net)
        if step % every == 0:
            save_snapshot(folder, emas, step)
        if step in record_at:
            recorded[step] = {s: {k: v.clone() for k, v in e.module.state_dict().items()} for s, e in direct.items()}
    return net, direct, recorded


def _relative_error(state, reference, current) -> float:
    """||reconstruction - direct|| over ||current weights - direct|| (how far the EMA is from the raw weights:
    a much stricter scale than the weights' own norm)."""
    num = sum(float(((state[k].double() - reference[k].double()) ** 2).sum()) for k in reference)
    den = sum(float(((current[k].double() - reference[k].double()) ** 2).sum()) for k in reference)
    return math.sqrt(num / den)


def test_reconstruction_matches_directly_tracked_emas(tmp_path):
    net, direct, recorded = _toy_run(tmp_path, steps=1000, every=10, direct_sigma_rels=(0.07, 0.15, 0.10),
                                     record_at=(500,))
    for sigma_rel in (0.07, 0.15, 0.10):  # 0.07, 0.15: never tracked as snapshots; 0.10: one of them
        state, info = reconstruct_ema(tmp_path, sigma_rel)
        assert info["step"] == 1000 and info["num_snapshots"] == 100 and info["fit_error"] < 1e-3
        error = _relative_error(state, direct[sigma_rel].module.state_dict(), net.state_dict())
        assert error < 1e-4, (sigma_rel, error)
    state, info = reconstruct_ema(tmp_path, 0.07, step=500)  # an earlier point of the run
    assert info["step"] == 500 and info["num_snapshots"] == 50
    reference = recorded[500][0.07]
    assert math.sqrt(sum(float(((state[k] - v) ** 2).sum()) for k, v in reference.items())) < 1e-4 * math.sqrt(
        sum(float((v ** 2).sum()) for v in reference.values()))
    # snapshots: tensors and primitives only, nothing half-written left behind
    payload = torch.load(tmp_path / "snapshot-0000010.pt", weights_only=True)
    assert payload["step"] == 10 and payload["sigma_rels"] == pytest.approx([0.05, 0.10])
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_reconstruction_of_a_tracked_profile_is_exact():
    """A tracked profile is one of the snapshots: x = e_3 and the residual is 0 in exact arithmetic. In float64
    the solve's error is bounded by the Gram matrix's condition number times eps (backward-stable lstsq), and
    the residual, summed from the profiles themselves, by that error times ||P|| / ||w_r|| (here ~1): a bound
    from the problem, not a number fitted to one CPU (the old x'Ax - 2x'b + ||w_r||^2 floor, ~1.5e-8 = sqrt(eps),
    failed on an AMX Xeon)."""
    steps, gammas = [100, 200, 200, 300], [6.94, 6.94, 16.97, 16.97]
    weights, fit_error = solve_posthoc_weights(steps, gammas, 200, 16.97)
    k = torch.arange(1, 301, dtype=torch.float64)
    profiles = torch.stack([power_profile(s, g, k) for s, g in zip(steps, gammas, strict=True)])
    bound = 100 * float(torch.linalg.cond(profiles @ profiles.T)) * torch.finfo(torch.float64).eps  # ~6e-13
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64), atol=bound, rtol=0)
    scale = float(torch.linalg.matrix_norm(profiles, ord=2) / power_profile(200, 16.97, k).norm())
    assert fit_error < bound * scale, (fit_error, bound * scale)


def test_reconstruction_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="ema.posthoc_sigma_rels"):
        reconstruct_ema(tmp_path / "missing", 0.1)
    (tmp_path / "snapshot-0000005.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="snapshot-0000005.pt is unreadable"):
        reconstruct_ema(tmp_path, 0.1)
    with pytest.raises(ValueError, match=r"no snapshot at step 7 .* \(the last one before it: step 5\)"):
        reconstruct_ema(tmp_path, 0.1, step=7)
    with pytest.raises(ValueError, match="ema.posthoc_every_n_steps must be >= 1"):
        make_posthoc_emas(nn.Linear(2, 2), [0.1], 0)


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("posthoc_run")
    train(compose_run([*TINY, "ema.posthoc_sigma_rels=[0.05,0.1]", "ema.posthoc_every_n_steps=3",
                       "trainer.max_steps=4"], out))
    return out


def _cli(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(cwd / "cache")}
    code = f"from ddpm_lightning.cli.{tool} import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args, f"hydra.run.dir={cwd}/out"], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env=env)


def test_training_writes_snapshots_of_the_tracked_emas(posthoc_run):
    names = sorted(os.listdir(posthoc_run / "posthoc_ema"))
    assert names == ["snapshot-0000003.pt", "snapshot-0000004.pt"]  # every 3 steps + the end
    last = torch.load(posthoc_run / "posthoc_ema" / "snapshot-0000004.pt", weights_only=True)
    ckpt = torch.load(posthoc_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == last["global_step"] == last["step"] == 4
    for index in range(2):
        for key, value in last["ema"][index].items():
            assert torch.equal(ckpt["state_dict"][f"posthoc_ema.{index}.module.{key}"], value), key


def test_tracking_post_hoc_emas_leaves_training_unchanged(posthoc_run, tmp_path):
    """The lever trials track the power EMAs in every arm: the network and its regular EMA must be bit-identical
    to the same run without them."""
    train(compose_run([*TINY, "trainer.max_steps=4"], tmp_path))
    plain = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    tracked = torch.load(posthoc_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {k for k in tracked if not k.startswith("posthoc_ema.")} == set(plain)
    assert any(k.startswith("ema") for k in plain)
    for key, value in plain.items():
        assert torch.equal(tracked[key], value), key


def test_cli_reconstructs_checkpoints_that_eval_and_sample_load(posthoc_run, tmp_path):
    ckpt = posthoc_run / "checkpoints" / "last.ckpt"
    result = _cli("posthoc_ema", f"ckpt={ckpt}", "sigma_rels=[0.07,0.1]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "posthoc_ema.json").read_text())
    assert [r["sigma_rel"] for r in summary["results"]] == [0.07, 0.1]
    # the tracked length comes back as the tracked EMA (its profile at step 4 is one of the snapshots)
    rebuilt = load_diffusion_module(summary["results"][1]["ckpt"])
    tracked = torch.load(ckpt, weights_only=True)["state_dict"]
    for key, value in rebuilt.ema.module.state_dict().items():
        torch.testing.assert_close(value, tracked[f"posthoc_ema.1.module.{key}"], rtol=1e-5, atol=1e-6)
    other = load_diffusion_module(summary["results"][0]["ckpt"])
    assert not torch.equal(next(other.ema.module.parameters()), next(rebuilt.ema.module.parameters()))
    sampled = _cli("sample", f"ckpt={summary['results'][0]['ckpt']}", "num_samples=2", "steps=2",
                   cwd=tmp_path / "sample")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert (tmp_path / "sample" / "out" / "samples.npz").is_file()


def test_eval_sweeps_reconstructed_ema_lengths(posthoc_run, tmp_path):
    """One training run, several EMA lengths scored: ``ddpm-eval -m ... ema_sigma_rel=a,b``."""
    ckpt = posthoc_run / "checkpoints" / "last.ckpt"
    result = _cli("evaluate", "-m", f"ckpt={ckpt}", "ema_sigma_rel=0.07,0.28", "num_samples=6", "steps=2",
                  "feature=tiny", "reference_n=24", "metrics=[fid]", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    scored, coarse = {}, []
    for job in ("0", "1"):
        results = json.loads((tmp_path / "sweep" / job / "results.json").read_text())
        assert results["posthoc_ema"]["step"] == 4 and "fid@6" in results["metrics"]
        scored[results["posthoc_ema"]["sigma_rel"]] = results["metrics"]["fid@6"]
        # a coarse profile fit (0.28 from snapshots of 0.05 and 0.1) is said on stderr, a good one is not
        info = results["posthoc_ema"]
        message = f"coarse fit for sigma_rel={info['sigma_rel']:.4f} (profile error {info['fit_error']:.2e}"
        said = message in result.stderr
        assert said == (info["fit_error"] > COARSE_FIT), (info, result.stderr[-2000:])
        coarse.append(info["fit_error"] > COARSE_FIT)
    assert set(scored) == {0.07, 0.28}
    assert any(coarse)  # the case the message is for occurs
    bad = _cli("evaluate", f"ckpt={ckpt}", "ema_sigma_rel=0.5", "metrics=[fid]", cwd=tmp_path / "bad")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [  # checked with the other keys, before the checkpoint is read
        "error: ema_sigma_rel must be a number in (0, 0.2887] (the EMA length relative to the run; 0.2887 = the "
        "plain average of every step), got 0.5; e.g. 0.05-0.2"]


def test_a_checkpoint_gets_the_ema_of_its_own_step(posthoc_run):
    from ddpm_lightning.cli.posthoc_ema import snapshot_step

    folder = posthoc_run / "posthoc_ema"
    assert snapshot_step(folder, {"global_step": 3}, None) == 3  # an earlier checkpoint: its own point in the run
    assert snapshot_step(folder, {"global_step": 4}, None) == 4
    assert snapshot_step(folder, {}, None) == 4 and snapshot_step(folder, {"global_step": 4}, 3) == 3
    state, info = reconstruct_ema(folder, 0.1, step=3)
    snapshot = torch.load(folder / "snapshot-0000003.pt", weights_only=True)["ema"][1]
    for key, value in snapshot.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
