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
