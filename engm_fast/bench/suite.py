"""The benchmark cases, their runner, the results table and the JSON record.

A case is a model, a batch and what is timed: ``"step"`` (forward, backward, optimizer step)
or ``"pgd10"`` (a whole adversarial-training iteration: a 10-step L-infinity PGD attack,
eps 8/255, step 2/255, then the step; the ``engm_proxy`` method takes its input-gradient norms
from the attack's last step). Every method of :mod:`engm_fast.bench.methods` runs on its own
copy of the same initial model; each is timed against the plain ``torch.optim.SGD`` step on
the same batch (:func:`engm_fast.bench.measure.round_robin_times`), and its peak step memory is
divided by the plain step's.

Example::

    >>> from engm_fast.bench.suite import run, format_table
    >>> result = run(["mlp"], methods=["sgd", "engm"], quick=True, rounds=1, iters=1, progress=False)
    >>> [row["method"] for row in result["rows"]]
    ['sgd', 'engm']
    >>> print(format_table(result["rows"]).splitlines()[0])
    case | method | time / SGD | peak mem / SGD | ms/step | note
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

import engm_fast
from engm_fast.at import pgd_attack

from .._text import format_table as format_columns
from . import methods as M
from .measure import median_ratio, peak_step_memory, round_robin_times
from .models import (TransformerBlock, bert_classifier, cnn32, convnext_classifier, encoder_layer_classifier, gpt2_lm,
                     llama_lm, lstm_classifier, mlp, recurrent_classifier, resnet18, vit_classifier)

__all__ = ["CASES", "Case", "amortize_proxy", "cases_for", "format_table", "run"]

LR, MOMENTUM = 0.01, 0.9
PGD_EPS, PGD_ALPHA, PGD_STEPS = 8 / 255, 2 / 255, 10


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``make_model()``, a batch ``make_batch(generator)``, and the kind."""

    name: str
    make_model: Callable
    make_batch: Callable
    kind: str = "step"          # "step" or "pgd10"
    autocast: bool = False      # bf16 autocast around the forward (CUDA only)
    note: str = ""


def _images(B: int, C: int = 3, H: int = 32, classes: int = 10):
    def make(gen):
        return torch.rand(B, C, H, H, generator=gen), torch.randint(0, classes, (B,), generator=gen)
    return make


def _vectors(B: int, d: int, classes: int = 10):
    def make(gen):
        return torch.randn(B, d, generator=gen), torch.randint(0, classes, (B,), generator=gen)
    return make


def _tokens(B: int, T: int, vocab: int, classes: int = 10):
    def make(gen):
        return torch.randint(0, vocab, (B, T), generator=gen), torch.randint(0, classes, (B,), generator=gen)
    return make


def _lm_tokens(B: int, T: int, vocab: int):
    def make(gen):
        tokens = torch.randint(0, vocab, (B, T), generator=gen)
        return tokens, tokens  # next-token targets: the sequence itself, shifted by the loss
    return make


def real_model_cases(quick: bool) -> list[Case]:
    """Model code nobody here wrote, at width 256, T = 32, B = 32 (quick: 32, 8, 8)."""
    d, T, B, heads, vocab = (32, 8, 8, 2, 100) if quick else (256, 32, 32, 4, 1000)
    size = f"width {d}, T={T}, B={B}"
    image = 16 if quick else 32
    return [
        Case("gpt2", lambda: gpt2_lm(d, 2, heads, vocab), _lm_tokens(B, T, vocab),
             note=f"GPT2LMHeadModel, 2 layers, tied head, {size}"),
        Case("bert", lambda: bert_classifier(d, 2, heads, vocab), _tokens(B, T, vocab),
             note=f"BertForSequenceClassification, 2 layers, {size}"),
        Case("llama", lambda: llama_lm(d, 2, heads, vocab), _lm_tokens(B, T, vocab),
             note=f"LlamaForCausalLM, 2 layers, {size}"),
        Case("vit", lambda: vit_classifier(d, 2, heads, image=image, patch=4), _images(B, H=image),
             note=f"ViTForImageClassification, 2 layers, width {d}, {(image // 4) ** 2 + 1} tokens, B={B}"),
        Case("lstm", lambda: lstm_classifier(vocab, d), _tokens(B, T, vocab), note=f"Embedding + nn.LSTM, {size}"),
        Case("gru", lambda: recurrent_classifier("GRU", vocab, d), _tokens(B, T, vocab),
             note=f"Embedding + nn.GRU, {size}"),
        Case("rnn", lambda: recurrent_classifier("RNN", vocab, d), _tokens(B, T, vocab),
             note=f"Embedding + nn.RNN (tanh), {size}"),
        Case("encoder_layer", lambda: encoder_layer_classifier(vocab, d, heads, batch_first=False),
             _tokens(B, T, vocab), note=f"nn.TransformerEncoderLayer (time-major), {size}"),
        Case("convnext", lambda: convnext_classifier((d // 4, d // 2), (1, 1), image), _images(B, H=image),
             note=f"ConvNextForImageClassification, widths {d // 4}-{d // 2}, {image}x{image}, B={B}"),
    ]


def cases_for(device: str, quick: bool) -> dict[str, Case]:
    """The cases at the issue's sizes (CPU or CUDA), or small ones for ``quick``.

    Example::

        >>> sorted(cases_for("cpu", quick=True))[:4]
        ['bert', 'cnn', 'convnext', 'encoder_layer']
    """
    if quick:
        width, b_res, b_cnn, b_mlp = 16, 16, 16, 64
        tf = dict(B=8, T=32, d=64, heads=4)
    else:
        width, b_res, b_cnn, b_mlp = 64, 128, 64, 256
        tf = dict(B=32, T=256, d=512, heads=8) if device == "cuda" else dict(B=32, T=128, d=256, heads=4)
    vocab = 1000
    tf_note = f"B={tf['B']} T={tf['T']} d={tf['d']}"
    cases = [
        Case("mlp", mlp, _vectors(b_mlp, 784), note=f"784-512-512-10, B={b_mlp}"),
        Case("cnn", cnn32, _images(b_cnn), note=f"32x32, B={b_cnn}"),
        Case("resnet18_gn", lambda: resnet18("group", width), _images(b_res),
             note=f"GroupNorm, width {width}, B={b_res}"),
        Case("resnet18_bn", lambda: resnet18("batch", width), _images(b_res),
             note=f"BatchNorm, width {width}, B={b_res}"),
        Case("transformer", lambda: TransformerBlock(vocab, tf["d"], tf["heads"]), _tokens(tf["B"], tf["T"], vocab),
             note=tf_note),
        Case("pgd10_cnn", cnn32, _images(b_cnn), kind="pgd10", note=f"PGD-10 + step, 32x32, B={b_cnn}"),
    ] + real_model_cases(quick)
    if device == "cuda":
        cases += [
            Case("resnet18_gn_bf16", lambda: resnet18("group", width), _images(b_res), autocast=True,
                 note=f"bf16 autocast, GroupNorm, B={b_res}"),
            Case("resnet18_bn_bf16", lambda: resnet18("batch", width), _images(b_res), autocast=True,
                 note=f"bf16 autocast, BatchNorm, B={b_res}"),
            Case("transformer_bf16", lambda: TransformerBlock(vocab, tf["d"], tf["heads"]),
                 _tokens(tf["B"], tf["T"], vocab), autocast=True, note=f"bf16 autocast, {tf_note}"),
        ]
    return {c.name: c for c in cases}


CASES = tuple(cases_for("cpu", quick=False))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:160]


def _iteration(case: Case, runner: M.Runner, method: str, x, y, device) -> Callable[[], None]:
    """The timed callable of one method in one case."""
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if case.autocast
                else torch.autocast(device.type, enabled=False))

    if case.kind == "step":
        def step():
            with autocast:
                runner.step(x, y)
        return step

    def at_iteration():
        with autocast:
            with runner.attack_guard():
                out = pgd_attack(runner.model, x, y, eps=PGD_EPS, alpha=PGD_ALPHA, steps=PGD_STEPS,
                                 return_input_grad_norms=method == "engm_proxy")
            if method == "engm_proxy":
                x_adv, norms = out
                runner.step(x_adv, y, input_grad_norms=norms)
            else:
                runner.step(out, y)
    return at_iteration


def _run_case(case: Case, methods: list[str], device: torch.device, rounds: int, iters: int,
              log: Callable[[str], None]) -> list[dict]:
    torch.manual_seed(0)
    try:
        base_model = case.make_model().to(device)
    except ImportError as exc:  # an optional package the case needs
        log(f"{case.name}: skipped ({exc})")
        return [{"case": case.name, "method": m, "kind": case.kind, "note": case.note, "status": f"cannot: {exc}"}
                for m in methods]
    gen = torch.Generator().manual_seed(1)
    x, y = (t.to(device) for t in case.make_batch(gen))
    fns, rows = {}, {}
    for method in methods:
        row = {"case": case.name, "method": method, "kind": case.kind, "note": case.note}
        rows[method] = row
        try:
            # Peers warn on every step (e.g. about full backward hooks); each distinct warning is
            # kept in the row instead of flooding the table.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                runner = M.build(method, copy.deepcopy(base_model), lr=LR, momentum=MOMENTUM)
                fn = _iteration(case, runner, method, x, y, device)
                fn()  # also the check that the method runs this case at all
            row["warnings"] = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"
                                      for w in caught})
        except M.Unsupported as exc:
            row["status"] = f"cannot: {exc}"
            continue
        except Exception as exc:  # a peer failing on a model is a result to show, not a crash
            row["status"] = f"failed: {_short(exc)}"
            continue
        row["status"] = "ok"
        if (method, case.name) in M.KNOWN_WRONG:
            row["wrong_update"] = M.KNOWN_WRONG[(method, case.name)]
        fns[method] = fn
        log(f"{case.name}: {method} ready")
    if "sgd" not in fns:
        raise RuntimeError(f"case {case.name}: the plain SGD baseline failed: {rows['sgd']['status']}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same warnings again; recorded above
        times = round_robin_times(fns, device, rounds, iters, warmup=1,
                                  progress=lambda msg: log(f"{case.name}: timing {msg}"))
        base_peak = peak_step_memory(fns["sgd"], device)
        peaks = {m: base_peak if m == "sgd" else peak_step_memory(fn, device) for m, fn in fns.items()}
    for method in fns:
        row = rows[method]
        row["ms"] = statistics.median(times[method])
        row["time_ratio"] = median_ratio(times, method, "sgd")
        row["time_ratio_rounds"] = [t / b for t, b in zip(times[method], times["sgd"])]
        row["peak_bytes"] = peaks[method]
        row["mem_ratio"] = row["peak_bytes"] / base_peak if base_peak else float("nan")
    amortize_proxy([rows[m] for m in methods])
    log(f"{case.name}: done")
    return [rows[m] for m in methods]


def amortize_proxy(case_rows: list[dict]) -> None:
    """Makes the ``engm_proxy`` row of one case count its exact calibration steps (in place).

    The timed steps are all between calibrations (a case times far fewer than
    ``PROXY_CALIBRATE_EVERY`` steps after the first, exact one), but a run pays one exact step in
    ``PROXY_CALIBRATE_EVERY``: that step is the ``engm`` method's step, so the time ratio becomes
    ``proxy + (engm - proxy) / PROXY_CALIBRATE_EVERY`` and the peak memory the larger of the two.
    The measured values stay in ``*_between_calibrations``. Without an ``engm`` row of the same
    case the row says that its figures leave the exact steps out.

    Example::

        >>> rows = [{"method": "engm", "status": "ok", "time_ratio": 1.5, "mem_ratio": 1.6, "peak_bytes": 16},
        ...         {"method": "engm_proxy", "status": "ok", "time_ratio": 1.0, "mem_ratio": 1.0, "peak_bytes": 10}]
        >>> amortize_proxy(rows)
        >>> rows[1]["time_ratio"], rows[1]["mem_ratio"], rows[1]["time_ratio_between_calibrations"]
        (1.01, 1.6, 1.0)
    """
    by = {r["method"]: r for r in case_rows}
    proxy, exact = by.get("engm_proxy"), by.get("engm")
    if proxy is None or proxy.get("status") != "ok" or "time_ratio_between_calibrations" in proxy:
        return
    proxy["time_ratio_between_calibrations"] = proxy["time_ratio"]
    proxy["mem_ratio_between_calibrations"] = proxy["mem_ratio"]
    if exact is None or exact.get("status") != "ok":
        proxy["amortized"] = "no: exact calibration steps not included (run the engm method too)"
        return
    n = M.PROXY_CALIBRATE_EVERY
    proxy["time_ratio"] = proxy["time_ratio"] + (exact["time_ratio"] - proxy["time_ratio"]) / n
    proxy["mem_ratio"] = max(proxy["mem_ratio"], exact["mem_ratio"])
    proxy["peak_bytes"] = max(proxy["peak_bytes"], exact["peak_bytes"])
    proxy["amortized"] = f"yes: 1 exact step in {n} (the engm row's) included"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: platform's answer is the best there is
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Machine, device, versions and date for the JSON record."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "engm_fast": engm_fast.__version__,
        "engm_fast_backends": engm_fast.available_backends(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for name in ("backpack", "opacus"):
        try:
            from importlib.metadata import version
            info[name] = version({"backpack": "backpack-for-pytorch"}.get(name, name))
        except Exception:  # not installed: the table says so per case
            info[name] = None
    return info


def run(case_names: list[str] | None = None, methods: list[str] | None = None, device: str = "cpu",
        quick: bool = False, rounds: int | None = None, iters: int | None = None,
        progress: bool = True) -> dict:
    """Runs the cases and returns ``{"meta": ..., "rows": [...]}`` (one row per case and method).

    Args:
        case_names: subset of :func:`cases_for`'s names (default: all for the device).
        methods: subset of :data:`engm_fast.bench.methods.METHODS`; ``"sgd"`` is always added.
        device: ``"cpu"`` or ``"cuda"``.
        quick: small models and batches, fewer rounds (a smoke run in minutes).
        rounds, iters: timing rounds and calls per round (defaults: 7 x 3, quick 3 x 1).
        progress: print progress lines to stderr.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but torch.cuda.is_available() is False")
    available = cases_for(dev.type, quick)
    case_names = list(available) if not case_names else list(case_names)
    unknown = [c for c in case_names if c not in available]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {sorted(available)}")
    methods = list(M.METHODS) if not methods else list(methods)
    bad = [m for m in methods if m not in M.METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {M.METHODS}")
    if "sgd" not in methods:
        methods.insert(0, "sgd")
    rounds = rounds or (3 if quick else 7)
    iters = iters or (1 if quick else 3)

    def log(msg: str) -> None:
        if progress:
            print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    rows = []
    for name in case_names:
        log(f"{name}: start ({available[name].note})")
        rows += _run_case(available[name], methods, dev, rounds, iters, log)
    meta = machine_info(dev) | {"quick": quick, "rounds": rounds, "iters": iters, "lr": LR, "momentum": MOMENTUM,
                                "eps": M.EPS}
    return {"meta": meta, "rows": rows}


def format_table(rows: list[dict]) -> str:
    """A plain-text table of the rows (``time / SGD`` and ``peak mem / SGD`` are ratios)."""
    header = ("case", "method", "time / SGD", "peak mem / SGD", "ms/step", "note")
    lines = []
    for r in rows:
        if r.get("status") == "ok":
            note = r["note"] if r["method"] == "sgd" else ("WRONG UPDATE: " + r["wrong_update"]
                                                           if r.get("wrong_update") else "")
            lines.append((r["case"], r["method"], f"{r['time_ratio']:.2f}x", f"{r['mem_ratio']:.2f}x",
                          f"{r['ms']:.1f}", note))
        else:
            lines.append((r["case"], r["method"], "-", "-", "-", r.get("status", "")))
    return format_columns(header, lines, pad_last=False)
