"""fastexplain imported after ``init_process_group`` pins the default group (fastexplain/_import_guard.py).

Each case runs in a fresh interpreter with a one-rank gloo group: importing fastexplain after the group
exists must warn, and the group's gloo threads then outlive ``destroy_process_group()`` (the cause of
the SIGABRT at exit seen in CI); imported before, no warning and the threads end with the group.
Errors must not pin it either: an exception object kept past its call (the backend registry's cached
"unavailable" error, a rank's error carried into the autograd function) holds the caller's frames, and with
them the group.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, socket, sys, warnings
import torch
import torch.distributed as dist

def import_fastexplain():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastexplain
    return fastexplain, any("before init_process_group" in str(w.message) for w in caught)

if sys.argv[1] in ("before", "errors"):
    fastexplain, warned = import_fastexplain()
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
threads_before = len(os.listdir("/proc/self/task"))
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
if sys.argv[1] == "after":
    fastexplain, warned = import_fastexplain()
x = torch.rand(4, 3, 5, 5, requires_grad=True)
fastexplain.filter_loss(x, process_group=dist.group.WORLD).backward()

def failures(group):
    from fastexplain.ops import _registry
    for bad in (-torch.ones(2, 2, 3, 3), torch.ones(0, 2, 3, 3)):
        try:
            fastexplain.filter_loss(bad, process_group=group)
        except ValueError:
            pass
    _registry._MODULES["missing"] = "fastexplain.no_such_module"  # a backend whose first load fails
    try:
        _registry.load("missing")
    except _registry.BackendUnavailable:
        pass

if sys.argv[1] == "errors":
    failures(dist.group.WORLD)
dist.destroy_process_group()
print(warned, len(os.listdir("/proc/self/task")) - threads_before)
"""


def _run(order: str) -> tuple[bool, int]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, order], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    warned, extra_threads = done.stdout.split()
    return warned == "True", int(extra_threads)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")
def test_import_after_the_group_warns_and_pins_it_import_before_does_not() -> None:
    warned, pinned_threads = _run("after")
    assert warned, "importing fastexplain after init_process_group must warn"
    assert pinned_threads >= 2, "PyTorch no longer pins the group; _import_guard's warning may be obsolete"
    warned, extra_threads = _run("before")
    assert not warned
    assert extra_threads < pinned_threads, (extra_threads, pinned_threads)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")
def test_errors_do_not_pin_the_group() -> None:
    _, pinned_threads = _run("after")
    warned, extra_threads = _run("errors")
    assert not warned
    assert extra_threads < pinned_threads, (extra_threads, pinned_threads)
