#!/usr/bin/env bash
# bench/memory: the peak memory of every rank of the `small` flavor on CPU, for a set of
# layouts × the memory features of [parallel] (recompute, shard_optimizer,
# sequence_parallel), each run by `weaver launch` (one process per rank, each reporting the
# counted bytes of its live tensors as `peak_mem_bytes_ranks` in metrics.jsonl), next to
# weaver-plan's model of the same config and rank. A table, then one `RESULT {json}` line
# per row. Rows whose feature the trainer does not run yet are listed as not available.
#
#   bench/memory/run.sh [--steps N] [--only NAME] [--weaver PATH]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
cargo build --release --quiet -p weaver -p weaver-bench-memory
exec target/release/weaver-bench-memory --weaver target/release/weaver "$@"
