"""Benchmarks of per-example-normalized SGD steps: engm_fast against torch.func vmap, BackPACK
and Opacus, as ratios to a plain ``torch.optim.SGD`` step measured in the same process.

* :mod:`engm_fast.bench.models`: the models (MLP, CNN, ResNet-18 with GroupNorm or BatchNorm,
  transformer block).
* :mod:`engm_fast.bench.methods`: each method bound to a model (one step, same update).
* :mod:`engm_fast.bench.measure`: paired round-robin timing and peak step memory.
* :mod:`engm_fast.bench.suite`: the cases, the runner, the table and the JSON record.

The console command ``engm-fast bench [--device cpu|cuda] [--quick]`` runs it (see
``engm-fast bench --help``); BackPACK and Opacus are optional (``pip install -e .[bench]``
and ``pip install --no-deps backpack-for-pytorch``): a method whose package is missing is
shown as such.

Example::

    >>> from engm_fast.bench import run, format_table
    >>> rows = run(["mlp"], methods=["engm"], quick=True, rounds=1, iters=1, progress=False)["rows"]
    >>> [(r["method"], r["status"]) for r in rows]
    [('sgd', 'ok'), ('engm', 'ok')]
"""
from .suite import format_table, run

__all__ = ["format_table", "run"]
