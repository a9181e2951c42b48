"""Checkpoint and resume: N steps in one go equal k steps, torch.save, fresh objects, torch.load,
N - k steps, bit for bit on the CPU (momentum buffers, the input proxy's calibration and
``backward_steps`` are in ENGM's state_dict; schedulers, GradScaler and temporal ensembling save
their own)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engm_fast

N_STEPS = 5


def make_model():
    torch.manual_seed(21)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(7, 1, 5, 5, generator=g), torch.randint(0, 4, (7,), generator=g)


CONFIGS = {
    "exact": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "input_proxy": dict(lr=0.1, momentum=0.8, norm_source="input_proxy", calibrate_every=3),
    "clip_dampening": dict(lr=0.2, momentum=0.5, dampening=0.2, weighting="clip", clip_norm=0.5),
}


class Run:
    """Model, ENGM, a StepLR schedule and (optionally) a GradScaler, built fresh."""

    def __init__(self, config, with_scaler):
        self.model = make_model()
        self.opt = engm_fast.ENGM(self.model, **CONFIGS[config])
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=2) if with_scaler else None

    def steps(self, start, stop):
        for step in range(start, stop):
            x, y = batch(step)
            self.opt.zero_grad()
            losses = F.cross_entropy(self.model(x), y, reduction="none")
            if self.scaler is None:
                self.opt.backward(losses)
                self.opt.step()
            else:
                self.opt.backward(losses, scaler=self.scaler)
                self.scaler.step(self.opt)
                self.scaler.update()
            self.sched.step()

    def save(self, path):
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                    "scaler": None if self.scaler is None else self.scaler.state_dict()}, path)

    def load(self, path):
        ckpt = torch.load(path)  # weights_only (the default): ENGM's state must be plain tensors and numbers
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        self.sched.load_state_dict(ckpt["sched"])
        if self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])


def assert_bitwise_same(a: Run, b: Run):
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume (max {float((p - q).abs().max()):.3e})"
        sa, sb = a.opt.state[p], b.opt.state[q]
        assert sa.keys() == sb.keys()
        if "momentum_buffer" in sa:
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), name
    assert a.opt.backward_steps == b.opt.backward_steps
    assert a.opt.proxy_stats == pytest.approx(b.opt.proxy_stats, nan_ok=True)
    assert [g["lr"] for g in a.opt.param_groups] == [g["lr"] for g in b.opt.param_groups]


@pytest.mark.parametrize("config,k", [("exact", 1), ("input_proxy", 2), ("input_proxy", 4),
                                      ("clip_dampening", 3)])
def test_resume_is_bitwise_identical(tmp_path, config, k):
    full = Run(config, with_scaler=False)
    full.steps(0, N_STEPS)
    first = Run(config, with_scaler=False)
    first.steps(0, k)
    first.save(tmp_path / "ckpt.pt")
    resumed = Run(config, with_scaler=False)
    resumed.load(tmp_path / "ckpt.pt")
    assert resumed.opt.backward_steps == k
    resumed.steps(k, N_STEPS)
    assert_bitwise_same(full, resumed)


def test_resume_with_grad_scaler(tmp_path):
    full = Run("input_proxy", with_scaler=True)
    full.steps(0, N_STEPS)
    first = Run("input_proxy", with_scaler=True)
    first.steps(0, 3)
    first.save(tmp_path / "ckpt.pt")
    resumed = Run("input_proxy", with_scaler=True)
    resumed.load(tmp_path / "ckpt.pt")
    resumed.steps(3, N_STEPS)
    assert_bitwise_same(full, resumed)
    # The scale doubles every growth_interval=2 steps without overflow.
    assert full.scaler.get_scale() == resumed.scaler.get_scale() == 2.0 ** (4 + N_STEPS // 2)


def test_resume_in_a_fresh_process(tmp_path):
    """The second half runs in another Python process that only sees the checkpoint file."""
    first = Run("input_proxy", with_scaler=False)
    first.steps(0, 2)
    first.save(tmp_path / "ckpt.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads({torch.get_num_threads()})  # same reduction order as this process
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_checkpoint import Run, N_STEPS
        run = Run("input_proxy", with_scaler=False)
        run.load({str(tmp_path / "ckpt.pt")!r})
        run.steps(2, N_STEPS)
        torch.save([p.detach() for p in run.model.parameters()], {str(tmp_path / "final.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    full = Run("input_proxy", with_scaler=False)
    full.steps(0, N_STEPS)
    final = torch.load(tmp_path / "final.pt")
    for p, q in zip(full.model.parameters(), final):
        assert torch.equal(p.detach(), q)


def test_state_dict_without_engm_entry_keeps_current_state():
    """A plain torch.optim state dict (no "engm" key) loads; ENGM's own counters are kept."""
    run = Run("exact", with_scaler=False)
    run.steps(0, 2)
    state = run.opt.state_dict()
    del state["engm"]
    other = Run("exact", with_scaler=False)
    other.opt.load_state_dict(state)
    assert other.opt.backward_steps == 0
    assert all(torch.equal(other.opt.state[q]["momentum_buffer"], run.opt.state[p]["momentum_buffer"])
               for p, q in zip(run.model.parameters(), other.model.parameters()))


def test_resume_with_temporal_ensembling_and_attack_is_bitwise():
    """A TRADES+TE adversarial-training loop with ENGM's input proxy (its calibration, the TE
    table, the attack's random starts from a saved generator): k steps, save everything, fresh
    objects, load, N - k steps equals N steps in one go, bit for bit."""
    import io

    from engm_fast.at import TemporalEnsembling, adversarial_losses

    n_data, steps, k = 12, 6, 3

    def data(step):
        g = torch.Generator().manual_seed(500 + step)
        idx = torch.randperm(n_data, generator=g)[:5]
        return torch.rand(5, 1, 5, 5, generator=g), torch.randint(0, 4, (5,), generator=g), idx

    class ATRun:
        def __init__(self):
            self.model = make_model()
            self.opt = engm_fast.ENGM(self.model, lr=0.1, momentum=0.9, norm_source="input_proxy", calibrate_every=2)
            self.te = TemporalEnsembling(n_data, 4, es=1, ee=3)
            self.gen = torch.Generator().manual_seed(7)

        def steps(self, start, stop):
            for step in range(start, stop):
                x, y, idx = data(step)
                epoch = 1 + step // 2
                self.model.eval()
                with torch.no_grad():
                    target = self.te.update(self.model(x), idx, epoch)
                self.model.train()
                out = adversarial_losses(self.model, x, y, "trades", eps=0.1, alpha=0.04, steps=2,
                                         te_target=target, te_weight=self.te.weight(epoch),
                                         return_input_grad_norms=True, generator=self.gen)
                self.opt.zero_grad()
                self.opt.backward(out.losses, input_grad_norms=out.input_grad_norms)
                self.opt.step()

        def save(self):
            buf = io.BytesIO()
            torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "te": self.te.state_dict(),
                        "gen": self.gen.get_state()}, buf)
            buf.seek(0)
            return buf

        def load(self, buf):
            ckpt = torch.load(buf)
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["opt"])
            self.te.load_state_dict(ckpt["te"])
            self.gen.set_state(ckpt["gen"])

    straight = ATRun()
    straight.steps(0, steps)
    first = ATRun()
    first.steps(0, k)
    buf = first.save()
    resumed = ATRun()
    resumed.load(buf)
    resumed.steps(k, steps)
    assert resumed.opt.proxy_stats["calibrations"] == straight.opt.proxy_stats["calibrations"] > 0
    assert torch.equal(resumed.te.table, straight.te.table)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(resumed.opt.state[a]["momentum_buffer"], straight.opt.state[b]["momentum_buffer"])
