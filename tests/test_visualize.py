"""visualize (Figures 3 and 4, curves), predict and the fc7 feature helper.

No training: one untrained full-size AlexNet with 4 classes is written as a checkpoint (module
fixture) and used on the generated demo folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_records
import split_alexnet.tools.predict as predict_mod
from split_alexnet.utils.checkpoint_file import (CheckpointError, checkpoint_stats,
                                                 load_checkpoint, save_checkpoint)
from split_alexnet.utils.cli import run
from split_alexnet.data.dataset import CropFolder, find_classes
from split_alexnet.data.stats import load_stats
from split_alexnet.data.augment import finish_batch
from split_alexnet.tools.evaluate import load_model
from split_alexnet.tools.features import fc7_features, forward_with_features
from split_alexnet.network.model import AlexNet, ModelConfig, layout_state_dict
from split_alexnet.tools.visualize import (KernelGrid, RetrievalLayout, colourfulness, curve_series,
                                     kernel_image, retrieval_image, retrieve,
                                     tower_colourfulness)
from split_alexnet.tools.visualize import main as viz_main

PROG = "split_alexnet.visualize"


def write_ckpt(path: Path, model: AlexNet, classes, stats, **extra) -> Path:
    """A checkpoint as the tools read it: the network in "model_config" (the flat config's
    fields and the class count)."""
    config = {"arch": "alexnet", "lrn": "paper", "activation": "relu", "pool": "3/2",
              "dropout": 0.5}
    save_checkpoint(path, {
        "model": layout_state_dict(model),
        "model_config": dataclasses.asdict(ModelConfig(num_classes=len(classes), **config)),
        "config": config,
        "classes": list(classes),
        "stats": {"mean": stats.mean, "eigval": stats.eigval, "eigvec": stats.eigvec},
        "stats_fingerprint": stats.fingerprint, **extra})
    return path


@pytest.fixture(scope="module")
def ckpt(demo_root, module_tmp) -> Path:
    torch.manual_seed(0)
    stats = load_stats(demo_root, progress=False)
    model = AlexNet(num_classes=4, init="caffe")
    return write_ckpt(module_tmp("ckpt") / "c.pt", model,
                      find_classes(demo_root / "train"), stats)


# ----------------------------------------------------------------------------- Figure 3

def spot_weight(n: int = 96) -> torch.Tensor:
    """Kernel i: zero except one pixel at (i // 11 % 11, i % 11), in channel i % 3."""
    w = torch.zeros(n, 3, 11, 11)
    for i in range(n):
        w[i, i % 3, (i // 11) % 11, i % 11] = 1.0
    return w


def test_kernel_grid_places_every_kernel():
    img, grid = kernel_image(spot_weight(), cols=16, scale=4)
    assert grid.size == (738, 312) == img.size  # 2 blocks of 3 rows x 16, 44 px cells, labels
    a = np.asarray(img)
    for i in range(96):
        x0, y0, x1, y1 = grid.box(i)
        cell = a[y0:y1, x0:x1]
        r, c = (i // 11) % 11, i % 11
        spot = cell[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4]
        want = np.zeros(3, np.uint8)
        want[i % 3] = 255
        assert (spot == want).all(), i
        mask = np.ones((44, 44), bool)
        mask[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = False
        assert (cell[mask] == 0).all(), i
    # tower 0 on top, tower 1 below the black separator
    sep_y = grid.top(0) + grid.block[1]
    assert grid.box(47)[3] < sep_y < grid.top(1) <= grid.box(48)[1]
    assert (a[sep_y:sep_y + grid.sep] == 0).all()
    assert (a[0, :] == 255).all()  # white gap around the cells
    for t in (0, 1):  # each block's band above it names its tower in dark text
        band = a[grid.top(t) - grid.label:grid.top(t)]
        assert (band < 100).all(axis=2).sum() > 20, t


def test_kernel_grid_other_shapes():
    g = KernelGrid(cols=8)
    assert (g.rows, g.size) == (6, (8 * 44 + 9 * 2, 2 * (14 + 6 * 44 + 7 * 2) + 4))
    img, g1 = kernel_image(torch.randn(48, 3, 11, 11), towers=1, cols=8, scale=2)
    assert img.size == g1.size == (8 * 22 + 9 * 2, 14 + 6 * 22 + 7 * 2)


def test_colourfulness_grey_vs_colour_and_tower_order():
    g = torch.Generator().manual_seed(0)
    grey = torch.randn(48, 1, 11, 11, generator=g).expand(48, 3, 11, 11)
    # saturated: every pixel one primary colour (random), plus a little grey noise
    pick = torch.randint(0, 3, (48, 1, 11, 11), generator=g)
    colour = (torch.arange(3)[None, :, None, None] == pick).double() \
        + 0.05 * torch.randn(48, 1, 11, 11, generator=g, dtype=torch.float64)
    assert colourfulness(grey).abs().max() < 1e-12
    assert colourfulness(colour).min() > 0.3
    assert colourfulness(torch.randn(48, 3, 11, 11, generator=g)).mean() > 0.05
    pure = torch.zeros(1, 3, 11, 11)
    pure[:, 0] = 1.0  # pure red everywhere: normalised (1, 0, 0) at every pixel
    assert colourfulness(pure).item() == pytest.approx(2 ** 0.5 / 3)
    t = tower_colourfulness(torch.cat([grey, colour]))
    assert t[0] < 1e-12 < 0.3 < t[1]
    t = tower_colourfulness(torch.cat([colour, grey]))
    assert t[1] < 1e-12 < 0.3 < t[0]


def test_kernels_cli(ckpt, tmp_path, capsys):
    out = tmp_path / "k.png"
    assert run(viz_main, PROG, ["kernels", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert Image.open(out).size == (738, 312)
    text = capsys.readouterr().out
    assert "tower 0 (kernels 0-47)" in text and "tower 1 (kernels 48-95)" in text
    assert run(viz_main, PROG, ["kernels", "--checkpoint", str(tmp_path / "no.pt"),
                                "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_a_checkpoint_without_model_config_is_refused_in_one_line(ckpt, demo_root, tmp_path,
                                                                  capsys):
    """The network is read from "model_config" alone: the fixture's checkpoint without it
    (as written before that key existed) is refused, by the loader and by every tool."""
    old = tmp_path / "old.pt"
    payload = load_checkpoint(ckpt)
    del payload["model_config"]
    save_checkpoint(old, payload)
    want = f"checkpoint {old} has no model_config: it does not say which network it holds"
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(old)
    assert str(e.value) == want
    img = sorted((demo_root / "val").rglob("*.jpg"))[0]
    for main, prog, argv in (
            (viz_main, PROG, ["kernels", "--checkpoint", str(old), "--out",
                              str(tmp_path / "k.png")]),
            (predict_mod.main, predict_mod.PROG, [str(img), "--checkpoint", str(old)])):
        assert run(main, prog, argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"{prog}: error: {want}"]
    assert not (tmp_path / "k.png").exists()


# ----------------------------------------------------------------------------- fc7

def test_fc7_features_same_in_both_layouts(ckpt, demo_root):
    single, c, devs = load_model(ckpt, single_device=True)
    split, _, _ = load_model(ckpt, devices="cpu,cpu")
    stats = checkpoint_stats(c)
    ds = CropFolder(demo_root / "val", c["classes"], mode="center")
    from split_alexnet.data.dataset import collate
    x = finish_batch(collate([ds[i] for i in (0, 5, 9)]), stats, "cpu")
    f1 = fc7_features(single, x)
    f2 = fc7_features(split, x)
    assert f1.shape == (3, 4096) and (f1 >= 0).all() and (f1 > 0).any()
    torch.testing.assert_close(f1, f2)
    feats, logits = forward_with_features(single, x)
    torch.testing.assert_close(feats, f1)
    torch.testing.assert_close(single.fc8(f1), logits)
    assert (f1[0] - f1[1]).abs().max() > 0  # features tell images apart


# ----------------------------------------------------------------------------- Figure 4

@pytest.fixture(scope="module")
def self_root(demo_root, module_tmp) -> tuple[Path, Path]:
    """The demo set with one val image copied into train/ (under another name)."""
    root = module_tmp("self") / "data"
    shutil.copytree(demo_root / "train", root / "train")
    shutil.copytree(demo_root / "val", root / "val")
    cls = find_classes(root / "val")[2]
    src = sorted((root / "val" / cls).iterdir())[1]
    dst = root / "train" / cls / ("zz_copy_of_" + src.name)
    shutil.copyfile(src, dst)
    return root, dst


def test_retrieval_finds_itself_first(ckpt, self_root):
    root, copy = self_root
    model, c, devs = load_model(ckpt, single_device=True)
    val = CropFolder(root / "val", find_classes(root / "val"), mode="center")
    q = [i for i, (p, _) in enumerate(val.samples) if Path(p).name in copy.name][0]
    res = retrieve(model, c, root, devs[0], queries=[q, 0], neighbours=6, batch_size=7,
                   progress=False)
    assert len(res) == 2 and all(len(r["neighbours"]) == 6 for r in res)
    first = res[0]["neighbours"][0]
    assert Path(first["path"]) == copy and first["label"] == copy.parent.name
    second = res[0]["neighbours"][1]["distance"]
    assert first["distance"] <= 1e-3 * second
    for r in res:
        d = [n["distance"] for n in r["neighbours"]]
        assert d == sorted(d) and d[0] >= 0
    img, lay = retrieval_image(res, 6, tile=64)
    assert img.size == lay.size == (6 + 64 + 16 + 6 * (64 + 6), 18 + 2 * (64 + 26 + 6) + 6)
    # the query's thumbnail sits in column 0 of its row
    x0, y0, x1, y1 = lay.box(0, 0)
    assert np.asarray(img)[y0:y1, x0:x1].std() > 0


def test_retrieval_cli_split_layout(ckpt, self_root, tmp_path, capsys):
    root, _ = self_root
    out = tmp_path / "r.png"
    args = ["retrieval", "--checkpoint", str(ckpt), "--data", str(root), "--out", str(out),
            "--queries", "2", "--neighbours", "3", "--workers", "0", "--tile", "48",
            "--devices", "cpu,cpu"]
    assert run(viz_main, PROG, args) == 0
    assert Image.open(out).size == RetrievalLayout(2, 3, tile=48).size
    assert "neighbours share the query's class" in capsys.readouterr().out


# ----------------------------------------------------------------------------- curves

def write_run(path: Path, n: int = 10, slope: float = 0.05) -> Path:
    recs = [{"kind": "train", "step": s, "loss": 2.0 - s * 0.1, "top1_err": 0.9 - slope * s}
            for s in range(1, n + 1)]
    recs += [{"kind": "val", "step": s, "loss": 2.0, "top1_err": 0.95 - slope * s,
              "top5_err": 0.5} for s in (5, 10)]
    recs += [{"kind": "resume", "step": 6}]
    return write_records(path, recs)


def test_curves(tmp_path, capsys):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", slope=0.02)
    s = curve_series([a, b])
    assert [lbl for lbl, _, _ in s] == ["a: train (batches)", "a: val (centre crop)",
                                        "b: train (batches)", "b: val (centre crop)"]
    assert s[1][1] == [5.0, 10.0] and s[1][2] == pytest.approx([0.7, 0.45])
    out = tmp_path / "c.png"
    assert run(viz_main, PROG, ["curves", str(a), str(b), "--out", str(out)]) == 0
    assert Image.open(out).size == (800, 500)
    assert run(viz_main, PROG, ["curves", str(a), "--out", str(out), "--size", "640x400",
                                "--metric", "loss"]) == 0
    assert Image.open(out).size == (640, 400)
    capsys.readouterr()
    assert run(viz_main, PROG, ["curves", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl" in err[0]


def test_curves_of_the_learning_rate_on_a_log_axis(tmp_path, capsys):
    recs = [{"kind": "train", "step": s, "loss": 2.0, "top1_err": 0.5,
             "lr": 0.01 if s <= 5 else 0.001} for s in range(1, 11)]
    recs += [{"kind": "val", "step": 10, "loss": 2.0, "top1_err": 0.5, "lr": 0.001}]
    a = write_records(tmp_path / "a", recs)
    s = curve_series([a], "lr")
    assert s[0][2] == [0.01] * 5 + [0.001] * 5 and s[1][2] == [0.001]
    lin, log = tmp_path / "lin.png", tmp_path / "log.png"
    assert run(viz_main, PROG, ["curves", str(a), "--out", str(lin), "--metric", "lr"]) == 0
    assert run(viz_main, PROG, ["curves", str(a), "--out", str(log), "--metric", "lr",
                                "--log-y"]) == 0
    # On the log axis the drop by 10 spans the plot; on the linear one 0.001 sits near 0.
    def rows_with_line(path):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        return [y for y in range(h) if any(img.getpixel((x, y)) == (31, 119, 180)
                                           for x in range(80, w - 30, 3))]
    assert max(rows_with_line(log)) - min(rows_with_line(log)) > 300
    assert "learning rate (log scale)" not in capsys.readouterr().err
    b = write_run(tmp_path / "b")  # its error reaches 0.4 and its loss 1.0: all above 0
    assert run(viz_main, PROG, ["curves", str(b), "--out", str(log), "--metric", "loss",
                                "--log-y"]) == 0
    zero = write_records(tmp_path / "z", [{"kind": "train", "step": 1, "loss": 0.0,
                                           "top1_err": 0.0}])
    capsys.readouterr()
    assert run(viz_main, PROG, ["curves", str(zero), "--out", str(log), "--metric", "loss",
                                "--log-y"]) == 2
    assert "--log-y needs values above 0; train (batches) has 0" in capsys.readouterr().err


def test_compare_runs_logged_at_different_intervals_per_epoch(tmp_path, capsys):
    """Run a logs every 3 steps, run b every 4, 10 steps per epoch: they share no step but
    the epochs' last ones (10, 20); the table of settings names the difference."""
    from split_alexnet.tools.compare import main as compare_main
    runs = {}
    for name, every, lr in (("a", 3, 0.01), ("b", 4, 0.02)):
        steps = sorted({s for s in range(1, 21) if s % every == 0} | {10, 20})
        recs = [{"kind": "train", "step": s, "epoch": (s - 1) // 10 + 1, "loss": s * lr,
                 "top1_err": 0.5} for s in steps]
        recs += [{"kind": "val", "step": s, "epoch": s // 10, "loss": 1.0, "top1_err": 0.5,
                  "top5_err": 0.1} for s in (10, 20)]
        runs[name] = write_records(tmp_path / name, recs)
        (runs[name] / "config.json").write_text(json.dumps(
            {"log_interval": every, "lr": lr, "seed": 0, "out": str(runs[name])}))
    capsys.readouterr()
    assert run(compare_main, "compare", [str(runs["a"]), str(runs["b"])]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "settings that differ:" and lines[1].split() == ["flag", "a", "b"]
    assert lines[2].split() == ["--log-interval", "3", "4"]
    assert lines[3].split() == ["--lr", "0.01", "0.02"] and "--seed" not in out
    assert "compared at each epoch's last step" in out
    assert "train loss: 2 shared steps, largest difference 0.2 at step 20" in out


def test_one_metrics_reader_for_every_tool(tmp_path, capsys):
    """visualize curves and compare read metrics.jsonl with the same reader: a damaged line
    inside the records (not a torn last one, which is skipped) is one error line naming the
    file and the line."""
    from split_alexnet.tools.compare import main as compare_main
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    with open(a / "metrics.jsonl", "a") as f:  # 13 good lines, half of one, a good one
        f.write('{"kind": "train", "st\n{"kind": "train", "step": 99, "top1_err": 0.5}\n')
    capsys.readouterr()
    for main, argv in ((viz_main, ["curves", str(a), "--out", str(tmp_path / "c.png")]),
                       (compare_main, [str(a), str(b)])):
        assert run(main, PROG, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith(f"{a / 'metrics.jsonl'}:14 is not valid JSON")


# ----------------------------------------------------------------------------- predict

def predict_cli(*args) -> int:
    return run(predict_mod.main, predict_mod.PROG, [str(a) for a in args])


def test_evaluate_per_class_writes_errors_and_the_confusion_matrix(ckpt, demo_root, tmp_path,
                                                                   capsys):
    import csv
    from split_alexnet.tools.evaluate import main as evaluate_main
    out = tmp_path / "pc"
    assert run(evaluate_main, "evaluate", ["--checkpoint", str(ckpt), "--data", str(demo_root),
                                           "--single-device", "--workers", "0",
                                           "--per-class", str(out), "--json",
                                           str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    classes = find_classes(demo_root / "train")
    rows = list(csv.DictReader(open(out / "per_class.csv")))
    assert [r["class"] for r in rows] == classes and all(r["images"] == "4" for r in rows)
    conf = list(csv.reader(open(out / "confusion.csv")))
    assert conf[0][1:] == classes and [r[0] for r in conf[1:]] == classes
    matrix = [[int(v) for v in r[1:]] for r in conf[1:]]
    assert [sum(r) for r in matrix] == [4] * 4
    for r, row in zip(rows, matrix):  # each class's error is its row off the diagonal
        i = classes.index(r["class"])
        assert float(r["top1_err"]) == pytest.approx((4 - row[i]) / 4)
    result = json.loads((tmp_path / "r.json").read_text())
    wrong = sum(sum(row) - row[i] for i, row in enumerate(matrix))
    assert result["center"]["top1_err"] == pytest.approx(wrong / 16)
    assert Image.open(out / "confusion.png").size == (128, 128)
    assert "per class (" in text and "the worst:" in text
    (center,) = [ln.split() for ln in text.splitlines() if ln.startswith("center")]
    assert center[3] == "-"  # top-5 of 4 classes: always 0, not shown


def test_evaluate_names_an_unreadable_image_in_one_plain_line(ckpt, demo_root, tmp_path,
                                                              capsys):
    import shutil
    from split_alexnet.tools.evaluate import main as evaluate_main
    root = tmp_path / "d"
    shutil.copytree(demo_root / "val", root / "val")
    bad = sorted((root / "val").rglob("*.jpg"))[0]
    bad.write_bytes(b"not a jpeg")
    capsys.readouterr()
    assert run(evaluate_main, "evaluate", ["--checkpoint", str(ckpt), "--data", str(root),
                                           "--single-device", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping unreadable image: {bad}\n" in err
    assert "RuntimeWarning" not in err and ".py:" not in err


def test_predict_takes_a_folder_of_images(ckpt, demo_root, tmp_path, capsys):
    folder = demo_root / "val" / sorted(p.name for p in (demo_root / "val").iterdir())[0]
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    assert predict_cli(folder, "--checkpoint", ckpt, "--json", "--top", "2") == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert predict_cli(*files, "--checkpoint", ckpt, "--json", "--top", "2") == 0
    assert from_folder == json.loads(capsys.readouterr().out) and len(from_folder) == len(files)
    (tmp_path / "empty").mkdir()
    assert predict_cli(tmp_path / "empty", "--checkpoint", ckpt) == 2
    assert f"{tmp_path / 'empty'} is a folder without image files" in capsys.readouterr().err


def test_predict_json_and_table(ckpt, demo_root, capsys):
    imgs = sorted((demo_root / "val").rglob("*.jpg"))[:3]
    assert predict_cli(*imgs, "--checkpoint", ckpt, "--json", "--top", "3") == 0
    res = json.loads(capsys.readouterr().out)
    classes = find_classes(demo_root / "train")
    assert [r["image"] for r in res] == [str(p) for p in imgs]
    for r in res:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-6
        assert all(p["name"] == p["class"] and p["class"] in classes for p in r["predictions"])
    # --top larger than the class count: all 4 classes, summing to 1; ten crops
    assert predict_cli(imgs[0], "--checkpoint", ckpt, "--json", "--top", "10",
                       "--ten-crop", "--devices", "cpu,cpu") == 0
    r = json.loads(capsys.readouterr().out)[0]
    assert len(r["predictions"]) == 4 and r["crops"] == "ten"
    assert sum(p["probability"] for p in r["predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert predict_cli(imgs[0], "--checkpoint", ckpt) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(imgs[0]) and len(out) == 5


def test_predict_matches_evaluation_pipeline(ckpt, demo_root):
    model, c, devs = load_model(ckpt, single_device=True)
    ds = CropFolder(demo_root / "val", c["classes"], mode="center")
    from split_alexnet.data.dataset import collate
    x = finish_batch(collate([ds[i] for i in (0, 7)]), checkpoint_stats(c), "cpu")
    want = model(x).softmax(1)
    _, arrays = predict_mod.load_images([ds.samples[0][0], ds.samples[7][0]])
    got = predict_mod.predict(model, c, arrays, devs[0])
    torch.testing.assert_close(got, want)


def test_imagenet_names_without_download(monkeypatch):
    def no_net(*a, **k):
        raise AssertionError("network access")
    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", no_net)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_net)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_net)
    monkeypatch.setattr(predict_mod, "_IMAGENET", None)
    w = predict_mod.ILSVRC2012_WNIDS
    assert len(w) == len(set(w)) == 1000 and list(w) == sorted(w)
    names = predict_mod.class_names({"classes": ["n01440764", "n02123045", "n15075141"]})
    assert names == ["tench", "tabby", "toilet tissue"]
    # the checkpoint's own names win; folder names otherwise
    assert predict_mod.class_names({"classes": ["n01440764"], "class_names": ["Fish"]}) == ["Fish"]
    assert predict_mod.class_names({"classes": ["circle", "n01440764"]}) == ["circle",
                                                                            "n01440764"]


def test_predict_imagenet_names_in_output(demo_root, tmp_path, capsys):
    torch.manual_seed(1)
    stats = load_stats(demo_root, progress=False)
    wnids = ["n01440764", "n01443537", "n01484850", "n15075141"]
    c = write_ckpt(tmp_path / "w.pt", AlexNet(num_classes=4, init="caffe"), wnids, stats)
    img = sorted((demo_root / "val").rglob("*.jpg"))[0]
    assert predict_cli(img, "--checkpoint", c, "--json", "--top", "4") == 0
    preds = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert {(p["class"], p["name"]) for p in preds} == {
        ("n01440764", "tench"), ("n01443537", "goldfish"),
        ("n01484850", "great white shark"), ("n15075141", "toilet tissue")}


def test_predict_unreadable(ckpt, demo_root, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = sorted((demo_root / "val").rglob("*.jpg"))[0]
    assert predict_cli(good, bad, "--checkpoint", ckpt) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and err[0].startswith("split_alexnet.predict")
    assert predict_cli(tmp_path / "missing.png", "--checkpoint", ckpt) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert predict_cli(good, bad, "--checkpoint", ckpt, "--json", "--skip-unreadable") == 0
    cap = capsys.readouterr()
    assert [r["image"] for r in json.loads(cap.out)] == [str(good)]
    assert "skipped" in cap.err
