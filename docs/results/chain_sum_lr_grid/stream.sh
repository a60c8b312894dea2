#!/usr/bin/env bash
# One bench stream for issue 13 item 7 (chain_sum, lr grid at seed 0, then seeds 1,2 at the chosen rate).
# usage: stream.sh PART METHOD[:extra overrides...] ...   (in a worktree at the pinned commit)
set -uo pipefail
cd "${ZOO_BENCH_TREE:-/work/stable}"  # a worktree at the pinned commit (703477a)
. "${ZOO_VENV:-/work/main/.venv}/bin/activate"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PART=$1; shift
OUT=${ZOO_BENCH_OUT:-/work/benchruns/item7}/parts/$PART
BASEFLAG=--no-base
[ "$PART" = A ] && BASEFLAG=""
COMMON=(--data-config configs/data/chain_sum.yaml --max_steps 60 --limit 64 --out "$OUT")
for spec in "$@"; do
  method=${spec%%:*}; extra=""; [ "$spec" != "$method" ] && extra=${spec#*:}
  case $method in lora) grid=3e-4,1e-3,3e-3;; *) grid=3e-5,1e-4,3e-4;; esac
  echo "=== $(date -u +%H:%M) $method grid $grid extra [$extra]"
  python -m zoo bench configs/$method.yaml "${COMMON[@]}" $BASEFLAG --seeds 0 --lr-grid $grid --lr-grid-grow 2 -- $extra || { echo "grid failed: $method"; continue; }
  BASEFLAG=--no-base
  lr=$(python - "$OUT/results.jsonl" "$method" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
chosen = [r["lr_chosen"] for r in rows if r.get("method") == sys.argv[2] and r.get("kind") == "train" and "lr_chosen" in r]
print(f"{chosen[-1]:g}")
PY
)
  echo "=== $(date -u +%H:%M) $method seeds 1,2 at lr $lr"
  python -m zoo bench configs/$method.yaml "${COMMON[@]}" --no-base --seeds 1,2 -- --model.init_args.lr "$lr" $extra || echo "seeds failed: $method"
done
echo "=== $(date -u +%H:%M) stream $PART done"
