#!/usr/bin/env bash
# The coordinator benchmark: simulated workers (in-process gRPC clients over a few shared
# HTTP/2 channels) register, rendezvous and heartbeat at 1 Hz against a coordinator running
# as a separate process. Prints a table, then one `RESULT {json}` line per worker count.
#
#   bench/coordinator/run.sh                                # 1k, 4k and 16k workers, 10 s of beats
#   bench/coordinator/run.sh --workers 1000 --seconds 5 --channels 8
set -euo pipefail
cd "$(dirname "$0")/../.."
# No venv: the coordinator and this bench do not link libtorch (weaver-config, weaver-rpc).
cargo build --release -q -p weaver-bench-coordinator
# Many simulated workers keep many streams open: make sure the descriptor limit is not the
# bottleneck (each channel is one socket, but be generous).
ulimit -n 65536 2>/dev/null || true
exec target/release/weaver-bench-coordinator "$@"
