#!/usr/bin/env bash
# Issue #36: FID@500 against training step over the default run's checkpoints, 3 sampling seeds, and the run's
# final in-loop score reproduced by the command the metric callback wrote. Resumable: rerun this script (a finished
# training is kept, scored checkpoints are skipped, a half-sampled one continues from its shards).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
export WANDB_MODE=${WANDB_MODE:-offline}
export PATH="$PWD/.venv/bin:$PATH"   # ddpm-* of this checkout (the reproduce line names ddpm-eval)
RUN=runs/curve
if [ ! -f $RUN/metrics.json ]; then
  ddpm-train experiment=default callbacks.periodic_checkpoint.every_n_train_steps=500 \
      callbacks.periodic_checkpoint.save_top_k=-1 hydra.run.dir=$RUN
fi
ddpm-eval -m ckpts=$RUN num_samples=500 sample.seed=0,1,2 precision=bf16 hydra.sweep.dir=multirun/curve
ddpm-report multirun/curve
if [ ! -f outputs/curve_reproduced/results.json ]; then
  CMD=$(python -c "import json; print(json.load(open('$RUN/metrics.json'))['reproduce'])")
  echo "reproduce: $CMD"
  eval "$CMD hydra.run.dir=outputs/curve_reproduced"
fi
