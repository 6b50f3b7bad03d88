#!/usr/bin/env bash
# One device-tool call (a lent GPU, ~8 min): the Triton benchmark (issue 12 item 6), the torch.compile test on
# CUDA (its traceback first), the 224-px resnet18 explainer fits (issue 11), then the other Triton tests.
# Every log lands in $OUT. Used on an H200 on 2026-11-27 (docs/triton-kernels.md, docs/diversity-experiments.md).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'python', platform.python_version(), torch.cuda.get_device_name(0))"
  nproc; date -u; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 200 python3 benchmarks/gpu_triton.py --budget 120 --out "$OUT" > "$OUT/gpu_triton.log" 2>&1
echo "gpu_triton rc=$? at $SECONDS s"
PYTEST="python3 -m pytest tests/test_triton_ops.py -q -x --tb=short -p no:cacheprovider -o addopts="
timeout 60 $PYTEST -k torch_compile > "$OUT/pytest_gpu.log" 2>&1
echo "pytest (compile) rc=$? at $SECONDS s"
timeout 180 python3 experiments/resnet224.py --out /tmp/r224 --budget 110 --seeds 0 1 2 --train-images 2000 --workers 14 \
  > "$OUT/resnet224.log" 2>&1
echo "resnet224 rc=$? at $SECONDS s"; cp /tmp/r224/results.json "$OUT/resnet224_results.json" 2>/dev/null
cp /tmp/r224/defaults_s0/summary.png "$OUT/resnet224_s0_summary.png" 2>/dev/null
timeout 60 $PYTEST -k "materialised or strided or match_reference or auto_form" >> "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$? at $SECONDS s"
grep -E "passed|failed|Error" "$OUT/pytest_gpu.log" | tail -8; grep -v "^\s*$" "$OUT/resnet224.log" | tail -6
tail -40 "$OUT/gpu_triton.log"
