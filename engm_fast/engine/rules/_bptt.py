"""One layer and direction of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` as ONE autograd node with a
hand-written backpropagation through time that exposes each step's gate gradient.

The recurrent rule needs ``dz_t``, the gradient of every step's gate pre-activations, which
torch's fused recurrent ops do not expose. Written with autograd, the recurrence is about ten
nodes per step, and beside the two GEMMs a step needs, their dispatch, the chunk/stack copies
and the per-step saved tensors cost as much as the GEMMs (the README's LSTM benchmark notes have
the before and after). The LSTM's recurrence is an op each way,
:func:`engm_fast.ops.lstm_recurrence` and its backward: a C++ kernel on CPU tensors (one GEMM
and one fused pass over the gates per step), its pure-PyTorch reference elsewhere. For GRU and
RNN the forward here is a loop of in-place ops into preallocated ``[B, T, .]`` buffers, the
step-independent parts of the backward are computed once over all steps, and each backward
step is one GEMM and two or three elementwise ops.

Inputs (batch first):

* ``gx`` ``[B, T, G]``: the input projection ``x W_ih^T + b_ih`` (the rule taps it; the
  gradient this node returns for it is ``dz``);
* ``h0`` ``[B, H_out]``, ``c0`` ``[B, H]`` (LSTM, else ``None``);
* ``w_hh`` ``[G, H_out]``, ``b_hh`` ``[G]`` or ``None``;
* LSTM with ``proj_size``: ``w_hr`` ``[H_out, H]`` and ``ph`` ``[B, T, H_out]``, an additive
  input of the projection, ``h_t = m_t W_hr^T + ph_t``. The rule passes a tapped zero tensor:
  its gradient is ``dh_t``, the projection's output gradient, which its per-example gradient
  ``sum_t dh_t^T m_t`` needs.

Outputs: the states ``[B, T, H_out]``, ``h_T`` and (LSTM) ``c_T``. The node also leaves on the
rule's record what the per-example gradients need: ``h_prev`` ``[B, T, H_out]`` (the state each
step read) and, for a projection, ``m`` (its inputs) on the projection's record; for GRU the
backward leaves ``dgh`` (the gradient of ``h W_hh^T + b_hh``, which differs from ``dz``).

The recurrence runs in the widest dtype of ``gx`` and the initial states (under autocast the
projection may be bfloat16 while the states are float32: the cell state then accumulates in
float32, as torch's promotion did for the per-step ops).

A gradient (``h0``, ``c0``, ``w_hh``, ``b_hh``, ``w_hr``, ``ph``) is computed only when the
running backward pass may use it (:func:`_will_use`): the engine's own backward asks for its
anchor alone and builds the weighted sums from the per-example terms; a user's
``loss.backward()`` through a recorded forward gets ordinary gradients.

The node is once differentiable: a second derivative through it (``create_graph=True``, then
differentiating the result) raises, naming the module; the module's own fused op, with the
engine's recording paused, supports it.
"""
from __future__ import annotations

import torch

from ... import ops
from ...ops.lstm import previous_states

__all__ = ["recurrence"]


def _will_use(ctx) -> list[bool]:
    """Per tensor input of the node (in the forward's order, ``None`` inputs excluded), whether
    the running backward pass will use its gradient. ``needs_input_grad`` is fixed at forward
    time (a weight's is True even in a pass that asks only for an input's gradient), so this asks
    autograd (``_will_engine_execute_node``, as torch's multi-grad hooks do). Autograd cannot tell
    for a leaf during ``autograd.grad``: then a parameter's gradient is wanted unless the pass is
    the engine's own (which asks for its anchor alone)."""
    own = ctx.record.engine.in_own_backward()
    use = []
    for fn, _ in ctx.next_functions:
        if fn is None:
            use.append(False)
            continue
        try:
            use.append(torch._C._will_engine_execute_node(fn))
        except RuntimeError:   # a leaf during autograd.grad
            use.append(not own)
    return use


def _refuse_second_derivative(name: str, grads: tuple) -> tuple:
    """``grads`` routed through a node that raises, naming the module, if differentiated (as
    ``torch.autograd.function.once_differentiable`` does, with a message that says what to do)."""
    err = torch._C._functions.DelayedError(
        (f"module '{name}': a second derivative through a recurrent layer while engm_fast records it is not "
         "supported (its backward through time is hand-written); compute it with the recording paused: "
         "`with engm_fast.engine_of(model).paused(): ...`").encode(), len(grads))

    def alias(g):
        if g is None:
            return None
        g = g.detach()
        g.requires_grad = True
        return g
    return err(*[alias(g) for g in grads])


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, record, projection, mode, hidden, reverse, gx, h0, c0, w_hh, b_hh, w_hr, ph):
        gx_in, h0_in, c0_in = gx, h0, c0   # their dtypes are the gradients'
        with torch.autocast(gx.device.type, enabled=False):
            dtype = torch.promote_types(gx.dtype, h0.dtype if c0 is None else torch.promote_types(h0.dtype, c0.dtype))
            gx = gx.to(dtype)
            B, T, G = gx.shape
            H = hidden
            h = h0 = h0.to(dtype)
            if mode == "LSTM":
                # the C++ kernel on CPU (float32 / float64), its reference elsewhere (engm_fast.ops.lstm)
                c0 = c0.to(dtype)
                out, acts, cells, tanh_c, m = ops.lstm_recurrence(
                    gx, h0, c0, w_hh.to(dtype), None if b_hh is None else b_hh.to(dtype),
                    None if w_hr is None else w_hr.to(dtype), None if ph is None else ph.to(dtype), reverse)
                c = cells[:, 0 if reverse else T - 1] if T else c0
                saved = (acts, cells, tanh_c, c0)
                if w_hr is not None:
                    projection.m = m
                    saved = saved + (m,)
            else:
                w_hh_t = w_hh.to(dtype).t().contiguous()   # 5% faster per-step GEMMs than the transposed view
                out = gx.new_empty(B, T, h.shape[1])
                steps = range(T - 1, -1, -1) if reverse else range(T)
                if mode == "GRU":
                    # The hidden part of the new gate is scaled by the reset gate, so b_hh stays in gh.
                    gh = gx.new_empty(B, T, G)
                    acts = gx.new_empty(B, T, G)
                    bias = None if b_hh is None else b_hh.to(dtype)
                    gh_s, acts_s, gx_s, out_s = (v.unbind(1) for v in (gh, acts, gx, out))
                    for t in steps:
                        gh_t, a, x_t = gh_s[t], acts_s[t], gx_s[t]
                        if bias is None:
                            torch.mm(h, w_hh_t, out=gh_t)
                        else:
                            torch.addmm(bias, h, w_hh_t, out=gh_t)
                        torch.sigmoid(x_t[:, :2 * H] + gh_t[:, :2 * H], out=a[:, :2 * H])
                        torch.tanh(torch.addcmul(x_t[:, 2 * H:], a[:, :H], gh_t[:, 2 * H:]), out=a[:, 2 * H:])
                        # h_t = (1 - u) n + u h_{t-1} = lerp(n, h_{t-1}, u)
                        h = torch.lerp(a[:, 2 * H:], h, a[:, H:2 * H], out=out_s[t])
                    saved = (acts, gh[..., 2 * H:].clone())   # the r and u parts are not needed: freed
                else:
                    pre = gx if b_hh is None else gx + b_hh.to(dtype)   # b_hh folded in once
                    pre_s, out_s = pre.unbind(1), out.unbind(1)
                    for t in steps:
                        z = torch.addmm(pre_s[t], h, w_hh_t)
                        h = torch.clamp_min(z, 0, out=out_s[t]) if mode == "RNN_RELU" else torch.tanh(z, out=out_s[t])
                    # the activation's derivative, from the outputs (which the caller may change in place)
                    saved = ((out > 0).to(dtype) if mode == "RNN_RELU" else 1 - out * out,)
            h_prev = previous_states(out, h0, reverse)
            record.h_prev = h_prev
            h_last = out[:, 0 if reverse else T - 1].clone()
            c_last = c.clone() if mode == "LSTM" else None
        ctx.set_materialize_grads(False)   # unused outputs (often all states but h_T) get no zero tensors
        ctx.mode, ctx.hidden, ctx.reverse, ctx.record, ctx.dtype = mode, hidden, reverse, record, dtype
        # the tensor inputs in the order of ctx.next_functions, and their dtypes for the gradients
        ctx.inputs = [(k, t.dtype) for k, t in zip(("gx", "h0", "c0", "w_hh", "b_hh", "w_hr", "ph"),
                                                   (gx_in, h0_in, c0_in, w_hh, b_hh, w_hr, ph)) if t is not None]
        ctx.save_for_backward(w_hh, w_hr, h_prev, *saved)
        if c_last is None:
            return out, h_last
        return out, h_last, c_last

    @staticmethod
    def backward(ctx, *grads):
        with torch.no_grad():
            out = _Recurrence._backward(ctx, *grads)
        if torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in grads):  # create_graph
            return out[:5] + _refuse_second_derivative(ctx.record.name, out[5:])
        return out

    @staticmethod
    def _backward(ctx, g_out, g_h, g_c=None):
        mode, H, reverse, dtype = ctx.mode, ctx.hidden, ctx.reverse, ctx.dtype
        w_hh, w_hr, h_prev, *saved = ctx.saved_tensors
        B, T, H_out = h_prev.shape
        G = w_hh.shape[0]
        order = range(T) if reverse else range(T - 1, -1, -1)   # backward visits the steps last-first
        last = order[-1] if T else None   # its state gradient is h0's
        use = dict(zip((k for k, _ in ctx.inputs), _will_use(ctx)))
        with torch.autocast(h_prev.device.type, enabled=False):
            w = w_hh.to(dtype)
            if mode == "LSTM":
                acts, cells, tanh_c, c0, *m = saved
                dz, dh, d_c0, d_ph = ops.lstm_recurrence_backward(
                    None if g_out is None else g_out.to(dtype), None if g_h is None else g_h.to(dtype),
                    None if g_c is None else g_c.to(dtype), w, None if w_hr is None else w_hr.to(dtype),
                    acts, cells, tanh_c, c0, reverse, bool(use.get("h0")))
                d_ph = None if w_hr is None else d_ph
                dgh = dz
            else:
                d_ph = None
                dz = h_prev.new_empty(B, T, G)
                dh = h_prev.new_zeros(B, h_prev.shape[2]) if g_h is None else g_h.to(dtype)
                if mode == "GRU":
                    acts, gh_n = saved
                    r, u, n = acts.unflatten(-1, (3, H)).unbind(2)
                    # dz_t = dh_t * [(1-u)(1-n^2) gh_n r(1-r), (h_{t-1} - n) u(1-u), (1-u)(1-n^2)]; the
                    # hidden part of the new gate (dgh_n) is dz_n * r.
                    # (x - x y^2 and x - x^2 as one addcmul each: these passes are memory bound)
                    to_dz = h_prev.new_empty(B, T, 3, H)
                    dr, du, dn = to_dz.unbind(2)
                    keep = 1 - u
                    torch.addcmul(keep, keep * n, n, value=-1, out=dn)
                    torch.mul(dn * gh_n, torch.addcmul(r, r, r, value=-1), out=dr)
                    torch.mul(h_prev - n, torch.addcmul(u, u, u, value=-1), out=du)
                    to_dgh = torch.empty_like(to_dz)
                    to_dgh[:, :, :2] = to_dz[:, :, :2]
                    torch.mul(dn, r, out=to_dgh[:, :, 2])
                    dgh = h_prev.new_empty(B, T, G)
                    dz3_s, dgh3_s = (v.view(B, T, 3, H).unbind(1) for v in (dz, dgh))
                    to_dz_s, to_dgh_s, u_s, dgh_s = to_dz.unbind(1), to_dgh.unbind(1), u.unbind(1), dgh.unbind(1)
                    g_out_s = None if g_out is None else g_out.to(dtype).unbind(1)
                    for t in order:
                        if g_out_s is not None:
                            dh = dh + g_out_s[t]
                        d = dh.unsqueeze(1)
                        torch.mul(d, to_dz_s[t], out=dz3_s[t])
                        torch.mul(d, to_dgh_s[t], out=dgh3_s[t])
                        if t != last or use.get("h0"):
                            dh = torch.addmm(dh * u_s[t], dgh_s[t], w)
                    ctx.record.dgh = dgh   # the record's W_hh and b_hh terms (it runs after this node)
                    d_c0 = None
                else:
                    (dact,) = saved
                    dact_s, dz_s = dact.unbind(1), dz.unbind(1)
                    g_out_s = None if g_out is None else g_out.to(dtype).unbind(1)
                    for t in order:
                        if g_out_s is not None:
                            dh = dh + g_out_s[t]
                        torch.mul(dh, dact_s[t], out=dz_s[t])
                        if t != last or use.get("h0"):
                            dh = dz_s[t] @ w
                    d_c0 = None
                    dgh = dz
            d_w_hh = d_b_hh = d_w_hr = None
            flat = dgh.reshape(B * T, G)
            if use.get("w_hh"):
                d_w_hh = flat.t() @ h_prev.reshape(B * T, H_out)
            if use.get("b_hh"):
                d_b_hh = flat.sum(0)
            if use.get("w_hr"):
                d_w_hr = d_ph.reshape(B * T, H_out).t() @ m[0].reshape(B * T, H)
        grads = dict(gx=dz, h0=dh if use.get("h0") else None, c0=d_c0, w_hh=d_w_hh, b_hh=d_b_hh, w_hr=d_w_hr,
                     ph=d_ph)
        dtypes = dict(ctx.inputs)
        return (None,) * 5 + tuple(None if grads[k] is None or not use.get(k) else grads[k].to(dtypes[k])
                                   for k in ("gx", "h0", "c0", "w_hh", "b_hh", "w_hr", "ph"))


def recurrence(record, mode: str, hidden: int, reverse: bool, gx, h0, c0, w_hh, b_hh, w_hr=None, ph=None,
               projection=None):
    """Runs one layer and direction (see the module docstring); returns ``(states, h_T, c_T)``,
    ``c_T`` ``None`` except for LSTM. ``record`` gets ``h_prev`` (and for GRU, in backward,
    ``dgh``), the ``projection`` record (with ``w_hr``) gets ``m``."""
    outs = _Recurrence.apply(record, projection, mode, hidden, reverse, gx, h0, c0, w_hh, b_hh, w_hr, ph)
    return outs if mode == "LSTM" else (*outs, None)
