"""The contract of the engm_fast ops, and their pure-PyTorch definitions (the ``"torch"`` backend).

Every backend (this module, the C++ CPU kernels of ``csrc/cpu``, the CUDA kernels of
``csrc/cuda``, the Triton kernels of :mod:`engm_fast.triton`) computes what is written here, to
within the deviation :data:`TOLERANCE` allows for the input dtype; the op tests hold every
backend to that one table. The decisions that are not arithmetic are taken here once, in
Python, and handed to the kernels: the route of ``per_example_sqnorm``
(:func:`resolve_sqnorm_mode`), the accumulation dtype (:func:`accumulation_dtype`) and the
checks of the arguments (:func:`check_rows`, :func:`check_weights`, :func:`check_update_args`),
called by the op wrappers of :mod:`engm_fast.ops`.

Notation. For one layer call, example ``i`` has input activations ``a_i`` (``[T, d_in]``) and
output gradient ``b_i`` (``[T, d_out]``); its weight gradient is ``g_i = b_i^T a_i``
(``[d_out, d_in]``). ``a`` is ``[B, T, d_in]`` or ``[B, d_in]`` (``T = 1``), ``b`` likewise with
``d_out``; both share one dtype ``D`` among float16, bfloat16, float32 and float64, and one
device. ``acc = accumulation_dtype(D)``: float32 for 16- and 32-bit inputs (16-bit squares
overflow: ``300^2 > 65504``), float64 for float64. ``round_D(x)`` is rounding to nearest even
into ``D``.

``per_example_sqnorm(a, b, mode) -> [B]`` in ``acc``
    ``n_i^2 = ||g_i||_F^2``. The inputs are converted exactly to ``acc`` and every product and
    sum is formed in ``acc``. Two routes (equal in exact arithmetic):

    * ghost: ``sum_{t,s} (a_it . a_is)(b_it . b_is)`` from the Gram matrices, ``O(T^2 (d_in + d_out))``
      per example; at ``T = 1`` it is ``||a_i||^2 ||b_i||^2``;
    * direct: ``g_i`` computed tile by tile and its entries squared and summed, ``O(T d_in d_out)``.

    ``mode="auto"`` takes the cheaper one (:func:`choose_sqnorm_route`); kernels only ever see
    ``"ghost"`` or ``"direct"``.

``weighted_outer_sum(a, b, w) -> [d_out, d_in]`` in ``D``
    ``round_D( sum_r round_D(w_r b_r) a_r )`` over the ``B * T`` rows ``r`` (``w_r`` is the weight of
    the row's example): ``w`` is converted to ``acc`` (not rounded to ``D``), each product
    ``w_r b_r`` is formed in ``acc`` and rounded once to ``D``, the products with ``a`` are summed
    in ``acc``, and the sum is rounded once to ``D``. For float32 and float64 inputs the inner
    rounding is that of the ``acc`` product itself (a backend may then fold ``w`` into ``a``
    instead of ``b``: the bound is the same). Why this rounding: it is the fastest exact-enough
    form on every backend (a GPU's tensor cores take the 16-bit operand ``round_D(w_r b_r)``;
    keeping it in float32 would need a float32 GEMM, several times slower; on a CPU the
    rounding is one elementwise pass next to the GEMM), and it is more accurate than rounding
    ``w`` to ``D`` first (one rounding of the operand instead of two: bfloat16 keeps 8 bits of
    a weight).

``per_example_sqnorms(a, b, modes) -> [B]`` in ``acc``
    The sum over a list of layers ``j`` of ``per_example_sqnorm(a_j, b_j, modes_j)``: the
    squared norms of the per-example gradients of all those layers' parameters, in one call (the
    engine's finalize: no Python per layer). The layers share ``B``, ``D`` and the device; each
    has its own ``T``, ``d_in``, ``d_out`` and route. The layers' sums are added in ``acc`` in list
    order.

``weighted_outer_sums_(a, b, w, out)``
    In place, for every layer ``j``: ``out_j <- round_D(out_j + weighted_outer_sum(a_j, b_j, w))``
    (``out_j`` in ``D``, with ``d_out_j * d_in_j`` elements, read as ``[d_out_j, d_in_j]``): every
    weighted reduction of a step added straight into the gradients, in one call. The deviation
    allowed is that of ``weighted_outer_sum`` plus the rounding of the addition.

``sgd_momentum_update_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step)``
    One ``torch.optim.SGD`` step, in place, per element in ``acc = accumulation_dtype(param.dtype)``
    from the stored values::

        d = g + weight_decay * p                        (d = g when weight_decay == 0)
        m = d  (first_step)  |  momentum * buf + (1 - dampening) * d        [momentum != 0]
        buf = round_D(m)                                                    [momentum != 0]
        s = d + momentum * buf  (nesterov)  |  buf      (s = d when momentum == 0)
        p = round_D(p - lr * s)

    Two roundings into ``D`` per step (the stored buffer, the parameter), and the step uses the
    buffer as stored, so the parameter moves by exactly what the buffer carries to the next
    step. Why: it is what a fused kernel computes at no extra cost (each element is read and
    written once), as ``torch.optim.SGD(fused=True)`` does; rounding after every operation in
    ``D`` (as the unfused ``foreach`` step does) costs accuracy, four to six roundings of 16-bit
    values per step, and buys nothing.

Deviation allowed (:data:`TOLERANCE`, per input dtype), each an error normalized by the
magnitude rounding errors are proportional to (the same computation on absolute values), so
one number holds for every shape and for both routes of ``per_example_sqnorm``:

* ``sqnorm``: ``|n_i^2 - N_i| / || |b_i|^T |a_i| ||_F^2`` with ``N_i`` the exact ``||b_i^T a_i||^2``;
* ``outer``: ``|out - S| / sum_r |w_r b_r| |a_r|`` (elementwise) with ``S`` the exact
  ``sum_r round_D(w_r b_r) a_r``: the rounded operand is part of the definition, the deviation
  is the ``acc`` summation and the final rounding into ``D`` (relative to the exact
  ``sum_r w_r b_r a_r``, 16-bit results deviate by one more unit roundoff);
* ``update``: ``|x - X| / M`` for every stored parameter and buffer ``x``, with ``X`` the step
  computed exactly from the same stored values and ``M`` the same step on absolute values
  (``|p| + lr |s|`` for the parameter).

Example:
    >>> import torch
    >>> from engm_fast import reference
    >>> reference.resolve_sqnorm_mode("auto", T=1024, d_in=576, d_out=64)  # a CIFAR conv layer
    'direct'
    >>> reference.TOLERANCE[torch.bfloat16].outer == 2.0**-8 + 4e-6
    True
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "per_example_sqnorm",
    "weighted_outer_sum",
    "sgd_momentum_update_",
    "per_example_sqnorms",
    "weighted_outer_sums_",
    "check_layer_lists",
    "accumulation_dtype",
    "choose_sqnorm_route",
    "resolve_sqnorm_mode",
    "check_rows",
    "batched_rows",
    "check_weights",
    "check_update_args",
    "Tolerance",
    "TOLERANCE",
    "SQNORM_MODES",
    "SQNORM_ROUTES",
    "SUPPORTED_DTYPES",
]

SQNORM_MODES = ("auto", "ghost", "direct")
SQNORM_ROUTES = ("ghost", "direct")  # what kernels receive
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Tolerance:
    """The largest normalized deviation from the definition each op may have (module docstring)."""

    sqnorm: float
    outer: float
    update: float


# Unit roundoffs: 2^-53 (float64), 2^-24 (float32), 2^-11 (float16), 2^-8 (bfloat16).
#  * sqnorm: every sum in float32 (or float64). 2e-6 is about 30 float32 unit roundoffs: the
#    C++ kernels measured at most 4e-7 over 20 seeds x 8 shapes (their partial sums hold at
#    most 64 terms), the Triton and emulated CUDA kernels (float32 sums over T = 300 and
#    d_in d_out = 33 000 terms) stay below 2e-6; a wrong index or a dropped tile gives O(1).
#    float64: 1e-12.
#  * outer: one rounding into D (u) plus the float32 sum (4e-6, as above: at most 4e-7
#    measured); float32 4e-6, float64 1e-12.
#  * update: the parameter's rounding into D, plus the buffer's (which the step uses) times
#    lr momentum <= 1 relative to the same magnitude: 2u of D; plus at most 8 roundings in acc.
#    For float32 / float64 (D = acc) at most 8 roundings in all.
TOLERANCE: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(sqnorm=1e-12, outer=1e-12, update=8 * 2.0**-53),
    torch.float32: Tolerance(sqnorm=2e-6, outer=4e-6, update=8 * 2.0**-24),
    torch.float16: Tolerance(sqnorm=2e-6, outer=2.0**-11 + 4e-6, update=2 * 2.0**-11 + 8 * 2.0**-24),
    torch.bfloat16: Tolerance(sqnorm=2e-6, outer=2.0**-8 + 4e-6, update=2 * 2.0**-8 + 8 * 2.0**-24),
}

# The direct route materializes per-example gradients of a chunk of examples; this bounds a
# chunk to 2**22 elements (16 MiB in float32) whatever B is, so memory never grows with
# B x d_out x d_in.
_DIRECT_CHUNK_ELEMENTS = 1 << 22


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype: the dtype every op
    sums in, and the dtype of ``per_example_sqnorm``'s result.

    Example:
        >>> accumulation_dtype(torch.bfloat16)
        torch.float32
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_rows(a: torch.Tensor, b: torch.Tensor, op: str) -> tuple[int, int, int, int]:
    """Checks ``a`` and ``b`` (shapes, dtype, device) and returns ``(B, T, d_in, d_out)``.

    Raises ``TypeError`` for non-tensors and dtypes, ``ValueError`` for shapes and devices, with
    messages naming ``op`` and the shapes.

    Example:
        >>> check_rows(torch.ones(4, 3, 5), torch.ones(4, 3, 2), "my_op")
        (4, 3, 5, 2)
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{op}: a and b must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.dim() not in (2, 3) or b.dim() != a.dim():
        raise ValueError(
            f"{op}: a and b must both be [B, T, d] or both [B, d]; got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if a.shape[0] != b.shape[0] or (a.dim() == 3 and a.shape[1] != b.shape[1]):
        raise ValueError(
            f"{op}: a and b must agree in B (and T); got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if not a.is_floating_point() or a.dtype != b.dtype:
        raise TypeError(f"{op}: a and b must share one floating dtype; got {a.dtype} and {b.dtype}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: a and b must be float16, bfloat16, float32 or float64, got {a.dtype}")
    if a.device != b.device:
        raise ValueError(f"{op}: a and b are on different devices ({a.device}, {b.device})")
    if a.dim() == 2:
        return a.shape[0], 1, a.shape[1], b.shape[1]
    return a.shape[0], a.shape[1], a.shape[2], b.shape[2]


def batched_rows(a: torch.Tensor, b: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks ``a`` and ``b`` (:func:`check_rows`) and returns them as ``[B, T, d]`` views.

    Example:
        >>> a3, b3 = batched_rows(torch.ones(4, 5), torch.ones(4, 2), "my_op")
        >>> tuple(a3.shape), tuple(b3.shape)
        ((4, 1, 5), (4, 1, 2))
    """
    check_rows(a, b, op)
    if a.dim() == 2:
        return a.unsqueeze(1), b.unsqueeze(1)
    return a, b


def check_weights(w: torch.Tensor, a: torch.Tensor, op: str) -> None:
    """Checks the per-example weights of ``weighted_outer_sum``: a real floating ``[B]`` tensor
    on the device of ``a`` (the checked layer inputs, ``[B, ...]``).

    Example:
        >>> check_weights(torch.ones(4), torch.ones(4, 5), "my_op")  # fine: returns None
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != a.shape[0]:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{op}: w must be [B] = [{a.shape[0]}], got {shape}")
    if not w.is_floating_point():
        raise TypeError(f"{op}: w must be floating point, got {w.dtype}")
    if w.device != a.device:
        raise ValueError(f"{op}: w is on {w.device}, a and b on {a.device}")


def check_update_args(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                      momentum: float) -> None:
    """Checks the tensor lists of ``sgd_momentum_update_``: one grad per param, one buffer per param
    when ``momentum != 0`` (the list is ignored otherwise), dense tensors of one shape and one
    supported dtype per triple, all on one device.

    Raises ``TypeError`` for non-tensors, layouts and dtypes, ``ValueError`` for counts, shapes
    and devices.

    Example:
        >>> check_update_args([torch.ones(2)], [torch.zeros(2)], [], momentum=0.0)  # fine: returns None
    """
    op = "sgd_momentum_update_"
    if len(params) != len(grads) or (momentum != 0 and len(momentum_buffers) != len(params)):
        raise ValueError(
            f"{op}: got {len(params)} params, {len(grads)} grads and {len(momentum_buffers)} momentum buffers "
            "(buffers: one per param when momentum != 0)"
        )
    buffers = momentum_buffers if momentum != 0 else []
    for what, tensors in (("params", params), ("grads", grads), ("momentum_buffers", buffers)):
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {what}[{i}] is a {type(t).__name__}, not a tensor")
            if t.layout != torch.strided:
                raise TypeError(f"{op}: {what}[{i}] has layout {t.layout}; only dense (strided) tensors are supported")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.shape != g.shape:
            raise ValueError(f"{op}: param {i} has shape {tuple(p.shape)}, grad {tuple(g.shape)}")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: param {i} must be float16, bfloat16, float32 or float64, got {p.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"{op}: param {i} is {p.dtype}, its grad {g.dtype} (they must match)")
        if buffers:
            buf = buffers[i]
            if buf.shape != p.shape:
                raise ValueError(f"{op}: momentum buffer {i} has shape {tuple(buf.shape)}, param {tuple(p.shape)}")
            if buf.dtype != p.dtype:
                raise TypeError(f"{op}: momentum buffer {i} is {buf.dtype}, its param {p.dtype} (they must match)")
    used = list(params) + list(grads) + list(buffers)
    for t in used[1:]:
        if t.device != used[0].device:
            raise ValueError(f"{op}: tensors on {used[0].device} and {t.device}; all must be on one device")


def check_layer_lists(a: list[torch.Tensor], b: list[torch.Tensor], op: str,
                      out: list[torch.Tensor] | None = None) -> list[tuple[int, int, int, int]]:
    """Checks the layer lists of ``per_example_sqnorms`` / ``weighted_outer_sums_``: at least one
    layer, every ``(a_j, b_j)`` valid (:func:`check_rows`), one ``B``, dtype and device across the
    layers, and (``out``) one output per layer in that dtype and device, of ``d_out_j * d_in_j``
    elements. Returns each layer's ``(B, T, d_in, d_out)``.

    Example:
        >>> check_layer_lists([torch.ones(4, 5), torch.ones(4, 3, 2)], [torch.ones(4, 1), torch.ones(4, 3, 6)], "op")
        [(4, 1, 5, 1), (4, 3, 2, 6)]
    """
    if not isinstance(a, (list, tuple)) or not isinstance(b, (list, tuple)) or len(a) != len(b) or not a:
        raise ValueError(f"{op}: a and b must be non-empty lists of the same length, got "
                         f"{type(a).__name__} of {len(a) if isinstance(a, (list, tuple)) else '?'} and "
                         f"{type(b).__name__} of {len(b) if isinstance(b, (list, tuple)) else '?'}")
    shapes = [check_rows(x, y, f"{op} (layer {j})") for j, (x, y) in enumerate(zip(a, b))]
    for j in range(1, len(a)):
        if shapes[j][0] != shapes[0][0]:
            raise ValueError(f"{op}: layer {j} has a batch of {shapes[j][0]}, layer 0 of {shapes[0][0]}")
        if a[j].dtype != a[0].dtype or a[j].device != a[0].device:
            raise TypeError(f"{op}: layer {j} is {a[j].dtype} on {a[j].device}, layer 0 {a[0].dtype} on "
                            f"{a[0].device}: one call takes one dtype and device")
    if out is not None:
        if not isinstance(out, (list, tuple)) or len(out) != len(a):
            raise ValueError(f"{op}: out must be a list of one tensor per layer ({len(a)})")
        for j, (o, (_, _, d_in, d_out)) in enumerate(zip(out, shapes)):
            if not isinstance(o, torch.Tensor) or o.dtype != a[0].dtype or o.device != a[0].device:
                raise TypeError(f"{op}: out[{j}] must be a {a[0].dtype} tensor on {a[0].device}")
            if not o.is_contiguous():
                raise ValueError(f"{op}: out[{j}] must be contiguous (it is written in place as [d_out, d_in])")
            if o.numel() != d_in * d_out:
                raise ValueError(f"{op}: out[{j}] has {o.numel()} elements, layer {j}'s weighted sum "
                                 f"[{d_out}, {d_in}] has {d_in * d_out}")
    return shapes


def choose_sqnorm_route(T: int, d_in: int, d_out: int) -> str:
    """The cheaper exact route for ``||b_i^T a_i||^2``: the one rule every backend follows.

    ghost costs ``O(T^2 (d_in + d_out))`` per example, direct ``O(T d_in d_out)``; the usual
    book-keeping rule picks ghost when ``2 T^2 <= d_in d_out``. ``T <= 1`` is always ghost
    (``||a_i||^2 ||b_i||^2``, cheaper than any product).

    Example:
        >>> choose_sqnorm_route(1, 1, 1), choose_sqnorm_route(16, 4608, 512), choose_sqnorm_route(1024, 576, 64)
        ('ghost', 'ghost', 'direct')
    """
    return "ghost" if T <= 1 or 2 * T * T <= d_in * d_out else "direct"


def resolve_sqnorm_mode(mode: str, T: int, d_in: int, d_out: int) -> str:
    """``"ghost"`` or ``"direct"``: ``mode`` itself, or :func:`choose_sqnorm_route` for ``"auto"``.

    Example:
        >>> resolve_sqnorm_mode("auto", T=4, d_in=4, d_out=8), resolve_sqnorm_mode("direct", 4, 4, 8)
        ('ghost', 'direct')
    """
    if mode not in SQNORM_MODES:
        raise ValueError(f"per_example_sqnorm: mode must be one of {SQNORM_MODES}, got {mode!r}")
    return choose_sqnorm_route(T, d_in, d_out) if mode == "auto" else mode


def per_example_sqnorm(a: torch.Tensor, b: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Squared Frobenius norm of each example's ``b_i^T a_i``, without materializing all of them.

    Args:
        a: ``[B, T, d_in]`` or ``[B, d_in]`` layer inputs.
        b: ``[B, T, d_out]`` or ``[B, d_out]`` output gradients, same dtype and device.
        mode: ``"ghost"`` (Gram matrices, ``sum_{t,s} (a_t.a_s)(b_t.b_s)``), ``"direct"``
            (per-example product in bounded chunks) or ``"auto"`` (:func:`resolve_sqnorm_mode`).

    Returns:
        ``[B]`` tensor in :func:`accumulation_dtype` of the inputs.

    Example:
        >>> a, b = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
        >>> n2 = per_example_sqnorm(a, b)
        >>> torch.allclose(n2, torch.einsum("bto,bti->boi", b, a).pow(2).sum((1, 2)))
        True
    """
    a3, b3 = batched_rows(a, b, "per_example_sqnorm")
    B, T, d_in = a3.shape
    d_out = b3.shape[2]
    route = resolve_sqnorm_mode(mode, T, d_in, d_out)
    acc = accumulation_dtype(a3.dtype)
    if B == 0:
        return torch.zeros(0, dtype=acc, device=a3.device)
    a3, b3 = a3.to(acc), b3.to(acc)
    if route == "ghost":
        if T == 1:  # 1 x 1 Gram matrices: ||a_i||^2 ||b_i||^2
            return a3.pow(2).sum((1, 2)) * b3.pow(2).sum((1, 2))
        gram_a = torch.bmm(a3, a3.transpose(1, 2))
        gram_b = torch.bmm(b3, b3.transpose(1, 2))
        return (gram_a * gram_b).sum((1, 2))
    out = torch.empty(B, dtype=acc, device=a3.device)
    chunk = max(1, _DIRECT_CHUNK_ELEMENTS // max(1, d_in * d_out))
    for start in range(0, B, chunk):
        stop = min(B, start + chunk)
        g = torch.bmm(b3[start:stop].transpose(1, 2), a3[start:stop])
        out[start:stop] = g.pow(2).sum((1, 2))
    return out


def weighted_outer_sum(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i b_i^T a_i`` as one GEMM with the weight folded into ``b``, rounded as the
    module docstring defines (``round_D(w_r b_r)`` operands, sum in the accumulation dtype).

    Args:
        a: ``[B, T, d_in]`` or ``[B, d_in]``.
        b: ``[B, T, d_out]`` or ``[B, d_out]``.
        w: ``[B]`` per-example weights (any floating dtype; converted to the accumulation dtype).

    Returns:
        ``[d_out, d_in]`` in the dtype of ``a``.

    Example:
        >>> a, b, w = torch.randn(4, 3, 5), torch.randn(4, 3, 2), torch.rand(4)
        >>> g = weighted_outer_sum(a, b, w)
        >>> torch.allclose(g, torch.einsum("b,bto,bti->oi", w, b, a), atol=1e-5)
        True
    """
    a3, b3 = batched_rows(a, b, "weighted_outer_sum")
    check_weights(w, a3, "weighted_outer_sum")
    B, T, d_in = a3.shape
    d_out = b3.shape[2]
    acc = accumulation_dtype(a3.dtype)
    bw = b3.to(acc) * w.detach().to(acc).view(B, 1, 1)
    if b3.dtype != acc:
        bw = bw.to(b3.dtype).to(acc)  # the GEMM operand round_D(w_r b_r)
    out = torch.mm(bw.reshape(B * T, d_out).t(), a3.to(acc).reshape(B * T, d_in))
    return out.to(a3.dtype)


def per_example_sqnorms(a: list[torch.Tensor], b: list[torch.Tensor], modes: list[str] | None = None) -> torch.Tensor:
    """``sum_j per_example_sqnorm(a[j], b[j], modes[j])``: the per-example squared norms over
    several layers' parameters, ``[B]`` in the accumulation dtype.

    Args:
        a, b: lists of one layer's inputs and output gradients each (as
            :func:`per_example_sqnorm` takes them), sharing ``B``, dtype and device.
        modes: one route per layer (default ``"auto"`` for every layer).

    Example:
        >>> a, b = [torch.randn(3, 4), torch.randn(3, 5, 2)], [torch.randn(3, 6), torch.randn(3, 5, 7)]
        >>> torch.allclose(per_example_sqnorms(a, b), per_example_sqnorm(a[0], b[0]) + per_example_sqnorm(a[1], b[1]))
        True
    """
    check_layer_lists(a, b, "per_example_sqnorms")
    modes = ["auto"] * len(a) if modes is None else list(modes)
    if len(modes) != len(a):
        raise ValueError(f"per_example_sqnorms: {len(modes)} modes for {len(a)} layers")
    total = per_example_sqnorm(a[0], b[0], modes[0])
    for j in range(1, len(a)):
        total = total + per_example_sqnorm(a[j], b[j], modes[j])
    return total


@torch.no_grad()
def weighted_outer_sums_(a: list[torch.Tensor], b: list[torch.Tensor], w: torch.Tensor,
                         out: list[torch.Tensor]) -> None:
    """``out[j] += weighted_outer_sum(a[j], b[j], w)`` for every layer, in place (``out[j]`` read as
    ``[d_out_j, d_in_j]``).

    Example:
        >>> a, b, w = [torch.ones(2, 3)], [torch.ones(2, 1)], torch.tensor([1.0, 2.0])
        >>> out = [torch.ones(3)]
        >>> weighted_outer_sums_(a, b, w, out)
        >>> out[0]
        tensor([4., 4., 4.])
    """
    shapes = check_layer_lists(a, b, "weighted_outer_sums_", out)
    check_weights(w, a[0], "weighted_outer_sums_")
    for x, y, o, (_, _, d_in, d_out) in zip(a, b, out, shapes):
        o.view(d_out, d_in).add_(weighted_outer_sum(x, y, w))


@torch.no_grad()
def sgd_momentum_update_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                         lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                         first_step: bool) -> None:
    """One ``torch.optim.SGD`` step over lists of tensors, in place (params and buffers), in the
    accumulation dtype with two roundings per element (module docstring).

    ``momentum_buffers`` is empty when ``momentum == 0``, else one tensor per parameter; with
    ``first_step`` the buffers are set to the first gradient (as SGD does when it creates them).

    Example:
        >>> p, g, buf = [torch.ones(2)], [torch.full((2,), 0.5)], [torch.zeros(2)]
        >>> sgd_momentum_update_(p, g, buf, lr=0.1, momentum=0.9, dampening=0.0,
        ...                      weight_decay=0.0, nesterov=False, first_step=True)
        >>> p[0]
        tensor([0.9500, 0.9500])
    """
    check_update_args(params, grads, momentum_buffers, momentum)
    for i, (p, g) in enumerate(zip(params, grads)):
        acc = accumulation_dtype(p.dtype)
        p_acc = p.to(acc)  # p itself when p is in acc: only read before p.copy_ below
        d = g.to(acc)
        if weight_decay != 0:
            d = d.add(p_acc, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step:
                buf.copy_(d)
            else:
                buf.copy_(buf.to(acc).mul(momentum).add_(d, alpha=1 - dampening))
            stored = buf.to(acc)
            d = d.add(stored, alpha=momentum) if nesterov else stored
        p.copy_(p_acc.add(d, alpha=-lr))
