"""`fit` over 2 gloo processes follows the single-process run on the same global batches (issue 8, part 2).

Two processes are started once for the module (spawn, a free port per phase, every wait bounded). Each
calls ``fit`` with the torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so
``fit`` initialises and destroys the gloo group itself, exactly as under ``torchrun``. The phases:

1. 1 epoch, then a resume to 2 epochs (a new group each time): the checkpoint written by rank 0 must
   match a straight 2-epoch single-process run in this process (same weights to float32 rounding). In the
   first epoch rank 1 holds a different performer, which ``fit`` replaces by rank 0's.
2. rank 1 stalls (sleeps) in the middle of an epoch: rank 0 must raise the one-line error once the
   process-group timeout (FASTEXPLAIN_DIST_TIMEOUT, a few seconds here) has passed, not wait for it.
3. rank 1 dies (``os._exit``) in the middle of an epoch: rank 0 must raise the one-line "another rank
   died" error quickly instead of hanging.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fastexplain import Performer, TrainConfig, fit
from fastexplain.checkpoint import load_checkpoint
from fastexplain.parallel import check_global_batch, rank_batches

WORLD_SIZE = 2
IMAGES, IMAGE_SIZE = 13, 12
# 13 images in global batches of 5 → 5, 5, 3: uneven slices (3 + 2, 3 + 2, 2 + 1) on 2 ranks
CONFIG = dict(batch_size=5, lr=5e-3, seed=4, refine_epochs=0)  # staged resumes: no refinement
EXPLAINER = {"parts": 4, "gate": "image"}  # the per-image gate: −log p and p are batch means too
# Bounds reached only when something is broken: a loaded 2-core machine can take tens of seconds to start
# the workers; the process-group timeout bounds the dead-rank phase if gloo does not notice the dead peer.
JOIN_TIMEOUT_S = 240.0
GROUP_TIMEOUT_S = 60
STALL_TIMEOUT_S, STALL_S = 3, 10  # the stalled-rank phase: group timeout, and how long rank 1 sleeps


def _performer(seed: int = 0) -> Performer:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))
    return Performer(net, "4")  # the Sequential head: the KL term is on


def _images() -> torch.Tensor:
    return torch.rand(IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


class _FailingImages(Dataset):
    """The images, but after reading ``survive`` of them rank 1's process exits abruptly (``stall_s`` None)
    or sleeps ``stall_s`` seconds once."""

    def __init__(self, images: torch.Tensor, survive: int, stall_s: float | None = None) -> None:
        self.images, self.survive, self.stall_s, self.reads = images, survive, stall_s, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads += 1
        if os.environ.get("RANK") == "1" and self.reads == self.survive + 1:
            if self.stall_s is None:
                os._exit(3)  # no exception, no cleanup: like a killed process
            time.sleep(self.stall_s)
        return self.images[index]


def _failing_fit(directory: str, dataset: Dataset) -> tuple[str, float]:
    """(the error message or "no error raised", seconds) of a 1-epoch fit on a failing data set."""
    started = time.monotonic()
    try:
        fit(_performer(), dataset, Path(directory), TrainConfig(epochs=1, **CONFIG), EXPLAINER, progress=False)
        message = "no error raised"
    except RuntimeError as error:
        message = str(error)
    return message, time.monotonic() - started


def _launch_env(rank: int, port: int, timeout_s: float = GROUP_TIMEOUT_S) -> None:
    os.environ.update(WORLD_SIZE=str(WORLD_SIZE), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), FASTEXPLAIN_DIST_TIMEOUT=str(timeout_s))


def _worker(rank: int, ports: list[int], directory: str) -> None:
    torch.set_num_threads(1)
    results: dict = {}
    report = Path(directory) / f"rank{rank}.json"
    try:
        _launch_env(rank, ports[0])
        # rank 1 builds a different (randomly initialised) performer: fit must use rank 0's on every rank
        fit(_performer(seed=rank), _images(), Path(directory) / "dist", TrainConfig(epochs=1, **CONFIG), EXPLAINER,
            progress=False)
        _launch_env(rank, ports[1])
        results["history"] = fit(_performer(), _images(), Path(directory) / "dist", TrainConfig(epochs=2, **CONFIG),
                                 EXPLAINER, resume=True, progress=False)
        report.write_text(json.dumps(results))  # in case a later phase goes wrong
        _launch_env(rank, ports[2], timeout_s=STALL_TIMEOUT_S)
        results["stalled_rank"] = _failing_fit(str(Path(directory) / "stalling"),
                                               _FailingImages(_images(), survive=4, stall_s=STALL_S))
        report.write_text(json.dumps(results))  # rank 1 dies in the next phase
        _launch_env(rank, ports[3])
        results["dead_rank"] = _failing_fit(str(Path(directory) / "dying"), _FailingImages(_images(), survive=4))
    except BaseException:  # noqa: BLE001 - reported to the test process
        results["crash"] = traceback.format_exc()
    report.write_text(json.dumps(results))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """(working directory, [rank 0's results, rank 1's results]) of one 2-process run."""
    directory = tmp_path_factory.mktemp("distributed_fit")
    spawn = multiprocessing.get_context("spawn")
    ports = _free_ports(4)
    processes = [spawn.Process(target=_worker, args=(rank, ports, str(directory)), daemon=True)
                 for rank in range(WORLD_SIZE)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 0.1))
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        assert not hung, f"ranks {hung} did not finish within {JOIN_TIMEOUT_S:.0f} s (a hang)"
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    results = []
    for rank in range(WORLD_SIZE):
        path = directory / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.is_file() else {})
    for rank, result in enumerate(results):
        assert "crash" not in result, f"rank {rank} crashed:\n{result['crash']}"
    assert processes[1].exitcode == 3, "rank 1 should have died (exit code 3) in the last phase"
    return directory, results


def test_two_processes_match_one_process_on_the_same_global_batches(outcome, tmp_path: Path) -> None:
    directory, (rank0, rank1) = outcome
    single = fit(_performer(), _images(), tmp_path, TrainConfig(epochs=2, **CONFIG), EXPLAINER, progress=False)
    expected = load_checkpoint(tmp_path / "checkpoint.pt")
    actual = load_checkpoint(directory / "dist" / "checkpoint.pt")
    assert actual["epoch"] == 2 and actual["explainer"].keys() == expected["explainer"].keys()
    assert torch.equal(actual["explainer"]["scale_count"], expected["explainer"]["scale_count"])
    for key, value in expected["explainer"].items():
        torch.testing.assert_close(actual["explainer"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # the parameters moved: equality is not that of two untouched initialisations
    assert not torch.allclose(expected["explainer"]["decoder2.weight"], _initial_decoder_weight(), atol=1e-3)
    for history in (rank0["history"], rank1["history"], actual["history"]):
        assert [entry["epoch"] for entry in history] == [1, 2]
        for got, want in zip(history, single):
            for name in ("total", "reconstruction", "kl", "filter", "neg_log_p", "p"):
                assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name


def _initial_decoder_weight() -> torch.Tensor:
    from fastexplain.nn import Explainer
    from fastexplain.train import make_explainer_config

    torch.manual_seed(CONFIG["seed"])
    return Explainer(make_explainer_config(_performer(), (IMAGE_SIZE, IMAGE_SIZE), EXPLAINER)).state_dict()[
        "decoder2.weight"]


def test_a_dead_rank_makes_the_others_fail_with_a_clear_error(outcome) -> None:
    _, (rank0, _) = outcome
    message, seconds = rank0["dead_rank"]
    assert "fit: rank 0 of 2 stopped: a collective with the other ranks failed" in message
    assert "another rank died" in message and len(message.splitlines()) == 1
    assert seconds < GROUP_TIMEOUT_S  # gloo sees the closed connection at once; the timeout bounds it anyway


def test_a_stalled_rank_makes_the_others_fail_after_the_group_timeout(outcome) -> None:
    _, (rank0, rank1) = outcome
    message, seconds = rank0["stalled_rank"]
    # normally "stopped: a collective ... failed"; "could not join the process group" if on a loaded machine
    # rank 1 arrived more than the short timeout late: the same bounded wait, the same one-line error
    assert message.startswith("fit: rank 0 of 2 ") and len(message.splitlines()) == 1
    assert f"stalled for more than the {STALL_TIMEOUT_S} s process-group timeout" in message
    assert seconds < STALL_S  # rank 0 gave up before rank 1 woke up
    assert rank1["stalled_rank"][0] != "no error raised"  # and rank 1 then found rank 0 gone


def test_rank_batches_are_contiguous_slices_of_the_global_batches() -> None:
    order = list(range(100, 113))
    slices = [rank_batches(order, 5, rank, 2) for rank in range(2)]
    assert slices[0] == ([[100, 101, 102], [105, 106, 107], [110, 111]], [5, 5, 3])
    assert slices[1] == ([[103, 104], [108, 109], [112]], [5, 5, 3])
    # a last global batch with fewer images than ranks is dropped on every rank
    assert rank_batches(order, 6, 0, 2) == ([[100, 101, 102], [106, 107, 108]], [6, 6])
    assert rank_batches(order, 6, 0, 1) == ([order[:6], order[6:12], order[12:]], [6, 6, 1])


def test_a_global_batch_or_data_set_smaller_than_the_process_count_is_a_clear_error() -> None:
    check_global_batch(dataset_size=13, batch_size=2, world_size=2)
    check_global_batch(dataset_size=1, batch_size=1, world_size=1)
    with pytest.raises(ValueError, match="use a batch size of at least 4"):
        check_global_batch(dataset_size=13, batch_size=3, world_size=4)
    with pytest.raises(ValueError, match="the dataset has 3 images, fewer than the 4 processes"):
        check_global_batch(dataset_size=3, batch_size=8, world_size=4)


def test_the_cli_under_torchrun_trains_and_reports_once(tmp_path: Path) -> None:
    """`torchrun --standalone --nproc_per_node 2 -m fastexplain.cli fit ...`: the real launcher, gloo on CPU."""
    import signal
    import subprocess
    import sys

    from PIL import Image

    for index in range(5):
        pixels = torch.randint(0, 256, (36, 40, 3), generator=torch.Generator().manual_seed(index), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / f"img{index}.png")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
               "-m", "fastexplain.cli", "fit", "--model", "resnet18", "--layer", "layer3", "--num-classes", "4",
               "--data", str(tmp_path), "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--refine-epochs", "0", "--device", "cpu",
               "--out", str(tmp_path / "run")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "FASTEXPLAIN_DIST_TIMEOUT": str(GROUP_TIMEOUT_S)}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                                start_new_session=True)  # its own process group: killed as a whole on a hang
    try:
        stdout, stderr = launcher.communicate(timeout=JOIN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail(f"torchrun did not finish within {JOIN_TIMEOUT_S:.0f} s (a hang)")
    assert launcher.returncode == 0, stderr[-3000:]
    # rank 0 logs and reports, rank 1 is silent
    assert stdout.count("trained 1 epochs") == 1 and stdout.count("epoch 1/1: loss") == 1, stdout
    assert stderr.count("the last global batch of each epoch (1 images) is dropped") == 1, stderr[-3000:]
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 1 and state["history"][0]["epoch"] == 1
