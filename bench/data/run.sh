#!/usr/bin/env bash
# Data loading: weaver's shard loader against webdataset + torchvision + a torch DataLoader,
# on the same shards (2,000 512×384 JPEGs with captions, made here once), the same
# transforms (random-resized crop to 224 px, bicubic, CLIP normalisation; captions to 32
# ids with the same word-level vocabulary), batches of 256, the same number of CPU workers,
# in one run. Prints a table, then one RESULT line per loader.
#
#   bench/data/run.sh [WORKERS] [SAMPLES]      # defaults: 2 workers (this machine's cores), 4000
#
# samples/s is measured after the first batch (steady state); cpu_s is the CPU time of the
# whole process (PyTorch: and its worker processes, read from /proc while they run) over
# that same span, so samples per CPU-second is the per-core figure. Both sides decode every
# JPEG at full size (no DCT-domain downscaling on either side) and resample with PIL's
# antialiased bicubic (weaver: the same algorithm through fast_image_resize, checked below).
#
# Then, on one thread each: seconds per sample of each step (where the time goes), and how
# far weaver's 224 px crops are from torchvision's on the same samples and crop boxes. The
# anchor: the CoCa-shaped 1.18 B model consumes about 420 samples/s on one H200 under
# torch.compile (issue 10); the last column is the CPU cores each loader needs to feed it.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
WORKERS=${1:-2}
SAMPLES=${2:-4000}
BATCH=256
DIR=${WEAVER_BENCH_DATA:-target/bench-data/jpeg-512x384-2000}
cargo build --release -q -p weaver-data --example data_bench
BIN=target/release/examples/data_bench
if [ ! -f "$DIR/tokenizer.json" ]; then
  "$BIN" make "$DIR" 2000
fi
W=$("$BIN" run "$DIR" "$WORKERS" "$BATCH" "$SAMPLES")
P=$(python bench/data/torch_bench.py "$DIR" "$WORKERS" "$BATCH" "$SAMPLES")
WS=$("$BIN" stages "$DIR" 500)
PS=$(python bench/data/torch_bench.py --stages "$DIR" 500)
PIX=$(mktemp -d)
"$BIN" pixels "$DIR" 100 "$PIX/crops"
C=$(python bench/data/check_pixels.py "$DIR" "$PIX/crops")
rm -rf "$PIX"
python - "$W" "$P" "$WS" "$PS" "$C" <<'PY'
import json, sys
rows = [json.loads(a) for a in sys.argv[1:3]]
stages = [json.loads(a) for a in sys.argv[3:5]]
check = json.loads(sys.argv[5])
ANCHOR = 420.0
print(f"{'loader':<10}{'workers':>8}{'samples/s':>12}{'per worker':>12}{'CPU s':>8}{'samples/CPU-s':>15}{'cores for 420/s':>17}")
for r in rows:
    per_cpu = r["samples"] / r["cpu_s"]
    r.update(per_worker=r["samples_per_s"] / r["workers"], samples_per_cpu_s=per_cpu,
             cores_for_anchor=ANCHOR / per_cpu)
    print(f"{r['loader']:<10}{r['workers']:>8}{r['samples_per_s']:>12.1f}{r['per_worker']:>12.1f}"
          f"{r['cpu_s']:>8.1f}{per_cpu:>15.1f}{r['cores_for_anchor']:>17.2f}")
w, p = rows
print(f"weaver / pytorch: {w['samples_per_s'] / p['samples_per_s']:.2f}x samples/s, "
      f"{w['samples_per_cpu_s'] / p['samples_per_cpu_s']:.2f}x samples per CPU-second (goal >= 2x per core)")
print("\none thread, CPU ms per sample:")
names = ["read", "decode", "crop_resize", "to_tensor", "normalize", "tokenize", "collate"]
print(f"{'loader':<10}" + "".join(f"{n:>12}" for n in names) + f"{'total':>10}")
for s in stages:
    print(f"{s['loader']:<10}" + "".join(f"{s[n] * 1e3:>12.3f}" if n in s else f"{'-':>12}" for n in names)
          + f"{sum(s[n] for n in names if n in s) * 1e3:>10.3f}")
print("(weaver normalises straight into the batch tensor: its collation is in `normalize`)")
print(f"\nweaver's 224 px crops vs torchvision's (PIL) on {check['samples']} samples, same boxes: "
      f"mean |diff| {check['crop_mean_abs']:.3f} levels, 99th percentile {check['crop_p99_abs']:.0f}, "
      f"max {check['crop_max_abs']}, {100 * check['crop_within_2']:.4f}% within 2 levels")
for r in rows:
    r.pop("checksum", None)
    print("RESULT " + json.dumps({"bench": "data", **r}))
for s in stages:
    print("RESULT " + json.dumps({"bench": "data_stages", **s}))
print("RESULT " + json.dumps({"bench": "data_pixels", **check}))
PY
