"""Training checkpoints: written atomically, read with one-line errors (issue 6).

A checkpoint is a ``torch.save`` of a plain dict (loadable with ``weights_only=True``)::

    format="fastexplain-checkpoint", version, explainer_config, train_config, performer (spec or None),
    explainer (state_dict), optimizer, scheduler, epoch (epochs completed), history, rng (torch state)

It is written to a temporary file in the same directory, flushed to disk and renamed over the old one
(``os.replace`` is atomic on POSIX and Windows), so a crash mid-write never leaves a truncated checkpoint.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .nn.explainer import Explainer, ExplainerConfig

FORMAT = "fastexplain-checkpoint"
VERSION = 1
_REQUIRED = ("explainer_config", "train_config", "explainer", "optimizer", "epoch", "history", "rng")
# ExplainerConfig fields added after version 1 was fixed, with the value that reproduces a checkpoint written
# before them (the term switched off, the start it had), so that such a checkpoint keeps its objective on resume
# instead of taking today's defaults.
_FIELDS_ADDED_LATER: dict[str, Any] = {"diversity_weight": 0.0, "part_groups": 1, "part_init": "random",
                                       "decoder_width": None, "constellation_weight": 0.0, "crowding_weight": 0.0,
                                       "autoencoder_init": "random"}


class CheckpointError(ValueError):
    """A file that is missing, truncated, corrupt or not a fastexplain checkpoint."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format and version) to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path``; raises FileNotFoundError or :class:`CheckpointError` (one line)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}; pass the checkpoint.pt written by `fastexplain fit`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure here means "unreadable file"
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint (truncated or corrupt: "
                              f"{type(error).__name__}); re-run training or pick another file") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a fastexplain checkpoint (it was written by something "
                              f"else); pass a checkpoint.pt written by `fastexplain fit`")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} is a version {state.get('version')!r} checkpoint; this "
                              f"fastexplain reads version {VERSION}")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{str(path)!r} is an incomplete checkpoint (missing {missing})")
    return state


def explainer_from_state(state: dict[str, Any]) -> Explainer:
    """Rebuild the trained explainer (in eval mode) from a loaded checkpoint dict."""
    try:
        explainer = Explainer(ExplainerConfig.from_dict({**_FIELDS_ADDED_LATER, **state["explainer_config"]}))
        explainer.load_state_dict(state["explainer"])
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"the checkpoint's explainer weights do not match its config: {first_line}") from None
    return explainer.eval()


def load_explainer(path: str | Path) -> Explainer:
    """The trained :class:`Explainer` stored in a checkpoint (its config is ``explainer.config``)."""
    return explainer_from_state(load_checkpoint(path))
