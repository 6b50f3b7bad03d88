"""Data-parallel training plumbing for :func:`fastexplain.fit` under ``torchrun`` (issue 8, part 2).

``fit`` calls :func:`setup` once: when ``torch.distributed`` is already initialised it trains over the
default (WORLD) group as it is; otherwise, when the launcher's environment says there are several
processes (``WORLD_SIZE`` > 1, with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` as set by
``torchrun``), it initialises the default group itself — NCCL for CUDA, gloo for CPU — with a timeout
(``FASTEXPLAIN_DIST_TIMEOUT`` seconds, default 300) that bounds how long a rank waits for a dead or
stalled one, and destroys it when ``fit`` ends. One process alone changes nothing.

Exact global batches: the global batch (``TrainConfig.batch_size``) is cut into R contiguous slices of
the same global permutation (:func:`rank_batches`), so R processes see exactly the global batches one
process would (unlike ``DistributedSampler``, which strides and pads). Batch statistics are made global by
the layers themselves, through the ``process_group`` attribute that ``fit`` sets on the explainer.
"""
from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

if dist.is_available():  # before setup() makes a group, else importing it later pins the group (see _import_guard)
    import torch.distributed.nn  # noqa: F401

__all__ = ["ParallelContext", "setup", "teardown", "is_main_process", "rank_batches", "check_global_batch", "sum_over_ranks",
           "differentiable_sum", "ddp_options", "broadcast_module", "run_on_rank0", "collective_failure"]

TIMEOUT_ENV = "FASTEXPLAIN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
Result = TypeVar("Result")


@dataclass
class ParallelContext:
    """Where this process stands: rank r of R (R = 1 and group None for a plain single-process run)."""

    group: Any = None            #: the process group to train over (None: single process)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False     #: True when setup() initialised the default group (teardown destroys it)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; unset it or launch with "
                         f"torchrun") from None


def _timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        timeout = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise ValueError(f"environment variable {TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return timeout


def _device_for(device_request: str | None, local_rank: int, distributed: bool) -> torch.device:
    device = torch.device(device_request or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and distributed:
        if device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per process: the launcher's LOCAL_RANK
        torch.cuda.set_device(device)
    return device


def setup(device_request: str | None) -> tuple[ParallelContext, torch.device]:
    """The parallel context and this process's device; initialises the default group under torchrun."""
    if dist.is_available() and dist.is_initialized():
        context = ParallelContext(group=dist.group.WORLD, rank=dist.get_rank(), world_size=dist.get_world_size(),
                                  local_rank=_env_int("LOCAL_RANK", 0))
        if context.world_size == 1:
            context.group = None
        return context, _device_for(device_request, context.local_rank, context.world_size > 1)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return ParallelContext(), _device_for(device_request, 0, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run one process")
    rank, local_rank, timeout = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _timeout_s()
    device = _device_for(device_request, local_rank, True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    init_options: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    context = ParallelContext(group=None, rank=rank, world_size=world_size, local_rank=local_rank,
                              owns_group=True, timeout_s=timeout)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout), **init_options)
    except RuntimeError as error:  # DistStoreError / DistNetworkError: a rank never arrived
        raise collective_failure(context, error, "could not join the process group") from error
    context.group = dist.group.WORLD
    return context, device


def is_main_process() -> bool:
    """True unless this is a rank > 0 of a torchrun launch or of an initialised group (for printing)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def teardown(context: ParallelContext) -> None:
    """Destroy the default group if :func:`setup` created it (errors on a broken group are ignored)."""
    if context.owns_group and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):  # the group may already be broken by a dead rank
            pass


def rank_batches(order: list[int], batch_size: int, rank: int, world_size: int) -> tuple[list[list[int]], list[int]]:
    """This rank's slice of every global batch of ``order`` and the global batch sizes.

    Global batch k is ``order[k·batch_size : (k+1)·batch_size]``; rank r gets its r-th contiguous slice
    (the first ``size % R`` ranks one image more). A final global batch with fewer images than ranks is
    dropped (a rank with no image cannot take part in DDP's step).
    """
    slices, sizes = [], []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        if len(batch) < world_size:
            break
        share, extra = divmod(len(batch), world_size)
        begin = rank * share + min(rank, extra)
        slices.append(batch[begin:begin + share + (1 if rank < extra else 0)])
        sizes.append(len(batch))
    return slices, sizes


def check_global_batch(dataset_size: int, batch_size: int, world_size: int) -> None:
    """Every rank needs at least one image of every global batch: a clear error when that cannot be."""
    if batch_size < world_size:
        raise ValueError(f"fit: batch_size {batch_size} is the global batch, split over {world_size} processes; "
                         f"use a batch size of at least {world_size} (or fewer processes)")
    if dataset_size < world_size:
        raise ValueError(f"fit: the dataset has {dataset_size} images, fewer than the {world_size} processes; "
                         f"use more images or fewer processes")


def sum_over_ranks(tensor: Tensor, group: Any) -> Tensor:
    """Σ over the ranks of ``group`` of a statistic (no gradient); ``tensor`` itself when group is None."""
    if group is None:
        return tensor
    summed = tensor.detach().clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return summed


class _SumOverRanks(torch.autograd.Function):
    """y = Σ_r x_r on every rank; backward: ∂/∂x_r = Σ_r' ∂L_r'/∂y (an all-reduce of the gradients)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        summed = tensor.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        return summed

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        summed = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        return summed, None


def differentiable_sum(tensor: Tensor, group: Any) -> Tensor:
    """Σ over ranks with a gradient (the semantics of ``torch.distributed.nn.functional.all_reduce``,
    deprecated upstream): every rank computes the same loss from the sum, and backward sums the upstream
    gradients over ranks, so each rank's tensor receives R × ∂L/∂x_r — which DDP's gradient averaging
    turns into exactly ∂L/∂x_r (the ``ddp_gradients`` convention of ``fastexplain.filter_loss``)."""
    return tensor if group is None else _SumOverRanks.apply(tensor, group)


def ddp_options() -> dict[str, Any]:
    """DistributedDataParallel keywords: no buffer broadcast at each forward (the explainer's buffers are
    updated from global statistics, hence equal on every rank), in the spelling of this torch version."""
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def broadcast_module(module: torch.nn.Module, context: ParallelContext) -> None:
    """Give every rank rank 0's parameters and buffers of ``module`` (in place; nothing without a group)."""
    if context.group is None:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0, group=context.group)


def run_on_rank0(context: ParallelContext, work: Callable[[], Result]) -> Result:
    """``work()`` on rank 0 only; its result — or its exception — reaches every rank (so all raise alike)."""
    if context.group is None:
        return work()
    payload: list[Any] = [None]
    if context.is_main:
        try:
            payload[0] = ("ok", work())
        except (ValueError, FileNotFoundError, FileExistsError, TypeError, OSError) as error:
            payload[0] = ("error", error)
    dist.broadcast_object_list(payload, src=0, group=context.group)
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


def collective_failure(context: ParallelContext, error: BaseException,
                       what: str = "stopped: a collective with the other ranks failed") -> RuntimeError:
    """A one-line error for a collective (or the group's rendezvous) that failed because another rank died
    or stalled."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return RuntimeError(f"fit: rank {context.rank} of {context.world_size} {what} (another rank died, raised or "
                        f"stalled for more than the {context.timeout_s:g} s process-group timeout, {TIMEOUT_ENV}); "
                        f"see the other ranks' errors. Cause: {first_line}")
