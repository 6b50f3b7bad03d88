"""The Triton ops under compilers: torch.compile (inductor on a GPU, aot_eager under the interpreter), the sm_90
build of every kernel without a GPU, and the rule that kernel sources need nothing but triton (inductor copies
them into a module of its own). Each failed on an H200 before its fix (docs/triton-kernels.md, "torch.compile
on CUDA")."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastexplain import filter_loss, relu_template_mask

from triton_env import DEVICE, INTERPRETED  # skips this module where the backend cannot load

from fastexplain.ops import triton_filter_loss, triton_forms, triton_mask  # noqa: E402  (after the availability check)

pytestmark = pytest.mark.triton_interpret


def _maps(shape, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(DEVICE)


@pytest.mark.parametrize("form", ["auto", "fused", "dense", "gemm", "pyramid"])
def test_torch_compile_runs_the_ops_forward_and_backward(form):
    """Under the interpreter the ops are opaque custom ops (torch cannot trace interpreter kernels); on a
    GPU they are triton_ops that torch.compile traces down to the kernels. Every form: the pyramid op's
    fake implementation once failed under FakeTensorMode (``new_empty`` takes no memory_format)."""
    torch._dynamo.reset()
    x = _maps((4, 3, 5, 6), seed=7).float().requires_grad_()

    def objective(t):
        return filter_loss(t, backend="triton") + relu_template_mask(t, backend="triton").sum()

    compiled = torch.compile(objective, backend="aot_eager" if INTERPRETED else "inductor", fullgraph=True)
    with triton_forms.use_form(form):
        value = compiled(x)
    value.backward()
    reference_x = x.detach().clone().requires_grad_()
    expected = filter_loss(reference_x, backend="reference") + relu_template_mask(reference_x, backend="reference").sum()
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(x.grad, reference_x.grad)


_BUILD_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastexplain.ops import triton_filter_loss as loss, triton_forms as forms, triton_mask as mask, triton_pyramid as pyramid
    from fastexplain.ops import triton_fused as fused

    def build(fn, pointers, constants, beta="fp32"):
        signature = {name: "constexpr" if name in constants else pointers.get(name, "*fp32")
                     if name.endswith("_ptr") else beta if name == "beta" else "i32" for name in fn.arg_names}
        constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

    flags = dict(BLOCK_B=64, BLOCK_T=64, BLOCK_K=32, CENTRE_IN_TILE=True, IS_FP64=False, PRECISION="ieee")
    build(loss._forward_kernel, {"x_ptr": "*bf16"}, dict(flags, H=1, FROM_LOGITS=False))
    build(loss._forward_kernel, {}, dict(flags, CENTRE_IN_TILE=False, FROM_LOGITS=False))
    build(loss._forward_kernel, {}, dict(flags, FROM_LOGITS=True))
    build(loss._gbar_kernel, {name: "*fp64" for name in ("x_ptr", "xbar_ptr", "lme_ptr", "v_ptr", "gbar_ptr")},
          dict(flags, IS_FP64=True, FROM_LOGITS=True))
    build(forms._dlogits_kernel, {}, dict(BLOCK_B=32, BLOCK_T=64, IS_FP64=False))
    build(forms._mi_partials_kernel, {}, dict(BLOCK_B=64, BLOCK_T=32, IS_FP64=False))
    build(forms._mi_combine_kernel, {name: "*fp64" for name in ("centre_ptr", "mixture_ptr", "conditional_ptr",
          "v_ptr", "loss_ptr")}, dict(BLOCK_B=64, BLOCK_T=32, IS_FP64=True))
    build(loss._backward_kernel, {"x_ptr": "*fp16", "dx_ptr": "*fp16"}, dict(flags, BLOCK_B=16, BLOCK_I=1024))
    build(mask._mask_forward_kernel, {"peak_ptr": "*i32"}, dict(ROWS=16, BLOCK_HW=256, RELU=True,
          CENTROID=True, SCALE_TAU=True, IS_FP64=False, PEAK_GIVEN=False))
    build(pyramid._pyramid_kernel, {}, dict(BLOCK_M=32, BLOCK_W=64, IS_FP64=False))
    # torch.compile's inductor launches user kernels with a Python float argument typed fp64
    build(loss._forward_kernel, {}, dict(flags, FROM_LOGITS=False), beta="fp64")
    build(loss._forward_kernel, {}, dict(flags, FROM_LOGITS=True), beta="fp64")
    build(loss._gbar_kernel, {}, dict(flags, FROM_LOGITS=False), beta="fp64")
    build(loss._backward_kernel, {}, dict(flags, BLOCK_B=16, BLOCK_I=1024), beta="fp64")
    mask_flags = dict(ROWS=16, BLOCK_HW=256, SCALE_TAU=True, IS_FP64=False)
    build(mask._mask_forward_kernel, {"peak_ptr": "*i32"}, dict(mask_flags, RELU=True, CENTROID=False,
          PEAK_GIVEN=False), beta="fp64")
    build(mask._mask_backward_kernel, {"peak_ptr": "*i32"}, mask_flags, beta="fp64")
    build(pyramid._pyramid_kernel, {"src_ptr": "*fp64", "out_ptr": "*fp64", "f_ptr": "*fp64"},
          dict(BLOCK_M=16, BLOCK_W=64, IS_FP64=True))
    fused_flags = dict(BLOCK_B=32, BLOCK_T=256, BLOCK_K=16, BLOCK_I=32, WITH_GRAD=True, IS_FP64=False,
                       PRECISION="ieee")
    build(fused._forward_grad_kernel, {"x_ptr": "*bf16"}, fused_flags)
    build(fused._forward_grad_kernel, {}, dict(fused_flags, WITH_GRAD=False, PRECISION="tf32x3"))
    print("built")
""")


def test_kernel_sources_need_nothing_but_triton():
    """torch.compile's inductor copies a user kernel's source and its helpers into a module of its own that
    imports only triton: a helper that reads another module-level name (``math.factorial`` in the Taylor
    coefficients once) compiles in eager launches and fails every compiled filter loss (seen on an H200)."""
    import ast
    import inspect

    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import ConstexprFunction, JITFunction
    from fastexplain.ops import triton_pyramid as pyramid_module

    kernels = (JITFunction, InterpretedFunction, ConstexprFunction)  # triton.jit gives the second under the interpreter
    allowed_modules = {triton, triton.language}
    checked = 0
    from fastexplain.ops import triton_fused as fused_module

    for module in (triton_filter_loss, triton_forms, triton_mask, pyramid_module, fused_module):
        for name, value in vars(module).items():
            if not isinstance(value, kernels) or value.fn.__module__ != module.__name__:
                continue
            checked += 1
            function = ast.parse(textwrap.dedent(inspect.getsource(value.fn))).body[0]
            nodes = [node for statement in function.body for node in ast.walk(statement)]  # without the decorator
            local = {a.arg for a in function.args.args} | {n.id for n in nodes if isinstance(n, ast.Name)
                                                           and isinstance(n.ctx, ast.Store)}
            names = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - local
            # module-level names only (the interpreter leaves launch arguments in the module's globals)
            for used in sorted(names & value.fn.__globals__.keys()):
                target = value.fn.__globals__[used]
                fine = target in allowed_modules or isinstance(target, (*kernels, tl.constexpr))
                if isinstance(value, ConstexprFunction):
                    fine = fine and not inspect.ismodule(target)
                assert fine, f"{module.__name__}.{name} reads the module-level name {used!r}"
    assert checked >= 16


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter is more lenient than the compiler: compile the kernels to sm_90 code (no GPU needed,
    Triton ships ptxas) in a process without TRITON_INTERPRET, including a size-1 (constexpr) argument and β
    typed fp64 as torch.compile's inductor passes it (this failed every compiled Triton op on an H200)."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    try:
        result = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT], env=environment, capture_output=True,
                                text=True, timeout=400)
    except subprocess.TimeoutExpired:
        pytest.skip("compiling the kernels took over 400 s on this machine")
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing here, kernels cannot be compiled without a GPU")
    assert result.returncode == 0 and "built" in result.stdout, result.stderr[-3000:]
