#!/usr/bin/env bash
# The test suite, as CI runs it on a clean clone: creates (or reuses) the project venv with
# torch and the S3-protocol server the checkpoint tests start on loopback, builds
# everything, runs every test (unit, crate, end-to-end; the PyTorch parity tests use the
# venv's python).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
eval "$(scripts/install-s3-server.sh)"
cargo build --release --workspace --all-targets
cargo test --release --workspace --no-fail-fast "$@"
