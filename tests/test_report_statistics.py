"""ddpm-report's statistics at scale: the paired t-test p per verdict (against scipy.stats.ttest_rel), the
Benjamini-Hochberg / Holm adjustment over a table's verdicts (against scipy.stats.false_discovery_control and the
textbook step-up / step-down procedures), the power estimate (against the noncentral t computed here with
scipy.stats.nct, and the standard sample sizes of a paired t-test), the rule line, and --add-seeds: commands that
compose, land in the sweep folder and are aggregated with the old seeds by the next report; the two-stage held-out
selection (--report-seeds the sweep lacks: report_seeds.sh runs them for the chosen rows only)."""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from ddpm_lightning.cli.report import main as report_main
from ddpm_lightning.reporting import adjust, p_value, seeds_for_power, summarize, write_report

FID = "val/fid@200"


def _job(root: Path, name: str, num: int, overrides: list[str], fid: float, config_name: str = "train") -> Path:
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"job": {"num": num, "config_name": config_name}}}))
    if config_name == "eval":
        (folder / "results.json").write_text(json.dumps({"metrics": {"fid@200": fid}}))
    else:
        (folder / "summary.json").write_text(json.dumps({"status": "completed", "metrics": {FID: fid}}))
    return folder


BASE = (100.0, 102.0, 104.0)
DIFFS = {"ddpm_base": (0.0, 0.0, 0.0),  # the baseline
         "adm": (-3.0, -2.6, -3.4),  # t = 13: p 0.006, better under every correction
         "adm_heads": (-2.0, -1.2, -2.8),  # t = 4.33 > t(0.975, 2) = 4.30: p 0.049, better alone, not after BH/Holm
         "adm_biggan": (0.5, -0.5, 1.0),  # p 0.5: inconclusive, |mean| 0.33 under 1.3% of 102
         "adm_adagn": (-4.0, -1.0, -7.0)}  # t = 2.31: inconclusive, a power estimate


def _sweep(root: Path, diffs: dict = DIFFS, seeds: tuple = (0, 1, 2)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for i, (model, diff) in enumerate(diffs.items()):
            num = len(diffs) * seed + i
            _job(root, str(num), num, ["experiment=ablate_arch", f"model={model}", f"seed={seed}"],
                 BASE[seed % 3] + diff[seed % 3])
    return root


# ------------------------------------------------------------------------------------ p-values and adjustments
@pytest.mark.parametrize("diffs", [(-3.0, -2.6, -3.4), (1.0, 3.0), (0.5, -0.5, 1.0, 2.0, -0.1), (-4.0, -1.0, -7.0)])
def test_p_value_is_the_paired_t_test(diffs):
    base = np.array([100.0, 102.0, 104.0, 99.0, 101.0])[:len(diffs)]
    expected = stats.ttest_rel(base + np.array(diffs), base).pvalue
    assert p_value(summarize(list(diffs))) == pytest.approx(expected, rel=1e-9)


def test_p_value_without_spread_or_pairs():
    assert p_value(summarize([-1.0])) is None and p_value(summarize([])) is None
    assert p_value(summarize([1.0, 1.0, 1.0])) == 0.0 and p_value(summarize([0.0, 0.0])) == 1.0


def _bh_rejections(p: list[float], alpha: float) -> set[int]:
    """The textbook step-up: the largest k with p_(k) <= k alpha / m, reject the k smallest."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    k = max((rank for rank in range(1, len(p) + 1) if p[order[rank - 1]] <= rank * alpha / len(p)), default=0)
    return set(order[:k])


def _holm_rejections(p: list[float], alpha: float) -> set[int]:
    """The textbook step-down: reject from the smallest while p_(k) <= alpha / (m - k + 1)."""
    rejected = set()
    for rank, i in enumerate(sorted(range(len(p)), key=lambda i: p[i]), start=1):
        if p[i] > alpha / (len(p) - rank + 1):
            break
        rejected.add(i)
    return rejected


@pytest.mark.parametrize("seed", range(6))
def test_adjusted_p_values_match_scipy_and_the_textbook_procedures(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 1, 30), rng.uniform(0, 0.01, 10), [0.0, 0.03, 0.03]])  # ties and a zero
    rng.shuffle(p)
    p = [float(x) for x in p]
    bh = adjust(p, "bh")
    assert bh == pytest.approx(stats.false_discovery_control(p, method="bh").tolist(), rel=1e-12, abs=1e-15)
    holm = adjust(p, "holm")
    for alpha in (0.01, 0.05, 0.1):
        assert {i for i, q in enumerate(bh) if q <= alpha} == _bh_rejections(p, alpha)
        assert {i for i, q in enumerate(holm) if q <= alpha} == _holm_rejections(p, alpha)
    assert adjust(p, "none") == p


def test_holm_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept monotone: 0.06
    assert adjust([0.01, 0.04, 0.03, 0.005], "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust([0.5, 0.6], "holm") == pytest.approx([1.0, 1.0])  # capped at 1
    assert adjust([], "bh") == []


def test_unknown_correction_is_refused():
    with pytest.raises(ValueError, match="correction='fdr'; allowed: bh, holm, none"):
        adjust([0.1], "fdr")


# ------------------------------------------------------------------------------------ power
def _power_by_hand(delta: float, sd: float, alpha: float, floor: float = 2.0) -> int | None:
    for n in range(2, 1001):
        critical = max(stats.t.ppf(1 - alpha / 2, n - 1), floor)
        shift = abs(delta) / sd * math.sqrt(n)
        power = stats.nct.sf(critical, n - 1, shift) + stats.nct.cdf(-critical, n - 1, shift)
        if power >= 0.8:
            return n
    return None


@pytest.mark.parametrize(("delta", "sd", "alpha"), [(-2.0, 0.8, 0.0333), (1.681, 0.631, 0.0052), (-4.76, 2.89, 0.05),
                                                    (0.3, 1.0, 0.05), (0.25, 1.0, 0.01)])
def test_seeds_for_power_is_the_noncentral_t(delta, sd, alpha):
    assert seeds_for_power(delta, sd, alpha) == _power_by_hand(delta, sd, alpha)


def test_seeds_for_power_matches_the_standard_paired_t_sample_sizes():
    # two-sided paired t-test, alpha 0.05, power 0.8: effect size 0.5 -> 34 pairs, 0.8 -> 15, 1.0 -> 10
    assert [seeds_for_power(d, 1.0) for d in (0.5, 0.8, 1.0)] == [34, 15, 10]
    # 0.2 needs 199 by the t-test alone; the verdict's 2-standard-error floor (t < 2 past ~60 pairs) adds a few
    assert _power_by_hand(0.2, 1.0, 0.05, floor=0.0) == 199 and seeds_for_power(0.2, 1.0) == 203
    assert seeds_for_power(0.01, 1.0) is None  # past 1000 pairs


# ------------------------------------------------------------------------------------ the correction in the report
def test_bh_default_demotes_a_borderline_verdict_and_says_so(tmp_path):
    sweep = _sweep(tmp_path / "sweep")
    result = write_report(sweep, make_plot=False)
    markdown, rows = result["markdown"], result["aggregate"]
    labels = [g.label for g in rows.groups]
    p = {m: stats.ttest_rel(np.array(BASE) + np.array(d), np.array(BASE)).pvalue for m, d in DIFFS.items()
         if m != "ddpm_base"}
    expected = dict(zip(p, stats.false_discovery_control(list(p.values()), method="bh"), strict=True))
    for model in p:
        paired = rows.groups[labels.index(f"model={model}")].vs_baseline[FID]
        assert paired.p == pytest.approx(p[model]) and paired.p_adjusted == pytest.approx(expected[model])
        assert paired.tests == 4
    heads = rows.groups[labels.index("model=adm_heads")].vs_baseline[FID]
    assert p["adm_heads"] < 0.05 < expected["adm_heads"] and heads.verdict == "inconclusive" and heads.demoted
    assert rows.groups[labels.index("model=adm")].vs_baseline[FID].verdict == "better"
    assert "| adm_heads | 3 | -2.0 [-4.0, -0.0] inconclusive† |" in markdown
    assert ("Multiple comparisons: Benjamini-Hochberg over the 4 verdicts of this table (rows x metrics with >= 2 "
            "pairs), false-discovery rate 0.05: a verdict is better or worse only when its adjusted paired t-test "
            "p <= 0.05 and the rule above holds; it made 1 decided verdict inconclusive (marked †).") in markdown

    # the power estimate of an inconclusive row: BH asks (rejections + 1) * alpha / m of it, here 2 * 0.05 / 4
    adagn = rows.groups[labels.index("model=adm_adagn")].vs_baseline[FID]
    n = _power_by_hand(-4.0, 3.0, 2 * 0.05 / 4)
    assert adagn.power.seeds == n and adagn.power.alpha == pytest.approx(0.025)
    assert (f"- `model=adm_adagn`: power estimate: ~{n} seeds would separate Δ=-4.000 at sd=3.000 (80% power, "
            "α=0.025)") in markdown
    assert "- `model=adm_biggan`: power estimate: none (|Δ|=0.333 is under 1.3% of the baseline's 102.0" in markdown
    with open(result["paths"]["summary_csv"]) as handle:
        summary = {r["row"]: r for r in csv.DictReader(handle) if r["metric"] == FID}
    assert summary["model=adm_adagn"]["power_seeds"] == str(n) and summary["model=adm_biggan"]["power_seeds"] == ""
    assert float(summary["model=adm_heads"]["p_adjusted"]) == pytest.approx(expected["adm_heads"])
    assert (summary["model=adm_heads"]["verdict"], summary["model=adm_heads"]["correction"]) == ("inconclusive", "bh")
    assert summary["model=ddpm_base"]["p_value"] == ""


def test_holm_and_no_correction_flags(tmp_path, capsys):
    sweep = _sweep(tmp_path / "sweep")
    report_main([str(sweep), "--no-plot", "--correction", "holm"])
    printed = capsys.readouterr().out
    assert "Multiple comparisons: Holm over the 4 verdicts of this table" in printed
    assert "family-wise error rate 0.05" in printed and "| adm_heads | 3 | -2.0 [-4.0, -0.0] inconclusive† |" in printed
    report_main([str(sweep), "--no-plot", "--no-correction"])
    printed = capsys.readouterr().out
    assert "| adm_heads | 3 | -2.0 [-4.0, -0.0] **better** |" in printed  # the verdict alone, as before
    assert "Multiple comparisons: no correction (`--no-correction`): each of the 4 verdicts" in printed
    assert "†" not in printed
    with open(sweep / "report_summary.csv") as handle:
        heads = next(r for r in csv.DictReader(handle) if r["row"] == "model=adm_heads" and r["metric"] == FID)
    assert heads["correction"] == "none" and float(heads["p_adjusted"]) == pytest.approx(float(heads["p_value"]))


def test_ties_with_the_best_row_are_corrected_too(tmp_path):
    # best row adm; adm_heads is 2 worse with p 0.049 alone ("not tied" uncorrected) and tied once BH corrects the
    # 4 comparisons with the best row (0.049 x 4 / 3 > 0.05); adm_adagn is tied either way
    diffs = {"ddpm_base": (0.0, 0.0, 0.0), "adm": (-10.0, -10.5, -9.5), "adm_heads": (-8.0, -9.3, -6.7),
             "adm_biggan": (-2.0, -2.5, -1.0), "adm_adagn": (-9.5, -11.0, -8.5)}
    sweep = _sweep(tmp_path / "sweep", diffs)
    corrected = write_report(sweep, make_plot=False)["aggregate"]
    alone = write_report(sweep, make_plot=False, correction="none")["aggregate"]
    p = [stats.ttest_rel(np.array(diffs[m]), np.array(diffs["adm"])).pvalue for m in diffs if m != "adm"]
    expected = stats.false_discovery_control(p, method="bh")
    assert p[1] < 0.05 < expected[1] and alone.best == corrected.best == 1
    assert alone.tied == [4] and corrected.tied == [2, 4]
    assert [corrected.groups[i].vs_best.p_adjusted for i in (0, 2, 3, 4)] == pytest.approx(expected.tolist())
    assert "The ≈ ties use it over the 4 comparisons with the best row." in write_report(sweep, make_plot=False)[
        "markdown"]


# ------------------------------------------------------------------------------------ --add-seeds
def _commands(script: Path) -> list[list[str]]:
    return [shlex.split(line) for line in script.read_text().splitlines() if line.startswith("ddpm-")]


def test_add_seeds_writes_commands_for_the_undecided_rows_that_compose(tmp_path):
    from ddpm_lightning.cli.compose import compose_run
    from ddpm_lightning.sweeps import expand_sweep

    sweep = _sweep(tmp_path / "sweep")
    result = write_report(sweep, make_plot=False, add_seeds=2)
    plan = result["add_seeds"]
    assert plan.seeds == [3, 4] and plan.rows == ["model=ddpm_base", "model=adm_heads", "model=adm_biggan",
                                                   "model=adm_adagn"]  # the baseline, then the inconclusive rows
    script = result["paths"]["add_seeds"]
    assert script == sweep / "add_seeds.sh" and script.stat().st_mode & 0o111
    markdown = result["markdown"]
    assert "## Added seeds" in markdown and "`seed` = 3, 4 for the 3 inconclusive row(s)" in markdown
    commands = _commands(script)
    assert len(commands) == 4
    heads = commands[1]
    assert heads[:2] == ["ddpm-train", "-m"] and "model=adm_heads" in heads and "seed=3,4" in heads
    assert f"hydra.sweep.dir={sweep.absolute()}/added_seeds/seed_3-4/model-adm_heads" in heads
    task = [o for o in heads[2:] if not o.startswith("hydra.")]
    jobs = expand_sweep(None, task)
    assert [job[-1] for job in jobs] == ["seed=3", "seed=4"]
    for job in jobs:
        cfg = compose_run(job, tmp_path / "compose")
        assert cfg.seed in (3, 4) and cfg.model.num_heads == 4  # the adm_heads row


def test_added_seeds_are_aggregated_with_the_old_ones(tmp_path):
    sweep = _sweep(tmp_path / "sweep")
    plan = write_report(sweep, make_plot=False, add_seeds=3)["add_seeds"]
    # what the commands would leave: a sweep per row under added_seeds/, job folders 0..K-1
    added = {"ddpm_base": (0.0, 0.0, 0.0), "adm_adagn": (-5.0, -6.0, -4.0)}
    for model, diffs in added.items():
        command = next(c for c in _commands(sweep / "add_seeds.sh") if f"model={model}" in c)
        folder = Path(next(o for o in command if o.startswith("hydra.sweep.dir=")).split("=", 1)[1])
        (folder / "multirun.yaml").parent.mkdir(parents=True)
        (folder / "multirun.yaml").write_text("hydra: {}\n")
        for num, (seed, diff) in enumerate(zip(plan.seeds, diffs, strict=True)):
            _job(folder, str(num), num, ["experiment=ablate_arch", f"model={model}", f"seed={seed}"], 103.0 + diff)
    rows = write_report(sweep, make_plot=False)["aggregate"]
    assert [g.label for g in rows.groups] == [f"model={m}" for m in DIFFS]  # the order of the rows is kept
    by_label = {g.label: g for g in rows.groups}
    assert by_label["model=ddpm_base"].stats[FID].n == 6 and by_label["model=adm"].stats[FID].n == 3
    adagn = by_label["model=adm_adagn"].vs_baseline[FID]
    all_diffs = [*DIFFS["adm_adagn"], *added["adm_adagn"]]
    assert adagn.diff.n == 6 and adagn.diff.mean == pytest.approx(np.mean(all_diffs))
    assert adagn.p == pytest.approx(stats.ttest_1samp(all_diffs, 0.0).pvalue)
    again = write_report(sweep, make_plot=False, add_seeds=1)["add_seeds"]
    assert again.seeds == [6] and again.folder.name == "seed_6-6"  # counts on after the added seeds


def test_add_seeds_for_an_eval_sweep_uses_ddpm_eval_and_the_sampling_seed(tmp_path):
    root = tmp_path / "sweep"
    fids = {"0": (40.0, 42.0), "2": (39.0, 42.5)}
    for seed in range(2):
        for i, (scale, values) in enumerate(fids.items()):
            _job(root, str(2 * seed + i), 2 * seed + i, [f"sample.seed={seed}", f"guidance.scale={scale}",
                                                         "ckpt=/runs/a b/m.ckpt"], values[seed], config_name="eval")
    result = write_report(root, make_plot=False, add_seeds=2)
    scale2 = _commands(result["paths"]["add_seeds"])[1]
    assert scale2[:2] == ["ddpm-eval", "-m"] and "sample.seed=2,3" in scale2 and "ckpt=/runs/a b/m.ckpt" in scale2


def _fake_entry_point(tmp_path: Path, name: str, monkeypatch) -> tuple[Path, Path]:
    """A ``name`` on PATH (alone with the system's tools) that appends its arguments to a log: (it, the log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    fake = bin_dir / name
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {shlex.quote(str(log))}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/usr/bin')}:{Path('/bin')}")
    return fake, log


def test_launch_runs_the_commands(tmp_path, monkeypatch, capsys):
    sweep = _sweep(tmp_path / "sweep")
    fake, log = _fake_entry_point(tmp_path, "ddpm-train", monkeypatch)
    report_main([str(sweep), "--no-plot", "--add-seeds", "2", "--launch"])
    calls = log.read_text().splitlines()
    assert len(calls) == 4 and all("seed=3,4" in call for call in calls)
    assert "done: ddpm-report" in capsys.readouterr().out
    fake.write_text("#!/usr/bin/env bash\nexit 3\n")
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(sweep), "--no-plot", "--add-seeds", "2", "--launch"])
    assert exit_info.value.code == 2 and "stopped with exit code 3" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--add-seeds", "0"], "error: --add-seeds needs a number of new seeds >= 1, got 0"),
    (["--add-seeds", "-2"], "error: --add-seeds needs a number of new seeds >= 1, got -2"),
    (["--launch"], "error: --launch runs the commands of --add-seeds K or the report seeds of a held-out selection; "
                   "give --add-seeds K or --report-seeds"),
])
def test_add_seeds_bad_input_is_one_line(tmp_path, capsys, flags, message):
    sweep = _sweep(tmp_path / "sweep")
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(sweep), "--no-plot", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip() == message
    assert not (sweep / "add_seeds.sh").exists()


def test_add_seeds_needs_seed_axes(tmp_path):
    _job(tmp_path, "0", 0, ["model=adm", "seed=0"], 90.0)
    with pytest.raises(ValueError, match="--add-seeds needs seed axes"):
        write_report(tmp_path, make_plot=False, add_seeds=2)


# ------------------------------------------------------------------------------------ two-stage held-out selection
SCALE_FIDS = {"0": (40.0, 41.0, 42.0), "1": (36.0, 37.0, 36.5), "2": (38.0, 37.5, 39.0)}  # scale 1 chosen


def _eval_sweep(root: Path, fids: dict = SCALE_FIDS, seeds: tuple = (0, 1, 2), extra: tuple = ()) -> Path:
    for seed in seeds:
        for i, (scale, values) in enumerate(fids.items()):
            num = len(fids) * seed + i
            _job(root, str(num), num, [f"sample.seed={seed}", f"guidance.scale={scale}", "ckpt=/runs/m.ckpt", *extra],
                 values[seed], config_name="eval")
    return root


def test_report_seeds_the_sweep_lacks_run_for_the_chosen_row_only(tmp_path):
    """Stage one: every scale on seeds 0-2; --report-seeds 3,4 (absent) chooses on 0-2 and writes one command, for
    the chosen row; stage two: its jobs land under report_seeds/ and the same report then reports them, and only
    them, as the held-out values."""
    root = _eval_sweep(tmp_path / "sweep")
    first = write_report(root, make_plot=False, report_seeds="3,4")
    selection = first["selections"][0]
    assert selection.selection_seeds == ["0", "1", "2"] and selection.report_seeds == ["3", "4"]
    assert selection.candidates[selection.chosen][0] == "guidance.scale=1" and selection.reported == {}
    plan = first["report_seeds"]
    assert plan.rows == ["guidance.scale=1"] and plan.seeds == ["3", "4"]
    (command,) = _commands(first["paths"]["report_seeds"])
    folder = root.absolute() / "report_seeds" / "sample.seed_3-4" / "guidance.scale-1"
    assert command[:2] == ["ddpm-eval", "-m"] and "guidance.scale=1" in command and "sample.seed=3,4" in command
    assert "ckpt=/runs/m.ckpt" in command and f"hydra.sweep.dir={folder}" in command
    assert "## Report seeds to run" in first["markdown"] and "no completed job of this row" in first["markdown"]

    held_out = {3: 35.0, 4: 35.5}  # what the command's two jobs score
    for num, (seed, fid) in enumerate(held_out.items()):
        _job(folder, str(num), num, ["sample.seed=" + str(seed), "guidance.scale=1", "ckpt=/runs/m.ckpt"], fid,
             config_name="eval")
    second = write_report(root, make_plot=False, report_seeds="3,4")
    chosen = second["selections"][0]
    assert chosen.candidates[chosen.chosen][0] == "guidance.scale=1"
    assert chosen.reported_values["eval/fid@200"] == {"3": 35.0, "4": 35.5}  # the held-out jobs, not seeds 0-2
    assert chosen.reported["eval/fid@200"].mean == pytest.approx(35.25)
    assert second["report_seeds"].commands == [] and "report_seeds" not in second["paths"]
    assert "## Report seeds to run" not in second["markdown"]


def test_report_seeds_per_group_and_launch(tmp_path, monkeypatch, capsys):
    """--select-per: one command per group's chosen row (groups unguided, classifier, cfg, classifier+cfg); --launch
    runs report_seeds.sh."""
    root = tmp_path / "sweep"
    _eval_sweep(root / "classifier")
    _eval_sweep(root / "cfg", fids={"0": (40.0, 41.0, 42.0), "3": (30.0, 31.0, 32.0)}, extra=("guidance.cfg_scale=1",))
    _, log = _fake_entry_point(tmp_path, "ddpm-eval", monkeypatch)
    report_main([str(root), "--no-plot", "--select-per", "guidance", "--report-seeds", "5", "--launch"])
    calls = log.read_text().splitlines()
    assert len(calls) == 4 and all("sample.seed=5" in call for call in calls)
    assert sum("guidance.scale=1 " in c and "guidance.cfg_scale=1" not in c for c in calls) == 1  # classifier: 1
    assert sum("guidance.scale=3" in c and "guidance.cfg_scale=1" in c for c in calls) == 1  # classifier+cfg's
    assert "done: ddpm-report" in capsys.readouterr().out


def test_report_seed_folders_of_long_rows_fit_a_file_name(tmp_path):
    """Rows told apart by long overrides (two checkpoints under a deep folder: the #37 sweep's rows named every
    guidance key and path, 300+ bytes) get folder names the file system takes (<= 255 bytes; here <= 96
    characters), still distinct and starting with the row's overrides."""
    deep = "/".join(["a_rather_long_folder_name_for_checkpoints"] * 6)
    root = tmp_path / "sweep"
    for seed in (0, 1):
        for i, run in enumerate(("first", "second")):
            num = 2 * seed + i
            _job(root, str(num), num, [f"sample.seed={seed}", f"ckpt=/{deep}/{run}/last.ckpt", "guidance.scale=1"],
                 40.0 + i + seed, config_name="eval")
    result = write_report(root, make_plot=False, select_per="ckpt", report_seeds="3")
    folders = [Path(shlex.split(c)[-1].split("=", 1)[1]) for c in result["report_seeds"].commands]
    assert len(folders) == 2 and folders[0] != folders[1]
    for folder in folders:
        assert len(folder.name) <= 96 and folder.name.startswith("ckpt-_a_rather_long_folder")
        folder.mkdir(parents=True)  # the file system takes it (the long name: "File name too long")


def test_report_seed_scripts_run_the_unguided_row_of_a_classifier_sweep(tmp_path, monkeypatch):
    """--select-per guidance chooses the unguided row (scale 0, with the sweep's classifier_ckpt) too; its held-out
    jobs alone would fail ddpm-eval's sweep check "the classifier would guide nothing" (the #37 stage two stopped
    there). report_seeds.sh exports DDPM_CONTINUES_SWEEP=<sweep>, under which that check (over one sweep's jobs)
    lets the continuation through; without it the check still refuses."""
    from omegaconf import OmegaConf

    from ddpm_lightning.cli.validate import check_sweep_guidance

    root = _eval_sweep(tmp_path / "sweep", extra=("guidance.classifier_ckpt=/runs/k.ckpt",))
    result = write_report(root, make_plot=False, select_per="guidance", report_seeds="3")
    script = result["paths"]["report_seeds"].read_text().splitlines()
    assert f"export DDPM_CONTINUES_SWEEP={root.absolute()}  # these jobs continue that sweep" in script
    unguided = [c for c in result["report_seeds"].commands if "guidance.scale=0 " in c]
    assert len(unguided) == 1 and "guidance.classifier_ckpt=/runs/k.ckpt" in unguided[0]
    jobs = [OmegaConf.create({"guidance": {"classifier_ckpt": "/runs/k.ckpt", "scale": 0}})] * 3
    monkeypatch.delenv("DDPM_CONTINUES_SWEEP", raising=False)
    with pytest.raises(ValueError, match="the classifier would guide nothing"):
        check_sweep_guidance(jobs)
    monkeypatch.setenv("DDPM_CONTINUES_SWEEP", str(root))
    check_sweep_guidance(jobs)
