"""W&B as the research surface, read back from the offline run files W&B wrote (``tests/wandb_files.py``; W&B is
never mocked): one W&B run per run folder across a resume and a SIGUSR1 requeue, with every key logged once per
step; the offline fallback in one warning line; an unwritable W&B folder in one error line; provenance in the
run's config and in ``summary.json``."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from faults import subprocess_env, train_command
from run_config import TINY, compose_run
from wandb_files import read_runs, steps_per_key

from ddpm_lightning.callbacks.preemption import REQUEUE_EXIT_CODE
from ddpm_lightning.cli.errors import run_cli
from ddpm_lightning.cli.report import main as report_main
from ddpm_lightning.cli.train import train
from ddpm_lightning.provenance import PROVENANCE_KEYS

RUN = [*[o for o in TINY if not o.startswith("trainer.max_steps")], "logger=wandb"]


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "wandb_run.json").read_text())


def _assert_one_run_with_steps_once(run_dir: Path, last_step: int, segments: int = 2) -> list:
    """One W&B run id over ``segments`` offline segments (the one kept in ``wandb_run.json`` and named in
    ``summary.json``), same group and tags in each, every metric logged once per step in rising order, training
    steps 0..last_step - 1 and the final grid at ``last_step``; W&B's own step rises across the segments."""
    runs = read_runs(run_dir)
    assert len(runs) == segments, [r.folder.name for r in runs]
    record = _record(run_dir)
    assert {r.run_id for r in runs} == {record["id"]}
    assert json.loads((run_dir / "summary.json").read_text())["wandb"]["id"] == record["id"]
    assert len({(r.group, r.job_type, tuple(r.tags), r.name) for r in runs}) == 1
    assert runs[0].group == record["group"] and runs[0].job_type == "train"
    steps = steps_per_key(runs)
    repeated = {key: values for key, values in steps.items() if values != sorted(set(values))}
    assert repeated == {}, f"logged twice or backwards: {repeated}"
    assert steps["train/loss"] == list(range(last_step))
    assert steps["samples/grid"][-1] == last_step
    assert sorted({s for values in steps.values() for s in values}) == list(range(last_step + 1))
    wandb_steps = [row["_step"] for run in runs for row in run.history]
    assert wandb_steps == list(range(len(wandb_steps)))
    return runs


def test_a_resumed_run_logs_into_one_wandb_run_with_each_step_once(tmp_path):
    run_dir = tmp_path / "run"
    conditional = [*RUN, "model.class_cond=true"]  # digits: 10 classes named 0-9
    train(compose_run([*conditional, "trainer.max_steps=2"], run_dir))
    first_id = _record(run_dir)["id"]
    train(compose_run([*conditional, "trainer.max_steps=4", "resume=auto"], run_dir))
    assert _record(run_dir)["id"] == first_id
    runs = _assert_one_run_with_steps_once(run_dir, last_step=4)
    print("W&B run ids:", [f"{r.folder.name}: {r.run_id}" for r in runs])
    # each segment's final grid is in the run's media with its caption, and one captioned panel per class
    for run, step in zip(runs, (2, 4), strict=True):
        (grid,) = [row for row in run.history if "samples/grid/filenames" in row]
        assert grid["samples/grid/captions"] == [f"step {step}: ddim, 2 steps, eta 0, unguided"]
        assert all(run.media(f).is_file() for f in grid["samples/grid/filenames"])
        (panels,) = [row for row in run.history if "samples/classes/filenames" in row]
        assert panels["samples/classes/captions"] == [f"{d} (class {d})" for d in range(10)]
        assert len(panels["samples/classes/filenames"]) == 10
        assert all(run.media(f).is_file() for f in panels["samples/classes/filenames"])
    # provenance: in the W&B config and in summary.json
    summary = json.loads((run_dir / "summary.json").read_text())
    for made_by in (runs[-1].config["provenance"], summary["provenance"]):
        assert set(PROVENANCE_KEYS) <= set(made_by)
        assert made_by["precision"] == "32-true" and made_by["world_size"] == 1 and made_by["threads"] >= 1


def test_a_requeued_run_continues_its_wandb_run(tmp_path):
    """SIGUSR1 during step 2 (a pause that ends when the signal arrives): a checkpoint of step 3, exit 75; the
    requeued command continues the same W&B run to step 4."""
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    overrides = [*RUN, "trainer.max_steps=4", "resume=auto", "allow_any_target=true"]
    pause = ["+callbacks.pause._target_=faults.PauseAt", "+callbacks.pause.step=2", "+callbacks.pause.phase=train",
             f"+callbacks.pause.marker={marker}", "+callbacks.pause.until=SIGUSR1"]
    process = subprocess.Popen(train_command([*overrides, *pause], run_dir), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=subprocess_env())
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[1][-3000:]
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=300)  # a hang guard, not a timing assert
    assert process.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    again = subprocess.run(train_command(overrides, run_dir), capture_output=True, text=True, env=subprocess_env(),
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_one_run_with_steps_once(run_dir, last_step=4)


def _cli(tool: str, *args: str, out: Path) -> subprocess.Popen:
    code = f"from ddpm_lightning.cli.{tool} import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, *args, f"hydra.run.dir={out}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=out.parent,
                            env=subprocess_env(DDPM_CACHE_DIR=str(out.parent / "cache")))


def test_evaluations_are_wandb_runs_in_the_training_runs_group_and_every_json_has_provenance(tmp_path):
    """Two concurrent ``ddpm-eval ... logger=wandb`` of one checkpoint: two runs of job_type=eval in the training
    run's group, each with the training run's id in its config, its eval/ metrics (history and summary) and its
    captioned grid; the training run is left alone. summary.json, metrics.json, results.json and sample.json all
    record the provenance."""
    run_dir = tmp_path / "run"
    train(compose_run([*RUN, "trainer.max_steps=2", "callbacks=metrics"], run_dir))
    trained = _record(run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    args = [f"ckpt={ckpt}", "num_samples=8", "steps=2", "feature=tiny", "reference_n=40", "metrics=[fid]"]
    jobs = {name: _cli("evaluate", *args, "logger=wandb", out=tmp_path / name) for name in ("eval_a", "eval_b")}
    sampled = _cli("sample", f"ckpt={ckpt}", "num_samples=4", "steps=2", out=tmp_path / "sample")
    for job in [*jobs.values(), sampled]:
        _, err = job.communicate(timeout=600)  # a hang guard, not a timing assert
        assert job.returncode == 0, err[-3000:]
    ids = set()
    for name in jobs:
        (run,) = read_runs(tmp_path / name)
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert run.job_type == "eval" and run.group == trained["group"] and run.run_id == results["wandb"]["id"]
        assert run.config["train_run_id"] == trained["id"] == results["wandb"]["train_run_id"]
        (row,) = [r for r in run.history if "eval/fid@8" in r]
        assert row["eval/fid@8"] == pytest.approx(results["metrics"]["fid@8"]) == run.summary["eval/fid@8"]
        assert row["eval/grid/caption"] == "8 samples at step 2: ddim, 2 steps, eta 0, unguided"
        assert run.media(row["eval/grid/path"]).is_file()
        assert set(PROVENANCE_KEYS) <= set(run.config["provenance"])
        ids.add(run.run_id)
    assert len(ids) == 2 and trained["id"] not in ids  # one run per evaluation, none written into another's
    assert [r.run_id for r in read_runs(run_dir)] == [trained["id"]]
    outputs = [run_dir / "summary.json", run_dir / "metrics.json", tmp_path / "eval_a" / "results.json",
               tmp_path / "sample" / "sample.json"]
    for path in outputs:
        made_by = json.loads(path.read_text())["provenance"]
        assert set(PROVENANCE_KEYS) <= set(made_by), path
        assert made_by["command"] and made_by["world_size"] == 1 and made_by["precision"] in ("32-true", "32")


def test_a_sweep_report_is_a_wandb_run_in_the_sweeps_group(tmp_path, capsys):
    """``ddpm-report <sweep> --wandb``: a run of job_type=report in the group of the sweep's training runs, with the
    aggregated table (row, n, mean, interval, paired difference, verdict) as a W&B table and the plot as an image;
    its config holds every row's provenance."""
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "ddpm_lightning.train", "-m", *RUN, "trainer.max_steps=2",
                           "seed=0,1", "hydra.sweep.subdir=${hydra.job.num}", f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = [read_runs(sweep / job) for job in ("0", "1")]
    group = _record(sweep / "0")["group"]
    assert [[r.group for r in runs] for runs in trained] == [[group], [group]] and group.startswith("train-")
    report_main([str(sweep), "--wandb"])
    assert re.search(rf"wandb: run \w+ \(job_type=report, group {re.escape(group)}\)", capsys.readouterr().out)
    (report,) = read_runs(sweep)
    assert report.job_type == "report" and report.group == group and report.run_id == json.loads(
        (sweep / "wandb_report_run.json").read_text())["id"]
    assert set(PROVENANCE_KEYS) <= set(report.config["provenance"]) and len(report.config["row_provenance"]) == 1
    (row,) = [r for r in report.history if "report/summary/_type" in r]
    assert row["report/summary/_type"] == "table-file" and row["report/plot/_type"] == "image-file"
    table = json.loads(report.media(row["report/summary/path"]).read_text())
    assert {"row", "metric", "n", "mean", "ci_low", "ci_high", "diff_mean", "verdict"} <= set(table["columns"])
    column = {name: i for i, name in enumerate(table["columns"])}
    (loss,) = [r for r in table["data"] if r[column["metric"]] == "train/loss"]
    assert loss[column["n"]] == 2.0 and loss[column["ci_low"]] < loss[column["mean"]] < loss[column["ci_high"]]
    assert report.media(row["report/plot/path"]).is_file() and row["report/plot/caption"] == "sweep: report.png"


# ------------------------------------------------------------------------------------- fallback and bad input
FALLBACK = """
import sys
from ddpm_lightning.loggers import finish_wandb, wandb_logger
logger = wandb_logger(save_dir=sys.argv[1], run_dir=sys.argv[1], project="p", name="n")
logger.log_metrics({"a": 1.0}, step=0)
print("mode", logger._wandb_init["mode"])
finish_wandb()
"""


def _fallback(tmp_path: Path, base_url: str) -> subprocess.CompletedProcess:
    """A W&B logger with a (fake) key and WANDB_MODE unset in a fresh process (wandb keeps its settings per
    process): the key makes it try online against ``base_url``."""
    (tmp_path / "home").mkdir()
    env = subprocess_env(WANDB_API_KEY="k" * 40, WANDB_BASE_URL=base_url, HOME=str(tmp_path / "home"),
                         NETRC=str(tmp_path / "home" / "netrc"))
    env.pop("WANDB_MODE")
    # WANDB_SERVICE stays when an earlier test started W&B here: the fallback must not reuse that service either
    return subprocess.run([sys.executable, "-c", FALLBACK, str(tmp_path / "run")], capture_output=True, text=True,
                          env=env, timeout=240)


def _one_warning(done: subprocess.CompletedProcess, pattern: str) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mode offline" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.search(pattern, warnings[0]), done.stderr[-3000:]
    assert "wandb sync" in warnings[0] and "Traceback" not in done.stderr


def test_an_unreachable_wandb_host_falls_back_offline_in_one_warning_line(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = _fallback(tmp_path, f"http://127.0.0.1:{port}")
    _one_warning(done, rf"^warning: W&B 127\.0\.0\.1:{port} unreachable: .*logging offline to ")
    (run,) = read_runs(tmp_path / "run")
    assert run.run_id == _record(tmp_path / "run")["id"] and run.history[0]["a"] == 1.0


def test_a_key_the_wandb_host_refuses_falls_back_offline_in_one_warning_line(tmp_path):
    """A host that answers every request with 401 (what W&B answers a bogus key)."""
    server = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import http.server
        class Refuse(http.server.BaseHTTPRequestHandler):
            def refuse(self):
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"errors": [{"message": "invalid API key"}]}')
            do_GET = do_POST = refuse
            def log_message(self, *args):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
        print(server.server_address[1], flush=True)
        server.serve_forever()
        """)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        done = _fallback(tmp_path, f"http://127.0.0.1:{port}")
    finally:
        server.kill()
        server.wait()
    _one_warning(done, r"^warning: W&B could not start online \(AuthenticationError: .*invalid API key\); "
                       r"logging offline to ")
    (run,) = read_runs(tmp_path / "run")
    assert run.run_id == _record(tmp_path / "run")["id"]


def test_an_unwritable_wandb_folder_is_one_error_line_before_training(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    cfg = compose_run([*RUN, f"logger.wandb.save_dir={tmp_path}/file.txt/sub"], tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, cfg)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(r"error: logger\.wandb\.save_dir=.*/file\.txt/sub: cannot write W&B files "
                                         r"into .*\(Not a directory\); set logger\.wandb\.save_dir", errors[0]), errors
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ddpm_eval_refuses_a_logger_it_would_ignore(tmp_path):
    from ddpm_lightning.cli.wandb_eval import check_logger

    assert check_logger(compose_run(["ckpt=x.ckpt", "logger=wandb"], tmp_path / "a", config_name="eval"))
    assert not check_logger(compose_run(["ckpt=x.ckpt"], tmp_path / "b", config_name="eval"))
    with pytest.raises(ValueError, match=r"^ddpm-eval logs to W&B only: logger=csv would be ignored; give "
                                         r"logger=wandb or drop logger=$"):
        check_logger(compose_run(["ckpt=x.ckpt", "logger=csv"], tmp_path / "c", config_name="eval"))
