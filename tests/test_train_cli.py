"""The ``engm-fast train`` command: a tiny run writes log, checkpoints, plots and results."""
import json
import os

import pytest
import torch

from engm_fast.at.evaluation import EVAL_ATTACKS, EvalAttack, apgd_available, register_eval_attack
from engm_fast.at.train import TrainConfig, TrainingRun, lr_milestones, train, train_together
from engm_fast.data import dataset_spec
from engm_fast.cli import build_parser, main
from engm_fast.models import make_model

_TINY = ["--train-subset", "96", "--test-subset", "48", "--eval-train-subset", "32", "--train-steps", "2",
         "--eval-steps", "2", "--no-progress"]


def test_train_command_writes_log_checkpoint_plots(tmp_path):
    out = str(tmp_path / "run")
    rc = main(["train", "--dataset", "digits", "--method", "trades", "--optimizer", "engm", "--te", "--epochs", "1",
               "--out", out, "--pgd-only", *_TINY])
    assert rc == 0
    for f in ("log.jsonl", "results.json", "checkpoint_last.pt", "checkpoint_best.pt", "robust_accuracy.png",
              "gradient_stats.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "log.jsonl")) as f:
        lines = [json.loads(s) for s in f]
    assert len(lines) == 1
    rec = lines[0]
    assert rec["epoch"] == 1 and 0 <= rec["test_robust_acc_pgd2"] <= rec["test_clean_acc"] + 0.2
    assert rec["grad"]["n_steps"] == 2 and rec["grad"]["variance"] > 0
    # TE with 1 epoch: es = 1, so the term is on (with the ramp-up's first weight 300 exp(-5))
    assert rec["te_weight"] == pytest.approx(300 * 2.718281828459045 ** -5)
    ck = torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=False)
    model = make_model("small_cnn")
    model.load_state_dict(ck["model"])
    assert ck["epoch"] == 1 and ck["te"]["table"].shape == (96, 10) and float(ck["te"]["table"].sum()) > 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["final"]["pgd_steps"] == 2 and list(res["final_attacks"]) == ["pgd-2"]  # --pgd-only: no foreign attack


def test_msgd_monitor_path_equals_plain_msgd():
    """MSGD through the engine (monitor on) takes the same steps as plain loss.mean().backward()."""
    kw = dict(epochs=1, train_subset=64, test_subset=16, eval_train_subset=None, train_steps=2, eval_steps=1,
              progress=False, plots=False, final_attacks=("pgd-1",), out=None, method="mart")
    a = train(TrainConfig(monitor=True, **kw))
    b = train(TrainConfig(monitor=False, **kw))
    assert a["history"][0]["train_loss"] == pytest.approx(b["history"][0]["train_loss"], rel=1e-5)
    assert a["final"]["clean_acc"] == b["final"]["clean_acc"]
    assert "grad" in a["history"][0] and "grad" not in b["history"][0]


def test_proxy_and_random_labels_run():
    res = train(TrainConfig(optimizer="engm_proxy", random_labels=True, epochs=1, train_subset=128, test_subset=16,
                            eval_train_subset=32, train_steps=2, eval_steps=1, progress=False, plots=False,
                            final_attacks=("pgd-1",), out=None, calibrate_every=2))
    rec = res["history"][0]
    assert res["config"]["weight_decay"] == 0.0  # the memorization paper's random-label setting
    assert rec["proxy_fit"]["calibrations"] == 1  # 2 steps: step 0 calibrates, step 1 uses the fit
    assert rec["grad"]["n_steps"] == 1 and rec["grad"]["n_skipped"] == 1


def test_parser_and_errors():
    a = build_parser().parse_args(["train", "--optimizer", "engm_proxy", "--random-labels", "--epochs", "3"])
    assert a.optimizer == "engm_proxy" and a.random_labels and a.epochs == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--method", "fgsm"])
    with pytest.raises(ValueError, match="needs data_dir"):
        train(TrainConfig(dataset="cifar10", out=None, progress=False))
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        TrainConfig(epochs=0).resolved()


def test_eval_every_skips_epochs_but_evaluates_the_last():
    res = train(TrainConfig(epochs=3, eval_every=2, train_subset=64, test_subset=16, eval_train_subset=16,
                            train_steps=1, eval_steps=1, progress=False, plots=False, final_attacks=("pgd-1",),
                            out=None, monitor=False))
    robust = [h["test_robust_acc_pgd1"] for h in res["history"]]
    assert robust[0] is None and robust[1] is not None and robust[2] is not None
    assert res["best_epoch"] in (2, 3)



def _timeless(history):
    drop = ("step_ms", "update_ms", "batch_ms", "train_time_s")
    return [{k: v for k, v in rec.items() if k not in drop} for rec in history]


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    """3 epochs in one go equal the same run interrupted after epoch 2 and resumed with
    ``--resume`` from that epoch's checkpoint_last.pt: final weights, history and log file.
    TRADES + TE + ENGM-proxy with augmentation, so every generator and state is exercised."""
    import engm_fast.at.train as train_mod

    kw = dict(method="trades", optimizer="engm_proxy", te=True, augment=True, train_subset=64, test_subset=16,
              eval_train_subset=16, train_steps=2, eval_steps=1, calibrate_every=3, progress=False, plots=False,
              final_attacks=("pgd-1",), epochs=3)
    straight = train(TrainConfig(out=str(tmp_path / "straight"), **kw))

    # The "interrupted" run: the same run, with epoch 2's checkpoint_last.pt copied aside.
    epoch2 = str(tmp_path / "epoch2.pt")
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if str(path).endswith("checkpoint_last.pt") and obj.get("epoch") == 2:
            real_save(obj, epoch2)

    monkeypatch.setattr(train_mod.torch, "save", save)
    train(TrainConfig(out=str(tmp_path / "first"), **kw))
    monkeypatch.setattr(train_mod.torch, "save", real_save)

    out = str(tmp_path / "resumed")
    resumed = train(TrainConfig(out=out, resume=epoch2, **kw))
    assert _timeless(resumed["history"]) == _timeless(straight["history"])
    assert resumed["final"] == straight["final"]
    a = torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(str(tmp_path / "straight"), "checkpoint_last.pt"), weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    with open(os.path.join(out, "log.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2, 3]


def test_resume_refuses_other_settings(tmp_path):
    kw = dict(train_subset=32, test_subset=8, eval_train_subset=None, train_steps=1, eval_steps=1, progress=False,
              plots=False, final_attacks=("pgd-1",), epochs=2)
    out = str(tmp_path / "run")
    train(TrainConfig(out=out, **kw))
    ck = os.path.join(out, "checkpoint_last.pt")
    with pytest.raises(ValueError, match="run is complete"):  # through the command line's --resume
        main(["train", "--epochs", "2", "--train-subset", "32", "--test-subset", "8", "--eval-train-subset", "0",
              "--train-steps", "1", "--eval-steps", "1", "--no-progress", "--no-apgd", "--out",
              str(tmp_path / "again"), "--resume", ck])
    with pytest.raises(ValueError, match="lr"):
        train(TrainConfig(out=str(tmp_path / "again"), resume=ck, **dict(kw, epochs=2, lr=0.5)))


_SMALL = dict(epochs=2, train_subset=48, test_subset=16, eval_train_subset=16, train_steps=1, eval_steps=1,
              final_attacks=("pgd-2",), progress=False, plots=False, out=None)


def test_train_together_equals_separate_runs():
    """Interleaving runs epoch by epoch (the demo) changes nothing in any run's numbers."""
    cfgs = [TrainConfig(optimizer=o, **_SMALL) for o in ("msgd", "engm", "engm_proxy")]
    seen = []
    together = train_together(cfgs, on_epoch=lambda recs: seen.append([r["epoch"] for r in recs]))
    assert seen == [[1, 1, 1], [2, 2, 2]]
    for cfg, a in zip(cfgs, together):
        b = train(cfg)
        assert _timeless(a["history"]) == _timeless(b["history"]) and a["final"] == b["final"]
        assert a["config"]["optimizer"] == cfg.optimizer and a["timing"]["n_steps"] == 2  # 48 examples: one batch of 64 per epoch


def test_training_run_pieces():
    run = TrainingRun(TrainConfig(optimizer="engm", **_SMALL))
    assert run.epoch == 0 and not run.done and run.milestones == lr_milestones(2, (0.5, 0.75)) == [1, 2]
    rec = run.run_epoch()
    assert rec["epoch"] == run.epoch == 1 and rec["engm_norm_mean"] > 0
    assert rec["step_ms"] >= rec["update_ms"] > 0 and rec["batch_ms"] >= rec["step_ms"]
    assert run.evaluate()["test_robust_acc_pgd1"] == rec["test_robust_acc_pgd1"]  # same seed, same weights
    run.run_epoch()
    assert run.done
    with pytest.raises(RuntimeError, match="run is over"):
        run.run_epoch()
    res = run.finish()
    assert res["final"]["pgd_steps"] == 2 and res["best_epoch"] in (1, 2)


def test_final_attacks_are_checked():
    assert TrainConfig(final_attacks=("pgd-5",)).resolved().final_attacks == ("pgd-5",)
    default = TrainConfig(eval_steps=7).resolved().final_attacks
    assert default[0] == "pgd-7" and default[1:] == (("autoattack",) if apgd_available() else ())
    with pytest.raises(ValueError, match="unknown attack spec 'fgsm'"):
        TrainConfig(final_attacks=("fgsm",)).resolved()
    with pytest.raises(ValueError, match="STEPS >= 1"):
        TrainConfig(final_attacks=("pgd-0",)).resolved()
    with pytest.raises(ValueError, match="same attack"):
        TrainConfig(final_attacks=("pgd-10", "pgd-20")).resolved()
    with pytest.raises(TypeError, match="sequence of attack specs"):
        TrainConfig(final_attacks="pgd-20").resolved()
    missing = EvalAttack("absent", "Absent", "absent", 1, lambda *a: None, requires="engm_fast_no_such_module",
                         install="pip install engm-fast-no-such-module")
    register_eval_attack(missing)
    try:
        with pytest.raises(ValueError, match="pip install engm-fast-no-such-module"):
            TrainConfig(final_attacks=("pgd-2", "absent")).resolved()
        with pytest.raises(ValueError, match="already registered"):
            register_eval_attack(missing)
        res = train(TrainConfig(epochs=1, **{k: v for k, v in _SMALL.items() if k != "epochs"}))
        assert "absent" in res["unavailable_attacks"]  # said in the results, not dropped silently
    finally:
        del EVAL_ATTACKS["absent"]


def test_apgd_final_attack():
    pytest.importorskip("torchattacks", reason="APGD-CE comes from torchattacks")
    res = train(TrainConfig(**dict(_SMALL, epochs=1, final_attacks=("pgd-2", "apgd-ce-3"))))
    fin = res["final"]
    assert fin["apgd_steps"] == 3 and 0 <= fin["robust_acc_apgd"] <= fin["clean_acc"]
    assert list(res["final_attacks"]) == ["pgd-2", "apgd-ce-3"]


def test_dataset_registry_defaults_reach_the_config():
    spec = dataset_spec("digits")
    c = TrainConfig(optimizer="engm_proxy").resolved()
    assert (c.model, c.batch_size, c.eps, c.train_steps, c.alpha, c.lr, c.augment) == (
        spec.model, spec.batch_size, spec.eps, spec.attack_steps, spec.attack_alpha, spec.lr["engm_proxy"], False)
    assert TrainConfig(dataset="cifar10", data_dir="x").resolved().augment is True
    with pytest.raises(ValueError, match="dataset must be one of"):
        TrainConfig(dataset="svhn").resolved()
    m = TrainConfig(dataset="mnist", optimizer="engm").resolved()
    assert (m.model, m.eps, m.lr_schedule, m.eps_warmup, m.lr) == ("mnist_cnn", 0.2, "onecycle", 2.0,
                                                                   dataset_spec("mnist").lr["engm"])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="engm-proxy").resolved()  # one spelling: engm_proxy


def test_onecycle_schedule_and_eps_warmup():
    """One-cycle: the rate follows onecycle_factor step by step; the training eps ramps up over
    eps_warmup epochs (per step) and the evaluation uses the full eps throughout."""
    from engm_fast.at.train import onecycle_factor

    kw = dict(_SMALL, epochs=3, train_subset=64, test_subset=8, eval_train_subset=None, batch_size=16)
    run = TrainingRun(TrainConfig(lr=0.4, lr_schedule="onecycle", eps=0.1, train_steps=1, eps_warmup=1.5, **{
        k: v for k, v in kw.items() if k not in ("train_steps",)}))
    assert run.steps_per_epoch == 4 and run.milestones == []
    seen_lr = []
    step = run.step

    def spy(idx, ep):
        seen_lr.append(run.opt.param_groups[0]["lr"])
        return step(idx, ep)
    run.step = spy
    records = [run.run_epoch() for _ in range(3)]
    assert seen_lr == pytest.approx([0.4 * onecycle_factor(k, 12) for k in range(12)])
    assert max(seen_lr) == seen_lr[4] and run.opt.param_groups[0]["lr"] == 0.0  # peak near 2/5, 0 at the end
    # eps ramps over 1.5 epochs = 6 steps: the last step of epoch 1 uses 4/6 of eps, later ones all of it
    assert [r["train_eps"] for r in records] == pytest.approx([0.1 * 4 / 6, 0.1, 0.1])
    assert [run.eps_ramp(k) for k in (0, 5, 6)] == pytest.approx([1 / 6, 1.0, 1.0])
    assert run.cfg.eval_eps == 0.1
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine").resolved()
    with pytest.raises(ValueError, match="eps_warmup"):
        TrainConfig(eps_warmup=-1).resolved()


def test_final_subset_is_a_superset_of_the_per_epoch_images():
    run = TrainingRun(TrainConfig(**dict(_SMALL, test_subset=16, final_subset=40)))
    assert run.x_test.shape[0] == 16 and run.x_final.shape[0] == 40
    assert torch.equal(run.x_final[:16], run.x_test)  # one permutation: the per-epoch images come first
    run.run_epoch()
    run.run_epoch()
    res = run.finish()
    assert res["config"]["final_subset"] == 40
    # the final evaluation ran on the 40 images: accuracies are multiples of 1/40
    assert round(res["final"]["clean_acc"] * 40, 9) == round(res["final"]["clean_acc"] * 40)


def test_engm_remedy_options_reach_the_optimizer():
    run = TrainingRun(TrainConfig(**dict(_SMALL, optimizer="engm", engm_norm_floor=0.01, loss_precision="float64")))
    assert run.opt.norm_floor == 0.01
    rec = run.run_epoch()
    assert rec["train_loss"] > 0
    with pytest.raises(ValueError, match="ENGM option"):
        TrainConfig(optimizer="msgd", engm_norm_floor=0.01).resolved()
    with pytest.raises(ValueError, match="loss_precision"):
        TrainConfig(loss_precision="float16").resolved()
    args = build_parser().parse_args(["train", "--dataset", "mnist", "--engm-norm-floor", "0.01", "--loss-precision",
                                      "float64", "--lr-schedule", "onecycle", "--eps-warmup", "2", "--final-subset", "500",
                                      "--pgd-only"])
    assert (args.dataset, args.engm_norm_floor, args.loss_precision, args.lr_schedule, args.eps_warmup,
            args.final_subset, args.pgd_only) == ("mnist", 0.01, "float64", "onecycle", 2.0, 500, True)
