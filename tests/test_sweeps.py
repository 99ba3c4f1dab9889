"""Sweeps end to end on tiny configs: multirun + ddpm-report (failed run listed, best marked), W&B grouping, the
submitit / joblib launchers and the Optuna sweeper; the ablation experiments' rows compose and build; the report
on partial sweeps (running, incomplete, failed)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from run_config import TINY, compose_hydra

from ddpm_lightning.cli.report import main as report_main
from ddpm_lightning.config import CONFIG_DIR
from ddpm_lightning.modules.builders import build_diffusion, build_unet, learns_sigma
from ddpm_lightning.reporting import (
    VERDICTS,
    build_table,
    collect_runs,
    metric_mode,
    read_run,
    to_markdown,
    write_report,
)

# numbered job folders: a long command line would make Hydra's default `<num>_<overrides>` name too long
SWEEP = ["callbacks=metrics", "hydra.sweep.subdir=${hydra.job.num}"]


def _sweep_values(cfg, key: str) -> list[str]:
    """The values a composed sweep (``compose_hydra`` / ``composed(..., hydra=True)``) runs for ``key``."""
    return str(cfg.hydra.sweeper.params[key]).split(",")


ARCH_ROWS = _sweep_values(compose_hydra(["experiment=ablate_arch"]), "model")  # at collection: parametrize ids


def _ddpm_train(*args: str, sweep_dir: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(sweep_dir.parent / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags go before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run([sys.executable, "-m", "ddpm_lightning.train", *flags, *TINY, *SWEEP, *overrides,
                           f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, timeout=timeout,
                          cwd=sweep_dir.parent, env=env)


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


# ------------------------------------------------------------------------------------ end to end
def test_multirun_report_lists_failed_run_and_marks_best(tmp_path):
    sweep = tmp_path / "sweep"
    # job 1's data set is too small for its batch: found only once its data loads (a config typo would stop
    # the whole sweep before its first job: test_sweep_with_a_bad_option_in_a_later_job_starts_no_job)
    done = _ddpm_train("-m", "logger=many", "data.limit=96,5,90", sweep_dir=sweep)
    # Hydra's basic launcher runs every job of the sweep (job 2 after the failed job 1), then re-raises the
    # first failure (exit code != 0)
    assert done.returncode != 0, done.stderr[-2000:]
    assert "fewer than batch_size=8" in done.stderr
    # the EMA copy is in eval mode by design: Lightning's "modules in eval mode" alarm is not shown to users
    assert "in eval mode at the start of training" not in done.stderr + done.stdout
    for job in ("0", "2"):
        summary = _summary(sweep / job)
        assert summary["status"] == "completed"
        assert summary["num_parameters"] > 0 and summary["train_seconds"] > 0
        assert "val/fid@6" in summary["metrics"] and "val/vlb_bpd" in summary["metrics"]
    assert _summary(sweep / "1")["status"] == "failed"

    # W&B: one offline run per job (not one run reused by the next job), grouped by sweep, overrides as tags
    for job, limit in (("0", "96"), ("2", "90")):
        runs = list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, f"job {job}: {runs}"
        record = runs[0].read_bytes()
        assert b"train-sweep" in record  # group: task name + sweep folder
        assert f"data.limit={limit}".encode() in record  # its own override as a tag

    out = tmp_path / "report"
    report_main([str(sweep), "--out", str(out)])
    markdown = (out / "report.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| job")]
    assert len(rows) == 3
    assert "val/fid@6" in markdown and "FID@6" in markdown and "NLL bpd" in markdown
    assert sum("★ best" in row for row in rows) == 1
    assert "failed: digits: the training split has" in rows[1] and "fewer than batch_size=8" in rows[1]
    with open(out / "report.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["data.limit"] for r in table] == ["96", "5", "90"]
    assert [r["status"] for r in table] == ["completed", "failed", "completed"]
    assert sum(int(r["best"]) for r in table) == 1
    best = min(table[::2], key=lambda r: float(r["val/fid@6"]))
    assert best["best"] == "1"
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_submitit_local_launcher_runs_a_job(tmp_path):
    sweep = tmp_path / "sweep"
    done = _ddpm_train("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", sweep_dir=sweep)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _summary(sweep / "0")["status"] == "completed"
    assert list((sweep / ".submitit").glob("*/*_result.pkl")), "submitit did not run the job in a subprocess"


def test_optuna_search_with_parallel_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    done = _ddpm_train("hparams_search=optuna", "hydra/launcher=parallel", "hydra.sweeper.n_trials=2",
                       "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.n_startup_trials=1", sweep_dir=sweep)
    assert done.returncode == 0, done.stderr[-2000:]
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    values = [_summary(sweep / job)["metrics"]["val/vlb_bpd"] for job in ("0", "1")]
    assert results.best_value == pytest.approx(min(values))  # the objective is optimized_metric
    assert set(results.best_params) == {"optim.lr", "ema.decay", "model.dropout"}
    table = build_table(collect_runs(sweep), sweep)
    assert "optim.lr" in table.varying and "Optuna: best value" in to_markdown(table)


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("row", ARCH_ROWS)
def test_ablate_arch_rows_build_at_experiment_size(row, composed):
    cfg = composed(["experiment=ablate_arch", f"model={row}"])
    assert cfg.model.class_cond and cfg.data._target_.endswith("AnimalMNISTDataModule")
    assert cfg.callbacks.generative_metrics.num_samples == 200
    assert cfg.trainer.val_check_interval == cfg.trainer.max_steps
    model = OmegaConf.to_container(cfg.model, resolve=True)
    net = build_unet(model, image_size=32, channels=1, num_classes=10, learn_sigma=learns_sigma(cfg.diffusion))
    assert sum(p.numel() for p in net.parameters()) > 0


def test_ablate_arch_covers_the_paper_rows_and_no_two_rows_build_the_same_network(composed):
    rows = ARCH_ROWS
    assert rows[0] == "ddpm_base" and rows[-1] == "adm"
    assert {"adm_depth", "adm_heads", "adm_head_channels32", "adm_attn_multires",
            "adm_biggan", "adm_adagn", "adm_rescale"} <= set(rows)
    built = {}
    for row in rows + ["adm_head_channels64"]:
        cfg = composed(["experiment=ablate_arch", f"model={row}"])
        model = OmegaConf.to_container(cfg.model, resolve=True)
        torch.manual_seed(0)
        net = build_unet(model, image_size=32, channels=1, num_classes=10, learn_sigma=False).eval()
        with torch.no_grad():  # the same function: same parameter shapes and, from the same init, the same output
            for module in net.modules():  # zero-initialised output layers would hide every difference
                for param in module.parameters(recurse=False):
                    if not param.abs().sum():
                        param.normal_(0, 0.02)
            out = net(torch.linspace(-1, 1, 2 * 32 * 32).reshape(2, 1, 32, 32), torch.tensor([10, 500]),
                      y=torch.tensor([1, 7]))
        built[row] = (tuple((name, tuple(p.shape)) for name, p in net.named_parameters()), out)
    for i, a in enumerate(rows):  # three seeds of a duplicate row would be wasted compute
        for b in rows[i + 1:]:
            same = built[a][0] == built[b][0] and torch.allclose(built[a][1], built[b][1])
            assert not same, f"{a} and {b} build the same network"
    # 64 channels per head at 64 channels is one head: the baseline itself at this width, so it is not swept
    assert built["adm_head_channels64"][0] == built["ddpm_base"][0]
    assert torch.allclose(built["adm_head_channels64"][1], built["ddpm_base"][1])


def test_ablate_loss_rows_are_distinct_and_build(composed):
    rows = _sweep_values(composed(["experiment=ablate_loss"], hydra=True), "diffusion")
    settings = {}
    for row in rows:
        cfg = composed(["experiment=ablate_loss", f"diffusion={row}"])
        diffusion = OmegaConf.to_container(cfg.diffusion, resolve=True)
        build_diffusion(diffusion)  # valid values
        settings[row] = (diffusion["schedule"], diffusion["mean_type"], diffusion["var_type"], diffusion["loss_type"])
    assert len(set(settings.values())) == len(rows) == 8
    assert settings["ddpm"] == ("linear", "eps", "fixed_small", "simple")
    assert settings["improved"] == ("cosine", "eps", "learned_range", "hybrid")
    assert settings["vlb"] == ("cosine", "eps", "learned_range", "vlb")
    values = {field: {s[i] for s in settings.values()} for i, field in enumerate(("schedule", "mean", "var", "loss"))}
    assert values["loss"] == {"simple", "hybrid", "vlb"} and values["mean"] == {"eps", "x0"}
    assert {"fixed_small", "fixed_large", "learned", "learned_range"} == values["var"]


def test_diffusion_rows_extend_a_base_with_the_keys_that_change():
    """Each loss row restates only what differs from the config it extends (Hydra's extend-a-base pattern)."""
    folder = Path(CONFIG_DIR) / "diffusion"
    for path in folder.glob("*.yaml"):
        node = OmegaConf.load(path)
        if path.stem == "ddpm":
            continue  # the base: every key
        (base,) = [entry for entry in node.defaults if entry != "_self_"]
        own = {key for key in node if key != "defaults"}
        assert 1 <= len(own) <= 3, (path.name, own)
        assert (folder / f"{base}.yaml").exists()


def test_classifier_configs_build_an_encoder_unet(composed):
    from ddpm_lightning.modules.builders import build_encoder_unet

    for name in ("default", "wide"):
        cfg = composed(["objective=classifier", f"classifier={name}"])
        args = {k: v for k, v in OmegaConf.to_container(cfg.classifier, resolve=True).items() if k != "max_t"}
        net = build_encoder_unet(args, image_size=32, channels=1, num_classes=10)
        assert sum(p.numel() for p in net.parameters()) > 0
    assert not (Path(CONFIG_DIR) / "model" / "classifier.yaml").exists()  # not a UNet config


def test_the_slurm_launcher_follows_the_trainer_and_optuna_searches_the_objective(composed):
    slurm = composed(["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=4", "hydra.launcher.gpus_per_node=8",
                      "hydra.launcher.partition=gpu"], hydra=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.nodes, slurm.gpus_per_node, slurm.tasks_per_node, slurm.partition) == (4, 8, 8, "gpu")
    assert composed(["hydra/launcher=slurm"], hydra=True).hydra.launcher.nodes == 1  # no trainer.num_nodes: 1 node
    assert composed(["hydra/launcher=parallel"], hydra=True).hydra.launcher.n_jobs == 2
    optuna = composed(["hparams_search=optuna", "optimized_metric=val/fid@500"], hydra=True)
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper") and optuna.hydra.mode.name == "MULTIRUN"
    assert set(optuna.hydra.sweeper.params) == {"optim.lr", "ema.decay", "model.dropout"}
    assert optuna.optimized_metric == "val/fid@500"


# ------------------------------------------------------------------------------------ report on partial sweeps
def _job(root: Path, num: int, overrides: list[str], summary: dict | None = None, error: str | None = None,
         metrics_json: dict | None = None) -> Path:
    folder = root / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if error is not None:
        (folder / "error.txt").write_text(error)
    if metrics_json is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics_json))
    return folder


def test_report_statuses_of_a_partial_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    done = {"status": "completed", "global_step": 300, "num_parameters": 2_000_000, "train_seconds": 180.0}
    _job(sweep, 0, ["model=ddpm_base", "seed=1"], {**done, "metrics": {"val/vlb_bpd": 5.0}},
         metrics_json={"global_step": 300, "num_samples": 200, "val/fid@200": 80.0, "val/is_clf_mean@200": 3.0})
    _job(sweep, 1, ["model=adm", "seed=1"], {"global_step": 300, "metrics": {"val/vlb_bpd": 5.5, "val/fid@200": 60.0,
                                                                             "val/is_clf_mean@200": 2.0}})
    _job(sweep, 2, ["model=adm_heads", "seed=1"], error="RuntimeError: out of memory\n")
    _job(sweep, 3, ["model=adm_rescale", "seed=1"], {"status": "failed", "error": "diverged | at step 7"})
    running = _job(sweep, 4, ["model=adm_biggan", "seed=1"])
    old = _job(sweep, 5, ["model=adm_depth", "seed=1"])
    stale = time.time() - 7200
    for path in [old, *old.rglob("*")]:
        os.utime(path, (stale, stale))
    runs = collect_runs(sweep, stale_after_s=3600)
    assert [r.status for r in runs] == ["completed", "completed", "failed", "failed", "running", "incomplete"]
    assert runs[0].metrics["val/fid@200"] == 80.0  # from metrics.json
    assert runs[2].message == "RuntimeError: out of memory"
    assert read_run(running).status == "running"

    table = build_table(runs, sweep)
    assert table.metric == "val/fid@200" and table.best == 1 and table.varying == ["model"]
    assert table.common == ["seed=1"]
    by_is = build_table(runs, sweep, metric="val/is_clf_mean@200")
    assert by_is.mode == "max" and by_is.best == 0
    assert build_table(runs, sweep, metric="val/vlb_bpd", mode="max").best == 1
    markdown = to_markdown(table)
    assert "diverged \\| at step 7" in markdown  # a | in a message does not break the table
    assert "| 1 | **adm** | done ★ best" in markdown and "**60.00**" in markdown

    report_main([str(sweep), "--metric", "val/vlb_bpd", "--no-plot"])
    printed = capsys.readouterr().out
    assert "Ranked by `val/vlb_bpd` (lower is better); best: job 0" in printed
    assert not (sweep / "report.png").exists() and (sweep / "report.md").is_file()


def test_report_of_a_sweep_without_results_yet(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["model=adm"])
    _job(sweep, 1, ["model=ddpm_base"], error="bad value")
    result = write_report(sweep)
    assert result["table"].best is None and result["paths"]["plot"].is_file()
    assert "1 running, 1 failed" in result["markdown"] or "1 failed, 1 running" in result["markdown"]


def test_report_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        report_main([str(tmp_path / "empty")])
    assert "no job folders" in capsys.readouterr().err
    _job(tmp_path / "sweep", 0, ["model=adm"], {"status": "completed", "metrics": {"val/vlb_bpd": 5.0}})
    with pytest.raises(SystemExit):
        report_main([str(tmp_path / "sweep"), "--metric", "val/fid@50k"])
    assert "available: val/vlb_bpd" in capsys.readouterr().err


def test_metric_direction():
    assert [metric_mode(m) for m in ("val/fid@200", "val/vlb_bpd", "val/kid_mean@2k")] == ["min"] * 3
    assert [metric_mode(m) for m in ("val/is_clf_mean@200", "val/precision@200", "val/recall@1k")] == ["max"] * 3


def test_wandb_names_groups_and_tags_a_sweep_job(tmp_path, composed):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from ddpm_lightning.loggers import wandb_defaults

    long_override = "paths.data_dir=/" + "x" * 80
    cfg = composed(["experiment=ablate_loss", "logger=many", "diffusion=vlb", long_override], hydra=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "2026-01-01_00-00-00")
        cfg.hydra.job.override_dirname = "diffusion=vlb"
    HydraConfig.instance().set_config(cfg)
    node = OmegaConf.to_container(wandb_defaults(cfg.logger.wandb, cfg))
    assert node["group"] == "ablate_loss-2026-01-01_00-00-00" and node["name"] == "diffusion=vlb"
    assert node["tags"][:2] == ["ablate_loss", "animal_mnist"]  # the experiment's tags, then the overrides
    assert "diffusion=vlb" in node["tags"] and all(len(tag) <= 64 for tag in node["tags"])
    assert node["config"]["overrides"]["diffusion"] == "vlb"


@pytest.mark.parametrize(("mode", "expected"), [("RUN", False), ("MULTIRUN", True)])
def test_missing_objective_is_reported_only_in_sweeps(mode, expected, composed):
    """A single run does not read ``optimized_metric``: no message about it there."""
    from hydra.core.hydra_config import HydraConfig

    from ddpm_lightning.cli.errors import in_multirun

    cfg = composed([], hydra=True)
    cfg.hydra.mode = mode
    HydraConfig.instance().set_config(cfg)
    try:
        assert in_multirun() is expected
    finally:
        HydraConfig.instance().cfg = None


def test_missing_objective_message_says_what_to_change(composed):
    from ddpm_lightning.cli.train import missing_objective_message

    cfg = composed(["trainer.max_steps=20", "trainer.val_check_interval=500"], hydra=True)
    no_validation = missing_objective_message("val/vlb_bpd", {"train/loss": 0.5}, cfg)
    assert "no validation ran" in no_validation and "trainer.max_steps=20" in no_validation
    assert "lower trainer.val_check_interval" in no_validation
    wrong_name = missing_objective_message("val/fid@50", {"val/vlb_bpd": 1.0, "train/loss": 0.5}, cfg)
    assert wrong_name.endswith("set optimized_metric to one of: train/loss, val/vlb_bpd")


# ------------------------------------------------------------------------------------ seeds as an axis
@pytest.mark.parametrize(("experiment", "key", "seed_key"), [("ablate_arch", "model", "seed"),
                                                             ("ablate_loss", "diffusion", "seed")])
def test_ablation_experiments_sweep_three_training_seeds_first(experiment, key, seed_key, composed):
    cfg = composed([f"experiment={experiment}"], hydra=True)
    assert list(cfg.hydra.sweeper.params)[:2] == [seed_key, key]  # seed-major: an interrupted sweep has whole seeds
    assert _sweep_values(cfg, seed_key) == ["0", "1", "2"]


def test_two_seed_multirun_reports_rows_over_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    done = _ddpm_train("-m", "seed=0,1", "diffusion.schedule=linear,cosine", sweep_dir=sweep)
    assert done.returncode == 0, done.stderr[-2000:]
    fids = {}
    for job in range(4):
        overrides = _summary(sweep / str(job))
        assert overrides["status"] == "completed"
        fids[job] = overrides["metrics"]["val/fid@6"]
    assert fids[0] != fids[2] and fids[1] != fids[3]  # the training seed changes the network

    result = write_report(sweep, make_plot=True)
    rows = result["aggregate"]
    assert rows.unit_kind == "training seed" and rows.seed_axes == ["seed"]
    assert [g.label for g in rows.groups] == ["diffusion.schedule=linear", "diffusion.schedule=cosine"]
    for group in rows.groups:
        stats = group.stats["val/fid@6"]
        assert stats.n == 2 and stats.low < stats.mean < stats.high
    cosine = rows.groups[1].vs_baseline["val/fid@6"]
    assert cosine.diff.n == 2 and cosine.diff.mean == pytest.approx((fids[1] - fids[0] + fids[3] - fids[2]) / 2)
    assert cosine.verdict in VERDICTS and result["missing"] == []
    markdown = result["markdown"]
    assert "Seeds: `seed` = 0, 1 (training seed)" in markdown and "Paired differences against the baseline" in markdown
    assert "| linear (baseline) | 2/2 |" in markdown.replace(" ★ best", "").replace(" ≈ tied", "").replace("**", "")
    assert result["paths"]["summary_csv"].is_file() and result["paths"]["plot"].is_file()

    # an interrupted sweep: the last job never started
    import shutil

    shutil.rmtree(sweep / "3")
    out = tmp_path / "partial"
    report_main([str(sweep), "--out", str(out), "--no-plot"])
    markdown = (out / "report.md").read_text()
    assert "Partial sweep: 1 of 4 jobs have no folder yet (not started): seed=1 diffusion.schedule=cosine" in markdown
    assert "1/2: seed=1 missing" in markdown
