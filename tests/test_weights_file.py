"""safetensors weights files (``split_alexnet.export CKPT OUT.safetensors``): what they hold,
read by the safetensors library itself; every reader of weights takes them (--init-from,
evaluate, predict, visualize); a damaged or foreign file is one line. The hub entries that
load them: tests/test_hub.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from split_alexnet.data.dataset import find_classes
from split_alexnet.data.stats import load_stats
from split_alexnet.network.model import SplitAlexNet, collapsed_shapes, layout_state_dict
from split_alexnet.tools.evaluate import evaluate_checkpoint
from split_alexnet.tools.evaluate import main as evaluate_main
from split_alexnet.tools.export import PROG
from split_alexnet.tools.export import main as export_main
from split_alexnet.tools.predict import main as predict_main
from split_alexnet.tools.visualize import main as visualize_main
from split_alexnet.training.command import main as train_main
from split_alexnet.training.trainer import Trainer
from split_alexnet.training.options import parse_config
from split_alexnet.utils.checkpoint_file import load_checkpoint, save_checkpoint
from split_alexnet.utils.weights_file import (CheckpointError, FORMAT, read_weights,
                                            safetensors_bytes)
from split_alexnet.utils.cli import run

st = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402


@pytest.fixture(scope="module")
def files(demo_root, module_tmp):
    """A two-tower checkpoint of the demo's classes and statistics, and its .safetensors."""
    d = module_tmp("weights")
    stats = load_stats(demo_root, progress=False)
    classes = find_classes(demo_root / "train")
    torch.manual_seed(0)
    net = SplitAlexNet(len(classes), init="caffe", lrn="alpha-over-n")
    save_checkpoint(d / "c.pt", {
        "model": layout_state_dict(net),
        "model_config": {"arch": "alexnet", "num_classes": len(classes), "init": "caffe",
                         "lrn": "alpha-over-n", "lrn_span": "tower", "activation": "relu",
                         "pool": "3/2", "dropout": 0.5},
        "layout": "split", "classes": classes,
        "class_names": [f"class {c}" for c in classes],
        "stats": {"mean": stats.mean, "eigval": stats.eigval, "eigvec": stats.eigvec},
        "stats_fingerprint": stats.fingerprint})
    assert run(export_main, PROG, [str(d / "c.pt"), str(d / "w.safetensors")]) == 0
    return d / "c.pt", d / "w.safetensors"


def test_the_weights_only_under_the_collapsed_names_with_the_metadata(files):
    ckpt, path = files
    tensors = st.load_file(str(path))  # any safetensors reader
    shapes = collapsed_shapes(4)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    source = load_checkpoint(ckpt)
    for k, v in tensors.items():
        assert torch.equal(v, source["model"][k]), k
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT
    assert json.loads(meta["model_config"]) == source["model_config"]
    assert json.loads(meta["classes"]) == source["classes"]
    assert json.loads(meta["class_names"]) == source["class_names"]
    assert {"mean", "eigval", "eigvec", "checksum", "stats_fingerprint"} <= set(meta)
    back = read_weights(path)
    assert torch.equal(back["stats"]["mean"], source["stats"]["mean"])
    assert back["stats_fingerprint"] == source["stats_fingerprint"]


def test_evaluate_predict_and_visualize_read_it_like_the_checkpoint(files, demo_root, tmp_path,
                                                                    capsys):
    ckpt, path = files
    a = evaluate_checkpoint(ckpt, demo_root, devices="cpu,cpu", workers=0, progress=False)
    b = evaluate_checkpoint(path, demo_root, devices="cpu,cpu", workers=0, progress=False)
    assert a["center"] == b["center"]
    image = str(sorted((demo_root / "val").rglob("*.jpg"))[0])
    outs = []
    for src in (ckpt, path):
        capsys.readouterr()
        assert run(predict_main, "predict", [image, "--checkpoint", str(src), "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1] and outs[0][0]["predictions"][0]["name"].startswith("class ")
    assert run(visualize_main, "visualize", ["kernels", "--checkpoint", str(path), "--out",
                                             str(tmp_path / "k.png")]) == 0
    assert (tmp_path / "k.png").stat().st_size > 0


def test_init_from_a_safetensors_file(files, demo_root, tmp_path):
    """--init-from takes it: every layer loaded (the same classes keep fc8)."""
    _, path = files
    t = Trainer.setup(parse_config([
        "--data", str(demo_root), "--out", str(tmp_path / "run"), "--init-from", str(path),
        "--lrn", "alpha-over-n", "--devices", "cpu,cpu", "--batch-size", "8", "--workers",
        "0"]))
    try:
        state = layout_state_dict(t.net)
        source = read_weights(path)["model"]
        assert all(torch.equal(state[k], source[k]) for k in source)
        record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
        assert record["kind"] == "init_from" and record["from"] == str(path)
        assert record["reinit"] == []
    finally:
        t.lock.release()


def _damaged(case: str, good: Path, tmp_path: Path) -> Path:
    data = good.read_bytes()
    bad = tmp_path / f"{case}.safetensors"
    if case == "truncated":
        bad.write_bytes(data[:len(data) // 2])
    elif case == "flipped-weight":  # a byte of the last tensor's data
        b = bytearray(data)
        b[-5] ^= 0x40
        bad.write_bytes(bytes(b))
    elif case == "older-version":  # this project's file, of its format's version 1
        with safe_open(str(good), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        st.save_file(tensors, str(bad), metadata=dict(meta, format="split_alexnet/weights-v1"))
    elif case == "foreign":  # a safetensors file of someone else's network
        st.save_file({"conv1.weight": torch.zeros(96, 3, 11, 11)}, str(bad))
    elif case == "wrong-shape":  # this project's metadata, consistent, fc8 not 4 classes
        payload = read_weights(good)
        payload["model"]["fc8.weight"] = torch.zeros(7, 4096)
        bad.write_bytes(safetensors_bytes(payload))
    elif case == "non-finite":
        payload = read_weights(good)
        payload["model"]["conv2.bias"][0] = float("inf")
        bad.write_bytes(safetensors_bytes(payload))
    elif case == "garbage":
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return bad


@pytest.mark.parametrize("case,phrase", [
    ("truncated", "not a readable safetensors file"), ("flipped-weight", "checksum mismatch"),
    ("foreign", "not a split_alexnet weights file"), ("wrong-shape", "fc8.weight"),
    ("older-version", "of format 'split_alexnet/weights-v1', which this version does not read"),
    ("non-finite", "non-finite"), ("garbage", "not a readable safetensors file")])
def test_a_damaged_or_foreign_file_is_one_line(case, phrase, files, demo_root, tmp_path,
                                               capsys):
    _, good = files
    bad = _damaged(case, good, tmp_path)
    with pytest.raises(CheckpointError, match=phrase):
        read_weights(bad)
    capsys.readouterr()
    for main, prog, argv in (
            (export_main, PROG, [str(bad), str(tmp_path / "x.onnx")]),
            (evaluate_main, "evaluate", ["--checkpoint", str(bad), "--data", str(demo_root),
                                         "--devices", "cpu,cpu"])):
        assert run(main, prog, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and phrase in err[0], err
    assert not (tmp_path / "x.onnx").exists()
    assert run(train_main, "train", ["--data", str(demo_root), "--out", str(tmp_path / "r"),
                                       "--init-from", str(bad), "--devices", "cpu,cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train: error: --init-from") and phrase in err[0]
