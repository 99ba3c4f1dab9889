"""ddpm-report and provenance, on fabricated job folders: every row shows what made its numbers; a paired difference
between jobs of other code, machines or precision is refused in one line, or computed with --allow-mixed and the row
marked; jobs written before provenance existed are shown as unknown and never refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from ddpm_lightning.cli.report import main as report_main
from ddpm_lightning.reporting import MIXED_MARK, write_report

MADE_BY = {"version": "0.1.0", "git_commit": "a1b2c3d4e5" + "0" * 30, "git_dirty": False, "git_diff_sha256": None,
           "git_note": None, "python": "3.11.7", "torch": "2.14.1", "lightning": "2.6.6", "hydra": "1.3.8",
           "cuda": None, "cudnn": None, "cpu": "AMD EPYC 9B45", "cpu_bf16_fast": True, "gpu": None, "gpu_count": 0,
           "precision": "bf16-mixed", "threads": 2, "world_size": 1, "command": "ddpm-train -m experiment=x"}
FIDS = {"a": (100.0, 102.0, 104.0), "b": (90.0, 93.0, 93.0), "c": (101.0, 103.0, 105.0)}  # a baseline, b best


def _sweep(root: Path, changed: dict[tuple[str, int], dict] | None = None, provenance: bool = True) -> Path:
    """Three rows (model=a, b, c) x training seeds 0-2; ``changed[(row, seed)]``: fields of that job's provenance."""
    for seed in range(3):
        for i, (row, fids) in enumerate(FIDS.items()):
            folder = root / str(len(FIDS) * seed + i)
            (folder / ".hydra").mkdir(parents=True)
            (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}", f"model={row}"]))
            summary = {"status": "completed", "metrics": {"val/fid@200": fids[seed]}}
            if provenance:
                summary["provenance"] = {**MADE_BY, **(changed or {}).get((row, seed), {})}
            (folder / "summary.json").write_text(json.dumps(summary))
    return root


def test_every_row_shows_its_provenance(tmp_path):
    """One line when every row agrees, else one bullet per row."""
    result = write_report(_sweep(tmp_path / "sweep"), make_plot=False)
    section = result["markdown"].split("## Provenance")[1]
    (line,) = [line for line in section.splitlines() if line.startswith("Every row: ")]
    assert "code a1b2c3d4e5;" in line and "CPU AMD EPYC 9B45 (fast bf16);" in line and "precision bf16-mixed;" in line
    assert result["mixed"] == {}
    edited = {"git_dirty": True, "git_diff_sha256": "9" * 64, "git_commit": MADE_BY["git_commit"]}
    changed = {(row, seed): {**edited, **({"precision": "32-true"} if row == "c" else {})}
               for row in "abc" for seed in range(3)}
    result = write_report(_sweep(tmp_path / "other", changed), make_plot=False, allow_mixed=True)
    section = result["markdown"].split("## Provenance")[1]
    bullets = [line for line in section.splitlines() if line.startswith("- `model=")]
    assert len(bullets) == 3 and all("code a1b2c3d4e5 + diff 99999999;" in b for b in bullets)
    assert "precision 32-true;" in bullets[2] and "precision bf16-mixed;" in bullets[0]


@pytest.mark.parametrize(("changed", "fields"), [
    ({"cpu": "Intel Xeon Platinum 8481C"}, "cpu"),
    ({"git_commit": "f" * 40}, "git_commit"),
    ({"git_dirty": True, "git_diff_sha256": "9" * 64}, "git_diff_sha256"),
    ({"precision": "32-true", "gpu": "NVIDIA H100", "gpu_count": 1}, "gpu, precision"),
])
def test_pairs_of_other_code_machines_or_precision_are_refused_in_one_line(tmp_path, capsys, changed, fields):
    sweep = _sweep(tmp_path / "sweep", {("b", 1): changed})
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(sweep), "--no-plot"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # b is paired with the baseline a, and a with the best row b: both differences would pair the odd job
    assert len(err) == 1 and err[0].startswith(f"error: refusing paired differences between jobs whose {fields} "
                                               f"differ: rows 'model=a' ({fields}); 'model=b' ({fields}); "), err
    assert "--allow-mixed" in err[0]
    assert not (sweep / "report.md").exists()  # refused before any file


def test_allow_mixed_computes_them_and_marks_every_such_row(tmp_path, capsys):
    sweep = _sweep(tmp_path / "sweep", {("c", 2): {"cpu": "Intel Xeon Platinum 8481C"}})
    report_main([str(sweep), "--no-plot", "--allow-mixed"])
    markdown = (sweep / "report.md").read_text()
    marked = f"model=c {MIXED_MARK} (cpu)"  # c is paired with a (baseline) and b (best); a and b with each other
    assert marked in markdown and f"model=a {MIXED_MARK}" not in markdown and f"model=b {MIXED_MARK}" not in markdown
    assert "AMD EPYC 9B45 (fast bf16) / Intel Xeon Platinum 8481C" in markdown  # the row's two machines
    with open(sweep / "report_summary.csv") as handle:
        labels = {row["row"] for row in csv.DictReader(handle)}
    assert labels == {"model=a", "model=b", marked}
    assert "Paired differences" in capsys.readouterr().out


def test_jobs_without_provenance_are_unknown_not_refused(tmp_path):
    result = write_report(_sweep(tmp_path / "sweep", provenance=False), make_plot=False)
    assert "unknown (no provenance recorded)" in result["markdown"] and result["mixed"] == {}
