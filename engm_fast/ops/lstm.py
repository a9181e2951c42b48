"""One layer and direction of an LSTM over a sequence, forward and backward through time, as an
op: the C++ kernel (``csrc/cpu/lstm_recurrence.cpp``) next to its pure-PyTorch reference.

The recurrent rule (:mod:`engm_fast.engine.rules._bptt`) needs every step's gate gradient
``dz_t``, which torch's fused LSTM does not expose, so it runs the recurrence itself. These two
ops are that recurrence::

    lstm_recurrence(gx, h0, c0, w_hh, b_hh, w_hr, ph, reverse)
        -> (states, acts, cells, tanh_cells, m)
    lstm_recurrence_backward(grad_states, grad_h, grad_c, w_hh, w_hr, acts, cells, tanh_cells, c0,
                             reverse, need_h0)
        -> (dz, dh0, dc0, d_ph)

Shapes: ``gx`` ``[B, T, 4H]`` (the input projection ``x W_ih^T + b_ih``, gates ``i, f, g, o`` as
``torch.nn.LSTM`` orders them), ``h0`` ``[B, H_out]``, ``c0`` ``[B, H]``, ``w_hh`` ``[4H, H_out]``,
``b_hh`` ``[4H]`` or ``None``; with a projection (``proj_size``) ``w_hr`` ``[H_out, H]`` and ``ph``
``[B, T, H_out]``, an additive input of the projection (the rule taps it: its gradient is
``dh_t``). Step ``t`` of the direction's time order (``reverse``: from ``T - 1`` down)::

    z_t = gx_t + h_{t-1} W_hh^T + b_hh;  i, f, o = sigmoid(z_i, z_f, z_o);  g = tanh(z_g)
    c_t = f c_{t-1} + i g;  m_t = o tanh(c_t);  h_t = m_t W_hr^T + ph_t  (projection)  |  m_t

The forward returns the states ``h_t`` ``[B, T, H_out]``, the gates after their activations
``[B, T, 4H]``, ``c_t`` and ``tanh(c_t)`` ``[B, T, H]``, and ``m_t`` ``[B, T, H]`` (a 0-element
tensor without a projection: ``m_t`` are the states). The backward takes the gradients of the
states, of ``h_T`` and of ``c_T`` (each may be ``None``: zero) and what the forward returned,
and returns the gradients of ``gx`` (``dz``), ``h0`` (0-element unless ``need_h0``: it costs one
more GEMM), ``c0`` and ``ph`` (0-element without a projection). All tensors share one dtype and
device.

Backends: the C++ kernel runs float32 and float64 CPU tensors when the extension is built (and
the selected backend is ``"auto"`` or ``"cpu"``); everything else (CUDA tensors, 16-bit dtypes,
the ``"torch"`` backend) runs the reference below, one ATen op at a time. There is no CUDA or
Triton kernel: on a GPU the reference's per-step launches are what the recurrence costs (the
registered ops run the reference for CUDA tensors too).

Deviation allowed from the float64 computation of the same inputs (:data:`TOLERANCE`): the
largest absolute difference over each returned tensor, divided by ``max(1, its largest
magnitude)``. The kernel's float32 sigmoid uses a polynomial exp (at most 1.35 ulp), and errors
grow along the recurrence. Largest deviations measured over tests/test_lstm_op.py's shapes plus
T = 200 and T = 300 (weights of O(1 / sqrt(H)), as ``nn.LSTM`` initializes them): float64
1.5e-15, float32 6.1e-7 (kernel) and 5.3e-7 (reference), bfloat16 1.3e-2, float16 2.0e-3 (the
reference); the table allows 2.3-65x that. The measure is absolute for values below 1, as the
error of ``tanh(x)`` computed as ``2 sigmoid(2x) - 1`` is (about 6e-8 in float32): it returns 0
for ``|x| < 3e-8``, where torch's tanh returns ``x``. A closed gate is not exactly 0: the
kernel's float32 sigmoid is at least 1.6e-38, the smallest that stays a normal float (its exp is
clamped at 87).
"""
from __future__ import annotations

import warnings

import torch

from .. import _backend

__all__ = ["lstm_recurrence", "lstm_recurrence_backward", "lstm_recurrence_reference",
           "lstm_recurrence_backward_reference", "TOLERANCE"]

TOLERANCE = {torch.float64: 1e-13, torch.float32: 4e-6, torch.bfloat16: 3e-2, torch.float16: 5e-3}
_KERNEL_DTYPES = (torch.float32, torch.float64)


def _check_tensors(op: str, named: dict, like: torch.Tensor, like_name: str, required: tuple[str, ...]) -> None:
    """Each ``name: (tensor, shape)`` of ``named`` is a tensor of that shape (``ValueError``) in
    ``like``'s dtype on its device (``TypeError``); those not in ``required`` may be ``None``."""
    for name, (t, shape) in named.items():
        if t is None and name not in required:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must be {list(shape)}; got {list(t.shape)}")
        if t.dtype != like.dtype or t.device != like.device:
            raise TypeError(f"{op}: {name} is {t.dtype} on {t.device}; every tensor must be {like_name}'s "
                            f"{like.dtype} on {like.device}")


def _check_layer(op: str, gates: torch.Tensor, gates_name: str, w_hh, w_hr) -> tuple[int, int, int, int, int]:
    """``gates`` (``gx`` or ``acts``) ``[B, T, 4H]``, ``w_hh`` ``[4H, H_out]`` and whether a
    projection fits; returns ``(B, T, G, H, H_out)``."""
    if not isinstance(gates, torch.Tensor) or gates.dim() != 3 or gates.shape[2] % 4:
        shape = list(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"{op}: {gates_name} must be [B, T, 4H]; got {shape}")
    B, T, G = gates.shape
    if not isinstance(w_hh, torch.Tensor) or w_hh.dim() != 2 or w_hh.shape[0] != G:
        shape = list(w_hh.shape) if isinstance(w_hh, torch.Tensor) else type(w_hh).__name__
        raise ValueError(f"{op}: w_hh must be [4H, H_out] = [{G}, H_out]; got {shape}")
    H, H_out = G // 4, w_hh.shape[1]
    if w_hr is None and H_out != H:
        raise ValueError(f"{op}: without a projection H_out must equal H = {H}; got w_hh {list(w_hh.shape)}")
    return B, T, G, H, H_out


def _native(t: torch.Tensor) -> bool:
    """Whether the C++ kernel runs ``t``'s dtype and device under the selected backend."""
    if t.dtype not in _KERNEL_DTYPES or _backend.resolve(t.device) != "cpu":
        return False
    if not _backend._native_has("CPU", "lstm_recurrence"):
        global _warned_stale
        if not _warned_stale:
            _warned_stale = True
            warnings.warn("engm_fast: the loaded C++ extension predates the LSTM recurrence kernel; the LSTM "
                          "recurrence runs its (slower) pure-PyTorch reference. Rebuild the extension: pip install "
                          "--no-build-isolation -e .", RuntimeWarning, stacklevel=3)
        return False
    return True


_warned_stale = False


def lstm_recurrence(gx: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
                    b_hh: torch.Tensor | None = None, w_hr: torch.Tensor | None = None,
                    ph: torch.Tensor | None = None, reverse: bool = False):
    """The LSTM recurrence's forward (module docstring); no autograd graph is recorded.

    Example:
        >>> import torch
        >>> from engm_fast.ops import lstm_recurrence
        >>> states, acts, cells, tanh_cells, m = lstm_recurrence(
        ...     torch.zeros(2, 5, 12), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(12, 3))
        >>> cells[0, 0]   # f = sigmoid(0) = 0.5 of the previous cell, i g = 0
        tensor([0.5000, 0.5000, 0.5000])
    """
    op = "lstm_recurrence"
    B, T, G, H, H_out = _check_layer(op, gx, "gx", w_hh, w_hr)
    if (w_hr is None) != (ph is None):
        raise ValueError(f"{op}: w_hr and ph come together (a projection) or not at all")
    _check_tensors(op, {"h0": (h0, (B, H_out)), "c0": (c0, (B, H)), "w_hh": (w_hh, (G, H_out)), "b_hh": (b_hh, (G,)),
                        "w_hr": (w_hr, (H_out, H)), "ph": (ph, (B, T, H_out))}, gx, "gx", ("h0", "c0"))
    with torch.no_grad():
        if _native(gx):
            return torch.ops.engm_fast.lstm_recurrence(gx, h0, c0, w_hh, b_hh, w_hr, ph, bool(reverse))
        return lstm_recurrence_reference(gx, h0, c0, w_hh, b_hh, w_hr, ph, reverse)


def lstm_recurrence_backward(grad_states: torch.Tensor | None, grad_h: torch.Tensor | None,
                             grad_c: torch.Tensor | None, w_hh: torch.Tensor, w_hr: torch.Tensor | None,
                             acts: torch.Tensor, cells: torch.Tensor, tanh_cells: torch.Tensor, c0: torch.Tensor,
                             reverse: bool = False, need_h0: bool = True):
    """The LSTM recurrence's backward through time (module docstring).

    Example:
        >>> import torch
        >>> from engm_fast.ops import lstm_recurrence, lstm_recurrence_backward
        >>> gx, h0, c0, w_hh = torch.randn(2, 5, 12), torch.zeros(2, 3), torch.zeros(2, 3), torch.randn(12, 3)
        >>> states, acts, cells, tanh_cells, m = lstm_recurrence(gx, h0, c0, w_hh)
        >>> dz, dh0, dc0, d_ph = lstm_recurrence_backward(torch.ones_like(states), None, None, w_hh, None,
        ...                                               acts, cells, tanh_cells, c0)
        >>> dz.shape
        torch.Size([2, 5, 12])
    """
    op = "lstm_recurrence_backward"
    B, T, G, H, H_out = _check_layer(op, acts, "acts", w_hh, w_hr)
    _check_tensors(op, {"cells": (cells, (B, T, H)), "tanh_cells": (tanh_cells, (B, T, H)), "c0": (c0, (B, H)),
                        "w_hh": (w_hh, (G, H_out)), "w_hr": (w_hr, (H_out, H)),
                        "grad_states": (grad_states, (B, T, H_out)), "grad_h": (grad_h, (B, H_out)),
                        "grad_c": (grad_c, (B, H))}, acts, "acts", ("cells", "tanh_cells", "c0"))
    with torch.no_grad():
        if _native(acts):
            return torch.ops.engm_fast.lstm_recurrence_backward(grad_states, grad_h, grad_c, w_hh, w_hr, acts, cells,
                                                                tanh_cells, c0, bool(reverse), bool(need_h0))
        return lstm_recurrence_backward_reference(grad_states, grad_h, grad_c, w_hh, w_hr, acts, cells, tanh_cells,
                                                  c0, reverse, need_h0)


def previous_states(states: torch.Tensor, first: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``[B, T, d]``: the state each step read: ``first`` for the first step in the direction's
    time order, otherwise the neighbouring step's state (the recurrent rule's ``h_{t-1}``).

    Example:
        >>> import torch
        >>> previous_states(torch.tensor([[[1.0], [2.0]]]), torch.tensor([[0.0]]), reverse=False).flatten()
        tensor([0., 1.])
    """
    first = first.unsqueeze(1)
    return torch.cat([states[:, 1:], first], 1) if reverse else torch.cat([first, states[:, :-1]], 1)


@torch.no_grad()
def lstm_recurrence_reference(gx, h0, c0, w_hh, b_hh=None, w_hr=None, ph=None, reverse=False):
    """The forward in ATen ops, step by step (what the kernel computes; module docstring).

    ``tanh(x)`` is computed as ``2 sigmoid(2x) - 1``: ATen's CPU tanh costs about 3x a sigmoid
    per element, and with the cell gate's pre-activations doubled one sigmoid covers all four
    gates (the doubling and ``b_hh`` go into one multiply-add per step).

    Example:
        >>> import torch
        >>> out = lstm_recurrence_reference(torch.zeros(1, 2, 4), torch.zeros(1, 1), torch.zeros(1, 1),
        ...                                 torch.zeros(4, 1))
        >>> out[2]   # the cells stay 0
        tensor([[[0.],
                 [0.]]])
    """
    B, T, G = gx.shape
    H = G // 4
    w_hh_t = w_hh.t().contiguous()   # 5% faster per-step GEMMs than the transposed view
    scale = gx.new_ones(G)
    scale[2 * H:3 * H] = 2
    bias = None if b_hh is None else b_hh * scale
    states = gx.new_empty(B, T, w_hh.shape[1])
    acts = gx.new_empty(B, T, G)   # i, f, g, o after their activations
    cells = gx.new_empty(B, T, H)
    tanh_c = gx.new_empty(B, T, H)
    m = states if w_hr is None else gx.new_empty(B, T, H)
    w_hr_t = None if w_hr is None else w_hr.t()
    # per-step views, made once (unbind is one call for all steps)
    gx_s, acts_s, cells_s, tanh_s, m_s = (v.unbind(1) for v in (gx, acts, cells, tanh_c, m))
    i_s, f_s, g_s, o_s = (v.unbind(1) for v in acts.unflatten(-1, (4, H)).unbind(2))
    out_s = states.unbind(1)
    ph_s = None if ph is None else ph.unbind(1)
    h, c = h0, c0
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        z = torch.addmm(gx_s[t], h, w_hh_t)
        z = z.mul_(scale) if bias is None else torch.addcmul(bias, z, scale, out=z)
        torch.sigmoid(z, out=acts_s[t])
        g = g_s[t].mul_(2).sub_(1)
        c = torch.mul(f_s[t], c, out=cells_s[t]).addcmul_(i_s[t], g)
        tc = torch.sigmoid(c * 2, out=tanh_s[t]).mul_(2).sub_(1)
        h = torch.mul(o_s[t], tc, out=m_s[t])
        if w_hr is not None:
            h = torch.addmm(ph_s[t], h, w_hr_t, out=out_s[t])
    return states, acts, cells, tanh_c, (gx.new_empty(0) if w_hr is None else m)


@torch.no_grad()
def lstm_recurrence_backward_reference(grad_states, grad_h, grad_c, w_hh, w_hr, acts, cells, tanh_cells, c0,
                                       reverse=False, need_h0=True):
    """The backward in ATen ops (module docstring). The step-independent factors are computed
    once over all steps; each step is then one GEMM (two with a projection) and four
    elementwise ops.

    Example:
        >>> import torch
        >>> out = lstm_recurrence_reference(torch.zeros(1, 2, 4), torch.zeros(1, 1), torch.zeros(1, 1),
        ...                                 torch.zeros(4, 1))
        >>> dz, dh0, dc0, d_ph = lstm_recurrence_backward_reference(None, None, torch.ones(1, 1), torch.zeros(4, 1),
        ...                                                          None, *out[1:4], torch.zeros(1, 1))
        >>> dc0   # through two forget gates of 0.5
        tensor([[0.2500]])
    """
    B, T, G = acts.shape
    H = G // 4
    H_out = w_hh.shape[1]
    order = range(T) if reverse else range(T - 1, -1, -1)   # the steps last-first
    last = order[-1] if T else None   # its state gradient is h0's
    i, f, g, o = acts.unflatten(-1, (4, H)).unbind(2)
    # dc_t = dc_{t+1} f_{t+1} + dm_t o_t (1 - tanh(c_t)^2)
    # dz_i, dz_f, dz_g = dc_t * (g i(1-i), c_{t-1} f(1-f), i (1-g^2)); dz_o = dm_t * tanh(c_t) o(1-o)
    # (x - x y^2 and x - x^2 as one addcmul each: these passes over [B, T, 4H] are memory bound)
    dm_to_dc = torch.addcmul(o, o * tanh_cells, tanh_cells, value=-1)
    sig = torch.addcmul(acts, acts, acts, value=-1).unflatten(-1, (4, H))
    q = torch.empty_like(sig)   # [B, T, 4, H]
    torch.mul(g, sig[:, :, 0], out=q[:, :, 0])
    torch.mul(previous_states(cells, c0, reverse), sig[:, :, 1], out=q[:, :, 1])
    torch.addcmul(i, i * g, g, value=-1, out=q[:, :, 2])
    torch.mul(tanh_cells, sig[:, :, 3], out=q[:, :, 3])
    del sig   # [B, T, 4H]: not held through the loop
    dz = acts.new_empty(B, T, G)
    dh = acts.new_zeros(B, H_out) if grad_h is None else grad_h.clone()
    dc = torch.zeros_like(c0) if grad_c is None else grad_c.clone()
    d_ph = acts.new_empty(B, T, H_out) if w_hr is not None else acts.new_empty(0)
    # per-step views, made once
    dz_s = dz.unbind(1)
    dz3_s, dzo_s = (v.unbind(1) for v in dz.view(B, T, 4, H).split([3, 1], 2))
    q3_s, qo_s = (v.unbind(1) for v in q.split([3, 1], 2))
    to_dc_s, f_s = dm_to_dc.unbind(1), f.unbind(1)
    g_out_s = None if grad_states is None else grad_states.unbind(1)
    for t in order:
        if g_out_s is not None:
            dh = dh + g_out_s[t]
        if w_hr is not None:
            d_ph[:, t] = dh
            dm = dh @ w_hr
        else:
            dm = dh
        dc = torch.addcmul(dc, dm, to_dc_s[t])
        torch.mul(dc.unsqueeze(1), q3_s[t], out=dz3_s[t])
        torch.mul(dm.unsqueeze(1), qo_s[t], out=dzo_s[t])
        dc = dc * f_s[t]
        if t != last or need_h0:
            dh = dz_s[t] @ w_hh
    return dz, (dh if need_h0 else acts.new_empty(0)), dc, d_ph


if _backend._native_has("CPU", "lstm_recurrence"):
    # No CUDA kernel: on CUDA tensors the registered ops run the reference (per-step ATen ops,
    # what the wrapper runs there too), so torch.ops.engm_fast.* works on every device the
    # extension supports.
    torch.library.impl("engm_fast::lstm_recurrence", "CUDA")(lstm_recurrence_reference)
    torch.library.impl("engm_fast::lstm_recurrence_backward", "CUDA")(lstm_recurrence_backward_reference)

    @torch.library.register_fake("engm_fast::lstm_recurrence")
    def _lstm_fake(gx, h0, c0, w_hh, b_hh, w_hr, ph, reverse):
        B, T, G = gx.shape
        H = G // 4
        return (gx.new_empty(B, T, w_hh.shape[1]), gx.new_empty(B, T, G), gx.new_empty(B, T, H),
                gx.new_empty(B, T, H), gx.new_empty(B, T, H) if w_hr is not None else gx.new_empty(0))

    @torch.library.register_fake("engm_fast::lstm_recurrence_backward")
    def _lstm_backward_fake(grad_states, grad_h, grad_c, w_hh, w_hr, acts, cells, tanh_cells, c0, reverse, need_h0):
        B, T, G = acts.shape
        H_out = w_hh.shape[1]
        return (acts.new_empty(B, T, G), acts.new_empty(B, H_out) if need_h0 else acts.new_empty(0),
                acts.new_empty(B, G // 4), acts.new_empty(B, T, H_out) if w_hr is not None else acts.new_empty(0))
