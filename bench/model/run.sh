#!/usr/bin/env bash
# bench/model: one training step of weaver against PyTorch (python/weaver_ref.py) on the same
# model, weights and batch, in one run: step time, samples/s, tokens/s, TFLOP/s, MFU, peak
# CUDA memory, and ATen ops / CUDA kernels per step (counted by the profiler).
#
#   bench/model/run.sh [--config FILE] [--set section.key=value]... [--steps N] [--warmup N]
#                      [--torch-compile] [--compile-backend B] [--python PATH] [--no-count]
#
# On a GPU: --set train.device=cuda --set train.peak_tflops=989 (H100/H200 bf16 dense); the
# anchor model of the GPU check: --config bench/gpu/anchor.toml --torch-compile.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
cargo build --release --quiet -p weaver-worker --example model_bench
RUST_LOG=${RUST_LOG:-warn} ./target/release/examples/model_bench "$@"
