#!/usr/bin/env bash
# One device-tool call (a lent GPU, ~8 min): Triton benchmark (issue 12 item 6), the 224-px resnet18
# explainer fits (issue 11), then the Triton tests on CUDA. Every log lands in $OUT.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'python', platform.python_version(), torch.cuda.get_device_name(0))"
  nproc; date -u; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 200 python3 benchmarks/gpu_triton.py --budget 120 --out "$OUT" > "$OUT/gpu_triton.log" 2>&1
echo "gpu_triton rc=$? at $SECONDS s"
timeout 180 python3 experiments/resnet224.py --out /tmp/r224 --budget 110 --seeds 0 1 --train-images 2000 --workers 14 > "$OUT/resnet224.log" 2>&1
echo "resnet224 rc=$? at $SECONDS s"; cp /tmp/r224/results.json "$OUT/resnet224_results.json" 2>/dev/null
cp /tmp/r224/defaults_s0/summary.png "$OUT/resnet224_s0_summary.png" 2>/dev/null
timeout 45 python3 -m pytest tests/test_triton_ops.py -q -k "materialised or strided or match_reference or torch_compile or auto_form" -p no:cacheprovider -o addopts="" > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$? at $SECONDS s"
tail -3 "$OUT/pytest_gpu.log"; grep -v "^\s*$" "$OUT/resnet224.log" | tail -6; tail -40 "$OUT/gpu_triton.log"
