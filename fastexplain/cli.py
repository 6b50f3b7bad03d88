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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastexplain", description="Explainer networks for CNNs, fast.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="versions, device and the available kernel backends")
    info.set_defaults(run=_info)
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
