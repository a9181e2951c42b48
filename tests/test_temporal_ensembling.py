"""Temporal ensembling vs a step-by-step reference of the paper's code (PGD_TE / TRADES_TE)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engm_fast.at import (
    TemporalEnsembling,
    adversarial_losses,
    sigmoid_rampup,
    te_penalty,
    te_schedule,
)


class PaperTE:
    """The official code's bookkeeping, transcribed (float64): zeros table, EMA from epoch es."""

    def __init__(self, n, c, momentum, es):
        self.soft_labels = torch.zeros(n, c, dtype=torch.float64)
        self.momentum, self.es = momentum, es

    def step(self, logits, index, epoch):
        if epoch >= self.es:
            prob = F.softmax(logits.detach().double(), dim=1)
            self.soft_labels[index] = self.momentum * self.soft_labels[index] + (1 - self.momentum) * prob
            return self.soft_labels[index] / self.soft_labels[index].sum(1, keepdim=True)
        return None


# The official code's ramp-up (Dong et al., ICLR 2022; `sigmoid_rampup(current, start_es, end_es)`
# in their training script): 0 before start_es, 1 after end_es, otherwise exp(-5 phase^2) with
# phase = 1 - (current - start_es) / (end_es - start_es). Expected values for the paper's
# schedule (start_es = 90, end_es = 150 of 200 epochs), phase worked out by hand and the
# exponential in 40-digit decimal arithmetic (decimal.Decimal(x).exp()), not by the code under test:
#   e =  90: phase = 1     r = exp(-5)      = 0.006737946999085467
#   e = 105: phase = 3/4   r = exp(-2.8125) = 0.06005466789530794
#   e = 120: phase = 1/2   r = exp(-1.25)   = 0.2865047968601901
#   e = 135: phase = 1/4   r = exp(-0.3125) = 0.7316156289466418
#   e = 144: phase = 1/10  r = exp(-0.05)   = 0.951229424500714
#   e = 150: phase = 0     r = exp(0)       = 1
RAMPUP_90_150 = {90: 0.006737946999085467, 105: 0.06005466789530794, 120: 0.2865047968601901,
                 135: 0.7316156289466418, 144: 0.951229424500714, 150: 1.0}


def test_rampup_and_schedule():
    for e, r in RAMPUP_90_150.items():
        assert sigmoid_rampup(e, 90, 150) == pytest.approx(r, rel=1e-15, abs=0), e
    values = [sigmoid_rampup(e, 90, 150) for e in range(210)]
    assert values[:90] == [0.0] * 90  # before start_es
    assert values[150:] == [1.0] * 60  # from end_es on
    assert all(x < y for x, y in zip(values[90:150], values[91:151]))  # rising in between
    assert te_schedule(200) == (90, 150)
    assert te_schedule(20) == (9, 15)
    te = TemporalEnsembling(5, 3, epochs=200)
    assert (te.es, te.ee, te.momentum, te.reg_weight) == (90, 150, 0.9, 300.0)
    assert te.weight(120) == pytest.approx(300.0 * 0.2865047968601901, rel=1e-15)  # W r(120), r as above


def test_table_update_matches_paper_step_by_step():
    n, c, es = 23, 4, 3
    ours = TemporalEnsembling(n, c, momentum=0.9, es=es, ee=6)
    ref = PaperTE(n, c, 0.9, es)
    g = torch.Generator().manual_seed(0)
    for epoch in range(1, 9):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, 5):
            idx = perm[start:start + 5]
            logits = 2 * torch.randn(idx.shape[0], c, generator=g)
            t_ours = ours.update(logits, idx, epoch)
            t_ref = ref.step(logits, idx, epoch)
            if t_ref is None:
                assert t_ours is None
            else:
                torch.testing.assert_close(t_ours.double(), t_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.table.double(), ref.soft_labels, rtol=1e-6, atol=1e-7)
    assert float(ours.table.sum()) > 0


def test_penalty_batch_mean_is_paper_term():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    p = F.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    torch.testing.assert_close(te_penalty(z, p).mean(), ((F.softmax(z, dim=1) - p) ** 2).mean(), rtol=0, atol=1e-15)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _paper_pgd_te_attack(model, x, y, target, w, eps, step, steps, gen_seed):
    """PGD_TE's attack loop (linf), with the start our pgd_attack draws from the same generator."""
    g = torch.Generator().manual_seed(gen_seed)
    u = torch.rand(x.shape, generator=g, dtype=x.dtype)
    x_adv = (x + (2 * u - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_()
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y) + w * ((F.softmax(logits_adv, dim=1) - target) ** 2).mean()
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv


def _paper_trades_te_attack(model, x, target, w, beta, eps, step, steps, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    B = x.shape[0]
    logits = model(x).detach()
    x_adv = x + 0.001 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    for _ in range(steps):
        x_adv.requires_grad_()
        logits_adv = model(x_adv)
        loss_kl = nn.KLDivLoss(reduction="sum")(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1))
        loss = (beta / B) * loss_kl + w * ((F.softmax(logits_adv, dim=1) - target) ** 2).mean()
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_te_term_in_attack_objective_and_loss_as_in_paper(method):
    model = _model()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(10, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    target = F.softmax(3 * torch.randn(10, 3, generator=g, dtype=torch.float64), dim=1)
    w, eps, step, steps, beta = 50.0, 0.1, 0.03, 5, 6.0
    out = adversarial_losses(model, x, y, method, eps=eps, alpha=step, steps=steps, beta=beta, te_target=target,
                             te_weight=w, generator=torch.Generator().manual_seed(7))
    if method == "pgd":
        ref_adv = _paper_pgd_te_attack(model, x, y, target, w, eps, step, steps, 7)
        logits = model(ref_adv)
        ref_loss = F.cross_entropy(logits, y) + w * ((F.softmax(logits, dim=1) - target) ** 2).mean()
    else:
        ref_adv = _paper_trades_te_attack(model, x, target, w, beta, eps, step, steps, 7)
        logits, logits_adv = model(x), model(ref_adv)
        kl = nn.KLDivLoss(reduction="sum")(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1))
        # TRADES+TE: the TE term is on the clean output
        ref_loss = (F.cross_entropy(logits, y) + beta * kl / x.shape[0]
                    + w * ((F.softmax(logits, dim=1) - target) ** 2).mean())
    torch.testing.assert_close(out.x_adv, ref_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.losses.mean(), ref_loss, rtol=1e-12, atol=1e-12)
    # and the term changes the attack: without it the result differs
    plain = adversarial_losses(model, x, y, method, eps=eps, alpha=step, steps=steps, beta=beta,
                               generator=torch.Generator().manual_seed(7))
    assert not torch.equal(plain.x_adv, out.x_adv)


def test_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        TemporalEnsembling(4, 2, momentum=1.0)
    with pytest.raises(ValueError, match="es"):
        TemporalEnsembling(4, 2, es=5, ee=5)
    te = TemporalEnsembling(4, 2, es=1, ee=2)
    with pytest.raises(ValueError, match="index out of range"):
        te.update(torch.zeros(1, 2), torch.tensor([4]), epoch=1)
    with pytest.raises(ValueError, match="clean_logits"):
        te.update(torch.zeros(1, 3), torch.tensor([0]), epoch=1)
    with pytest.raises(ValueError, match="repeated"):
        te.update(torch.zeros(2, 2), torch.tensor([1, 1]), epoch=1)
    assert float(te.table.abs().sum()) == 0  # nothing was written by the refused calls


def test_state_dict_round_trip():
    te = TemporalEnsembling(4, 2, es=1, ee=2)
    te.update(torch.randn(2, 2), torch.tensor([1, 3]), epoch=1)
    te2 = TemporalEnsembling(4, 2, es=1, ee=2)
    te2.load_state_dict(te.state_dict())
    assert torch.equal(te2.table, te.table) and te2.es == 1
