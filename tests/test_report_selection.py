"""Held-out selection (``ddpm-report --select``): a row chosen on the selection seeds is reported on disjoint
report seeds, both sets named in report.md and selection.json. The fabricated sweep is built so that the selection
seeds and the report seeds alone would choose different rows, and the reported value is checked against the
report-seed mean and Student-t interval computed here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from scipy import stats

from ddpm_lightning.cli.report import main as report_main
from ddpm_lightning.reporting import write_report

FID = "eval/fid@200"
# guidance.scale -> FID at sample.seed 0..5. Over seeds 0-2 scale 2 is best (its lucky draws); over 3-5 scale 1
SWEEP = {"0": (50.0, 51.0, 52.0, 50.5, 51.5, 52.5),
         "1": (45.0, 46.0, 47.0, 40.0, 41.0, 42.0),
         "2": (38.0, 39.0, 40.0, 46.0, 48.0, 47.0)}


def _eval_job(root: Path, num: int, overrides: list[str], metrics: dict[str, float] | None) -> None:
    folder = root / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num,
                                                                                    "config_name": "eval"}}}))
    if metrics is not None:
        (folder / "results.json").write_text(json.dumps({"metrics": metrics}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for seed in range(6):
        for i, (scale, fids) in enumerate(SWEEP.items()):
            _eval_job(root, 3 * seed + i, [f"sample.seed={seed}", f"guidance.scale={scale}", "ckpt=m.ckpt"],
                      {"fid@200": fids[seed], "precision@200": 0.1 * (i + 1) + 0.01 * seed})
    return root


def _interval(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    half = stats.t.ppf(0.975, len(values) - 1) * stats.tstd(values) / math.sqrt(len(values))
    return mean, half


def test_the_reported_value_comes_from_the_held_out_seeds(sweep):
    result = write_report(sweep, make_plot=False, select_seeds="0,1,2", report_seeds=[3, 4, 5])
    selection = result["selection"]
    assert (selection.axis, selection.selection_seeds, selection.report_seeds) == ("sample.seed", ["0", "1", "2"],
                                                                                  ["3", "4", "5"])
    assert [row for row, _, _ in selection.candidates] == ["guidance.scale=0", "guidance.scale=1",
                                                           "guidance.scale=2"]
    chosen_label, chosen_values, _ = selection.candidates[selection.chosen]
    assert chosen_label == "guidance.scale=2" and chosen_values == {"guidance.scale": "2"}  # 39 over seeds 0-2
    report_means = {scale: sum(fids[3:]) / 3 for scale, fids in SWEEP.items()}
    assert min(report_means, key=report_means.get) == "1"  # the report seeds alone would choose another row

    held_out = SWEEP["2"][3:]
    mean, half = _interval(list(held_out))
    reported = selection.reported[FID]
    assert reported.n == 3 and reported.mean == pytest.approx(mean) and reported.mean != pytest.approx(39.0)
    assert reported.half_width == pytest.approx(half)
    assert result["aggregate"].groups[2].stats[FID].mean == pytest.approx(sum(SWEEP["2"]) / 6)  # all seeds: other

    markdown = result["markdown"]
    assert ("## Held-out selection: chosen on `sample.seed` = 0, 1, 2, reported on `sample.seed` = 3, 4, 5"
            in markdown)
    assert "| **guidance.scale=2 (chosen)** | 39.00 | 3 |" in markdown
    assert f"| FID@200 ↓ | {mean:.1f} ± {half:.1f} (sd {stats.tstd(held_out):.1f}), n=3 |" in markdown

    saved = json.loads(result["paths"]["selection"].read_text())
    assert saved["selection_seeds"] == ["0", "1", "2"] and saved["report_seeds"] == ["3", "4", "5"]
    assert saved["seed_key"] == "sample.seed" and saved["metric"] == FID and saved["mode"] == "min"
    assert saved["chosen"] == {"row": "guidance.scale=2", "overrides": {"guidance.scale": "2"},
                               "selection_mean": pytest.approx(39.0)}
    assert saved["reported"][FID]["mean"] == pytest.approx(mean)
    assert saved["reported"][FID]["values"] == {"3": 46.0, "4": 48.0, "5": 47.0}
    assert saved["reported"][FID]["ci_low"] == pytest.approx(mean - half)
    assert saved["reported"]["eval/precision@200"]["mean"] == pytest.approx(0.3 + 0.04)


def test_default_split_is_first_half_then_second_half(sweep, capsys):
    report_main([str(sweep), "--select", "--no-plot"])
    printed = capsys.readouterr().out
    assert "chosen on `sample.seed` = 0, 1, 2, reported on `sample.seed` = 3, 4, 5" in printed
    assert "selection: " in printed and (sweep / "selection.json").is_file()
    report_main([str(sweep), "--report-seeds", "0,1,2", "--no-plot"])  # one set given: the other is the rest
    printed = capsys.readouterr().out
    assert "chosen on `sample.seed` = 3, 4, 5, reported on `sample.seed` = 0, 1, 2" in printed
    assert "| **guidance.scale=1 (chosen)** | 41.00 | 3 |" in printed


def test_a_higher_is_better_metric_chooses_the_highest(sweep):
    selection = write_report(sweep, make_plot=False, metric="eval/precision@200", select=True)["selection"]
    assert selection.mode == "max" and selection.candidates[selection.chosen][0] == "guidance.scale=2"
    assert selection.reported["eval/precision@200"].mean == pytest.approx(0.3 + 0.04)


@pytest.mark.parametrize(("flags", "message"), [
    (["--select-seeds", "0,1,2", "--report-seeds", "2,3"],
     "error: selection and report seeds share `sample.seed` = 2: a held-out report needs two disjoint sets"),
    (["--select-seeds", "0,9"],
     "error: selection seed(s) 9: not a `sample.seed` of this sweep with results (it has 0, 1, 2, 3, 4, 5)"),
    (["--select", "--report-seeds", "7,x"],
     "error: report seed(s) x: not a `sample.seed` of this sweep with results (it has 0, 1, 2, 3, 4, 5) nor an "
     "integer seed to run"),
    (["--select-seeds", "0,1,2,3,4,5"],
     "error: no report seeds left: the sweep's `sample.seed` = 0, 1, 2, 3, 4, 5; give both sets"),
])
def test_bad_seed_sets_are_one_line(sweep, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(sweep), "--no-plot", *flags])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == message
    assert not (sweep / "report.md").exists() and not (sweep / "selection.json").exists()


def test_fewer_than_two_seeds_with_results_is_refused(tmp_path, capsys):
    for i, scale in enumerate("01"):
        _eval_job(tmp_path, i, ["sample.seed=0", f"guidance.scale={scale}"], {"fid@200": 40.0 + i})
        _eval_job(tmp_path, 2 + i, ["sample.seed=1", f"guidance.scale={scale}"], None)  # still running
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path), "--select", "--no-plot"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == (
        "error: held-out selection needs at least 2 values of `sample.seed` with results (one set to select on, "
        "a disjoint one to report on); this sweep has 1: 0")


def test_select_needs_seed_axes(tmp_path):
    _eval_job(tmp_path, 0, ["guidance.scale=0"], {"fid@200": 40.0})
    _eval_job(tmp_path, 1, ["guidance.scale=1"], {"fid@200": 38.0})
    with pytest.raises(ValueError, match=r"held-out selection \(--select\) needs seed axes"):
        write_report(tmp_path, make_plot=False, select=True)


def test_chosen_rows_are_compared_with_each_other_on_the_report_seeds_only(tmp_path):
    """--select-per guidance: the chosen rows of unguided, classifier and CFG compared pairwise over report seeds
    3-5 (paired by seed): means and intervals of the differences as computed here, Benjamini-Hochberg over the
    three verdicts (scipy's ``false_discovery_control``), a decided verdict it pushes above 5% made inconclusive.
    Over the selection seeds the rows that are not chosen would give other differences: they must not enter."""
    fids = {"guidance.scale=0": (50.0, 51.0, 52.0, 50.0, 50.6, 52.4),
            "guidance.scale=1": (45.0, 46.0, 47.0, 40.0, 41.0, 42.0),
            "guidance.scale=2": (38.0, 39.0, 40.0, 46.0, 48.0, 47.0),  # classifier's choice: 39 over seeds 0-2
            "guidance.cfg_scale=1": (44.0, 44.0, 44.0, 51.0, 52.5, 51.2),  # CFG's choice: 44
            "guidance.cfg_scale=2": (60.0, 60.0, 60.0, 30.0, 30.0, 30.0)}
    root = tmp_path / "sweep"
    for seed in range(6):
        for i, (row, values) in enumerate(fids.items()):
            _eval_job(root, 5 * seed + i, [f"sample.seed={seed}", row, "ckpt=m.ckpt"],
                      {"fid@200": values[seed], "kid_std@200": 0.001 * seed})  # a spread: compared, never judged
    result = write_report(root, make_plot=False, select_per="guidance", select_seeds="0,1,2", report_seeds="3,4,5")
    assert {c.metric for c in result["comparisons"]} == {"eval/fid@200"}
    assert [s.group for s in result["selections"]] == ["unguided", "classifier", "cfg"]
    found = {(c.group, c.reference): c.paired for c in result["comparisons"]}
    assert set(found) == {("unguided", "classifier"), ("unguided", "cfg"), ("classifier", "cfg")}
    chosen = {"unguided": fids["guidance.scale=0"], "classifier": fids["guidance.scale=2"],
              "cfg": fids["guidance.cfg_scale=1"]}
    pvalues = []
    for (row, reference), paired in found.items():
        diffs = [a - b for a, b in zip(chosen[row][3:], chosen[reference][3:], strict=True)]
        mean, half = _interval(diffs)
        assert paired.diff.n == 3 and paired.diff.mean == pytest.approx(mean)
        assert (paired.diff.low, paired.diff.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
        assert paired.p == pytest.approx(stats.ttest_rel(chosen[row][3:], chosen[reference][3:]).pvalue)
        pvalues.append(paired.p)
    for paired, adjusted in zip(found.values(), stats.false_discovery_control(pvalues), strict=True):
        assert paired.p_adjusted == pytest.approx(adjusted) and paired.tests == 3
    # unguided - classifier = (4, 2.6, 5.4): p 0.039 alone (interval excludes 0), 0.058 after BH: demoted
    assert (found["unguided", "classifier"].verdict, found["unguided", "classifier"].demoted) == ("inconclusive", True)
    assert found["classifier", "cfg"].verdict == "better" and not found["classifier", "cfg"].demoted
    assert (found["unguided", "cfg"].verdict, found["unguided", "cfg"].demoted) == ("inconclusive", False)
    markdown = result["markdown"]
    assert "## Held-out comparisons of the chosen rows: on `sample.seed` = 3, 4, 5" in markdown
    assert "| classifier | cfg | -4.6 [-5.6, -3.6] **better** |" in markdown
    assert "| unguided | classifier | +4.0 [+0.5, +7.5] inconclusive† |" in markdown
    saved = json.loads((root / "selection.json").read_text())["comparisons"]
    assert {(c["row"], c["compared_with"], c["verdict"]) for c in saved} == {
        ("unguided", "classifier", "inconclusive"), ("unguided", "cfg", "inconclusive"),
        ("classifier", "cfg", "better")}
