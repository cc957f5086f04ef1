#!/usr/bin/env bash
# bench/distill: does distillation help, by more than the seed noise? On the synthetic
# task, trains a `small` teacher (at the student's 32 px images) to the end of its schedule,
# then the same `debug` student for the same steps, on each of several seeds, alone and
# distilled from the teacher in several ways (the arms below), and reports every run's
# held-out recall, each arm's mean ± standard deviation over the seeds and its paired
# difference against the student alone (same seed: the same initialisation and the same
# batches in both runs). A table, then one RESULT {json} line per run and per arm.
#
#   bench/distill/run.sh [--teacher-steps N] [--student-steps N] [--teacher URL]
#                        [--seeds N] [--pool N] [--arms a,b,...] [--set section.key=value]...
#
# Arms: alone (no teacher); defaults ([distill] at its defaults: feature 8, ICL 1, no KL);
# kl (the previous defaults: similarity KL 0.25, caption KL 0.25, feature 1); feature
# (feature matching 4 only); icl (interactive contrastive learning 1 only).
# --teacher reuses a trained teacher checkpoint (skips its training). --seeds N runs
# train.seed 0..N-1 (default 4); --pool sets eval.pool (default 500 held-out pairs). The
# --set overrides apply to the students only. Each run is one process (`weaver train`), its
# final evaluation on the held-out pool; the teacher's by `weaver eval`.
# There is no PyTorch anchor: this measures an effect (recall), not a speed.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
teacher_steps=400
student_steps=100
teacher=""
seeds=4
pool=500
arms=alone,defaults,kl,feature,icl
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --teacher-steps) teacher_steps=$2; shift 2 ;;
    --student-steps) student_steps=$2; shift 2 ;;
    --teacher) teacher=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --pool) pool=$2; shift 2 ;;
    --arms) arms=$2; shift 2 ;;
    --set) extra+=(--set "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case ",$arms," in *,alone,*) ;; *) echo "--arms must include alone (the paired baseline)" >&2; exit 2 ;; esac
cargo build --release --quiet --bin weaver
w=./target/release/weaver
out=$(mktemp -d /tmp/bench-distill.XXXXXX)
trap 'rm -rf "$out"' EXIT
common=(--config configs/debug.toml --set parallel.tp=1 --set parallel.pp=1 --set parallel.dp=1
  --set parallel.microbatches=4 --set train.eval_every=0 --set checkpoint.every=0
  --set checkpoint.keep=1 --set eval.pool="$pool")
export RUST_LOG=${RUST_LOG:-warn}
tflags=(--set model.flavor=small --set model.image_size=32)
if [ -z "$teacher" ]; then
  echo "training the teacher ($teacher_steps steps)" >&2
  "$w" train "${common[@]}" "${tflags[@]}" --set train.steps="$teacher_steps" \
    --run-dir "$out/teacher" >/dev/null
  teacher="$out/teacher/checkpoints"
else
  teacher_steps=-1  # not trained here
fi
"$w" eval "${common[@]}" "${tflags[@]}" --checkpoint "$teacher" | tail -1 >"$out/teacher-eval.jsonl"
d=(--set distill.teacher="$teacher")
no_kl=(--set distill.itc_kl_weight=0 --set distill.caption_kl_weight=0)
seed_list=$(seq -s, 0 $((seeds - 1)))
for seed in $(seq 0 $((seeds - 1))); do
  for arm in ${arms//,/ }; do
    case "$arm" in
      alone) a=() ;;
      defaults) a=("${d[@]}") ;;
      kl) a=("${d[@]}" --set distill.itc_kl_weight=0.25 --set distill.caption_kl_weight=0.25
             --set distill.feature_weight=1 --set distill.icl_weight=0) ;;
      feature) a=("${d[@]}" "${no_kl[@]}" --set distill.feature_weight=4 --set distill.icl_weight=0) ;;
      icl) a=("${d[@]}" "${no_kl[@]}" --set distill.feature_weight=0 --set distill.icl_weight=1) ;;
      *) echo "unknown arm $arm" >&2; exit 2 ;;
    esac
    echo "seed $seed: $arm" >&2
    "$w" train "${common[@]}" --set train.steps="$student_steps" --set train.seed="$seed" \
      "${a[@]}" "${extra[@]}" --run-dir "$out/${arm}_s$seed" >/dev/null
    rm -rf "$out/${arm}_s$seed/checkpoints"
  done
done
python3 bench/distill/summarize.py "$out" --arms "$arms" --seeds "$seed_list" \
  --teacher-eval "$out/teacher-eval.jsonl" --steps "$student_steps" --teacher-steps "$teacher_steps"
