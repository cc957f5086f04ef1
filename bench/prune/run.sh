#!/usr/bin/env bash
# bench/prune: sparsity against held-out recall. Trains a `debug` model on the synthetic task,
# then for each method and sparsity: `weaver ckpt prune`, the pruned model's recall as it is
# (`weaver eval`), and after a short fine-tune from it (`model.init_from`; magnitude pruning
# with `train.prune_mask = true`, so the zeros stay; MLP and head pruning as the smaller
# model, its shape given by --set as the pruned checkpoint's config has it).
# A table, then one RESULT {json} line per row. No PyTorch anchor: this measures accuracy.
#
#   bench/prune/run.sh [--steps N] [--finetune-steps N] [--specs "heads:0.25 heads:0.5"]
#
# --specs: the method:sparsity rows to run (default every one); the dense row always runs
# (training is deterministic, so its figures match a full run's).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
steps=300
ft=50
specs="magnitude:0.25 magnitude:0.5 magnitude:0.75 mlp:0.25 mlp:0.5 mlp:0.75 heads:0.25 heads:0.5"
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --finetune-steps) ft=$2; shift 2 ;;
    --specs) specs=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet --bin weaver
w=./target/release/weaver
out=$(mktemp -d /tmp/bench-prune.XXXXXX)
trap 'rm -rf "$out"' EXIT
export RUST_LOG=${RUST_LOG:-warn}
common=(--config configs/debug.toml --set parallel.tp=1 --set parallel.pp=1 --set parallel.dp=1
  --set parallel.microbatches=4 --set train.eval_every=0 --set checkpoint.every=0 --set checkpoint.keep=1)
"$w" train "${common[@]}" --set train.steps="$steps" --run-dir "$out/dense" >/dev/null
dense="$out/dense/checkpoints"
results="$out/results.jsonl"
ev() { "$w" eval "${common[@]}" --checkpoint "$1" | tail -1; }
echo "{\"method\": \"none\", \"sparsity\": 0, \"pruned\": $(ev "$dense"), \"finetuned\": null, \"params\": null}" >>"$results"
for spec in $specs; do
  m=${spec%%:*}; s=${spec##*:}
  p=$("$w" ckpt prune "$dense" --out "$out/$m-$s" --method "$m" --sparsity "$s" | tail -1)
  url=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["url"])' "$p")
  pruned=$(ev "$url")
  if [ "$m" = magnitude ]; then
    more=(--set train.prune_mask=true)
  elif [ "$m" = mlp ]; then
    ratio=$(python3 -c "print(round(4 * (1 - $s)))")
    more=(--set model.mlp_ratio="$ratio")
  else
    # The debug model's 4 heads of 16 per attention: fewer heads of the same width.
    heads=$(python3 -c "print(round(4 * (1 - $s)))")
    more=(--set model.vision_heads="$heads" --set model.vision_head_dim=16
      --set model.text_heads="$heads" --set model.text_head_dim=16)
  fi
  "$w" train "${common[@]}" --set train.steps="$ft" --set train.warmup_steps=5 --set train.lr=3e-4 \
    --set model.init_from="$url" "${more[@]}" --run-dir "$out/ft-$m-$s" >/dev/null
  tuned=$(grep '"eval"' "$out/ft-$m-$s/metrics.jsonl" | tail -1)
  echo "{\"method\": \"$m\", \"sparsity\": $s, \"pruned\": $pruned, \"finetuned\": $tuned, \"params\": $p}" >>"$results"
done
python3 - "$results" "$steps" "$ft" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps, ft = int(sys.argv[2]), int(sys.argv[3])
# The dense row's parameter count: what the first pruning started from.
rows[0]["params"] = {"params_after": rows[1]["params"]["params_before"], "zeros": 0}
print(f"debug model trained {steps} steps; fine-tune {ft} steps; recall@1 over the held-out pool")
print(f"{'method':10} {'sparsity':>8} {'params':>8} {'zeros':>8} {'i2t_r1':>7} {'t2i_r1':>7} {'ft i2t_r1':>9} {'ft t2i_r1':>9}")
for r in rows:
    p, f, q = r["pruned"], r["finetuned"], r["params"] or {}
    ft_i = f"{f['i2t_r1']:9.3f}" if f else f"{'-':>9}"
    ft_t = f"{f['t2i_r1']:9.3f}" if f else f"{'-':>9}"
    print(f"{r['method']:10} {r['sparsity']:8.2f} {q.get('params_after', 0):8d} {q.get('zeros', 0):8d} "
          f"{p['i2t_r1']:7.3f} {p['t2i_r1']:7.3f} {ft_i} {ft_t}")
for r in rows:
    p, f, q = r["pruned"], r["finetuned"], r["params"] or {}
    print("RESULT " + json.dumps({"bench": "prune", "method": r["method"], "sparsity": r["sparsity"],
        "params": q.get("params_after"), "zeros": q.get("zeros"), "pool": p["pool"],
        "i2t_r1": p["i2t_r1"], "t2i_r1": p["t2i_r1"],
        "ft_steps": ft if f else 0,
        "ft_i2t_r1": f["i2t_r1"] if f else None, "ft_t2i_r1": f["t2i_r1"] if f else None}))
PY
