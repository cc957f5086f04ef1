#!/usr/bin/env bash
# The demo: creates (or reuses) the project venv with torch, builds weaver, and trains the
# `debug` model on synthetic image-caption data, evaluating on a held-out pool at the end.
# Extra arguments go to `weaver train` (e.g. --set train.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
echo "weaver: building (the first build compiles libtorch's bindings: several minutes)" >&2
cargo build --release --quiet
run_dir=runs/demo-$(date +%Y%m%d-%H%M%S)
./target/release/weaver train --config configs/debug.toml --run-dir "$run_dir" "$@"
echo "metrics: $run_dir/metrics.jsonl"
