"""The `fastexplain` command: parses arguments and calls the library, nothing more."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Sequence


def _info(args: argparse.Namespace) -> int:
    import torch

    import fastexplain
    from fastexplain.ops import availability

    print(f"fastexplain {fastexplain.__version__}")
    print(f"python      {platform.python_version()}")
    print(f"torch       {torch.__version__} (CUDA available: {torch.cuda.is_available()})")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device      {device}")
    print("backends:")
    for name, reason in availability().items():
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    from fastexplain.ops import selected_backend

    print(f"automatic choice for CPU tensors: {selected_backend(torch.zeros(1, 1, 1, 1))}")
    return 0


def _one_line_errors(command: str):
    """Report the library's user errors (bad names, paths, checkpoints) as one line on stderr, exit code 2."""
    import functools

    def wrap(run):
        @functools.wraps(run)
        def guarded(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except (ValueError, FileNotFoundError, FileExistsError, TypeError) as error:
                print(f"fastexplain {command}: error: {error}", file=sys.stderr)
                return 2
        return guarded
    return wrap


@_one_line_errors("fit")
def _fit(args: argparse.Namespace) -> int:
    from fastexplain.data import open_dataset
    from fastexplain.performer import Performer
    from fastexplain.train import TrainConfig, fit

    performer = Performer.from_torchvision(args.model, args.layer, args.target_layer, weights=args.weights,
                                           num_classes=args.num_classes)
    dataset = open_dataset(args.data, args.image_size)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         autocast=args.autocast, device=args.device)
    history = fit(performer, dataset, args.out, config, resume=args.resume, progress=not args.quiet,
                  extra={"data": args.data})
    from fastexplain.parallel import is_main_process

    if history and is_main_process():  # under torchrun: rank 0 reports
        last = history[-1]
        print(f"trained {last['epoch']} epochs: reconstruction {last['reconstruction']:.4f}, "
              f"filter {last['filter']:.4f}, p {last['p']:.3f}; checkpoint {args.out}/checkpoint.pt")
    return 0


@_one_line_errors("explain")
def _explain(args: argparse.Namespace) -> int:
    from fastexplain.visualize import explain_images

    for path in explain_images(args.checkpoint, args.images, args.out, top=args.top, device=args.device):
        print(path)
    return 0


def _add_fit_and_explain(commands: argparse._SubParsersAction) -> None:
    """The `fit` and `explain` subcommands (issue 6)."""
    fit = commands.add_parser("fit", help="train an explainer on a torchvision performer (no labels needed)")
    fit.add_argument("--model", required=True, help="torchvision classification model, e.g. vgg16, resnet18")
    fit.add_argument("--layer", required=True, help="dotted named_modules path of the explained layer, e.g. features.29")
    fit.add_argument("--target-layer", default=None, help="layer to reconstruct (default: --layer)")
    fit.add_argument("--weights", default=None, help="local state_dict file for the model (default: random init)")
    fit.add_argument("--num-classes", type=int, default=1000, help="classifier width of the model (default 1000)")
    fit.add_argument("--data", required=True, help="image folder (labels ignored) or a dataset name such as partworld")
    fit.add_argument("--image-size", type=int, default=224, help="images are resized/cropped to N×N (default 224)")
    fit.add_argument("--batch-size", type=int, default=32)
    fit.add_argument("--epochs", type=int, default=20)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--autocast", choices=["bf16"], default=None, help="mixed precision (default: float32)")
    fit.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    fit.add_argument("--out", required=True, help="output directory; OUT/checkpoint.pt is written every epoch")
    fit.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(run=_fit)
    explain = commands.add_parser("explain", help="write the part maps of a trained explainer over images (PNG)")
    explain.add_argument("checkpoint", help="checkpoint.pt written by `fastexplain fit`")
    explain.add_argument("images", nargs="+", help="image files")
    explain.add_argument("--out", required=True, help="output directory for IMAGE_parts.png files")
    explain.add_argument("--top", type=int, default=15, help="how many of the most active part filters to show")
    explain.add_argument("--device", default=None)
    explain.set_defaults(run=_explain)


def _demo(args: argparse.Namespace) -> int:
    from fastexplain.demo import run_demo

    metrics = run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    performer, explainer = metrics["performer"], metrics["explainer"]
    print(f"performer filters: location instability {performer['location_instability']:.4f}, "
          f"part interpretability {performer['part_interpretability']:.4f}")
    print(f"explainer filters: location instability {explainer['location_instability']:.4f}, "
          f"part interpretability {explainer['part_interpretability']:.4f}, p {explainer['p']:.3f}, "
          f"reconstruction error {explainer['reconstruction_error']:.4f}, agreement {explainer['agreement']:.4f}")
    for row in metrics["targets"]:
        print(f"  {row['name']:<28} {row['value']:.4f} (target {row['target']}): {'pass' if row['passed'] else 'FAIL'}")
    print(f"report: {args.out}/report.html  metrics: {args.out}/metrics.json")
    return 0


def _add_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="part world → performer → explainer → metrics → report.html")
    demo.add_argument("--out", default="fastexplain-demo", help="output directory (default: fastexplain-demo)")
    demo.add_argument("--quick", action="store_true", help="tiny run (about 2 minutes on 2 cores), a smoke test")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_one_line_errors("demo")(_demo))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastexplain", description="Explainer networks for CNNs, fast.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="versions, device and the available kernel backends")
    info.set_defaults(run=_info)
    _add_fit_and_explain(commands)
    _add_demo(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
