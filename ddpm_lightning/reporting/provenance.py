"""Provenance in a report: what made each row's numbers, and the pairing guard.

Every job records a ``provenance`` object (``ddpm_lightning.provenance``: code commit and uncommitted diff, CPU/GPU
model, precision, ...) in its ``summary.json`` / ``results.json``. ``provenance_lines`` shows it per row (or per job
without seed axes). A paired difference is only fair between jobs of the same code, machine and precision, so
``check_pairs`` refuses (ValueError: the one ``error:`` line of ``ddpm-report``) a report whose paired jobs (the same
seed in a row and in the baseline or best row it is compared with) differ in one of ``PAIRING_FIELDS``, naming the
fields and rows; with ``allow_mixed`` it returns them instead and ``mark_mixed`` marks those rows (``MIXED_MARK``)
in every table, CSV and plot. Jobs written before provenance existed are shown as unknown and never refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..provenance import PAIRING_FIELDS, differing_fields
from .read import RunRecord, override_dict
from .stats import Aggregate, SweepTable

MIXED_MARK = "⚠ mixed"
UNKNOWN = "unknown (no provenance recorded)"
COLUMNS = ("code", "CPU", "GPU", "precision", "threads x processes", "versions")


def _unit(aggregate: Aggregate, run: RunRecord) -> str:
    values = override_dict(run.overrides)
    return " ".join(f"{key}={values.get(key, '')}" for key in aggregate.unit_axes)


def mixed_pairs(aggregate: Aggregate) -> dict[int, list[str]]:
    """Row index -> the ``PAIRING_FIELDS`` on which one of its completed jobs differs from the job of the same seed
    in a row it is compared with (the baseline, and the best row on the primary metric)."""
    references = {aggregate.baseline} | ({aggregate.best} if aggregate.best is not None else set())
    found: dict[int, list[str]] = {}
    for index, group in enumerate(aggregate.groups):
        fields: set[str] = set()
        for reference in references - {index}:
            for run in group.runs:
                for other in aggregate.groups[reference].runs:
                    if run.status == other.status == "completed" and _unit(aggregate, run) == _unit(aggregate, other):
                        fields.update(differing_fields(run.provenance, other.provenance))
        if fields:
            found[index] = [field for field in PAIRING_FIELDS if field in fields]
    return found


def check_pairs(aggregate: Aggregate | None, allow_mixed: bool = False) -> dict[int, list[str]]:
    """``mixed_pairs``, or a one-line ValueError naming the differing fields and rows unless ``allow_mixed``."""
    if aggregate is None:
        return {}
    mixed = mixed_pairs(aggregate)
    if mixed and not allow_mixed:
        fields = [field for field in PAIRING_FIELDS if any(field in found for found in mixed.values())]
        rows = "; ".join(f"{aggregate.groups[i].label!r} ({', '.join(found)})" for i, found in mixed.items())
        raise ValueError(f"refusing paired differences between jobs whose {', '.join(fields)} differ: rows {rows}; "
                         "pair only jobs of the same code, machine and precision, or pass --allow-mixed to compute "
                         "them anyway (every such row marked)")
    return mixed


def mark_mixed(aggregate: Aggregate | None, mixed: dict[int, list[str]]) -> None:
    """Append ``⚠ mixed (<fields>)`` to the label of each row in ``mixed``."""
    for index, fields in mixed.items():
        group = aggregate.groups[index]
        group.label = f"{group.label} {MIXED_MARK} ({', '.join(fields)})"


def describe(records: Sequence[dict | None]) -> dict[str, str]:
    """One cell per column of ``provenance_lines`` for a set of jobs: each field's distinct values joined by `` / ``."""
    known = [r for r in records if r]
    if not known:
        return dict.fromkeys(COLUMNS, UNKNOWN if records else "")

    def values(render) -> str:
        return " / ".join(dict.fromkeys(render(r) for r in known)) + (" / unknown" if len(known) < len(records)
                                                                      else "")

    return {"code": values(_code),
            "CPU": values(lambda r: f"{r.get('cpu')}{' (fast bf16)' * bool(r.get('cpu_bf16_fast'))}"),
            "GPU": values(lambda r: f"{r.get('gpu_count')} x {r.get('gpu')}" if r.get("gpu") else "none"),
            "precision": values(lambda r: str(r.get("precision"))),
            "threads x processes": values(lambda r: f"{r.get('threads')} x {r.get('world_size')}"),
            "versions": values(lambda r: f"torch {r.get('torch')}, lightning {r.get('lightning')}, "
                                         f"ddpm_lightning {r.get('version')}")}


def _code(record: dict) -> str:
    commit = record.get("git_commit")
    if not commit:
        return f"{record.get('version')} ({record.get('git_note') or 'no git'})"
    dirty = record.get("git_diff_sha256")
    return f"{commit[:10]}{f' + diff {dirty[:8]}' if record.get('git_dirty') and dirty else ''}"


def provenance_lines(table: SweepTable, aggregate: Aggregate | None, mixed: dict[int, list[str]]) -> list[str]:
    """The markdown section: what made each row's numbers (each job's without seed axes), one bullet per row with
    completed jobs, or one line for all rows when they agree."""
    if aggregate is not None:
        rows = [(group.label, [r.provenance for r in group.runs if r.status == "completed"])
                for group in aggregate.groups]
    else:
        rows = [(table.label(run), [run.provenance]) for run in table.runs if run.status == "completed"]
    described = [(label, describe(records)) for label, records in rows if records]
    lines = ["", "## Provenance: what made the numbers", ""]
    if not described:
        return lines + ["No completed job."]

    def text(cells: dict[str, str]) -> str:
        return "; ".join(f"{column} {cells[column]}" for column in COLUMNS)

    if len({text(cells) for _, cells in described}) == 1:
        lines.append(f"Every row: {text(described[0][1])}.")
    else:
        lines += [f"- `{label}`: {text(cells)}" for label, cells in described]
    if aggregate is not None:
        lines += ["", f"A paired difference is computed only between jobs of the same {', '.join(PAIRING_FIELDS)} "
                      "(`ddpm-report` refuses others unless `--allow-mixed`)."]
    if mixed:
        lines.append(f"Computed anyway (--allow-mixed): rows marked {MIXED_MARK} pair jobs that differ in the fields "
                     "named.")
    return lines
