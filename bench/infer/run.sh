#!/usr/bin/env bash
# Inference: weaver's embeddings and captions against PyTorch eager (python/weaver_ref.py's
# model) on the same weights, batch, dtype (f32, CPU) and threads, interleaved in rounds, wall
# and CPU time of each process; the key/value cache against rerunning the text layers at every
# step (both sides); int8 against f32. Prints a table, then one RESULT line per implementation
# (see worker/examples/infer_bench.rs for what is timed).
#
#   bench/infer/run.sh [FLAVOR] [BATCH] [NEW_TOKENS] [REPS] [THREADS] [ROUNDS]   # small 32 32 5 2 3
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
cargo build --release -q -p weaver-worker --example infer_bench
exec target/release/examples/infer_bench "${1:-small}" "${2:-32}" "${3:-32}" "${4:-5}" "${5:-2}" "${6:-3}"
