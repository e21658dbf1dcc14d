#!/usr/bin/env bash
# Prepare, on a machine with ../shared and PyPI, what a lent GPU machine needs to run bench/gpu/run.sh.
#
#   bash bench/gpu/prepare.sh        # writes .devshared/ and .whl/ (both git-ignored via .git/info/exclude)
#
# The GPU machine has no network and no ../shared, so it gets (carried with the working tree):
#   .devshared/  the first questions of SQuAD train/dev, and the t5-{small,base,large}-lm-adapt configs +
#                tokenizer (no weights: the bench builds random-weight models from the configs);
#   .whl/        wheels for the versions this project is tested with (transformers, peft) and for the
#                dependencies its image lacks (tyro and what tyro needs), for Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED="${SOFTPROMPT_SHARED:-../shared}"
for line in "/.devshared/" "/.whl/"; do
  grep -qxF "$line" .git/info/exclude || echo "$line" >> .git/info/exclude
done

rm -rf .devshared && mkdir -p .devshared/data/squad .devshared/models
python3 - "$SHARED" <<'PY'
import json, sys
from pathlib import Path

shared, out = Path(sys.argv[1]), Path(".devshared/data/squad")
for name, n in (("train-v1.1.json", 1600), ("dev-v1.1.json", 400)):
    data = json.loads((shared / "data" / "squad" / name).read_text())
    kept, seen = [], 0
    for article in data["data"]:
        paragraphs = []
        for para in article["paragraphs"]:
            qas = para["qas"][: max(0, n - seen)]
            seen += len(qas)
            if qas:
                paragraphs.append({"context": para["context"], "qas": qas})
        if paragraphs:
            kept.append({"title": article["title"], "paragraphs": paragraphs})
        if seen >= n:
            break
    (out / name).write_text(json.dumps({"version": data.get("version", "1.1"), "data": kept}))
    print(f"{name}: first {seen} questions")
PY
for m in t5-small-lm-adapt t5-base-lm-adapt t5-large-lm-adapt; do
  mkdir -p ".devshared/models/$m"
  cp "$SHARED/models/$m"/{config.json,spiece.model,tokenizer.json,tokenizer_config.json} ".devshared/models/$m/"
done

rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl transformers==5.24.0 peft==0.21.2 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 \
  regex==2026.5.9
du -sh .devshared .whl
