"""The console a researcher reads hundreds of times: one line per event (one log handler), no third-party tips or
warnings nobody can act on, a step label on step-based runs, a one-line model summary, and progress lines with an
estimate for every scoring phase."""

from __future__ import annotations

import re
import subprocess
from collections import Counter

import lightning.pytorch as pl
import pytest
from faults import subprocess_env, train_command

from ddpm_lightning.callbacks.console import StepProgressBar, summary_line
from ddpm_lightning.metrics.progress import ProgressLines

LOG_PREFIX = re.compile(r"^(\[[\d\-: ,]+\]\[[A-Z]+\] |[A-Z]+: )")  # Hydra's "[time][INFO] " or Lightning's "INFO: "


def test_a_debug_fast_run_prints_each_event_once_without_third_party_tips(tmp_path):
    """``ddpm-train experiment=default debug=fast`` through the real entry point (Hydra's job logging on): no log
    line twice (Lightning's own handler doubled every one), no litlogger tip, no warning pointing into
    site-packages, no model-summary table, and the scoring said up front, with progress while it runs."""
    result = subprocess.run(train_command(["experiment=default", "debug=fast"], tmp_path / "run"),
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    messages = [LOG_PREFIX.sub("", line) for line in lines if LOG_PREFIX.match(line)]
    twice = [m for m, n in Counter(messages).items() if n > 1]
    assert not twice, twice
    assert not [line for line in lines if line.startswith("INFO: ")]  # one handler: Hydra's
    assert not [line for line in lines if "litlogger" in line or "Tip:" in line]
    assert not [line for line in lines if "site-packages" in line]  # no library warning with its source path
    assert not [line for line in lines if "FLOPs" in line or line.startswith(("┏", "│", "└", "Total params"))]
    assert any(m.startswith("model: net UNet ") and "(eval)" in m for m in messages), messages
    start = next(m for m in messages if m.startswith("training: 3 optimizer steps"))
    assert re.search(r"then scoring: FID@8 at the end: 8 samples, ~\d+\.\d min", start), start
    assert any(re.match(r"estimated time: ~\d+\.\d min: 3 optimizer steps ~\d+\.\d min .* \+ scoring ~\d+\.\d min "
                        r"\(FID@8 at the end: 8 samples\)", m) for m in messages), messages
    assert any(re.match(r"scoring fid, kid @8: 8/8 samples \(\d+\.\d\d samples/s, ETA 0s\)", m) for m in messages)
    assert len(lines) <= 26, "\n".join(lines)  # one line per event: the whole smoke run fits a screen


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, **kwargs)


@pytest.mark.parametrize(("kwargs", "label"), [({"max_steps": 3000, "max_epochs": -1}, "step"),
                                               ({"max_epochs": 5}, "Epoch 0/4")])
def test_the_progress_bar_counts_steps_in_step_based_runs(kwargs, label):
    bar = StepProgressBar()
    trainer = _trainer(callbacks=[bar], **kwargs)
    bar.setup(trainer, None, "fit")  # what fitting does first: the bar gets its trainer
    assert bar._get_train_description(0).strip() == label
    assert "-2" not in bar._get_train_description(0)
    if "max_steps" in kwargs:
        assert bar.total_train_batches == 3000  # one bar over the run, not one per epoch
    assert trainer.progress_bar_callback is bar


def test_the_model_summary_is_one_line_of_the_modules_with_parameters():
    data = [(" ", ["0", "1", "2"]), ("Name", ["net", "ema", "quartile_loss"]),
            ("Type", ["UNet", "AveragedModel", "ModuleList"]), ("Params", ["1.4 M", "1.4 M", "0"]),
            ("Mode", ["train", "eval", "train"]), ("FLOPs", ["0", "0", "0"])]
    assert summary_line(data, 2_740_000, 1_370_000) == \
        "model: net UNet 1.4 M, ema AveragedModel 1.4 M (eval); 1.4 M trainable, 2.7 M in all"


def test_progress_lines_give_an_estimate_then_every_tenth_with_rate_and_eta():
    said = []
    progress = ProgressLines(100, "scoring fid @100", said.append)
    for _ in range(10):
        progress.update(10)
    assert said[0].startswith("scoring fid @100: estimated time ~") and "(the first 10 took" in said[0]
    assert [line.split(" (")[0] for line in said[1:]] == [f"scoring fid @100: {n}/100 samples" for n in
                                                          range(10, 101, 10)]
    assert all(re.search(r"\(\d+\.\d\d samples/s, ETA \S+\)$", line) for line in said[1:])
