#!/usr/bin/env bash
# bench/distill: does distillation help? On the synthetic task, trains a `small` teacher
# (at the student's 32 px images) to the end of its schedule, then the same `debug` student
# for the same steps alone and distilled from the teacher three ways — `[distill]` at its
# defaults (itc_kl 0.25, caption_kl 0.25, feature 1, T = 2, the teacher's scale), the old
# KL-only defaults (itc_kl 1, caption_kl 1, each model's own scale, no feature matching),
# feature matching alone — and reports the held-out recall of every run (the final
# evaluation of each, `weaver train`, one process; the teacher's by `weaver eval`). A
# table, then one RESULT {json} line per run.
#
#   bench/distill/run.sh [--teacher-steps N] [--student-steps N] [--teacher URL]
#                        [--set section.key=value]...
#
# --teacher reuses a trained teacher checkpoint (skips its training). The --set overrides
# apply to the students only.
# There is no PyTorch anchor: this measures an effect (recall), not a speed.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
teacher_steps=400
student_steps=100
teacher=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --teacher-steps) teacher_steps=$2; shift 2 ;;
    --student-steps) student_steps=$2; shift 2 ;;
    --teacher) teacher=$2; shift 2 ;;
    --set) extra+=(--set "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet --bin weaver
w=./target/release/weaver
out=$(mktemp -d /tmp/bench-distill.XXXXXX)
trap 'rm -rf "$out"' EXIT
common=(--config configs/debug.toml --set parallel.tp=1 --set parallel.pp=1 --set parallel.dp=1 --set parallel.microbatches=4 --set train.eval_every=0 --set checkpoint.every=0 --set checkpoint.keep=1)
export RUST_LOG=${RUST_LOG:-warn}
tflags=(--set model.flavor=small --set model.image_size=32)
if [ -z "$teacher" ]; then
  "$w" train "${common[@]}" "${tflags[@]}" --set train.steps="$teacher_steps" \
    --run-dir "$out/teacher" >/dev/null
  teacher="$out/teacher/checkpoints"
else
  teacher_steps=-1  # not trained here
fi
mkdir -p "$out/teacher-eval"
"$w" eval "${common[@]}" "${tflags[@]}" --checkpoint "$teacher" | tail -1 \
  >"$out/teacher-eval/metrics.jsonl"
student() {
  "$w" train "${common[@]}" --set train.steps="$student_steps" "$@" "${extra[@]}" \
    --run-dir "$out/$run" >/dev/null
}
run=alone student
d=(--set distill.teacher="$teacher")
run=defaults student "${d[@]}"
run=old_kl student "${d[@]}" --set distill.itc_kl_weight=1 --set distill.caption_kl_weight=1 \
  --set distill.feature_weight=0 --set distill.itc_scale=own
run=feature student "${d[@]}" --set distill.itc_kl_weight=0 --set distill.caption_kl_weight=0 \
  --set distill.feature_weight=1
python3 - "$out" "$teacher_steps" "$student_steps" <<'PY'
import json, sys
out, ts, ss = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def last_eval(run):
    ev = [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl") if '"eval"' in l]
    return ev[-1]
rows = [("teacher (small, 32 px)", "teacher-eval", ts), ("student alone (debug)", "alone", ss),
        ("distilled: defaults", "defaults", ss), ("distilled: old KL defaults", "old_kl", ss),
        ("distilled: features only", "feature", ss)]
print(f"{'run':28} {'steps':>6} {'i2t_r1':>7} {'t2i_r1':>7} {'i2t_r5':>7} {'t2i_r5':>7} {'caption_exact':>13} {'pool':>5}")
res = []
for label, run, steps in rows:
    e = last_eval(run)
    print(f"{label:28} {steps if steps >= 0 else '-':>6} {e['i2t_r1']:7.3f} {e['t2i_r1']:7.3f} {e['i2t_r5']:7.3f} {e['t2i_r5']:7.3f} {e['caption_exact']:13.3f} {e['pool']:5d}")
    res.append({"bench": "distill", "run": run, "steps": steps, **{k: e[k] for k in
        ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10", "caption_exact", "pool")}})
for r in res:
    print("RESULT " + json.dumps(r))
PY
