"""The provenance object: its keys, git state from a checkout (clean, dirty with a diff hash, null with a reason
outside one), the command line with secrets redacted, and which fields make two jobs an unfair pair."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ddpm_lightning.provenance import (
    PACKAGE_ROOT,
    PAIRING_FIELDS,
    PROVENANCE_KEYS,
    command_line,
    differing_fields,
    git_state,
    provenance,
)


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_the_object_has_every_key_with_what_the_caller_used():
    made_by = provenance(precision="bf16-mixed", world_size=4, command=["/usr/bin/ddpm-train", "experiment=default"])
    assert set(PROVENANCE_KEYS) <= set(made_by)
    assert made_by["precision"] == "bf16-mixed" and made_by["world_size"] == 4
    assert made_by["command"] == "ddpm-train experiment=default"
    assert made_by["threads"] >= 1 and isinstance(made_by["cpu"], str) and made_by["cpu"]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "cpu family" in cpuinfo.read_text():  # VMs may name Zen 3, 4 and 5 all "AMD EPYC"
        assert "(family " in made_by["cpu"] and ", model " in made_by["cpu"]
    assert isinstance(made_by["cpu_bf16_fast"], bool)
    assert made_by["gpu_count"] == 0 or made_by["gpu"]
    assert made_by["python"].count(".") == 2 and made_by["torch"] and made_by["lightning"] and made_by["hydra"]


@pytest.mark.skipif(not (PACKAGE_ROOT / ".git").exists(), reason="the suite runs from an installed package")
def test_a_checkout_records_its_commit():
    state = git_state(str(PACKAGE_ROOT))
    assert len(state["git_commit"]) == 40 and isinstance(state["git_dirty"], bool) and state["git_note"] is None
    assert (state["git_diff_sha256"] is not None) == state["git_dirty"]


def test_clean_and_dirty_trees_and_the_diff_hash(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-qm", "one")
    clean = git_state(str(repo))
    assert clean["git_dirty"] is False and clean["git_diff_sha256"] is None and len(clean["git_commit"]) == 40
    (repo / "untracked.txt").write_text("outputs do not make a tree dirty")
    git_state.cache_clear()
    assert git_state(str(repo))["git_dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    git_state.cache_clear()
    dirty = git_state(str(repo))
    (repo / "a.py").write_text("x = 3\n")
    git_state.cache_clear()
    other = git_state(str(repo))
    assert dirty["git_dirty"] is other["git_dirty"] is True
    assert dirty["git_commit"] == other["git_commit"] == clean["git_commit"]
    assert dirty["git_diff_sha256"] != other["git_diff_sha256"]  # two different edits: not the same code
    git_state.cache_clear()


def test_outside_a_checkout_git_fields_are_null_with_a_reason(tmp_path):
    """An installed package (site-packages), even inside some repository (a venv in a checkout): not that repo's."""
    repo = tmp_path / "repo"
    (repo / ".venv" / "site-packages").mkdir(parents=True)
    _git(repo, "init", "-q")
    for root in (tmp_path / "repo" / ".venv" / "site-packages", tmp_path):
        state = git_state(str(root))
        assert state["git_commit"] is None and state["git_dirty"] is None
        assert state["git_note"] == "not run from a git checkout (installed package)"


def test_the_command_line_has_its_secrets_redacted(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s" * 40)
    line = command_line(["/x/bin/ddpm-train", f"+logger.wandb.notes={'s' * 40}", "seed=1"])
    assert line == "ddpm-train '+logger.wandb.notes=<redacted:WANDB_API_KEY>' seed=1"  # shell-quoted: runnable


def test_jobs_differ_on_code_machine_and_precision_only():
    a = provenance(precision="32-true")
    assert differing_fields(a, dict(a, threads=99, command="other", world_size=8)) == []
    assert differing_fields(a, dict(a, git_commit="0" * 40, cpu="Other CPU", precision="bf16-mixed")) == [
        "git_commit", "cpu", "precision"]
    assert differing_fields(a, dict(a, git_diff_sha256="f" * 64)) == ["git_diff_sha256"]
    assert differing_fields(a, None) == [] and set(PAIRING_FIELDS) <= set(a)
