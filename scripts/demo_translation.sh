#!/usr/bin/env bash
# Two-stage translation on the demo pair, as recorded in BENCHMARKS.md: train the demo CycleGAN translator,
# write the CycleGAN- and the FDA-translated (beta 0.01) demo source at the demo's training size, then 3 seeds of
# demo_source_only on each copy (scripts/demo_methods.py appends them to outputs/demo_methods.json).
#   bash scripts/demo_translation.sh [paths.data_dir (default: data)] [extra overrides for the translator]
# Runs one job at a time. rtda-translate is called as `python -m rtda.cli.translate` (also before it is installed).
set -euo pipefail
DATA=$(realpath -m "${1:-data}")
shift || true
OUT=outputs/demo_translation
mkdir -p "$OUT"

start=$(date +%s)
rtda-train experiment=demo_cyclegan paths.data_dir="$DATA" hydra.run.dir="$OUT/translator" "$@" | tee "$OUT/translator.log"
echo "translator wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/translator.log"
CKPT="$OUT/translator/checkpoints/last.ckpt"

start=$(date +%s)
python -m rtda.cli.translate method=cyclegan ckpt_path="$CKPT" size=[144,256] out="$DATA/demo_gta5_cyclegan" paths.data_dir="$DATA"
echo "cyclegan translation wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/translator.log"
start=$(date +%s)
python -m rtda.cli.translate method=fda beta=0.01 seed=0 size=[144,256] out="$DATA/demo_gta5_fda" paths.data_dir="$DATA"
echo "fda translation wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/translator.log"

python scripts/demo_methods.py \
  "demo_source_only:paths.data_dir=$DATA,data.source.root=$DATA/demo_gta5_cyclegan" \
  "demo_source_only:paths.data_dir=$DATA,data.source.root=$DATA/demo_gta5_fda"
