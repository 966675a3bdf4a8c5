#!/usr/bin/env bash
# Wall clock of an older revision against the working tree, model by model, alternating, in one
# run (same machine state for both): `bash benchmarks/compare_revisions.sh REV [THREADS]`.
# Needs torchvision (the vision models) and transformers; prints one line per model and tree and
# leaves each run's JSON under $OUT (default /tmp/compare-REV).
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: compare_revisions.sh REV [THREADS]}
threads=${2:-1}
py=${PYTHON:-python}
out=${OUT:-/tmp/compare-$rev}
old="$out/tree"
mkdir -p "$out"
[ -d "$old" ] || git worktree add -q --detach "$old" "$rev"
for spec in "vgg16 --batch 1" "vgg16 --batch 8" "resnet50 --batch 1" "resnet50 --batch 8" \
    "vit_b_16 --batch 1" "vit_b_16 --batch 8" "bert --seq 128" "bert --seq 512" \
    "llama150m --seq 128" "llama150m --seq 512"; do
  set -- $spec
  for tree in before after; do
    src=$PWD/src
    [ "$tree" = before ] && src=$old/src
    PYTHONPATH=$src "$py" benchmarks/speed.py --device cpu --threads "$threads" --models $spec \
      --repeats 3 --no-zennit --json "$out/${tree}_$1_$3.json" > "$out/${tree}_$1_$3.log" 2>&1
    echo "$tree $1 $3: $(grep -E "^\| $1 " "$out/${tree}_$1_$3.log" | cut -d'|' -f10,11,16)"
  done
done
