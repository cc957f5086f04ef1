#!/usr/bin/env bash
# bench/gpu/prepare.sh: builds here, in release, what bench/gpu/run.sh needs on the GPU
# machine (which has no Rust toolchain), strips it, and copies it with the scripts, configs
# and python files into one ignored folder, bench/gpu/pack/ (at most 64 MiB: checked). The
# pack holds no libtorch: the GPU machine has its own (torch 2.11.0+cu130), which run.sh
# puts first on LD_LIBRARY_PATH (the binaries' RUNPATH names this machine's venv).
#
#   bench/gpu/prepare.sh            # then, on the GPU machine, from the copied tree's root:
#                                   #   bash bench/gpu/run.sh
#
# The pack is laid out like the repository (bin/, bench/gpu/, python/, configs/), so
# `bash bench/gpu/pack/bench/gpu/run.sh` also works from anywhere it is copied to.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh

LIMIT=$((64 << 20))
PACK=bench/gpu/pack

echo "prepare: building weaver, model_bench and the comm_nccl test binary (release)" >&2
# --workspace keeps the feature set the same as scripts/test.sh's build, so nothing that is
# already built is built again.
cargo build --release --workspace --bins --examples
comm_nccl=$(cargo test --release --workspace --test comm_nccl --no-run --message-format=json |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "comm_nccl" and m.get("executable"):
        print(m["executable"])
')
if [ -z "$comm_nccl" ] || [ ! -x "$comm_nccl" ]; then
  echo "prepare: cargo did not report the comm_nccl test binary" >&2
  exit 1
fi

rm -rf "$PACK"
mkdir -p "$PACK/bin" "$PACK/bench/gpu" "$PACK/python" "$PACK/configs"
strip -o "$PACK/bin/weaver" target/release/weaver
strip -o "$PACK/bin/model_bench" target/release/examples/model_bench
strip -o "$PACK/bin/comm_nccl" "$comm_nccl"
cp bench/gpu/run.sh bench/gpu/check.py bench/gpu/anchor.toml "$PACK/bench/gpu/"
cp python/weaver_ref.py "$PACK/python/"
cp configs/*.toml "$PACK/configs/"
git rev-parse HEAD >"$PACK/COMMIT" 2>/dev/null || true
git status --porcelain >>"$PACK/COMMIT" 2>/dev/null || true

size=$(du -sb "$PACK" | cut -f1)
du -ab "$PACK" | sort -n | tail -n 8 | awk '{printf "  %8.1f MiB  %s\n", $1 / 1048576, $2}'
awk -v s="$size" -v p="$PACK" 'BEGIN { printf "prepare: %s is %.1f MiB (limit 64 MiB)\n", p, s / 1048576 }'
if [ "$size" -gt "$LIMIT" ]; then
  echo "prepare: the pack is larger than 64 MiB: the device machine will not take it" >&2
  exit 1
fi
echo "prepare: on the GPU machine, from the copied tree's root: bash bench/gpu/run.sh"
echo "prepare: here, to try the pack on the CPU: bash bench/gpu/run.sh --cpu-smoke"
