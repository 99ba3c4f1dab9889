"""FID against the number of network evaluations (NFE) for every sampler, on one checkpoint.

    python -m benchmarks.fid_vs_nfe --ckpt outputs/default/<run>/checkpoints/last.ckpt --out bench_nfe
    python -m benchmarks.fid_vs_nfe --ckpt ... --out bench_nfe --classifier <classifier.ckpt> --scale 2
    python -m benchmarks.fid_vs_nfe --out bench_nfe --table          # print the table of what is done

Each cell is one ``ddpm-eval`` run (the same command a user types) in its own folder under ``--out``:
``num_samples`` samples with the same per-sample seeds for every cell (common random numbers), scored with
FID@N against the data set's cached reference statistics. Cells whose ``results.json`` exists are skipped, so
an interrupted measurement continues where it stopped when the same command is run again. The table prints
FID@N per (method, NFE) and the wall time per ``num_samples`` samples (sampling + scoring, as measured in this
run: compare only rows measured on one machine in one sitting).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# (method, method=, schedule=) rows. Ancestral DDPM and DDIM keep ADM's respacing; the multistep solvers use
# logSNR-uniform steps (DPM-Solver's choice for pixel-space models at few steps).
METHODS = {
    "ddpm": ("ddpm", "adm"),
    "ddim": ("ddim", "adm"),
    "dpm++2m": ("dpm++2m", "logsnr"),
    "dpm++3m": ("dpm++3m", "logsnr"),
    "dpm++2m-sde": ("dpm++2m-sde", "logsnr"),
    "unipc": ("unipc", "logsnr"),
}
NFES = (5, 8, 10, 15, 20, 25, 50)


def cell_dir(out: Path, method: str, nfe: int, scale: float) -> Path:
    return out / (f"{method}_nfe{nfe}" + (f"_s{scale:g}" if scale else ""))


def run_cell(args: argparse.Namespace, method: str, nfe: int, scale: float) -> dict | None:
    folder = cell_dir(args.out, method, nfe, scale)
    results = folder / "results.json"
    if results.is_file():
        return json.loads(results.read_text())
    if folder.exists():  # an interrupted cell: start it again from scratch
        shutil.rmtree(folder)
    sampler, schedule = METHODS[method]
    command = [str(Path(sys.executable).with_name("ddpm-eval")), f"ckpt={args.ckpt}", f"method={sampler}",
               f"schedule={schedule}", f"steps={nfe}", f"num_samples={args.num_samples}", "metrics=[fid]",
               f"seed={args.seed}", f"precision={args.precision}", f"batch_size={args.batch_size}",
               f"hydra.run.dir={folder}"]
    if method == "ddim":
        command.append("eta=0")
    if scale:
        command += [f"guidance.classifier_ckpt={args.classifier}", f"guidance.scale={scale}"]
    print(f"[fid_vs_nfe] {method} NFE={nfe} scale={scale:g}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stdout[-1500:], done.stderr[-1500:], file=sys.stderr)
        return None
    data = json.loads(results.read_text())
    data["bench_wall_s"] = round(seconds, 1)
    results.write_text(json.dumps(data, indent=2))
    return data


def fid_of(results: dict) -> float | None:
    metrics = results.get("metrics", results)
    for key, value in metrics.items():
        if key.split("/")[-1].startswith("fid@"):
            return float(value)
    return None


def table(out: Path, scales: list[float], nfes: list[int]) -> str:
    lines = []
    for scale in scales:
        lines.append(f"\nFID (lower is better){' with classifier guidance s=' + format(scale, 'g') if scale else ''}; "
                     "seconds per run in brackets")
        lines.append("| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        lines.append("|---|" + "---|" * len(nfes))
        for method in METHODS:
            cells = []
            for nfe in nfes:
                path = cell_dir(out, method, nfe, scale) / "results.json"
                if not path.is_file():
                    cells.append("-")
                    continue
                data = json.loads(path.read_text())
                fid = fid_of(data)
                cells.append(f"{fid:.1f} ({data.get('bench_wall_s', float('nan')):.0f} s)" if fid is not None else "?")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="the diffusion checkpoint to score")
    parser.add_argument("--out", type=Path, required=True, help="one folder per cell; rerun to continue")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--nfe", default=",".join(map(str, NFES)), help="comma list of step counts")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="bf16", choices=("32", "bf16"))
    parser.add_argument("--classifier", help="a noisy classifier checkpoint: adds guided rows at --scale")
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--guided-only", action="store_true",
                        help="with --classifier: run only the guided cells (the unguided row set is measured already)")
    parser.add_argument("--table", action="store_true", help="only print the table of the finished cells")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; allowed: {', '.join(METHODS)}")
    nfes = [int(n) for n in args.nfe.split(",") if n]
    scales = [0.0] + ([args.scale] if args.classifier else [])
    if args.guided_only:
        if not args.classifier:
            parser.error("--guided-only needs --classifier")
        scales = [args.scale]
    if not args.table:
        if not args.ckpt:
            parser.error("--ckpt is required unless --table")
        args.out.mkdir(parents=True, exist_ok=True)
        for scale in scales:
            for nfe in nfes:
                for method in methods:
                    run_cell(args, method, nfe, scale)
    print(table(args.out, scales, nfes))


if __name__ == "__main__":
    main()
