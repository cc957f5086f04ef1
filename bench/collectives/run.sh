#!/usr/bin/env bash
# All-reduce bus bandwidth of weaver's tcp backend vs torch.distributed's gloo, on loopback,
# both measured in this one run: a table, then RESULT lines.
#
#   bench/collectives/run.sh [--worlds 2,4] [--min 1024] [--max 268435456] [--no-gloo]
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../../scripts/env.sh
source scripts/env.sh
cargo build --release -q -p weaver-parallel --example collectives_bench
exec target/release/examples/collectives_bench --python "$WEAVER_PYTHON" \
  --gloo bench/collectives/gloo_allreduce.py "$@"
