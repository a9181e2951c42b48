"""ENGM and per-example norms under FSDP2 (``fully_shard``): 2 CPU processes (gloo) against one.

One spawn runs every scenario (each process imports torch once). The reference is
single-process ENGM (or the engine's norms) on the concatenation of the ranks' batches in rank
order, float64, within 1e-10. Models: an MLP with an Embedding, Linear units of their own and
a LayerNorm in the root unit, and a tiny GPT-2 (transformers' GPT2LMHeadModel: blocks as units,
the tied embedding and head in the root unit).
A 4-process run of the main scenarios is marked slow.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

import engm_fast
from engm_fast.bench.local_group import run_local_group
from engm_fast.engine import fsdp2
from engm_fast.optim import fsdp as engm_fsdp

from conftest import assert_params_equal, cat_batches, full_tensor, step_matches_single_process

TOL = 1e-10
HP = dict(lr=0.3, momentum=0.9, weight_decay=1e-3)
V = 13  # vocabulary


class _MLP(nn.Module):
    """Embedding -> Linear -> ReLU -> LayerNorm -> Linear, mean over positions."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 6)
        self.l1 = nn.Linear(6, 7)
        self.ln = nn.LayerNorm(7)
        self.l2 = nn.Linear(7, 3)

    def forward(self, ids):
        return self.l2(self.ln(self.l1(self.emb(ids)).relu())).mean(1)


def _mlp(dtype=torch.float64):
    torch.manual_seed(21)
    return _MLP().to(dtype)


def _shard_mlp(model, **kw):
    fully_shard(model.l1, **kw)
    fully_shard(model.l2, **kw)
    return fully_shard(model, **kw)


def _mlp_data(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, V, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def _mlp_losses(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _gpt2():
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(22)
    cfg = tf.GPT2Config(vocab_size=V, n_embd=8, n_layer=2, n_head=2, n_positions=8, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg).double()


def _shard_gpt2(model, **kw):
    for block in model.transformer.h:
        fully_shard(block, **kw)
    return fully_shard(model, **kw)


def _gpt2_data(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, V, (n, 6), generator=g),) for n in sizes]


def _gpt2_losses(model, batch):
    ids = batch[0]
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(
        ids.shape[0], -1).sum(1)


_cat, _full = cat_batches, full_tensor


def _assert_params_equal(model, ref, what, tol=TOL):
    assert_params_equal(model, ref, what, tol)


class _CountingReduceScatter:
    """FSDP's reduce-scatter through its public ``set_custom_reduce_scatter``: counts the calls."""

    def __init__(self):
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

        self.inner, self.calls = DefaultReduceScatter(), 0

    def allocate(self, size, *, dtype, device):
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.calls += 1
        return self.inner(output_tensor, input_tensor, group, op, async_op)


def _run_steps(rank, world, make, shard, data, losses_of, schedule, seed, opt_kw, check_diag=True, tol=TOL,
               shard_kw=None):
    """ENGM on the sharded model vs single-process ENGM on the concatenation, step by step."""
    model, ref = make(), make()
    shard(model, **(shard_kw or {}))
    opt = engm_fast.ENGM(model, **opt_kw)
    ref_opt = engm_fast.ENGM(ref, **opt_kw)
    for step, sizes in enumerate(schedule):
        per_rank = data(sizes, seed + step)
        norms = step_matches_single_process(opt, ref_opt, lambda: losses_of(model, per_rank[rank]),
                                            lambda: losses_of(ref, _cat(per_rank)), rank, sizes, tol)
        _assert_params_equal(model, ref, f"step {step}, sizes {sizes}", tol)
        if check_diag:
            for key in ("norm_mean", "norm_max", "norm_min", "weight_mean", "grad_variance", "grad_sqnorm"):
                got, want = opt.diagnostics[key], ref_opt.diagnostics[key]
                assert (got is None) == (want is None), key
                if want is not None:
                    assert got == pytest.approx(want, rel=1e-9, abs=1e-12), key
    return model, opt, ref_opt


def _scenario_mlp_exact_uneven(rank, world):
    """Exact weights, uneven and empty per-rank batches, momentum, variance; FSDP's own
    reduce-scatter never runs in ENGM's backward (no double reduction), but does for a plain one."""
    sizes = [(4, 3, 2, 5)[:world], (2, 5, 0, 1)[:world], (3, 0, 4, 2)[:world]]
    model, opt, _ = _run_steps(rank, world, _mlp, _shard_mlp, _mlp_data, _mlp_losses, sizes, 100,
                               dict(HP, track_variance=True))
    counter = _CountingReduceScatter()
    for m in model.modules():
        if isinstance(m, torch.distributed.fsdp.FSDPModule):
            m.set_custom_reduce_scatter(counter)
    opt.zero_grad()
    opt.backward(_mlp_losses(model, _mlp_data((3,) * world, 150)[rank]))
    assert counter.calls == 0, "FSDP reduce-scattered ENGM's gradients too (double reduction)"
    _mlp_losses(model, _mlp_data((3,) * world, 151)[rank]).mean().backward()
    assert counter.calls == 3, "the counter never fires: the double-reduction check above cannot fail"


def _scenario_gpt2_exact(rank, world):
    """GPT-2 (broadcast position embeddings, Conv1D, tied head in the root unit), exact weights."""
    sizes = [(3, 2, 1, 2)[:world], (1, 3, 2, 1)[:world], (2, 2, 2, 2)[:world]]  # GPT-2 cannot run an empty batch
    _run_steps(rank, world, _gpt2, _shard_gpt2, _gpt2_data, _gpt2_losses, sizes, 200, dict(HP))


def _scenario_proxy(rank, world):
    """Input proxy (calibrate_every=2): the fit from all ranks' pairs, FSDP's own reduction on the
    proxy steps, divided by the global count. Then with the LayerNorm's parameters left out of
    FSDP (ignored_params: replicated, all-reduced by ENGM)."""
    sizes = [(4, 3, 3, 2)[:world], (5, 2, 1, 3)[:world], (3, 3, 0, 2)[:world], (2, 5, 2, 2)[:world]]
    kw = dict(HP, norm_source="input_proxy", calibrate_every=2)
    for shard in (_shard_mlp_float, _shard_mlp_float_ignoring_ln):
        model, opt, ref_opt = _run_steps(rank, world, _mlp_float_input, shard, _float_data, _float_losses,
                                         sizes, 300, kw, check_diag=False)
        got, want = opt.proxy_stats, ref_opt.proxy_stats
        assert got["calibrations"] == want["calibrations"] == 2
        for key in ("alpha", "beta", "pearson_r"):
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert not hasattr(model.ln.weight, "full_tensor") and hasattr(model.l1.weight, "full_tensor")


class _Affine(nn.Module):
    """A module without a rule whose parameters the engine follows as shared tensors."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, d))

    def forward(self, x):
        return x * self.weight + self.bias


class _FloatMLP(nn.Module):
    """For the input proxy (a floating-point input): Linear units, a LayerNorm in the root, and a
    module without a rule as a unit of its own."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 7)
        self.ln = nn.LayerNorm(7)
        self.aff = _Affine(7)
        self.l2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.l2(self.aff(self.ln(self.l1(x).tanh())))


def _mlp_float_input():
    torch.manual_seed(23)
    return _FloatMLP().double()


def _shard_mlp_float(model, **kw):
    for unit in (model.l1, model.aff, model.l2):
        fully_shard(unit, **kw)
    return fully_shard(model, **kw)


def _shard_mlp_float_ignoring_ln(model, **kw):
    for unit in (model.l1, model.aff, model.l2):
        fully_shard(unit, **kw)
    return fully_shard(model, ignored_params={model.ln.weight, model.ln.bias}, **kw)


def _float_data(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in sizes]


def _float_losses(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _scenario_no_sync(rank, world):
    """set_requires_gradient_sync(False): two micro-batches accumulate (no reduce-scatter, .grad
    untouched), the third reduces ONCE; ENGM of one batch of all micro-batches of all ranks.
    Exact weights, then the input proxy (its micro-batches through FSDP's own accumulation)."""
    for kw, steps in ((dict(HP), 2), (dict(HP, norm_source="input_proxy", calibrate_every=2), 3)):
        model, ref = _mlp_float_input(), _mlp_float_input()
        _shard_mlp_float(model)
        opt, ref_opt = engm_fast.ENGM(model, **kw), engm_fast.ENGM(ref, **kw)
        calls = []
        original = engm_fsdp._reduce_scatter
        engm_fsdp._reduce_scatter = lambda *a: calls.append(1) or original(*a)
        try:
            for step in range(steps):
                sizes = [(3, 2, 1, 2)[:world], (1, 4, 2, 2)[:world], (2, 2, 3, 0)[:world]]
                micro = [_float_data(s, 400 + 10 * step + k) for k, s in enumerate(sizes)]
                opt.zero_grad()
                calls.clear()
                model.set_requires_gradient_sync(False)
                for k in range(2):
                    opt.backward(_float_losses(model, micro[k][rank]))
                assert all(p.grad is None for p in model.parameters()), "a micro-batch wrote .grad"
                assert calls == []
                with pytest.raises(RuntimeError, match="no_sync"):
                    opt.step()
                model.set_requires_gradient_sync(True)
                opt.backward(_float_losses(model, micro[2][rank]))
                opt.step()
                if opt.norm_source == "exact":
                    assert len(calls) == 4, f"{len(calls)} reduce-scatters, not one per unit"
                ref_batch = _cat([micro[k][r] for r in range(world) for k in range(3)])
                ref_opt.zero_grad()
                ref_opt.backward(_float_losses(ref, ref_batch))
                ref_opt.step()
                _assert_params_equal(model, ref, f"no_sync {kw.get('norm_source', 'exact')} step {step}")
        finally:
            engm_fsdp._reduce_scatter = original
        assert opt.backward_steps == ref_opt.backward_steps == steps


def _scenario_drop(rank, world):
    """nonfinite="drop" with a NaN input on the last rank: exact steps and input-proxy steps (all
    ranks then take the engine's route) equal single-process ENGM dropping the same example."""
    kw = dict(HP, nonfinite="drop", norm_source="input_proxy", calibrate_every=2)
    model, ref = _mlp_float_input(), _mlp_float_input()
    _shard_mlp_float(model)
    opt, ref_opt = engm_fast.ENGM(model, **kw), engm_fast.ENGM(ref, **kw)
    for step in range(4):
        sizes = (3, 4, 2, 2)[:world]
        per_rank = _float_data(sizes, 450 + step)
        x, y = per_rank[-1]
        x[1] = float("nan")
        opt.zero_grad()
        opt.backward(_float_losses(model, per_rank[rank]))
        opt.step()
        assert opt.last_dropped == ([1] if rank == world - 1 else [])
        ref_opt.zero_grad()
        ref_opt.backward(_float_losses(ref, _cat(per_rank)))
        ref_opt.step()
        assert opt.diagnostics["n_dropped"] == ref_opt.diagnostics["n_dropped"] == 1
        _assert_params_equal(model, ref, f"drop step {step}")
    assert opt.proxy_stats["calibrations"] == 2


def _scenario_error_on_one_rank(rank, world):
    """A NaN loss on the last rank (before the pass) and a loss vector of the wrong length on
    rank 0 (found inside the engine's pass): every rank raises, none hangs, nothing is written;
    the next step works."""
    model = _mlp()
    _shard_mlp(model)
    opt = engm_fast.ENGM(model, **HP)
    before = [_full(p).detach().clone() for p in model.parameters()]
    losses = _mlp_losses(model, _mlp_data((4,) * world, 500)[rank])
    if rank == world - 1:
        losses = torch.where(torch.arange(4) == 2, losses * float("nan"), losses)
        expected = (FloatingPointError, r"1 of 4 losses")
    else:
        expected = (RuntimeError, rf"rank\(s\) \[{world - 1}\].*FloatingPointError")
    opt.zero_grad()
    with pytest.raises(expected[0], match=expected[1]):
        opt.backward(losses)
    assert all(p.grad is None for p in model.parameters())
    losses = _mlp_losses(model, _mlp_data((4,) * world, 501)[rank])
    if rank == 0:
        losses = losses[:2]  # the layers saw 4 examples: the engine finds it inside its pass
        expected = (ValueError, r"losses has shape \(2,\)")
    else:
        expected = (RuntimeError, r"rank\(s\) \[0\].*ValueError")
    with pytest.raises(expected[0], match=expected[1]):
        opt.backward(losses)
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    assert all(torch.equal(a, _full(b)) for a, b in zip(before, model.parameters()))
    opt.backward(_mlp_losses(model, _mlp_data((4,) * world, 502)[rank]))
    opt.step()
    assert not all(torch.equal(a, _full(b)) for a, b in zip(before, model.parameters()))


def _scenario_reshard_false_and_offload(rank, world):
    """reshard_after_forward=False on every unit, a CPU offload policy, and an engine attached
    before fully_shard (FSDP's hooks then run after the engine's): the same results."""
    sizes = [(3, 2, 2, 1)[:world], (1, 4, 0, 2)[:world]]
    _run_steps(rank, world, _mlp, _shard_mlp, _mlp_data, _mlp_losses, sizes, 600, dict(HP),
               shard_kw=dict(reshard_after_forward=False))
    _run_steps(rank, world, _mlp, _shard_mlp, _mlp_data, _mlp_losses, sizes, 610, dict(HP),
               shard_kw=dict(offload_policy=CPUOffloadPolicy(pin_memory=False)))
    _run_steps(rank, world, _mlp, _attach_then_shard_mlp, _mlp_data, _mlp_losses, sizes, 620, dict(HP))


def _attach_then_shard_mlp(model, **kw):
    engm_fast.attach(model)
    return _shard_mlp(model, **kw)


def _scenario_mixed_precision(rank, world):
    """MixedPrecisionPolicy(bf16 params, fp32 reduction) on a float32 model: norms and the step
    against float64 single-process ENGM within bf16 accuracy; .grad is float32 DTensors."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model, ref = _mlp(torch.float32), _mlp(torch.float64)
    _shard_mlp(model, mp_policy=policy)
    opt, ref_opt = engm_fast.ENGM(model, **HP), engm_fast.ENGM(ref, **HP)
    sizes = (4, 3, 2, 2)[:world]
    per_rank = _mlp_data(sizes, 700)
    norms = opt.backward(_mlp_losses(model, per_rank[rank]))
    ref_norms = ref_opt.backward(_mlp_losses(ref, _cat(per_rank)))
    offset = sum(sizes[:rank])
    torch.testing.assert_close(norms.double(), ref_norms[offset:offset + sizes[rank]], rtol=3e-2, atol=1e-3)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32 and type(p.grad).__name__ == "DTensor", name
        torch.testing.assert_close(p.grad.full_tensor().double(), q.grad, rtol=5e-2, atol=5e-3, msg=name)


def _scenario_per_example_norms(rank, world):
    """engm_fast.per_example_grad_norms on the sharded GPT-2 and MLP: this rank's norms equal
    the single-process ones; an empty batch on one rank (MLP: GPT-2 itself cannot run one);
    .grad untouched."""
    for make, shard, data, losses_of, sizes in ((_gpt2, _shard_gpt2, _gpt2_data, _gpt2_losses, (3, 1, 2, 2)),
                                                (_mlp, _shard_mlp, _mlp_data, _mlp_losses, (3, 0, 2, 1))):
        model, ref = make(), make()
        shard(model)
        with pytest.raises(ValueError, match="attach"):  # no engine: refused, not the slow per-example loop
            engm_fast.per_example_grad_norms(model, losses_of(model, data((2,) * world, 799)[rank]))
        engm_fast.attach(model)
        engm_fast.attach(ref)
        sizes = sizes[:world]
        per_rank = data(sizes, 800)
        norms = engm_fast.per_example_grad_norms(model, losses_of(model, per_rank[rank]))
        ref_norms = engm_fast.per_example_grad_norms(ref, losses_of(ref, _cat(per_rank)))
        offset = sum(sizes[:rank])
        torch.testing.assert_close(norms, ref_norms[offset:offset + sizes[rank]], rtol=0, atol=TOL)
        assert all(p.grad is None for p in model.parameters())


def _scenario_unsupported(rank, world):
    """Clear errors, raised on every rank: a GradScaler; HSDP (a 2-D mesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    model = _mlp()
    _shard_mlp(model)
    opt = engm_fast.ENGM(model, **HP)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(NotImplementedError, match="GradScaler"):
        opt.backward(_mlp_losses(model, _mlp_data((2,) * world, 900)[rank]), scaler=scaler)
    hsdp = _mlp()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    fully_shard(hsdp, mesh=mesh)
    with pytest.raises(NotImplementedError, match="HSDP"):
        engm_fast.ENGM(hsdp, **HP)
    late = _mlp()
    _shard_mlp(late)
    late(_mlp_data((2,) * world, 901)[rank][0])  # the root unit now holds its unsharded parameters
    with pytest.raises(ValueError, match="before the forward"):
        engm_fast.ENGM(late, **HP)
    early = _mlp()
    opt = engm_fast.ENGM(early, **HP)
    _shard_mlp(early)  # after the optimizer: it holds parameters the model no longer has
    with pytest.raises(ValueError, match="after fully_shard"):
        engm_fast.ENGM(early, **HP, params=opt.param_groups[0]["params"])
    torch.manual_seed(24)
    odd = nn.Sequential(nn.Linear(4, 5), nn.PReLU(5), nn.Linear(5, 3)).double()  # PReLU: the torch.func fallback
    fully_shard(odd)
    opt = engm_fast.ENGM(odd, **HP)
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"\['1'\].*torch.func fallback"):
        opt.backward(F.cross_entropy(odd(x), torch.tensor([0, 1, 2]), reduction="none"))
    assert all(p.grad is None for p in odd.parameters())


def _scenario_fsdp_internals(rank, world):
    """What engm_fast.engine.fsdp2 relies on in FSDP2's private state (see its docstring)."""
    model = _mlp()
    _shard_mlp(model, reshard_after_forward=True)
    assert fsdp2.original_class(type(model.l1)) is nn.Linear and type(model.l1) is not nn.Linear
    assert fsdp2.is_unit(model.l1) and not fsdp2.is_unit(model.ln)
    units = fsdp2.units(model)
    assert [u.name for u in units] == ["<root>", "l1", "l2"]
    names = {sp.name for u in units for sp in u.params}
    assert names == {n for n, _ in model.named_parameters()}
    sharded = {sp.sharded for u in units for sp in u.params}
    assert sharded == set(model.parameters())  # what the model registers between calls
    assert all(sp.unsharded is None for u in units for sp in u.params)  # before the first all-gather
    _mlp_losses(model, _mlp_data((2,) * world, 950)[rank]).sum().backward()
    first = [sp.unsharded for u in units for sp in u.params]
    assert all(p is not None and p.shape == sp.sharded.shape for p, sp in zip(first, (sp for u in units for sp in u.params)))
    seen = {}
    hook = model.l1.register_forward_pre_hook(lambda m, a: seen.update(w=m.weight))  # after FSDP's all-gather
    _mlp_losses(model, _mlp_data((2,) * world, 951)[rank]).sum().backward()
    hook.remove()
    assert seen["w"] is units[1].params[0].unsharded is first[len(units[0].params)], \
        "the unsharded parameter is not one object reused by every all-gather"
    assert fsdp2.gradient_sync(model)
    model.set_requires_gradient_sync(False)
    assert not fsdp2.gradient_sync(model)
    model.l1.set_requires_gradient_sync(True, recurse=False)
    with pytest.raises(ValueError, match="set_requires_gradient_sync"):
        fsdp2.gradient_sync(model)
    model.set_requires_gradient_sync(True)
    model.set_gradient_divide_factor(3.0)
    with fsdp2.reduction_divided_by(model, 7):
        assert {g.gradient_divide_factor for u in (model, model.l1, model.l2)
                for g in u._get_fsdp_state()._fsdp_param_groups} == {7.0}
    assert [g.gradient_divide_factor for g in model._get_fsdp_state()._fsdp_param_groups] == [3.0]
    assert {sp.reduce_dtype for u in units for sp in u.params} == {torch.float64}


SCENARIOS = [_scenario_fsdp_internals, _scenario_mlp_exact_uneven, _scenario_gpt2_exact, _scenario_proxy,
             _scenario_no_sync, _scenario_drop, _scenario_error_on_one_rank, _scenario_reshard_false_and_offload,
             _scenario_mixed_precision, _scenario_per_example_norms, _scenario_unsupported]
SLOW_SCENARIOS = [_scenario_mlp_exact_uneven, _scenario_gpt2_exact, _scenario_proxy, _scenario_no_sync,
                  _scenario_drop, _scenario_error_on_one_rank]


def _run(rank, world, scenarios):
    for scenario in scenarios:
        scenario(rank, world)
        dist.barrier()


def test_fsdp2_engm_equals_single_process_engm():
    pytest.importorskip("transformers")
    run_local_group(_run, 2, SCENARIOS)


@pytest.mark.slow
def test_fsdp2_engm_four_processes():
    pytest.importorskip("transformers")
    run_local_group(_run, 4, SLOW_SCENARIOS)
