#!/usr/bin/env bash
# The comm conformance suite on NCCL at world size 1, for the GPU machine (device `run`),
# which has no Rust toolchain. Here: `cargo test --release -p weaver-parallel --test
# comm_nccl --no-run` prints the test binary's path; carry it, then on the machine run
#   bash bench/collectives/nccl_world1.sh target/release/deps/comm_nccl-<hash>
# Without a GPU the same binary passes by reporting a clear `Unavailable`.
set -euo pipefail
bin=$1
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")')
NL=$(python3 -c 'import nvidia.nccl,os;print(list(nvidia.nccl.__path__)[0]+"/lib")')
export LD_LIBRARY_PATH="$TL:$NL:${LD_LIBRARY_PATH:-}"
export WEAVER_NCCL_LIB="$NL/libnccl.so.2"
"$bin" --nocapture --test-threads=1
