"""The paper's switches, the experiments command, and the trainer's watchdog (issue 10).

Switch checks that already live elsewhere are referenced, not repeated:

* PCA noise ``off`` leaves every pixel untouched:
  tests/test_data.py::test_pca_noise_adds_exact_offset_to_every_pixel[off] and
  tests/test_data.py::test_dataset_alpha_distribution_and_off.
* Each init reading's stds and biases, layer by layer (collapsed and, through the shared
  initialiser, split): tests/test_model.py::test_initialisation_by_layer_name and
  test_same_seed_same_weights_in_both_layouts. Only the half net's init is added here.
* The half net's widths and its 59,798,312 parameters: tests/test_model.py::test_half_net_shapes
  and test_parameter_counts_match_the_paper (repeated below in the per-variant table, which
  costs nothing extra).
* LRN "paper" against the printed formula, per tower: tests/test_model.py and tests/test_lrn.py.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import paper_images as images
from helpers import records
from split_alexnet import (AlexNet, HalfAlexNet, ModelConfig, SplitAlexNet, build_model,
                           count_parameters)
from split_alexnet.utils.cli import run
from split_alexnet.network.placement import layout_of
from split_alexnet.training.options import parse_config
from split_alexnet.tools.experiments import (EXPERIMENTS, chance_threshold, first_crossing,
                                       main as experiments_main, smooth)
from split_alexnet.network.model import init_values
from split_alexnet.training.metrics import Watchdog
from split_alexnet.training.command import main as train_main




# ----------------------------------------------------------------------------- switches


@pytest.mark.parametrize("arch, kw, params", [
    ("alexnet", {}, 60_965_224),
    ("alexnet", {"activation": "tanh"}, 60_965_224),
    ("alexnet", {"lrn": "off"}, 60_965_224),
    ("alexnet", {"pool": "2/2"}, 60_965_224),
    ("half", {}, 59_798_312),
    ("half", {"pool": "2/2", "lrn": "off", "activation": "tanh"}, 59_798_312),
])
def test_parameter_counts_per_variant(arch, kw, params):
    """Activation, LRN and pooling have no parameters: only --arch changes the count."""
    net = build_model(ModelConfig(arch=arch, num_classes=1000, init=None, **kw), "collapsed",
                      "cpu")
    assert count_parameters(net) == params


def _spatial_sizes(net) -> dict[str, tuple[int, ...]]:
    """Inputs of the layers every layout calls as modules (the collapsed AlexNet computes
    conv1, conv3, fc6 and fc7 as two output halves, without calling those modules)."""
    seen = {}
    hooks = [getattr(net, n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, tuple(i[0].shape[1:])))
        for n in ("conv2", "conv4", "fc8")]
    with torch.no_grad():
        net.eval()(images(1))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("pool", ["3/2", "2/2"])
@pytest.mark.parametrize("net_cls", [AlexNet, HalfAlexNet])
def test_both_pools_give_55_27_13_6(net_cls, pool):
    from split_alexnet.network.model import _pool
    cfg = ModelConfig(num_classes=10, pool=pool)
    sizes = [55]
    for _ in range(3):  # pool1, pool2 (conv2-conv4 keep the size), pool5
        sizes.append(_pool(torch.zeros(1, 1, sizes[-1], sizes[-1]), cfg).shape[-1])
    assert sizes == [55, 27, 13, 6]
    torch.manual_seed(0)
    seen = _spatial_sizes(net_cls(10, pool=pool, init="caffe"))
    assert seen["conv2"][1:] == (27, 27)    # after pool1
    assert seen["conv4"][1:] == (13, 13)    # after pool2 and conv3
    assert seen["fc8"] == (4096,)           # fc6 took 256 * 6 * 6 = 9216 (or it would raise)


def test_pool_switch_changes_only_the_window():
    torch.manual_seed(0)
    a = AlexNet(10, init="caffe").eval()
    b = AlexNet(10, pool="2/2", init=None).eval()
    b.load_state_dict(a.state_dict())
    x = images(1)
    # The same weights: conv1 agrees; the first pooled maps differ only by the window.
    pre = F.relu(a.conv1(x))
    pre = a.lrn(pre)
    want3 = F.max_pool2d(pre, 3, 2)
    want2 = F.max_pool2d(pre, 2, 2)
    got = {}
    for net, key in ((a, "3/2"), (b, "2/2")):
        h = net.conv2.register_forward_hook(lambda m, i, o, key=key: got.__setitem__(key, i[0]))
        with torch.no_grad():
            net(x)
        h.remove()
    assert torch.equal(got["3/2"], want3) and torch.equal(got["2/2"], want2)
    assert not torch.equal(want3, want2)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_activation_switch_is_used_everywhere(activation):
    """Layer 1 before LRN is exactly act(conv1(x)); every hidden layer's output obeys the
    activation's range (tanh in (-1, 1); ReLU >= 0 and unbounded at the paper's input scale)."""
    torch.manual_seed(0)
    net = SplitAlexNet(10, activation=activation, init="caffe").eval()
    t0 = net.towers[0]
    seen = {}
    def first_lrn_input(module, args):  # layer 1's LRN input (layer 2 calls it again)
        seen.setdefault("pre_lrn", args[0])  # returns None: the input is left as it is

    hooks = [t0.lrn.register_forward_pre_hook(first_lrn_input)]
    for name in ("conv3", "conv4", "fc6", "fc7"):
        hooks.append(getattr(t0, name).register_forward_hook(
            lambda m, i, o, name=name: seen.update({f"{name}.in": i[0], f"{name}.out": o})))
    x = images(2)
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    act = torch.tanh if activation == "tanh" else F.relu
    with torch.no_grad():
        manual = act(t0.conv1(x))
    h = seen["pre_lrn"]
    assert torch.equal(h, manual)
    if activation == "tanh":
        # In [-1, 1]; at the paper's raw input scale (pixel std ~60, conv1 std 0.01) many
        # units saturate to exactly +-1 in float32, but not all.
        assert h.abs().max() <= 1 and h.min() < 0 and (h.abs() < 0.99).any()
        frac = (h.abs() >= 0.99).float().mean().item()
        assert 0.0 < frac < 1.0
    else:
        assert h.min() >= 0 and h.max() > 1
    # Deeper layers: the next layer reads act(previous output) (eval: dropout is identity).
    assert torch.equal(seen["conv4.in"], act(seen["conv3.out"]))
    assert torch.equal(seen["fc7.in"][:, :2048], act(seen["fc6.out"]))


def test_lrn_off_is_identity_and_the_readings_differ():
    x = torch.randn(2, 96, 6, 6) * 80
    off = AlexNet(10, lrn="off", init=None).lrn
    assert torch.equal(off(x), x)
    paper = AlexNet(10, lrn="paper", init=None).lrn(x)
    over_n = AlexNet(10, lrn="alpha-over-n", init=None).lrn(x)
    assert not torch.allclose(paper, over_n) and not torch.allclose(paper, x)


def test_lrn_caffe_is_alpha_over_n_with_k_1_per_tower():
    """b = a / (1 + (1e-4 / 5) * sum of squares over 5 channels) ** 0.75, each half alone."""
    x = (torch.randn(2, 96, 5, 5) * 80).double()
    got = AlexNet(10, lrn="caffe", init=None).lrn(x)
    want = []
    for half in x.split(48, dim=1):
        sq = F.pad(half.pow(2), (0, 0, 0, 0, 2, 2)).unfold(1, 5, 1).sum(-1)  # (B, 48, 5, 5)
        want.append(half / (1 + 1e-4 / 5 * sq).pow(0.75))
    torch.testing.assert_close(got, torch.cat(want, dim=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("scheme", ["paper", "cuda-convnet2", "caffe"])
def test_half_net_init_follows_the_same_readings(scheme):
    torch.manual_seed(0)
    net = HalfAlexNet(10, init=scheme)
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        std, bias = init_values(layer, scheme)
        m = getattr(net, layer)
        assert torch.all(m.bias == bias), layer
        assert abs(m.weight.std().item() - std) < 0.05 * std, layer


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_each_experiment_changes_exactly_one_switch(name):
    """Every variant parses, and the variants' configs differ only in the named switch."""
    exp = EXPERIMENTS[name]
    base = parse_config(["--devices", "cpu,cpu"])
    cfgs = [base.with_settings(**switch).to_dict() for _, switch in exp.variants]
    switches = {k for _, switch in exp.variants for k in switch}
    assert len(switches) == 1
    (switch,) = switches
    changed = {k for c in cfgs[1:] for k in c if c[k] != cfgs[0][k]} - {"single_device"}
    assert changed == {switch}, changed
    assert len({c[switch] for c in cfgs}) == len(cfgs)
    if name == "towers-vs-half":  # the half net is always one device
        assert [layout_of(c["arch"], c["single_device"]) for c in cfgs] == \
            ["split", "collapsed"]


def test_trainer_flags_reach_the_run_config():
    cfg = parse_config(["--devices", "cpu,cpu", "--activation", "tanh", "--lrn", "off",
                        "--pool", "2/2", "--pca", "off", "--init", "caffe", "--arch", "half"])
    m = cfg.model
    layout = layout_of(m.arch, cfg.runtime.single_device)
    assert (m.activation, m.lrn, m.pool, cfg.data.pca, m.init, m.arch, layout) == \
        ("tanh", "off", "2/2", "off", "caffe", "half", "collapsed")


# ----------------------------------------------------------------------------- the numbers


def test_smoothing_and_crossing():
    errs = [1.0, 0.8, 0.6, 0.2, 0.2, 0.2]
    sm = smooth(errs, 3)
    assert sm[:3] == pytest.approx([1.0, 0.9, 0.8]) and sm[5] == pytest.approx(0.2)
    steps = [1, 2, 3, 4, 5, 6]
    assert first_crossing(steps, sm, 0.25, 3) == 6     # first full window at or below 25%
    assert first_crossing(steps, sm, 0.9, 3) == 3      # the window must be full
    assert first_crossing(steps, sm, 0.1, 3) is None
    assert chance_threshold(10, 1, 10_000) == pytest.approx(0.85)  # half a class's share
    assert chance_threshold(10, 10, 16) == pytest.approx(0.9 - 3 * math.sqrt(0.09 / 160))
    assert chance_threshold(2, 2, 8) == pytest.approx(0.5 - 3 * math.sqrt(0.25 / 16))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_root(module_tmp):
    """2 classes x 8 train (2 steps per epoch at batch 8) x 2 val."""
    from split_alexnet.data.demo import make_demo_dataset
    return make_demo_dataset(module_tmp("exp") / "d", classes=2,
                             train_per_class=8, val_per_class=2, seed=0)


def _check_outputs(out: Path, name: str, variants: list[str], budget: int) -> dict:
    for f in ("results.md", "curves.png", "results.json"):
        assert (out / f).is_file(), f
    from PIL import Image
    assert Image.open(out / "curves.png").size == (800, 500)
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == name and list(res["summary"]) == variants
    md = (out / "results.md").read_text()
    cfgs = {}
    for v in variants:
        assert f"| {v} |" in md
        (r,) = res["runs"][v]
        assert r["seed"] == 0 and r["steps"] == budget
        assert 0.0 <= r["final_val"]["top1_err"] <= 1.0 and r["final_val"]["step"] == budget
        assert r["curve"]["step"] == list(range(1, budget + 1))
        run_dir = out / f"{v}-seed0"
        assert not list(run_dir.glob("*.pt"))  # checkpoints removed by default
        cfgs[v] = json.loads((run_dir / "config.json").read_text())
    # Everything else equal: the configs differ only in the switch and the output folder.
    first = cfgs[variants[0]]
    diff = {k for c in cfgs.values() for k in c if c[k] != first[k]}
    (switch,) = EXPERIMENTS[name].variants[0][1]
    assert diff == {switch, "out"}, diff
    return res


def test_relu_vs_tanh_end_to_end(tiny_root, tmp_path, capsys):
    """A budget of one epoch (2 steps): each run evaluates at its end."""
    out = tmp_path / "rt"
    rc = run(experiments_main, "experiments",
             ["relu-vs-tanh", "--data", str(tiny_root), "--out", str(out), "--budget-steps", "2",
              "--batch-size", "8", "--workers", "0", "--seeds", "1", "--smooth", "2"])
    assert rc == 0
    res = _check_outputs(out, "relu-vs-tanh", ["relu", "tanh"], 2)
    assert res["target"] == "err25"
    assert "25% train err" in (out / "results.md").read_text()
    assert "6x" in (out / "results.md").read_text()
    for v in ("relu", "tanh"):
        tgt = res["runs"][v][0]["target"]
        assert tgt["threshold"] == 0.25
        cell = "not reached within 2 steps" if tgt["step"] is None else f"{tgt['step']} steps"
        assert cell in (out / "results.md").read_text()


def test_init_end_to_end_mid_epoch(tiny_root, tmp_path):
    """1 step of a 2-step epoch: no val record in the run, so the command evaluates
    last.pt itself."""
    out = tmp_path / "init"
    rc = run(experiments_main, "experiments",
             ["init", "--data", str(tiny_root), "--out", str(out), "--budget-steps", "1",
              "--batch-size", "8", "--workers", "0", "--", "--dropout", "0"])
    assert rc == 0
    res = _check_outputs(out, "init", ["paper", "cuda-convnet2", "caffe"], 1)
    assert res["target"] == "chance"
    assert res["chance_threshold"] == pytest.approx(0.25)  # 0.5 - max(0.5/2, 3 se of 10 x 8)
    for v in ("paper", "cuda-convnet2", "caffe"):
        r = res["runs"][v][0]
        assert (out / f"{v}-seed0" / "final_val.json").is_file()
        assert r["final_val"]["n"] == 4
    assert "--dropout 0" in " ".join(res["settings"]["common_flags"])


def test_a_run_whose_update_makes_the_weights_non_finite_is_a_diverged_variant(tiny_root,
                                                                            tmp_path):
    """--lr 1e38: the first loss is finite, the update overflows the weights. That run is a
    result ("diverged"), not the end of the experiment. The weights' sum is nan or an
    infinity, as the float32 overflow falls (inf on torch 2.4, nan on 2.14)."""
    out = tmp_path / "init"
    rc = run(experiments_main, "experiments",
             ["init", "--data", str(tiny_root), "--out", str(out), "--budget-steps", "2",
              "--batch-size", "8", "--workers", "0", "--variants", "caffe", "--", "--lr", "1e38"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    (r,) = res["runs"]["caffe"]
    assert re.match(r"the weights became non-finite \(their sum is (nan|-?inf)\) in the update "
                    r"at step 1 \(epoch 1\)", r["diverged"]), r["diverged"]
    assert r["final_val"]["top1_err"] is None and res["summary"]["caffe"]["diverged"] == 1
    assert "diverged (loss or weights NaN/inf) by step" in (out / "results.md").read_text()


def test_bad_experiment_input_is_one_line(tmp_path, capsys):
    assert run(experiments_main, "experiments",
               ["lrn", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "train/" in capsys.readouterr().err
    assert run(experiments_main, "experiments",
               ["init", "--data", str(tmp_path), "--variants", "bogus"]) == 2
    with pytest.raises(SystemExit) as e:
        experiments_main(["no-such-experiment"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- watchdog


def _watchdog(w: int, classes: int = 2):
    logged = []
    return Watchdog(w, classes, logged.append), logged


def _feed(watchdog, losses):
    for step, loss in enumerate(losses, 1):
        watchdog.observe(step, loss)


def test_watchdog_decision(capsys):
    ln2 = math.log(2)
    wd, logged = _watchdog(4)
    _feed(wd, [5.0, 5.0, ln2, 0.99 * ln2, ln2, ln2])  # last 2 of the first 4: at chance
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "after 4 steps the training loss is still at chance" in err[0]
    assert "ln 2 = 0.693" in err[0] and "docs/experiments.md" in err[0]
    assert "Try --recipe bvlc" in err[0]
    assert logged == [{"kind": "watchdog", "step": 4, "loss": pytest.approx(0.995 * ln2),
                       "chance_loss": pytest.approx(ln2), "window": 2}]
    wd, logged = _watchdog(4)
    _feed(wd, [ln2, ln2, 0.9 * ln2, 0.9 * ln2, ln2])  # learning: 10% below chance
    assert logged == [] and capsys.readouterr().err == ""
    wd, logged = _watchdog(0)  # disabled
    _feed(wd, [ln2] * 10)
    assert logged == []


@pytest.fixture(scope="module")
def same_images_root(module_tmp):
    """Two class folders holding the same 4 images: nothing to learn (loss >= ln 2)."""
    from split_alexnet.data.demo import make_demo_dataset
    root = make_demo_dataset(module_tmp("same") / "d", classes=1,
                             train_per_class=4, val_per_class=1, seed=0)
    for split in ("train", "val"):
        shutil.copytree(root / split / "circle", root / split / "copy")
    return root


TINY = ["--batch-size", "8", "--workers", "0", "--log-interval", "1", "--no-ten-crop",
        "--pca", "off", "--dropout", "0", "--devices", "cpu,cpu", "--eval-every", "100"]


def _watchdog_records(out: Path) -> list[dict]:
    return [r for r in records(out) if r["kind"] == "watchdog"]


# A run that learns, silent: tests/test_train.py::test_watchdog_stays_silent_on_a_run_that_learns.


def test_watchdog_fires_on_a_run_that_cannot_learn(same_images_root, tmp_path, capsys):
    out = tmp_path / "stuck"
    rc = run(train_main, "train", ["--data", str(same_images_root), "--out", str(out), *TINY,
                                   "--epochs", "2", "--init", "paper", "--lr", "1e-6",
                                   "--watchdog-steps", "2"])
    assert rc == 0  # a warning, not an abort
    err = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(err) == 1 and "after 2 steps the training loss is still at chance" in err[0]
    (rec,) = _watchdog_records(out)
    assert rec["step"] == 2 and rec["loss"] >= 0.98 * math.log(2)


def test_watchdog_flag_and_preset():
    from split_alexnet.training.config import TrainConfig
    from split_alexnet.training.recipes import DEMO_PRESET
    assert TrainConfig().logging.watchdog_steps == 500
    assert parse_config(["--watchdog-steps", "0", "--devices", "cpu,cpu"]) \
        .logging.watchdog_steps == 0
    # The demo's run leaves chance within ~100 steps (docs/training.md); the watchdog waits longer.
    assert DEMO_PRESET["watchdog_steps"][0] == 150
    assert parse_config(["--demo"]).logging.watchdog_steps == 150
    with pytest.raises(Exception, match="--watchdog-steps"):
        parse_config(["--watchdog-steps", "-1"])


def test_table_cells_and_the_relu_tanh_ratio():
    from split_alexnet.tools.experiments import _target_cell, comparisons
    base = {"seeds": 2, "top1_err_mean": 0.3, "top5_err_mean": 0.1, "target_reached": 2,
            "target_step_mean": 100.0, "target_seconds_mean": 50.0, "budget_steps": 900,
            "diverged": 0}
    tanh = {**base, "target_step_mean": 600.0}
    (line,) = comparisons(EXPERIMENTS["relu-vs-tanh"], {"relu": base, "tanh": tanh})
    assert "tanh needed 6.0x the steps of ReLU" in line
    (line,) = comparisons(EXPERIMENTS["relu-vs-tanh"],
                          {"relu": base, "tanh": {**tanh, "target_reached": 0}})
    assert "more than 9.0x" in line
    assert _target_cell(base, "") == "100 steps (50 s)"
    assert _target_cell({**base, "target_reached": 1, "diverged": 1}, "") == \
        "100 steps (50 s); reached by 1/2 seeds; 1/2 seeds diverged"
    assert _target_cell({**base, "target_reached": 0, "diverged": 2, "budget_steps": 14}, "") \
        == "diverged (loss or weights NaN/inf) by step 15"
    (line,) = comparisons(EXPERIMENTS["lrn"], {"lrn-paper": base,
                                               "lrn-off": {**base, "top1_err_mean": 0.314,
                                                           "top5_err_mean": 0.112}})
    assert "-1.4 top-1 / -1.2 top-5 points (paper: -1.4 / -1.2)" in line


def test_a_step_ratio_claim_is_data_of_its_experiment():
    """Any experiment with a StepRatio gets the ratio sentence, in its own words."""
    from split_alexnet.tools.experiments import Experiment, StepRatio, comparisons
    exp = Experiment("x", "?", (("a", {"lrn": "paper"}), ("b", {"lrn": "off"})), target="err25",
                     ratio=StepRatio(2.5, ("A", "B"), "the goal", "elsewhere"))
    a = {"target_reached": 1, "target_step_mean": 10.0, "budget_steps": 40}
    (line,) = comparisons(exp, {"a": a, "b": {**a, "target_step_mean": 30.0}})
    assert line == ("Measured: B needed 3.0x the steps of A to reach the goal (paper: 2.5x, "
                    "elsewhere).")
    (line,) = comparisons(exp, {"a": {**a, "target_reached": 0}, "b": a})
    assert line == ("Measured: A did not reach the goal within the budget, so this run says "
                    "nothing about the 2.5x.")
    assert comparisons(EXPERIMENTS["init"], {}) == []  # no ratio, no delta: nothing to compare


def test_every_flag_is_read_before_any_work(tmp_path):
    """The experiment's flags and the trainer's (after --, parsed once, winning over the
    experiment's settings) make the plan; nothing is created yet."""
    from split_alexnet.tools.experiments import make_plan, parse_args
    out = tmp_path / "o"
    plan = make_plan(*parse_args(["init", "--data", str(tmp_path / "none"), "--out", str(out),
                                  "--devices", "cpu,cpu", "--budget-steps", "5", "--variants",
                                  "caffe,paper", "--", "--lr", "0.005", "--log-interval", "3"]))
    assert not out.exists()
    assert [n for n, _ in plan.exp.variants] == ["paper", "caffe"] and not plan.complete
    cfg = plan.base.to_dict()
    assert (cfg["lr"], cfg["log_interval"], cfg["max_steps"], cfg["devices"]) == \
        (0.005, 3, 5, "cpu,cpu")
    assert plan.budget == "5 steps per run" and not plan.make_demo and not plan.demo
    whole = make_plan(*parse_args(["lrn", "--out", str(out), "--devices", "cpu,cpu"]))
    assert whole.complete and whole.make_demo and whole.data == out / "demo_data"
    assert not out.exists()
