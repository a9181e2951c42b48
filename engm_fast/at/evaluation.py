"""Robust test accuracy: one PGD per epoch, and a final evaluation by a list of attacks.

Every evaluation runs the model in eval mode, in batches of :data:`EVAL_BATCH`, and draws the
random starts of its attacks from a generator seeded with :data:`EVAL_SEED`, so two models
(two optimizers, two epochs) face the same starts.

The final evaluation is a list of attack specs, each ``NAME`` or ``NAME-STEPS`` of a
registered :class:`EvalAttack` (:data:`EVAL_ATTACKS`): ``"pgd-20"`` is our PGD with 20 steps
of ``2.5 eps / 20``, ``"apgd-ce"`` is APGD-CE from ``torchattacks``, ``"autoattack"`` is
AutoAttack's standard version as ``torchattacks`` packages it (``torchattacks.AutoAttack``:
APGD-CE, APGD-T, FAB-T with 10 steps each -- the original AutoAttack uses 100, which
``"autoattack-100"`` gives -- then Square with 5,000 queries, each stage attacking only the
examples every earlier stage failed on); ``"autoattack-apgd"`` is its first two stages alone
(the same numbers as AutoAttack's accuracy after APGD-T, without FAB-T's and Square's cost). Each attack stores its robust accuracy in the results
under its own key (``robust_acc_pgd``, ``robust_acc_apgd``, ``robust_acc_aa``) and its step
count beside it (``pgd_steps``, ...); an attack made of stages also stores the robust accuracy
after each stage (``aa_stages``). :func:`register_eval_attack` adds another attack (a foreign
one, typically).

The ``torchattacks`` attacks seed torch's global random generator; the evaluation restores it
afterwards, so evaluating does not change what a training run draws next.

Example::

    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> x, y = torch.rand(6, 4), torch.randint(0, 3, (6,))
    >>> res = final_evaluation(m, x, y, ["pgd-3"], eps=0.0)     # no budget: robust == clean
    >>> res["robust_acc_pgd"] == res["clean_acc"], res["pgd_steps"]
    (True, 3)
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import engine_of
from .attacks import PGD_NORMS, pgd_attack

__all__ = ["EVAL_ATTACKS", "EVAL_BATCH", "EVAL_SEED", "EvalAttack", "apgd_available", "attack_unavailable",
           "StagedAttack", "describe_evaluation", "evaluate_robust", "final_evaluation", "parse_attack_spec",
           "register_eval_attack"]

EVAL_SEED = 12345
EVAL_BATCH = 500

# attack(x, y) -> x_adv, built once per evaluation (the generator is shared by its batches)
AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EvalAttack:
    """An attack of the final evaluation.

    Attributes:
        name: the spec name (``"pgd"`` in ``"pgd-20"``).
        label: how tables name it (``"PGD"`` -> ``"PGD-20"``).
        key: its results entry: ``robust_acc_<key>`` and ``<key>_steps``.
        default_steps: the steps of a spec without ``-STEPS``.
        build: ``build(model, eps, norm, steps, generator) -> attack(x, y) -> x_adv`` (a
            :class:`StagedAttack` records the robust accuracy after each of its stages).
        requires: the module it imports (``None``: engm_fast's own), and ``install``, the
            command that installs it.
    """

    name: str
    label: str
    key: str
    default_steps: int
    build: Callable[[nn.Module, float, str, int, torch.Generator], AttackFn]
    requires: str | None = None
    install: str = ""


def _build_pgd(model, eps, norm, steps, generator) -> AttackFn:
    return lambda x, y: pgd_attack(model, x, y, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=norm,
                                   generator=generator)


def _build_apgd_ce(model, eps, norm, steps, generator) -> AttackFn:
    import torchattacks

    seed = int(generator.initial_seed())
    return torchattacks.APGD(model, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=steps, n_restarts=1,
                             loss="ce", seed=seed)


class StagedAttack:
    """Attacks in sequence, each on the examples that every earlier one failed to misclassify
    (AutoAttack's rule: an example counts as robust only if it survives all of them).

    ``stages`` is a list of ``(label, attack)`` with ``attack(x, y) -> x_adv``, or a function
    of the model's number of classes that returns one (called at the first batch, when the
    class count is known from the model's output). ``robust_after[label]`` counts, over every
    batch attacked so far, the examples still classified correctly after the stage ``label``
    (cumulative: it includes the earlier stages).

    Example::

        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x, y = torch.rand(6, 4), torch.randint(0, 3, (6,))
        >>> identity = lambda xb, yb: xb                 # a stage that changes nothing
        >>> staged = StagedAttack(m, [("none", identity), ("none again", identity)])
        >>> bool(torch.equal(staged(x, y), x)), staged.robust_after["none"] == staged.robust_after["none again"]
        (True, True)
    """

    def __init__(self, model: nn.Module,
                 stages: Sequence[tuple[str, AttackFn]] | Callable[[int], Sequence[tuple[str, AttackFn]]]):
        self.model = model
        self._make = stages if callable(stages) else None
        self.stages: list[tuple[str, AttackFn]] | None = None if callable(stages) else list(stages)
        if self.stages is not None and not self.stages:
            raise ValueError("StagedAttack needs at least one (label, attack) stage")
        self.robust_after: dict[str, int] = {label: 0 for label, _ in self.stages or ()}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.stages is None:
            with torch.no_grad():
                n_classes = int(self.model(x[:1]).shape[1])
            self.stages = list(self._make(n_classes))
            self.robust_after = {label: 0 for label, _ in self.stages}
        out = x.clone()
        # The first stage sees every example, misclassified ones included, as torchattacks'
        # MultiAttack does: its random starts depend on the batch, so the results match it exactly.
        alive = torch.arange(x.shape[0], device=x.device)
        for label, attack in self.stages:
            if alive.numel():
                xa = attack(x[alive], y[alive])
                with torch.no_grad():
                    fooled = self.model(xa).argmax(1) != y[alive]
                out[alive[fooled]] = xa[fooled].to(out.dtype)
                alive = alive[~fooled]
            self.robust_after[label] += int(alive.numel())
        return out


def _build_autoattack(model, eps, norm, steps, generator, first_stages: int = 4) -> AttackFn:
    """AutoAttack's standard version from torchattacks' classes, composed as
    ``torchattacks.AutoAttack(version="standard")`` composes it (APGD-CE, APGD-T and FAB-T
    with ``steps`` steps, Square with 5,000 queries, one restart each, all seeded alike), as a
    :class:`StagedAttack` so that the accuracy after each stage is recorded; only its first
    ``first_stages`` stages when fewer than 4."""
    import torchattacks

    seed, tn = int(generator.initial_seed()), "Linf" if norm == "linf" else "L2"

    def stages(n_classes: int) -> list[tuple[str, AttackFn]]:
        if n_classes < 4:  # APGD-T's DLR loss reads the 4th-largest logit
            raise ValueError(f"AutoAttack needs at least 4 classes (APGD-T's DLR loss), the model has {n_classes}; "
                             "evaluate with apgd-ce instead")
        # APGD-T and FAB-T target the top n_classes - 1 other classes: AutoAttack's 9 at most.
        n = min(n_classes, 10)
        return [("APGD-CE", torchattacks.APGD(model, norm=tn, eps=eps, steps=steps, n_restarts=1, loss="ce", seed=seed)),
                ("APGD-T", torchattacks.APGDT(model, norm=tn, eps=eps, steps=steps, n_restarts=1, n_classes=n, seed=seed)),
                ("FAB-T", torchattacks.FAB(model, norm=tn, eps=eps, steps=steps, n_restarts=1, multi_targeted=True,
                                           n_classes=n, seed=seed)),
                ("Square", torchattacks.Square(model, norm=tn, eps=eps, n_queries=5000, n_restarts=1, seed=seed))
                ][:first_stages]

    return StagedAttack(model, stages)


EVAL_ATTACKS: dict[str, EvalAttack] = {
    "pgd": EvalAttack("pgd", "PGD", "pgd", 20, _build_pgd),
    "apgd-ce": EvalAttack("apgd-ce", "APGD-CE", "apgd", 50, _build_apgd_ce, requires="torchattacks",
                          install="pip install --no-deps torchattacks==3.5.1"),
    # 10 steps: torchattacks.AutoAttack's (it leaves its attacks' default steps).
    "autoattack": EvalAttack("autoattack", "AutoAttack", "aa", 10, _build_autoattack, requires="torchattacks",
                             install="pip install --no-deps torchattacks==3.5.1"),
    # AutoAttack's two APGD stages alone: its robust accuracy after APGD-T, exactly, for a
    # fraction of the time (Square's 5,000 queries cost minutes per model on a CPU).
    "autoattack-apgd": EvalAttack("autoattack-apgd", "AA-APGD", "aa_apgd", 10,
                                  functools.partial(_build_autoattack, first_stages=2), requires="torchattacks",
                                  install="pip install --no-deps torchattacks==3.5.1"),
}


def register_eval_attack(attack: EvalAttack) -> None:
    """Adds ``attack`` to :data:`EVAL_ATTACKS` (its name and results key must be new).

    Example::

        >>> fgsm = EvalAttack("fgsm", "FGSM", "fgsm", 1,
        ...                   lambda model, eps, norm, steps, gen: lambda x, y: pgd_attack(
        ...                       model, x, y, eps=eps, alpha=eps, steps=1, norm=norm, random_start=False))
        >>> register_eval_attack(fgsm)
        >>> parse_attack_spec("fgsm")[0].label
        'FGSM'
        >>> del EVAL_ATTACKS["fgsm"]
    """
    if not isinstance(attack, EvalAttack):
        raise TypeError(f"register_eval_attack needs an EvalAttack, got {type(attack).__name__}")
    if attack.name in EVAL_ATTACKS or any(a.key == attack.key for a in EVAL_ATTACKS.values()):
        raise ValueError(f"an evaluation attack named {attack.name!r} or with key {attack.key!r} is already registered")
    EVAL_ATTACKS[attack.name] = attack


def parse_attack_spec(spec: str) -> tuple[EvalAttack, int]:
    """``"NAME"`` or ``"NAME-STEPS"`` -> ``(attack, steps)``.

    Example::

        >>> a, steps = parse_attack_spec("apgd-ce-100")
        >>> a.name, steps, parse_attack_spec("pgd")[1]
        ('apgd-ce', 100, 20)
    """
    if not isinstance(spec, str):
        raise TypeError(f"an attack spec is a string such as 'pgd-20', got {type(spec).__name__}")
    if spec in EVAL_ATTACKS:
        return EVAL_ATTACKS[spec], EVAL_ATTACKS[spec].default_steps
    name, _, steps = spec.rpartition("-")
    if name not in EVAL_ATTACKS or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"unknown attack spec {spec!r}: expected NAME or NAME-STEPS (STEPS >= 1) with NAME one of "
                         f"{tuple(EVAL_ATTACKS)}, e.g. 'pgd-20'")
    return EVAL_ATTACKS[name], int(steps)


def attack_unavailable(attack: EvalAttack) -> str | None:
    """Why ``attack`` cannot run here (its package is missing), or ``None`` when it can.

    Example::

        >>> attack_unavailable(EVAL_ATTACKS["pgd"]) is None
        True
    """
    if attack.requires is None:
        return None
    try:
        importlib.import_module(attack.requires)
    except Exception as exc:  # noqa: BLE001  (a package may fail on import for reasons other than absence)
        return f"{attack.requires} cannot be imported ({type(exc).__name__}: {exc}); {attack.install}"
    return None


def apgd_available() -> bool:
    """Whether ``torchattacks`` (for APGD-CE) can be imported.

    Example::

        >>> isinstance(apgd_available(), bool)
        True
    """
    return attack_unavailable(EVAL_ATTACKS["apgd-ce"]) is None


def _paused(model):
    engine = engine_of(model)
    return engine.paused() if engine is not None else contextlib.nullcontext()


def evaluate_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int | None = None,
                    norm: str = "linf", attack: str = "pgd", batch_size: int = EVAL_BATCH,
                    seed: int = EVAL_SEED) -> tuple[float, float]:
    """``(clean accuracy, robust accuracy)`` under the registered attack ``attack`` with ``steps``
    steps (default: the attack's own).

    Eval mode during the attack; the model's mode is restored after. Our PGD uses step size
    ``2.5 eps / steps`` and a random start from a generator seeded with ``seed``.

    Example::

        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x, y = torch.rand(6, 4), torch.randint(0, 3, (6,))
        >>> clean, robust = evaluate_robust(m, x, y, eps=0.0, steps=3)   # no budget: robust == clean
        >>> robust == clean
        True
    """
    result = _attack_accuracy(model, x, y, eps, steps, norm, attack, batch_size, seed)
    return result["clean"], result["robust"]


def _attack_accuracy(model, x, y, eps, steps, norm, attack, batch_size, seed) -> dict:
    """``evaluate_robust``'s work: ``{"clean", "robust", "stages"}`` (``stages``: the robust
    accuracy after each stage of a :class:`StagedAttack`, else ``None``)."""
    if attack not in EVAL_ATTACKS:
        raise ValueError(f"evaluate_robust: attack must be one of {tuple(EVAL_ATTACKS)}, got {attack!r}")
    if norm not in PGD_NORMS:
        raise ValueError(f"evaluate_robust: norm must be one of {PGD_NORMS}, got {norm!r}")
    spec = EVAL_ATTACKS[attack]
    why = attack_unavailable(spec)
    if why is not None:
        raise RuntimeError(f"evaluate_robust: {spec.label} is unavailable: {why}")
    steps = spec.default_steps if steps is None else steps
    was = model.training
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    run = spec.build(model, eps, norm, steps, gen)
    clean = robust = 0
    # Foreign attacks seed torch's global generators; fork_rng puts them back afterwards.
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        try:
            for i in range(0, x.shape[0], batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                with torch.no_grad():
                    clean += int((model(xb).argmax(1) == yb).sum())
                with _paused(model):
                    xa = run(xb, yb)
                with torch.no_grad():
                    robust += int((model(xa).argmax(1) == yb).sum())
        finally:
            model.train(was)
    n = max(1, x.shape[0])
    stages = {label: count / n for label, count in run.robust_after.items()} if isinstance(run, StagedAttack) else None
    return {"clean": clean / n, "robust": robust / n, "stages": stages}


def final_evaluation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, specs: Sequence[str], eps: float,
                     norm: str = "linf", batch_size: int = EVAL_BATCH, seed: int = EVAL_SEED,
                     times: dict | None = None) -> dict:
    """Clean accuracy and, per attack spec, ``robust_acc_<key>``, ``<key>_steps`` and, for an
    attack of stages, ``<key>_stages`` (robust accuracy after each). ``times``, a dict, receives
    each spec's wall time in seconds (kept out of the result, which is a function of the model).

    Every attack starts from the same seed. Raises ``RuntimeError`` naming the install command
    when an attack's package is missing.

    Example::

        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> res = final_evaluation(m, torch.rand(5, 4), torch.randint(0, 3, (5,)), ["pgd-2"], eps=0.1)
        >>> sorted(res)
        ['clean_acc', 'pgd_steps', 'robust_acc_pgd']
    """
    out: dict = {}
    for spec in specs:
        attack, steps = parse_attack_spec(spec)
        t0 = time.perf_counter()
        res = _attack_accuracy(model, x, y, eps, steps, norm, attack.name, batch_size, seed)
        out.setdefault("clean_acc", res["clean"])
        out[f"robust_acc_{attack.key}"] = res["robust"]
        out[f"{attack.key}_steps"] = steps
        if times is not None:
            times[spec] = time.perf_counter() - t0
        if res["stages"] is not None:
            out[f"{attack.key}_stages"] = res["stages"]
    return out


def describe_evaluation(result: dict) -> str:
    """A :func:`final_evaluation` result in one line.

    Example::

        >>> describe_evaluation({"clean_acc": 0.9, "robust_acc_pgd": 0.5, "pgd_steps": 20})
        'clean 0.9000, PGD-20 0.5000'
    """
    labels = {a.key: a.label for a in EVAL_ATTACKS.values()}
    parts = [f"clean {result['clean_acc']:.4f}"]
    for name, value in result.items():
        if name.startswith("robust_acc_"):
            key = name[len("robust_acc_"):]
            parts.append(f"{labels.get(key, key)}-{result.get(f'{key}_steps', '?')} {value:.4f}")
    return ", ".join(parts)
