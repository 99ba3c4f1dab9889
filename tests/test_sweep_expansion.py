"""One sweep expansion (``ddpm_lightning.sweeps.expand_sweep``) for the config checks and ``ddpm-report``: the jobs of
Hydra's basic sweeper, in its order, through Hydra's public API only (its private sweeper is the reference here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the reference; the package never imports it
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

import ddpm_lightning
from ddpm_lightning.cli.validate import sweep_jobs
from ddpm_lightning.config import CONFIG_DIR, register_configs
from ddpm_lightning.reporting import expected_jobs
from ddpm_lightning.sweeps import expand_sweep, is_basic_sweeper

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"  # the _target_ Hydra writes


def _reference(params: dict, task: list[str]) -> list[list[str]]:
    arguments = [f"{key}={value}" for key, value in params.items()] + task
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    return [job for batch in batches for job in batch]


CASES = {
    "nothing": ({}, []),
    "one plain override": ({}, ["x=1"]),
    "seed-major ablation": ({"seed": "0,1,2"}, ["model=a,b,c,d", "trainer.max_steps=300"]),
    "a key repeated on the command line": ({"a": "1,2", "b": "range(0,3)"}, ["c=x,y", "+d=1", "a=5"]),
    "sweep functions": ({}, ["a=choice(1,2)", "b=sort(3,1,2)", "c=range(0,1,0.25)",
                             "d=sort(range(5,0,-2),reverse=true)", "t=tag(t1,choice(1,2))"]),
    "prefixes and packages": ({}, ["+e=1,2", "++f=x", "~g", "~h=1", "model@pkg=a,b", "+model@_global_=c"]),
    "quoted, lists, dicts, null, interpolations": (
        {}, ["s='a,b',c", "l=[1,2],[3]", "d={k:1,m:2}", "n=null,true", "i=${x},2", 'q="x y"', "e="]),
    "non-string params, escapes, floats": ({"seed": 0, "lr": "1e-3,2e-3"}, ["x=a\\,b", "y=1.0,-2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_expansion_equals_the_basic_sweeper(case):
    params, task = CASES[case]
    expected = _reference(params, task)
    assert expand_sweep(params, task) == expected
    assert len(expected) >= 1


def test_order_is_the_cartesian_product_with_the_last_key_fastest():
    jobs = expand_sweep({"seed": "0,1"}, ["model=a,b,c"])
    assert jobs == [["seed=0", "model=a"], ["seed=0", "model=b"], ["seed=0", "model=c"],
                    ["seed=1", "model=a"], ["seed=1", "model=b"], ["seed=1", "model=c"]]
    # a key given again keeps its first position and takes the last values (the command line wins)
    assert expand_sweep({"a": "1,2", "b": "x"}, ["a=3"]) == [["a=3", "b=x"]]


@pytest.mark.parametrize(("task", "match"), [
    (["lr=interval(0,1)"], r"^lr=interval\(0,1\): the basic sweeper enumerates choice lists"),
    (["model=glob(*)"], "ConfigLoader is not set"),  # needs Hydra's config loader: as the sweeper without one
    (["a=[1"], "no viable alternative"),
])
def test_what_the_basic_sweeper_refuses_is_refused(task, match):
    with pytest.raises(HydraException, match=match):
        expand_sweep({}, task)
    with pytest.raises(HydraException):
        _reference({}, task)


def test_is_basic_sweeper():
    assert is_basic_sweeper(BASIC_SWEEPER) and is_basic_sweeper("BasicSweeper")
    assert not is_basic_sweeper("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    assert not is_basic_sweeper(None) and not is_basic_sweeper("")


@pytest.mark.parametrize("experiment", ["ablate_arch", "ablate_loss", "ablate_levers", "ablate_shape"])
def test_config_checks_and_report_expand_an_experiment_as_hydra_does(experiment, tmp_path):
    """``validate.sweep_jobs`` (every job checked before the first starts) and ``reporting.expected_jobs`` (jobs not
    started yet, from ``multirun.yaml``) give the basic sweeper's jobs of a real experiment sweep."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "trainer.max_steps=7"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    params = dict(cfg.hydra.sweeper.params)
    task = list(cfg.hydra.overrides.task)
    reference = _reference(params, task)
    assert len(reference) > 1 and sweep_jobs(cfg) == reference

    hydra = {"sweeper": {"_target_": BASIC_SWEEPER, "params": params}, "overrides": {"task": task}}
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}, sort_keys=False))  # as Hydra writes it
    keyed = [[(key.lstrip("+~"), value) for key, value in (item.split("=", 1) for item in job)] for job in reference]
    assert [list(job.items()) for job in expected_jobs(tmp_path)] == keyed


def test_report_without_an_expandable_sweep_has_no_expected_jobs(tmp_path):
    """A sweep ``expand_sweep`` cannot expand (glob needs Hydra's config loader) lists no missing jobs instead of
    failing the report."""
    hydra = {"sweeper": {"_target_": BASIC_SWEEPER, "params": {"seed": "0,1"}},
             "overrides": {"task": ["model=glob(*)"]}}
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    assert expected_jobs(tmp_path) is None
    hydra["overrides"]["task"] = ["model=a,b"]
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    assert expected_jobs(tmp_path) == [{"seed": s, "model": m} for s in "01" for m in "ab"]


# ------------------------------------------------------------------------- no private Hydra module in the package
PRIVATE_HYDRA = re.compile(r"\bhydra\._internal\b|\bfrom\s+hydra\s+import\s+[^\n]*\b_internal\b")


def _private_hydra_uses(root: Path) -> list[str]:
    return [f"{path.relative_to(root)}:{number}" for path in sorted(root.rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE_HYDRA.search(line)]


def test_no_file_of_the_package_uses_hydra_internal():
    assert _private_hydra_uses(Path(ddpm_lightning.__file__).parent) == []


def test_the_private_hydra_check_finds_a_use(tmp_path):
    (tmp_path / "a.py").write_text("import os\nfrom hydra._internal.core_plugins.basic_sweeper import BasicSweeper\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("x = importlib.import_module('hydra._internal.utils')\n")
    (tmp_path / "sub" / "c.py").write_text("from hydra import _internal\nfrom hydra import compose\n")
    assert _private_hydra_uses(tmp_path) == ["a.py:2", "sub/b.py:1", "sub/c.py:1"]
