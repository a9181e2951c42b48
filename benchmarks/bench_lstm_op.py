"""The LSTM recurrence op (engm_fast.ops.lstm): the C++ CPU kernel against its pure-PyTorch
reference, and the forward against torch's fused LSTM (oneDNN on this CPU), which the recurrent
rule cannot use (it exposes no per-step gate gradient) but which is the floor to aim at.

Per shape (B, T, H; one layer and direction, float32), median milliseconds over rounds
(engm_fast.bench.measure.round_robin_times: every function ``--iters`` times per round, the
order rotating, in one process, so drift hits all alike):

* forward: reference, kernel, and ``torch.lstm`` ("fused"). The fused op computes the input
  projection ``gx`` itself, which the other two are given: it runs on ``x`` and the time of that
  projection alone (``F.linear``) is subtracted;
* backward: reference and kernel (the GEMM per step, dz_t W_hh, is in both).

    python benchmarks/bench_lstm_op.py [--rounds 7] [--iters 5] [--threads N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from engm_fast import _backend
from engm_fast.bench.measure import round_robin_times
from engm_fast.ops import lstm as lstm_op

SHAPES = [(32, 32, 256), (8, 128, 128), (64, 16, 512)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5, help="calls of each function per round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _backend._native_has("CPU", "lstm_recurrence"):
        why = _backend.native_import_error() or "it was built before the LSTM kernel"
        raise SystemExit(f"engm_fast._C has no LSTM recurrence kernel ({why}): pip install --no-build-isolation -e .")
    kernel = torch.ops.engm_fast
    rows = []
    print(f"{'B':>4} {'T':>4} {'H':>4}  {'fwd ref':>8} {'fwd C++':>8} {'fused':>8}  {'bwd ref':>8} {'bwd C++':>8}  "
          f"(ms, median of {args.rounds} rounds, {torch.get_num_threads()} threads)")
    for B, T, H in SHAPES:
        g = torch.Generator().manual_seed(0)
        k = H ** -0.5
        x = torch.randn(B, T, H, generator=g)
        w_ih, w_hh = torch.randn(4 * H, H, generator=g) * k, torch.randn(4 * H, H, generator=g) * k
        b_ih, b_hh = torch.randn(4 * H, generator=g) * k, torch.randn(4 * H, generator=g) * k
        h0, c0 = torch.zeros(B, H), torch.zeros(B, H)
        gx = torch.nn.functional.linear(x, w_ih, b_ih)
        grad_h = torch.randn(B, H, generator=g)
        _, acts, cells, tanh_c, _ = kernel.lstm_recurrence(gx, h0, c0, w_hh, b_hh, None, None, False)
        fns = {
            "fwd ref": lambda: lstm_op.lstm_recurrence_reference(gx, h0, c0, w_hh, b_hh),
            "fwd C++": lambda: kernel.lstm_recurrence(gx, h0, c0, w_hh, b_hh, None, None, False),
            "fused": lambda: torch.lstm(x, (h0[None], c0[None]), [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False,
                                        False, True),
            "projection": lambda: torch.nn.functional.linear(x, w_ih, b_ih),
            "bwd ref": lambda: lstm_op.lstm_recurrence_backward_reference(None, grad_h, None, w_hh, None, acts, cells,
                                                                          tanh_c, c0, False, False),
            "bwd C++": lambda: kernel.lstm_recurrence_backward(None, grad_h, None, w_hh, None, acts, cells, tanh_c,
                                                               c0, False, False),
        }
        with torch.no_grad():
            times = round_robin_times(fns, torch.device("cpu"), args.rounds, args.iters)
        med = {name: statistics.median(t) for name, t in times.items()}
        med["fused"] -= med.pop("projection")   # the recurrence alone, as the other two
        print(f"{B:>4} {T:>4} {H:>4}  {med['fwd ref']:8.3f} {med['fwd C++']:8.3f} {med['fused']:8.3f}  "
              f"{med['bwd ref']:8.3f} {med['bwd C++']:8.3f}")
        rows.append({"B": B, "T": T, "H": H, **{k: round(v, 4) for k, v in med.items()}})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "rounds": args.rounds, "iters": args.iters,
                       "command": f"python benchmarks/bench_lstm_op.py --rounds {args.rounds} --iters {args.iters}",
                       "torch": torch.__version__,
                       "unit": "ms", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
