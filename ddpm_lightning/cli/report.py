"""ddpm-report: a multirun folder becomes an ablation table (markdown + CSV) and a bar plot.

    ddpm-report multirun/ablate_arch/2026-11-25_09-00-00                      # ranked by val/fid@n
    ddpm-report multirun/ablate_loss/... --metric val/vlb_bpd --out reports/loss
    ddpm-report multirun/ablate_arch/... --baseline model=adm   # paired differences against another row
    ddpm-report multirun/guidance_sweep/...     # ddpm-eval sweeps: eval/fid@n, ... + report_tradeoff.png

Seeds are an axis: runs that differ only in a seed override (--seed-keys) become one row with mean, std, n and a
95% t-interval per metric, a paired difference against the baseline row and a verdict (report_summary.csv).
Works on partial sweeps: failed runs are listed with their message, unfinished ones as running/incomplete, seeds
and jobs that have not run yet as missing.
"""

from __future__ import annotations

import argparse
import sys

from ..artifacts import NoSpaceLeft
from ..reporting import MODES, SEED_KEYS, TRAINING_SEED_KEYS, write_report


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
                             "job is the training seed, the others and seed of a ddpm-eval job sampling seeds)")
    parser.add_argument("--baseline", default=None, metavar="ROW",
                        help="the row the others are compared with, e.g. model=ddpm_base (default: the first row)")
    parser.add_argument("--title", default=None, help="title of the markdown report")
    parser.add_argument("--no-plot", action="store_true", help="skip report.png")
    args = parser.parse_args(argv)
    if args.stale_after <= 0:
        parser.error(f"--stale-after must be > 0 minutes, got {args.stale_after:g}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = write_report(args.sweep_dir, out_dir=args.out, metric=args.metric, mode=args.mode,
                              stale_after_s=60.0 * args.stale_after, make_plot=not args.no_plot, title=args.title,
                              seed_keys=[k.strip() for k in args.seed_keys.split(",") if k.strip()],
                              baseline=args.baseline)
    except (OSError, ValueError) as error:
        if isinstance(error, OSError) and error.errno is not None and not isinstance(error, NoSpaceLeft):
            # the OS's own error: --out is a file, read-only, ...
            error = f"cannot write the report into {args.out or args.sweep_dir} ({error.strerror}: {error.filename})"
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(result["markdown"])
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
