"""Tests of engm_fast.at.pgd_attack: budget, effect, side effects, returned norms, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engm_fast.at import PGD_NORMS, pgd_attack

EPS = {"linf": 0.1, "l2": 0.5}


def _data(n=64, seed=0):
    """Ten Gaussian class prototypes in [0, 1]^(1x8x8) with noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 8, 8, generator=g)
    y = torch.arange(n) % 10
    x = (protos[y] + 0.15 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0.0, 1.0)
    return x, y


def _model(seed=0, dropout=False, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 32), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(0.1))
    layers.append(nn.Linear(32, 10))
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def trained():
    """A tiny CNN trained to high clean accuracy on the synthetic data (grads cleared after)."""
    x, y = _data()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95, f"fixture model did not train (acc {acc})"
    return model, x, y


@pytest.mark.parametrize("norm", PGD_NORMS)
@pytest.mark.parametrize("random_start", [True, False])
def test_perturbation_within_budget_and_clamp(trained, norm, random_start):
    model, x, y = trained
    eps = EPS[norm]
    x_adv = pgd_attack(model, x, y, eps=eps, alpha=eps / 4, steps=10, norm=norm, random_start=random_start)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max().item() <= eps + 1e-6
        # The attack must actually use its budget, not return (almost) x.
        assert delta.abs().max().item() > 0.9 * eps
    else:
        n = delta.norm(dim=1)
        assert n.max().item() <= eps * (1 + 1e-5)
        assert n.max().item() > 0.5 * eps
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


@pytest.mark.parametrize("norm", PGD_NORMS)
def test_custom_clamp_and_no_clamp(trained, norm):
    model, x, y = trained
    eps = EPS[norm]
    lo, hi = 0.05, 0.9
    xc = x.clamp(lo, hi)
    x_adv = pgd_attack(model, xc, y, eps=eps, alpha=eps / 4, steps=5, norm=norm, clamp=(lo, hi))
    assert x_adv.min().item() >= lo and x_adv.max().item() <= hi
    # Without clamping, pixels at 0 or 1 are free to leave [0, 1] (the data has many).
    x_free = pgd_attack(model, x, y, eps=eps, alpha=eps / 4, steps=5, norm=norm, clamp=None)
    assert x_free.min().item() < 0.0 or x_free.max().item() > 1.0


@pytest.mark.parametrize("norm", PGD_NORMS)
def test_loss_increases_over_clean(trained, norm):
    model, x, y = trained
    eps = EPS[norm]
    x_adv = pgd_attack(model, x, y, eps=eps, alpha=2.5 * eps / 10, steps=10, norm=norm)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        adv = F.cross_entropy(model(x_adv), y, reduction="none")
    assert (adv > clean).float().mean().item() >= 0.95
    assert adv.mean().item() > 2.0 * clean.mean().item()
    # ...and the attack is stronger than random noise of the same size.
    g = torch.Generator().manual_seed(1)
    noise = (torch.rand(x.shape, generator=g) * 2 - 1) * EPS["linf"] if norm == "linf" else None
    if noise is not None:
        with torch.no_grad():
            rnd = F.cross_entropy(model((x + noise).clamp(0, 1)), y, reduction="none")
        assert adv.mean().item() > rnd.mean().item()


def test_parameter_grads_untouched(trained):
    model, x, y = trained
    assert all(p.grad is None for p in model.parameters())
    pgd_attack(model, x, y, eps=0.1, alpha=0.025, steps=3)
    assert all(p.grad is None for p in model.parameters()), "attack wrote parameter .grad"

    # Existing gradients (an optimizer mid-step) are neither changed nor accumulated into.
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    pgd_attack(model, x, y, eps=0.5, alpha=0.1, steps=3, norm="l2")
    try:
        assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_mode_unchanged(mode):
    x, y = _data(16)
    model = _model(dropout=True, batchnorm=True)
    model.train(mode == "train")
    before = [m.training for m in model.modules()]
    pgd_attack(model, x, y, eps=0.1, alpha=0.05, steps=2)
    assert [m.training for m in model.modules()] == before


def _direct_input_grad_norms(model, x, y):
    """||grad_x loss_i|| computed example by example (no batching)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)
        out.append(g.norm())
    return torch.stack(out).float()


@pytest.fixture(scope="module")
def trained64(trained):
    """The trained model and data in float64: the well-trained model's input gradients are
    tiny, and in float32 the softmax rounding alone changes them by up to 25% relative."""
    model, x, y = trained
    m = _model()
    m.load_state_dict(model.state_dict())
    return m.double().eval(), x.double(), y


@pytest.mark.parametrize("norm", PGD_NORMS)
def test_input_grad_norms_one_step_no_random_start(trained64, norm):
    model, x, y = trained64
    _x_adv, gn = pgd_attack(model, x, y, eps=EPS[norm], alpha=0.01, steps=1, norm=norm, random_start=False,
                            return_input_grad_norms=True)
    assert gn.dtype == torch.float32 and gn.shape == (x.shape[0],)
    assert (gn > 0).all()
    # With one step from x, the gradient is taken at the clean input.
    torch.testing.assert_close(gn, _direct_input_grad_norms(model, x, y), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("norm", PGD_NORMS)
def test_input_grad_norms_are_from_last_iterate(trained64, norm):
    model, x, y = trained64
    eps, steps = EPS[norm], 4
    kw = {"eps": eps, "alpha": eps / 3, "norm": norm, "random_start": True}
    # The k-step attack's last gradient is taken at the (k-1)-step attack's output, given the
    # same random start (same generator seed).
    x_prev = pgd_attack(model, x, y, steps=steps - 1, generator=torch.Generator().manual_seed(7), **kw)
    _, gn = pgd_attack(model, x, y, steps=steps, generator=torch.Generator().manual_seed(7),
                       return_input_grad_norms=True, **kw)
    torch.testing.assert_close(gn, _direct_input_grad_norms(model, x_prev, y), rtol=1e-5, atol=0.0)
    # ...and not at the clean input (the test can tell the two apart).
    assert not torch.allclose(gn, _direct_input_grad_norms(model, x, y), rtol=1e-2)


def test_generator_makes_attack_reproducible(trained):
    model, x, y = trained
    a = pgd_attack(model, x, y, eps=0.1, alpha=0.02, steps=3, generator=torch.Generator().manual_seed(3))
    b = pgd_attack(model, x, y, eps=0.1, alpha=0.02, steps=3, generator=torch.Generator().manual_seed(3))
    c = pgd_attack(model, x, y, eps=0.1, alpha=0.02, steps=3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_works_under_no_grad_and_eps_zero(trained):
    model, x, y = trained
    with torch.no_grad():
        x_adv = pgd_attack(model, x, y, eps=0.1, alpha=0.025, steps=2)
    assert (x_adv - x).abs().max().item() > 0.0
    assert torch.equal(pgd_attack(model, x, y, eps=0.0, alpha=0.01, steps=2), x)


def test_custom_per_example_loss_fn(trained):
    model, x, y = trained
    calls = []

    def margin_loss(logits, target):
        calls.append(logits.shape)
        true = logits.gather(1, target[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(target, 10).bool(), float("-inf")).amax(1)
        return other - true

    pgd_attack(model, x, y, eps=0.1, alpha=0.025, steps=3, loss_fn=margin_loss)
    assert len(calls) == 3

    with pytest.raises(ValueError, match="per-example losses"):
        pgd_attack(model, x, y, eps=0.1, alpha=0.025, steps=1, loss_fn=lambda o, t: F.cross_entropy(o, t))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": -0.1}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"alpha": -1.0}, "alpha"),
        ({"norm": "l1"}, "unknown norm"),
        ({"norm": "Linf"}, "unknown norm"),
        ({"clamp": (1.0, 0.0)}, "clamp"),
    ],
)
def test_bad_arguments_raise(trained, kwargs, match):
    model, x, y = trained
    args = {"eps": 0.1, "alpha": 0.01, "steps": 2, "norm": "linf"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pgd_attack(model, x, y, **args)


def test_bad_inputs_raise(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="batch size"):
        pgd_attack(model, x, y[:-1], eps=0.1, alpha=0.01, steps=1)
    with pytest.raises(ValueError, match="floating"):
        pgd_attack(model, (x * 16).long(), y, eps=0.1, alpha=0.01, steps=1)
