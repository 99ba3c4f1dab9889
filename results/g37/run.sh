#!/usr/bin/env bash
# Issue #37, "Guidance after ADM" measured on the embedded data: the models, then the selection sweeps on sampling
# seeds 0,1,2 for each sampler (DDPM-15, DPM-Solver++(2M)-15), then the chosen row of each method on the held-out
# seeds 3,4,5 (ddpm-report --report-seeds writes and --launch runs them). Methods: unguided, classifier guidance
# (scale 1, 2, 4), CFG (w 0.25, 0.5, 1, 2, 3), CFG inside the interval [167, 881] (w 0.5, 1, 2, 3), autoguidance
# (w 1.25, 1.5, 2, 3). Resumable: rerun this script; finished trainings and jobs are skipped, an interrupted
# training continues from its last checkpoint (resume=auto).
# The model M and its 500-step checkpoint B (the bad model of autoguidance) are the checkpoint-series run of
# results/checkpoint_series/run.sh (the default experiment, every 500-step checkpoint kept).
# Every job records its code (provenance: git commit); ddpm-report pairs only jobs of one commit (else
# --allow-mixed). Resume it at the commit it started on: the 2026-12-08 run ran at 4f274ff from a worktree,
#   git worktree add /work/meas/wt 4f274ff && cd /work/meas/wt && ln -s /work/main/.venv /work/main/runs \
#       /work/main/multirun . && PYTHONPATH=$PWD bash results/g37/run.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
export WANDB_MODE=${WANDB_MODE:-offline} PATH="$PWD/.venv/bin:$PATH"
M=runs/curve/checkpoints/last.ckpt
B=runs/curve/checkpoints/periodic-step0000500.ckpt
C=runs/g37/cfg/checkpoints/last.ckpt
K=runs/g37/classifier/checkpoints/last.ckpt
[ -f $M ] && [ -f runs/curve/metrics.json ] || { echo "error: run results/checkpoint_series/run.sh first (the model M)"; exit 2; }
# the CFG model: the default experiment with label dropout, pinned to M's optimizer steps (load-independent)
N=$(python -c "import torch; print(torch.load('$M', map_location='cpu', weights_only=True)['global_step'])")
if [ ! -f runs/g37/cfg/metrics.json ]; then
  ddpm-train experiment=default train.p_uncond=0.1 trainer.max_steps=$N trainer.max_time=null \
      callbacks.generative_metrics.every_n_val_epochs=0 resume=auto hydra.run.dir=runs/g37/cfg
fi
# the noisy classifier: 2,000 steps pinned
if [ ! -f runs/g37/classifier/.done ]; then
  ddpm-train experiment=classifier_default trainer.max_time=null resume=auto hydra.run.dir=runs/g37/classifier
  touch runs/g37/classifier/.done
fi
COMMON="num_samples=500 precision=bf16 sample.seed=0,1,2"
for S in ddpm:"method=ddpm steps=15" dpmpp:"method=dpm++2m steps=15 schedule=logsnr"; do
  D=multirun/g37/${S%%:*}; ARGS=${S#*:}
  ddpm-eval -m experiment=guidance_sweep ckpt=$M guidance.classifier_ckpt=$K $ARGS $COMMON \
      guidance.scale=0,1,2,4 guidance.interval=null hydra.sweep.dir=$D/classifier
  ddpm-eval -m experiment=guidance_sweep_cfg ckpt=$C $ARGS $COMMON \
      guidance.cfg_scale=0,1,2,3 guidance.interval=null hydra.sweep.dir=$D/cfg
  # CFG's FID-optimal scale is small (w 1 already above w 0 on the first seed): two scales between
  ddpm-eval -m experiment=guidance_sweep_cfg ckpt=$C $ARGS $COMMON \
      guidance.cfg_scale=0.25,0.5 guidance.interval=null hydra.sweep.dir=$D/cfg_low
  ddpm-eval -m experiment=guidance_sweep_autoguidance ckpt=$M guidance.autoguidance_ckpt=$B $ARGS $COMMON \
      guidance.autoguidance_scale=1.5,2,3 guidance.interval=null hydra.sweep.dir=$D/autoguidance
  # the same for autoguidance (w 1.5 best of the grid on the first seeds): w 1.25, as CFG's 0.25
  ddpm-eval -m experiment=guidance_sweep_autoguidance ckpt=$M guidance.autoguidance_ckpt=$B $ARGS $COMMON \
      guidance.autoguidance_scale=1.25 guidance.interval=null hydra.sweep.dir=$D/autoguidance_low
  ddpm-eval -m experiment=guidance_sweep_cfg ckpt=$C $ARGS $COMMON \
      guidance.cfg_scale=0.5,1,2,3 'guidance.interval=[167,881]' hydra.sweep.dir=$D/cfg_interval
  # stage two: each method's chosen row (per guidance method and model) on the held-out seeds 3,4,5, then the report
  ddpm-report $D --select-per guidance,ckpt --report-seeds 3,4,5 --no-plot --launch > /dev/null
  ddpm-report $D --select-per guidance,ckpt --report-seeds 3,4,5 --out results/g37/${S%%:*}
done
