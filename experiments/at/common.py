"""Shared helpers of the E1-E6 scripts: one thread, data loaded once, resumable runs, JSON and plot output.

Every run is one call of the training loop, :func:`engm_fast.at.train.train` (the loop of
``engm-fast train``, the demo and its learning-rate sweep). E1, E2, E3, E5 and E6 take
``--dataset`` (``mnist``: MNIST-5k, ``fashion-mnist``, ``digits``); each data set's settings
are in the script's ``SETTINGS``. The digits settings are the ones of the small-scale tables
in docs/experiments.md.

Resumable: each run's results go to ``CACHE/<experiment>/<dataset>/<key>.json`` (``CACHE`` =
``$ENGM_EXPERIMENT_CACHE`` or ``experiments/at/cache``, git-ignored) and a script run again skips
the runs already there. Two processes may run the same script at once: a run is claimed by a
lock file, so they share the work; the one that finds every run done writes the tables. Each
run also keeps its last (and best) checkpoint there, for evaluations added later.
"""
from __future__ import annotations

import argparse
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
CACHE = os.environ.get("ENGM_EXPERIMENT_CACHE", os.path.join(ROOT, "experiments", "at", "cache"))
os.makedirs(RESULTS, exist_ok=True)
os.makedirs(FIGURES, exist_ok=True)

_DATA: dict = {}
# The final evaluation of the runs that skip the foreign attacks: PGD-20 (the per-epoch evaluation's attack).
PGD_ONLY = ("pgd-20",)
# The 28x28 sweeps' final evaluation: PGD-20 and AutoAttack's two APGD stages (its accuracy after
# APGD-T; the full suite, with FAB-T and Square, runs on the checkpoints that the tables single out).
PGD_AND_AA_APGD = ("pgd-20", "autoattack-apgd")
FULL_AA = ("pgd-20", "autoattack")
DATASETS = ("mnist", "fashion-mnist", "digits")
QUICK_TRAIN, QUICK_TEST = 256, 64  # --quick


def parse_args(doc: str, datasets=DATASETS) -> argparse.Namespace:
    """``--dataset`` (default: the first of ``datasets``), ``--quick`` (a smoke run: few epochs,
    one seed, nothing cached) and ``--table-only`` (tables from the cache, training nothing)."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--dataset", choices=datasets, default=datasets[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, one seed, small subsets, no cache")
    p.add_argument("--table-only", action="store_true", help="print the tables from the cached runs; train nothing")
    args = p.parse_args()
    if args.quick:  # a smoke run writes its JSON and figures beside the cache, not over the committed ones
        global RESULTS, FIGURES
        RESULTS = FIGURES = os.path.join(CACHE, "quick")
        os.makedirs(RESULTS, exist_ok=True)
    return args


def data(name: str):
    """(x_train, y_train, x_test, y_test, num_classes) of data set ``name``, loaded once per process."""
    if name not in _DATA:
        s = load_dataset(name)
        _DATA[name] = (s.x_train, s.y_train, s.x_test, s.y_test, s.num_classes)
    return _DATA[name]


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(label: str, dataset: str = "digits", **kw) -> dict:
    """One training run (no files, no progress bar) with a one-line summary on stderr."""
    kw.setdefault("out", None)
    kw.setdefault("progress", False)
    kw.setdefault("plots", False)
    t = time.perf_counter()
    res = train(TrainConfig(dataset=dataset, **kw), data=data(dataset))
    fin = res.get("final", {})
    _say(f"[{label}] {time.perf_counter() - t:.1f}s final clean {fin.get('clean_acc')} PGD {fin.get('robust_acc_pgd')} "
         f"AA-APGD {fin.get('robust_acc_aa_apgd')} AA {fin.get('robust_acc_aa')} diverged {res['diverged']}")
    return res


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Runs:
    """The resumable runs of one experiment on one data set (see the module docstring).

    ``get(key, **train_kwargs)`` returns the run's results (cached, or trained now), or ``None``
    when another process is training it; ``evaluate(key, run_key, attacks, subset)`` re-evaluates
    a finished run's last checkpoint with more attacks (cached alike). ``pending`` counts the
    ``None`` answers: a script writes its tables only when it is 0. With ``--table-only`` nothing
    is trained: a run not in the cache counts as pending.
    """

    def __init__(self, experiment: str, args: argparse.Namespace):
        self.dataset, self.quick, self.table_only = args.dataset, args.quick, args.table_only
        self.dir = os.path.join(CACHE, experiment, self.dataset)
        os.makedirs(self.dir, exist_ok=True)
        self.pending = 0

    def _path(self, key: str, ext: str) -> str:
        return os.path.join(self.dir, key.replace("/", "__") + ext)

    def _claim(self, key: str) -> bool:
        lock = self._path(key, ".lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(lock) as f:
                text = f.read().strip()
            if text.isdigit() and _alive(int(text)):
                return False
            os.remove(lock)  # its process is gone: take the run over
            return self._claim(key)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True

    def _cached(self, key: str, compute):
        path = self._path(key, ".json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        if self.quick:
            return compute()
        if self.table_only or not self._claim(key):
            self.pending += 1
            return None
        try:
            if os.path.exists(path):  # finished by another process between the check and the claim
                with open(path) as f:
                    return json.load(f)
            res = compute()
            with open(path + ".tmp", "w") as f:
                json.dump(res, f)
            os.replace(path + ".tmp", path)
            return res
        finally:
            os.remove(self._path(key, ".lock"))

    def get(self, key: str, **kw) -> dict | None:
        if self.quick:  # a smoke run of the whole script: small fixed subsets
            kw.update(train_subset=min(kw.get("train_subset") or QUICK_TRAIN, QUICK_TRAIN),
                      test_subset=QUICK_TEST, final_subset=QUICK_TEST,
                      eval_train_subset=kw.get("eval_train_subset") and QUICK_TEST)

        def compute():
            out = None if self.quick else self._path(key, "")
            res = run(f"{self.dataset} {key}", dataset=self.dataset, out=out, **kw)
            res.pop("environment", None)
            return res
        return self._cached(key, compute)

    def evaluate(self, key: str, run_key: str, attacks, subset: int | None) -> dict | None:
        """Re-evaluates the last checkpoint of the finished run ``run_key`` by ``attacks`` on the
        first ``subset`` images of the test permutation that the runs' final subsets come from."""
        def compute():
            from engm_fast.at.evaluation import final_evaluation
            from engm_fast.data import fixed_subset
            from engm_fast.models import make_model

            with open(self._path(run_key, ".json")) as f:
                cfg = json.load(f)["config"]
            ck = torch.load(os.path.join(self._path(run_key, ""), "checkpoint_last.pt"), map_location="cpu",
                            weights_only=False)
            x_tr, _, x_te, y_te, num_classes = data(self.dataset)
            model = make_model(cfg["model"], num_classes=num_classes, in_channels=x_tr.shape[1], **cfg["model_kwargs"])
            model.load_state_dict(ck["model"])
            x, y = fixed_subset(x_te, y_te, subset, 1)
            t = time.perf_counter()
            res = final_evaluation(model, x, y, attacks, cfg["eval_eps"], cfg["norm"])
            res["wall_time_s"] = time.perf_counter() - t
            _say(f"[{self.dataset} {key}] {res['wall_time_s']:.1f}s {res}")
            return res
        if self.quick:
            return None
        return self._cached(key, compute)


def finish_or_exit(runs: Runs) -> None:
    """Exits (status 0) when another process still trains some of the runs: the tables need all."""
    if runs.pending:
        _say(f"{runs.pending} run(s) are being trained by another process; run the script again when they finish "
             "to print the tables")
        sys.exit(0)


def results_path(name: str, dataset: str) -> str:
    """Where an experiment's JSON goes: ``results/<name>`` for digits (the small-scale tables),
    ``results/<dataset>/<name>`` for the 28x28 sets."""
    folder = RESULTS if dataset == "digits" else os.path.join(RESULTS, dataset)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def e2_best_lrs(dataset: str, method: str = "pgd", metric: str = "robust_acc_aa_apgd") -> dict:
    """Each optimizer's best rate of E2's sweep on ``dataset`` (mean final ``metric`` over the
    seeds), read from E2's results; exits naming the command when they are not there yet."""
    path = results_path("e2_lr_sweep.json", dataset)
    if not os.path.exists(path):
        sys.exit(f"this experiment uses E2's best rates on {dataset} ({path}): run "
                 f"python experiments/at/e2_lr_sweep.py --dataset {dataset} first")
    with open(path) as f:
        e2 = json.load(f)
    grids = e2["grids"][method] if method in e2["grids"] else e2["grids"]

    def score(opt, lr):
        finals = [(e2["runs"][f"{method}/{opt}/{lr}/{s}"].get("final") or {}).get(metric, 0.0) for s in e2["seeds"]]
        return statistics.fmean(finals)
    return {opt: max(grid, key=lambda lr: score(opt, lr)) for opt, grid in grids.items()}


def figure_path(name: str, dataset: str) -> str:
    return os.path.join(FIGURES, name if dataset == "digits" else f"{dataset}_{name}")


def save(name: str, obj, dataset: str = "digits") -> str:
    path = results_path(name, dataset)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    return path


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs, digits: int = 3) -> str:
    """``mean ± sd`` of the non-missing values, ``n/a`` when there are none."""
    m, s = mean_std(xs)
    return "n/a" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}"


def cost(results, what: str = "runs") -> str:
    """One line for a table's cost: the number of runs and the sum of their wall times (each
    run: one torch thread, beside other runs and work on the shared 2-core machine, so a
    run alone takes less)."""
    rs = [r for r in results if r]
    total = sum(r.get("wall_time_s", 0.0) for r in rs)
    return (f"cost: {len(rs)} {what}, {total / 60:.0f} min of wall time summed over them (1 torch thread each, "
            f"beside other processes on the shared 2-core machine)")


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as p

    return p
