#!/usr/bin/env bash
# Issue #38, guidance in the main job: `make train`'s job (experiment=default, 10 minutes) without and with label
# dropout (train.p_uncond=0.1), training seeds 0, 1, 2, every 500-step checkpoint kept; then each run's EMA model
# scored (FID@500, DDPM-15, bf16, sampling seed 0) as
#   default runs: unguided at 15 steps (today's make train) and at 30 (the guided rows' 30 network calls per
#                 image); autoguidance guided by the run's own 500-step checkpoint at #37's chosen w
#   dropout runs: unguided at 15 steps; CFG at #37's chosen w and interval (30 calls)
# The guidance settings are #37's held-out choices for DDPM-15 (results/g37/ddpm/selection.json: CFG or CFG with
# the interval, whichever reported the lower FID). ddpm-report pairs every row by training seed (train_seed).
# Needs an otherwise idle machine (the trainings are wall-time budgeted): ~75 min of training, ~30 of scoring.
# Resumable: rerun it; finished trainings and jobs are skipped, an interrupted training resumes (resume=auto).
# Prepared 2026-12-08 (its choice parsing run on #37's selection.json); not run yet.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
export WANDB_MODE=${WANDB_MODE:-offline} PATH="$PWD/.venv/bin:$PATH"
SEL=results/g37/ddpm/selection.json
[ -f $SEL ] || { echo "error: $SEL is missing: run results/g37/run.sh first (#37's held-out choices)"; exit 2; }
read -r AG CFG < <(python - "$SEL" <<'PY'
import json, sys
groups = json.load(open(sys.argv[1]))["groups"]
def chosen(method):
    found = [g for name, g in groups.items() if name.split(" ")[0] == method]
    return found[0] if found else None
def fid(group):
    return next(v["mean"] for k, v in group["reported"].items() if k.startswith("eval/fid@"))
auto = chosen("autoguidance")["chosen"]["overrides"]["guidance.autoguidance_scale"]
cfg = min((g for g in (chosen("cfg"), chosen("cfg+interval")) if g), key=fid)["chosen"]["overrides"]
interval = cfg.get("guidance.interval", "null").replace(" ", "") or "null"
print(auto, f"guidance.cfg_scale={cfg['guidance.cfg_scale']},guidance.interval={interval}")
PY
)
[ -n "$AG" ] && [ -n "$CFG" ] || { echo "error: no autoguidance/CFG choice in $SEL"; exit 2; }
echo "autoguidance w=$AG; CFG: $CFG"
for ARM in default:0 dropout:0.1; do
  for S in 0 1 2; do
    RUN=runs/g38/${ARM%%:*}/s$S
    [ -f $RUN/metrics.json ] || ddpm-train experiment=default seed=$S train.p_uncond=${ARM#*:} resume=auto \
        callbacks.periodic_checkpoint.every_n_train_steps=500 callbacks.periodic_checkpoint.save_top_k=-1 \
        hydra.run.dir=$RUN
  done
done
D=multirun/g38/guidance
COMMON="train_seed=0,1,2 num_samples=500 precision=bf16 method=ddpm sample.seed=0"
ddpm-eval -m $COMMON 'ckpt=runs/g38/default/s${train_seed}/checkpoints/last.ckpt' steps=15,30 \
    hydra.sweep.dir=$D/default_unguided
ddpm-eval -m $COMMON 'ckpt=runs/g38/default/s${train_seed}/checkpoints/last.ckpt' steps=15 \
    'guidance.autoguidance_ckpt=runs/g38/default/s${train_seed}/checkpoints/periodic-step0000500.ckpt' \
    guidance.autoguidance_scale=$AG hydra.sweep.dir=$D/default_autoguidance
ddpm-eval -m $COMMON 'ckpt=runs/g38/dropout/s${train_seed}/checkpoints/last.ckpt' steps=15 \
    hydra.sweep.dir=$D/dropout_unguided
ddpm-eval -m $COMMON 'ckpt=runs/g38/dropout/s${train_seed}/checkpoints/last.ckpt' steps=15 \
    "${CFG%%,guidance.interval=*}" "guidance.interval=${CFG#*guidance.interval=}" hydra.sweep.dir=$D/dropout_cfg
ddpm-report $D --no-plot --out results/g38/guidance
