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


def _add_fit_and_explain(commands: argparse._SubParsersAction) -> None:
    """The `fit` and `explain` subcommands (issue 6, issue 13; code in fastexplain/cli_fit.py)."""
    from fastexplain.cli_fit import add_fit_and_explain

    add_fit_and_explain(commands, _one_line_errors)


def _print_metrics(metrics: dict, out: str) -> None:
    """The metric table, the targets and what was not measured, as printed by `demo` and `evaluate`."""
    import math

    keys = ("location_instability", "part_interpretability", "colocation", "colocation_groups", "parts_covered",
            "p", "reconstruction_error", "agreement", "accuracy")
    for name in ("performer", "explainer"):
        values = metrics[name]
        shown = ", ".join(f"{key.replace('_', ' ')} {values[key]:.4g}" for key in keys
                          if isinstance(values.get(key), (int, float)) and math.isfinite(values[key]))
        print(f"{name} filters: {shown}")
    for row in metrics["targets"]:
        verdict = {True: "pass", False: "FAIL"}.get(row["passed"], "not measured")
        print(f"  {row['name']:<28} {row['value']:.4f} (target {row['target']}): {verdict}")
    for name, need in metrics.get("omitted", {}).items():
        print(f"not measured: {name.replace('_', ' ')} (needs {need})")
    print(f"report: {out}/report.html  metrics: {out}/metrics.json")


def _demo(args: argparse.Namespace) -> int:
    from fastexplain.demo import run_demo

    metrics = run_demo(args.out, quick=args.quick, progress=not args.no_progress, seed=args.seed)
    _print_metrics(metrics, args.out)
    return 0


def _add_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="part world → performer → explainer → metrics → report.html")
    demo.add_argument("--out", default="fastexplain-demo", help="output directory (default: fastexplain-demo)")
    demo.add_argument("--quick", action="store_true", help="tiny run (about 2 minutes on 2 cores), a smoke test")
    demo.add_argument("--seed", type=int, default=None,
                      help="seed of the performer, the explainer and the data (default 0); cached per seed")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_one_line_errors("demo")(_demo))


@_one_line_errors("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    from fastexplain.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.out, images=args.images, batch_size=args.batch_size,
                                  weights=args.weights, device=args.device, progress=not args.no_progress)
    _print_metrics(metrics, args.out)
    return 0


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    """The `evaluate` subcommand (issue 13): metrics and report of a trained explainer on a dataset."""
    evaluate = commands.add_parser("evaluate", help="measure a trained explainer vs its performer: metrics.json, "
                                                    "report.html")
    evaluate.add_argument("checkpoint", help="checkpoint.pt written by `fastexplain fit` (or the demo)")
    evaluate.add_argument("--data", required=True,
                          help="image folder (diversity, p, reconstruction, agreement only) or an annotated dataset "
                               "(cub:root=DIR, partworld:split=val) for every metric; read at the checkpoint's size")
    evaluate.add_argument("--out", default="fastexplain-evaluation", help="output directory (default: "
                                                                          "fastexplain-evaluation)")
    evaluate.add_argument("--images", type=int, default=None, help="use the first N images (default: all)")
    evaluate.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    evaluate.add_argument("--weights", default=None,
                          help="performer weights when the checkpoint's cannot be used: a state_dict for its "
                               "torchvision model, or a fastexplain.zoo performer file")
    evaluate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastexplain", description="Explainer networks for CNNs, fast.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="versions, device and the available kernel backends")
    info.set_defaults(run=_info)
    _add_fit_and_explain(commands)
    _add_demo(commands)
    _add_evaluate(commands)
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
