"""ddpm-report with seeds as an axis, on fabricated per-seed results with known means and intervals: the grouping,
t-intervals, paired differences, the verdict rule at its boundaries, the best-row rule, n=1, a failed seed, a
missing seed (from multirun.yaml), training vs sampling seeds, and the CLI flags."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from ddpm_lightning.cli.report import main as report_main
from ddpm_lightning.reporting import (
    aggregate,
    build_table,
    collect_runs,
    expected_jobs,
    summarize,
    verdict,
    write_report,
)

T975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom
T975_DF1 = 12.706204736174694


def _job(root: Path, num: int, overrides: list[str], fid: float | None = None, *, error: str | None = None,
         config_name: str = "train", extra: dict | None = None) -> Path:
    """A ddpm-train job folder (summary.json) or a ddpm-eval one (config_name="eval": results.json)."""
    folder = root / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"job": {"num": num, "config_name": config_name}}}))
    if error is not None:
        (folder / "error.txt").write_text(error)
    elif fid is not None:
        if config_name == "eval":
            (folder / "results.json").write_text(json.dumps({"metrics": {"fid@200": fid, **(extra or {})}}))
        else:
            metrics = {"val/fid@200": fid, "val/kid_mean@200": fid / 1000, "val/kid_std@200": 0.001,
                       **(extra or {})}
            (folder / "summary.json").write_text(json.dumps({"status": "completed", "metrics": metrics}))
    return folder


def _multirun_yaml(root: Path, params: dict, task: list[str]) -> None:
    hydra = {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": params},
             "overrides": {"task": task}}
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra, "seed": 0}))


# four rows x three training seeds, seed-major job order as the ablation experiments launch them
FIDS = {"a": (100.0, 102.0, 104.0),  # baseline: mean 102, sd 2
        "b": (90.0, 93.0, 93.0),  # b - a = -10, -9, -11: mean -10, sd 1 -> better
        "c": (101.0, None, None),  # seed 1 failed, seed 2 never started: n=1
        "d": (101.0, 103.0, 105.0)}  # d - a = +1 at every seed: sd 0, but 1 < 1.3% of 102 -> inconclusive


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    root.mkdir()
    _multirun_yaml(root, {"seed": "0,1,2"}, ["model=a,b,c,d", "trainer.max_steps=300"])
    for seed in range(3):
        for i, (row, fids) in enumerate(FIDS.items()):
            num = 4 * seed + i
            overrides = [f"seed={seed}", f"model={row}", "trainer.max_steps=300"]
            if row == "c" and seed == 1:
                _job(root, num, overrides, error="RuntimeError: diverged")
            elif row == "c" and seed == 2:
                continue  # interrupted before it started
            else:
                _job(root, num, overrides, fids[seed])
    return root


# ------------------------------------------------------------------------------------ statistics and the rule
def test_summarize_gives_mean_std_and_t_interval():
    stats = summarize([100.0, 102.0, 104.0])
    assert (stats.n, stats.mean, stats.std) == (3, 102.0, 2.0)
    assert stats.half_width == pytest.approx(T975_DF2 * 2.0 / math.sqrt(3))
    assert (stats.low, stats.high) == pytest.approx((102.0 - stats.half_width, 102.0 + stats.half_width))
    assert stats.se == pytest.approx(2.0 / math.sqrt(3))
    pair = summarize([1.0, 3.0, float("nan")])  # non-finite values are dropped
    assert pair.n == 2 and pair.half_width == pytest.approx(T975_DF1 * math.sqrt(2) / math.sqrt(2))
    one = summarize([5.0])
    assert (one.n, one.mean, one.std, one.low, one.se) == (1, 5.0, None, None, None)
    assert summarize([]).n == 0 and summarize([]).mean is None


@pytest.mark.parametrize(("delta", "se", "baseline", "mode", "expected"), [
    (-2.0, 1.0, 100.0, "min", "better"),  # exactly 2 standard errors: decided
    (-1.999, 1.0, 100.0, "min", "inconclusive"),  # just under 2 standard errors
    (2.0, 1.0, 100.0, "min", "worse"),
    (2.0, 1.0, 100.0, "max", "better"),  # higher is better (IS, precision, recall, accuracy)
    (-2.0, 1.0, 100.0, "max", "worse"),
    (-13.0, 0.1, 1000.0, "min", "better"),  # exactly 1.3% of the baseline: decided
    (-12.99, 0.1, 1000.0, "min", "inconclusive"),  # under 1.3% of the baseline, however small the error
    (12.99, 0.0, 1000.0, "min", "inconclusive"),
    (-5.0, None, 100.0, "min", "inconclusive"),  # one pair: no standard error
    (0.0, 0.0, 100.0, "min", "inconclusive"),
    (0.0, 0.0, 0.0, "min", "inconclusive"),
    (-1.0, 0.0, 0.0, "min", "better"),  # no spread at all, a zero baseline: any difference decides
])
def test_verdict_rule_at_its_boundaries(delta, se, baseline, mode, expected):
    assert verdict(delta, se, baseline, mode) == expected


@pytest.mark.parametrize(("delta", "pairs", "expected"), [
    (-4.30, 3, "inconclusive"),  # the 95% interval of 3 pairs is +-4.303 SE: -4.30 SE still reaches 0
    (-4.31, 3, "better"),
    (-4.29, 3, "inconclusive"),
    (-3.0, 3, "inconclusive"),  # > 2 SE but the printed 95% interval contains 0
    (-2.5, 10, "better"),  # 10 pairs: t = 2.262
    (-2.2, 10, "inconclusive"),
    (-2.0, 200, "better"),  # many pairs: t ~ 1.97 < 2, the 2-SE rule decides
    (-1.99, 200, "inconclusive"),
    (-9.0, 1, "inconclusive"),  # one pair: no interval
])
def test_verdict_never_decides_what_the_interval_does_not_exclude(delta, pairs, expected):
    from scipy import stats

    t = stats.t.ppf(0.975, pairs - 1) if pairs > 1 else float("inf")
    assert verdict(delta, 1.0, 100.0, "min", pairs=pairs) == expected
    assert (expected != "inconclusive") == (abs(delta) >= max(2.0, t))


def test_verdict_mode_is_validated():
    with pytest.raises(ValueError, match="mode='lower'; allowed: min, max"):
        verdict(1.0, 0.1, 10.0, "lower")


# ------------------------------------------------------------------------------------ aggregation
def test_expected_jobs_follow_the_basic_sweeper(sweep):
    jobs = expected_jobs(sweep)
    assert len(jobs) == 12 and jobs[0] == {"seed": "0", "model": "a", "trainer.max_steps": "300"}
    assert jobs[4]["seed"] == "1" and jobs[4]["model"] == "a"  # the seed is the outer loop: params come first
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"_target_": "OptunaSweeper"}}}))
    assert expected_jobs(sweep) is None  # other sweepers: no expected list


def test_rows_over_training_seeds_with_a_failed_and_a_missing_seed(sweep):
    table = build_table(collect_runs(sweep), sweep)
    rows = aggregate(table, expected=expected_jobs(sweep))
    assert rows.unit_kind == "training seed" and rows.seed_axes == ["seed"] and rows.inner_axes == []
    assert [g.label for g in rows.groups] == ["model=a", "model=b", "model=c", "model=d"]
    a, b, c, d = rows.groups
    fid = "val/fid@200"
    assert (a.stats[fid].n, a.stats[fid].mean, a.stats[fid].std) == (3, 102.0, 2.0)
    assert a.stats[fid].half_width == pytest.approx(T975_DF2 * 2 / math.sqrt(3))
    assert (c.stats[fid].n, c.stats[fid].mean, c.stats[fid].std) == (1, 101.0, None)
    assert c.seed_status(rows.seed_label) == {"seed=0": "completed", "seed=1": "failed", "seed=2": "missing"}

    paired = b.vs_baseline[fid]
    assert (paired.diff.n, paired.diff.mean, paired.diff.std) == (3, -10.0, 1.0)
    assert paired.diff.half_width == pytest.approx(T975_DF2 / math.sqrt(3))
    assert paired.reference == 102.0 and paired.verdict == "better"
    assert c.vs_baseline[fid].diff.n == 1 and c.vs_baseline[fid].verdict == "inconclusive"
    assert d.vs_baseline[fid].diff.std == 0.0 and d.vs_baseline[fid].verdict == "inconclusive"  # under 1.3%
    assert a.vs_baseline[fid].diff.mean == 0.0 and a.vs_baseline[fid].verdict == "inconclusive"
    kid = "val/kid_mean@200"
    assert b.vs_baseline[kid].diff.mean == pytest.approx(-0.010) and b.vs_baseline[kid].verdict == "better"

    # best: lowest mean FID (b); c is tied (one shared seed: nothing established), a and d are worse than b
    assert rows.metric == fid and rows.best == 1 and rows.tied == [2]
    assert a.vs_best.verdict == "worse" and d.vs_best.verdict == "worse" and c.vs_best.verdict == "inconclusive"


def test_a_folder_of_links_to_jobs_of_two_sweeps_is_one_report(sweep, tmp_path):
    """Arms run later (another sweep) report beside the arm they are compared with through symlinked job folders;
    a link back to the folder itself (a loop) is walked once."""
    later = tmp_path / "later"
    later.mkdir()
    for seed, fid in enumerate((95.0, 96.0, 97.0)):  # e - a = -5, -6, -7: better
        _job(later, seed, [f"seed={seed}", "model=e", "trainer.max_steps=300", "optim.lr=0.003"], fid)
    for seed in range(3):  # the earlier arm ran at the config's lr: its row is labelled with it
        (sweep / str(4 * seed) / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.002}}))
    merged = tmp_path / "merged"
    merged.mkdir()
    for seed in range(3):
        (merged / f"a_{seed}").symlink_to(sweep / str(4 * seed), target_is_directory=True)
        (merged / f"e_{seed}").symlink_to(later / str(seed), target_is_directory=True)
    (merged / "loop").symlink_to(merged, target_is_directory=True)
    runs = collect_runs(merged)
    assert len(runs) == 6 and {r.folder.name for r in runs} == {f"{p}_{s}" for p in "ae" for s in range(3)}
    rows = aggregate(build_table(runs, merged), expected=expected_jobs(merged))
    assert [g.label for g in rows.groups] == ["model=a optim.lr=0.002", "model=e optim.lr=0.003"]
    paired = rows.groups[1].vs_baseline["val/fid@200"]
    assert (paired.diff.n, paired.diff.mean, paired.verdict) == (3, -6.0, "better")


def test_report_markdown_and_csvs_of_a_seed_sweep(sweep):
    result = write_report(sweep, make_plot=False)
    markdown = result["markdown"]
    assert "Partial sweep: 1 of 12 jobs have no folder yet (not started): seed=2 model=c." \
        in markdown
    assert "Seeds: `seed` = 0, 1, 2 (training seed): n counts training seeds." in markdown
    assert "best row `model=b` ★; tied with it (≈): `model=c`." in markdown
    lines = markdown.splitlines()
    row_a = next(line for line in lines if line.startswith("| a (baseline)"))
    assert "| 3/3 | 102.0 ± 5.0 (sd 2.0) | 0.1020 ± 0.0050 (sd 0.0020) |" in row_a
    assert "| **b ★ best** | 3/3 | 92.0 ± 4.3 (sd 1.7) |" in markdown  # 4.3 = t(0.975, 2) * sqrt(3) / sqrt(3)
    assert "| c ≈ tied | 1/3: seed=1 failed, seed=2 missing | 101.0 (n=1) |" in markdown
    diff_b = next(line for line in lines if line.startswith("| b | 3 |"))
    assert "-10.0 [-12.5, -7.5] **better**" in diff_b
    assert "| c | 1 | +1.000 (1 pair: no interval) inconclusive" in markdown
    assert "| d | 3 | +1.000 [+1.000, +1.000] inconclusive" in markdown
    # the rules as implemented, under the tables
    assert "< 2 standard errors of the paired difference" in markdown and "< 1.3% of the baseline's mean" in markdown
    assert "Best row (★): the lowest mean of `val/fid@200`" in markdown
    assert "KID std" in markdown and "n=1: no interval (one seed per row" not in markdown
    assert "## Runs (one per job and seed)" in markdown and "failed: RuntimeError: diverged" in markdown

    with open(result["paths"]["csv"]) as handle:
        runs = list(csv.DictReader(handle))
    assert len(runs) == 11  # every per-seed value
    assert [float(r["val/fid@200"]) for r in runs if r["row"] == "model=a"] == list(FIDS["a"])
    assert {r["row"] for r in runs if r["best"] == "1"} == {"model=b"}
    with open(result["paths"]["summary_csv"]) as handle:
        summary = {(r["row"], r["metric"]): r for r in csv.DictReader(handle)}
    b = summary[("model=b", "val/fid@200")]
    assert (b["n"], float(b["mean"]), b["verdict"], b["best"]) == ("3", 92.0, "better", "1")
    assert float(b["diff_ci_low"]) == pytest.approx(-10.0 - T975_DF2 / math.sqrt(3))
    base = summary[("model=a", "val/fid@200")]
    assert (base["verdict"], base["baseline"]) == ("", "1")
    assert summary[("model=c", "val/fid@200")]["seeds_done"] == "1"
    assert summary[("model=c", "val/fid@200")]["tied_with_best"] == "1"
    assert summary[("model=b", "val/kid_std@200")]["verdict"] == ""  # a spread, not a score


def test_baseline_flag_and_error_bar_plot(sweep, capsys):
    report_main([str(sweep), "--baseline", "model=b", "--out", str(sweep / "out")])
    printed = capsys.readouterr().out
    assert "Paired differences against the baseline `model=b`" in printed
    assert "| a | 3 | +10.0 [+7.5, +12.5] **worse**" in printed
    assert (sweep / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (sweep / "out" / "report_summary.csv").is_file()
    report_main([str(sweep), "--baseline", "c", "--no-plot"])  # one varying key: its value names the row
    assert "against the baseline `model=c`" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(sweep), "--baseline", "model=z", "--no-plot"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: baseline 'model=z' is no row of this sweep; rows: model=a, model=b, model=c")
    assert len(err.strip().splitlines()) == 1


def test_seed_keys_flag_turns_the_axis_off(sweep, capsys):
    report_main([str(sweep), "--seed-keys", "sample.seed", "--no-plot"])
    printed = capsys.readouterr().out
    assert "n=1: no interval" in printed and "Paired differences" not in printed
    assert "| seed | model |" in printed  # every job a row, as before seeds were an axis


def test_one_seed_reports_as_before_with_n1_stated(tmp_path):
    for i, row in enumerate("ab"):
        _job(tmp_path, i, [f"model={row}", "seed=0"], 90.0 + i)
    result = write_report(tmp_path, make_plot=False)
    assert result["aggregate"] is None and "summary_csv" not in result["paths"]
    assert "n=1: no interval (one seed per row, so differences between rows are not tested)" in result["markdown"]
    assert "| 0 | **a** | done ★ best" in result["markdown"]
    with pytest.raises(ValueError, match="needs seed axes"):
        write_report(tmp_path, make_plot=False, baseline="model=a")


def test_training_and_sampling_seed_spreads_are_kept_apart(tmp_path):
    # training seed 0: sampling seeds give 10 and 12 (mean 11); training seed 1: 20 and 22 (mean 21)
    values = {(0, 0): 10.0, (0, 1): 12.0, (1, 0): 20.0, (1, 1): 22.0}
    for num, ((seed, sample_seed), fid) in enumerate(values.items()):
        _job(tmp_path, num, [f"seed={seed}", f"callbacks.generative_metrics.seed={sample_seed}"], fid)
    rows = aggregate(build_table(collect_runs(tmp_path), tmp_path))
    assert rows.unit_axes == ["seed"] and rows.inner_axes == ["callbacks.generative_metrics.seed"]
    (group,) = rows.groups
    stats = group.stats["val/fid@200"]
    assert (stats.n, stats.mean, stats.std) == (2, 16.0, pytest.approx(math.sqrt(50.0)))
    assert group.within_std["val/fid@200"] == pytest.approx(math.sqrt(2.0))
    markdown = write_report(tmp_path, make_plot=False)["markdown"]
    assert "averaged within each training seed" in markdown and "sampling sd 1.414" in markdown


def test_eval_sweep_seed_is_a_sampling_seed(tmp_path):
    fids = {("0", "0"): 40.0, ("0", "1"): 42.0, ("2", "0"): 36.0, ("2", "1"): 38.1}
    for num, ((scale, seed), fid) in enumerate(fids.items()):
        _job(tmp_path, num, [f"sample.seed={seed}", f"guidance.scale={scale}", "ckpt=m.ckpt"], fid,
             config_name="eval", extra={"precision@200": 0.5})
    result = write_report(tmp_path)
    rows = result["aggregate"]
    assert rows.unit_kind == "sampling seed" and rows.metric == "eval/fid@200"
    assert [g.label for g in rows.groups] == ["guidance.scale=0", "guidance.scale=2"]
    paired = rows.groups[1].vs_baseline["eval/fid@200"]
    assert (paired.diff.n, paired.diff.mean) == (2, pytest.approx(-3.95))
    assert paired.diff.std == pytest.approx(math.sqrt(0.005))
    assert paired.verdict == "better"  # 3.95 > t(0.975, 1) = 12.7 standard errors of 0.05, and > 1.3% of 41
    assert result["paths"]["tradeoff"].is_file() and result["paths"]["plot"].is_file()


def test_ddpm_eval_takes_the_sampling_seed_as_sample_seed(tmp_path):
    from run_config import compose_run

    assert compose_run(["sample.seed=3"], tmp_path, config_name="eval").seed == 3
    assert compose_run(["seed=5"], tmp_path, config_name="eval").seed == 5  # the old spelling still works
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ddpm_lightning.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        params = compose("eval", ["experiment=guidance_sweep"], return_hydra_config=True).hydra.sweeper.params
    assert list(params)[:2] == ["sample.seed", "guidance.scale"] and params["sample.seed"] == "0,1,2"


def test_every_table_metric_has_an_explicit_direction():
    from ddpm_lightning.reporting import HIGHER_IS_BETTER, LOWER_IS_BETTER, NO_VERDICT, TABLE_METRICS, metric_mode

    assert not set(HIGHER_IS_BETTER) & set(LOWER_IS_BETTER)
    assert set(TABLE_METRICS) - set(NO_VERDICT) <= set(HIGHER_IS_BETTER) | set(LOWER_IS_BETTER)
    assert {metric_mode(f"val/{m}@200") for m in LOWER_IS_BETTER} == {"min"}
    assert {metric_mode(f"eval/{m}@200") for m in HIGHER_IS_BETTER} == {"max"}


def test_mode_flag_sets_the_direction_of_the_primary_metric(sweep):
    table = build_table(collect_runs(sweep), sweep, metric="val/fid@200", mode="max")
    rows = aggregate(table)
    assert rows.best == 3  # d has the highest mean FID
    assert rows.groups[1].vs_baseline["val/fid@200"].verdict == "worse"  # b is lower: worse when higher is better
    assert rows.groups[1].vs_baseline["val/kid_mean@200"].verdict == "better"  # other metrics keep their direction
