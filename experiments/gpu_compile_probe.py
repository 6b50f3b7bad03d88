"""Which Triton op and form ``torch.compile(fullgraph=True)`` fails on, and why (a GPU diagnostic).

    python experiments/gpu_compile_probe.py            # on a GPU: aot_eager and inductor
    TRITON_INTERPRET=1 python experiments/gpu_compile_probe.py   # CPU interpreter: aot_eager only

For every backend × filter-loss form × op (loss, mask, both) it compiles the objective of
``tests/test_triton_ops.py::test_torch_compile_runs_the_ops_forward_and_backward``, runs forward and backward,
checks both against the reference, and prints one line per case with the exception's type, message and the
innermost frames inside fastexplain or torch's triton/inductor code.
"""
from __future__ import annotations

import os
import traceback

import torch

from fastexplain import filter_loss, relu_template_mask
from fastexplain.ops import triton_forms

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"


def objective(op: str):
    def run(t: torch.Tensor) -> torch.Tensor:
        value = t.new_zeros(())
        if op in ("loss", "both"):
            value = value + filter_loss(t, backend="triton")
        if op in ("mask", "both"):
            value = value + relu_template_mask(t, backend="triton").sum()
        return value
    return run


def probe(backend: str, form: str, op: str) -> str:
    torch._dynamo.reset()
    x = torch.rand(4, 3, 5, 6, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(7)).requires_grad_()
    reference_x = x.detach().clone().requires_grad_()
    try:
        with triton_forms.use_form(form):
            value = torch.compile(objective(op), backend=backend, fullgraph=True)(x)
            value.backward()
        ref = reference_x.new_zeros(())
        if op in ("loss", "both"):
            ref = ref + filter_loss(reference_x, backend="reference")
        if op in ("mask", "both"):
            ref = ref + relu_template_mask(reference_x, backend="reference").sum()
        ref.backward()
        torch.testing.assert_close(value, ref)
        torch.testing.assert_close(x.grad, reference_x.grad)
        return "OK"
    except Exception as error:  # noqa: BLE001 - a diagnostic: report every failure
        frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                  for f in traceback.extract_tb(error.__traceback__)
                  if "fastexplain" in f.filename or "triton" in f.filename or "inductor" in f.filename][-6:]
        message = " ".join(str(error).split())[:700]
        return f"FAIL {type(error).__name__}: {message}\n      frames: {' <- '.join(reversed(frames))}"


def main() -> int:
    backends = ["aot_eager"] if INTERPRETED else ["aot_eager", "inductor"]
    for backend in backends:
        for form in ("dense", "gemm", "pyramid"):
            for op in ("loss", "mask", "both"):
                if op == "mask" and form != "dense":
                    continue
                print(f"{backend:9s} {form:7s} {op:4s} {probe(backend, form, op)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
