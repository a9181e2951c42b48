"""Peak memory per rank of one training step: ENGM and plain SGD, under FSDP2 and under DDP.

Every rank trains the same GPT-2-like model (transformers' GPT2LMHeadModel, random init, tied
head, float32) on its own batch, one method at a time:

* ``fsdp_sgd``: FSDP2 (each block a unit, the root a unit), ``loss.mean().backward()``,
  ``torch.optim.SGD(momentum=0.9)``: plain FSDP2 training;
* ``fsdp_engm``: the same sharded model, ``ENGM(model).backward(losses)`` (exact weights);
* ``ddp_sgd`` / ``ddp_engm``: the unsharded model in DistributedDataParallel.

For each, after two warm-up steps (momentum buffers and FSDP's lazy initialization exist),
steps (``zero_grad``, forward, backward, ``step``; 5 by default, the median reported) run under
:func:`engm_fast.bench.measure.peak_step_memory`: on the CPU, torch.profiler's allocator
events, whose running sum's maximum is the most tensor memory the step held at once *above*
what was allocated before it. ``resident`` is what each rank holds between steps: its
parameters (local shards under FSDP) and momentum buffers. ``total = resident + step peak``.

Run (CPU, gloo; a few minutes on 2 cores; the README's table):

    python benchmarks/fsdp_memory.py --width 512 --layers 6 --vocab 8192 --batch 4 \
        [--world 2] [--seq 32] [--repeats 5] [--out benchmarks/results/fsdp_memory.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from engm_fast.bench.local_group import run_local_group

METHODS = ("fsdp_sgd", "fsdp_engm", "ddp_sgd", "ddp_engm")


def _model(args):
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=args.vocab, n_embd=args.width, n_layer=args.layers, n_head=4,
                        n_positions=args.seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tf.GPT2LMHeadModel(cfg)


def _losses(model, ids, vocab):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1),
                           reduction="none").view(ids.shape[0], -1).sum(1)


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _measure(method: str, args, rank: int) -> dict:
    import engm_fast
    from engm_fast.bench.measure import peak_step_memory
    from torch.distributed.fsdp import fully_shard

    model = _model(args)
    n_params = sum(p.numel() for p in model.parameters())
    if method.startswith("fsdp"):
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    if method.endswith("engm"):
        opt = engm_fast.ENGM(wrapped, lr=1e-3, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        losses = _losses(wrapped, ids, args.vocab)
        if method.endswith("engm"):
            opt.backward(losses)
        else:
            losses.mean().backward()
        opt.step()

    for _ in range(2):
        step()
    opt.zero_grad(set_to_none=True)
    resident = sum(_local_bytes(p) for p in model.parameters())
    resident += sum(_local_bytes(s["momentum_buffer"]) for s in opt.state.values() if "momentum_buffer" in s)
    # The peak of an FSDP step varies from step to step by up to ~20 MiB here (gloo runs the
    # collectives in its own threads, whose allocations interleave with the step's frees), so
    # several steps are measured; the cyclic garbage collector is kept out of them (FSDP2's
    # states and parameter groups reference each other).
    peaks = []
    for _ in range(args.repeats):
        opt.zero_grad(set_to_none=True)  # each measured step starts without gradients
        dist.barrier()
        gc.collect()
        gc.disable()
        try:
            peaks.append(peak_step_memory(step, torch.device("cpu")))
        finally:
            gc.enable()
    peak = int(statistics.median(peaks))
    return {"method": method, "rank": rank, "resident_bytes": resident, "step_peak_bytes": peak,
            "step_peak_bytes_each": peaks, "total_bytes": resident + peak, "model_param_bytes": n_params * 4}


def _worker(rank, world, args, queue):
    rows = []
    for method in METHODS:
        rows.append(_measure(method, args, rank))
        if rank == 0:
            print(f"measured {method}", flush=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        queue.put([r for per_rank in gathered for r in per_rank])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="examples per rank")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5, help="measured steps per method (median reported)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "fsdp_memory.json"))
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    run_local_group(_worker, args.world, args, queue, timeout_s=300)
    rows = queue.get()
    mib = 2.0 ** 20
    print(f"GPT-2-like model: width {args.width}, {args.layers} layers, vocabulary {args.vocab}, "
          f"{rows[0]['model_param_bytes'] / mib:.1f} MiB of float32 parameters; {args.world} ranks, "
          f"batch {args.batch} x {args.seq} tokens per rank")
    print(f"{'method':<10} | {'rank':>4} | {'resident MiB':>12} | {'step peak MiB (median; min-max)':>31} | "
          f"{'total MiB':>9}")
    for r in sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["rank"])):
        each = r["step_peak_bytes_each"]
        spread = f"{r['step_peak_bytes'] / mib:.1f} ({min(each) / mib:.1f}-{max(each) / mib:.1f})"
        print(f"{r['method']:<10} | {r['rank']:>4} | {r['resident_bytes'] / mib:>12.1f} | {spread:>31} | "
              f"{r['total_bytes'] / mib:>9.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        config = {k: v for k, v in vars(args).items() if k != "out"}
        json.dump({"config": config | {"torch": torch.__version__, "device": "cpu", "backend": "gloo"},
                   "rows": rows}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
