"""The `fastexplain fit` and `fastexplain explain` subcommands (docs/cli.md).

``fit`` exposes the options users tune as flags and any :class:`~fastexplain.nn.ExplainerConfig` /
:class:`~fastexplain.train.TrainConfig` field through ``--config FILE.json``. Defaults are never written
here: the help text reads them from the dataclasses, and an option that is not given is not passed, so the
library's defaults apply. Precedence: flag > ``--config`` file > library default.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, Callable

# flag → (config class name, field, type, help); the class name is "explainer" or "train"
_TUNING_FLAGS: tuple[tuple[str, str, str, Callable[[str], Any], str], ...] = (
    ("--filter-weight", "explainer", "filter_weight", float, "λ, weight of the filter-loss term"),
    ("--kl-weight", "explainer", "kl_weight", float, "γ, weight of KL(performer ‖ head(x̂))"),
    ("--p-weight", "explainer", "p_weight", float, "η, weight of −log p"),
    ("--diversity-weight", "explainer", "diversity_weight", float, "w, weight of the filters' map-similarity penalty"),
    ("--constellation-weight", "explainer", "constellation_weight", float,
     "ρ, weight of the part filters' constellation spread"),
    ("--crowding-weight", "explainer", "crowding_weight", float, "κ, weight of the part filters' peak crowding"),
    ("--part-lr-scale", "train", "part_lr_scale", float, "learning-rate multiplier of the part filters (at 64 channels)"),
    ("--parts", "explainer", "parts", int, "M, part filters per track (None: min(channels, 256))"),
    ("--gate", "explainer", "gate", str, "p: one learned scalar or a per-image gate"),
    ("--epochs", "train", "epochs", int, "joint training epochs"),
    ("--refine-epochs", "train", "refine_epochs", int,
     "extra epochs that train only the ordinary track and decoder"),
    ("--average-decay", "train", "average_decay", float,
     "store the moving average of the refinement's weights with this decay per step (0: the last weights)"),
    ("--batch-size", "train", "batch_size", int, "global batch size"),
    ("--lr", "train", "lr", float, "learning rate"),
    ("--seed", "train", "seed", int, "seed of the initialisation and data order"),
    ("--num-workers", "train", "num_workers", int, "DataLoader worker processes"),
    ("--device", "train", "device", str, "cpu or cuda (None: cuda when available)"),
)


def _config_classes() -> dict[str, type]:
    from .nn.explainer import ExplainerConfig
    from .train import TrainConfig

    return {"explainer": ExplainerConfig, "train": TrainConfig}


def library_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls`` (None when it has none)."""
    for field in dataclasses.fields(cls):
        if field.name == name:
            if field.default is not dataclasses.MISSING:
                return field.default
            if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return field.default_factory()  # type: ignore[misc]
            return None
    raise KeyError(name)


def _field_names(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)]


def add_tuning_flags(parser: argparse.ArgumentParser) -> None:
    """The tuning flags of ``fit``; their help shows the library's defaults, their parsed default is None."""
    classes = _config_classes()
    group = parser.add_argument_group("training options (default: the library's, shown in brackets)")
    for flag, kind, name, kind_type, text in _TUNING_FLAGS:
        if name not in _field_names(classes[kind]):
            continue  # the library dropped this option
        extra: dict[str, Any] = {}
        if name == "gate":
            from .nn.explainer import GATES

            extra["choices"] = list(GATES)
        default = library_default(classes[kind], name)
        group.add_argument(flag, dest=name, type=kind_type, default=None,
                           help=f"{text} [{default}]".replace("%", "%%"), **extra)
    if "autocast" in _field_names(classes["train"]):
        group.add_argument("--autocast", choices=["bf16"], default=None,
                           help=f"mixed precision [{library_default(classes['train'], 'autocast')}: float32]")
    group.add_argument("--config", default=None, metavar="FILE.json",
                       help="JSON object of any ExplainerConfig / TrainConfig field, flat or as "
                            "{\"explainer\": {...}, \"train\": {...}}; flags override it")


def _unknown_option(key: str, source: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"valid options: {', '.join(valid)}"
    return ValueError(f"unknown option {key!r} in {source}; {hint}")


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(explainer options, train options) from a JSON file; a bad file or an unknown key is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config file {str(path)!r} does not exist; pass a JSON file of options")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--config file {str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config file {str(path)!r} must hold a JSON object of options, got a "
                         f"{type(values).__name__}")
    classes = _config_classes()
    names = {kind: _field_names(cls) for kind, cls in classes.items()}
    found: dict[str, dict[str, Any]] = {"explainer": {}, "train": {}}
    for key, value in values.items():
        if key in classes and isinstance(value, dict):  # nested section
            for inner, inner_value in value.items():
                if inner not in names[key]:
                    raise _unknown_option(inner, f"the {key!r} section of {str(path)!r}", names[key])
                found[key][inner] = inner_value
            continue
        owners = [kind for kind in classes if key in names[kind]]
        if len(owners) > 1:
            raise ValueError(f"option {key!r} in {str(path)!r} exists in both ExplainerConfig and TrainConfig; "
                             f"put it in an \"explainer\" or \"train\" section")
        if not owners:
            raise _unknown_option(key, str(path), names["explainer"] + names["train"])
        found[owners[0]][key] = value
    return found["explainer"], found["train"]


def fit_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(explainer options, train options) from ``--config`` and the flags that were given (flags win)."""
    explainer_options, train_options = read_config_file(args.config) if args.config else ({}, {})
    for _, kind, name, _, _ in _TUNING_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            (explainer_options if kind == "explainer" else train_options)[name] = value
    if getattr(args, "autocast", None) is not None:
        train_options["autocast"] = args.autocast
    return explainer_options, train_options


def run_fit(args: argparse.Namespace) -> int:
    from .data import open_dataset
    from .parallel import is_main_process
    from .performer import Performer
    from .train import TrainConfig, fit

    explainer_options, train_options = fit_options(args)
    try:
        config = TrainConfig(**train_options)
    except TypeError as error:  # a wrong type in the config file
        raise ValueError(f"bad training option: {error}") from None
    performer = Performer.from_torchvision(args.model, args.layer, args.target_layer, weights=args.weights,
                                           num_classes=args.num_classes)
    dataset = open_dataset(args.data, args.image_size)
    history = fit(performer, dataset, args.out, config, explainer_options or None, resume=args.resume,
                  progress=not args.quiet, extra={"data": args.data})
    if history and is_main_process():  # under torchrun: rank 0 reports
        last = history[-1]
        print(f"trained {last['epoch']} epochs: reconstruction {last['reconstruction']:.4f}, "
              f"filter {last['filter']:.4f}, p {last['p']:.3f}; checkpoint {args.out}/checkpoint.pt")
    return 0


def run_explain(args: argparse.Namespace) -> int:
    from .visualize import explain_images

    for path in explain_images(args.checkpoint, args.images, args.out, top=args.top, device=args.device,
                               steps=args.steps, columns=args.columns):
        print(path)
    return 0


def add_fit_and_explain(commands: argparse._SubParsersAction,
                        one_line_errors: Callable[[str], Callable]) -> None:
    """The `fit` and `explain` subcommands; ``one_line_errors(name)`` wraps a runner (cli.py)."""
    fit = commands.add_parser("fit", help="train an explainer on a torchvision performer (no labels needed)",
                              description="Train an explainer on a frozen torchvision performer (docs/cli.md).")
    fit.add_argument("--model", required=True, help="torchvision classification model, e.g. vgg16, resnet18")
    fit.add_argument("--layer", required=True,
                     help="dotted named_modules path of the explained layer, e.g. features.29")
    fit.add_argument("--target-layer", default=None, help="layer to reconstruct (default: --layer)")
    fit.add_argument("--weights", default=None, help="local state_dict file for the model (default: random init)")
    fit.add_argument("--num-classes", type=int, default=None,
                     help="classifier width of the model (default: read from --weights; 1000 without weights)")
    fit.add_argument("--data", required=True, help="image folder (labels ignored) or a dataset name such as partworld")
    fit.add_argument("--image-size", type=int, default=224, help="images are resized/cropped to N×N (default 224)")
    fit.add_argument("--out", required=True, help="output directory; OUT/checkpoint.pt is written every epoch")
    fit.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tuning_flags(fit)
    fit.set_defaults(run=one_line_errors("fit")(run_fit))
    explain = commands.add_parser(
        "explain", help="per image: the part maps and which part filters the prediction relied on (PNG + JSON)",
        description="For each image write OUT/IMAGE_parts.png (the input and the part maps of the filters that "
                    "contributed most to the performer's predicted class, labelled) and OUT/IMAGE.json (the class, "
                    "every filter's contribution by integrated gradients, the ordinary track's share, the "
                    "completeness residual). See docs/cli.md.")
    explain.add_argument("checkpoint", help="checkpoint.pt written by `fastexplain fit`")
    explain.add_argument("images", nargs="+", help="image files")
    explain.add_argument("--out", required=True, help="output directory for IMAGE_parts.png and IMAGE.json")
    explain.add_argument("--top", type=int, default=15,
                         help="how many part filters to draw: the largest contributions (default 15)")
    explain.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (default 32)")
    explain.add_argument("--columns", type=int, default=5, help="map tiles per row (default 5)")
    explain.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    explain.set_defaults(run=one_line_errors("explain")(run_explain))
