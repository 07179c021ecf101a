"""Fine-tuning (``--init-from``, ``--reinit``, ``--freeze-through``, ``--lr-mult-new``,
``--finetune``): real training runs on generated JPEG folders, a few steps each.

The source checkpoints: a short run of ours on 4 classes (``one_step``, conftest.py), and
Caffe's bvlc_alexnet layout converted from a synthetic .caffemodel (tests/caffe_reference.py's
writer, random weights). The fine-tuning runs train on 3 other classes, so fc8 is re-initialised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import caffe_reference as ref
from helpers import BASE, PROGRAMS, rank_reports, stored, torchrun, train
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.network.model import TOWER_LAYERS, layout_state_dict
from split_alexnet.tools.convert import main as convert_main
from split_alexnet.utils.checkpoint_file import load_checkpoint
from split_alexnet.training.options import parse_command
from split_alexnet.training.command import main as train_main
from split_alexnet.training.recipes import FINETUNE_PRESET
from split_alexnet.training.loader import train_loader
from split_alexnet.training.optim import set_lr
from split_alexnet.training.trainer import Trainer
from split_alexnet.utils.cli import run

def layers_of(state: dict, layer: str) -> dict:
    return {k: v for k, v in state.items() if k.split(".")[0] == layer}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def src(one_step, module_tmp):
    """A source run of ours (``one_step``, conftest.py: 4 classes, 1 step, split layout) and a
    folder of 3 other classes (8 training images each: 3 steps per epoch of 8) to fine-tune
    on."""
    base = module_tmp("ft")
    other = make_demo_dataset(base / "other", classes=3, train_per_class=8, val_per_class=2,
                              seed=11)
    return SimpleNamespace(base=base, ckpt=one_step / "last.pt", data=other,
                           state=stored(one_step / "last.pt")["model"])


@pytest.fixture(scope="module")
def converted(module_tmp):
    """bvlc_alexnet's layers with random weights, written as a .caffemodel and converted."""
    d = module_tmp("caffe")
    ref.write_net(d / "m.caffemodel", ref.ALEXNET_PROTOTXT, ref.random_blobs(seed=5), v1=False)
    assert run(convert_main, "convert", ["caffe", str(d / "m.caffemodel"), str(d / "c.pt")]) == 0
    (d / "m.caffemodel").unlink()
    return d / "c.pt"


def fresh(argv: list[str]):
    """The trainer of ``argv`` set up (data, model, optimizer), before its first step."""
    return Trainer.setup(*parse_command(argv))


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("layout", [["--devices", "cpu,cpu"], ["--single-device"]])
def test_every_layer_loaded_and_fc8_reinitialised(src, tmp_path, layout):
    """From our 4-class split-layout run into either layout on 3 classes: conv1-fc7 equal
    the source; fc8 has 3 rows and the very values a run from scratch with the same seed
    starts with. --reinit fc6,fc7 starts those from scratch too."""
    args = ["--data", str(src.data), *BASE, *layout]
    scratch = layout_state_dict(fresh(args + ["--out", str(tmp_path / "s")]).net)
    t = fresh(args + ["--out", str(tmp_path / "f"), "--init-from", str(src.ckpt)])
    got = layout_state_dict(t.net)
    for layer in TOWER_LAYERS:
        assert same(layers_of(got, layer), layers_of(src.state, layer)), layer
    assert tuple(got["fc8.weight"].shape) == (3, 4096) and got["fc8.bias"].shape == (3,)
    assert same(layers_of(got, "fc8"), layers_of(scratch, "fc8"))
    assert not torch.equal(got["fc7.weight"], scratch["fc7.weight"])
    t = fresh(args + ["--out", str(tmp_path / "r"), "--init-from", str(src.ckpt),
                      "--reinit", "fc6,fc7"])
    got = layout_state_dict(t.net)
    for layer in ("fc6", "fc7", "fc8"):
        assert same(layers_of(got, layer), layers_of(scratch, layer)), layer
    assert same(layers_of(got, "conv5"), layers_of(src.state, "conv5"))


def test_a_converted_checkpoint_starts_a_run_in_the_split_layout(converted, src, tmp_path,
                                                                 capsys):
    """Caffe's weights (1000 classes, collapsed) into the split layout on 3 classes: every
    layer but fc8 is Caffe's, and the LRN reading that differs is named in one warning."""
    t = fresh(["--data", str(src.data), "--out", str(tmp_path / "o"), *BASE,
               "--devices", "cpu,cpu", "--init-from", str(converted)])
    err = capsys.readouterr().err
    assert "warning: " in err and "--lrn caffe --lrn-span all" in err, err
    assert "(1000 classes; 3 here, other classes): loaded conv1-fc7; re-initialised fc8 by " \
        "--init caffe" in err
    state, source = layout_state_dict(t.net), load_checkpoint(converted)["model"]
    for layer in TOWER_LAYERS:
        assert same(layers_of(state, layer), layers_of(source, layer)), layer
    assert tuple(state["fc8.weight"].shape) == (3, 4096)


def test_fc8_is_kept_only_for_the_same_classes(src, demo_root, tmp_path):
    """The source's 4 classes again: fc8 is loaded too. As many classes under other names:
    fc8 is re-initialised (its rows would answer for the wrong classes)."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    args = [*BASE, "--devices", "cpu,cpu", "--init-from", str(src.ckpt)]
    t = fresh(["--data", str(root), "--out", str(tmp_path / "a"), *args])
    assert same(layout_state_dict(t.net), src.state)
    assert t.optimizer.param_groups[-1]["lr_mult"] == 1.0
    for split in ("train", "val"):
        (root / split / "star").rename(root / split / "zigzag")
    t = fresh(["--data", str(root), "--out", str(tmp_path / "b"), *args, "--lr-mult-new", "4"])
    state = layout_state_dict(t.net)
    assert not torch.equal(state["fc8.weight"], src.state["fc8.weight"])
    assert same(layers_of(state, "fc7"), layers_of(src.state, "fc7"))
    assert [(g["layer"], g["kind"], g["lr_mult"]) for g in t.optimizer.param_groups][-4:] == \
        [("fc7", "weight", 1.0), ("fc7", "bias", 1.0), ("fc8", "weight", 4.0), ("fc8", "bias", 4.0)]


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("layout,optimizer", [(["--devices", "cpu,cpu"], "paper"),
                                              (["--single-device"], "torch")])
def test_frozen_layers_stay_bitwise_unchanged(src, tmp_path, layout, optimizer):
    """--freeze-through conv3 for 4 steps (weight decay 5e-4, momentum 0.9): conv1-conv3
    are bit for bit the source's, they have no momentum buffer and sit in no optimizer group;
    conv4 on trains."""
    out = tmp_path / "o"
    assert train(src.data, out, *layout, "--optimizer", optimizer, "--max-steps", "4",
                 "--init-from", src.ckpt, "--freeze-through", "conv3") == 0
    ckpt = stored(out / "last.pt")
    assert ckpt["progress"]["step"] == 4
    (buffers,) = ckpt["optimizer"]["buffers"].values()
    for layer in ("conv1", "conv2", "conv3"):
        assert same(layers_of(ckpt["model"], layer), layers_of(src.state, layer)), layer
        assert not layers_of(buffers, layer), layer
    for layer in ("conv4", "conv5", "fc6", "fc7"):
        assert not torch.equal(ckpt["model"][f"{layer}.weight"], src.state[f"{layer}.weight"])
        assert set(layers_of(buffers, layer)) == {f"{layer}.weight", f"{layer}.bias"}
    assert [(g["layer"], g["kind"]) for g in ckpt["optimizer"]["groups"]] == \
        [(layer, kind) for layer in ("conv4", "conv5", "fc6", "fc7", "fc8")
         for kind in ("weight", "bias")]


@pytest.mark.parametrize("optimizer", ["paper", "torch"])
def test_lr_mult_new_scales_only_the_new_layers_steps(src, tmp_path, optimizer):
    """One step from the same weights and batch: with --lr-mult-new 10, fc8 (re-initialised)
    moves 10 times as far as with 1; every loaded layer moves exactly as far."""
    start = layout_state_dict(fresh(["--data", str(src.data), "--out", str(tmp_path / "s"),
                                     *BASE, "--devices", "cpu,cpu", "--init-from",
                                     str(src.ckpt)]).net)
    moved = {}
    for m in ("1", "10"):
        out = tmp_path / m
        assert train(src.data, out, "--devices", "cpu,cpu", "--optimizer", optimizer,
                     "--max-steps", "1", "--init-from", src.ckpt, "--lr-mult-new", m) == 0
        ckpt = stored(out / "last.pt")
        moved[m] = {k: ckpt["model"][k] - start[k] for k in start}
        lrs = {g["layer"]: (g["lr"], g["lr_mult"]) for g in ckpt["optimizer"]["groups"]}
        assert lrs["fc8"] == (pytest.approx(0.01 * float(m)), float(m))
        assert lrs["conv1"] == (0.01, 1.0)
    for key in start:
        if key.startswith("fc8"):
            # within float32 rounding of w + step - w (measured: 1.9e-8 on steps of 1e-3)
            torch.testing.assert_close(moved["10"][key], 10 * moved["1"][key], rtol=1e-4,
                                       atol=1e-7)
            assert moved["1"][key].abs().max() > 1e-4
        else:
            assert torch.equal(moved["10"][key], moved["1"][key]), key


def test_resume_of_a_fine_tuning_run_is_exact(src, tmp_path):
    """One epoch (3 steps) uninterrupted vs 2 + --resume 1 (mid-epoch), with frozen layers and
    a rate multiplier: bitwise the same weights, velocities, groups and RNG. The resume does
    not read the --init-from file (it is gone by then)."""
    source = tmp_path / "source.pt"
    shutil.copy(src.ckpt, source)
    flags = ["--devices", "cpu,cpu", "--init-from", source, "--freeze-through", "conv2",
             "--lr-mult-new", "10", "--epochs", "1"]
    assert train(src.data, tmp_path / "full", *flags) == 0
    assert train(src.data, tmp_path / "cut", *flags, "--max-steps", "2") == 0
    source.unlink()
    assert train(src.data, tmp_path / "cut", *flags, "--resume") == 0
    full = stored(tmp_path / "full" / "last.pt")
    cut = stored(tmp_path / "cut" / "last.pt")
    assert full["progress"] == cut["progress"] and full["progress"]["step"] == 3
    assert same(full["model"], cut["model"])
    for name, buf in full["optimizer"]["buffers"].items():
        assert same(buf, cut["optimizer"]["buffers"][name]), name
    assert full["optimizer"]["groups"] == cut["optimizer"]["groups"]
    assert same(full["rng"]["rank0"], cut["rng"]["rank0"])
    assert full["config"]["init_from"] == str(source)


def test_scratch_and_fine_tuned_runs_share_data_order_and_seeds(src, tmp_path):
    """Same --seed: the same first batches (files, crops, flips, colour noise), the same
    initial fc8 and the same RNG state for the dropout masks."""
    args = ["--data", str(src.data), *BASE, "--devices", "cpu,cpu"]
    a = fresh(args + ["--out", str(tmp_path / "s")])
    rng_a = torch.get_rng_state()
    b = fresh(args + ["--out", str(tmp_path / "f"), "--init-from", str(src.ckpt), "--finetune",
                      "--batch-size", "8", "--epochs", "2"])
    rng_b = torch.get_rng_state()
    assert torch.equal(rng_a, rng_b)
    assert torch.equal(a.net.fc8.weight, b.net.fc8.weight)
    for batch_a, batch_b in zip(train_loader(a), train_loader(b)):
        files_a = [a.data.train_set.samples[i][0] for i in batch_a["index"]]
        assert files_a == [b.data.train_set.samples[i][0] for i in batch_b["index"]]
        for key in ("image", "label", "top", "left", "flip", "alpha"):
            assert torch.equal(batch_a[key], batch_b[key]), key
    # The preset changed the rate, the schedule and the multiplier; the flags kept the rest.
    assert (b.cfg.optim.lr, b.cfg.schedule.lr_schedule, b.cfg.schedule.lr_drops,
            b.cfg.finetune.lr_mult_new) == \
        tuple(FINETUNE_PRESET[k][0] for k in ("lr", "lr_schedule", "lr_drops", "lr_mult_new"))
    assert (b.cfg.optim.batch_size, b.cfg.schedule.epochs) == (8, 2)
    set_lr(b.optimizer, b.schedule.lr)
    assert {g["layer"]: g["lr"] for g in b.optimizer.param_groups}["fc8"] == \
        pytest.approx(0.001 * 10)


def test_finetune_preset_is_printed_and_recorded(src, tmp_path, capsys):
    out = tmp_path / "o"
    assert train(src.data, out, "--devices", "cpu,cpu", "--max-steps", "1", "--init-from",
                 src.ckpt, "--finetune", "--epochs", "3") == 0
    err = capsys.readouterr().err
    assert "fine-tuning preset (flags given on the command line win):" in err
    for k, (v, why) in FINETUNE_PRESET.items():
        assert f"  --{k.replace('_', '-')} " in err and why in err, k
    assert "--epochs 60 (this run: 3): " in err
    saved = json.loads((out / "config.json").read_text())
    assert "finetune" not in saved and saved["lr"] == 0.001 and saved["epochs"] == 3
    ckpt = stored(out / "last.pt")
    assert {**ckpt["config"], **ckpt["model_config"]} == \
        {**saved, "num_classes": len(ckpt["classes"])}
    (rec,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
              if '"init_from"' in x]
    assert rec["loaded"] == list(TOWER_LAYERS) and rec["reinit"] == ["fc8"]
    assert rec["source_classes"] == 4 and rec["frozen"] == []


# ----------------------------------------------------------------------------- bad input


def one_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("train: error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


BAD = {  # flags -> a piece of the one error line
    "missing file": (["--init-from", "{tmp}/none.pt"], "--init-from: checkpoint"),
    "other arch": (["--init-from", "{ckpt}", "--arch", "half"],
                   "holds a network with --arch alexnet, this run builds --arch half"),
    "other activation": (["--init-from", "{ckpt}", "--activation", "tanh"],
                         "give --activation relu to fine-tune it"),
    "unknown freeze layer": (["--init-from", "{ckpt}", "--freeze-through", "conv9"],
                             "--freeze-through takes layer names from conv1, conv2"),
    "freeze fc8": (["--freeze-through", "fc8"], "--freeze-through takes layer names from"),
    "unknown reinit layer": (["--init-from", "{ckpt}", "--reinit", "fc8,pool5"],
                             "--reinit takes layer names from conv1"),
    "negative multiplier": (["--init-from", "{ckpt}", "--lr-mult-new", "-1"],
                            "--lr-mult-new must be at least 0"),
    "NaN multiplier": (["--init-from", "{ckpt}", "--lr-mult-new", "nan"],
                       "--lr-mult-new must be a finite number, got nan"),
    "reinit without source": (["--reinit", "fc8"], "--reinit need(s) --init-from CKPT"),
    "preset without source": (["--finetune"], "--finetune needs --init-from CKPT"),
    "frozen and new": (["--init-from", "{ckpt}", "--reinit", "conv2", "--freeze-through",
                        "conv3"], "a re-initialised layer that is frozen never learns"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fine_tuning_input_is_one_line_and_exit_2(case, src, tmp_path, capsys):
    flags, words = BAD[case]
    flags = [f.format(tmp=tmp_path, ckpt=src.ckpt) for f in flags]
    line = one_line(capsys, train(src.data, tmp_path / "o", "--devices", "cpu,cpu", *flags))
    assert words in line, line
    assert not (tmp_path / "o" / "last.pt").exists()


def test_a_preset_batch_larger_than_the_set_is_refused_naming_batch_size(src, tmp_path,
                                                                         capsys):
    """--finetune's batch of 50 on a set of fewer images: the preset is printed first, then
    one line that names --batch-size and the largest that fits."""
    n = len(list((Path(src.data) / "train").rglob("*.jpg")))
    assert n < 50
    rc = run(train_main, "train", ["--data", str(src.data), "--out", str(tmp_path / "o"),
                                   "--devices", "cpu,cpu", "--workers", "0", "--init-from",
                                   str(src.ckpt), "--finetune"])
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 2 and line == (f"train: error: the training set has {n} images, fewer than "
                                f"one batch of 50 (--batch-size 50); give --batch-size N with "
                                f"N at most {n}"), err
    assert err.index("fine-tuning preset") < err.index(line)
    assert "--batch-size 50: batch_size: 50" in err
    assert not (tmp_path / "o" / "config.json").exists()


def test_resume_refuses_converted_weights_and_changed_fine_tuning_flags(converted, src,
                                                                        tmp_path, capsys):
    line = one_line(capsys, train(src.data, tmp_path / "o", "--devices", "cpu,cpu",
                                  "--resume", converted))
    assert f"--resume: {converted} holds converted weights without training state" in line
    assert f"start a run from them with --init-from {converted}" in line
    out = tmp_path / "ft"
    assert train(src.data, out, "--devices", "cpu,cpu", "--max-steps", "1", "--init-from",
                 src.ckpt, "--freeze-through", "conv1") == 0
    capsys.readouterr()
    line = one_line(capsys, train(src.data, out, "--devices", "cpu,cpu", "--resume",
                                  "--freeze-through", "conv2"))
    assert "--resume: --freeze-through conv2 (the run: conv1)" in line, line
    assert "the run is fine-tuned" not in line  # --freeze-through is not --finetune's
    line = one_line(capsys, train(src.data, out, "--devices", "cpu,cpu", "--resume",
                                  "--init-from", converted, "--lr", "0.02"))
    assert f"--resume: --init-from {converted} (the run: {src.ckpt}), --lr 0.02 (the run: " \
           "0.01)" in line, line
    assert "the run is fine-tuned: --resume keeps the values its --finetune" in line


# ----------------------------------------------------------------------------- DDP

@pytest.mark.slow
def test_frozen_layers_under_ddp(src, tmp_path):
    """Two ranks (gloo, towers on cpu,cpu) fine-tune with conv1-conv5 frozen: DDP needs no
    find_unused_parameters for them, the ranks end identical, the frozen layers unchanged."""
    out = tmp_path / "o"
    p, _ = torchrun(PROGRAMS / "train_with_rank_report.py", tmp_path / "report",
                    ["--data", str(src.data), "--out", str(out), *BASE, "--batch-size", "6",
                     "--max-steps", "2", "--devices", "cpu,cpu", "--init-from", str(src.ckpt),
                     "--freeze-through", "conv5"],
                    env_extra={"SPLIT_ALEXNET_DIST_TIMEOUT": "120"}, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = rank_reports(tmp_path / "report")
    assert ranks[0]["params"] == ranks[1]["params"]
    ckpt = stored(out / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["progress"]["step"] == 2
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        assert same(layers_of(ckpt["model"], layer), layers_of(src.state, layer)), layer
    assert not torch.equal(ckpt["model"]["fc7.weight"], src.state["fc7.weight"])
    assert not np.isnan(ckpt["model"]["fc8.weight"].numpy()).any()
