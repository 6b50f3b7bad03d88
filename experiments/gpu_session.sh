#!/usr/bin/env bash
# One device-tool call (a lent GPU, ~6 min): the torch.compile probe of every Triton op and form, the 224-px
# resnet18 explainer fits of issue 11 (a variant sweep: 2 performers × 2 fit seeds, 8 fits at once), then the
# Triton benchmark of issue 12 item 6. Logs land in $OUT (few files: the device tool returns a limited number).
# Used on an H200 on 2026-11-27 and 2026-11-28 (docs/triton-kernels.md, docs/diversity-experiments.md).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'python', platform.python_version())"
  date -u; } 2>&1 | tee "$OUT/env.txt"
timeout 90 python3 experiments/gpu_compile_probe.py > "$OUT/compile_probe.log" 2>&1
echo "compile probe rc=$? at $SECONDS s"; grep -E "^(aot_eager|inductor)" "$OUT/compile_probe.log" | cut -c1-300
VARIANTS=${VARIANTS:-'{"defaults": {}, "c1000": {"constellation_weight": 1000}, "c2500": {"constellation_weight": 2500}, "e12": {"epochs": 12}}'}
timeout 250 python3 experiments/resnet224.py --out /tmp/r224 --budget 200 --seeds 0 1 --performer-seeds 0 1 \
  --train-images 2000 --workers 14 --parallel 8 --variants "$VARIANTS" > "$OUT/resnet224.log" 2>&1
echo "resnet224 rc=$? at $SECONDS s"; cp /tmp/r224/results.json "$OUT/resnet224_results.json" 2>/dev/null
grep -v "^\s*$" "$OUT/resnet224.log" | grep -vi warn | tail -30
timeout 150 python3 benchmarks/gpu_triton.py --budget 100 --out "$OUT" > "$OUT/gpu_triton.log" 2>&1
echo "gpu_triton rc=$? at $SECONDS s"
tail -30 "$OUT/gpu_triton.log"
