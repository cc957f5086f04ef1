#!/usr/bin/env bash
# The test suite, as CI runs it on a clean clone: creates (or reuses) the project venv with
# torch, builds everything, runs every test (unit, crate, end-to-end; the PyTorch parity
# tests use the venv's python).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace --no-fail-fast "$@"
