"""The machine's throughput for the transcendental functions the filter loss needs (issue 12, item 2).

    .venv/bin/python benchmarks/transcendentals.py [--threads 1]

Per (image, template) pair the fused CPU filter loss evaluates one expm1 in its forward pass and one in its
backward pass (docs/cpu-kernels.md counts them); per template and per image one log1p. This measures, on a
cache-resident float32 tensor (4 MiB), the elements per second of torch's vectorised ``exp``, ``expm1`` and
``log1p`` (each call timed on its own, the fastest of many), and turns them into the floor of the filter loss
at the issue's shapes: the time the transcendentals alone would take.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHAPES = ((64, 512, 14), (32, 512, 28))


def throughput(fn, *, numel: int = 2 ** 20, reps: int = 60) -> float:
    source = (torch.rand(numel) - 0.5) * 0.01  # the centred logits are small
    target = torch.empty_like(source)
    fn(source, out=target)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn(source, out=target)
        best = min(best, time.perf_counter() - start)
    return numel / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "transcendentals.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    import _bench_measure

    rates = {name: throughput(getattr(torch, name)) for name in ("exp", "expm1", "log1p")}
    floors = {}
    for B, C, n in SHAPES:
        pairs = B * C * (n * n + 1)
        logs = (C * (n * n + 1) + C * B) / rates["log1p"]
        # torch's expm1 is not vectorised as well as its exp; the kernel's own expm1 (Cody–Waite + Taylor, as
        # vectorised as exp) costs about what exp does, so the exp rate gives the tighter floor.
        floors[f"{B}x{C}x{n}x{n}"] = {"pairs": pairs, "expm1": 2 * pairs, "log1p": C * (n * n + 1 + B),
                                      "floor_s": 2 * pairs / rates["exp"] + logs,
                                      "floor_s_at_torch_expm1_rate": 2 * pairs / rates["expm1"] + logs}
    result = {"machine": _bench_measure.machine_info(), "threads": args.threads, "per_second": rates,
              "filter_loss_fwd_bwd_floor": floors}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"threads {args.threads}; load average {result['machine']['load_average']}")
    for name, rate in rates.items():
        print(f"  {name:6s} {rate / 1e9:.2f} G/s (float32, cache-resident)")
    for shape, floor in floors.items():
        print(f"  {shape}: {floor['expm1'] / 1e6:.1f} M expm1 + {floor['log1p'] / 1e3:.0f} k log1p "
              f"-> floor {floor['floor_s'] * 1e3:.2f} ms at the exp rate "
              f"({floor['floor_s_at_torch_expm1_rate'] * 1e3:.2f} ms at torch's expm1 rate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
