"""Named recipes and the switches they are made of: the optimizer's parameter groups (bias
learning-rate multiplier, bias decay) against the update formula in both optimizers and both
layouts, the recipes' resolution and precedence, --print-recipe, the step-iters schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import records, run_main, stored
import split_alexnet.data.dataset as D
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.data.dataset import CropFolder, holdout_indices
from split_alexnet.network.model import WEIGHT_LAYERS, SplitAlexNet, collapse_state_dict
from split_alexnet.training.config import FLAGS, TrainConfig
from split_alexnet.training.options import parse_config
from split_alexnet.training.recipes import DEMO_PRESET, RECIPES, recipe_settings
from split_alexnet.training.optim import (LRSchedule, build_optimizer,
                                          load_named_optimizer_state, named_optimizer_state,
                                          param_groups, set_lr)
from split_alexnet.training.command import main as train_main
import split_alexnet.training.setup as training_setup
from split_alexnet.training.setup import split_holdout
from split_alexnet.utils.cli import UsageError, run


class TwoLayers(nn.Module):
    """Parameters named like the network's: conv1.weight, conv1.bias, fc8.weight, fc8.bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Linear(3, 4).double()
        self.fc8 = nn.Linear(4, 2).double()


# ----------------------------------------------------------------------------- parameter groups


def test_param_groups_one_per_layer_and_kind_in_network_order():
    torch.manual_seed(0)
    split = SplitAlexNet(num_classes=10)
    split.towers[0].conv1.bias.requires_grad_(False)
    split.towers[1].conv1.bias.requires_grad_(False)
    groups = param_groups(split, bias_lr_mult=2.0, bias_decay=False, weight_decay=5e-4,
                          layer_lr_mult={"fc8": 10.0})
    keys = [(g["layer"], g["kind"]) for g in groups]
    want = [(layer, kind) for layer in WEIGHT_LAYERS for kind in ("weight", "bias")]
    want.remove(("conv1", "bias"))  # no trainable parameters left: no group
    assert keys == want
    for g in groups:
        assert set(g) == {"params", "layer", "kind", "lr_mult", "weight_decay"}
        assert len(g["params"]) == (1 if g["layer"] == "fc8" else 2)  # both towers' halves
        bias = g["kind"] == "bias"
        assert g["lr_mult"] == (10.0 if g["layer"] == "fc8" else 1.0) * (2.0 if bias else 1.0)
        assert g["weight_decay"] == (0.0 if bias else 5e-4)
    with pytest.raises(ValueError, match="unknown layers"):
        param_groups(split, layer_lr_mult={"conv9": 2.0}, weight_decay=5e-4)


@pytest.mark.parametrize("kind", ["paper", "torch"])
@pytest.mark.parametrize("bias_lr_mult,bias_decay", [(1.0, True), (2.0, False), (3.0, True)])
def test_the_update_with_bias_multipliers_equals_the_formula(kind, bias_lr_mult, bias_decay):
    """v <- 0.9 v - eps*mult*wd_or_0*w - eps*mult*grad; w <- w + v, per parameter. The torch
    optimizer keeps the rate outside the velocity: the same update at a constant rate, so it
    is checked before the drop only."""
    torch.manual_seed(0)
    net = TwoLayers()
    opt = build_optimizer(net, kind=kind, lr=0.1, momentum=0.9, weight_decay=5e-4,
                          bias_lr_mult=bias_lr_mult, bias_decay=bias_decay)
    ref = {n: (p.detach().clone(), torch.zeros_like(p)) for n, p in net.named_parameters()}
    lrs = [0.1, 0.1, 0.1, 0.01, 0.01] if kind == "paper" else [0.1, 0.1, 0.1]
    for lr in lrs:
        set_lr(opt, lr)
        for n, p in net.named_parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        for n, p in net.named_parameters():
            w, v = ref[n]
            bias = n.endswith("bias")
            mult = bias_lr_mult if bias else 1.0
            wd = 0.0 if bias and not bias_decay else 5e-4
            v = 0.9 * v - lr * mult * wd * w - lr * mult * p.grad
            ref[n] = (w + v, v)
            torch.testing.assert_close(p.detach(), w + v, rtol=1e-13, atol=1e-15)


@pytest.mark.slow
def test_split_and_collapsed_agree_bitwise_with_bias_multipliers():
    """Two steps of PaperSGD with biases x2 and no bias decay: the two layouts end with the
    same weights and velocities, bit for bit; the named optimizer state moves between them."""
    torch.manual_seed(0)
    split = SplitAlexNet(num_classes=5)
    single = split.collapse()
    opts = [build_optimizer(m, lr=0.01, bias_lr_mult=2.0, bias_decay=False)
            for m in (split, single)]
    torch.manual_seed(1)
    xs = [torch.randn(1, 3, 227, 227) for _ in range(2)]
    for x in xs:
        for m, o in zip((split, single), opts):
            torch.manual_seed(2)  # the same dropout masks in both
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    a, b = collapse_state_dict(dict(split.state_dict())), dict(single.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = named_optimizer_state(split, opts[0]), named_optimizer_state(single, opts[1])
    for k in sa["buffers"]["velocity"]:
        assert torch.equal(sa["buffers"]["velocity"][k], sb["buffers"]["velocity"][k]), k
    assert [(g["layer"], g["kind"], g["lr_mult"], g["weight_decay"]) for g in sa["groups"]] == \
        [(g["layer"], g["kind"], g["lr_mult"], g["weight_decay"]) for g in sb["groups"]]
    # Into a fresh collapsed optimizer: the same velocities and groups.
    fresh = build_optimizer(single, lr=0.01, bias_lr_mult=2.0, bias_decay=False)
    load_named_optimizer_state(single, fresh, sa)
    again = named_optimizer_state(single, fresh)
    assert again["groups"] == sa["groups"]
    for k, v in sa["buffers"]["velocity"].items():
        assert torch.equal(again["buffers"]["velocity"][k], v), k


# ----------------------------------------------------------------------------- recipes


def test_each_recipe_resolves_to_exactly_its_settings():
    assert list(RECIPES) == ["paper", "bvlc"]
    default = TrainConfig().to_dict()
    # paper: the defaults, every one of them.
    assert parse_config([]).to_dict() == parse_config(["--recipe", "paper"]).to_dict()
    assert all(default[k] == v for k, v in recipe_settings("paper").items())
    got = parse_config(["--recipe", "bvlc"]).to_dict()
    assert recipe_settings("bvlc") == {
        "init": "caffe", "bias_lr_mult": 2.0, "bias_decay": False, "lrn": "caffe",
        "batch_size": 256, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
        "lr_schedule": "step-iters:100000", "lr_drops": 4, "max_steps": 450_000,
        "epochs": 90, "pca": "off"}
    changed = {k for k in got if got[k] != default[k]}
    assert changed == {"recipe", "init", "bias_lr_mult", "bias_decay", "lrn", "batch_size",
                       "lr_schedule", "lr_drops", "max_steps", "pca"}
    for k, v in recipe_settings("bvlc").items():
        assert got[k] == v, k
    # Every setting cites its source.
    for name, table in RECIPES.items():
        for k, (_, why) in table.items():
            assert ("section" in why) if name == "paper" else ("BVLC/caffe models/bvlc_alexnet/"
                                                               in why), (name, k)


def test_flags_toml_and_demo_win_over_the_recipe(tmp_path):
    cfg = parse_config(["--recipe", "bvlc", "--batch-size", "64", "--bias-decay",
                        "--bias-lr-mult", "1.5"])
    assert (cfg.optim.batch_size, cfg.optim.bias_decay, cfg.optim.bias_lr_mult,
            cfg.model.lrn) == (64, True, 1.5, "caffe")
    toml = tmp_path / "c.toml"
    toml.write_text('recipe = "bvlc"\nlr = 0.02\n')
    cfg = parse_config(["--config", str(toml)])
    assert (cfg.recipe, cfg.optim.lr, cfg.optim.batch_size) == ("bvlc", 0.02, 256)
    cfg = parse_config(["--config", str(toml), "--recipe", "paper"])  # the command line's
    assert (cfg.recipe, cfg.optim.lr, cfg.optim.batch_size) == ("paper", 0.02, 128)
    cfg = parse_config(["--recipe", "bvlc", "--demo"])
    assert cfg.optim.batch_size == DEMO_PRESET["batch_size"][0] and \
        cfg.optim.bias_lr_mult == 2.0
    assert parse_config(["--no-bias-decay"]).optim.bias_decay is False
    assert TrainConfig().with_settings(bias_decay=False).to_argv() == ["--no-bias-decay"]


def test_new_settings_are_classified():
    for k in ("recipe", "bias_lr_mult", "bias_decay"):
        assert FLAGS[k][1].metadata["run"] is True
    assert "print_recipe" not in TrainConfig().to_dict()  # a switch of the command


@pytest.fixture
def train_here(tmp_path, capsys, monkeypatch):
    """The trainer's command run here in ``tmp_path`` as its console runs it: (exit code,
    stdout, stderr). (Its own process: tests/test_train.py::test_real_entry_point_prints_no_
    traceback.)"""
    monkeypatch.chdir(tmp_path)
    return lambda *args: run_main(train_main, "split_alexnet.train", args, capsys)


def test_print_recipe_lists_the_settings_and_does_nothing_else(tmp_path, train_here):
    rc, out, err = train_here("--recipe", "bvlc", "--print-recipe", "--out", tmp_path / "run",
                              "--batch-size", "64")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "recipe bvlc:"
    assert len(lines) == 1 + len(RECIPES["bvlc"])
    assert lines[1].startswith("  --init caffe: BVLC/caffe models/bvlc_alexnet/")
    assert any(x.startswith("  --no-bias-decay: ") for x in lines)
    assert any(x.startswith("  --batch-size 256 (this run: 64): ") for x in lines)
    assert any(x.startswith("  --lr-schedule step-iters:100000: ") for x in lines)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,words", [
    (["--recipe", "caffenet"], "--recipe must be one of paper, bvlc; got 'caffenet'"),
    (["--bias-lr-mult", "-1"], "--bias-lr-mult must be at least 0"),
    (["--lr-schedule", "step-iters:0"], "--lr-schedule must be"),
])
def test_bad_recipe_input_is_one_line_and_exit_2(tmp_path, train_here, args, words):
    rc, _, err = train_here(*args, "--out", tmp_path / "run")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError):
        recipe_settings("caffenet")


# ----------------------------------------------------------------------------- step-iters


def test_step_iters_schedule_is_caffes_step_policy_and_resumes():
    """lr for the step with 0-based index i: 0.01 * 0.1 ** min(i // 3, 2)."""
    s = LRSchedule("step-iters:3", 0.01, max_drops=2)
    lrs, changes = [], []
    for done in range(10):
        changes.append(s.at_step(done))
        lrs.append(s.lr)
        if done == 4:
            saved = json.loads(json.dumps(s.state_dict()))
    want = [0.01 * 0.1 ** min(i // 3, 2) for i in range(10)]
    assert lrs == pytest.approx(want, rel=1e-12)
    assert [i for i, c in enumerate(changes) if c] == [3, 6]
    assert s.step(0.5) == s.lr and s.drops == 2  # evaluations do not drop it
    resumed = LRSchedule("step-iters:3", 0.01, max_drops=2)
    resumed.load_state_dict(saved)
    assert [(resumed.at_step(d), resumed.lr)[1] for d in range(5, 10)] == \
        pytest.approx(want[5:], rel=1e-12)


# ----------------------------------------------------------------------------- plateau


def test_plateau_patience_counts_epochs_with_eval_every_2():
    """Patience 3 epochs, an evaluation every 2 epochs: the second evaluation without a new
    best is 4 epochs without one, and drops the rate (counting evaluations would wait for a
    third)."""
    s = LRSchedule("plateau", 1.0, patience=3)
    assert [s.step(e, epochs=2) for e in (0.5, 0.6, 0.6)] == [1.0, 1.0, pytest.approx(0.1)]
    assert (s.epochs, s.drops, s.bad_epochs) == (6, 1, 0)
    assert "for 4 epochs (patience 3)" in s.reason and s.reason.startswith("plateau: ")


def test_plateau_min_epochs_holds_each_rate():
    s = LRSchedule("plateau", 1.0, patience=1, min_epochs=3)
    lrs = [s.step(e) for e in (0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6)]
    # epoch 2 is bad but only 2 epochs at 1.0; epoch 3: 3 epochs, drop; next rate from epoch 4
    # to 6, drop at epoch 6.
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01])
    assert "3 epochs at this rate (minimum 3)" in s.reason


def test_plateau_threshold_is_the_relative_improvement_that_counts():
    s = LRSchedule("plateau", 1.0, patience=1, threshold=0.1)
    assert s.step(0.5) == 1.0 and s.best == 0.5
    assert s.step(0.46) == pytest.approx(0.1)  # 8% better: not enough, a bad epoch
    assert s.best == 0.5
    assert s.step(0.44) == pytest.approx(0.1) and s.best == 0.44  # 12% better: improves
    plain = LRSchedule("plateau", 1.0, patience=1)
    assert [plain.step(e) for e in (0.5, 0.46)] == [1.0, 1.0]  # the paper: any decrease


def test_plateau_state_resumes_exactly():
    errors = [0.5, 0.6, 0.4, 0.6, 0.6, 0.6, 0.6, 0.3, 0.6]
    full = LRSchedule("plateau", 1.0, patience=2, min_epochs=3, threshold=0.05)
    want = [full.step(e) for e in errors]
    part = LRSchedule("plateau", 1.0, patience=2, min_epochs=3, threshold=0.05)
    got = [part.step(e) for e in errors[:5]]
    resumed = LRSchedule("plateau", 1.0, patience=2, min_epochs=3, threshold=0.05)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    got += [resumed.step(e) for e in errors[5:]]
    assert got == want and resumed.state_dict() == full.state_dict()
    assert "epochs_at_rate" in full.state_dict()


def test_a_step_schedule_counts_epochs_with_eval_every():
    s = LRSchedule("step:3", 1.0)
    assert [s.step(0.5, epochs=2) for _ in range(3)] == pytest.approx([1.0, 0.1, 0.01])


def test_bad_plateau_settings_are_usage_errors():
    for flags in (["--plateau-threshold", "1"], ["--plateau-min-epochs", "-1"]):
        with pytest.raises(UsageError, match=flags[0]):
            parse_config(flags)


@pytest.mark.slow
def test_every_lr_drop_is_a_record_and_a_log_line(tmp_path, capsys):
    """Patience 0: every evaluation drops the rate (epochs 1 and 2, one step each), each drop
    a record with its reason and a log line."""
    data = make_demo_dataset(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1,
                             seed=0)
    out = tmp_path / "run"
    rc = run(train_main, "train", [
        "--data", str(data), "--out", str(out), "--batch-size", "8", "--epochs", "2",
        "--workers", "0", "--log-interval", "1", "--init", "caffe", "--no-ten-crop",
        "--devices", "cpu,cpu", "--plateau-patience", "0"])
    assert rc == 0
    recs = records(out)
    drops = [r for r in recs if r["kind"] == "lr_drop"]
    assert [(r["step"], r["epoch"]) for r in drops] == [(1, 1), (2, 2)]
    assert [r["old"] for r in drops] == pytest.approx([0.01, 0.001])
    assert [r["new"] for r in drops] == pytest.approx([0.001, 0.0001])
    assert all(r["reason"].startswith("plateau: ") and r["reason"].endswith("(on the val set)")
               for r in drops)
    lrs = {r["step"]: r["lr"] for r in recs if r["kind"] == "train"}
    assert lrs[1] == 0.01 and lrs[2] == pytest.approx(0.001)
    err = capsys.readouterr().err
    assert err.count("learning rate 0.01 -> 0.001 at step 1 (epoch 1): plateau: ") == 1


# ----------------------------------------------------------------------------- hold-out


def test_holdout_is_deterministic_per_class_and_disjoint(demo_root):
    classes = sorted(p.name for p in (demo_root / "train").iterdir())
    full = CropFolder(demo_root / "train", classes, mode="train", seed=3)
    held = holdout_indices(full.targets, 2, seed=3)
    assert held == holdout_indices(full.targets, 2, seed=3)  # the same on resume, every rank
    assert held != holdout_indices(full.targets, 2, seed=4)
    assert sorted(full.targets[i] for i in held) == [0, 0, 1, 1, 2, 2, 3, 3]
    cfg = TrainConfig.from_flat({"data": str(demo_root), "holdout": 2, "seed": 3})
    train_set, hold_set = split_holdout(full, cfg, False)
    assert (len(full), len(train_set), len(hold_set)) == (32, 24, 8)
    assert hold_set.mode == "center" and train_set.mode == "train"
    assert {p for p, _ in hold_set.samples} == {full.samples[i][0] for i in held}
    assert not {p for p, _ in hold_set.samples} & {p for p, _ in train_set.samples}
    with pytest.raises(UsageError, match=r"--holdout 8: the smallest class, .* has 8 training"):
        split_holdout(full, TrainConfig.from_flat({"holdout": 8}), False)
    assert split_holdout(full, TrainConfig(), False) == (full, None)


def test_holdout_as_large_as_a_class_is_one_line_and_exit_2(demo_root, tmp_path, train_here):
    rc, _, err = train_here("--data", demo_root, "--out", tmp_path / "run", "--holdout", "8",
                            "--workers", "0", "--devices", "cpu,cpu")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--holdout 8: the smallest class" in lines[0], err
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.slow
def test_holdout_drives_the_schedule_and_val_is_still_reported(demo_root, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / "run"
    listings = []  # the trainer's listings of the training folder (the up-front check's and
    real = D.list_samples  # CropFolder's), through the real function

    def counted(split_dir, *args, **kwargs):
        if Path(split_dir) == demo_root / "train":
            listings.append(split_dir)
        return real(split_dir, *args, **kwargs)
    monkeypatch.setattr(D, "list_samples", counted)
    monkeypatch.setattr(training_setup, "list_samples", counted)
    rc = run(train_main, "train", [
        "--data", str(demo_root), "--out", str(out), "--batch-size", "8", "--epochs", "1",
        "--workers", "0", "--log-interval", "1", "--init", "caffe", "--no-ten-crop",
        "--devices", "cpu,cpu", "--holdout", "2", "--plateau-patience", "0"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "--holdout 2: 8 of 32 training images held out (2 per class); training on 24" in err
    assert len(listings) == 1  # the up-front --holdout check's listing is the training set's
    recs = records(out)
    assert max(r["step"] for r in recs if r["kind"] == "train") == 3  # 24 images / 8
    (val,) = [r for r in recs if r["kind"] == "val"]
    (hold,) = [r for r in recs if r["kind"] == "holdout"]
    assert (val["n"], hold["n"]) == (16, 8)
    (drop,) = [r for r in recs if r["kind"] == "lr_drop"]
    assert f"top-1 error {hold['top1_err']:.4f}" in drop["reason"]
    assert drop["reason"].endswith("(on the hold-out set)")
    assert stored(out / "best.pt")["progress"]["best_top1"] == hold["top1_err"]
    assert json.loads((out / "config.json").read_text())["holdout"] == 2


# ----------------------------------------------------------------------------- --plan


@pytest.mark.slow
def test_plan_prints_the_run_and_writes_nothing_into_out(demo_root, tmp_path, train_here):
    out = tmp_path / "run"
    rc, text, err = train_here("--plan", "--data", demo_root, "--out", out, "--batch-size", "2",
                               "--epochs", "3", "--workers", "0", "--devices", "cpu,cpu",
                               "--keep-last", "1", "--lr-schedule", "step-iters:20",
                               "--lr-drops", "3", "--init", "caffe", "--plan-steps", "3")
    assert rc == 0, err
    assert not out.exists()  # not even the lock or config.json
    assert "training images: 32; steps per epoch: 16; epochs: 3; total steps: 48" in text
    assert "/ 10 every 20 steps, at most 3 times: drops before steps 21, 41" in text
    assert "at most 2 such files and best.pt (parameters only): " in text
    assert "(keeping 1)" in text
    # 60,965,224 float32 parameters for 4 classes' fc8 = 60,965,224 - 4096*996 - 996
    n = 60_965_224 - 4096 * 996 - 996
    assert f"checkpoint size: {2 * n * 4 / 2**20:.0f} MiB ({n * 4 / 2**20:.0f} MiB parameters" \
        in text
    assert "CPU: growth of this process's peak resident set size" in text
    assert "step time over 3 timed steps (after 1 warm-up)" in text and "median" in text
    assert "projected training time for 48 steps" in text


@pytest.mark.parametrize("plan", [True, False], ids=["plan", "start"])
def test_a_preset_is_printed_before_the_refusal_its_batch_causes(plan, tmp_path, train_here):
    """--demo's batch of 32 on 8 training images, with --plan and at a run's start: the demo
    preset's table comes first on stderr, then the one line that names --batch-size (exit 2,
    no traceback), and nothing is left in --out."""
    small = make_demo_dataset(tmp_path / "small", classes=2, train_per_class=4,
                              val_per_class=2, seed=0)
    out = tmp_path / "run"
    rc, _, err = train_here(*(["--plan"] if plan else []), "--demo", "--data", small, "--out",
                            out, "--workers", "0")
    assert rc == 2 and "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ": error: " in ln]
    assert line.endswith("error: the training set has 8 images, fewer than one batch of 32 "
                         "(--batch-size 32); give --batch-size N with N at most 8"), err
    title = err.index("demo preset (flags given on the command line win):")
    batch = err.index(f"  --batch-size 32: {DEMO_PRESET['batch_size'][1]}")
    assert title < batch < err.index(line)
    assert "  --workers 2 (this run: 0): " in err
    assert not out.exists()
