#!/usr/bin/env bash
# Copy the finished records (results.jsonl, items/) of the running streams into the repo, no run folders.
set -euo pipefail
for p in A B; do
  src=${ZOO_BENCH_OUT:-/work/benchruns/item7}/parts/$p; dst=$(dirname "$0")/parts/$p
  [ -f $src/results.jsonl ] || continue
  mkdir -p $dst
  cp $src/results.jsonl $dst/
  rm -rf $dst/items; if [ -d $src/items ]; then cp -r $src/items $dst/items; fi
done
