"""torch.nn's recurrent layers and attention, transposed convolutions, rules users register,
and several calls of a convolution per step: the engine against one backward per example,
float64."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engm_fast
from conftest import assert_engine_matches, loop_per_example_grads

DT = torch.float64


def _check(model, make_losses, B):
    model = model.to(DT)
    ref = loop_per_example_grads(model, make_losses, B)
    return assert_engine_matches(model, make_losses, ref, B)


class Recurrent(nn.Module):
    """A recurrent layer, optionally with initial states computed from the input, and a head on
    the outputs (mean over time) or on the last hidden state."""

    def __init__(self, cls, batch_first, layers, bidirectional, bias, initial, proj, head_on):
        super().__init__()
        kw = dict(proj_size=proj) if proj else {}
        self.rnn = cls(4, 5, num_layers=layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first,
                       **kw)
        self.D = 2 if bidirectional else 1
        self.H = proj or 5
        self.init = nn.Linear(4, layers * self.D * self.H) if initial else None
        self.head = nn.Linear(self.D * self.H, 3)
        self.lstm, self.batch_first, self.head_on = cls is nn.LSTM, batch_first, head_on

    def forward(self, x):  # x: [B, T, 4]
        inp = x if self.batch_first else x.transpose(0, 1)
        hx = None
        if self.init is not None:
            h = self.init(x[:, 0]).view(x.shape[0], -1, self.H).transpose(0, 1).contiguous()
            hx = (h, torch.tanh(h.flip(-1)).repeat_interleave(5, -1)[..., :5]) if self.lstm else h
        out, h_n = self.rnn(inp, hx)
        if self.head_on == "last":  # h_n: [layers * D, B, H], the batch on dim 1
            h = h_n[0] if self.lstm else h_n
            return self.head(h[-self.D:].transpose(0, 1).reshape(x.shape[0], -1))
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1))


_RNN_OPTIONS = ([True, False], [1, 2], [False, True], [True, False], [False, True], ["outputs", "last"])
# A strength-2 orthogonal array: every pair of values of every two options appears (8 runs for 6
# two-valued options); the full product is test_recurrent_layers_all_configurations (slow).
_PAIRWISE = ["000000", "000111", "011001", "011110", "101010", "101101", "110011", "110100"]


def _rnn_cases(full: bool):
    rows = itertools.product(*_RNN_OPTIONS) if full else (
        tuple(opts[int(c)] for opts, c in zip(_RNN_OPTIONS, row)) for row in _PAIRWISE)
    rows = list(rows)
    for cls in (nn.RNN, nn.LSTM, nn.GRU):
        for bf, layers, bi, bias, initial, head_on in rows:
            yield cls, bf, layers, bi, bias, initial, 0, head_on
    for bf, layers, bi in itertools.product([True, False], [1, 2], [False, True]) if full else [(True, 2, True),
                                                                                               (False, 1, False)]:
        yield nn.LSTM, bf, layers, bi, True, True, 2, "outputs"  # proj_size


_RNN_ARGS = "cls,batch_first,layers,bidirectional,bias,initial,proj,head_on"


@pytest.mark.parametrize(_RNN_ARGS, list(_rnn_cases(False)), ids=lambda v: getattr(v, "__name__", str(v)))
def test_recurrent_layers(cls, batch_first, layers, bidirectional, bias, initial, proj, head_on):
    _recurrent_case(cls, batch_first, layers, bidirectional, bias, initial, proj, head_on)


@pytest.mark.parametrize(_RNN_ARGS, [c for c in _rnn_cases(False) if c[0] is nn.LSTM],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_lstm_layers_on_the_reference_recurrence(cls, batch_first, layers, bidirectional, bias, initial, proj, head_on):
    """The LSTM's recurrence runs a C++ kernel on CPU tensors and its pure-PyTorch reference on
    other devices: the reference through the engine, here on the CPU with the "torch" backend."""
    with engm_fast.use_backend("torch"):
        _recurrent_case(cls, batch_first, layers, bidirectional, bias, initial, proj, head_on)


@pytest.mark.slow
@pytest.mark.parametrize(_RNN_ARGS, list(_rnn_cases(True)), ids=lambda v: getattr(v, "__name__", str(v)))
def test_recurrent_layers_all_configurations(cls, batch_first, layers, bidirectional, bias, initial, proj, head_on):
    _recurrent_case(cls, batch_first, layers, bidirectional, bias, initial, proj, head_on)


def _recurrent_case(cls, batch_first, layers, bidirectional, bias, initial, proj, head_on):
    B = 3
    x, y = torch.randn(B, 5, 4, dtype=DT), torch.randint(0, 3, (B,))
    model = Recurrent(cls, batch_first, layers, bidirectional, bias, initial, proj, head_on)
    engine = _check(model, lambda m, i: F.cross_entropy(m(x[i]), y[i], reduction="none"), B)
    assert engine.module_kinds()["rnn"] == "forward" and engine.fallback_modules == []


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_batch_of_one_and_time_major_input_equal_to_batch(cls):
    """B = 1, and a time-major input whose length equals the batch size."""
    for B, T in ((1, 4), (4, 4)):
        x, y = torch.randn(B, T, 4, dtype=DT), torch.randint(0, 3, (B,))
        model = Recurrent(cls, False, 2, True, True, False, 0, "outputs")
        _check(model, lambda m, i: F.cross_entropy(m(x[i]), y[i], reduction="none"), B)


@pytest.mark.parametrize("cls", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("B", [1, 3])
def test_recurrent_cells_in_a_user_loop(cls, B):
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.head = cls(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            state = None
            for t in range(x.shape[1]):
                state = self.cell(x[:, t], state)
            return self.head(state[0] if isinstance(state, tuple) else state)

    x, y = torch.randn(B, 4, 4, dtype=DT), torch.randint(0, 3, (B,))
    _check(Loop(), lambda m, i: F.cross_entropy(m(x[i]), y[i], reduction="none"), B)


def test_recurrent_forward_equals_torch_outside_and_inside_recording():
    """The rule's own recurrence gives torch's outputs (also unbatched inputs)."""
    for cls in (nn.RNN, nn.LSTM, nn.GRU):
        m = cls(4, 5, num_layers=2, bidirectional=True).double()
        plain = cls(4, 5, num_layers=2, bidirectional=True).double()
        plain.load_state_dict(m.state_dict())
        engm_fast.attach(m)
        for x in (torch.randn(6, 3, 4, dtype=DT), torch.randn(6, 4, dtype=DT)):
            out, h = m(x)
            ref_out, ref_h = plain(x)
            torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
            for a, b in zip(h if isinstance(h, tuple) else (h,), ref_h if isinstance(ref_h, tuple) else (ref_h,)):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        engm_fast.release(m)


_MODES = [(nn.RNN, dict(nonlinearity="relu")), (nn.RNN, {}), (nn.GRU, {}), (nn.LSTM, {}), (nn.LSTM, dict(proj_size=3))]
_MODE_IDS = ["RNN-relu", "RNN-tanh", "GRU", "LSTM", "LSTM-proj"]


@pytest.mark.parametrize("cls,kw", _MODES, ids=_MODE_IDS)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_recurrent_plain_backward_through_a_recorded_forward(cls, kw, layers, bidirectional):
    """A backward that is not the engine's (a user's ``loss.backward()`` while the engine is
    attached) through the rule's recurrence gives torch's gradients for every parameter, the input
    and the initial states, with gradients arriving at the outputs, ``h_n`` and ``c_n`` at once,
    also after the outputs were changed in place (with one layer and direction they are the
    recurrence node's own output)."""
    torch.manual_seed(0)
    m = cls(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=True, **kw).double()
    plain = cls(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=True, **kw).double()
    plain.load_state_dict(m.state_dict())
    H_out, LD, D = kw.get("proj_size", 5), layers * (2 if bidirectional else 1), 2 if bidirectional else 1
    x = torch.randn(3, 6, 4, dtype=DT)
    h0, c0 = torch.randn(LD, 3, H_out, dtype=DT), torch.randn(LD, 3, 5, dtype=DT)
    w_out, w_h, w_c = torch.randn(3, 6, D * H_out, dtype=DT), torch.randn(LD, 3, H_out, dtype=DT), torch.randn(LD, 3, 5, dtype=DT)

    def grads(module, in_place):
        xs, hs, cs = (t.clone().requires_grad_() for t in (x, h0, c0))
        out, state = module(xs, (hs, cs) if cls is nn.LSTM else hs)
        # in place on the output (the fused op's own backward needs its output, so the reference
        # scales out of place)
        out = out.mul_(2.0) if in_place else out * 2.0
        states = state if cls is nn.LSTM else (state,)
        loss = (out * w_out).sum() + (states[0] * w_h).sum() + ((states[1] * w_c).sum() if cls is nn.LSTM else 0)
        loss.backward()
        inputs = (xs, hs, cs) if cls is nn.LSTM else (xs, hs)
        return [t.grad for t in inputs] + [p.grad for p in module.parameters()], out

    engm_fast.attach(m)
    try:
        got, out = grads(m, True)
    finally:
        engm_fast.release(m)
    ref, ref_out = grads(plain, False)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    names = ["x", "h0", "c0"][:3 if cls is nn.LSTM else 2] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda msg: f"{name}: {msg}")


# The LSTM's recurrence has two implementations: the C++ kernel ("auto" on the CPU) and its
# reference (the "torch" backend, and every other device); the others have one.
_NODE_CASES = [pytest.param(cls, kw, backend, id=f"{name}-{backend}") for (cls, kw), name in zip(_MODES, _MODE_IDS)
               for backend in (("auto", "torch") if cls is nn.LSTM else ("auto",))]


@pytest.mark.parametrize("cls,kw,backend", _NODE_CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_recurrence_node_gradcheck(cls, kw, backend, reverse):
    """The hand-written backward through time of one layer and direction against finite
    differences, for every input, with gradients at the states, h_T and c_T."""
    from types import SimpleNamespace

    from engm_fast.engine.rules._bptt import recurrence
    from engm_fast.engine.rules.recurrent import _mode

    mode = _mode(cls(2, 5, **kw))
    B, T, H = 2, 3, 3
    P = 2 if kw.get("proj_size") else 0
    H_out = P or H
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1) * H
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, dtype=DT, generator=g).requires_grad_()

    inputs = [rand(B, T, G), rand(B, H_out), rand(B, H) if mode == "LSTM" else None, rand(G, H_out), rand(G),
              rand(P, H) if P else None, rand(B, T, P) if P else None]

    def run(*args):
        engine = SimpleNamespace(in_own_backward=lambda: False)
        record, projection = SimpleNamespace(name="rnn", engine=engine), SimpleNamespace()
        out, h, c = recurrence(record, mode, H, reverse, *args[:5], *args[5:], projection=projection)
        return (out, h) if c is None else (out, h, c)

    with engm_fast.use_backend(backend):
        assert torch.autograd.gradcheck(run, tuple(inputs), atol=1e-7)


@pytest.mark.parametrize("cls,kw", _MODES, ids=_MODE_IDS)
def test_recurrent_edge_cases(cls, kw):
    """An empty batch (a rank without examples), a second derivative (refused, naming the module
    and the way out, which works), and CPU autocast (the states stay float32)."""
    torch.manual_seed(0)
    m = cls(4, 5, batch_first=True, **kw)
    engine = engm_fast.attach(m)
    try:
        out, _ = m(torch.randn(0, 6, 4, requires_grad=True))
        out.sum().backward()
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())

        x = torch.randn(3, 6, 4, requires_grad=True)
        (gx,) = torch.autograd.grad(m(x)[0].pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match=r"module '<root>'.*second derivative.*paused"):
            gx.sum().backward()
        with engine.paused():
            (gx,) = torch.autograd.grad(m(x)[0].pow(2).sum(), x, create_graph=True)
            gx.sum().backward()

        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = m(x)
        with engine.paused():
            ref, _ = m(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0, atol=3e-2)
    finally:
        engm_fast.release(m)


class LearnedInitialState(nn.Module):
    """A recurrent layer whose initial states are learned: looked up per example from a one-row
    Embedding (supported), or a parameter expanded to the batch (refused)."""

    def __init__(self, cls, per_example: bool):
        super().__init__()
        self.rnn, self.lstm, self.per_example = cls(3, 5, num_layers=2, batch_first=True), cls is nn.LSTM, per_example
        if per_example:
            self.h0, self.c0 = nn.Embedding(1, 2 * 5), nn.Embedding(1, 2 * 5)
        else:
            self.h0 = nn.Parameter(torch.randn(2, 1, 5))
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        B = x.shape[0]
        if self.per_example:
            ids = torch.zeros(B, dtype=torch.long)
            h0 = self.h0(ids).view(B, 2, 5).transpose(0, 1)
            c0 = self.c0(ids).view(B, 2, 5).transpose(0, 1) if self.lstm else None
            if c0 is None:
                x = x + 0 * self.c0(ids)[:, None, :3]
        else:
            h0 = self.h0.expand(2, B, 5)
            c0 = torch.zeros_like(h0)
        out, _ = self.rnn(x, (h0, c0) if self.lstm else h0)
        return self.head(out).pow(2).sum((1, 2))


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_learned_initial_states(cls):
    B = 3
    x = torch.randn(B, 4, 3, dtype=DT)
    _check(LearnedInitialState(cls, True), lambda m, i: m(x[i]), B)
    model = LearnedInitialState(cls, False).to(DT)
    engm_fast.attach(model)
    try:
        with pytest.raises(NotImplementedError, match=r"module 'rnn' .*initial states computed from parameters alone"):
            engm_fast.per_example_grad_norms(model, model(x))
    finally:
        engm_fast.release(model)


def test_packed_sequence_is_refused_by_name():
    model = nn.LSTM(3, 4, batch_first=True)
    engm_fast.attach(model)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 5, 3), [5, 3], batch_first=True)
    with pytest.raises(NotImplementedError, match=r"'<root>' \(LSTM\): PackedSequence"):
        model(packed)
    engm_fast.release(model)


class Attention(nn.Module):
    def __init__(self, batch_first, kv, bias, add_bias_kv, add_zero_attn, need_weights):
        super().__init__()
        kdim = vdim = None
        if kv == "separate":
            kdim, vdim = 6, 7
        self.attn = nn.MultiheadAttention(8, 2, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                                          kdim=kdim, vdim=vdim, batch_first=batch_first)
        self.head = nn.Linear(8, 3)
        self.batch_first, self.kv, self.need_weights = batch_first, kv, need_weights

    def forward(self, q, k, v, attn_mask=None, key_padding_mask=None):
        if not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if self.kv == "self":
            k = v = q
        elif self.kv == "cross":
            v = k
        out, weights = self.attn(q, k, v, key_padding_mask=key_padding_mask, need_weights=self.need_weights,
                                 attn_mask=attn_mask)
        out = out if self.batch_first else out.transpose(0, 1)
        y = self.head(out.mean(1))
        if self.need_weights:
            y = y + weights.pow(2).sum((-1, -2)).unsqueeze(-1)
        return y


# A covering subset of the configurations (each value of each option at least twice);
# the full product is test_attention_all_configurations (slow).
_ATTENTION = [
    # batch_first, kv, bias, add_bias_kv, add_zero_attn, need_weights, mask, key_padding_mask
    (True, "self", True, False, False, False, None, False),
    (False, "self", True, False, False, True, "float", True),
    (True, "cross", False, True, False, False, "bool", True),
    (False, "cross", True, False, True, True, None, False),
    (True, "separate", True, True, True, True, "3d", False),
    (False, "separate", False, False, False, False, "bool", True),
    (True, "self", False, True, True, True, "float", False),
    (False, "self", True, True, False, False, "3d", True),
]


def _attention_case(batch_first, kv, bias, add_bias_kv, add_zero_attn, need_weights, mask, kpm, B=3):
    L, S, H = 4, 5, 2
    model = Attention(batch_first, kv, bias, add_bias_kv, add_zero_attn, need_weights)
    q = torch.randn(B, L, 8, dtype=DT)
    k = torch.randn(B, S, 6 if kv == "separate" else 8, dtype=DT)
    v = torch.randn(B, S, 7 if kv == "separate" else 8, dtype=DT)
    S_eff = L if kv == "self" else S
    y = torch.randint(0, 3, (B,))
    am = {None: None, "float": torch.randn(L, S_eff, dtype=DT), "bool": torch.rand(L, S_eff) < 0.3,
          "3d": torch.randn(B, H, L, S_eff, dtype=DT)}[mask]
    if mask == "bool":
        am[:, 0] = False
    pad = None
    if kpm:
        pad = torch.rand(B, S_eff) < 0.3
        pad[:, 0] = False

    def losses(m, i):
        mask_i = am[i].reshape(-1, L, S_eff) if mask == "3d" else am
        return F.cross_entropy(m(q[i], k[i], v[i], mask_i, None if pad is None else pad[i]), y[i], reduction="none")

    engine = _check(model, losses, B)
    assert engine.module_kinds()["attn"] == "forward" and engine.fallback_modules == []


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("case", _ATTENTION)
def test_attention(case):
    _attention_case(*case)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("case", list(itertools.product([True, False], ["self", "cross", "separate"], [True, False],
                                                        [False, True], [False, True], [True, False],
                                                        [None, "float", "bool", "3d"], [False, True])))
def test_attention_all_configurations(case):
    _attention_case(*case)


def test_attention_batch_of_one():
    _attention_case(True, "self", True, True, False, True, "float", True, B=1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("B,T", [(3, 5), (4, 4)])
def test_transformer_encoder_layer(batch_first, norm_first, B, T):
    """Time-major (the default batch_first=False) too, also with the length equal to the batch."""
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(8, 3)

        def forward(self, x, pad):
            h = self.encoder(x if batch_first else x.transpose(0, 1), src_key_padding_mask=pad)
            return self.head((h if batch_first else h.transpose(0, 1)).mean(1))

    x, y = torch.randn(B, T, 8, dtype=DT), torch.randint(0, 3, (B,))
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, -1] = True
    _check(Encoder(), lambda m, i: F.cross_entropy(m(x[i], pad[i]), y[i], reduction="none"), B)


def test_transformer_decoder_layer_causal():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0)
            self.head = nn.Linear(8, 3)

        def forward(self, x, memory):
            T = x.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
            h = self.layer(x.transpose(0, 1), memory.transpose(0, 1), tgt_mask=mask, tgt_is_causal=True)
            return self.head(h.transpose(0, 1).mean(1))

    x, mem, y = torch.randn(3, 5, 8, dtype=DT), torch.randn(3, 4, 8, dtype=DT), torch.randint(0, 3, (3,))
    _check(Decoder(), lambda m, i: F.cross_entropy(m(x[i], mem[i]), y[i], reduction="none"), 3)


@pytest.mark.parametrize("conv,shape,kwargs", [
    (nn.ConvTranspose1d, (4, 7), dict(kernel_size=3, stride=2)),
    (nn.ConvTranspose2d, (4, 5, 6), dict(kernel_size=3)),
    (nn.ConvTranspose2d, (4, 5, 6), dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
    (nn.ConvTranspose2d, (4, 5, 6), dict(kernel_size=(2, 3), groups=2, dilation=2, bias=False)),
    (nn.ConvTranspose3d, (4, 3, 4, 3), dict(kernel_size=2, stride=(2, 1, 2))),
])
@pytest.mark.parametrize("B", [1, 3])
def test_conv_transpose(conv, shape, kwargs, B):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.head = conv(4, 6, **kwargs), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.up(x)).flatten(2).mean(2))

    x, y = torch.randn(B, *shape, dtype=DT), torch.randint(0, 3, (B,))
    engine = _check(Net(), lambda m, i: F.cross_entropy(m(x[i]), y[i], reduction="none"), B)
    assert engine.module_kinds()["up"] == "rule"


def test_conv_transpose_output_size_argument():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.head = nn.ConvTranspose2d(2, 3, 3, stride=2), nn.Linear(3, 3)

        def forward(self, x):
            return self.head(self.up(x, output_size=[10, 12]).mean((2, 3)))

    x, y = torch.randn(3, 2, 4, 5, dtype=DT), torch.randint(0, 3, (3,))
    _check(Net(), lambda m, i: F.cross_entropy(m(x[i]), y[i], reduction="none"), 3)


def test_conv_called_twice_per_step():
    """TRADES: the clean and the adversarial input through one conv net in one step."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 16, 5), nn.Tanh(), nn.Flatten(),
                        nn.Linear(16, 3))
    x, y = torch.randn(4, 2, 5, 5, dtype=DT), torch.randint(0, 3, (4,))
    delta = 0.1 * torch.randn_like(x)

    def losses(m, i):
        clean, adv = m(x[i]), m(x[i] + delta[i])
        return F.cross_entropy(clean, y[i], reduction="none") + F.kl_div(
            F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="none").sum(1)

    _check(net, losses, 4)


class ScaledRMSNorm(nn.Module):
    """A user's own RMSNorm (as in many LLM codebases): ``weight * x / rms(x)``."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_user_registered_rule_is_used():
    calls = []

    @engm_fast.register_rule(ScaledRMSNorm)
    def _rms(module, inputs, grad_output):
        (x,) = inputs
        calls.append(tuple(x.shape))
        xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps)
        return {"weight": (xhat * grad_output).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}

    try:
        model = nn.Sequential(nn.Linear(4, 6), ScaledRMSNorm(6), nn.Tanh(), nn.Linear(6, 3))
        x, y = torch.randn(5, 3, 4, dtype=DT), torch.randint(0, 3, (5,))
        engine = _check(model, lambda m, i: F.cross_entropy(m(x[i]).mean(1), y[i], reduction="none"), 5)
        assert engine.module_kinds()["1"] == "rule" and calls
        with pytest.raises(ValueError, match="already registered"):
            engm_fast.register_rule(ScaledRMSNorm)(_rms)
    finally:
        engm_fast.unregister_rule(ScaledRMSNorm)


def test_user_rule_with_wrong_shape_is_named():
    @engm_fast.register_rule(ScaledRMSNorm)
    def _bad(module, inputs, grad_output):
        return {"weight": grad_output.sum(0)}  # forgot the batch

    try:
        model = nn.Sequential(nn.Linear(4, 6), ScaledRMSNorm(6)).double()
        engm_fast.attach(model)
        with pytest.raises(ValueError, match=r"module '1' \(ScaledRMSNorm\).*\[5, \*\(6,\)\]"):
            engm_fast.per_example_grad_norms(model, model(torch.randn(5, 4, dtype=DT)).pow(2).sum(1))
        engm_fast.release(model)
    finally:
        engm_fast.unregister_rule(ScaledRMSNorm)


def test_module_without_rule_is_followed_or_falls_back():
    """Without a rule, ScaledRMSNorm's weight is followed as a shared tensor; an einsum with the
    batch cannot be followed, and that call takes the torch.func fallback instead. Both exact."""
    class Einsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            return torch.einsum("btd,de->bte", x, self.weight)

    model = nn.Sequential(nn.Linear(4, 6), ScaledRMSNorm(6), Einsum(), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 3, 4, dtype=DT), torch.randint(0, 3, (5,))
    engine = _check(model, lambda m, i: F.cross_entropy(m(x[i]).mean(1), y[i], reduction="none"), 5)
    assert engine.module_kinds()["1"] == "generic" and engine.fallback_modules == ["2"]


class TimeMajorTagger(nn.Module):
    """The classic time-major layout: Embedding on [T, B] ids, nn.LSTM(batch_first=False), Linear."""

    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(11, 6), nn.LSTM(6, 5), nn.Linear(5, 3)

    def forward(self, ids_tb):
        out, _ = self.rnn(self.emb(ids_tb))
        return self.head(out[-1])


@pytest.mark.parametrize("B,T", [(3, 5), (1, 4)])
def test_time_major_embedding_into_recurrent_layer(B, T):
    ids, y = torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,))
    _check(TimeMajorTagger(), lambda m, i: F.cross_entropy(m(ids[i].t()), y[i], reduction="none"), B)


def test_time_major_with_length_equal_to_batch_needs_batch_dim():
    """T == B cannot be told apart from a batch-first call: engine.batch_dim(1) says it."""
    B = T = 4
    ids, y = torch.randint(0, 11, (B, T)), torch.randint(0, 3, (B,))
    model = TimeMajorTagger().double()
    ref = loop_per_example_grads(model, lambda m, i: F.cross_entropy(m(ids[i].t()), y[i], reduction="none"), B)
    engine = engm_fast.attach(model)
    with engine.batch_dim(1):
        losses = F.cross_entropy(model(ids.t()), y, reduction="none")
    norms = engine.backward(losses).sqnorms().sqrt()
    torch.testing.assert_close(norms, torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values())),
                               rtol=1e-9, atol=0.0)
    engm_fast.release(model)
