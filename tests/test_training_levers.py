"""The published training levers (issue #22) against their closed forms: Min-SNR / P2 weights for every
target, DDPM-IP's perturbed q_sample moments, immiscible assignment, the LR schedules after warm-up."""

from __future__ import annotations

import itertools
import math
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ddpm_lightning.diffusion import GaussianDiffusion, make_beta_schedule
from ddpm_lightning.diffusion.noise_assignment import assign_noise, immiscible_assignment, perturb_noise
from ddpm_lightning.diffusion.weighting import loss_weight, min_snr_weight, p2_weight, snr_from_alphas_cumprod
from ddpm_lightning.modules.builders import build_diffusion, build_optimizer, make_lr_factor

TARGETS = ("eps", "x0", "v")


def _process(mean_type="eps", **levers) -> GaussianDiffusion:
    return GaussianDiffusion(make_beta_schedule("linear", 100), mean_type=mean_type, **levers)


def _target(diffusion: GaussianDiffusion, x_start, noise, t):
    return {"eps": noise, "x0": x_start, "v": diffusion.get_v(x_start, noise, t)}[diffusion.mean_type]


@pytest.mark.parametrize("weighting", ["min_snr", "p2"])
@given(seed=st.integers(0, 2**16), gamma=st.floats(0.5, 8.0))
def test_weights_are_one_x0_weighting_for_every_target(weighting, seed, gamma):
    """A network with a fixed error in x0 gets the same weighted loss whether it predicts eps, x0 or v."""
    generator = torch.Generator().manual_seed(seed)
    x_start = torch.rand(6, 2, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x_start.shape, generator=generator, dtype=torch.float64)
    t = torch.randint(0, 100, (6,), generator=generator)
    x0_error = 0.1 * torch.randn(x_start.shape, generator=generator, dtype=torch.float64)
    losses = {}
    for mean_type in TARGETS:
        diffusion = _process(mean_type, loss_weighting=weighting, min_snr_gamma=gamma, p2_gamma=gamma / 8)
        x_t = diffusion.q_sample(x_start, t, noise=noise)
        pred_x0 = x_start + x0_error  # the same prediction, expressed in each parameterisation
        prediction = {"eps": diffusion.predict_eps_from_xstart(x_t, t, pred_x0), "x0": pred_x0,
                      "v": diffusion.get_v(pred_x0, diffusion.predict_eps_from_xstart(x_t, t, pred_x0), t)}[mean_type]
        out = diffusion.training_losses(lambda x, s, p=prediction: p, x_start, t, noise=noise)
        mse = ((prediction - _target(diffusion, x_start, noise, t)) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out["mse"], mse)  # the logged MSE stays unweighted
        losses[mean_type] = out["loss"]
    x0_mse = (x0_error ** 2).mean(dim=(1, 2, 3))
    snr = snr_from_alphas_cumprod(diffusion.alphas_cumprod[t])
    x0_weight = snr.clamp(max=gamma) if weighting == "min_snr" else snr / (1 + snr) ** (gamma / 8)
    for mean_type in TARGETS:
        torch.testing.assert_close(losses[mean_type], x0_weight * x0_mse, rtol=1e-9, atol=1e-12, msg=mean_type)


def test_min_snr_closed_forms_per_target():
    snr = torch.tensor([1e-4, 0.5, 5.0, 20.0, 1e4], dtype=torch.float64)
    gamma = 5.0
    torch.testing.assert_close(min_snr_weight(snr, gamma, "eps"), torch.minimum(snr, torch.tensor(gamma)) / snr)
    torch.testing.assert_close(min_snr_weight(snr, gamma, "x0"), torch.minimum(snr, torch.tensor(gamma)))
    torch.testing.assert_close(min_snr_weight(snr, gamma, "v"), torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    # the v weight is not the eps weight (the bug of diffusers #5654 / #9451)
    assert not torch.allclose(min_snr_weight(snr, gamma, "v"), min_snr_weight(snr, gamma, "eps"))
    # zero terminal SNR: the eps weight stays finite (min(1, gamma / SNR))
    assert min_snr_weight(torch.zeros(1, dtype=torch.float64), gamma, "eps").item() == 1.0


def test_p2_closed_forms_per_target():
    snr = torch.tensor([1e-3, 0.3, 1.0, 30.0], dtype=torch.float64)
    k, gamma = 1.0, 0.5
    lam = 1.0 / (k + snr) ** gamma
    torch.testing.assert_close(p2_weight(snr, k, gamma, "eps"), lam)
    torch.testing.assert_close(p2_weight(snr, k, gamma, "x0"), lam * snr)
    torch.testing.assert_close(p2_weight(snr, k, gamma, "v"), lam * snr / (snr + 1))
    # gamma = 0 is L_simple
    torch.testing.assert_close(p2_weight(snr, k, 0.0, "eps"), torch.ones_like(snr))
    torch.testing.assert_close(loss_weight(snr, "none", "v"), torch.ones_like(snr))


def test_training_noise_is_the_draw_of_before_the_levers():
    """Levers off: the same values (and memory format) as ``torch.randn_like(x_start)``, the pre-lever draw."""
    x_start = torch.rand(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(7)
    noise, q_noise = _process().training_noise(x_start)
    torch.manual_seed(7)
    assert torch.equal(noise, torch.randn_like(x_start)) and q_noise is noise
    assert noise.is_contiguous(memory_format=torch.channels_last)


def test_levers_off_is_the_plain_loss_bit_for_bit():
    x_start = torch.rand(4, 1, 4, 4) * 2 - 1
    t = torch.tensor([0, 10, 50, 99])

    def net(x, s):
        return x * 0.5

    torch.manual_seed(3)
    plain = _process().training_losses(net, x_start, t)
    torch.manual_seed(3)
    levers = _process(loss_weighting="none", input_perturbation=0.0, immiscible=False).training_losses(net, x_start, t)
    for key in plain:
        assert torch.equal(plain[key], levers[key])


def test_input_perturbation_moments():
    """q_sample(x0, t, eps + gamma xi) has mean sqrt(ab) x0 and variance (1 - ab)(1 + gamma^2); target stays eps."""
    gamma, n = 0.1, 200_000
    diffusion = _process(input_perturbation=gamma)
    x_start = torch.full((n, 1, 1, 1), 0.3, dtype=torch.float64)
    t = torch.full((n,), 40)
    torch.manual_seed(0)
    noise, q_noise = diffusion.training_noise(x_start)
    torch.manual_seed(0)
    eps = torch.randn(x_start.shape, dtype=torch.float64)
    assert torch.equal(noise, eps)  # target: the first draw, unchanged
    x_t = diffusion.q_sample(x_start, t, noise=q_noise)
    ab = diffusion.alphas_cumprod[40].item()
    se = math.sqrt((1 - ab) * (1 + gamma**2) / n)
    assert abs(x_t.mean().item() - math.sqrt(ab) * 0.3) < 5 * se
    assert abs(x_t.var().item() / ((1 - ab) * (1 + gamma**2)) - 1) < 0.02
    # the perturbation is independent of eps: corr(q_noise - eps, eps) ~ 0, var(q_noise - eps) = gamma^2
    xi = (q_noise - noise).flatten()
    assert abs(xi.var().item() / gamma**2 - 1) < 0.02
    assert abs(torch.corrcoef(torch.stack([xi, noise.flatten()]))[0, 1].item()) < 0.01


def test_input_perturbation_changes_x_t_not_the_target():
    diffusion = _process(input_perturbation=0.1)
    x_start = torch.rand(3, 1, 4, 4) * 2 - 1
    t = torch.tensor([5, 20, 60])
    seen = {}

    def net(x, s):
        seen["x_t"] = x
        return torch.zeros_like(x)

    torch.manual_seed(1)
    out = diffusion.training_losses(net, x_start, t)
    torch.manual_seed(1)
    eps = torch.randn_like(x_start)
    torch.testing.assert_close(out["mse"], (eps ** 2).mean(dim=(1, 2, 3)))  # target: eps itself
    assert not torch.allclose(seen["x_t"], diffusion.q_sample(x_start, t, noise=eps))
    with pytest.raises(ValueError, match="input_perturbation must be >= 0"):
        perturb_noise(eps, -0.1)


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 6))
def test_immiscible_assignment_is_the_optimal_permutation(seed, batch):
    generator = torch.Generator().manual_seed(seed)
    x_start = torch.rand(batch, 1, 3, 3, generator=generator) * 2 - 1
    noise = torch.randn(x_start.shape, generator=generator)
    perm = immiscible_assignment(x_start, noise)
    assert sorted(perm.tolist()) == list(range(batch))  # a permutation: the same set of noises

    def total(p):
        return sum(torch.linalg.vector_norm(x_start[i] - noise[j]).item() for i, j in enumerate(p))

    assert total(perm.tolist()) <= total(range(batch)) + 1e-6  # never farther than the random pairing
    best = min(total(p) for p in itertools.permutations(range(batch)))
    assert total(perm.tolist()) == pytest.approx(best, rel=1e-6)
    assert torch.equal(assign_noise(x_start, noise), noise[perm])
    assert torch.equal(immiscible_assignment(x_start, noise), perm)  # deterministic


def test_immiscible_training_noise_is_the_assigned_draw():
    diffusion = _process(immiscible=True)
    x_start = torch.rand(8, 1, 4, 4) * 2 - 1
    torch.manual_seed(5)
    noise, q_noise = diffusion.training_noise(x_start)
    torch.manual_seed(5)
    eps = torch.randn_like(x_start)
    assert torch.equal(noise, q_noise) and torch.equal(noise, assign_noise(x_start, eps))
    moved = (x_start - noise).flatten(1).norm(dim=1).sum()
    assert moved <= (x_start - eps).flatten(1).norm(dim=1).sum()


@pytest.mark.parametrize(("levers", "match"), [
    ({"loss_weighting": "snr"}, "unknown loss_weighting 'snr'; allowed: none, min_snr, p2"),
    ({"loss_weighting": "min_snr", "loss_type": "vlb"}, "does not have"),
    ({"min_snr_gamma": 0.0}, "min_snr_gamma must be > 0"),
    ({"p2_k": -1.0}, "p2_k and p2_gamma must be >= 0"),
    ({"input_perturbation": -0.1}, "input_perturbation must be >= 0"),
])
def test_bad_lever_values_name_the_allowed_ones(levers, match):
    with pytest.raises(ValueError, match=match):
        _process(**levers)


def test_config_keys_are_constructor_arguments_and_survive_respacing():
    cfg = {"num_timesteps": 50, "mean_type": "v", "loss_weighting": "p2", "p2_k": 2.0, "p2_gamma": 0.5,
           "min_snr_gamma": 3.0, "input_perturbation": 0.1, "immiscible": True}
    diffusion = build_diffusion(cfg)
    expected = {k: cfg[k] for k in diffusion.training_levers}
    assert diffusion.training_levers == expected
    assert diffusion.respace(10).training_levers == expected


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule_after_warmup(schedule):
    factor = make_lr_factor(10, schedule, total_steps=110)
    assert [factor(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert factor(9) == pytest.approx(1.0) and factor(10) == pytest.approx(1.0)
    expected_mid = {"constant": 1.0, "cosine": 0.5, "linear": 0.5}[schedule]
    assert factor(60) == pytest.approx(expected_mid)
    assert factor(110) == pytest.approx(1.0 if schedule == "constant" else 0.0)
    if schedule == "cosine":
        assert factor(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    clone = pickle.loads(pickle.dumps(factor))  # DDP spawn pickles it
    assert [clone(s) for s in range(0, 120, 7)] == [factor(s) for s in range(0, 120, 7)]


def test_lr_schedule_refuses_a_run_without_max_steps():
    with pytest.raises(ValueError, match="neither trainer.max_steps nor trainer.max_time; set one of them"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"lr_schedule": "cosine"}, total_steps=None)
    with pytest.raises(ValueError, match="allowed: constant, cosine, linear"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"lr_schedule": "step"}, total_steps=10)
    scheduler = build_optimizer([torch.nn.Parameter(torch.zeros(1))],
                                {"lr": 1.0, "lr_schedule": "linear", "warmup_steps": 0},
                                total_steps=4)["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(4):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25])
    # a run shorter than its warm-up (a smoke run of the decaying default) only warms up
    short = make_lr_factor(100, "linear", total_steps=4)
    assert [short(s) for s in range(4)] == pytest.approx([0.01, 0.02, 0.03, 0.04])


# ------------------------------------------------------------------------------------------ in training
LEVERS_ON = ["diffusion.loss_weighting=min_snr", "diffusion.input_perturbation=0.1", "diffusion.immiscible=true",
             "optim.lr_schedule=cosine", "optim.warmup_steps=1", "ema.posthoc_sigma_rels=[0.05,0.1]",
             "ema.posthoc_every_n_steps=1", "diffusion.mean_type=v"]


def test_resume_is_exact_with_every_lever_on(tmp_path):
    import csv

    from run_config import TINY, compose_run

    from ddpm_lightning.cli.train import train

    common = [*TINY, *LEVERS_ON, "trainer.deterministic=true", "callbacks.model_checkpoint.every_n_train_steps=2",
              "callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.monitor=null",
              "trainer.val_check_interval=2", "data.random_flip=false"]
    train(compose_run([*common, "trainer.max_steps=4"], tmp_path / "full"))
    # interrupted after step 2 with the same config (max_steps=4: the cosine decay keeps its end), then resumed
    stop = ["allow_any_target=true", "+callbacks.stop._target_=faults.StopAt", "+callbacks.stop.step=2"]
    train(compose_run([*common, "trainer.max_steps=4", *stop], tmp_path / "part"))
    assert torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    train(compose_run([*common, "trainer.max_steps=4", "resume=auto"], tmp_path / "part"))

    def curve(run):
        rows = []
        for path in sorted((run / "csv").glob("version_*/metrics.csv")):
            with open(path) as handle:
                rows += list(csv.DictReader(handle))
        losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        return losses, [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]

    (full, full_lr), (part, part_lr) = curve(tmp_path / "full"), curve(tmp_path / "part")
    assert len(full) == len(part) == 4
    torch.testing.assert_close(torch.tensor(part), torch.tensor(full), rtol=1e-5, atol=1e-6)
    assert part_lr == pytest.approx(full_lr)
    # 1-step warm-up, then a cosine from 1 (step index 1) to 0 at max_steps = 4: 1, 1, 0.75, 0.25
    cosine = [2e-4 * 0.5 * (1 + math.cos(math.pi * max(0, s - 1) / 3)) for s in range(4)]
    assert full_lr == pytest.approx(cosine)
    ckpt_full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt_part = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("posthoc_ema.1.module.") for k in ckpt_full["state_dict"])
    for key, value in ckpt_full["state_dict"].items():
        torch.testing.assert_close(ckpt_part["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for name in ("snapshot-0000002.pt", "snapshot-0000004.pt"):
        a = torch.load(tmp_path / "full" / "posthoc_ema" / name, weights_only=True)["ema"]
        b = torch.load(tmp_path / "part" / "posthoc_ema" / name, weights_only=True)["ema"]
        for key, value in a[0].items():
            torch.testing.assert_close(b[0][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_lr_schedule_without_max_steps_is_one_cli_line(tmp_path):
    import os
    import subprocess
    import sys

    from run_config import TINY

    env = {**os.environ, "WANDB_MODE": "offline"}
    code = "from ddpm_lightning.cli.train import main; main()"
    result = subprocess.run([sys.executable, "-c", code, *TINY, "optim.lr_schedule=linear", "trainer.max_steps=-1",
                             "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/out"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=600, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: optim.lr_schedule=linear decays to the run's end, but the run has neither trainer.max_steps "
        "nor trainer.max_time; set one of them or optim.lr_schedule=constant")


def _timed_trainer(seconds: float, spent: float, monkeypatch):
    """A trainer stand-in with Lightning's Timer ``spent`` seconds into a ``seconds`` budget."""
    import datetime
    import time
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    timer = Timer(duration=datetime.timedelta(seconds=seconds))
    monkeypatch.setattr(time, "monotonic", lambda: 1000.0)
    timer.on_train_start(None, None)
    monkeypatch.setattr(time, "monotonic", lambda: 1000.0 + spent)
    return SimpleNamespace(max_steps=-1, callbacks=[timer], strategy=SimpleNamespace(broadcast=lambda value: value))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_decaying_lr_under_a_time_limit_ends_where_the_time_does(schedule, monkeypatch):
    from types import SimpleNamespace

    from ddpm_lightning.modules.builders import TimeBudget, lr_horizon

    trainer = _timed_trainer(600, 150, monkeypatch)
    steps, budget = lr_horizon(trainer, {"lr_schedule": schedule})
    assert steps is None and isinstance(budget, TimeBudget) and budget.fraction == 0.0
    assert lr_horizon(trainer, {"lr_schedule": "constant"}) == (None, None)  # nothing to decay
    assert lr_horizon(SimpleNamespace(max_steps=100, callbacks=[]), {"lr_schedule": schedule}) == (100, None)
    budget.update(trainer)
    assert budget.fraction == pytest.approx(0.25)
    factor = make_lr_factor(10, schedule, total_steps=None, budget=budget)
    assert factor(3) == pytest.approx(0.4)  # the warm-up is in steps
    at_quarter = {"linear": 0.75, "cosine": 0.5 * (1 + math.cos(math.pi * 0.25))}[schedule]
    assert factor(20) == pytest.approx(at_quarter)
    # with trainer.max_steps too, the nearer end wins: step 60 of 110 is past a quarter of the time
    both = make_lr_factor(10, schedule, total_steps=110, budget=budget)
    assert both(20) == pytest.approx(at_quarter) and both(60) == pytest.approx(0.5)
    monkeypatch.setattr(__import__("time"), "monotonic", lambda: 1000.0 + 700)  # past the budget
    budget.update(trainer)
    assert budget.fraction == 1.0 and factor(25) == pytest.approx(0.0)
    # LambdaLR's checkpoint state carries none of it (a resumed run follows its own config), and it pickles
    scheduler = build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"lr_schedule": schedule},
                                budget=budget)["lr_scheduler"]["scheduler"]
    assert scheduler.state_dict()["lr_lambdas"] == [{}]
    assert pickle.loads(pickle.dumps(factor))(25) == pytest.approx(0.0)


def test_a_decaying_lr_under_max_time_alone_decays_to_the_runs_end(tmp_path):
    """The main job's case: trainer.max_time stops the run and the LR reaches 0 there, whatever the step count.
    The Timer's clock is driven (1 s per batch, tests/clock.py): the 6 s budget is 6 batches on any machine."""
    import csv

    from run_config import TINY, compose_run

    from ddpm_lightning.cli.train import train

    train(compose_run([*TINY, "optim.lr_schedule=linear", "optim.warmup_steps=0", "optim.lr=1e-3",
                       "trainer.max_steps=-1", "trainer.max_epochs=10000", "trainer.max_time=00:00:00:06",
                       "trainer.val_check_interval=1.0", "trainer.check_val_every_n_epoch=1000",
                       "allow_any_target=true", "+callbacks.clock._target_=clock.StepClock",
                       "+callbacks.clock.seconds_per_batch=1"], tmp_path))
    rows = []
    for path in sorted((tmp_path / "csv").glob("version_*/metrics.csv")):
        with open(path) as handle:
            rows += list(csv.DictReader(handle))
    lrs = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    # batch k+1 trains with the LR set after batch k: decayed by the k seconds of the 6 spent (no step horizon)
    assert lrs == pytest.approx([1e-3 * (1 - k / 6) for k in range(6)], rel=1e-9, abs=0), lrs
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # stopped by the time limit
    assert last["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(0.0, abs=1e-15)  # all of the budget spent


def test_ablate_levers_rows_compose_and_each_turns_one_lever(composed):
    from omegaconf import OmegaConf

    from ddpm_lightning.config import CONFIG_DIR

    sweep = OmegaConf.load(f"{CONFIG_DIR}/experiment/ablate_levers.yaml").hydra.sweeper.params
    rows = sweep["+lever"].split(",")
    assert sweep["seed"] == "0,1,2" and rows[0] == "baseline"
    default = composed(["experiment=default"])
    assert default.optim.lr_schedule == "linear"  # what these trials adopted; their baseline is the constant LR before
    base = composed(["experiment=default", "optim.lr_schedule=constant"])
    changed, trainers = {}, []
    for row in rows:
        cfg = composed(["experiment=ablate_levers", f"+lever={row}"])
        assert cfg.model == base.model and cfg.data == base.data  # the default job
        trainers.append(cfg.trainer)
        # every arm snapshots the post-hoc EMAs (an EMA length chosen after training), the regular EMA as the default
        assert list(cfg.ema.posthoc_sigma_rels) == [0.05, 0.1] and cfg.ema.posthoc_every_n_steps == 100
        assert cfg.ema.decay == base.ema.decay
        build_diffusion(OmegaConf.to_container(cfg.diffusion, resolve=True))
        changed[row] = {f"{group}.{k}" for group in ("diffusion", "optim")
                        for k, v in cfg[group].items() if v != base[group][k]}
    assert changed["baseline"] == set()
    assert changed["min_snr"] == {"diffusion.loss_weighting"} and changed["immiscible"] == {"diffusion.immiscible"}
    assert changed["lr_cosine"] == {"optim.lr_schedule"} and changed["p2"] == {"diffusion.loss_weighting"}
    assert changed["input_perturbation"] == {"diffusion.input_perturbation"}
    # every arm trains the same pinned step budget (the LR rows decay to it), validated and scored once at the end
    assert all(t == trainers[0] for t in trainers) and trainers[0].max_steps < base.trainer.max_steps
    assert trainers[0].val_check_interval == trainers[0].max_steps
    # a combination arm selects several levers at once
    both = composed(["experiment=ablate_levers", "+lever=[min_snr,lr_cosine]"])
    assert (both.diffusion.loss_weighting, both.optim.lr_schedule) == ("min_snr", "cosine")
    assert both.trainer == trainers[0]


@pytest.mark.parametrize("mean_type", TARGETS)
@pytest.mark.parametrize(("var_type", "loss_type"), [("fixed_small", "simple"), ("learned_range", "hybrid"),
                                                     ("learned", "simple")])
@pytest.mark.parametrize("weighting", ["min_snr", "p2"])
def test_every_combination_with_levers_on_has_finite_loss_and_gradients(mean_type, var_type, loss_type, weighting):
    diffusion = GaussianDiffusion(make_beta_schedule("cosine", 50), mean_type=mean_type, var_type=var_type,
                                  loss_type=loss_type, loss_weighting=weighting, input_perturbation=0.1,
                                  immiscible=True)
    channels = 2 if var_type == "fixed_small" else 4
    net = torch.nn.Conv2d(2, channels, 3, padding=1)
    x_start = torch.rand(5, 2, 6, 6) * 2 - 1
    t = torch.tensor([0, 1, 20, 48, 49])
    out = diffusion.training_losses(lambda x, s: net(x), x_start, t)
    assert out["loss"].shape == (5,) and torch.isfinite(out["loss"]).all()
    out["loss"].mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
