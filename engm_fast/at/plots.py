"""Plots of training runs (results of :func:`engm_fast.at.train.train`): accuracy per epoch and
gradient statistics. matplotlib runs headless (Agg): files are written, no window opens.

Example::

    >>> history = [{"epoch": e, "train_adv_acc": 0.1 * e, "test_clean_acc": 0.2 * e,
    ...             "test_robust_acc_pgd10": 0.1 * e, "train_robust_acc_pgd10": None} for e in (1, 2)]
    >>> plot_accuracy({"run": {"history": history}}, "/tmp/engm_plot_doctest.png")
    '/tmp/engm_plot_doctest.png'
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

__all__ = ["plot_accuracy", "plot_gradient_stats", "plot_history"]

_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: write a file, never open a window
    import matplotlib.pyplot as plt

    return plt


def _rows(history: list[dict]) -> list[dict]:
    """Epochs that trained (not the diverged marker), ``None`` as NaN: gaps where not evaluated."""
    nan = float("nan")
    return [{k: (nan if v is None else v) for k, v in h.items()} for h in history if not h.get("diverged")]


def _key(row: dict, prefix: str) -> str | None:
    return next((k for k in row if k.startswith(prefix)), None)


def _foreign_keys(final: Mapping) -> list[str]:
    return [k[len("robust_acc_"):] for k in final if k.startswith("robust_acc_") and k != "robust_acc_pgd"]


def _label(attack_key: str) -> str:
    from .evaluation import EVAL_ATTACKS

    return next((a.label for a in EVAL_ATTACKS.values() if a.key == attack_key), attack_key)


def plot_accuracy(runs: Mapping[str, dict], path: str, title: str = "") -> str:
    """Test robust (per-epoch PGD) and clean accuracy per epoch of each run, its final PGD
    accuracy as a star and each other final attack's as a marker beside it; a single run also
    gets its training-set curves. Returns ``path``.

    ``runs`` maps a legend label to a results dict (at least ``history``; ``final`` adds the star).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    single = len(runs) == 1
    for (label, res), color in zip(runs.items(), _COLORS * (1 + len(runs) // len(_COLORS))):
        rows = _rows(res["history"])
        if not rows:
            continue
        ep = [h["epoch"] for h in rows]
        robust = _key(rows[0], "test_robust_acc_")
        name = re.sub(r"^([a-z]+)(\d+)$", lambda m: f"{m[1].upper()}-{m[2]}", robust.rsplit("_", 1)[-1])  # PGD-10
        prefix = f"{label} " if label else ""
        ax.plot(ep, [h[robust] for h in rows], "-o", ms=3, color=color, label=f"{prefix}test robust ({name})")
        ax.plot(ep, [h["test_clean_acc"] for h in rows], ":", color=color, alpha=0.7, label=f"{prefix}test clean")
        final = res.get("final") or {}
        if "robust_acc_pgd" in final:
            ax.plot([ep[-1]], [final["robust_acc_pgd"]], "*", ms=11, color=color,
                    label=f"{prefix}final PGD-{final['pgd_steps']}")
        for attack_key, marker in zip(_foreign_keys(final), "Dv^s"):  # the foreign attacks of the final evaluation
            ax.plot([ep[-1]], [final[f"robust_acc_{attack_key}"]], marker, ms=7, color=color,
                    label=f"{prefix}final {_label(attack_key)}-{final.get(f'{attack_key}_steps', '?')}")
        if single:
            ax.plot(ep, [h["train_adv_acc"] for h in rows], "--", color="tab:gray",
                    label="train adv. acc. (training attack)")
            train_robust = _key(rows[0], "train_robust_acc_")
            if train_robust and any(h[train_robust] == h[train_robust] for h in rows):  # not all NaN
                ax.plot(ep, [h[train_robust] for h in rows], "-s", ms=3, color="tab:olive",
                        label=f"train robust ({name})")
    ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0.0, 1.0), title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=1 if single else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_gradient_stats(history: list[dict], path: str, title: str = "") -> str | None:
    """``||mean gradient||``, the mean per-example norm and the gradient variance per epoch (the
    ``grad`` entries of a monitored run); ``None`` (nothing written) without them."""
    rows = [h for h in history if not h.get("diverged")]
    if not rows or not rows[0].get("grad") or rows[0]["grad"]["grad_norm"] is None:
        return None
    plt = _pyplot()
    ep = [h["epoch"] for h in rows]
    g = [h["grad"] for h in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(ep, [s["grad_norm"] for s in g], "-o", ms=3, label="||mean gradient||")
    axes[0].plot(ep, [s["norm_mean"] for s in g], "-s", ms=3, label="mean per-example norm")
    axes[0].set(xlabel="epoch", ylabel="norm", yscale="log")
    axes[0].legend(fontsize=8)
    axes[1].plot(ep, [s["variance"] for s in g], "-o", ms=3, color="tab:red")
    axes[1].set(xlabel="epoch", ylabel="gradient variance", yscale="log")
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_history(history: list[dict], out_dir: str, title: str = "", final: dict | None = None) -> list[str]:
    """Writes ``robust_accuracy.png`` and (for a monitored run) ``gradient_stats.png`` of one
    run into ``out_dir``; returns the paths written.

    Example::

        >>> plot_history([], "/tmp")
        []
    """
    if not _rows(history):
        return []
    paths = [plot_accuracy({"": {"history": history, "final": final}}, os.path.join(out_dir, "robust_accuracy.png"),
                           title)]
    grad = plot_gradient_stats(history, os.path.join(out_dir, "gradient_stats.png"), title)
    return paths + ([grad] if grad else [])
