#!/usr/bin/env bash
# bench/gpu/run.sh: the one prepared check for the GPU machine (one H200, no Rust, no pip,
# no network; python3 with torch 2.11.0+cu130 at /opt/torch/.venv). Checks first, timings
# after, a table last, then one `RESULT {json}` line per part. Every part has a time budget
# and a hard `timeout`, prints PASS, FAIL or SKIP, and the script goes on; the whole run
# stays under --budget seconds (default 450). Exit status: 1 if any part failed.
#
#   here:  bench/gpu/prepare.sh                      # builds bench/gpu/pack/ (binaries, scripts)
#   there: bash bench/gpu/run.sh                     # from the repo root of the copied tree
#   or:    bash bench/gpu/run.sh --cpu-smoke         # any machine: tiny shapes, CPU, tcp
#
# Options:
#   --cpu-smoke     tiny shapes on the CPU with the tcp backend; the parts that need CUDA
#                   print a loud SKIP naming why (what CI runs, through tests/gpu_check.rs)
#   --bin DIR       the binaries (weaver, model_bench, comm_nccl); default: bin/ beside
#                   bench/ (inside a pack), else bench/gpu/pack/bin, else $WEAVER_GPU_BIN
#   --budget S      seconds for the whole run (default 450, 8 minutes with start-up; 900
#                   in smoke mode, where it only guards against hangs)
#   --only a,b      run only these parts (names in the table)
#   --work DIR      where runs, checkpoints and logs go (default: a fresh /tmp folder;
#                   large files in it are deleted at the end, logs kept)
# Environment: WEAVER_PYTHON (default /opt/torch/.venv/bin/python, else python3); OUT (if
# set, as on the device machine: the full log, results.jsonl and the part logs go there).
#
# Parts (see README.md, "GPU check"):
#   nccl_world1      NCCL conformance suite at world size 1 (parallel/tests/comm_nccl.rs)
#   stream_order     an all-gather whose input comes straight from a large matmul, consumed
#                    right after, no host synchronisation in between; result verified
#   one_process      `weaver train` of the small parity job: the reference losses
#   tcp_2proc        `weaver launch --nproc 2` (tp 2) over tcp with CUDA tensors, one GPU
#   tcp_4proc        `weaver launch --nproc 4` (dp 2 x pp 2) likewise; both: the same losses
#                    as one process, evaluation, checkpoints verified, every rank on CUDA
#   nccl_launch      `weaver launch --nproc 1` on nccl with evaluations and checkpoints;
#                    `weaver eval` of the checkpoint gives the job's evaluation
#   anchor_step      the anchor model's step (bench/gpu/anchor.toml, 1.18e9 params): weaver,
#                    PyTorch eager and torch.compile on the same weights and batch
#   train_30         `weaver train` of the anchor model for 30 steps, data included
set -uo pipefail

SMOKE=0
BUDGET=450
BUDGET_SET=0
ONLY=""
BIN="${WEAVER_GPU_BIN:-}"
WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --bin) BIN=$2; shift ;;
    --budget) BUDGET=$2; BUDGET_SET=1; shift ;;
    --only) ONLY=$2; shift ;;
    --work) WORK=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//;/^set -uo/d'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 2
if [ -z "$BIN" ]; then
  for d in "$ROOT/bin" "$ROOT/bench/gpu/pack/bin"; do
    if [ -x "$d/weaver" ]; then BIN=$d; break; fi
  done
fi
if [ -z "$BIN" ] || [ ! -x "$BIN/weaver" ]; then
  echo "run.sh: no weaver binary: run bench/gpu/prepare.sh here first, or pass --bin DIR" >&2
  exit 2
fi
BIN=$(cd "$BIN" && pwd)

PY=${WEAVER_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x /opt/torch/.venv/bin/python ]; then PY=/opt/torch/.venv/bin/python; else PY=python3; fi
fi
export WEAVER_PYTHON=$PY PYTHONUNBUFFERED=1
# The binaries' RUNPATH names the build machine's torch; this machine's comes first.
TL=$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")' 2>/dev/null)
if [ -n "$TL" ]; then export LD_LIBRARY_PATH="$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
NCCL_SO=$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [os.path.dirname(os.path.dirname(__import__("torch").__file__))]
hits = [h for r in roots for h in glob.glob(os.path.join(r, "nvidia", "nccl", "lib", "libnccl.so*"))]
print(sorted(hits)[0] if hits else "")
EOF
)
if [ -n "$NCCL_SO" ] && [ -z "${WEAVER_NCCL_LIB:-}" ]; then export WEAVER_NCCL_LIB=$NCCL_SO; fi

if [ -z "$WORK" ]; then WORK=$(mktemp -d /tmp/weaver-gpu-check.XXXXXX); fi
mkdir -p "$WORK/logs"
WORK=$(cd "$WORK" && pwd)
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
CHECK=("$PY" "$ROOT/bench/gpu/check.py")
export RUST_LOG=${RUST_LOG:-info}
# A failing part shows the end of its log: the error, not a backtrace.
export RUST_BACKTRACE=0
T0=$SECONDS
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  # The device machine sends back what is under $OUT: the whole output goes there too.
  exec > >(tee "$OUT/gpu-check.log") 2>&1
fi

if [ $SMOKE = 1 ]; then
  MODE=smoke DEV=cpu WANT=cpu
  # A small, busy CI machine: one intra-op thread per process, a smaller batch, and budgets
  # three times the GPU run's (they only catch hangs there).
  SCALE=3 PBATCH=8 THREADS=1
  if [ "$BUDGET_SET" = 0 ]; then BUDGET=900; fi
else
  MODE=gpu DEV=cuda WANT=cuda
  SCALE=1 PBATCH=16 THREADS=0
fi

# ---- helpers ------------------------------------------------------------------------

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# record PART STATUS SECONDS DETAIL [FIGURES_JSON_FILE]
record() {
  "$PY" - "$@" >>"$RESULTS" <<'EOF'
import json, sys
part, status, secs, detail = sys.argv[1:5]
fig = None
if len(sys.argv) > 5 and sys.argv[5]:
    try:
        fig = json.load(open(sys.argv[5]))
    except (OSError, ValueError):
        fig = None
print(json.dumps({"part": part, "status": status, "seconds": float(secs), "detail": detail,
                  "figures": fig, "mode": sys.argv[6] if len(sys.argv) > 6 else None}))
EOF
}

skip() { # skip PART WHY
  echo "SKIP $1: $2"
  record "$1" SKIP 0 "$2" "" "$MODE"
}

# A part's timeout: its budget, or what is left of the run's, whichever is smaller.
budget_for() {
  local left=$((BUDGET - (SECONDS - T0)))
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

# run_cmd LOG SECONDS CMD...: runs with a hard timeout (TERM, then KILL 10 s later); the
# status is the command's, 124 on timeout.
run_cmd() {
  local log=$1 secs=$2
  shift 2
  echo "\$ $*" >>"$log"
  timeout -k 10 "$secs" "$@" >>"$log" 2>&1
}

# part NAME BUDGET DESCRIPTION FUNCTION: runs FUNCTION (which sets DETAIL and FIG, returns
# 0 for PASS) under the budget, then records and prints the verdict.
part() {
  local name=$1 want=$(($2 * SCALE)) desc=$3 fn=$4
  wanted "$name" || return 0
  local t
  t=$(budget_for "$want")
  echo
  echo "== $name: $desc (budget ${t}s)"
  if [ "$t" -lt 10 ]; then
    skip "$name" "out of time: the run's ${BUDGET}s budget is spent"
    return 0
  fi
  DETAIL="" FIG="" PART_T=$t PART_LOG="$WORK/logs/$name.log"
  : >"$PART_LOG"
  local start=$SECONDS rc
  "$fn"
  rc=$?
  local took=$((SECONDS - start))
  if [ $rc = 0 ]; then
    echo "PASS $name (${took}s): $DETAIL"
    record "$name" PASS "$took" "$DETAIL" "$FIG" "$MODE"
  elif [ $rc = 99 ]; then
    echo "SKIP $name: $DETAIL"
    record "$name" SKIP "$took" "$DETAIL" "$FIG" "$MODE"
  else
    echo "FAIL $name (${took}s): $DETAIL"
    echo "   last lines of $PART_LOG:"
    tail -n 15 "$PART_LOG" | sed 's/^/   | /'
    record "$name" FAIL "$took" "$DETAIL" "$FIG" "$MODE"
  fi
}

# check ARGS...: runs check.py, appending its one-line verdict to DETAIL; its status.
check() {
  local out rc
  out=$("${CHECK[@]}" "$@" 2>&1)
  rc=$?
  DETAIL="${DETAIL:+$DETAIL; }$out"
  return $rc
}

# failed RC WHAT: adds to DETAIL why a command failed.
failed() {
  if [ "$1" = 124 ] || [ "$1" = 137 ]; then
    DETAIL="${DETAIL:+$DETAIL; }$2 timed out after ${PART_T}s"
  else
    DETAIL="${DETAIL:+$DETAIL; }$2 exited with status $1"
  fi
}

# ---- the parity job ----------------------------------------------------------------------

# A small job, f32 so that layouts agree within rounding: 4 micro-batches a step over
# dp x microbatches; 6 steps, evaluation on 20 pairs, checkpoints every 3 steps.
PJOB=$WORK/parity.toml
cat >"$PJOB" <<EOF
[model]
flavor = "debug"
[train]
steps = 6
global_batch = $PBATCH
warmup_steps = 2
dtype = "f32"
device = "$DEV"
threads = $THREADS
[eval]
pool = 20
[parallel]
microbatches = 4
backend = "tcp"
EOF
STEPS=6
# Relative loss difference allowed between a layout and one process over 6 steps: rounding
# of different reduction orders, amplified by training (measured on CPU: 2.5e-6 by step 30,
# tests/jobs.rs), with room for CUDA's own reduction orders.
PTOL=1e-4

# The anchor job; in smoke mode its shapes shrink to the debug model's, on the CPU, in bf16
# as on the GPU (bf16 weights with f32 masters; PyTorch's side under bf16 autocast), so that
# CI runs the dtype path the GPU run takes.
ANCHOR=(--config "$ROOT/bench/gpu/anchor.toml")
if [ $SMOKE = 1 ]; then
  ANCHOR+=(--set model.image_size=32 --set model.patch_size=8 --set model.vision_width=32
    --set model.vision_layers=1 --set model.vision_heads=2 --set model.text_width=32
    --set model.text_heads=2 --set model.unimodal_layers=1 --set model.multimodal_layers=1
    --set model.vocab_size=64 --set model.max_text_len=16 --set model.embed_dim=32
    --set train.global_batch=4 --set train.device=cpu
    --set train.peak_tflops=0 --set train.threads=1 --set eval.pool=8)
fi

# ---- parts ---------------------------------------------------------------------------

p_env() {
  {
    echo "mode $MODE, binaries $BIN, python $PY, work $WORK"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "WEAVER_NCCL_LIB=${WEAVER_NCCL_LIB:-}"
    "$BIN/weaver" --version
    "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,temperature.gpu --format=csv; fi
    # The anchor parts write ~5 GB (weights for the PyTorch side) and ~19 GB (train_30's
    # final checkpoint and export) under the work folder; torch.compile's Triton builds its
    # launchers with a C compiler.
    df -h "$WORK" 2>&1 | tail -n 1
    free -g 2>&1 | sed -n 2p
    echo "C compiler: $(command -v cc || command -v gcc || echo none)"
  } >>"$PART_LOG" 2>&1
  DETAIL="$(grep -m1 '^python' "$PART_LOG")"
  if [ $SMOKE = 0 ] && [[ "$DETAIL" != *"cuda True"* ]]; then
    DETAIL="$DETAIL; no CUDA device visible to $PY: the CUDA parts will fail (use --cpu-smoke on a CPU machine)"
    return 1
  fi
  "$BIN/weaver" --version >/dev/null 2>&1 || { DETAIL="$DETAIL; $BIN/weaver does not run (libraries?)"; return 1; }
}

p_nccl() {
  run_cmd "$PART_LOG" "$PART_T" "$BIN/comm_nccl" --exact world_1_suite_or_a_clear_unavailable \
    --nocapture --test-threads=1
  local rc=$?
  [ $rc = 0 ] || failed $rc comm_nccl
  check nccl "$PART_LOG" --mode "$MODE" || return 1
  [ $rc = 0 ] || return 1
  if [ $SMOKE = 1 ]; then
    DETAIL="needs a CUDA GPU (none here); $DETAIL"
    return 99
  fi
}

p_stream() {
  if [ $SMOKE = 1 ]; then
    DETAIL="needs a CUDA GPU and NCCL (none here); comm_tcp's stream_order tests run the same check on CPU tensors"
    return 99
  fi
  run_cmd "$PART_LOG" "$PART_T" "$BIN/comm_nccl" --exact all_gather_waits_for_the_matmul_that_made_its_input \
    --nocapture --test-threads=1
  local rc=$?
  [ $rc = 0 ] || failed $rc comm_nccl
  check stream "$PART_LOG" && [ $rc = 0 ]
}

p_one_process() {
  # A rerun with the same --work starts over (a run dir holding checkpoints is refused).
  rm -rf "$WORK/one"
  run_cmd "$PART_LOG" "$PART_T" "$BIN/weaver" train --config "$PJOB" --run-dir "$WORK/one"
  local rc=$?
  [ $rc = 0 ] || { failed $rc "weaver train"; return 1; }
  check devices "$PART_LOG" --want "$WANT" --ranks 1 || return 1
  check job "$WORK/one" --steps $STEPS
}

# layout NAME NPROC SETS...: the parity job on a layout, against one process.
layout() {
  local name=$1 n=$2
  shift 2
  if [ ! -f "$WORK/one/metrics.jsonl" ]; then
    DETAIL="the one-process reference did not run"
    return 1
  fi
  rm -rf "${WORK:?}/$name" "$WORK/$name-ckpt"
  run_cmd "$PART_LOG" "$PART_T" "$BIN/weaver" launch --config "$PJOB" --nproc "$n" \
    --run-dir "$WORK/$name" --set parallel.backend=tcp --set "checkpoint.url=$WORK/$name-ckpt" \
    --set checkpoint.every=3 "$@"
  local rc=$?
  [ $rc = 0 ] || { failed $rc "weaver launch --nproc $n"; return 1; }
  check devices "$PART_LOG" --want "$WANT" --ranks "$n" || return 1
  check job "$WORK/$name" --steps $STEPS --evals $STEPS || return 1
  FIG=$WORK/$name.fig.json
  check parity "$WORK/one" "$WORK/$name" --steps $STEPS --tol $PTOL --json "$FIG" || return 1
  for s in 3 6; do
    run_cmd "$PART_LOG" 60 "$BIN/weaver" ckpt verify "$WORK/$name-ckpt/step-0000000$s" ||
      { DETAIL="$DETAIL; checkpoint step $s does not verify"; return 1; }
  done
  DETAIL="$DETAIL; checkpoints at steps 3 and 6 verify"
}

p_tcp2() { layout tcp2 2 --set parallel.tp=2 --set parallel.microbatches=4; }
p_tcp4() { layout tcp4 4 --set parallel.dp=2 --set parallel.pp=2 --set parallel.microbatches=2; }

p_nccl_launch() {
  local backend=nccl
  if [ $SMOKE = 1 ]; then
    backend=tcp
    echo "SKIP nccl_launch on nccl: needs a CUDA GPU (none here); the same job and checks run on tcp instead"
  fi
  rm -rf "$WORK/nccl1" "$WORK/nccl1-ckpt"
  run_cmd "$PART_LOG" "$PART_T" "$BIN/weaver" launch --config "$PJOB" --nproc 1 \
    --run-dir "$WORK/nccl1" --set "parallel.backend=$backend" --set train.eval_every=3 \
    --set "checkpoint.url=$WORK/nccl1-ckpt" --set checkpoint.every=3
  local rc=$?
  [ $rc = 0 ] || { failed $rc "weaver launch --nproc 1 ($backend)"; return 1; }
  DETAIL="backend $backend"
  check devices "$PART_LOG" --want "$WANT" --ranks 1 || return 1
  check job "$WORK/nccl1" --steps $STEPS --evals 3,6 || return 1
  if [ -f "$WORK/one/metrics.jsonl" ]; then
    FIG=$WORK/nccl1.fig.json
    check parity "$WORK/one" "$WORK/nccl1" --steps $STEPS --tol $PTOL --json "$FIG" || return 1
  fi
  for s in 3 6; do
    run_cmd "$PART_LOG" 60 "$BIN/weaver" ckpt verify "$WORK/nccl1-ckpt/step-0000000$s" ||
      { DETAIL="$DETAIL; checkpoint step $s does not verify"; return 1; }
  done
  "$BIN/weaver" eval --config "$PJOB" --checkpoint "$WORK/nccl1-ckpt" >"$WORK/nccl1-eval.json" 2>>"$PART_LOG" ||
    { DETAIL="$DETAIL; weaver eval of the checkpoint failed"; return 1; }
  check same-eval "$WORK/nccl1" "$WORK/nccl1-eval.json"
}

p_anchor() {
  # model_bench trains at a constant learning rate with no warmup (as torch.optim.AdamW with
  # no scheduler does). At the anchor's 1e-3, the first updates of a 1.18e9-parameter model
  # are large enough for two bf16 mechanisms (bf16 weights with f32 masters, f32 weights
  # under autocast) to drift apart chaotically within 13 steps, and the final losses are
  # compared within 5%: 1e-4 keeps that check about the work, not the trajectory. The step's
  # work and time do not depend on the learning rate.
  # --rounds 0: weaver's steps, then PyTorch's (on CUDA the only choice, both sides would
  # share the GPU's memory otherwise); the smoke mode takes the same path, not the CPU's
  # default of interleaved rounds.
  local args=("${ANCHOR[@]}" --set train.lr=1e-4 --rounds 0 --python "$PY"
    --ref-script "$ROOT/python/weaver_ref.py" --torch-compile)
  local bounds="1.17e9,1.19e9" tol=0.05
  if [ $SMOKE = 1 ]; then
    # Inductor's C++ compile takes minutes on a small CPU; aot_eager traces the same graphs.
    args+=(--steps 2 --warmup 1 --compile-backend aot_eager)
    # bf16's rounding (2^-8) on both sides, through two different mechanisms.
    bounds="" tol=1e-2
  else
    args+=(--steps 10 --warmup 3)
  fi
  # The PyTorch side stops 20 s before the hard timeout, so that what was measured (weaver,
  # eager) is printed even if torch.compile takes too long.
  RUST_LOG=warn run_cmd "$PART_LOG" "$PART_T" "$BIN/model_bench" "${args[@]}" --deadline-s $((PART_T - 20))
  local rc=$?
  grep -v '^RESULT ' "$PART_LOG" | sed -n '/^model bench:/,$p'
  [ $rc = 0 ] || failed $rc model_bench
  FIG=$WORK/anchor.fig.json
  check anchor "$PART_LOG" ${bounds:+--params "$bounds"} --tol $tol --json "$FIG" && [ $rc = 0 ]
}

p_train30() {
  rm -rf "$WORK/train30"
  run_cmd "$PART_LOG" "$PART_T" "$BIN/weaver" train "${ANCHOR[@]}" --set train.steps=30 \
    --run-dir "$WORK/train30"
  local rc=$?
  FIG=$WORK/train30.fig.json
  if [ $rc != 0 ]; then
    failed $rc "weaver train"
    # After its 30 steps the run still writes a final checkpoint (parameters and moments in
    # f32: about 14 GB for the anchor), exports it and evaluates: a run stopped in there has
    # timed every step already, and those figures are kept (the part still fails).
    check train "$WORK/train30" --steps 30 --skip 5 --json "$FIG"
    return 1
  fi
  check devices "$PART_LOG" --want "$WANT" --ranks 1 || return 1
  check train "$WORK/train30" --steps 30 --skip 5 --json "$FIG"
}

echo "weaver GPU check: mode $MODE, budget ${BUDGET}s, work $WORK"
# Checks first ...
part env 30 "the machine, the binaries, python and torch" p_env
part nccl_world1 60 "NCCL conformance at world size 1" p_nccl
part stream_order 45 "all-gather straight from a large matmul, no host sync" p_stream
part one_process 45 "the parity job in one process (reference losses)" p_one_process
part tcp_2proc 60 "2 processes, tp 2, tcp backend, $DEV tensors" p_tcp2
part tcp_4proc 75 "4 processes, dp 2 x pp 2, tcp backend, $DEV tensors" p_tcp4
part nccl_launch 60 "weaver launch --nproc 1 on nccl: evaluation and checkpoints" p_nccl_launch
# ... timings after.
part anchor_step 240 "the anchor model's step: weaver, PyTorch eager, torch.compile" p_anchor
part train_30 120 "weaver train, anchor model, 30 steps, data included" p_train30

# Large files go (4.7 GB of anchor weights); logs and metrics stay.
find "$WORK" \( -name '*.safetensors' -o -name '*-ckpt' -o -name 'checkpoints' \) -prune -exec rm -rf {} + 2>/dev/null
echo
echo "logs: $WORK/logs (total $((SECONDS - T0))s)"
"${CHECK[@]}" report "$RESULTS"
status=$?
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$RESULTS" "$OUT/" 2>/dev/null
  tar -czf "$OUT/gpu-check-logs.tar.gz" -C "$WORK" logs 2>/dev/null
fi
exit $status
