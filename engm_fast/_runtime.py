"""Where a run ran (for its JSON record) and waiting for a device's queued work (for timings).

Example::

    >>> import torch
    >>> synchronize(torch.device("cpu"))         # nothing queued on a CPU: returns at once
    >>> sorted(environment("cpu"))
    ['device', 'machine', 'python', 'threads', 'torch']
"""
from __future__ import annotations

import platform

import torch

__all__ = ["environment", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device``: a time taken after it includes that work, not
    only its launch (CUDA kernels run asynchronously; CPU work is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: str | torch.device) -> dict:
    """torch and Python versions, the device, torch's CPU threads and the machine type."""
    return {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine()}
