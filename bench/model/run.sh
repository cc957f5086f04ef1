#!/usr/bin/env bash
# bench/model: one training step of weaver against PyTorch eager (python/weaver_ref.py) on
# the same model, weights and batch, in one run: step time, tokens/s, TFLOP/s and MFU.
#
#   bench/model/run.sh [--config FILE] [--set section.key=value]... [--steps N] [--warmup N]
#
# On a GPU: --set train.device=cuda --set train.peak_tflops=989 (H100/H200 bf16 dense).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
cargo build --release --quiet -p weaver-worker --example model_bench
RUST_LOG=${RUST_LOG:-warn} ./target/release/examples/model_bench "$@"
