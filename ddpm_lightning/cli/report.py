"""ddpm-report: a multirun folder becomes an ablation table (markdown + CSV) and a bar plot.

    ddpm-report multirun/ablate_arch/2026-11-25_09-00-00                      # ranked by val/fid@n
    ddpm-report multirun/ablate_loss/... --metric val/vlb_bpd --out reports/loss
    ddpm-report multirun/ablate_arch/... --baseline model=adm   # paired differences against another row
    ddpm-report multirun/guidance_sweep/...     # ddpm-eval sweeps: eval/fid@n, ... + report_tradeoff.png
    ddpm-report multirun/guidance_sweep/... --select --select-seeds 0,1,2 --report-seeds 3,4,5   # held out
    ddpm-report multirun/guidance_methods/... --select-per guidance,ckpt --select-seeds 0 --report-seeds 1,2
    ddpm-report multirun/guidance_sweep/... --report-seeds 3,4,5 --launch   # run seeds 3-5 for the chosen row only
    ddpm-report multirun/ablate_arch/... --add-seeds 3      # add_seeds.sh: 3 more seeds for the inconclusive rows
    ddpm-report multirun/ablate_arch/... --wandb            # also to W&B: a job_type=report run in the sweep's group

Seeds are an axis: runs that differ only in a seed override (--seed-keys) become one row with mean, std, n and a
95% t-interval per metric, a paired difference against the baseline row and a verdict (report_summary.csv), the
verdicts of a table corrected for multiple comparisons (Benjamini-Hochberg; --correction holm, --no-correction)
and, for an inconclusive row, a power estimate of the seeds it would need.
Works on partial sweeps: failed runs are listed with their message, unfinished ones as running/incomplete, seeds
and jobs that have not run yet as missing. Every row shows its provenance (code commit, CPU/GPU, precision); paired
differences between jobs whose code, machine or precision differ are refused unless --allow-mixed (rows marked).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ..artifacts import NoSpaceLeft
from ..reporting import CORRECTIONS, MODES, REPORT_RUN_FILE, SEED_KEYS, TRAINING_SEED_KEYS, report_payload, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ddpm-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a `ddpm-train -m` folder (hydra.sweep.dir), or one run folder")
    parser.add_argument("--metric", default=None,
                        help="the primary metric: it ranks the runs (with seed axes: chooses the best row), e.g. "
                             "val/fid@200 or val/vlb_bpd (default: the val/fid@n found, else val/vlb_bpd)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="min or max is better (default: max for IS/precision/recall, min otherwise)")
    parser.add_argument("--out", default=None, help="folder for report.md/.csv/.png (default: the sweep folder)")
    parser.add_argument("--stale-after", type=float, default=60.0, metavar="MIN",
                        help="a job folder without summary.json and unchanged for this many minutes is "
                             "'incomplete' rather than 'running' (default: 60)")
    parser.add_argument("--seed-keys", default=",".join(SEED_KEYS), metavar="KEYS",
                        help="comma-separated overrides that are seeds: their values replicate a row instead of "
                             f"making rows (default: %(default)s; {', '.join(TRAINING_SEED_KEYS)} of a ddpm-train "
                             "job and train_seed of a ddpm-eval job are the training seed, the others and seed of "
                             "a ddpm-eval job sampling seeds)")
    parser.add_argument("--baseline", default=None, metavar="ROW",
                        help="the row the others are compared with, e.g. model=ddpm_base (default: the first row)")
    parser.add_argument("--title", default=None, help="title of the markdown report")
    parser.add_argument("--no-plot", action="store_true", help="skip report.png")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="compute paired differences between jobs whose code commit, CPU/GPU model or precision "
                             "differ (refused otherwise); every such row is marked")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the tables and plots to W&B: a run of job_type=report in the sweep's group "
                             "(offline unless a key is configured; its id kept in <out>/" + REPORT_RUN_FILE + ")")
    _add_statistics_arguments(parser)
    _add_selection_arguments(parser)
    args = parser.parse_args(argv)
    if args.stale_after <= 0:
        parser.error(f"--stale-after must be > 0 minutes, got {args.stale_after:g}")
    if args.add_seeds is not None and args.add_seeds < 1:
        _fail(f"--add-seeds needs a number of new seeds >= 1, got {args.add_seeds}")
    selecting = args.select or args.select_seeds or args.report_seeds or args.select_per
    if args.launch and args.add_seeds is None and not selecting:
        _fail("--launch runs the commands of --add-seeds K or the report seeds of a held-out selection; give "
              "--add-seeds K or --report-seeds")
    return args


def _add_statistics_arguments(parser: argparse.ArgumentParser) -> None:
    """--correction / --no-correction, --add-seeds K and --launch."""
    stats = parser.add_argument_group("multiple comparisons and power")
    stats.add_argument("--correction", choices=CORRECTIONS, default="bh",
                       help="adjust the paired t-test p of every verdict of a table: bh (Benjamini-Hochberg, the "
                            "false-discovery rate), holm (the family-wise error rate) or none (default: %(default)s)")
    stats.add_argument("--no-correction", dest="correction", action="store_const", const="none",
                       help="each verdict tested alone at 5%% (the report before the correction existed)")
    stats.add_argument("--add-seeds", type=int, default=None, metavar="K",
                       help="write add_seeds.sh: the commands that run K new seeds for the rows inconclusive on the "
                            "primary metric and the baseline, into <sweep>/added_seeds/ (the next ddpm-report of the "
                            "sweep aggregates them with the others)")
    stats.add_argument("--launch", action="store_true",
                       help="run what the report wrote: add_seeds.sh (--add-seeds) and report_seeds.sh (the report "
                            "seeds a held-out selection's chosen rows lack)")


def _add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """--select, --select-seeds, --report-seeds."""
    held_out = parser.add_argument_group("held-out selection (a checkpoint, EMA length or guidance scale)")
    held_out.add_argument("--select", action="store_true",
                          help="choose the row with the best primary metric on the selection seeds and report its "
                               "metrics on the disjoint report seeds (report.md, selection.json)")
    held_out.add_argument("--select-seeds", default=None, metavar="SEEDS",
                          help="comma-separated seeds to choose on (implies --select; default: the first half of the "
                               "seeds with results, or those not in --report-seeds)")
    held_out.add_argument("--report-seeds", default=None, metavar="SEEDS",
                          help="comma-separated seeds to report on, disjoint from --select-seeds (implies --select; "
                               "default: the seeds not in --select-seeds)")
    held_out.add_argument("--select-per", default=None, metavar="KEYS",
                          help="choose one row per group of rows with equal values of these comma-separated override "
                               "keys (implies --select); the key `guidance` is the row's guidance method (unguided, "
                               "classifier, cfg, autoguidance, +interval), e.g. --select-per guidance,ckpt")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _publish(result: dict, args: argparse.Namespace) -> None:
    """The report as a W&B run of ``job_type=report`` in the sweep's group (one per report folder: a later report of
    the same sweep is its next step): the aggregated and per-job tables as ``wandb.Table``, the plots as images."""
    import wandb

    from ..loggers import open_wandb_run
    from ..provenance import provenance

    payload = report_payload(result)
    out = Path(args.out or args.sweep_dir)
    sweep = Path(args.sweep_dir).resolve().name
    run = open_wandb_run(out, record_file=REPORT_RUN_FILE, project=payload["identity"]["project"],
                         name=f"report-{sweep}", group=payload["identity"]["group"], job_type="report",
                         tags=["report"], config={**payload["config"], "provenance": provenance()})
    data = {key: wandb.Table(columns=columns, data=rows) for key, (columns, rows) in payload["tables"].items()}
    data.update({key: wandb.Image(str(path), caption=f"{sweep}: {path.name}")
                 for key, path in payload["images"].items()})
    run.log(data)
    run.run.summary.update({"report/metric": payload["config"]["metric"], "report/best": payload["config"]["best"]})
    run.finish()
    group = payload["identity"]["group"]
    result["paths"]["wandb"] = f"run {run.id} (job_type=report, group {group}) in {out / 'wandb'}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = write_report(args.sweep_dir, out_dir=args.out, metric=args.metric, mode=args.mode,
                              stale_after_s=60.0 * args.stale_after, make_plot=not args.no_plot, title=args.title,
                              seed_keys=[k.strip() for k in args.seed_keys.split(",") if k.strip()],
                              baseline=args.baseline, correction=args.correction, select=args.select,
                              select_seeds=args.select_seeds, report_seeds=args.report_seeds,
                              add_seeds=args.add_seeds, allow_mixed=args.allow_mixed, select_per=args.select_per)
        if args.wandb:
            _publish(result, args)
    except (OSError, ValueError) as error:
        if isinstance(error, OSError) and error.errno is not None and not isinstance(error, NoSpaceLeft):
            # the OS's own error: --out is a file, read-only, ...
            error = f"cannot write the report into {args.out or args.sweep_dir} ({error.strerror}: {error.filename})"
        _fail(str(error))
    print(result["markdown"])
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")
    if args.launch:
        _launch(result["paths"], args)


def _launch(paths: dict, args: argparse.Namespace) -> None:
    """Run add_seeds.sh and report_seeds.sh where the report wrote them; one ``error:`` line if one stops."""
    scripts = [paths[kind] for kind in ("add_seeds", "report_seeds") if kind in paths]
    if not scripts:
        print("no inconclusive row and no missing report seed: nothing to launch")
        return
    for script in scripts:
        done = subprocess.run(["bash", str(script)], check=False)
        if done.returncode != 0:
            _fail(f"{script} stopped with exit code {done.returncode}; re-run it to resume (finished jobs are "
                  "skipped)")
    print(f"done: ddpm-report {args.sweep_dir} reports the new jobs with the others")


if __name__ == "__main__":
    main()
