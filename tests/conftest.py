"""Shared test helpers: float64 per-example gradient references computed with torch.func."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.func import functional_call, grad, vmap

# triton decides once per process, at its first import, whether it is compiled or interpreted.
# Without a GPU the Triton kernels' tests need the interpreter, and other modules import triton
# at collection time too (``import torch._dynamo`` in test_compile.py does), so choose here,
# before any test module is imported (test_triton_ops.py explains the rest).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(1234)
    yield


def vmap_per_example_grads(model, loss_fn, *batched):
    """``{name: [B, *shape]}`` per-example gradients of ``loss_fn(model(example), ...)``.

    ``loss_fn(model, *example_tensors_with_batch_dim_1)`` returns a scalar; it is evaluated on a
    copy of ``model`` with no engine attached, one example at a time under vmap.
    """
    ref = copy.deepcopy(model)
    from engm_fast.engine import release

    release(ref)
    # deepcopy copies hooks too: drop them so the reference runs plain PyTorch.
    for m in ref.modules():
        m._forward_hooks.clear()
        m._forward_hooks_with_kwargs.clear()
        m._forward_pre_hooks.clear()
    params = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in ref.named_buffers()}

    def one(p, *example):
        example = tuple(e.unsqueeze(0) for e in example)
        def run(*inp):
            return functional_call(ref, (p, buffers), inp)
        return loss_fn(run, *example)

    return vmap(grad(one), in_dims=(None,) + (0,) * len(batched), randomness="same")(params, *batched)


def flat_norms(grads: dict) -> torch.Tensor:
    return torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()))
