#!/usr/bin/env bash
# bench/checkpoint: weaver-checkpoint next to PyTorch DCP (torch.distributed.checkpoint) in
# one invocation, on local disk, runs interleaved (weaver, DCP, weaver, DCP, ...) so that a
# shared, noisy machine treats both alike; then a side-by-side table of medians with the
# goals, then RESULT lines.
#
#   bench/checkpoint/run.sh [--runs 3] [--dir DIR] [--mib 1024] [--tensors 32]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
RUNS=3
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Build once; run the binary itself (no rebuild between runs).
BIN=$(cargo bench --quiet -p weaver-checkpoint --bench checkpoint --no-run --message-format=json \
  | "$WEAVER_PYTHON" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "checkpoint" and m.get("executable"):
        print(m["executable"])')
[ -x "$BIN" ] || { echo "bench/checkpoint: could not build the weaver bench" >&2; exit 1; }
for i in $(seq 1 "$RUNS"); do
  echo "run $i/$RUNS: weaver" >&2
  "$BIN" "${ARGS[@]}" --repeats 1 > "$TMP/weaver-$i.txt"
  echo "run $i/$RUNS: dcp" >&2
  "$WEAVER_PYTHON" bench/checkpoint/dcp_bench.py "${ARGS[@]}" --repeats 1 > "$TMP/dcp-$i.txt"
done
"$WEAVER_PYTHON" bench/checkpoint/dcp_bench.py --summarize "$TMP"/*.txt
