"""Recurrent layers: ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and ``nn.RNNCell``, ``nn.LSTMCell``,
``nn.GRUCell``.

Their forward is one fused op (cuDNN, oneDNN or ATen's CPU loop) that exposes no per-step
gradient, so while the engine records, the rule runs the recurrence itself (``torch.nn``
semantics: gate order, bias placement, ``batch_first``, ``num_layers``, ``bidirectional``,
``proj_size``, dropout between layers, initial states, unbatched inputs), each layer and
direction as one autograd node with a hand-written backward (:mod:`._bptt`), and taps ONE
tensor per layer and direction: the input projection of the whole sequence,
``gx = x W_ih^T + b_ih`` (``[B, T, gates]``). The gate pre-activations are ``z_t = gx_t + gh_t`` with
``gh_t = h_{t-1} W_hh^T + b_hh``, so the gradient that reaches ``gx`` is ``dz`` for every step,
and the per-example gradients are outer products over time, the factored form of a Linear
over T positions::

    W_ih: sum_t dz_t^T x_t      W_hh: sum_t dgh_t^T h_{t-1}      b_ih: sum_t dz_t      b_hh: sum_t dgh_t

with ``dgh = dz`` for RNN and LSTM. For GRU the new gate's hidden part is scaled by the reset
gate, ``n = tanh(gx_n + r * gh_n)``, so ``dgh_n = dz_n * r`` (the recurrence's backward computes
``dgh`` anyway and leaves it on the record). With
``proj_size > 0`` (LSTM) the projection ``h_t = m_t W_hr^T`` gets a zero additive input per
layer and direction, tapped: its gradient is ``dh_t``, and ``W_hr``'s per-example gradient is
``sum_t dh_t^T m_t``.

Outside the engine's recording (attacks, evaluation, torch.func transforms) the module's own
fused forward runs. Inside it, the results equal the fused op's to rounding; with dropout
between layers the masks are drawn in another order (same distribution).
``PackedSequence`` inputs are not supported (a clear ``NotImplementedError``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..contributions import Dense, OuterProduct
from ..registry import Rule, add_rule
from ..shared import SharedTensor
from ..tap import ModuleRecord, ParamRecord, tap
from ._bptt import recurrence

__all__ = []


class _GateRecord(ModuleRecord):
    """The input projection of one layer and direction (or one cell step)."""

    __slots__ = ("w_ih", "w_hh", "b_ih", "b_hh", "h_prev", "dgh")
    kind = "recurrent"

    def __init__(self, engine, name, w_ih, w_hh, b_ih, b_hh):
        super().__init__(engine, name)
        self.w_ih, self.w_hh, self.b_ih, self.b_hh = w_ih, w_hh, b_ih, b_hh
        self.h_prev = None  # [B, T, H_in_hh], set by the recurrence's forward
        self.dgh = None     # GRU: [B, T, gates] gradient of gh, set by the recurrence's backward

    def contribute(self, dz: torch.Tensor, saved: tuple) -> None:
        (x,) = saved
        session = self.engine._session
        dgh = dz if self.dgh is None else self.dgh.to(dz.dtype)
        if self.w_ih.requires_grad:
            session.add(self.w_ih, OuterProduct(x.to(dz.dtype), dz, self.w_ih.shape))
        if self.w_hh.requires_grad:
            session.add(self.w_hh, OuterProduct(self.h_prev.to(dz.dtype), dgh, self.w_hh.shape))
        dz_sum = None
        if self.b_ih is not None and self.b_ih.requires_grad:
            dz_sum = dz.sum(1)
            session.add(self.b_ih, Dense(dz_sum))
        if self.b_hh is not None and self.b_hh.requires_grad:
            session.add(self.b_hh, Dense(dz_sum if dgh is dz and dz_sum is not None else dgh.sum(1)))


class _ProjectionRecord(ParamRecord):
    """An LSTM projection ``h_t = m_t W_hr^T`` over all steps of one layer and direction; its
    tapped tensor is the projection's zero additive input, whose gradient is ``dh_t``."""

    __slots__ = ("m",)
    kind = "LSTM projection"

    def __init__(self, engine, name, param):
        super().__init__(engine, name, param)
        self.m = None  # [B, T, H], set by the recurrence's forward

    def contribute(self, grad: torch.Tensor, saved: tuple) -> None:
        self.engine._session.add(self.param, OuterProduct(self.m.to(grad.dtype), grad, self.param.shape))


def _mode(module) -> str:
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return "LSTM"
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return "GRU"
    return "RNN_RELU" if module.nonlinearity == "relu" else "RNN_TANH"


def _direction(engine, module, name, mode, x, h, c, layer: int, reverse: bool):
    """Runs one layer in one direction over ``x`` ``[B, T, in]``; returns outputs ``[B, T, H]``
    and the final states."""
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    w_ih, w_hh = getattr(module, "weight_ih" + sfx), getattr(module, "weight_hh" + sfx)
    b_ih = getattr(module, "bias_ih" + sfx) if module.bias else None
    b_hh = getattr(module, "bias_hh" + sfx) if module.bias else None
    w_hr = getattr(module, "weight_hr" + sfx) if getattr(module, "proj_size", 0) > 0 else None
    record = _GateRecord(engine, name, w_ih, w_hh, b_ih, b_hh)
    gx = tap(record, (F.linear(x, w_ih, b_ih),), (x,))
    projection = ph = None
    if w_hr is not None:
        projection = _ProjectionRecord(engine, name, w_hr)
        ph = tap(projection, (x.new_zeros(x.shape[0], x.shape[1], w_hr.shape[0]),))
    return recurrence(record, mode, module.hidden_size, reverse, gx, h, c, w_hh, b_hh, w_hr, ph, projection)


def _initial_states(engine, module, name: str, hx, batched: bool) -> list:
    """``hx`` (``[L * D, B, H]``, or ``[L * D, H]`` for an unbatched input) as one batched
    ``[B, H]`` tensor per layer and direction, each made batched with the batch first (in ``hx``
    the batch is dim 1; an Embedding output looked up per example, then unsqueezed, is found as
    batched this way)."""
    states = []
    for k in range(hx.shape[0]):
        h = hx[k] if batched else hx[k].unsqueeze(0)
        if isinstance(h, SharedTensor) and not h._maybe_batched:
            # A state computed from parameters alone, the same for every example: expanded to
            # the batch by the caller, it cannot be told from the batch (dim 0 here is B).
            raise NotImplementedError(
                f"module '{name}' ({type(module).__name__}): initial states computed from parameters alone (the "
                "same for every example, such as a learned h0 expanded to the batch) are not supported by "
                "engm_fast. Make them per-example first, e.g. a learned state as nn.Embedding(1, hidden) looked "
                "up with torch.zeros(B, dtype=torch.long), then .unsqueeze(0)")
        states.append(engine.batched(h))
    return states


def _rnn_forward(engine, module: nn.RNNBase, name: str, input, hx=None):
    if isinstance(input, nn.utils.rnn.PackedSequence):
        raise NotImplementedError(f"module '{name}' ({type(module).__name__}): PackedSequence inputs are not "
                                  "supported by engm_fast; pad the sequences (e.g. pad_packed_sequence) and pass a "
                                  "tensor, masking the padded steps in the loss")
    mode = _mode(module)
    batched = input.dim() == 3
    # The true batch size first (the model's first argument may be time-major): the input may
    # be an Embedding output whose batch dimension is decided with it.
    engine._batch = input.shape[0 if module.batch_first else 1] if batched else 1
    input = engine.batched(input)
    if not batched:  # [T, in]: one sequence, whatever batch_first says
        x = input.unsqueeze(0)
    else:
        x = input if module.batch_first else input.transpose(0, 1)
    B = x.shape[0]
    D = 2 if module.bidirectional else 1
    L = module.num_layers
    H_out = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    if mode == "LSTM":
        if hx is None:
            h0 = x.new_zeros(L * D, B, H_out)
            c0 = x.new_zeros(L * D, B, module.hidden_size)
        else:
            h0, c0 = (_initial_states(engine, module, name, t, batched) for t in hx)
    else:
        h0 = x.new_zeros(L * D, B, H_out) if hx is None else _initial_states(engine, module, name, hx, batched)
        c0 = None
    layer_in = x
    hn, cn = [], []
    for layer in range(L):
        outs = []
        for d in range(D):
            k = layer * D + d
            out, h, c = _direction(engine, module, name, mode, layer_in, h0[k], None if c0 is None else c0[k],
                                   layer, d == 1)
            outs.append(out)
            hn.append(h)
            cn.append(c)
        layer_in = outs[0] if D == 1 else torch.cat(outs, -1)
        if module.dropout and module.training and layer < L - 1:
            layer_in = F.dropout(layer_in, module.dropout, True)
    output = layer_in if (module.batch_first or not batched) else layer_in.transpose(0, 1)
    h_n = torch.stack(hn, 0)
    if not batched:
        output = output.squeeze(0)
        h_n = h_n.squeeze(1)
    if mode == "LSTM":
        c_n = torch.stack(cn, 0)
        if not batched:
            c_n = c_n.squeeze(1)
        return output, (h_n, c_n)
    return output, h_n


def _cell_forward(engine, module: nn.RNNCellBase, name: str, input, hx=None):
    mode = _mode(module)
    batched = input.dim() == 2
    engine._batch = input.shape[0] if batched else 1
    input = engine.batched(input)
    x = input if batched else input.unsqueeze(0)
    B = x.shape[0]
    H = module.hidden_size
    if hx is None:
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H) if mode == "LSTM" else None
    elif mode == "LSTM":
        h, c = (engine.batched(t) for t in hx)
        if not batched:
            h, c = h.unsqueeze(0), c.unsqueeze(0)
    else:
        h, c = engine.batched(hx), None
        if not batched:
            h = h.unsqueeze(0)
    b_ih = module.bias_ih if module.bias else None
    b_hh = module.bias_hh if module.bias else None
    record = _GateRecord(engine, name, module.weight_ih, module.weight_hh, b_ih, b_hh)
    gx = tap(record, (F.linear(x, module.weight_ih, b_ih).unsqueeze(1),), (x.unsqueeze(1),))
    _, h_new, c_new = recurrence(record, mode, H, False, gx, h, c, module.weight_hh, b_hh)
    if not batched:
        h_new = h_new.squeeze(0)
        c_new = None if c_new is None else c_new.squeeze(0)
    return (h_new, c_new) if mode == "LSTM" else h_new


for _cls in (nn.RNN, nn.LSTM, nn.GRU):
    add_rule(Rule(_cls, None, OuterProduct, _rnn_forward, _cls.__name__))
for _cls in (nn.RNNCell, nn.LSTMCell, nn.GRUCell):
    add_rule(Rule(_cls, None, OuterProduct, _cell_forward, _cls.__name__))
