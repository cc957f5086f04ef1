#!/usr/bin/env bash
# bench/overlap: a data-parallel (dp = 2) training step with and without overlapping the
# gradient buckets' all-reduce with the backward (parallel.overlap), two ranks over the tcp
# backend on this machine. Prints a table, then one RESULT line per mode.
#
#   bench/overlap/run.sh [--config FILE] [--set section.key=value]... [--steps N] [--warmup N]
#
# The overlap is real only when the backend runs collectives in the background
# (Communicator::all_reduce_start); a backend whose *_start calls block shows the same time
# in both modes, the reduction moving from after the backward into it.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
cargo build --release --quiet -p weaver-worker --example overlap_bench
RUST_LOG=${RUST_LOG:-warn} ./target/release/examples/overlap_bench "$@"
