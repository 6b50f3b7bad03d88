"""Registers, spills, shared memory and time of the fused Triton filter-loss kernel per launch (a GPU diagnostic).

    python experiments/gpu_fused_probe.py      # on a GPU, ~1 min

Launches ``triton_fused._forward_grad_kernel`` directly (the compiled kernel's n_regs / n_spills / shared are then
visible) at 64×512×14×14 and 32×512×14×14 for a few launch settings and times forward + gradient with do_bench.
"""
from __future__ import annotations

import torch
import triton
import triton.testing

from fastexplain.ops import triton_forms, triton_fused

SETTINGS = [  # (BLOCK_K, BLOCK_I, num_warps, num_stages, precision)
    (16, 32, 16, 1, "ieee"), (16, 32, 8, 1, "tf32x3"), (16, 32, 8, 1, "ieee"), (32, 64, 8, 1, "ieee"),
    (32, 64, 8, 3, "ieee"), (16, 16, 16, 1, "ieee"), (16, 16, 8, 1, "tf32x3")]


def main() -> None:
    for B in (64, 32):
        x = torch.relu(torch.randn(B, 512, 14, 14, device="cuda"))
        templates = triton_forms._templates(14, 14, 4.0, torch.float32, x.device)
        templates_t = triton_forms._templates(14, 14, 4.0, torch.float32, x.device, transposed=True)
        loss = x.new_empty(512)
        dx = torch.empty_like(x)
        for block_k, block_i, warps, stages, precision in SETTINGS:
            def launch():
                return triton_fused._forward_grad_kernel[(512,)](
                    x, templates, templates_t, loss, dx, B, 14, 14, *x.stride(), *dx.stride(),
                    BLOCK_B=max(16, triton.next_power_of_2(B)), BLOCK_T=256, BLOCK_K=block_k, BLOCK_I=block_i,
                    WITH_GRAD=True, IS_FP64=False, PRECISION=precision, num_warps=warps, num_stages=stages)
            try:
                kernel = launch()
                ms = triton.testing.do_bench(launch)
                print(f"B={B} K={block_k} I={block_i} warps={warps} stages={stages} {precision}: {ms:.3f} ms, "
                      f"regs {kernel.n_regs}, spills {kernel.n_spills}, shared {kernel.metadata.shared} B", flush=True)
            except Exception as error:  # noqa: BLE001 - a diagnostic
                print(f"B={B} K={block_k} I={block_i} warps={warps} stages={stages} {precision}: "
                      f"{type(error).__name__}: {str(error)[:150]}", flush=True)


if __name__ == "__main__":
    main()
