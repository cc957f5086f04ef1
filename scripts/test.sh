#!/usr/bin/env bash
# The test suite, as CI runs it on a clean clone: creates (or reuses) the project venv with
# torch, the S3-protocol server the checkpoint tests start on loopback and the SLURM and
# MUNGE daemons the SLURM test starts on loopback, builds
# everything, runs every test (unit, crate, end-to-end; the PyTorch parity tests use the
# venv's python).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
eval "$(scripts/install-s3-server.sh)"
# SLURM and MUNGE for tests/slurm.rs (a real cluster on loopback); root or sudo, apt-get.
scripts/install-slurm.sh
# The control plane must not link libtorch (issue 14): no tch or torch-sys under the
# coordinator, the planner, the launcher, the worker's client crate, the coordinator bench,
# the TensorBoard writer (the coordinator links it), the plot crate or the memory bench
# (it runs the weaver binary).
for p in weaver-config weaver-plan weaver-rpc weaver-coordinator weaver-launch weaver-bench-coordinator weaver-bench-memory weaver-tensorboard weaver-plot; do
  if cargo tree -q -p "$p" -e normal,build,dev | grep -qwE 'tch|torch-sys'; then
    echo "test.sh: $p depends on libtorch (cargo tree -p $p -i tch shows how)" >&2
    exit 1
  fi
done
cargo build --release --workspace --all-targets
cargo test --release --workspace --no-fail-fast "$@"
