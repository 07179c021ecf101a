"""End to end training on a generated JPEG folder with the full-size network, few steps.

The runs are shared by several tests (module fixtures), since each costs seconds on 2 cores.
On the CPU every comparison below is exact (``torch.equal``): the split and collapsed layouts
perform the same arithmetic, and a resumed run restores every state it draws from.
"""

from __future__ import annotations

import compileall
import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (copy_run, records, repeated_tiny_set, run_python, start_python, stored,
                     train)

import split_alexnet
from split_alexnet.data.dataset import PCA_MODES
from split_alexnet.network.model import (ACTIVATIONS, ARCHS, INIT_SCHEMES, LRN_CHOICES,
                                         LRN_SPANS, POOLS, ModelConfig)
from split_alexnet.network.parallelize import AMP_CHOICES
from split_alexnet.tools.evaluate import main as evaluate_main
from split_alexnet.utils.checkpoint_file import load_checkpoint
from split_alexnet.network.placement import layout_of
from split_alexnet.training.config import RECIPE_NAMES, SECTIONS, FLAGS, TrainConfig, to_flags
from split_alexnet.training.options import COMMAND_FLAGS, parse_command, parse_config
from split_alexnet.training.recipes import DEMO_PRESET, describe
from split_alexnet.training.distributed import BACKENDS
from split_alexnet.training.optim import OPTIMIZERS, LRSchedule, PaperSGD
from split_alexnet.training.command import main as train_main
from split_alexnet.utils.cli import UsageError, run

def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if r["kind"] == "train"}


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}.{k}"


@pytest.fixture(scope="module")
def runs(demo_root, reference, module_tmp):
    """The demo run (8 steps, 2 epochs) uninterrupted in the split layout (``reference``,
    conftest.py) and in the collapsed one, and cut and resumed twice."""
    base = module_tmp("runs")
    out = {"split": reference, **{name: base / name for name in ("single", "cut_mid",
                                                                  "cut_edge")}}
    assert train(demo_root, out["single"], "--single-device") == 0
    # Interrupted exactly at the end of epoch 1 (step 4).
    assert train(demo_root, out["cut_edge"], "--devices", "cpu,cpu", "--max-steps", "4") == 0
    # Interrupted mid-epoch (step 6 of 8: 2 steps into epoch 2), resumed with 2 real workers
    # (the same run to step 4: a copy of cut_edge's, continued to step 6).
    copy_run(out["cut_edge"], out["cut_mid"])
    assert train(demo_root, out["cut_mid"], "--devices", "cpu,cpu", "--resume",
                 "--max-steps", "6") == 0
    assert train(demo_root, out["cut_mid"], "--devices", "cpu,cpu", "--resume",
                 "--workers", "2") == 0
    assert train(demo_root, out["cut_edge"], "--devices", "cpu,cpu", "--resume") == 0
    return out


def test_run_writes_checkpoints_metrics_and_curves(runs):
    out = runs["split"]
    for name in ("last.pt", "best.pt", "epoch_002.pt", "metrics.jsonl",
                 "curves.png", "config.json"):
        assert (out / name).is_file(), name
    # What a run keeps (docs/training.md): the last epoch's checkpoint (--keep-last 1), the
    # same file as last.pt at the run's end, and best.pt without what only a resume reads.
    assert not (out / "epoch_001.pt").exists()
    assert (out / "epoch_002.pt").stat().st_ino == (out / "last.pt").stat().st_ino
    best = load_checkpoint(out / "best.pt")
    assert "optimizer" not in best and "rng" not in best and set(best["model"]) >= {"fc8.bias"}
    assert (out / "best.pt").stat().st_size < 0.55 * (out / "last.pt").stat().st_size
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["progress"]["step"] == 8 and ckpt["progress"]["epoch"] == 2
    assert ckpt["classes"] == sorted(ckpt["classes"]) and len(ckpt["classes"]) == 4
    assert ckpt["config"]["batch_size"] == 8 and ckpt["layout"] == "split"
    assert set(ckpt["model"]) >= {"conv1.weight", "fc8.bias"}  # layout-independent keys
    assert len(ckpt["stats_fingerprint"]) >= 8 and ckpt["code_version"]
    assert sorted(losses(out)) == list(range(1, 9))


def test_split_and_single_device_runs_agree_step_by_step(runs):
    a, b = losses(runs["split"]), losses(runs["single"])
    assert a == b  # every logged loss, bit for bit
    ca, cb = stored(runs["split"] / "last.pt"), stored(runs["single"] / "last.pt")
    assert_same_tensors(ca["model"], cb["model"], "model")
    assert_same_tensors(ca["optimizer"]["buffers"], cb["optimizer"]["buffers"], "velocity")


@pytest.mark.parametrize("cut", ["cut_mid", "cut_edge"])
def test_resume_equals_uninterrupted(runs, cut):
    full = stored(runs["split"] / "last.pt")
    resumed = stored(runs[cut] / "last.pt")
    assert resumed["progress"] == full["progress"]
    assert_same_tensors(full["model"], resumed["model"], "model")
    assert_same_tensors(full["optimizer"]["buffers"], resumed["optimizer"]["buffers"], "velocity")
    assert_same_tensors(full["rng"], resumed["rng"], "rng")
    assert losses(runs[cut]) == losses(runs["split"])


@pytest.fixture(scope="module")
def learning(module_tmp):
    """The split layout on 8 images, each in 8 files (8 steps per epoch), 3 epochs, the
    watchdog judging at step 16: (run folder, what it wrote on stderr). Seed 1: on 8 images
    the first 24 steps depend on the draw (at lr 0.02 the runs of seeds 0 and 2 are still
    near chance at step 24); this one learns, which is what the tests below judge."""
    base = module_tmp("learning")
    root = repeated_tiny_set(base / "d", copies=8)
    out = base / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = run(train_main, "train", ["--data", str(root), "--out", str(out), "--batch-size",
                                       "8", "--epochs", "3", "--workers", "0", "--log-interval",
                                       "1", "--init", "caffe", "--no-ten-crop", "--lr", "0.02",
                                       "--lr-schedule", "step:100", "--pca", "off", "--dropout",
                                       "0", "--devices", "cpu,cpu", "--watchdog-steps", "16",
                                       "--eval-every", "100", "--seed", "1"])
    assert rc == 0, err.getvalue()[-3000:]
    return out, err.getvalue()


def test_loss_falls_on_a_tiny_set(learning):
    """The split layout overfits 8 images (each in 8 files: 24 steps in 3 epochs). (The
    collapsed layout computes the same losses bit for bit:
    test_split_and_single_device_runs_agree_step_by_step.)"""
    out, _ = learning
    ls = losses(out)
    last5 = [ls[s] for s in range(20, 25)]
    assert min(last5) < 0.3 * ls[1] and sum(last5) / 5 < ls[1], ls


def test_watchdog_stays_silent_on_a_run_that_learns(learning):
    """The run of test_loss_falls_on_a_tiny_set (it learns), judged at step 16 over steps
    12-16."""
    out, err = learning
    assert "warning" not in err
    assert [r for r in records(out) if r["kind"] == "watchdog"] == []
    ls = losses(out)
    assert len(ls) == 24
    assert sum(ls[s] for s in range(12, 17)) / 5 < 0.98 * math.log(2)  # the window judged


@pytest.mark.parametrize("ckpt_run", ["split", "single"])
def test_evaluate_in_both_layouts(runs, demo_root, tmp_path, capsys, ckpt_run):
    results = []
    for layout in (["--devices", "cpu,cpu"], ["--single-device"]):
        js = tmp_path / f"{ckpt_run}_{layout[0]}.json"
        rc = run(evaluate_main, "evaluate", ["--checkpoint", str(runs[ckpt_run] / "last.pt"),
                                             "--data", str(demo_root), "--workers", "0",
                                             "--json", str(js), *layout])
        assert rc == 0
        results.append(json.loads(js.read_text()))
    assert results[0]["center"] == results[1]["center"]
    assert results[0]["center"]["n"] == 16
    # The same numbers the training run logged for its last epoch.
    recs = records(runs[ckpt_run])
    val = [r for r in recs if r["kind"] == "val"][-1]
    assert results[0]["center"]["top1_err"] == val["top1_err"]
    assert "top-1" in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(demo_root, tmp_path, capsys):
    out = tmp_path / "nan"
    rc = train(demo_root, out, "--devices", "cpu,cpu", "--lr", "1e12", "--checkpoint-minutes", "0")
    err = capsys.readouterr().err
    assert rc == 1
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(line) == 1 and "loss is" in line[0] and "at step" in line[0] and "last.pt" in line[0]
    ckpt = load_checkpoint(out / "last.pt")  # still loads: the bad step was never saved
    for t in ckpt["model"].values():
        assert torch.isfinite(t).all()


def test_sigterm_saves_and_exits_zero_then_resumes(demo_root, tmp_path):
    out = tmp_path / "term"
    args = ["-m", "split_alexnet.train", "--data", demo_root, "--out", out, "--devices",
            "cpu,cpu", "--batch-size", "8", "--workers", "0", "--log-interval", "1", "--epochs",
            "50"]
    with open(tmp_path / "term.stderr", "w") as log:
        proc = start_python(args, stderr=log)
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err = (tmp_path / "term.stderr").read_text()
    assert proc.returncode == 0, err
    assert "signal received" in err and "Traceback" not in err
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["progress"]["step"] >= 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, words", [
    (["--gpus", "0,1"], "cuda:0 requested but this machine has no CUDA device"),
    (["--data", "/nonexistent/data", "--devices", "cpu,cpu"], "/nonexistent/data"),
    (["--devices", "cpu,cpu", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--devices", "cpu,cpu,cpu"], "exactly two devices"),
    (["--devices", "cpu,tpu9"], "unknown device"),
    ([], "no GPU found: use --devices cpu,cpu"),
    (["--devices", "cpu,cpu", "--lr-schedule", "sometimes"], "--lr-schedule"),
])
@pytest.mark.skipif(torch.cuda.is_available(), reason="messages assume a machine without GPUs")
def test_bad_input_is_one_line_and_exit_2(demo_root, tmp_path, capsys, args, words):
    argv = ["--out", str(tmp_path / "o")] + (["--data", str(demo_root)] if "--data" not in args
                                             else []) + args
    rc = run(train_main, "train", argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and words in err[0], err


def test_missing_val_and_unwritable_out_and_garbage_checkpoint(demo_root, tmp_path, capsys):
    no_val = tmp_path / "noval"
    (no_val / "train" / "a").mkdir(parents=True)
    assert run(train_main, "train", ["--data", str(no_val), "--devices", "cpu,cpu",
                                     "--out", str(tmp_path / "o")]) == 2
    assert "val" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run(train_main, "train", ["--data", str(demo_root), "--devices", "cpu,cpu",
                                     "--out", str(blocker / "run")]) == 2
    assert f"--out {blocker / 'run'} cannot be created: {blocker} is not a folder" in \
        capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    assert run(train_main, "train", ["--data", str(demo_root), "--devices", "cpu,cpu",
                                     "--batch-size", "8", "--out", str(tmp_path / "o2"),
                                     "--resume", str(garbage)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be loaded safely" in err[0]


def test_real_entry_point_prints_no_traceback(tmp_path):
    p = run_python("-m", "split_alexnet.train", "--data", tmp_path / "none", "--devices",
                   "cpu,cpu", "--out", tmp_path / "o", timeout=120)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr


# ----------------------------------------------------------------------------- optimizer, schedule


def test_paper_sgd_step_equals_the_formula():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3, dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64) for _ in range(4)]
    lrs = [0.1, 0.1, 0.01, 0.01]
    w = w0.clone().requires_grad_()
    opt = PaperSGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4)
    w_sgd = w0.clone().requires_grad_()
    sgd = torch.optim.SGD([w_sgd], lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref_w, ref_v = w0.clone(), torch.zeros_like(w0)
    for step, (lr, grad) in enumerate(zip(lrs, grads)):
        for o in (opt, sgd):
            for g in o.param_groups:
                g["lr"] = lr
        w.grad, w_sgd.grad = grad.clone(), grad.clone()
        opt.step()
        sgd.step()
        ref_v = 0.9 * ref_v - 0.0005 * lr * ref_w - lr * grad
        ref_w = ref_w + ref_v
        torch.testing.assert_close(w.detach(), ref_w, rtol=1e-15, atol=1e-15)
        if step < 2:  # constant rate: torch.optim.SGD is the same update
            torch.testing.assert_close(w_sgd.detach(), ref_w, rtol=1e-12, atol=1e-12)
    # After the drop they differ: torch keeps the learning rate outside the velocity.
    assert (w_sgd.detach() - w.detach()).abs().max() > 1e-4


def test_plateau_schedule_drops_at_most_three_times():
    s = LRSchedule("plateau", 0.01, patience=1, max_drops=3)
    lrs = [s.step(e) for e in [0.9, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]]
    assert lrs[:2] == [0.01, 0.01]
    assert lrs[2] == pytest.approx(0.001)          # no improvement: divide by 10
    assert lrs[3] == pytest.approx(0.001)          # improved
    assert s.drops == 3 and lrs[-1] == pytest.approx(1e-5)  # never a fourth time
    restored = LRSchedule("plateau", 0.01)
    restored.load_state_dict(s.state_dict())
    assert restored.lr == s.lr and restored.drops == 3
    step = LRSchedule("step:2", 1.0)
    assert [step.step(0.5) for _ in range(8)] == pytest.approx([1, .1, .1, .01, .01, .001, .001, .001])


def test_compare_prints_the_largest_difference(runs, tmp_path, capsys):
    from split_alexnet.tools.compare import main as compare_main
    png = tmp_path / "cmp.png"
    assert run(compare_main, "compare", [str(runs["split"]), str(runs["single"]),
                                         "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "train loss: 8 shared steps, largest difference 0 at step" in out
    from PIL import Image
    assert Image.open(png).size == (800, 500)
    # Two different runs do differ, and the report says by how much.
    assert run(compare_main, "compare", [str(runs["split"]), str(runs["cut_mid"])]) == 0
    assert "largest difference 0 " in capsys.readouterr().out  # resumed == uninterrupted
    assert run(compare_main, "compare", [str(runs["split"]), str(tmp_path)]) == 2


def test_summary_of_a_checkpoint_shows_its_network_and_position(one_step, capsys):
    from split_alexnet.tools.summary import main as summary_main
    capsys.readouterr()
    assert run(summary_main, "summary", ["--checkpoint", str(one_step / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{one_step / 'last.pt'}: 4 classes; init caffe, lrn paper, ")
    assert "; epoch 0, step 1\n" in out
    assert "SplitAlexNet: 56,884,612 parameters" in out and "(4,)" in out
    assert run(summary_main, "summary", ["--checkpoint", str(one_step / "last.pt"),
                                         "--classes", "10"]) == 2
    assert "give --classes or --checkpoint" in capsys.readouterr().err


def test_summary_lists_towers_and_traffic(capsys):
    from split_alexnet.tools.summary import main as summary_main
    assert run(summary_main, "summary", ["--devices", "cpu,cpu"]) == 0
    out = capsys.readouterr().out
    assert "60,965,224 parameters" in out
    assert "total 234,496 bytes per image" in out  # 2*86,528 + 2*18,432 + 3*8,192
    assert out.count("into conv3") == 2 and out.count("into fc8") == 1


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(runs, demo_root, tmp_path,
                                                                  capsys):
    import shutil
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("last.pt", "epoch_002.pt", "metrics.jsonl"):
        shutil.copyfile(runs["split"] / name, out / name)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])  # a crash mid-copy, a full disk
    assert train(demo_root, out, "--devices", "cpu,cpu", "--resume") == 0
    err = capsys.readouterr().err
    assert "cannot be loaded safely" in err and "trying the previous checkpoint" in err
    assert f"resumed from {out / 'epoch_002.pt'} at step 8, the end of epoch 2" in err


def test_class_metadata_survives_into_the_checkpoint(tmp_path):
    import shutil
    from split_alexnet.data.demo import make_demo_dataset
    from split_alexnet.data.imagenet import write_class_metadata
    root = make_demo_dataset(tmp_path / "d", classes=2, train_per_class=4, val_per_class=1)
    wnids = ["n01440764", "n01443537"]  # as prepare writes them for ImageNet
    for old, new in zip(sorted(p.name for p in (root / "train").iterdir()), wnids):
        for split in ("train", "val"):
            shutil.move(root / split / old, root / split / new)
    write_class_metadata(root, wnids, {"n01440764": "tench", "n01443537": "goldfish"})
    out = tmp_path / "run"
    assert train(root, out, "--devices", "cpu,cpu", "--max-steps", "1") == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["classes"] == wnids and ckpt["class_names"] == ["tench", "goldfish"]
    assert [c["wnid"] for c in ckpt["class_metadata"]] == wnids


# ----------------------------------------------------------------------------- the config


CHOICE_FLAGS = {"--arch": ARCHS, "--init": INIT_SCHEMES, "--lrn": LRN_CHOICES,
                "--lrn-span": LRN_SPANS, "--activation": ACTIVATIONS, "--pool": POOLS,
                "--optimizer": OPTIMIZERS, "--pca": PCA_MODES, "--backend": BACKENDS,
                "--amp": AMP_CHOICES, "--recipe": RECIPE_NAMES}


def test_help_lists_the_choices_of_every_choice_flag_from_bytecode_alone(tmp_path):
    """--help from a copy of the package without its .py sources (only .pyc, as some installs
    ship it): every choice flag shows its allowed values, taken from the one tuple."""
    pkg = tmp_path / "split_alexnet"
    shutil.copytree(Path(split_alexnet.__file__).parent, pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert compileall.compile_dir(pkg, quiet=1, legacy=True)
    for src in pkg.rglob("*.py"):
        src.unlink()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "split_alexnet.train", "--help"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    for flag, choices in CHOICE_FLAGS.items():
        assert f"{flag} {{{','.join(choices)}}}" in text, flag
        assert f"One of: {', '.join(choices)}." in text, flag
    assert "--lr-schedule {plateau,step:N,step-iters:N}" in text


def test_a_config_is_checked_when_made_and_never_changed():
    cfg = TrainConfig(model=ModelConfig(arch="half"))
    # The layout follows from the settings in one place; the config itself is as given.
    assert (cfg.runtime.single_device, layout_of(cfg.model.arch, cfg.runtime.single_device)) \
        == (False, "collapsed")
    assert layout_of("alexnet", False) == "split" and layout_of("alexnet", True) == "collapsed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.recipe = "bvlc"  # type: ignore[misc]
    with pytest.raises(UsageError, match="--lr must be greater than 0 and at most .*, got 0"):
        TrainConfig().with_settings(lr=0)
    assert cfg.with_settings(lr=0.02) is not cfg and cfg.optim.lr == 0.01
    # --demo trains on OUT/demo_data unless --data is given (generated there if missing).
    demo, cmd = parse_command(["--demo", "--out", "runs/x"])
    assert cmd.demo and demo.data.data == str(Path("runs/x") / "demo_data")
    assert parse_config(["--demo", "--data", "d"]).data.data == "d"


def test_command_switches_are_not_settings_of_the_run():
    saved = TrainConfig().to_dict()
    assert not set(COMMAND_FLAGS) & set(saved)
    assert {"resume", "overwrite", "plan", "print_recipe", "demo", "config"} <= \
        set(COMMAND_FLAGS)


def _toml(values: dict) -> str:
    def lit(v):
        return str(v).lower() if isinstance(v, bool) else json.dumps(v)
    return "".join(f"{k.replace('_', '-')} = {lit(v)}\n" for k, v in values.items())


def test_demo_in_a_toml_file_is_the_demo(tmp_path):
    (tmp_path / "demo.toml").write_text(_toml({"demo": True, "out": str(tmp_path / "o")}))
    from_file = parse_config(["--config", str(tmp_path / "demo.toml")])
    from_flags = parse_config(["--demo", "--out", str(tmp_path / "o")])
    assert from_file == from_flags
    assert from_file.model.init == "caffe" and from_file.optim.batch_size == 32  # the preset
    assert from_file.data.data == str(tmp_path / "o" / "demo_data")
    # The command line still wins over the file and the preset.
    assert parse_config(["--config", str(tmp_path / "demo.toml"),
                         "--batch-size", "8"]).optim.batch_size == 8


def test_every_flag_works_in_a_toml_file(tmp_path):
    values = {"data": "d", "out": "o", "devices": "cpu,cpu", "single_device": True,
              "arch": "half", "init": "cuda-convnet2", "lrn": "off", "lrn_span": "all",
              "activation": "tanh",
              "pool": "2/2", "dropout": 0.25, "epochs": 3, "batch_size": 16,
              "per_process_batch": True, "backend": "gloo", "lr": 0.02, "momentum": 0.8,
              "weight_decay": 0.001, "optimizer": "torch", "lr_schedule": "step:2",
              "plateau_patience": 2, "lr_drops": 1, "pca": "sqrt", "workers": 1, "seed": 7,
              "max_steps": 5, "checkpoint_minutes": 5.0, "keep_last": 2,
              "log_interval": 3, "watchdog_steps": 0, "stop_on_divergence": True,
              "ten_crop": False, "eval_every": 2,
              "strict": True, "channels_last": True, "amp": "bf16", "compile": True,
              "cudnn_benchmark": True,
              "recipe": "bvlc", "bias_lr_mult": 2.5, "bias_decay": False,
              "plateau_min_epochs": 2, "plateau_threshold": 0.01,
              "holdout": 1, "tensorboard": True, "parallel": "hybrid",
              "hybrid_schedule": "sequential", "fc_updates": "each", "lr_batch_rule": "sqrt",
              "lr_batch_reference": 256,
              "init_from": "c.pt", "reinit": "fc8", "freeze_through": "conv2", "lr_mult_new": 5.0}
    # Every setting but --gpus (it excludes --devices).
    assert set(values) == set(TrainConfig().to_dict()) - {"gpus"}
    (tmp_path / "all.toml").write_text(_toml(values))
    from_file = parse_config(["--config", str(tmp_path / "all.toml")])
    assert from_file.to_dict() == {**TrainConfig().to_dict(), **values}
    assert from_file == parse_config(to_flags(values))
    (tmp_path / "gpus.toml").write_text(_toml({"gpus": "0,1"}))
    assert parse_config(["--config", str(tmp_path / "gpus.toml")]).runtime.gpus == "0,1"


def test_a_toml_file_may_put_settings_under_their_sections(tmp_path):
    (tmp_path / "s.toml").write_text("recipe = 'bvlc'\n[optim]\nlr = 0.02\nbatch-size = 64\n"
                                     "[model]\nlrn = 'caffe'\n[schedule]\nepochs = 3\n")
    cfg = parse_config(["--config", str(tmp_path / "s.toml")])
    assert (cfg.recipe, cfg.optim.lr, cfg.optim.batch_size, cfg.model.lrn, cfg.schedule.epochs) \
        == ("bvlc", 0.02, 64, "caffe", 3)
    (tmp_path / "bad.toml").write_text("[optim]\nepochs = 3\n")  # epochs is not [optim]'s
    with pytest.raises(UsageError, match=r"unknown setting 'epochs' in \[optim\]"):
        parse_config(["--config", str(tmp_path / "bad.toml")])


def test_every_setting_states_its_section_help_and_whether_it_defines_the_run():
    for name, (section, f) in FLAGS.items():
        assert f.metadata["help"], name
        if section != "model":  # the network's fields all define the run
            assert isinstance(f.metadata["run"], bool), name
        assert section is None or section in SECTIONS
    # bool switches on by default get --no-NAME from their default, not from a list
    assert to_flags({"ten_crop": False, "bias_decay": False, "strict": False}) == \
        ["--no-ten-crop", "--no-bias-decay"]


def test_demo_reasons_cite_the_repository():
    text = describe(DEMO_PRESET)
    assert "docs/experiments.md" in text and "shared" not in text
