#!/usr/bin/env bash
# Evaluate one model (+ optional prompt) on every MRQA out-of-domain dev file in a folder, the paper's
# Table 1 setting (see configs/domain_shift/mrqa.yaml), and print one JSON line per data set.
#   scripts/eval_domain_shift.sh --model google/t5-base-lm-adapt --prompt runs/pt_base/best --mrqa_dir data/mrqa
set -euo pipefail
model="" prompt=() dir="" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --prompt) prompt+=(--prompt "$2"); shift 2 ;;
    --mrqa_dir) dir="$2"; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
[[ -n "$model" && -n "$dir" ]] || { echo "usage: $0 --model M [--prompt DIR] --mrqa_dir DIR [eval flags]" >&2; exit 2; }
shopt -s nullglob
for f in "$dir"/*.jsonl "$dir"/*.jsonl.gz; do
  name=$(basename "$f"); name=${name%%.*}
  scores=$(softprompt eval --model "$model" "${prompt[@]}" --validation_file "$f" "${extra[@]}")
  python3 -c 'import json,sys; s=json.loads(sys.argv[2]); print(json.dumps({"dataset": sys.argv[1], "exact_match": s.get("exact_match"), "f1": s.get("f1"), "n": s.get("n_examples")}))' "$name" "$scores"
done
