#!/usr/bin/env bash
# The demo: creates (or reuses) the project venv with torch, builds weaver, and runs a real
# multi-process job on this machine: 8 worker processes (2 data-parallel × 2 pipeline ×
# 2 tensor-parallel) under a coordinator, training the `debug` model on synthetic
# image-caption data, checkpointing to the run directory, and evaluating on a held-out pool.
# Extra arguments go to `weaver launch` (e.g. --set train.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
echo "weaver: building (the first build compiles libtorch's bindings: several minutes)" >&2
cargo build --release --quiet
run_dir=runs/demo-$(date +%Y%m%d-%H%M%S)
./target/release/weaver launch --config configs/debug.toml --nproc 8 --run-dir "$run_dir" \
  --set checkpoint.url="$run_dir/checkpoints" "$@"
echo
echo "metrics:     $run_dir/metrics.jsonl"
echo "checkpoints: $run_dir/checkpoints   (./target/release/weaver ckpt ls $run_dir/checkpoints)"
echo "held-out evaluation:"
grep '"eval":true' "$run_dir/metrics.jsonl" | tail -n 1
echo "picture:     $(./target/release/weaver plot "$run_dir" --out "$run_dir/metrics.png" | cut -d' ' -f1)"
