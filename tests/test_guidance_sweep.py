"""The guidance trade-off sweep: `ddpm-eval -m experiment=guidance_sweep` then `ddpm-report` on its folder."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from run_config import TINY, compose_run

from ddpm_lightning.reporting import build_table, collect_runs, guidance_key, write_report

CLASSIFIER_TINY = ["experiment=classifier_default", "debug=fast", "data=digits", "data.image_size=16",
                   "data.batch_size=8", "data.limit=96", "classifier.channel_mult=[1,2]",
                   "classifier.attention_resolutions=[8]", "diffusion.num_timesteps=50", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", "logger=csv"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    from ddpm_lightning.cli.train import train

    model_dir, classifier_dir = tmp_path_factory.mktemp("model"), tmp_path_factory.mktemp("classifier")
    train(compose_run([*TINY, "model.class_cond=true", "diffusion.schedule=cosine"], model_dir))
    train(compose_run(CLASSIFIER_TINY, classifier_dir))
    return model_dir / "checkpoints" / "last.ckpt", classifier_dir / "checkpoints" / "last.ckpt"


def _eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(cwd / "cache")}
    code = "from ddpm_lightning.cli.evaluate import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


def test_guidance_sweep_runs_and_reports(checkpoints, tmp_path):
    model, classifier = checkpoints
    sweep_dir = tmp_path / "sweep"
    result = _eval("-m", "experiment=guidance_sweep", f"ckpt={model}", f"guidance.classifier_ckpt={classifier}",
                   "guidance.scale=0,10000", "guidance.interval=null", "sample.seed=0", "num_samples=10", "steps=2",
                   "feature=tiny",
                   "reference_n=24",
                   "classifier_epochs=1", "batch_size=10", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, scale in enumerate(("0", "10000")):
        overrides = yaml.safe_load((sweep_dir / str(job) / ".hydra" / "overrides.yaml").read_text())
        assert f"guidance.scale={scale}" in overrides
        saved = json.loads((sweep_dir / str(job) / "results.json").read_text())
        assert saved["guidance"]["scale"] == float(scale) and saved["guidance"]["classifier_ckpt"] == str(classifier)
        assert saved["outputs"]["samples"].endswith("samples.npz")

    report = write_report(sweep_dir)
    table = report["table"]
    assert [run.status for run in table.runs] == ["completed", "completed"]
    assert table.varying == ["guidance.scale"] and guidance_key(table) == "guidance.scale"
    assert table.metric == "eval/fid@10" and table.best in (0, 1)
    for key in ("eval/fid@10", "eval/is_clf_mean@10", "eval/precision@10", "eval/recall@10", "eval/class_accuracy"):
        assert all(key in run.metrics for run in table.runs), key
    # same seed and labels at both scales: guidance changed the samples, so the scores differ (a classifier trained
    # for 2 steps has tiny input gradients: the scale must be large for the change to survive uint8 rounding)
    assert table.runs[0].metrics["eval/fid@10"] != table.runs[1].metrics["eval/fid@10"]
    assert "| guidance.scale |" in report["markdown"].replace("| job | guidance.scale", "| guidance.scale")
    assert "Acc" in report["markdown"] and "clean classifier" in report["markdown"]
    assert report["paths"]["tradeoff"].stat().st_size > 10_000
    with open(report["paths"]["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["guidance.scale"] for row in rows] == ["0", "10000"]
    assert all(0.0 <= float(row["eval/class_accuracy"]) <= 1.0 for row in rows)


@pytest.mark.slow  # ~35 s; the -m variant below checks the same required-key error (and that nothing launches)
def test_guidance_sweep_without_a_classifier_is_one_line(checkpoints, tmp_path):
    model, _ = checkpoints
    result = _eval("experiment=guidance_sweep", f"ckpt={model}", f"hydra.run.dir={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: this config needs guidance.classifier_ckpt=..."


def test_guidance_sweep_without_a_classifier_stops_before_launching(checkpoints, tmp_path):
    model, _ = checkpoints
    sweep_dir = tmp_path / "sweep"
    result = _eval("-m", "experiment=guidance_sweep", f"ckpt={model}", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: this config needs guidance.classifier_ckpt=..."
    assert "Launching" not in result.stdout + result.stderr  # no job was started
    assert not any(sweep_dir.glob("*/.hydra")), "no job folder is made for a sweep that cannot run"


def _fake_eval_job(folder: Path, job: int, scale: float, metrics: dict | None) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"guidance.scale={scale:g}", "ckpt=m.ckpt"]))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": job}}}))
    if metrics is None:
        (folder / "error.txt").write_text("classifier checkpoint not found\n")
    else:
        (folder / "results.json").write_text(json.dumps({"metrics": metrics, "sampling_seconds": 12.5}))


def test_tradeoff_report_ranks_eval_scores_and_tolerates_a_failed_scale(tmp_path):
    fids = {0.0: 60.0, 1.0: 45.0, 4.0: 52.0}
    for job, scale in enumerate((0.0, 1.0, 2.0, 4.0)):
        metrics = None if scale == 2.0 else {
            "fid@500": fids[scale], "is_clf_mean@500": 3.0 + scale, "precision@500": 0.5 + 0.1 * scale,
            "recall@500": 0.6 - 0.1 * scale, "class_accuracy": 0.5 + 0.1 * scale}
        _fake_eval_job(tmp_path / str(job), job, scale, metrics)
    table = build_table(collect_runs(tmp_path), tmp_path)
    assert [run.status for run in table.runs] == ["completed", "completed", "failed", "completed"]
    assert table.metric == "eval/fid@500" and table.best == 1  # scale 1 has the lowest FID
    assert table.runs[1].metrics["eval/sampling_seconds"] == 12.5
    assert build_table(table.runs, tmp_path, metric="eval/class_accuracy").best == 3  # higher is better
    report = write_report(tmp_path)
    assert "failed: classifier checkpoint not found" in report["markdown"]
    assert "**45.00**" in report["markdown"]
    assert report["paths"]["tradeoff"].is_file()


# ---------------------------------------------------------------------- guidance in the in-loop metric callback
def _metrics_run(classifier: Path, *extra: str) -> list[str]:
    return [*TINY, "callbacks=metrics", "model.class_cond=true", "diffusion.schedule=cosine",
            "callbacks.generative_metrics.every_n_val_epochs=1", "callbacks.generative_metrics.classifier_epochs=1",
            f"callbacks.generative_metrics.guidance.classifier_ckpt={classifier}", *extra]


def test_metric_callback_scores_classifier_guided_samples(checkpoints, tmp_path):
    from ddpm_lightning.callbacks import GenerativeMetricsCallback
    from ddpm_lightning.cli.train import train

    _, classifier = checkpoints
    # bf16-mixed: the callback samples under the training precision, so the guidance gradient runs in autocast
    cfg = compose_run(_metrics_run(classifier, "callbacks.generative_metrics.guidance.scale=4.0",
                                   "trainer.precision=bf16-mixed"), tmp_path)
    calls = []
    original = GenerativeMetricsCallback._scores

    def spy(self, trainer, module, num_samples):
        calls.append(self._guidance.cond_fn)
        return original(self, trainer, module, num_samples)

    GenerativeMetricsCallback._scores = spy
    try:
        metrics = train(cfg)
    finally:
        GenerativeMetricsCallback._scores = original
    assert calls and all(cond_fn is not None for cond_fn in calls)  # guided in the loop and at the end
    assert metrics["val/fid@6"] == metrics["val/fid@6"] and metrics["val/fid@6"] > 0


def test_metric_callback_rejects_a_mismatched_classifier_before_training(checkpoints, tmp_path):
    from ddpm_lightning.cli.train import train

    _, classifier = checkpoints  # trained for the cosine schedule
    cfg = compose_run(_metrics_run(classifier, "callbacks.generative_metrics.guidance.scale=1.0",
                                   "diffusion.schedule=linear"), tmp_path)
    with pytest.raises(ValueError, match="trained for T=50 cosine, the diffusion model uses T=50 linear"):
        train(cfg)
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))  # failed before the first training step


def test_metric_callback_reads_the_guidance_keys_of_older_run_configs(tmp_path, recwarn, capsys):
    """Run configs saved before the guidance group hold the callback's classifier_ckpt / classifier_scale /
    cfg_scale: building the callback from such a node gives the same guidance, silently."""
    from hydra.utils import instantiate

    from ddpm_lightning.config.schema import GuidanceConfig

    node = dict(compose_run([*TINY, "callbacks=metrics"], tmp_path).callbacks.generative_metrics)
    del node["guidance"]
    old = instantiate({**node, "classifier_ckpt": "clf.ckpt", "classifier_scale": 2.0, "cfg_scale": 0.5})
    new = instantiate({**node, "guidance": {"classifier_ckpt": "clf.ckpt", "scale": 2.0, "cfg_scale": 0.5}})
    assert old.guidance_config == new.guidance_config == GuidanceConfig("clf.ckpt", 2.0, 0.5)
    assert instantiate({**node, "classifier_ckpt": None, "classifier_scale": 0.0, "cfg_scale": 0.0}).guidance_config \
        == GuidanceConfig()
    assert not recwarn.list and capsys.readouterr().err == ""
    from ddpm_lightning.callbacks import GenerativeMetricsCallback

    with pytest.raises(TypeError, match="unexpected keyword argument 'classifier_scal'"):
        GenerativeMetricsCallback(classifier_scal=2.0)
