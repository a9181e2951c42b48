"""The engine's per-example norms and reweighted gradients against a float64 torch.func reference,
for every supported layer type, the fallback, multi-call modules and shared parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engm_fast
from conftest import flat_norms, vmap_per_example_grads

BACKENDS = engm_fast.available_backends()
TOL = dict(rtol=1e-9, atol=1e-11)  # float64 throughout


def _ce(run, x, y):
    return F.cross_entropy(run(x), y, reduction="sum")


def _check_model(model, x, y, backend="torch"):
    """The engine, ``per_example_grad_norms`` and ``ENGM.backward`` against the vmap reference.

    Checks the norms, ``sum_i w_i g_i`` for random weights, and the ``p.grad`` ENGM leaves
    (``(1/B) sum_i g_i / (||g_i|| + eps)``), for every trainable parameter.
    """
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    ref = vmap_per_example_grads(model, _ce, x, y)
    ref_norms = flat_norms(ref)
    B = x.shape[0]
    engine = engm_fast.attach(model)
    with engm_fast.use_backend(backend):
        grads = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
        w = torch.rand(B, dtype=torch.float64)
        weighted = grads.weighted_grads(w)
        public_norms = engm_fast.per_example_grad_norms(model, F.cross_entropy(model(x), y, reduction="none"))
        opt = engm_fast.ENGM(model, lr=0.1)
        opt.zero_grad()
        engm_norms = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    torch.testing.assert_close(grads.sqnorms().sqrt(), ref_norms, **TOL)
    torch.testing.assert_close(public_norms, ref_norms, **TOL)
    torch.testing.assert_close(engm_norms, ref_norms, **TOL)
    assert set(grads.names.values()) == set(ref), "every trainable parameter gets a gradient"
    engm_w = 1.0 / (ref_norms + 1e-6) / B
    for p, g in weighted.items():
        name = grads.names[p]
        torch.testing.assert_close(g, torch.einsum("b,b...->...", w, ref[name]), **TOL, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", engm_w, ref[name]), **TOL,
                                   msg=lambda m: f"ENGM p.grad of {name}: {m}")
    engm_fast.release(model)


class Flatten(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 7])
def test_mlp(B, backend):
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 1, bias=False), nn.Tanh(), nn.Linear(1, 3))
    _check_model(model, torch.randn(B, 5), torch.randint(0, 3, (B,)), backend=backend)


class SeqModel(nn.Module):
    """Linear on [B, T, d] (and [B, T1, T2, d]) inputs, mean-pooled."""

    def __init__(self, extra_dim=False):
        super().__init__()
        self.inp = nn.Linear(6, 11)
        self.norm = nn.LayerNorm(11)
        self.out = nn.Linear(11, 4)
        self.extra_dim = extra_dim

    def forward(self, x):
        h = self.norm(torch.tanh(self.inp(x)))
        h = self.out(h)
        return h.mean(dim=tuple(range(1, h.dim() - 1)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 1, 6), (3, 13, 6), (4, 3, 5, 6)])
def test_linear_leading_dims_and_layernorm(shape, backend):
    _check_model(SeqModel(), torch.randn(*shape), torch.randint(0, 4, (shape[0],)), backend=backend)


CONV_CASES = [
    # (conv class, in shape (no batch), kwargs)
    (nn.Conv1d, (3, 17), dict(out_channels=4, kernel_size=3)),
    (nn.Conv1d, (4, 9), dict(out_channels=6, kernel_size=2, stride=2, padding=1, dilation=2, groups=2)),
    (nn.Conv1d, (2, 8), dict(out_channels=3, kernel_size=4, padding="same", dilation=1)),
    (nn.Conv2d, (3, 7, 9), dict(out_channels=5, kernel_size=3, padding=1)),
    (nn.Conv2d, (4, 8, 7), dict(out_channels=4, kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=4)),
    (nn.Conv2d, (2, 6, 6), dict(out_channels=3, kernel_size=4, padding="same", dilation=1, bias=False)),
    (nn.Conv2d, (2, 5, 6), dict(out_channels=3, kernel_size=3, padding=1, padding_mode="reflect")),
    (nn.Conv2d, (2, 5, 6), dict(out_channels=3, kernel_size=3, padding=2, padding_mode="circular")),
    (nn.Conv2d, (1, 1, 1), dict(out_channels=1, kernel_size=1)),
    (nn.Conv2d, (8, 4, 4), dict(out_channels=16, kernel_size=3, stride=2)),  # T=1: ghost route
    (nn.Conv2d, (8, 5, 5), dict(out_channels=8, kernel_size=3, stride=2, groups=2)),  # T=4, grouped: direct
    (nn.Conv2d, (8, 5, 5), dict(out_channels=16, kernel_size=3, stride=2, groups=2)),  # T=4, grouped: ghost
    (nn.Conv3d, (2, 5, 4, 6), dict(out_channels=3, kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=1)),
    (nn.Conv3d, (4, 4, 5, 3), dict(out_channels=2, kernel_size=2, dilation=(2, 1, 1), groups=2, padding="same")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conv,in_shape,kwargs", CONV_CASES, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(CONV_CASES)])
def test_conv(conv, in_shape, kwargs, backend):
    layer = conv(in_shape[0], **kwargs)
    with torch.no_grad():
        n_out = Flatten()(layer(torch.randn(1, *in_shape))).shape[1]
    model = nn.Sequential(layer, nn.Tanh(), Flatten(), nn.Linear(n_out, 3))
    _check_model(model, torch.randn(5, *in_shape), torch.randint(0, 3, (5,)), backend=backend)


class EmbedModel(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(13, 6, padding_idx=padding_idx)
        self.out = nn.Linear(6, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)).mean(1))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding(padding_idx):
    ids = torch.randint(0, 5, (6, 9))  # few distinct ids: repeated ids within an example matter
    ids[0, :3] = 0
    _check_model(EmbedModel(padding_idx), ids, torch.randint(0, 3, (6,)))


@pytest.mark.parametrize("norm", ["group", "rms", "layer2d"])
def test_norm_layers(norm):
    if norm == "group":
        layer = nn.GroupNorm(2, 4)
    elif norm == "rms":
        layer = nn.RMSNorm([4, 5, 5])
    else:
        layer = nn.LayerNorm([5, 5], elementwise_affine=True)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), layer, nn.Tanh(), Flatten(), nn.Linear(100, 3))
    with torch.no_grad():
        model[1].weight.normal_()
        if getattr(model[1], "bias", None) is not None:
            model[1].bias.normal_()
    _check_model(model, torch.randn(5, 2, 5, 5), torch.randint(0, 3, (5,)))


def test_batchnorm_eval_mode_matches_vmap():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), Flatten(), nn.Linear(36, 3),
                          nn.BatchNorm1d(3))
    model.double()
    with torch.no_grad():
        model(torch.randn(16, 2, 5, 5, dtype=torch.float64))  # non-trivial running statistics
    model.eval()
    _check_model(model, torch.randn(5, 2, 5, 5), torch.randint(0, 3, (5,)))


@pytest.mark.parametrize("bn", ["1d", "2d"])
def test_batchnorm_train_mode_sum_decomposition(bn):
    """Train-mode BatchNorm: g_i = b_i^T a_i with b the batch loss's output gradient.

    Reference: the output gradients of every layer from autograd (batch loss), per-example
    products by einsum, and their sum equals the true batch gradient.
    """
    torch.manual_seed(3)
    if bn == "2d":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), Flatten(), nn.Linear(27, 4)).double()
        x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 4)).double()
        x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    # Reference: record inputs/outputs with plain hooks, batch-loss output gradients.
    saved = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: saved.__setitem__(k, (i[0], o)))
             for k, m in enumerate(model) if any(True for _ in m.parameters())]
    loss = F.cross_entropy(model(x), y, reduction="sum")
    outs = [saved[k][1] for k in sorted(saved)]
    bs = torch.autograd.grad(loss, outs)
    batch_grads = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), list(model.parameters()))
    for h in hooks:
        h.remove()
    ref = {}
    for (k, (a, _)), b in zip(sorted(saved.items()), bs):
        m = model[k]
        if isinstance(m, nn.Linear):
            ref[f"{k}.weight"] = torch.einsum("bo,bi->boi", b, a)
            ref[f"{k}.bias"] = b
        elif isinstance(m, nn.Conv2d):
            cols = F.unfold(a, 3)  # [B, C*9, T]
            ref[f"{k}.weight"] = torch.einsum("bot,bit->boi", b.flatten(2), cols).reshape(6, *m.weight.shape)
            ref[f"{k}.bias"] = b.flatten(2).sum(2)
        else:
            dims = [0] + list(range(2, a.dim()))
            xhat = (a - a.mean(dims, keepdim=True)) / torch.sqrt(a.var(dims, unbiased=False, keepdim=True) + m.eps)
            ref[f"{k}.weight"] = (xhat * b).reshape(6, a.shape[1], -1).sum(2)
            ref[f"{k}.bias"] = b.reshape(6, a.shape[1], -1).sum(2)
    for (name, _), g in zip(model.named_parameters(), batch_grads):
        torch.testing.assert_close(ref[name].sum(0), g, **TOL)  # the decomposition sums to the batch gradient
    engine = engm_fast.attach(model)
    grads = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    torch.testing.assert_close(grads.sqnorms().sqrt(), flat_norms(ref), **TOL)
    w = torch.rand(6, dtype=torch.float64)
    for p, g in grads.weighted_grads(w).items():
        torch.testing.assert_close(g, torch.einsum("b,b...->...", w, ref[grads.names[p]]), **TOL)


class TwoCalls(nn.Module):
    """One Linear called twice per step (TRADES-like clean + adversarial forward)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        clean = self.head(torch.tanh(self.body(x)))
        shifted = self.head(torch.tanh(self.body(x.flip(-1) * 0.5)))
        return clean + 0.3 * torch.sin(shifted)


def test_module_called_twice():
    _check_model(TwoCalls(), torch.randn(6, 5), torch.randint(0, 3, (6,)))


class Tied(nn.Module):
    """Tied weights: one Parameter in two Linear modules, and an Embedding tied to the output Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.emb = nn.Embedding(11, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.emb(ids))  # [B, T, 6]
        h = torch.tanh(self.b(torch.tanh(self.a(h))))
        return self.out(h.mean(1))


def test_shared_parameters():
    _check_model(Tied(), torch.randint(0, 11, (5, 4)), torch.randint(0, 11, (5,)))


class Affine(nn.Module):
    """A custom module with its own parameters: handled by the torch.func fallback."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x, power=1):
        return (x * self.scale + self.shift) ** power


class WithFallback(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.aff = Affine(5)
        self.prelu = nn.PReLU(5)
        self.bil = nn.Bilinear(5, 4, 3)
        self.cls = nn.Parameter(torch.randn(3))  # owned by the root module: root fallback

    def forward(self, x):
        h = self.prelu(self.aff(self.lin(x), 1))
        return self.bil(h, x) + self.cls


def test_fallback_modules():
    """Modules without a rule: parameters used elementwise are followed (Affine's scale and shift,
    the root's cls); PReLU's and Bilinear's reach F.prelu / F.bilinear with the batch, which the
    engine cannot follow: those calls take the torch.func fallback."""
    model = WithFallback()
    engine = engm_fast.attach(model)
    assert set(engine.generic_modules) == {"aff", "prelu", "bil", "<root>"}
    engm_fast.release(model)
    _check_model(model, torch.randn(5, 4), torch.randint(0, 3, (5,)))
    engine = engm_fast.attach(model)
    engine.backward(F.cross_entropy(model(torch.randn(5, 4).double()), torch.randint(0, 3, (5,)), reduction="none"))
    assert set(engine.fallback_modules) == {"prelu", "bil"}
    engm_fast.release(model)


def test_multihead_attention_fallback():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h, _ = self.attn(x, x, x, need_weights=False)
            return self.out(h.mean(1))

    _check_model(Block(), torch.randn(4, 5, 8), torch.randint(0, 3, (4,)))


def test_frozen_parameters_are_skipped():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[0].weight.requires_grad_(False)
    _check_model(model, torch.randn(5, 4), torch.randint(0, 3, (5,)))


def test_per_example_grad_norms_public_api_leaves_grads():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), Flatten(), nn.Linear(27, 4)).double()
    x, y = torch.randn(5, 1, 5, 5, dtype=torch.float64), torch.randint(0, 4, (5,))
    ref = flat_norms(vmap_per_example_grads(model, _ce, x, y))
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel):
        p.grad = s.clone()
    # No engine attached: exact but slow path (one backward per example), with a warning.
    with pytest.warns(UserWarning, match="no engine is attached"):
        slow = engm_fast.per_example_grad_norms(model, F.cross_entropy(model(x), y, reduction="none"))
    engm_fast.attach(model)
    fast = engm_fast.per_example_grad_norms(model, F.cross_entropy(model(x), y, reduction="none"))
    torch.testing.assert_close(slow, ref, **TOL)
    torch.testing.assert_close(fast, ref, **TOL)
    for p, s in zip(model.parameters(), sentinel):
        assert torch.equal(p.grad, s)
    engm_fast.release(model)


def test_float32_norms_dtype():
    model = nn.Linear(3, 2)
    engm_fast.attach(model)
    n = engm_fast.per_example_grad_norms(model, model(torch.randn(4, 3)).pow(2).sum(1))
    assert n.dtype == torch.float32 and n.shape == (4,)
    engm_fast.release(model)


def test_attack_passes_leave_no_state():
    """Input-gradient passes (a PGD attack) keep nothing and do not pollute the next step."""
    import gc
    import weakref

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), Flatten(), nn.Linear(36, 3)).double()
    engine = engm_fast.attach(model)
    x, y = torch.randn(5, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    refs = []
    for _ in range(3):
        x_adv = (x + 0.01 * torch.randn_like(x)).requires_grad_(True)
        h = model[0](x_adv)
        refs.append(weakref.ref(h))
        loss = F.cross_entropy(model[3](model[2](model[1](h))), y)
        (gx,) = torch.autograd.grad(loss, x_adv)
        del h, loss, gx, x_adv
    gc.collect()
    assert all(r() is None for r in refs), "an attack pass left activations alive"
    assert engine._session is None
    assert all(p.grad is None for p in model.parameters())
    ref = flat_norms(vmap_per_example_grads(model, _ce, x, y))
    torch.testing.assert_close(engm_fast.per_example_grad_norms(model, F.cross_entropy(model(x), y, reduction="none")), ref, **TOL)
    engm_fast.release(model)


def test_inplace_activation_after_layer():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(inplace=True), Flatten(), nn.Linear(27, 3)).double().eval()
    _check_model(model, torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,)))


def test_conv_routes_and_chunking(monkeypatch):
    """Both conv norm routes are taken, and tiny chunk limits (many chunks) change nothing."""
    from engm_fast.engine.rules import conv as conv_mod

    seen = []
    original = conv_mod.ConvWeight.route
    monkeypatch.setattr(conv_mod.ConvWeight, "route", lambda self: seen.append(original(self)) or seen[-1])
    monkeypatch.setattr(conv_mod, "_DIRECT_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(conv_mod, "_UNFOLD_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(conv_mod, "_KEEP_PER_EXAMPLE_ELEMENTS", 0)  # recompute the weighted sum
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 16, 5, groups=1), nn.Tanh(),
                          Flatten(), nn.Linear(16, 3))
    _check_model(model, torch.randn(5, 2, 5, 5), torch.randint(0, 3, (5,)))
    assert set(seen) == {"direct", "ghost"}


def test_pgd_attack_pauses_recording():
    """engm_fast.at.pgd_attack runs with the engine paused: no taps in its graphs at all."""
    from engm_fast.engine import tap as tap_mod

    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), Flatten(), nn.Linear(27, 3)).double()
    engine = engm_fast.attach(model)
    calls = []
    original = tap_mod._apply
    tap_mod._apply = lambda *a: calls.append(1) or original(*a)
    try:
        x, y = torch.rand(4, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
        engm_fast.at.pgd_attack(model, x, y, eps=0.1, alpha=0.05, steps=3)
        assert calls == [] and engine._suspended is False
        model(x)  # outside the attack, recording is back on
        assert calls == [1, 1]
    finally:
        tap_mod._apply = original
        engm_fast.release(model)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_layers_sharing_an_output_gradient_share_its_norm_work(backend, monkeypatch):
    """Linear-like contributions whose output gradient is one tensor (an LSTM's W_ih and W_hh
    share dz) are normed together as ``dz^T [a_1 | a_2]``: the total equals the sum of the
    separate norms, also beside a layer with its own output gradient and a materialized one."""
    from engm_fast.engine.contributions import Dense, OuterProduct
    from engm_fast.engine.engine import PerExampleGradients

    if backend not in engm_fast.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    g = torch.Generator().manual_seed(0)
    B, T = 3, 5
    dz = torch.randn(B, T, 7, dtype=torch.float64, generator=g)
    a1, a2 = (torch.randn(B, T, d, dtype=torch.float64, generator=g) for d in (4, 6))
    a3, b3 = torch.randn(B, T, 2, dtype=torch.float64, generator=g), torch.randn(B, T, 3, dtype=torch.float64, generator=g)
    params = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in ((7, 4), (7, 6), (3, 2), (7,))]
    contributions = {params[0]: OuterProduct(a1, dz, (7, 4)), params[1]: OuterProduct(a2, dz, (7, 6)),
                     params[2]: OuterProduct(a3, b3, (3, 2)), params[3]: Dense(dz.sum(1))}
    grads = PerExampleGradients(contributions, {p: str(i) for i, p in enumerate(params)}, B, torch.float64,
                                torch.device("cpu"))
    per_example = [torch.einsum("bto,bti->boi", dz, a1), torch.einsum("bto,bti->boi", dz, a2),
                   torch.einsum("bto,bti->boi", b3, a3), dz.sum(1)]
    expected = sum(p.reshape(B, -1).pow(2).sum(1) for p in per_example)
    calls = []
    native = engm_fast.ops.per_example_sqnorms

    def spy(a_list, b_list):
        calls.append([(a.shape[-1], b.shape[-1]) for a, b in zip(a_list, b_list)])
        return native(a_list, b_list)

    monkeypatch.setattr(engm_fast.ops, "per_example_sqnorms", spy)
    with engm_fast.use_backend(backend):
        torch.testing.assert_close(grads.sqnorms(), expected, rtol=1e-12, atol=0)
    # one layer of inputs 4 + 6 against dz, the unshared layer, the bias as [B, 7] x ones
    assert calls == [[(10, 7), (2, 3), (7, 1)]]
