#!/usr/bin/env bash
# One device-tool call on a lent GPU. STAGES (default "tests bench") picks what runs, in this order:
#   tests    the Triton filter-loss tests on the GPU (fused form, forms, torch.compile), ~2 min
#   probe    torch.compile probe of every Triton op and form (experiments/gpu_compile_probe.py), ~1 min
#   fused    the fused form's kernel alone per launch: registers, spills, time (experiments/gpu_fused_probe.py), ~1 min
#   bench    benchmarks/gpu_triton.py: every kernel checked, then timed against the textbook form, ~3 min
#   resnet   the 224-px resnet18 explainer fits of issue 11 (VARIANTS × 2 performers × 2 fit seeds), ~4 min
# The next GPU session (2026-12-04 note): STAGES="tests fused resnet" with TESTS_FILTER="fused or compile" first
# (the inductor test of the fused form has not run on a GPU), then the bench if time is left.
# Logs land in $OUT (few files: the device tool returns at most 8). Used on an H200 on 2026-11-27, 2026-11-28 and
# 2026-12-04 (docs/triton-kernels.md, docs/diversity-experiments.md).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
STAGES=${STAGES:-tests bench}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'python', platform.python_version())"
  date -u; } 2>&1 | tee "$OUT/env.txt"
if [[ " $STAGES " == *" tests "* ]]; then
  timeout ${TESTS_TIMEOUT:-170} python3 -m pytest -q -rf --tb=line -p no:cacheprovider tests/test_triton_fused.py tests/test_triton_ops.py \
    tests/test_triton_compile.py -k "${TESTS_FILTER:-fused or filter_loss or second_deriv or auto_form or compile}" \
    > "$OUT/pytest_gpu.log" 2>&1
  echo "tests rc=$? at $SECONDS s"; tail -15 "$OUT/pytest_gpu.log" | cut -c1-300
fi
if [[ " $STAGES " == *" probe "* ]]; then
  timeout 90 python3 experiments/gpu_compile_probe.py > "$OUT/compile_probe.log" 2>&1
  echo "compile probe rc=$? at $SECONDS s"; grep -E "^(aot_eager|inductor)" "$OUT/compile_probe.log" | cut -c1-300
fi
if [[ " $STAGES " == *" fused "* ]]; then
  timeout 140 python3 experiments/gpu_fused_probe.py > "$OUT/fused_probe.log" 2>&1
  echo "fused probe rc=$? at $SECONDS s"; cat "$OUT/fused_probe.log" | cut -c1-300
fi
if [[ " $STAGES " == *" bench "* ]]; then
  timeout ${BENCH_TIMEOUT:-220} python3 benchmarks/gpu_triton.py --budget ${BENCH_BUDGET:-90} --out "$OUT" ${BENCH_ARGS:-} > "$OUT/gpu_triton.log" 2>&1
  echo "gpu_triton rc=$? at $SECONDS s"
  grep -v "^\s*$" "$OUT/gpu_triton.log" | tail -60 | cut -c1-400
fi
if [[ " $STAGES " == *" resnet "* ]]; then
  VARIANTS=${VARIANTS:-'{"defaults": {}, "e12": {"epochs": 12}}'}
  timeout ${RESNET_TIMEOUT:-250} python3 experiments/resnet224.py --out /tmp/r224 --budget ${RESNET_BUDGET:-200} \
    --seeds 0 1 --performer-seeds 0 1 --train-images 2000 --workers 14 --parallel 8 --variants "$VARIANTS" \
    > "$OUT/resnet224.log" 2>&1
  echo "resnet224 rc=$? at $SECONDS s"; cp /tmp/r224/results.json "$OUT/resnet224_results.json" 2>/dev/null
  grep -v "^\s*$" "$OUT/resnet224.log" | grep -vi warn | tail -30
fi
