"""Timing and peak-memory measurement for the benchmark, CPU and CUDA.

Times are ratios measured in one process: every round runs each method ``iters`` times, in an
order rotated from round to round, and a method's ratio for the round is its time over the
baseline's time in that same round; the reported ratio is the median over rounds. Timings on
a shared 2-core machine drift by +-30% from minute to minute (measured in the first benchmark runs), so
unpaired times would measure the drift, not the methods.

Peak memory is the most tensor memory a step has allocated at once *on top of* what existed
before it (parameters, momentum buffers and inputs are not counted; gradients that the step
frees and re-allocates are). On CUDA that is ``torch.cuda.max_memory_allocated()`` minus the
memory allocated before the step. On the CPU, torch keeps no such counter, so the step runs
once under ``torch.profiler`` with ``profile_memory=True``: the profiler reports every
allocation and free of torch's CPU allocator made while it is on, and the running sum of those
events is the step's live tensor memory; its maximum is the peak.

Example::

    >>> import torch
    >>> from engm_fast.bench.measure import peak_step_memory
    >>> def step():
    ...     a = torch.ones(1000, 250)          # 1 MB
    ...     b = torch.ones(1000, 500)          # 2 MB, both live: 3 MB
    ...     del a, b
    >>> peak_step_memory(step, torch.device("cpu"))
    3000000
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from .._runtime import synchronize

__all__ = ["median_ratio", "peak_step_memory", "round_robin_times"]


def round_robin_times(fns: dict[str, Callable[[], None]], device: torch.device, rounds: int, iters: int,
                      warmup: int = 2, progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Milliseconds per call of each function, one entry per round.

    Each round runs every function ``iters`` times back to back; the order of the functions
    rotates by one each round so no method always runs right after the same other one.
    ``warmup`` calls of each function come first and are not timed. On CUDA the time is read
    from CUDA events recorded on the stream around the calls (the GPU's time, not the host's).
    """
    if rounds < 1 or iters < 1:
        raise ValueError(f"rounds and iters must be >= 1, got rounds={rounds}, iters={iters}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            synchronize(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fns[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / iters)
                continue
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - t0) / iters * 1e3)
        if progress is not None:
            progress(f"round {r + 1}/{rounds}")
    return times


def median_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``times[name][r] / times[base][r]``."""
    return statistics.median(t / b for t, b in zip(times[name], times[base]))


@contextlib.contextmanager
def _quiet_native_stderr():
    """Drops what native code writes to file descriptor 2 meanwhile: the profiler's kineto
    library prints start/stop lines there, and its log level is read only when torch loads."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_step_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated by one call of ``fn`` above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)
