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


def plain_copy(model):
    """A deep copy of ``model`` with no engine: no hooks, no replaced forwards."""
    ref = copy.deepcopy(model)
    from engm_fast.engine import release

    release(ref)
    for m in ref.modules():
        m._forward_hooks.clear()
        m._forward_hooks_with_kwargs.clear()
        m._forward_pre_hooks.clear()
        m.__dict__.pop("forward", None)  # a rule's replaced forward, copied as an instance attribute
    return ref


def loop_per_example_grads(model, make_losses, batch_size: int) -> dict:
    """``{name: [B, *shape]}`` by one backward per example, for models torch.func cannot run.

    ``make_losses(model, index)`` returns the per-example losses of the examples ``index`` (a
    slice); it runs on a plain copy of ``model``.
    """
    ref = plain_copy(model)
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    out = {n: [] for n, _ in named}
    for i in range(batch_size):
        grads = torch.autograd.grad(make_losses(ref, slice(i, i + 1)).sum(), [p for _, p in named],
                                    allow_unused=True)
        for (n, p), g in zip(named, grads):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(gs) for n, gs in out.items()}


def flat_norms(grads: dict) -> torch.Tensor:
    return torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()))


def assert_engine_matches(model, make_losses, ref: dict, batch_size: int, rtol: float = 1e-9):
    """The engine's norms and weighted sums, ``per_example_grad_norms`` and the ``p.grad`` ENGM
    writes, against per-example reference gradients ``ref`` (``{name: [B, *shape]}``), in float64.

    ``make_losses(model, index)`` gives the per-example losses of the examples ``index``. The
    absolute tolerance is ``rtol`` times the largest reference entry (gradients that are zero in
    exact arithmetic, such as an attention key bias's, come out at rounding level).
    """
    import engm_fast

    B = batch_size
    everything = slice(0, B)
    ref_norms = flat_norms(ref)
    atol = rtol * max(float(g.abs().max()) for g in ref.values())
    engine = engm_fast.attach(model)
    try:
        grads = engine.backward(make_losses(model, everything))
        w = torch.rand(B, dtype=torch.float64)
        weighted = grads.weighted_grads(w)
        public = engm_fast.per_example_grad_norms(model, make_losses(model, everything))
        opt = engm_fast.ENGM(model, lr=0.1)
        opt.zero_grad()
        engm_norms = opt.backward(make_losses(model, everything))
        for got in (grads.sqnorms().sqrt(), public, engm_norms):
            torch.testing.assert_close(got, ref_norms, rtol=rtol, atol=0.0)
        names = dict(model.named_parameters())
        assert {grads.names[p] for p in weighted} == {n for n in ref if names[n] in weighted} == set(ref), \
            f"parameters without per-example gradients: {set(ref) - {grads.names[p] for p in weighted}}"
        engm_w = 1.0 / (ref_norms + 1e-6) / B
        for name, g in ref.items():
            p = names[name]
            torch.testing.assert_close(weighted[p], torch.einsum("b,b...->...", w, g), rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", engm_w, g), rtol=rtol, atol=atol,
                                       msg=lambda m: f"ENGM p.grad of {name}: {m}")
        return engine
    finally:
        engm_fast.release(model)


# Distributed tests (DDP, FSDP2): a rank's ENGM against single-process ENGM on all ranks' examples.

def cat_batches(batches):
    """The per-rank batches ``[(x, y, ...)]`` concatenated in rank order: the single-process batch."""
    return tuple(torch.cat(parts) for parts in zip(*batches))


def full_tensor(p):
    """A sharded (DTensor) parameter's full value; any other tensor itself."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def assert_params_equal(model, ref, what: str, tol: float):
    """Every parameter of ``model`` (full tensors of sharded ones) within ``tol`` of ``ref``'s."""
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        err = float((full_tensor(p).detach() - q.detach()).abs().max())
        assert err <= tol, f"{what}: {name} differs from single-process ENGM by {err:.3e}"


def step_matches_single_process(opt, ref_opt, losses_here, losses_all, rank: int, sizes, tol: float):
    """One step of ``opt`` on this rank's losses and of ``ref_opt`` on every rank's; this rank's
    norms must be its slice of the reference norms. Returns them."""
    opt.zero_grad()
    norms = opt.backward(losses_here())
    assert norms.shape == (sizes[rank],)
    opt.step()
    ref_opt.zero_grad()
    ref_norms = ref_opt.backward(losses_all())
    ref_opt.step()
    offset = sum(sizes[:rank])
    torch.testing.assert_close(norms.double(), ref_norms[offset:offset + sizes[rank]].double(), rtol=0, atol=tol)
    return norms
