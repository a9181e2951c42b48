"""Shared helpers of the E1-E5 scripts: one thread, digits data loaded once, JSON and plot output.

Every experiment runs on scikit-learn's 8x8 digits with the demo's small CNN (CPU-sized); the
CIFAR models of ``engm_fast.models`` are not trained here. Every run is one call of the training
loop, :func:`engm_fast.at.train.train` (the loop of ``engm-fast train``, the demo and its
learning-rate sweep).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

torch.set_num_threads(1)  # the experiment machine is a shared 2-core CPU

from engm_fast.at.train import TrainConfig, train
from engm_fast.data import load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "experiments", "at", "results")
FIGURES = os.path.join(ROOT, "docs", "figures")
os.makedirs(RESULTS, exist_ok=True)
os.makedirs(FIGURES, exist_ok=True)

_DATA = None
# The final evaluation of the runs that skip APGD: PGD-20 (the per-epoch evaluation's attack).
PGD_ONLY = ("pgd-20",)


def digits():
    """(x_train, y_train, x_test, y_test, 10), loaded once per process."""
    global _DATA
    if _DATA is None:
        s = load_dataset("digits")
        _DATA = (s.x_train, s.y_train, s.x_test, s.y_test, s.num_classes)
    return _DATA


def run(label: str, **kw) -> dict:
    """One training run (no files, no progress bar) with a one-line summary on stderr."""
    kw.setdefault("out", None)
    kw.setdefault("progress", False)
    kw.setdefault("plots", False)
    t = time.perf_counter()
    res = train(TrainConfig(**kw), data=digits())
    fin = res.get("final", {})
    print(f"[{label}] {time.perf_counter() - t:.1f}s final clean {fin.get('clean_acc')} "
          f"PGD {fin.get('robust_acc_pgd')} APGD {fin.get('robust_acc_apgd')} diverged {res['diverged']}",
          file=sys.stderr, flush=True)
    return res


def save(name: str, obj) -> str:
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    return path


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as p

    return p
