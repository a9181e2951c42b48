"""The final evaluation: staged attacks, AutoAttack as torchattacks packages it, the global RNG left alone."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engm_fast.at.evaluation import (EVAL_SEED, StagedAttack, describe_evaluation, evaluate_robust,
                                     final_evaluation, parse_attack_spec)


def _trained_model():
    """A small CNN fitted to 4 separable classes of 8x8 images (a bright band each), so attacks have
    something to break (AutoAttack's APGD-T needs at least 4 classes)."""
    torch.manual_seed(0)
    x = torch.rand(60, 1, 8, 8) * 0.5
    y = torch.arange(60) % 4
    for c in range(4):
        x[y == c, :, c * 2:c * 2 + 2, :] += 0.5
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x.clamp(0, 1), y


def test_staged_attack_counts_only_survivors():
    model, x, y = _trained_model()
    calls = []

    def blank(xb, yb):  # fools everything it sees
        calls.append(xb.shape[0])
        return torch.zeros_like(xb)

    staged = StagedAttack(model, [("keep", lambda xb, yb: xb), ("blank", blank), ("never", blank)])
    out = staged(x, y)
    clean = int((model(x).argmax(1) == y).sum())
    # stage 1 changes nothing: the survivors are the correctly classified; stage 2 sees only them
    assert staged.robust_after["keep"] == clean and calls[0] == clean
    # a blank image is one class: the examples of that class survive the blank stage
    blank_class = int(model(torch.zeros(1, 1, 8, 8)).argmax())
    assert staged.robust_after["blank"] == int(((model(x).argmax(1) == y) & (y == blank_class)).sum())
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="at least one"):
        StagedAttack(model, [])


def test_autoattack_matches_torchattacks_autoattack():
    torchattacks = pytest.importorskip("torchattacks", reason="AutoAttack comes from torchattacks")
    model, x, y = _trained_model()
    x, y, eps = x[:12], y[:12], 0.25  # one survivor of 12: every stage runs, Square on one image
    ours = final_evaluation(model, x, y, ["autoattack"], eps=eps)
    theirs = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=4, seed=EVAL_SEED)
    x_adv = theirs(x, y)
    assert ours["robust_acc_aa"] == int((model(x_adv).argmax(1) == y).sum()) / len(y)
    assert ours["aa_steps"] == 10 and list(ours["aa_stages"]) == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    stages = list(ours["aa_stages"].values())
    assert stages == sorted(stages, reverse=True) and stages[-1] == ours["robust_acc_aa"]
    assert ours["robust_acc_aa"] < ours["clean_acc"]  # the attack breaks something
    assert "AutoAttack-10" in describe_evaluation(ours)
    # its first two stages alone give its accuracy after APGD-T
    apgd = final_evaluation(model, x, y, ["autoattack-apgd"], eps=eps)
    assert apgd["robust_acc_aa_apgd"] == ours["aa_stages"]["APGD-T"] and list(apgd["aa_apgd_stages"]) == ["APGD-CE", "APGD-T"]


def test_foreign_attacks_leave_the_global_rng_alone():
    pytest.importorskip("torchattacks", reason="APGD comes from torchattacks")
    model, x, y = _trained_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate_robust(model, x[:8], y[:8], eps=0.1, steps=3, attack="apgd-ce")  # seeds torch's generator inside
    assert torch.equal(torch.rand(3), expected)


def test_autoattack_needs_four_classes():
    pytest.importorskip("torchattacks", reason="AutoAttack comes from torchattacks")
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="at least 4 classes"):
        final_evaluation(model, torch.rand(5, 4), torch.randint(0, 3, (5,)), ["autoattack"], eps=0.1)


def test_autoattack_spec():
    attack, steps = parse_attack_spec("autoattack")
    assert (attack.key, steps, attack.label) == ("aa", 10, "AutoAttack")
    assert parse_attack_spec("autoattack-100")[1] == 100
    assert "--no-deps torchattacks" in attack.install
