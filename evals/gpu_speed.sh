#!/usr/bin/env bash
# Issue 18, item 4: the speed bench on a GPU for SD 1.5 and SDXL shapes (random weights, nothing downloaded), fp16,
# eager and with --compile (inductor + CUDA graphs), without quantization and with each quantized preset (eager).
# One JSON and one text table per (shape, quantization, compile) in $OUT;
# docs/speed.md says how to read them. Each run is its own process, so its peak memory is its own.
#
#   bash evals/gpu_speed.sh                                   # everything (~15-25 min on an H100-class GPU)
#   ARCHS=sd15 QUANTS="none nf4" bash evals/gpu_speed.sh       # a subset that fits a short device call
#   STEPS=4 REGISTER=quick bash evals/gpu_speed.sh             # a smoke run
#   COMPILE="off" bash evals/gpu_speed.sh                     # eager only (compiling SDXL takes minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-evals/out/gpu_speed}
ARCHS=${ARCHS:-sd15 sdxl}
QUANTS=${QUANTS:-none nf4 int8 torchao-int8}
STEPS=${STEPS:-20}
REPEATS=${REPEATS:-3}
REGISTER=${REGISTER:-quick,standard,thorough}
REGISTER_STEPS=${REGISTER_STEPS:-5}
COMPILE=${COMPILE:-off on}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
for arch in $ARCHS; do
  size=512
  [ "$arch" = sdxl ] && size=1024
  for quant in $QUANTS; do
    name="$arch-$size-$quant"
    echo "== $name" >&2
    # fp16: the "auto" dtype on CUDA; quantized shapes are saved and loaded again through the preset's own load path
    "$PY" -m studio bench --speed --random-arch "$arch" --size "$size" --steps "$STEPS" --repeats "$REPEATS" \
      --device cuda --quantization "$quant" --register-presets "$REGISTER" --register-steps "$REGISTER_STEPS" \
      --json "$OUT/$name.json" | tee "$OUT/$name.txt" || echo "!! $name failed (see above)" | tee -a "$OUT/failed.txt"
  done
  if [[ " $COMPILE " == *" on "* ]]; then
    name="$arch-$size-none-compiled"
    echo "== $name" >&2
    # no registration: it backpropagates, so it runs the eager UNet whether or not generation is compiled
    "$PY" -m studio bench --speed --compile --random-arch "$arch" --size "$size" --steps "$STEPS" --repeats "$REPEATS" \
      --device cuda --register-presets "" --json "$OUT/$name.json" | tee "$OUT/$name.txt" \
      || echo "!! $name failed (see above)" | tee -a "$OUT/failed.txt"
  fi
done
