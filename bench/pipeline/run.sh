#!/usr/bin/env bash
# bench/pipeline: measured pipeline bubble of GPipe, 1F1B and interleaved 1F1B against
# theory. Prints a table, then one RESULT line per case.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
cargo build --release --quiet -p weaver-worker --example pipeline_bench
RUST_LOG=${RUST_LOG:-warn} ./target/release/examples/pipeline_bench
