"""Command-line interface: ``engm-fast <command> [options]`` or ``python -m engm_fast <command>``.

Commands:

* ``demo``: PGD adversarial training of a small CNN on 8x8 digits with MSGD and ENGM side by
  side (see :mod:`engm_fast.demo`); prints a table and writes a JSON file and a plot.

Each command is a ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func`` to a handler taking the parsed namespace and returning an exit code; adding a
command (``bench``, ``train``) means writing one such pair and listing it in ``_COMMANDS``.

Example::

    $ engm-fast demo --quick --out /tmp/engm_demo
    $ python -m engm_fast demo --epochs 10 --seed 1 --lr-engm 0.5
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _add_demo(subparsers) -> None:
    # Defaults are read from engm_fast.demo so the CLI and the Python API cannot disagree.
    from engm_fast.demo import DEFAULT_EPOCHS, DEFAULT_LR_ENGM, DEFAULT_LR_MSGD

    p = subparsers.add_parser(
        "demo",
        help="adversarial training on 8x8 digits: MSGD vs ENGM",
        description="PGD adversarial training of a small CNN on scikit-learn's 8x8 digits with MSGD "
        "and ENGM from the same initial weights; prints clean/robust test accuracy and step times, "
        "writes OUT/demo_results.json and OUT/robust_accuracy.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS, help="training epochs")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="mini-batch size")
    p.add_argument("--out", default="engm_demo_out", help="output directory")
    p.add_argument("--quick", action="store_true", help="2 epochs on a subset (seconds; for smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of initial weights, batch order and attacks")
    p.add_argument("--lr-msgd", type=_positive_float, default=DEFAULT_LR_MSGD, help="MSGD learning rate")
    p.add_argument("--lr-engm", type=_positive_float, default=DEFAULT_LR_ENGM, help="ENGM learning rate")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from engm_fast.demo import run_demo

    run_demo(
        epochs=args.epochs,
        batch_size=args.batch_size,
        out_dir=args.out,
        seed=args.seed,
        quick=args.quick,
        lr_msgd=args.lr_msgd,
        lr_engm=args.lr_engm,
        device=args.device,
        progress=not args.no_progress,
    )
    return 0


# One entry per subcommand; order is the order in --help.
_COMMANDS: list[Callable] = [_add_demo]


def build_parser() -> argparse.ArgumentParser:
    """The ``engm-fast`` argument parser with every subcommand registered.

    Example::

        >>> args = build_parser().parse_args(["demo", "--quick", "--seed", "3"])
        >>> args.command, args.quick, args.seed
        ('demo', True, 3)
    """
    parser = argparse.ArgumentParser(
        prog="engm-fast",
        description="engm_fast: per-example gradient norms and the ENGM optimizer for adversarial training.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``engm-fast`` and ``python -m engm_fast``; returns the exit code.

    Example::

        >>> from engm_fast.cli import main
        >>> main(["demo", "--quick", "--out", "/tmp/engm_demo", "--no-progress"])  # doctest: +SKIP
        0
    """
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
