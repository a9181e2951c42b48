"""``nn.MultiheadAttention``.

Its forward reads ``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj.weight`` inside
``F.multi_head_attention_forward`` without calling a Linear module, so while the engine records,
the rule runs that forward itself, the same math as ``torch.nn`` (packed or separate
projections, ``kdim``/``vdim``, ``batch_first`` both ways, unbatched inputs, ``attn_mask`` 2-D
or 3-D, boolean or float, ``key_padding_mask``, ``is_causal``, ``add_bias_kv``,
``add_zero_attn``, dropout, ``need_weights`` with and without head averaging), computed batch
first, and taps each projection's output like a Linear over positions:

* the query/key/value projections: an :class:`OuterProduct` per projection, on the rows of the
  packed weight it uses (a :class:`Sliced` block when the query, key and value inputs differ;
  the whole ``[3E, E]`` matrix in one GEMM for self-attention), and the bias rows likewise;
* ``out_proj``: an :class:`OuterProduct` on ``out_proj.weight`` and ``out_proj.bias``;
* ``bias_k``/``bias_v``: expanded to the batch and tapped, per-example ``[1, 1, E]`` gradients.

Outside the engine's recording the module's own forward runs. With dropout in training mode the
masks are drawn in another order than torch's (same distribution).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..contributions import Dense, OuterProduct, Sliced
from ..registry import Rule, add_rule
from ..tap import ModuleRecord, ParamRecord, tap

__all__ = []


class _ProjectionRecord(ModuleRecord):
    """``y = x W_rows^T + bias_rows``: one projection of an attention layer. ``weight_rows`` and
    ``bias_rows`` are the ``(start, stop)`` rows of the packed parameters it uses, or None for all
    of them (a separate q/k/v weight has its own matrix but a block of the packed bias)."""

    __slots__ = ("weight", "bias", "weight_rows", "bias_rows")
    kind = "MultiheadAttention"

    def __init__(self, engine, name, weight, bias, weight_rows, bias_rows):
        super().__init__(engine, name)
        self.weight, self.bias = weight, bias
        self.weight_rows, self.bias_rows = weight_rows, bias_rows

    def contribute(self, b: torch.Tensor, saved: tuple) -> None:
        engine = self.engine
        (x,) = saved
        if self.weight.requires_grad:
            rows = self.weight_rows or (0, self.weight.shape[0])
            c = OuterProduct(x.to(b.dtype), b, (rows[1] - rows[0], x.shape[-1]))
            engine._session.add(self.weight, _block(c, rows, self.weight.shape))
        if self.bias is not None and self.bias.requires_grad:
            rows = self.bias_rows or (0, self.bias.shape[0])
            engine._session.add(self.bias, _block(Dense(b.sum(1)), rows, self.bias.shape))


def _block(c, rows, shape):
    """``c`` on the rows ``rows`` of a parameter of ``shape`` (itself when they are all rows)."""
    return c if rows == (0, shape[0]) else Sliced(c, rows[0], rows[1], shape)


class _ExpandedParamRecord(ParamRecord):
    """A ``[1, 1, E]`` parameter expanded to ``[B, 1, E]``: its per-example gradients."""

    __slots__ = ()
    kind = "MultiheadAttention bias_k/bias_v"

    def contribute(self, grad: torch.Tensor, saved: tuple) -> None:
        self.engine._session.add(self.param, Dense(grad.reshape((grad.shape[0],) + tuple(self.param.shape))))


def _project(engine, name, x, weight, bias, start, stop, separate: bool = False):
    """The projection of ``x`` by rows ``start:stop`` of the packed weight and bias (``separate``:
    by all of ``weight``, a separate q/k/v matrix, and rows ``start:stop`` of the packed bias)."""
    rows = (start, stop)
    w = weight if separate or rows == (0, weight.shape[0]) else weight[start:stop]
    b = None if bias is None else (bias if rows == (0, bias.shape[0]) else bias[start:stop])
    record = _ProjectionRecord(engine, name, weight, bias, None if separate else rows, rows)
    return tap(record, (F.linear(x, w, b),), (x,))


def _mha_forward(engine, m: nn.MultiheadAttention, name: str, query, key, value, key_padding_mask=None,
                 need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                 is_causal: bool = False):
    same_kv = key is value
    same_qk = query is key
    is_batched = query.dim() == 3
    # The true batch size first: the inputs may be Embedding outputs decided with it.
    engine._batch = (query.shape[0 if m.batch_first else 1]) if is_batched else 1
    query, key, value = engine.batched(query), engine.batched(key), engine.batched(value)
    if not is_batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    B, L, E = query.shape
    S = key.shape[1]
    H = m.num_heads
    hd = E // H
    if E != m.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {m.embed_dim}, but got {E}")

    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # SDPA's is_causal
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False

    # Projections, batch first: [B, L|S, E].
    if m._qkv_same_embed_dim:
        W, bias = m.in_proj_weight, m.in_proj_bias
        if same_kv and same_qk:
            q, k, v = _project(engine, name, query, W, bias, 0, 3 * E).chunk(3, -1)
        elif same_kv:
            q = _project(engine, name, query, W, bias, 0, E)
            k, v = _project(engine, name, key, W, bias, E, 3 * E).chunk(2, -1)
        else:
            q = _project(engine, name, query, W, bias, 0, E)
            k = _project(engine, name, key, W, bias, E, 2 * E)
            v = _project(engine, name, value, W, bias, 2 * E, 3 * E)
    else:
        bias = m.in_proj_bias
        q = _project(engine, name, query, m.q_proj_weight, bias, 0, E, separate=True)
        k = _project(engine, name, key, m.k_proj_weight, bias, E, 2 * E, separate=True)
        v = _project(engine, name, value, m.v_proj_weight, bias, 2 * E, 3 * E, separate=True)

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (L, S):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
            attn_mask = attn_mask.view(1, 1, L, S)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (B * H, L, S):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(B * H, L, S)}.")
            attn_mask = attn_mask.view(B, H, L, S)
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, tap(_ExpandedParamRecord(engine, name, m.bias_k), (m.bias_k.expand(B, 1, E),))], 1)
        v = torch.cat([v, tap(_ExpandedParamRecord(engine, name, m.bias_v), (m.bias_v.expand(B, 1, E),))], 1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    q = q.reshape(B, L, H, hd).transpose(1, 2)
    k = k.reshape(B, k.shape[1], H, hd).transpose(1, 2)
    v = v.reshape(B, v.shape[1], H, hd).transpose(1, 2)
    if m.add_zero_attn:
        k = torch.cat([k, k.new_zeros(B, H, 1, hd)], 2)
        v = torch.cat([v, v.new_zeros(B, H, 1, hd)], 2)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    S = k.shape[2]
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, S):
            raise AssertionError(f"expecting key_padding_mask shape of {(B, S)}, but got {key_padding_mask.shape}")
        kpm = key_padding_mask.view(B, 1, 1, S)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    dropout_p = m.dropout if m.training else 0.0

    weights = None
    if need_weights:
        scores = torch.matmul(q * math.sqrt(1.0 / float(hd)), k.transpose(-2, -1))
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:  # torch returns the weights after dropout
            weights = F.dropout(weights, p=dropout_p)
        out = torch.matmul(weights, v)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.transpose(1, 2).reshape(B, L, E)
    out = _project(engine, name, out, m.out_proj.weight, m.out_proj.bias, 0, E)

    if not is_batched:
        out = out.squeeze(0)
        if weights is not None:
            weights = weights.squeeze(0)
    elif not m.batch_first:
        out = out.transpose(0, 1)
    return out, weights


add_rule(Rule(nn.MultiheadAttention, None, OuterProduct, _mha_forward, "MultiheadAttention"))
