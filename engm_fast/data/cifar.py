"""CIFAR-10/100 from a local directory in the standard python-pickle format (no download).

Expected layout (the archives ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``
unpacked): ``DIR/cifar-10-batches-py/{data_batch_1..5, test_batch}`` or
``DIR/cifar-100-python/{train, test}``; ``DIR`` may also be that inner folder itself. Each
file is a pickled dict with ``b"data"`` (uint8 ``[N, 3072]``, channel-major 32x32) and
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).

Example::

    >>> load_cifar("/nonexistent", "cifar10")
    Traceback (most recent call last):
    ...
    FileNotFoundError: CIFAR-10 not found under '/nonexistent': ...
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

__all__ = ["CIFAR_SPECS", "load_cifar"]

CIFAR_SPECS = {
    "cifar10": {"display": "CIFAR-10", "folder": "cifar-10-batches-py", "num_classes": 10,
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "label_key": b"labels"},
    "cifar100": {"display": "CIFAR-100", "folder": "cifar-100-python", "num_classes": 100,
                 "train": ["train"], "test": ["test"], "label_key": b"fine_labels"},
}


def _find_dir(root: str, spec: dict) -> str:
    for cand in (os.path.join(root, spec["folder"]), root):
        if all(os.path.isfile(os.path.join(cand, f)) for f in spec["train"] + spec["test"]):
            return cand
    files = ", ".join(spec["train"] + spec["test"])
    raise FileNotFoundError(
        f"{spec['display']} not found under {root!r}: expected {spec['folder']}/ (or the folder itself) with "
        f"{files} in the python-pickle format. engm_fast does not download data sets; unpack the "
        f"official python archive there and pass --data-dir")


def _read(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    if b"data" not in d or label_key not in d:
        raise ValueError(f"{path}: not a CIFAR python batch (keys {sorted(d)[:5]}; need b'data' and {label_key!r})")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' must be [N, 3072] uint8, got {data.shape}")
    return data, np.asarray(d[label_key], dtype=np.int64)


def load_cifar(root: str, name: str = "cifar10", device: str = "cpu"):
    """``(x_train, y_train, x_test, y_test)``: float32 ``[N, 3, 32, 32]`` in [0, 1] and int64 labels.

    Raises ``FileNotFoundError`` naming the directory and the files expected when absent.
    """
    if name not in CIFAR_SPECS:
        raise ValueError(f"load_cifar: name must be one of {sorted(CIFAR_SPECS)}, got {name!r}")
    spec = CIFAR_SPECS[name]
    folder = _find_dir(os.fspath(root), spec)
    out = []
    for split in ("train", "test"):
        parts = [_read(os.path.join(folder, f), spec["label_key"]) for f in spec[split]]
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
        y = np.concatenate([p[1] for p in parts])
        out += [torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)]
    return tuple(out)
