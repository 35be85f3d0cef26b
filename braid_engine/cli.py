"""The ``braid`` command: ``braid check MODEL`` prints the fused-kernel compatibility report."""

from __future__ import annotations

import argparse
import sys

from braid_engine.compat import check_checkpoint
from braid_engine.loader import resolve_model_path


def main(argv: list[str] | None = None) -> int:
    """Run the ``braid`` command line; returns the exit status.

    Example:
        >>> main(["check", "/tmp/tiny-qwen3"])
    """
    parser = argparse.ArgumentParser(prog="braid")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="score a checkpoint's layers for the fused GPU kernels")
    check.add_argument("model", help="a local checkpoint directory or a hub id")
    args = parser.parse_args(argv)
    print(check_checkpoint(resolve_model_path(args.model)).format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
