"""Data (random labels, digits, CIFAR pickle reader) and the AT models (shapes, backward, ENGM)."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import engm_fast
from engm_fast.data import RandomLabelDataset, load_cifar, load_dataset, random_labels
from engm_fast.models import PreActResNet, WideResNet, make_model


def test_random_labels_deterministic_and_seeded():
    y = torch.arange(1000) % 10
    a, b = random_labels(y, 10, seed=5), random_labels(y, 10, seed=5)
    c = random_labels(y, 10, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) <= 9
    # uniform labels: agreement with the true label about 1/10, every class used
    assert 0.05 < float((a == y).float().mean()) < 0.15
    assert torch.bincount(a, minlength=10).min() > 60
    assert torch.equal(y, torch.arange(1000) % 10)  # input not modified


def test_random_labels_rate():
    y = torch.zeros(200, dtype=torch.long)
    half = random_labels(y, 4, seed=1, rate=0.5)
    full = random_labels(y, 4, seed=1, rate=1.0)
    changed = half != y
    # only examples in the chosen half can change, and they take the same label as at rate 1
    assert int(changed.sum()) <= 100
    assert torch.equal(half[changed], full[changed])
    assert torch.equal(random_labels(y, 4, seed=1, rate=0.0), y)
    with pytest.raises(ValueError, match="rate"):
        random_labels(y, 4, seed=1, rate=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        random_labels(y, 0, seed=1)


def test_random_label_dataset():
    base = TensorDataset(torch.randn(30, 2), torch.arange(30) % 3)
    ds = RandomLabelDataset(base, num_classes=3, seed=9, return_index=True)
    ds2 = RandomLabelDataset(base, num_classes=3, seed=9)
    assert len(ds) == 30 and torch.equal(ds.targets, ds2.targets)
    x, y, i = ds[7]
    assert torch.equal(x, base[7][0]) and int(y) == int(ds.targets[7]) and i == 7
    assert torch.equal(ds.targets, random_labels(torch.arange(30) % 3, 3, seed=9))


def _write_fake_cifar(root, name):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        files, key, ncls = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
    else:
        folder = os.path.join(root, "cifar-100-python")
        files, key, ncls = ["train", "test"], b"fine_labels", 100
    os.makedirs(folder)
    written = {}
    for f in files:
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = rng.integers(0, ncls, size=3).tolist()
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, fh)
        written[f] = (data, labels)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reader_on_fake_pickles(tmp_path, name):
    written = _write_fake_cifar(str(tmp_path), name)
    x_tr, y_tr, x_te, _ = load_cifar(str(tmp_path), name)
    n_train_files = 5 if name == "cifar10" else 1
    assert x_tr.shape == (3 * n_train_files, 3, 32, 32) and x_te.shape == (3, 3, 32, 32)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    first = "data_batch_1" if name == "cifar10" else "train"
    data, labels = written[first]
    # channel-major rows: the red plane of image 0 is its first 1024 bytes
    np.testing.assert_allclose(x_tr[0, 0].numpy(), data[0, :1024].reshape(32, 32) / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(x_tr[1, 2].numpy(), data[1, 2048:].reshape(32, 32) / 255.0, rtol=0, atol=1e-7)
    assert y_tr[:3].tolist() == labels
    s = load_dataset(name, str(tmp_path))
    assert s.num_classes == (10 if name == "cifar10" else 100)


def test_cifar_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found under .*data_batch_1"):
        load_cifar(str(tmp_path), "cifar10")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("cifar100")


def test_digits_split():
    s = load_dataset("digits")
    assert s.x_train.shape == (1347, 1, 8, 8) and s.x_test.shape == (450, 1, 8, 8)
    assert float(s.x_train.min()) >= 0 and float(s.x_train.max()) <= 1


@pytest.mark.parametrize("name,kw", [("preact_resnet18", {"width": 4, "blocks": (1, 1, 1, 1)}),
                                     ("wide_resnet34_10", {"depth": 10, "widen_factor": 1})])
def test_cifar_models_forward_backward_and_engm(name, kw):
    model = make_model(name, num_classes=7, seed=0, **kw)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 7, (4,))
    out = model(x)
    assert out.shape == (4, 7)
    F.cross_entropy(out, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    opt = engm_fast.ENGM(model, lr=0.1)
    norms = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert norms.shape == (4,) and bool(torch.isfinite(norms).all()) and bool((norms > 0).all())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_full_size_parameter_counts():
    assert sum(p.numel() for p in make_model("preact_resnet18").parameters()) == 11172170
    wrn = WideResNet(depth=34, widen_factor=10)
    assert len(wrn.block1) == 5 and wrn.fc.in_features == 640


def test_model_errors():
    with pytest.raises(ValueError, match="model must be one of"):
        make_model("resnet50")
    with pytest.raises(ValueError, match="depth must be 6n\\+4"):
        WideResNet(depth=12)
    with pytest.raises(ValueError, match="small_cnn"):
        make_model("small_cnn", num_classes=100)
    with pytest.raises(ValueError, match="four block counts"):
        PreActResNet(blocks=(1, 1))
