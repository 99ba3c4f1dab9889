"""The shape of ``ddpm_lightning.reporting``: small modules imported one way, metric names and directions taken from
``config/choices.py`` (no copies), and the public names re-exported by the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ddpm_lightning.reporting as reporting
from ddpm_lightning.config import choices

PACKAGE = Path(reporting.__file__).parent
MAX_LINES = 350
# each module may import only modules before it (read <- stats <- display <- multiple <- select <- compare, rerun,
# provenance <- tables, plots <- publish <- report)
ORDER = ("read", "stats", "display", "multiple", "select", "compare", "rerun", "provenance", "tables", "plots",
         "curves", "publish", "report")
CHOICE_LISTS = ("HIGHER_IS_BETTER", "LOWER_IS_BETTER", "DISPLAY_NAMES", "METRIC_TABLE")


def _sibling_imports(path: Path) -> set[str]:
    """The modules of the reporting package that ``path`` imports (relative or absolute, anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                found |= {module.split(".")[0]} if module else {alias.name for alias in node.names}
            elif node.level == 0 and module.startswith("ddpm_lightning.reporting."):
                found.add(module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("ddpm_lightning.reporting.")}
    return found


def _assigned_names(path: Path) -> set[str]:
    return {target.id for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assign | ast.AnnAssign)
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name)}


def test_no_module_of_the_package_is_over_the_line_limit():
    sizes = {path.name: len(path.read_text().splitlines()) for path in sorted(PACKAGE.glob("*.py"))}
    assert {f"{name}.py" for name in ORDER} | {"__init__.py"} == set(sizes)  # a new module gets a place in ORDER
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_modules_import_each_other_one_way():
    for rank, name in enumerate(ORDER):
        imported = _sibling_imports(PACKAGE / f"{name}.py")
        assert imported <= set(ORDER[:rank]), f"{name}.py imports {sorted(imported - set(ORDER[:rank]))}"


@pytest.mark.parametrize(("source", "found"), [
    ("from .tables import fmt\nfrom ..config import choices\n", {"tables"}),
    ("def f():\n    from . import plots\n", {"plots"}),
    ("import ddpm_lightning.reporting.report as r\nfrom ddpm_lightning.reporting.read import x\n", {"report", "read"}),
])
def test_the_import_check_sees_sibling_imports(tmp_path, source, found):
    (tmp_path / "m.py").write_text(source)
    assert _sibling_imports(tmp_path / "m.py") == found


def test_metric_names_and_directions_come_from_choices():
    defined = {path.name: _assigned_names(path) & set(CHOICE_LISTS) for path in sorted(PACKAGE.glob("*.py"))}
    assert {name: names for name, names in defined.items() if names} == {}  # no copy of a choice list
    assert _assigned_names(Path(choices.__file__)) >= set(CHOICE_LISTS)  # the check sees assignments
    assert reporting.HIGHER_IS_BETTER is choices.HIGHER_IS_BETTER
    assert reporting.LOWER_IS_BETTER is choices.LOWER_IS_BETTER
    assert reporting.DISPLAY_NAMES is choices.DISPLAY_NAMES


def test_every_metric_of_the_table_is_a_column_with_a_name_and_a_direction():
    """A metric added to ``choices.METRIC_TABLE`` shows up in the markdown table (its spreads aside: only KID's is a
    column), under its display name, ranked in its direction."""
    outputs = {out for metric in choices.METRIC_TABLE for out in metric.outputs}
    assert {out for out in outputs if not out.endswith("_std")} | {"kid_std"} <= set(reporting.TABLE_METRICS)
    assert set(reporting.TABLE_METRICS) <= set(choices.DISPLAY_NAMES)
    for metric in choices.METRIC_TABLE:
        for out in metric.outputs:
            if out in reporting.TABLE_METRICS and out not in reporting.NO_VERDICT:
                assert reporting.metric_mode(f"val/{out}@500") == ("max" if metric.higher_is_better else "min")
    assert reporting.display_name("eval/is_clf_mean@500") == "IS_clf@500"
    assert reporting.display_name("val/kid_std@200") == "KID std@200"
    assert reporting.display_name("val/loss") == "val/loss"


def test_the_package_exports_its_api():
    assert sorted(reporting.__all__) == sorted(set(reporting.__all__))
    missing = [name for name in reporting.__all__ if not hasattr(reporting, name)]
    assert missing == []
    for name in ("write_report", "collect_runs", "read_run", "build_table", "aggregate", "expected_jobs", "summarize",
                 "verdict", "to_markdown", "guidance_key", "MODES", "SEED_KEYS", "TRAINING_SEED_KEYS", "VERDICTS",
                 "TABLE_METRICS", "NO_VERDICT"):
        assert name in reporting.__all__
