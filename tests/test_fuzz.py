"""Randomised cases for every kernel against the reference (issue 12 item 7).

``FASTEXPLAIN_FUZZ_CASES`` (default 25) is the number of cases of each CPU fuzz test — the fused filter
loss, the fused mask and the distributed local passes; the Triton kernels (under TRITON_INTERPRET=1 when
there is no GPU) get ``max(2, FASTEXPLAIN_FUZZ_CASES // 20)`` small cases each. ``FASTEXPLAIN_FUZZ_SEED``
(default 0) picks another set of cases; a case is reproduced from its test id (kind and index) and the
seed alone. For a long run:

    FASTEXPLAIN_FUZZ_CASES=10000 OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_fuzz.py -q -x

Last long run (2026-11-27, 2-core Xeon shared with other jobs, load average 5–12, 1 thread per run),
``FASTEXPLAIN_FUZZ_CASES=3334``: 10,334 cases in all — 3,334 each of the fused filter loss, mask and
distributed local passes (10,002 on CPU, 17 min) and 166 each of the Triton filter loss (both forms) and
mask under the interpreter (332, 16 min, in parallel). No non-finite value anywhere. Eight mask cases
failed the first criteria (the mask's rounding where 1 − β·d/n ≈ 0 against an all-zero reference output;
fp16 outputs that underflow to 0); with the criteria below, all 3,500 mask cases pass (64 s), and the
local-pass cases, rerun with the reference's passes in one case in five, pass (3,334 in 165 s).

What a case draws: B and C in 1 … 70, H and W in 1 … 40 (independently: most maps are not square), with
B·C·HW·(HW+1) capped so that the float64 reference stays fast (large maps come with small batches);
the dtype (fp16, bf16, fp32, fp64); the layout (contiguous, channels_last, H/W transposed view, strided
slice, B/C transposed view); the activation scale, log-uniform in 1e-6 … 1e4; the pattern (dense,
sparse, all-zero, one-hot, tied values, constant maps, the same image repeated, or a bad value: NaN, Inf
or a negative number, which must raise the shared one-line error); β ∈ {1, 2.5, 4, 7}.

Criteria (the truth is the float64 reference on the same, already rounded, inputs):

* always: the results are finite, have the documented dtype and shape;
* float64: loss within 1e-9 and gradient within 1e-7 of the largest truth value (the distributed local
  passes: 1e-10 for both, issue 12 item 4);
* fp32/fp16/bf16 (computed in float32): the error is at most the largest of 4 × the error of the
  reference backend run on the same input in the same dtype, 1e-4 × the largest truth value, and a
  resolution floor that grows with the activation scale: rounding x to float32 moves every logit
  s = T·x by ~eps·max|s| with max|s| ≤ max|x|/2, so the loss floor is 4·eps·(max(1, log B) + max|x|/2)
  and the gradient floor 16·eps·τ·(max|x|/2)/B·max w (float32 loses accuracy as the activation scale
  grows, for the reference as for the fused kernels: ~2e-3 relative at scale 1e4, issue 12 item 8);
  gradients returned in fp16/bf16 also get the rounding of that dtype (one ulp plus its smallest subnormal);
* float64 uses the same floors with float64's eps (negligible except where the truth is exactly 0);
* the mask: the same output and gradient as the reference to a few ulp, plus 4·eps·max|x| (y) and
  4·eps·max|dy| (dx) for the rounding of the mask where 1 − β·d/n ≈ 0; fp16/bf16 results, element by
  element, match either the reference in that dtype or the float32 reference on the upcast input rounded
  once (the fused kernels compute in float32 and round once; where x·m underflows the dtype, the
  gradient of an output rounded to 0 may be kept or dropped).
"""
from __future__ import annotations

import math
import os
import random
import threading
from dataclasses import dataclass

import pytest
import torch

import fastexplain
from fastexplain.distributed import grad_from_passes, loss_from_passes
from fastexplain.ops import _registry, reference
from fastexplain.ops._checks import negative_message, nonfinite_message
from fastexplain.ops.local_passes import ReferenceLocalPasses, local_passes

FUZZ_CASES = int(os.environ.get("FASTEXPLAIN_FUZZ_CASES", "25"))
FUZZ_SEED = int(os.environ.get("FASTEXPLAIN_FUZZ_SEED", "0"))
TRITON_CASES = max(2, FUZZ_CASES // 20)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("contiguous", "channels_last", "hw_transposed", "strided", "bc_transposed")
PATTERNS = ("dense", "sparse", "zeros", "one_hot", "tied", "constant", "same_image")
BAD_VALUES = (float("nan"), float("inf"), -float("inf"), -1.0)
BETAS = (4.0, 4.0, 4.0, 1.0, 2.5, 7.0)
# B·C·HW·(HW+1): the float64 reference's template product per case (~0.1 s at the cap on one core)
MAX_WORK = 1.5e8


def _unavailable(name: str) -> str | None:
    return _registry.unavailable_reason(name)


CPU_REASON = _unavailable("cpu")
needs_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend unavailable: {CPU_REASON}")


@dataclass(frozen=True)
class Case:
    B: int
    C: int
    H: int
    W: int
    dtype: torch.dtype
    layout: str
    pattern: str
    scale: float
    beta: float
    seed: int
    bad: float | None = None

    def __str__(self) -> str:
        return (f"B={self.B} C={self.C} H={self.H} W={self.W} {str(self.dtype)[6:]} {self.layout} {self.pattern} "
                f"scale={self.scale:.3g} beta={self.beta} seed={self.seed} bad={self.bad}")


def _size(rng: random.Random, high: int) -> int:
    """1 … high, small sizes more often (edge cases), large ones still drawn."""
    return rng.randint(1, high) if rng.random() < 0.5 else rng.randint(1, min(high, 8))


def draw_case(kind: str, index: int, *, max_size: int = 70, max_side: int = 40, max_work: float = MAX_WORK,
              min_batch: int = 1, bad_fraction: float = 0.0) -> Case:
    rng = random.Random(f"{kind}/{FUZZ_SEED}/{index}")
    H = _size(rng, max_side)
    W = H if rng.random() < 0.25 else _size(rng, max_side)
    B, C = max(min_batch, _size(rng, max_size)), _size(rng, max_size)
    HW = H * W
    while B * C * HW * (HW + 1) > max_work and (B > min_batch or C > 1):
        if B > min_batch and (B >= C or C == 1):
            B = max(min_batch, B // 2)
        else:
            C = max(1, C // 2)
    bad = rng.choice(BAD_VALUES) if rng.random() < bad_fraction else None
    return Case(B=B, C=C, H=H, W=W, dtype=rng.choice(DTYPES), layout=rng.choice(LAYOUTS),
                pattern=rng.choice(PATTERNS), scale=10.0 ** rng.uniform(-6, 4), beta=rng.choice(BETAS),
                seed=rng.randrange(2 ** 31), bad=bad)


def make_maps(case: Case, *, signed: bool = False, device: str = "cpu") -> torch.Tensor:
    """The case's [B, C, H, W] maps in its dtype and layout (values ≥ 0 unless signed or bad)."""
    g = torch.Generator().manual_seed(case.seed)
    shape = (case.B, case.C, case.H, case.W)
    uniform = torch.rand(shape, generator=g, dtype=torch.float64)
    if case.pattern == "dense":
        base = uniform
    elif case.pattern == "sparse":
        base = uniform * (torch.rand(shape, generator=g, dtype=torch.float64) > 0.85)
    elif case.pattern == "zeros":
        base = torch.zeros(shape, dtype=torch.float64)
    elif case.pattern == "one_hot":
        base = torch.zeros(case.B * case.C, case.H * case.W, dtype=torch.float64)
        hot = torch.randint(case.H * case.W, (case.B * case.C,), generator=g)
        base[torch.arange(case.B * case.C), hot] = 1.0
        base = base.reshape(shape)
    elif case.pattern == "tied":
        base = torch.floor(uniform * 3) / 2  # 0, 0.5, 1: many equal values, several equal maxima
    elif case.pattern == "constant":
        base = torch.rand(case.B, case.C, 1, 1, generator=g, dtype=torch.float64).expand(shape).clone()
    else:  # same_image: every image of the batch equal (MI = 0)
        base = uniform[:1].expand(shape).clone()
    if signed:
        base = base * 2 - torch.rand(shape, generator=g, dtype=torch.float64)
    x = base * case.scale
    if case.dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    if case.bad is not None:
        flat = x.view(-1)
        flat[int(torch.randint(flat.numel(), (1,), generator=g))] = case.bad
    x = x.to(case.dtype).to(device)
    return _layout(x, case.layout)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "hw_transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "bc_transposed":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided":
        B, C, H, W = x.shape
        holder = torch.zeros(B, C, H, 2 * W, dtype=x.dtype, device=x.device)
        holder[..., ::2] = x
        return holder[..., ::2]
    return x


def _loss_and_grad(fn, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().requires_grad_(True)
    loss = fn(leaf)
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach(), leaf.grad


def _error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    return float((actual.double() - truth.double()).abs().max())


def _reference_loss(beta: float):
    return lambda t: reference.filter_loss_per_filter(t, beta)


def check_loss_and_grad(case: Case, x: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor, *,
                        float64_loss_tol: float, float64_grad_tol: float) -> None:
    """The criteria of the module docstring, for a loss [C] and gradient computed from x."""
    assert loss.shape == (case.C,) and grad.shape == x.shape, case
    assert loss.dtype == reference.compute_dtype(x) and grad.dtype == x.dtype, case
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), f"non-finite result: {case}"
    weights = _weights(case)
    truth_loss, truth_grad = _loss_and_grad(_reference_loss(case.beta), x.double().contiguous(), weights)
    loss_error, grad_error = _error(loss, truth_loss), _error(grad, truth_grad)
    loss_scale, grad_scale = float(truth_loss.abs().max()), float(truth_grad.abs().max())
    # Resolution floors: rounding x to the compute dtype moves every logit s = T·x by up to ~eps·max|s|,
    # max|s| ≤ τ·Σ_i x(i) ≤ max|x| / 2, so the loss by ~eps·max|s| and ∂loss/∂x by ~eps·τ·max|s| / B·max w.
    eps = torch.finfo(reference.compute_dtype(x)).eps
    logit_scale = 0.5 * float(x.double().abs().max())
    tau = 0.5 / (case.H * case.W)
    loss_floor = 4 * eps * (max(1.0, math.log(case.B)) + logit_scale)
    grad_floor = 16 * eps * tau * max(logit_scale, 1e-300) / case.B * float(weights.max())
    if case.dtype == torch.float64:
        loss_bound = float64_loss_tol * loss_scale + loss_floor
        grad_bound = float64_grad_tol * grad_scale + grad_floor
    else:
        ref_loss, ref_grad = _loss_and_grad(_reference_loss(case.beta), x, weights)
        loss_bound = max(4 * _error(ref_loss, truth_loss), 1e-4 * loss_scale, loss_floor)
        grad_bound = max(4 * _error(ref_grad.double(), truth_grad), 1e-4 * grad_scale, grad_floor)
        if case.dtype != torch.float32:  # the gradient is returned rounded to fp16/bf16
            info = torch.finfo(case.dtype)
            grad_bound += info.eps * grad_scale + 2 * info.smallest_normal * info.eps
    assert loss_error <= loss_bound, f"loss error {loss_error:.3e} > {loss_bound:.3e} (max {loss_scale:.3e}): {case}"
    assert grad_error <= grad_bound, f"grad error {grad_error:.3e} > {grad_bound:.3e} (max {grad_scale:.3e}): {case}"


def _weights(case: Case) -> torch.Tensor:
    return torch.rand(case.C, generator=torch.Generator().manual_seed(case.seed + 1), dtype=torch.float64) + 0.5


def expect_value_error(case: Case, call) -> None:
    """A NaN/Inf/negative value: the shared one-line ValueError, never a silent NaN."""
    expected = nonfinite_message("filter_loss") if case.bad != -1.0 else negative_message("filter_loss")
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert expected in message and "\n" not in message.strip(), f"{message!r}: {case}"


# ----------------------------------------------------------------------------------------- filter loss
@needs_cpu
@pytest.mark.parametrize("index", range(FUZZ_CASES))
def test_filter_loss_fuzz(index: int) -> None:
    """The fused CPU filter loss (forward + backward) against the reference."""
    case = draw_case("filter_loss", index, bad_fraction=0.1)
    x = make_maps(case)
    run = lambda t: fastexplain.filter_loss(t, beta=case.beta, reduction="none", backend="cpu")  # noqa: E731
    if case.bad is not None:
        expect_value_error(case, lambda: run(x))
        return
    loss, grad = _loss_and_grad(run, x, _weights(case))
    check_loss_and_grad(case, x, loss, grad, float64_loss_tol=1e-9, float64_grad_tol=1e-7)


# ------------------------------------------------------------------------------------------------ mask
def _check_mask(case: Case, x: torch.Tensor, backend: str, relu: bool, center: str, scale: str | None) -> None:
    op = fastexplain.relu_template_mask if relu else fastexplain.template_mask
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(case.seed + 2),
                         dtype=torch.float64).to(case.dtype).to(x.device)
    low = case.dtype in (torch.float16, torch.bfloat16)
    results = {}
    # fp16/bf16: the fused kernels compute in float32 and round once, the reference in the dtype rounds
    # (and underflows) at every step; where x·m underflows, an output rounded to 0 may keep its gradient
    # (1[x·m > 0] in float32, the CPU kernel) or drop it (1[y > 0] on the rounded y, the Triton kernel,
    # like PyTorch's own fp16 relu(x * m)). Each element must match one of the two references.
    for name in (backend, "reference", "reference32") if low else (backend, "reference"):
        upcast = name == "reference32"
        leaf = (x.float() if upcast else x).detach().requires_grad_(True)
        y = op(leaf, beta=case.beta, center=center, scale=scale, backend="reference" if upcast else name)
        (dx,) = torch.autograd.grad(y, leaf, grad_y.float() if upcast else grad_y)
        results[name] = (y.detach().to(case.dtype), dx.to(case.dtype))
        if upcast:
            y32 = y.detach()
    y, dx = results[backend]
    detail = f"relu={relu} center={center} scale={scale}: {case}"
    assert y.shape == x.shape and y.dtype == x.dtype and dx.dtype == x.dtype, detail
    assert torch.isfinite(y).all() and torch.isfinite(dx).all(), f"non-finite result: {detail}"
    # Masks differ from the reference's rounding only where 1 − β·d/n ≈ 0: there y and dx may differ by
    # ~eps·|x| and ~eps·|dy| (a mask of ±1e-17 decides whether a negative x gives a tiny y > 0).
    info = torch.finfo(case.dtype)
    eps = torch.finfo(reference.compute_dtype(x)).eps
    tol = {torch.float16: info.eps, torch.bfloat16: info.eps, torch.float32: 2e-6, torch.float64: 1e-12}[case.dtype]
    floor = 2 * info.smallest_normal * info.eps if low else 0.0
    references = [results["reference"]] + ([results["reference32"]] if low else [])
    keep = ~_ambiguous_centroids(x, relu)[..., None, None] if center == "centroid" else torch.ones((), dtype=torch.bool)
    keep = keep.to(x.device)
    keep_dx = keep
    if low:  # an output that underflows to 0 in the dtype: its gradient may be kept or dropped (see above)
        smallest_subnormal = torch.finfo(case.dtype).smallest_normal * torch.finfo(case.dtype).eps
        keep_dx = keep & ~((y == 0) & (y32.abs() < 2 * smallest_subnormal))
    for index, (name, size) in enumerate((("y", float(x.double().abs().max())), ("dx", float(grad_y.double().abs().max())))):
        actual = (y, dx)[index].double()
        error = (torch.stack([(actual - ref[index].double()).abs() for ref in references]).amin(dim=0)
                 * (keep if index == 0 else keep_dx)).max()
        scale_of = max(float(ref[index].double().abs().max()) for ref in references)
        bound = tol * scale_of + 4 * eps * size + floor
        assert float(error) <= bound, f"{name} error {float(error):.3e} > {bound:.3e} (max {scale_of:.3e}): {detail}"


def _ambiguous_centroids(x: torch.Tensor, relu: bool) -> torch.Tensor:
    """[B, C]: maps whose centroid float32 rounding may put on either side of a rounding boundary — the
    coordinate within 1e-4 of k + 0.5, or the total weight within 1e-4 of 0 relative to Σ|w| (signed maps
    without ReLU) — where the kernel and the reference may both be right and still pick different peaks."""
    B, C, H, W = x.shape
    weights = x.double().cpu().reshape(B, C, H * W)
    if relu:
        weights = weights.clamp_min(0)
    total, size = weights.sum(dim=2), weights.abs().sum(dim=2)
    rows = torch.arange(H, dtype=torch.float64).repeat_interleave(W)
    cols = torch.arange(W, dtype=torch.float64).repeat(H)
    safe = torch.where(total.abs() > 0, total, torch.ones_like(total))
    near_half = lambda c: ((c + 0.5) - torch.round(c + 0.5)).abs() <= 1e-4 * (H + W)  # noqa: E731
    return ((total.abs() <= 1e-4 * size) & (size > 0)) | near_half((weights * rows).sum(2) / safe) | \
        near_half((weights * cols).sum(2) / safe)


@needs_cpu
@pytest.mark.parametrize("index", range(FUZZ_CASES))
def test_mask_fuzz(index: int) -> None:
    """The fused CPU ReLU + mask and mask (forward + backward) against the reference."""
    case = draw_case("mask", index, max_work=float("inf"))
    rng = random.Random(case.seed)
    relu, center, scale = rng.random() < 0.5, rng.choice(("argmax", "centroid")), rng.choice((None, "tau"))
    _check_mask(case, make_maps(case, signed=True), "cpu", relu, center, scale)


# ------------------------------------------------------------------------------ distributed local passes
class InProcessGroup:
    """All-reduce between threads, one per simulated rank: the same values on every rank (stack, then
    sum or max over ranks in rank order), like a process group's all-reduce."""

    def __init__(self, ranks: int) -> None:
        self.barrier = threading.Barrier(ranks, timeout=300)
        self.slots: list[torch.Tensor | None] = [None] * ranks

    def reducer(self, rank: int):
        def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)  # type: ignore[arg-type]
            result = stacked.sum(dim=0) if op == "sum" else stacked.amax(dim=0)
            self.barrier.wait()
            return result
        return all_reduce


def simulate_ranks(chunks: list[torch.Tensor], beta: float, backend: str,
                   weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | BaseException]:
    """(loss [C], ∂(Σ_c w_c loss_c)/∂x_r) on every simulated rank, from fastexplain.distributed's own
    assembly (loss_from_passes, grad_from_passes) and the backend's local passes."""
    group = InProcessGroup(len(chunks))
    outcome: list = [None] * len(chunks)

    def run(rank: int) -> None:
        try:
            passes = local_passes(_registry.load(backend), chunks[rank], beta)
            reduce = group.reducer(rank)
            loss, n_total, global_sums = loss_from_passes(passes, chunks[rank].shape[0], reduce)
            grad = grad_from_passes(passes, n_total, weights.to(loss.dtype), global_sums)
            outcome[rank] = (loss, grad.to(chunks[rank].dtype))
        except BaseException as error:  # noqa: BLE001 - reported by the test
            if not isinstance(error, ValueError):  # bad inputs make every rank raise in step: no abort
                group.barrier.abort()             # anything else: release the other ranks
            outcome[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(chunks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcome


def _raise(error: BaseException) -> None:
    raise error


def _split(case: Case, ranks: int, rng: random.Random) -> list[int]:
    """Random sizes ≥ 1 that add up to B."""
    cuts = sorted(rng.sample(range(1, case.B), ranks - 1)) if ranks > 1 else []
    bounds = [0, *cuts, case.B]
    return [bounds[i + 1] - bounds[i] for i in range(ranks)]


@needs_cpu
@pytest.mark.parametrize("index", range(FUZZ_CASES))
def test_local_passes_fuzz(index: int) -> None:
    """1–4 simulated ranks with uneven shares (some of one image) running the fused local passes (one case
    in five: the reference's passes, the fallback of other backends): the global loss and gradient equal
    the single-process reference on the concatenated batch."""
    case = draw_case("local_passes", index, min_batch=2, bad_fraction=0.05)
    rng = random.Random(case.seed)
    ranks = rng.randint(1, min(4, case.B))
    backend = "reference" if rng.random() < 0.2 else "cpu"  # the fused passes, and the fallback's
    x = make_maps(case)
    chunks = list(x.split(_split(case, ranks, rng)))
    outcome = simulate_ranks(chunks, case.beta, backend, _weights(case))
    if case.bad is not None:
        for result in outcome:
            assert isinstance(result, ValueError), f"{result!r}: {case}"
        expect_value_error(case, lambda: _raise(outcome[0]))
        return
    for result in outcome:
        if isinstance(result, BaseException):
            raise result
    losses = [result[0] for result in outcome]
    for loss in losses[1:]:
        assert torch.equal(loss, losses[0]), f"ranks disagree on the loss: {case}"
    grad = torch.cat([result[1] for result in outcome])
    check_loss_and_grad(case, x, losses[0], grad, float64_loss_tol=1e-10, float64_grad_tol=1e-10)


@needs_cpu
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("large_on", [(1,), (0, 2), ()])
def test_local_passes_overflow_guard_on_some_ranks(backend: str, large_on: tuple[int, ...]) -> None:
    """The overflow guard's shift is global: when only some ranks hold logits above it (maps ×5000 there),
    every rank takes the shifted path (steps 2'–3' of fastexplain.distributed), and the loss and gradient
    still equal the single-process reference on the concatenated batch in float64. Without large maps the
    unshifted single round is taken, with the same result."""
    generator = torch.Generator().manual_seed(len(large_on))
    chunks = [torch.rand(3, 4, 5, 6, generator=generator, dtype=torch.float64) * (5000.0 if rank in large_on else 1.0)
              for rank in range(3)]
    whole = torch.cat(chunks)
    largest_logit = ReferenceLocalPasses(whole, 4.0).logit_maxima(whole.mean(0).reshape(4, 30)).max()
    assert (largest_logit > 30) == bool(large_on)  # the guard is (not) needed, as the case intends
    weights = torch.rand(4, generator=generator, dtype=torch.float64)
    outcome = simulate_ranks(chunks, 4.0, backend, weights)
    for result in outcome:
        if isinstance(result, BaseException):
            raise result
    x = torch.cat(chunks).requires_grad_(True)
    expected = fastexplain.filter_loss(x, beta=4.0, reduction="none", backend="reference")
    (expected * weights).sum().backward()
    # float64 rounding of logits of size ~max|x|/2 (the resolution floor of check_loss_and_grad)
    floor = 4 * torch.finfo(torch.float64).eps * (math.log(9) + 0.5 * float(whole.max()))
    for loss, _ in outcome:
        assert (loss - expected.detach()).abs().max() <= 1e-10 * expected.abs().max() + floor
    grad = torch.cat([result[1] for result in outcome])
    assert (grad - x.grad).abs().max() <= 1e-10 * x.grad.abs().max()


# ---------------------------------------------------------------------------------------------- Triton
TRITON_REASON = _unavailable("triton")
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend unavailable: {TRITON_REASON}")


def _triton_device() -> str:
    return "cuda" if "cuda" in _registry.load("triton").device_types else "cpu"


@needs_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("index", range(TRITON_CASES))
def test_triton_filter_loss_fuzz(index: int) -> None:
    """The Triton filter loss (interpreted on CPU without a GPU) on small random cases, every form."""
    from fastexplain.ops import triton_forms

    case = draw_case("triton_filter_loss", index, max_size=9, max_side=9, bad_fraction=0.1)
    x = make_maps(case, device=_triton_device())
    run = lambda t: fastexplain.filter_loss(t, beta=case.beta, reduction="none", backend="triton")  # noqa: E731
    if case.bad is not None:
        expect_value_error(case, lambda: run(x))
        return
    # fused (one program per filter), dense (template tiles), gemm and pyramid (materialised logits), and gemm with
    # the MI forward split over template tiles of 8 (batch tiles of 8)
    for form, launch in [(form, {}) for form in triton_forms.FORMS] + [("gemm", {"SPLIT": 1, "BLOCK_B": 8, "BLOCK_T": 8})]:
        triton_forms.MI_LAUNCH.update(launch)
        try:
            with triton_forms.use_form(form):
                loss, grad = _loss_and_grad(run, x, _weights(case))
        finally:
            triton_forms.MI_LAUNCH.clear()
        check_loss_and_grad(case, x.cpu(), loss.cpu(), grad.cpu(), float64_loss_tol=1e-9, float64_grad_tol=1e-7)


@needs_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("index", range(TRITON_CASES))
def test_triton_mask_fuzz(index: int) -> None:
    case = draw_case("triton_mask", index, max_size=9, max_side=12)
    rng = random.Random(case.seed)
    relu, center, scale = rng.random() < 0.5, rng.choice(("argmax", "centroid")), rng.choice((None, "tau"))
    _check_mask(case, make_maps(case, signed=True, device=_triton_device()), "triton", relu, center, scale)
