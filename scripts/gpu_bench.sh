#!/usr/bin/env bash
# GPU figures for BENCHMARKS.md: rtda-bench for BiSeNet-R18 and DeepLabV2-R101 at 512x1024 and 1024x2048,
# fp32 / fp16 / bf16, rows plain / eager / channels_last (+ torch.compile at bf16); then training: seconds per
# iteration of every method against the plain PyTorch loop at 512x1024, fp32 and bf16 (RTDA_BENCH_TRAIN=0: skip);
# then one table of each kind.
# Needs a CUDA GPU. On a machine without Hydra: run scripts/gpu_wheels.sh where PyPI is reachable first,
# carry .whl/ along, and this script installs them into /tmp/site (albumentations is not needed here).
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
out="${OUT:-outputs}/gpu_bench"
device="${RTDA_BENCH_DEVICE:-cuda}"                          # cpu: a dry run of this script anywhere
sizes="${RTDA_BENCH_SIZES:-512x1024 1024x2048}"
precisions="${RTDA_BENCH_PRECISIONS:-fp32 fp16 bf16}"
mkdir -p "$out"
[ "$device" = cuda ] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }
for size in $sizes; do
  h=${size%x*}; w=${size#*x}
  for prec in $precisions; do
    variants='[plain,eager,channels_last]'
    [ "$prec" = bf16 ] && variants='[plain,eager,channels_last,compile]'
    python3 -m rtda.cli.bench -m model=bisenet_r18,deeplabv2_r101 bench.device=$device bench.precision=$prec \
      bench.height=$h bench.width=$w "bench.variants=$variants" bench.warmup=10 bench.min_runs=30 \
      bench.max_seconds=3 bench.matmul_ceiling=true "hydra.sweep.dir=$out/${size}_$prec" > "$out/${size}_$prec.log" 2>&1 \
      || { tail -30 "$out/${size}_$prec.log"; exit 1; }
  done
done
if [ "${RTDA_BENCH_TRAIN:-1}" = 1 ]; then
  methods='[source_only,adversarial,minent,advent,fda,fda_ssl,dacs,mic,cyclegan]'
  for model in bisenet_r18 deeplabv2_r101; do
    bs=8; lr=2.5e-2
    [ "$model" = deeplabv2_r101 ] && { bs=2; lr=2.5e-4; }   # DeepLabV2: its experiments' rate and batch
    for prec in ${RTDA_BENCH_TRAIN_PRECISIONS:-fp32 bf16}; do
      python3 -m rtda.cli.bench bench.mode=train model=$model optimizer.lr=$lr bench.device=$device bench.precision=$prec \
        bench.height=512 bench.width=1024 bench.train_batch_size=$bs "bench.methods=$methods" bench.train_iterations=5 \
        bench.min_rounds=3 bench.max_rounds=6 bench.max_seconds=4 "hydra.run.dir=$out/train_${model}_$prec" \
        > "$out/train_${model}_$prec.log" 2>&1 || { tail -30 "$out/train_${model}_$prec.log"; exit 1; }
    done
  done
fi
python3 -m rtda.cli.bench --collect "$out"
