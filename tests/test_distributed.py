"""The global-batch filter loss over 2 gloo processes equals the single-process loss on the concatenated batch.

Two processes are spawned once for the whole module (a free port, gloo on CPU, timeouts everywhere so a
failure never hangs CI); they run every case and save their results, and the tests below compare them
with ``fastexplain.ops.reference`` on the concatenated batch in this process.
"""
from __future__ import annotations

import datetime
import inspect
import os
import socket
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastexplain
from fastexplain.distributed import global_filter_loss, global_filter_loss_per_filter
from fastexplain.ops import _registry, availability, backend_names, reference
from fastexplain.ops._checks import negative_message, nonfinite_message

WORLD_SIZE = 2
# Only reached when something is broken; generous because on a loaded CI machine a worker can take tens
# of seconds just to import torch while the other waits for it in init_process_group.
JOIN_TIMEOUT_S = 300.0
GROUP_TIMEOUT = datetime.timedelta(seconds=150)

# name -> (images per rank, dtype, C, H, W, activation scale)
CASES: dict[str, tuple[tuple[int, int], torch.dtype, int, int, int, float]] = {
    "even_float64": ((4, 4), torch.float64, 3, 5, 5, 1.0),
    "uneven_float64": ((2, 7), torch.float64, 4, 4, 6, 1.0),
    "one_image_on_rank0_float64": ((1, 5), torch.float64, 3, 5, 4, 1.0),
    "one_image_each_float64": ((1, 1), torch.float64, 2, 3, 3, 1.0),
    "large_activations_float64": ((3, 4), torch.float64, 2, 5, 5, 1e4),  # spread of s > 709: exp overflows
    "scale_20_float64": ((5, 3), torch.float64, 3, 6, 6, 20.0),
    "uneven_float32": ((3, 6), torch.float32, 4, 6, 6, 1.0),
    "scale_20_float32": ((6, 2), torch.float32, 3, 5, 5, 20.0),
    "large_activations_float32": ((4, 3), torch.float32, 2, 5, 5, 3000.0),  # spread of s > 88
    "uneven_float16": ((2, 5), torch.float16, 3, 4, 4, 1.0),
    "uneven_bfloat16": ((4, 3), torch.bfloat16, 3, 5, 3, 1.0),
    "non_square_channels_last_float64": ((3, 5), torch.float64, 5, 9, 4, 3.0),
    "conv5_like_float64": ((6, 5), torch.float64, 4, 14, 14, 1.0),  # the prefix-sum pyramid path
}
# the local passes under test: the reference's PyTorch math and the fused C++ kernels (when built)
LOCAL_PASS_BACKENDS = ("reference", "cpu")


def _case_inputs() -> dict[str, dict[str, torch.Tensor]]:
    """Full batches (sparse post-ReLU-like maps) and per-filter upstream weights for every case."""
    generator = torch.Generator().manual_seed(1234)
    inputs = {}
    for name, (sizes, dtype, C, H, W, scale) in CASES.items():
        maps = torch.relu(torch.randn(sum(sizes), C, H, W, generator=generator, dtype=torch.float64)) * scale
        weights = torch.rand(C, generator=generator, dtype=torch.float64) + 0.5
        inputs[name] = {"x": maps.to(dtype), "weights": weights}
    return inputs


def _rank_slice(sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(2, 3, kernel_size=3, padding=1).double()


def _cpu_backends() -> list[str]:
    """The backends that can run on CPU tensors in this process."""
    return [name for name, reason in availability().items()
            if reason is None and "cpu" in _registry.load(name).device_types]


def _run_cases(rank: int, inputs: dict) -> dict:
    results: dict = {}
    group = dist.group.WORLD
    for backend in LOCAL_PASS_BACKENDS:
        if backend != "reference" and backend not in _cpu_backends():
            continue
        for name, (sizes, *_rest) in CASES.items():
            x = inputs[name]["x"][_rank_slice(sizes, rank)].clone().requires_grad_(True)
            if "channels_last" in name:
                x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
            loss = global_filter_loss(x, process_group=group, reduction="none", backend=backend)
            (loss * inputs[name]["weights"].to(loss.dtype)).sum().backward()
            results[f"{name}@{backend}"] = {"loss": loss.detach(), "grad": x.grad}
    # Every backend that runs on CPU tensors here, and the automatic choice, gives the same global loss.
    for backend in _cpu_backends() + [None]:
        x = inputs["uneven_float64"]["x"][_rank_slice(CASES["uneven_float64"][0], rank)].clone().requires_grad_(True)
        loss = global_filter_loss(x, process_group=group, reduction="none", backend=backend)
        (loss * inputs["uneven_float64"]["weights"]).sum().backward()
        results[f"backend_{backend}"] = {"loss": loss.detach(), "grad": x.grad}
    # DDP convention: the gradient reaching x is scaled by the group size, the value is not.
    x = inputs["uneven_float64"]["x"][_rank_slice(CASES["uneven_float64"][0], rank)].clone().requires_grad_(True)
    loss = global_filter_loss(x, process_group=group, ddp_gradients=True)
    loss.backward()
    results["ddp_scaled"] = {"loss": loss.detach(), "grad": x.grad}
    # Under DistributedDataParallel, with ddp_gradients=True the averaged weight gradient is exact.
    images = inputs["ddp_images"]["x"][_rank_slice((3, 5), rank)]
    model = torch.nn.parallel.DistributedDataParallel(_tiny_model(seed=7))
    global_filter_loss(torch.relu(model(images)), process_group=group, ddp_gradients=True).backward()
    results["ddp_model"] = {"grad": model.module.weight.grad.clone()}
    # A bad input on one rank makes every rank raise the same error instead of hanging.
    bad_inputs = {"negative": (0, -1.0), "nan": (1, float("nan"))}
    for name, (bad_rank, value) in bad_inputs.items():
        x = torch.ones(2, 2, 3, 3, dtype=torch.float64)
        if rank == bad_rank:
            x[1, 0, 2, 2] = value
        results[f"error_{name}"] = _error_message(lambda: global_filter_loss(x, process_group=group))
    x = torch.ones(2, 2, 3, 3 + rank, dtype=torch.float64)
    results["error_shape"] = _error_message(lambda: global_filter_loss(x, process_group=group))
    x = torch.ones(2, 2, 3, 3, dtype=torch.float64)
    backend = "no_such_backend" if rank == 1 else None
    results["error_backend"] = _error_message(lambda: global_filter_loss(x, process_group=group, backend=backend))
    x = torch.ones(0 if rank == 0 else 2, 2, 3, 3, dtype=torch.float64)
    results["error_empty"] = _error_message(lambda: global_filter_loss(x, process_group=group))
    # The public entry point, once fastexplain.filter_loss has the process_group keyword.
    if "process_group" in inspect.signature(fastexplain.filter_loss).parameters:
        x = inputs["uneven_float64"]["x"][_rank_slice(CASES["uneven_float64"][0], rank)]
        results["public_api"] = fastexplain.filter_loss(x, process_group=group, reduction="none")
    # Still in step after the errors: a last collective succeeds.
    x = torch.rand(2, 2, 3, 3, dtype=torch.float64)
    results["after_errors"] = {"loss": global_filter_loss_per_filter(x, 4.0, group).detach()}
    return results


def _error_message(call: Callable[[], object]) -> str:
    try:
        call()
    except (ValueError, RuntimeError) as error:
        return str(error)
    return "no error raised"


def _worker(rank: int, port: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=GROUP_TIMEOUT)
    try:
        inputs = torch.load(os.path.join(directory, "inputs.pt"))
        torch.save(_run_cases(rank, inputs), os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    """(inputs, [results of rank 0, results of rank 1]) from one 2-process gloo run."""
    directory = tmp_path_factory.mktemp("distributed")
    inputs = _case_inputs()
    inputs["ddp_images"] = {"x": torch.randn(8, 2, 5, 5, generator=torch.Generator().manual_seed(5),
                                             dtype=torch.float64)}
    torch.save(inputs, directory / "inputs.pt")
    context = mp.spawn(_worker, args=(_free_port(), str(directory)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE} gloo workers did not finish within {JOIN_TIMEOUT_S:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return inputs, [torch.load(Path(directory) / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _reference(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process loss [C] and gradient of Σ_c w_c loss_c on the concatenated batch."""
    x = x.clone().requires_grad_(True)
    loss = reference.filter_loss_per_filter(x, 4.0)
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, relative: float) -> None:
    """|actual − expected| ≤ relative · max|expected| elementwise (losses can be ~1e-6, so scale by the max)."""
    actual, expected = actual.double(), expected.double()
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= relative * scale, f"max error {error:.3e} > {relative:.0e} × max|expected| {scale:.3e}"


@pytest.mark.parametrize("backend", LOCAL_PASS_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradient_equal_the_concatenated_batch(outcome, name, backend):
    inputs, ranks = outcome
    if f"{name}@{backend}" not in ranks[0]:
        pytest.skip(f"backend {backend!r} cannot run on CPU tensors here")
    sizes, dtype = CASES[name][0], CASES[name][1]
    x, weights = inputs[name]["x"], inputs[name]["weights"]
    # the float64 truth on the same (possibly rounded) inputs; lower precisions are judged against it
    expected_loss, expected_grad = _reference(x.double(), weights)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    for rank, results in enumerate(ranks):
        result = results[f"{name}@{backend}"]
        assert result["loss"].dtype == reference.compute_dtype(x)
        _assert_close(result["loss"], expected_loss, tolerance)
        assert result["grad"].dtype == dtype
        # a float16/bfloat16 gradient is rounded to its dtype: 2e-3 (fp16) or 1e-2 (bf16) of the largest entry
        grad_tolerance = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, tolerance)
        _assert_close(result["grad"], expected_grad[_rank_slice(sizes, rank)], grad_tolerance)


@pytest.mark.parametrize("backend", list(backend_names()) + [None])
def test_every_backend_gives_the_global_loss(outcome, backend):
    inputs, ranks = outcome
    if f"backend_{backend}" not in ranks[0]:
        pytest.skip(f"backend {backend!r} cannot run on CPU tensors here")
    sizes = CASES["uneven_float64"][0]
    expected_loss, expected_grad = _reference(inputs["uneven_float64"]["x"], inputs["uneven_float64"]["weights"])
    for rank, results in enumerate(ranks):
        _assert_close(results[f"backend_{backend}"]["loss"], expected_loss, 1e-10)
        _assert_close(results[f"backend_{backend}"]["grad"], expected_grad[_rank_slice(sizes, rank)], 1e-10)


@pytest.mark.parametrize("backend", LOCAL_PASS_BACKENDS)
@pytest.mark.parametrize("name", ["uneven_float32", "scale_20_float32"])  # naive is NaN at large scales
def test_float32_gradient_meets_the_spec_target(outcome, name, backend):
    """docs/method.md §2: float32 gradients no worse than 2× the naive float32 reference's error (vs float64)."""
    inputs, ranks = outcome
    if f"{name}@{backend}" not in ranks[0]:
        pytest.skip(f"backend {backend!r} cannot run on CPU tensors here")
    x, weights = inputs[name]["x"], inputs[name]["weights"]
    _, truth_grad = _reference(x.double(), weights)
    naive_x = x.clone().requires_grad_(True)
    (reference.naive_filter_loss_per_filter(naive_x, 4.0) * weights.float()).sum().backward()
    grad = torch.cat([results[f"{name}@{backend}"]["grad"] for results in ranks]).double()
    grad_error = float((grad - truth_grad).abs().max())
    naive_error = float((naive_x.grad.double() - truth_grad).abs().max())
    assert grad_error <= 2 * naive_error, f"float32 gradient error {grad_error:.2e} > 2 × naive {naive_error:.2e}"


def test_one_image_per_rank_is_not_the_per_rank_loss(outcome):
    """Two images in all: MI > 0, while each rank alone (B = 1) would have MI = 0."""
    _, ranks = outcome
    assert float(ranks[0]["one_image_each_float64@reference"]["loss"].abs().min()) > 0


def test_ddp_gradients_scale_the_gradient_not_the_value(outcome):
    inputs, ranks = outcome
    sizes = CASES["uneven_float64"][0]
    x = inputs["uneven_float64"]["x"].clone().requires_grad_(True)
    loss = reference.filter_loss_per_filter(x, 4.0).sum()
    loss.backward()
    for rank, results in enumerate(ranks):
        _assert_close(results["ddp_scaled"]["loss"], loss.detach(), 1e-10)
        _assert_close(results["ddp_scaled"]["grad"], WORLD_SIZE * x.grad[_rank_slice(sizes, rank)], 1e-10)


def test_ddp_weight_gradient_equals_the_single_process_gradient(outcome):
    inputs, ranks = outcome
    model = _tiny_model(seed=7)
    reference.filter_loss_per_filter(torch.relu(model(inputs["ddp_images"]["x"])), 4.0).sum().backward()
    for results in ranks:
        _assert_close(results["ddp_model"]["grad"], model.weight.grad, 1e-10)


@pytest.mark.parametrize("name, message", [("error_negative", negative_message("filter_loss")),
                                           ("error_nan", nonfinite_message("filter_loss")),
                                           ("error_shape", "the ranks of the process group disagree")])
def test_a_bad_input_on_one_rank_raises_on_every_rank(outcome, name, message):
    _, ranks = outcome
    for results in ranks:
        assert message in results[name]
    assert ranks[0]["after_errors"]["loss"].shape == (2,)


def test_a_rank_that_fails_before_the_collectives_makes_the_others_raise(outcome):
    _, ranks = outcome
    assert "unknown backend 'no_such_backend'" in ranks[1]["error_backend"]
    assert "another rank of the process group failed" in ranks[0]["error_backend"]
    assert "got an empty tensor" in ranks[0]["error_empty"]
    assert "another rank of the process group failed" in ranks[1]["error_empty"]


def test_the_public_filter_loss_with_a_process_group_is_the_global_loss(outcome):
    inputs, ranks = outcome
    if "public_api" not in ranks[0]:
        pytest.skip("fastexplain.filter_loss has no process_group keyword yet")
    expected = reference.filter_loss_per_filter(inputs["uneven_float64"]["x"], 4.0)
    for results in ranks:
        _assert_close(results["public_api"], expected, 1e-10)


def test_a_bad_reduction_is_reported_before_any_collective():
    with pytest.raises(ValueError, match="reduction must be one of"):
        global_filter_loss(torch.rand(2, 1, 3, 3), process_group=None, reduction="average")


def test_without_an_initialised_process_group_the_error_says_how_to_fix_it():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        global_filter_loss(torch.rand(2, 1, 3, 3), process_group=None)


def test_the_cpu_backend_runs_the_fused_local_passes():
    if "cpu" not in _cpu_backends():
        pytest.skip("the cpu backend is not built here")
    from fastexplain.ops.local_passes import CpuLocalPasses, ReferenceLocalPasses, local_passes

    x = torch.rand(2, 1, 3, 3)
    assert isinstance(local_passes(_registry.load("cpu"), x, 4.0), CpuLocalPasses)
    assert isinstance(local_passes(_registry.load("reference"), x, 4.0), ReferenceLocalPasses)


def test_fused_local_pass_ops_reject_mismatched_state_in_one_line():
    if "cpu" not in _cpu_backends():
        pytest.skip("the cpu backend is not built here")
    s, _ = torch.ops.fastexplain.filter_loss_local_logits(torch.rand(2, 3, 4, 4), torch.zeros(3, 16), 4.0)
    with pytest.raises(ValueError, match="shift must be a contiguous CPU Float tensor of shape") as error:
        torch.ops.fastexplain.filter_loss_local_expm1_sums(s, torch.zeros(3, 16))
    assert "\n" not in str(error.value).strip()
    with pytest.raises(ValueError, match="mean_maps must be"):
        torch.ops.fastexplain.filter_loss_local_logits(torch.rand(2, 3, 4, 4), torch.zeros(3, 15), 4.0)
