"""k-th order total variation (k-TV) penalty by Monte Carlo (Okuno, arXiv 2308.02293).

The penalty of a function ``f: R^d -> R`` on a box ``Omega = [low, high]`` is

* ``d = 1``:  ``TV_k^q(f) = integral_Omega |f^(k)(x)|^q dx``;
* ``d > 1``:  ``TV_k^q(f) = integral_Omega E_u |D_u^k f(x)|^q dx``, ``D_u^k f`` the k-th
  directional derivative along ``u``, ``u`` uniform on the unit sphere ``S^{d-1}``. (For k = 1,
  q = 2 this is ``(1/d) integral |grad f|^2``; for k = 2, q = 2 it is
  ``integral [(tr H)^2 + 2 ||H||_F^2] / (d (d + 2))`` with ``H`` the Hessian.)

Estimator (fresh draws on every call, independent of the data)::

    z_j ~ Uniform(Omega),  u_j ~ Uniform(S^{d-1})  (u_j = 1 when d = 1),  j = 1..N
    T_hat = V/N * sum_j |D_{u_j}^k f(z_j)|^q,       V = prod(high - low)

``E[T_hat] = TV_k^q(f)`` exactly (unbiased, the volume factor included) and
``Var[T_hat] = (V * integral E_u |D_u^k f|^{2q} dx - TV_k^q(f)^2) / N``: the standard error
falls as ``1/sqrt(N)``; for ``d > 1`` the direction adds variance even where ``f`` is a
quadratic (constant Hessian). Derivatives are exact (automatic differentiation): ``k`` nested
forward-mode products ``torch.func.jvp`` with tangent ``u_j`` on row ``j``, and the result is
differentiable with respect to the model's parameters (reverse mode over the nested forward
mode), so ``loss + eta * ktv_penalty(...)`` trains as usual.

The model must act on each row independently (no BatchNorm in train mode, no attention
across the batch): the per-row tangent then gives each point its own derivative.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch.func import jvp

__all__ = ["ktv_penalty"]

MAX_ORDER = 4


def _as_bound(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach().to(torch.float64)
        if t.dim() > 1:
            raise ValueError(f"domain {name} must be a float or a 1-D tensor (one value per dimension), "
                             f"got shape {tuple(value.shape)}")
        return t.reshape(-1)
    if isinstance(value, Real) and not isinstance(value, bool):
        return torch.tensor([float(value)], dtype=torch.float64)
    raise TypeError(f"domain {name} must be a float or a 1-D tensor, got {type(value).__name__}")


def _first_linear_in_features(model) -> tuple[int | None, str]:
    """``(in_features, module name)`` of the first parameter-owning module of ``model`` when
    it is an ``nn.Linear`` (the layer that reads the ``[N, d]`` points), else ``(None, "")``."""
    if not isinstance(model, torch.nn.Module):
        return None, ""
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if isinstance(module, torch.nn.Linear) and module.in_features > 0:
            return module.in_features, name or type(model).__name__
        return None, ""
    return None, ""


def _box(domain, dim: int | None, default_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(domain, (tuple, list)) and len(domain) == 2):
        raise ValueError(f"domain must be a pair (low, high), got {domain!r}")
    low, high = _as_bound(domain[0], "low"), _as_bound(domain[1], "high")
    sizes = {t.numel() for t in (low, high) if t.numel() != 1}
    if len(sizes) > 1:
        raise ValueError(f"domain low and high have different lengths ({low.numel()} and {high.numel()})")
    d_box = sizes.pop() if sizes else None
    if dim is not None:
        if not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1):
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if d_box is not None and d_box != dim:
            raise ValueError(f"dim={dim} but the domain bounds have {d_box} entries")
    d = dim if dim is not None else (d_box if d_box is not None else default_dim)
    low, high = low.expand(d).clone(), high.expand(d).clone()
    if not (bool(torch.isfinite(low).all()) and bool(torch.isfinite(high).all())):
        raise ValueError(f"domain bounds must be finite, got low={low.tolist()}, high={high.tolist()}")
    if not bool((high > low).all()):
        raise ValueError(f"domain needs high > low in every dimension, got low={low.tolist()}, high={high.tolist()}")
    return low, high


def _model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


def ktv_penalty(model, k: int, q: float = 2.0, domain=(0.0, 1.0), n_points: int = 16, dim: int | None = None,
                generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Monte Carlo estimate of the k-TV penalty of ``model`` on a box (see the module docstring).

    Args:
        model: callable (usually an ``nn.Module``) mapping ``[N, d]`` to ``[N]`` or ``[N, 1]``,
            each row independently.
        k: derivative order, 1..4.
        q: exponent of ``|D^k f|`` (>= 1; q = 2 in Okuno's experiments).
        domain: ``(low, high)``: floats (the same interval in every dimension) or 1-D tensors
            with one bound per dimension. Default the unit cube.
        n_points: number of Monte Carlo points ``N`` per call (fresh every call).
        dim: input dimension ``d`` when both bounds are floats; otherwise taken from the
            bounds' length. Default: the ``in_features`` of the model's first layer when it is
            an ``nn.Linear`` (an error names ``dim=`` when the model then rejects the points),
            else 1.
        generator: optional ``torch.Generator`` for the points and directions.
        dtype: floating dtype of the points; default the dtype (and device) of the model's first
            floating parameter, else torch's default dtype on the CPU.

    Returns:
        A scalar tensor in the model's dtype, differentiable w.r.t. the model's parameters.

    Example:
        >>> import torch
        >>> f = lambda x: (x ** 3).squeeze(1)          # f''' = 6 everywhere
        >>> v = ktv_penalty(f, k=3, q=2, domain=(0.0, 2.0), n_points=4)
        >>> round(float(v), 6)                          # exactly 2 * 6^2 = 72
        72.0
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> p = ktv_penalty(net, k=2, domain=(torch.tensor([0.0, -1.0]), torch.tensor([1.0, 1.0])), n_points=32)
        >>> p.backward()                                 # a training penalty: gradients reach the weights
        >>> net[0].weight.grad.shape
        torch.Size([8, 2])
    """
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module mapping [N, d] -> [N]), got {type(model).__name__}")
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_ORDER):
        raise ValueError(f"k must be an int in 1..{MAX_ORDER}, got {k!r}")
    if not (isinstance(q, Real) and not isinstance(q, bool) and math.isfinite(q) and q >= 1):
        # q < 1 gives an infinite gradient wherever the derivative crosses zero
        raise ValueError(f"q must be a finite number >= 1, got {q!r}")
    if not (isinstance(n_points, int) and not isinstance(n_points, bool) and n_points >= 1):
        raise ValueError(f"n_points must be an int >= 1, got {n_points!r}")
    inferred, layer = (None, "") if dim is not None else _first_linear_in_features(model)
    low, high = _box(domain, dim, default_dim=inferred or 1)
    d = low.numel()
    per_dimension_bounds = any(isinstance(b, torch.Tensor) and b.numel() > 1 for b in domain)
    if dim is not None:
        where = f"dim={dim}"
    elif per_dimension_bounds:
        where = "the length of the domain bounds"
    elif inferred is not None:
        where = f"in_features of the model's first layer {layer!r}"
    else:
        where = "the default d = 1 (no dim= given, float bounds)"
    model_dtype, device = _model_dtype_device(model)
    if dtype is None:
        dtype = model_dtype
    elif not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    volume = float(torch.prod(high - low))
    gen_device = generator.device if generator is not None else device
    r = torch.rand(n_points, d, generator=generator, dtype=torch.float64, device=gen_device).to(device)
    z = (low.to(device) + (high - low).to(device) * r).to(dtype)
    if d == 1:
        u = torch.ones(n_points, 1, dtype=dtype, device=device)
    else:
        u = torch.randn(n_points, d, generator=generator, dtype=torch.float64, device=gen_device).to(device)
        u = (u / u.norm(dim=1, keepdim=True)).to(dtype)

    def f(x):
        out = model(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model must return a tensor, got {type(out).__name__}")
        if out.shape == (n_points, 1):
            return out.reshape(n_points)
        if out.shape != (n_points,):
            raise ValueError(f"model maps [N, d] = [{n_points}, {d}] to shape {tuple(out.shape)}; ktv_penalty needs a "
                             f"scalar output per point, [N] or [N, 1] (domain has d = {d}; pass dim= or per-dimension "
                             "bounds if the model takes more inputs)")
        return out

    def directional(h):
        return lambda x: jvp(h, (x,), (u,))[1]

    g = f
    for _ in range(k):
        g = directional(g)
    try:
        deriv = g(z)
    except RuntimeError as exc:
        raise ValueError(f"ktv_penalty: the model failed on the points [N, d] = [{n_points}, {d}] (d from {where}): "
                         f"{str(exc).splitlines()[0]}. If it takes another number of inputs, pass dim=d or "
                         "per-dimension bounds") from exc
    integrand = deriv * deriv if q == 2 else deriv.abs().pow(q)
    return volume * integrand.mean()
