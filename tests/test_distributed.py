"""ENGM under DistributedDataParallel: 2 CPU processes (gloo) against single-process ENGM.

One spawn runs every scenario (each process imports torch once): uneven and empty per-rank
batches, no_sync accumulation, the input proxy, an error on one rank, the gradient monitor,
find_unused_parameters=True, and DDP's own reducer staying idle. The reference is single-process ENGM on the concatenation of the ranks' batches
(rank order), float64, compared within 1e-10.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import engm_fast
from engm_fast.bench.local_group import run_local_group

from conftest import assert_params_equal, cat_batches, step_matches_single_process

WORLD = 2
TOL = 1e-10
HP = dict(lr=0.2, momentum=0.9, weight_decay=1e-3)


def _model():
    torch.manual_seed(11)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)).double()


def _data(sizes, seed):
    """``[(x, y)]`` per size, identical in every process."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))
            for n in sizes]


_cat = cat_batches


def _losses(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _assert_params_equal(model, ref, what):
    assert_params_equal(model, ref, what, TOL)


def _scenario_uneven_and_empty(rank):
    """Per-rank batches (5, 3), then (4, 0): equals ENGM on the concatenation, step by step."""
    model, ref = _model(), _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = engm_fast.ENGM(ddp, **HP, track_variance=True)
    ref_opt = engm_fast.ENGM(ref, **HP, track_variance=True)
    calls = []
    ddp.register_comm_hook(None, _counting_hook(calls))
    for step, sizes in enumerate([(5, 3), (2, 6), (4, 0)]):
        per_rank = _data(sizes, seed=100 + step)
        step_matches_single_process(opt, ref_opt, lambda: _losses(ddp, per_rank[rank]),
                                    lambda: _losses(ref, _cat(per_rank)), rank, sizes, TOL)
        _assert_params_equal(model, ref, f"step {step}, sizes {sizes}")
        for key in ("norm_mean", "norm_max", "norm_min", "weight_mean", "grad_variance"):
            assert opt.diagnostics[key] == pytest.approx(ref_opt.diagnostics[key], rel=1e-9, abs=1e-12), key
    assert opt.backward_steps == 3
    assert calls == [], "DDP's reducer reduced ENGM's gradients too (double reduction)"
    # Control: an ordinary backward through the same DDP model does reach DDP's reducer.
    opt.zero_grad()
    F.cross_entropy(ddp(per_rank[0][0]), per_rank[0][1]).backward()
    assert calls, "the comm-hook counter never fires: the double-reduction check above cannot fail"


def _counting_hook(calls):
    def hook(state, bucket):
        calls.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut
    return hook


def _scenario_no_sync(rank):
    """Two micro-batches under no_sync, one outside: ONE ENGM batch of all 3 x 2 micro-batches."""
    model, ref = _model(), _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = engm_fast.ENGM(ddp, **HP)
    ref_opt = engm_fast.ENGM(ref, **HP)
    for step in range(2):
        sizes = [(3, 2), (1, 4), (2, 2)]  # micro-batch k: (rank 0 size, rank 1 size)
        micro = [_data(s, seed=200 + 10 * step + k) for k, s in enumerate(sizes)]
        opt.zero_grad()
        with ddp.no_sync():
            for k in range(2):
                opt.backward(_losses(ddp, micro[k][rank]))
            assert all(p.grad is None for p in model.parameters()), "no_sync micro-batch wrote .grad"
            with pytest.raises(RuntimeError, match="no_sync"):
                opt.step()  # nothing reduced yet: a step now would be a local, partial one
        opt.backward(_losses(ddp, micro[2][rank]))
        opt.step()
        # Reference: rank 0's micro-batches, then rank 1's, as one batch.
        ref_batch = _cat([micro[k][r] for r in range(WORLD) for k in range(3)])
        ref_opt.zero_grad()
        ref_opt.backward(_losses(ref, ref_batch))
        ref_opt.step()
        _assert_params_equal(model, ref, f"no_sync step {step}")
    assert opt.backward_steps == ref_opt.backward_steps == 2


def _scenario_proxy(rank):
    """input_proxy: calibration pairs gathered from all ranks, so every rank fits the same line."""
    model, ref = _model(), _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    kw = dict(HP, norm_source="input_proxy", calibrate_every=2)
    opt = engm_fast.ENGM(ddp, **kw)
    ref_opt = engm_fast.ENGM(ref, **kw)
    for step, sizes in enumerate([(4, 3), (5, 2), (3, 3), (2, 5)]):
        per_rank = _data(sizes, seed=300 + step)
        opt.zero_grad()
        opt.backward(_losses(ddp, per_rank[rank]))
        opt.step()
        ref_opt.zero_grad()
        ref_opt.backward(_losses(ref, _cat(per_rank)))
        ref_opt.step()
        _assert_params_equal(model, ref, f"proxy step {step}")
        got, want = opt.proxy_stats, ref_opt.proxy_stats
        assert got["n_pairs"] == want["n_pairs"] and got["calibrations"] == want["calibrations"]
        for key in ("alpha", "beta", "pearson_r"):
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert opt.proxy_stats["calibrations"] == 2  # steps 0 and 2 calibrate


def _scenario_error_on_one_rank(rank):
    """NaN loss on rank 1 only: both ranks raise (no hang), nothing written; the next step works."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = engm_fast.ENGM(ddp, **HP)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data((4, 4), seed=400)[rank]
    if rank == 1:
        x = x.clone()
        x[2] = float("nan")
    opt.zero_grad()
    expected = (FloatingPointError, r"1 of 4 losses") if rank == 1 else (RuntimeError, r"rank\(s\) \[1\].*FloatingPointError")
    with pytest.raises(expected[0], match=expected[1]):
        opt.backward(_losses(ddp, (x, y)))
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    x, y = _data((4, 4), seed=401)[rank]
    opt.backward(_losses(ddp, (x, y)))
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _scenario_grad_scaler(rank):
    """GradScaler under DDP: the reduced, unscaled step equals single-process ENGM without one."""
    model, ref = _model(), _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt, ref_opt = engm_fast.ENGM(ddp, **HP), engm_fast.ENGM(ref, **HP)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    for step, sizes in enumerate([(3, 5), (4, 2)]):
        per_rank = _data(sizes, seed=500 + step)
        opt.zero_grad()
        opt.backward(_losses(ddp, per_rank[rank]), scaler=scaler)
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        ref_opt.backward(_losses(ref, _cat(per_rank)))
        ref_opt.step()
        _assert_params_equal(model, ref, f"scaler step {step}")
    assert scaler.get_scale() == 2.0 ** 10


def _scenario_monitor_records_global_statistics(rank):
    """GradientMonitor.observe_engm under DDP: every rank records the statistics of all ranks'
    examples, equal to a single-process monitor on the concatenated batch (no per-rank mix)."""
    from engm_fast.at import GradientMonitor

    model, ref = _model(), _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = engm_fast.ENGM(ddp, **HP, track_variance=True)
    ref_opt = engm_fast.ENGM(ref, **HP, track_variance=True)
    mon, ref_mon = GradientMonitor(), GradientMonitor()
    for step, sizes in enumerate([(5, 3), (1, 6), (4, 0)]):
        per_rank = _data(sizes, seed=600 + step)
        opt.zero_grad()
        opt.backward(_losses(ddp, per_rank[rank]))
        assert mon.observe_engm(opt)
        opt.step()
        ref_opt.zero_grad()
        ref_opt.backward(_losses(ref, _cat(per_rank)))
        assert ref_mon.observe_engm(ref_opt)
        ref_opt.step()
        got, want = mon.steps[-1], ref_mon.steps[-1]
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (step, key)
    # The same on every rank: gather rank 1's records on rank 0.
    records = [None] * WORLD
    dist.all_gather_object(records, mon.end_epoch())
    assert records[0] == records[1] == mon.history[-1]


class _Branchy(nn.Module):
    """A model whose ``extra`` layer is used only when ``use_extra`` is set, and whose ``unused``
    layer never is: DDP must be built with find_unused_parameters=True."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))
        self.extra = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.use_extra = True
        self.double()

    def forward(self, x):
        out = self.body(x)
        return self.extra(out) if self.use_extra else out


def _scenario_find_unused_parameters(rank):
    """DDP(find_unused_parameters=True) with a never-used layer and a layer used every other
    step: ENGM equals single-process ENGM, the unused layer gets no gradient and does not move,
    and DDP's reducer never reduces (nor complains about an unfinished reduction)."""
    model, ref = _Branchy(), _Branchy()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    calls = []
    ddp.register_comm_hook(None, _counting_hook(calls))
    opt, ref_opt = engm_fast.ENGM(ddp, **HP), engm_fast.ENGM(ref, **HP)
    unused_before = [p.detach().clone() for p in model.unused.parameters()]
    for step, sizes in enumerate([(4, 3), (2, 5), (3, 3), (5, 1)]):
        model.use_extra = ref.use_extra = step % 2 == 0
        per_rank = _data(sizes, seed=700 + step)
        opt.zero_grad()
        opt.backward(_losses(ddp, per_rank[rank]))
        assert all(p.grad is None for p in model.unused.parameters())
        assert all((p.grad is not None) == model.use_extra for p in model.extra.parameters())
        opt.step()
        ref_opt.zero_grad()
        ref_opt.backward(_losses(ref, _cat(per_rank)))
        ref_opt.step()
        _assert_params_equal(model, ref, f"find_unused step {step}")
    assert all(torch.equal(a, p) for a, p in zip(unused_before, model.unused.parameters()))
    assert calls == [], "DDP's reducer reduced ENGM's gradients too"


def _scenario_static_graph_rejected(rank):
    ddp = nn.parallel.DistributedDataParallel(_model(), static_graph=True)
    with pytest.raises(ValueError, match="static_graph"):
        engm_fast.ENGM(ddp, lr=0.1)


def _scenario_norm_floor_refused(rank):
    ddp = nn.parallel.DistributedDataParallel(_model())
    with pytest.raises(NotImplementedError, match="norm_floor.*each rank sees only its own examples"):
        engm_fast.ENGM(ddp, lr=0.1, norm_floor=0.01)


SCENARIOS = [_scenario_uneven_and_empty, _scenario_no_sync, _scenario_proxy, _scenario_error_on_one_rank,
             _scenario_grad_scaler, _scenario_monitor_records_global_statistics, _scenario_find_unused_parameters,
             _scenario_static_graph_rejected, _scenario_norm_floor_refused]


def _run(rank, world):
    for scenario in SCENARIOS:
        scenario(rank)
        dist.barrier()


def test_ddp_engm_equals_single_process_engm():
    run_local_group(_run, WORLD)  # a 60 s process group timeout: a hang fails the test instead of blocking it


def _abort_on_last_rank(rank, world):
    dist.barrier()
    if rank == world - 1:
        import os
        import signal
        os.kill(os.getpid(), signal.SIGABRT)
    dist.barrier()


def _raise_on_rank_zero(rank, world):
    if rank == 0:
        raise ValueError("rank zero failed")


def test_local_group_reports_failures():
    """A rank that dies from a signal before its function returned, or raises, fails the run:
    only an abort after every rank's function returned (a teardown crash) is tolerated."""
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGABRT"):
        run_local_group(_abort_on_last_rank, 2, timeout_s=20.0)
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="rank zero failed"):
        run_local_group(_raise_on_rank_zero, 2, timeout_s=20.0)
