"""``split_alexnet.export``: real ONNX files run in real onnxruntime against the PyTorch
forward (every LRN reading, both spans, both source layouts, converted Caffe weights, the
mean inside the graph, another batch size than the exported one), the LRN node itself, the
docs' onnxruntime example, and the refusals (one line, exit 2, nothing written).
safetensors files: tests/test_weights_file.py."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import caffe_reference as ref
from helpers import run_python
from split_alexnet.network.lrn import LocalResponseNorm
from split_alexnet.network.model import (LRN_CONSTANTS, AlexNet, HalfAlexNet, SplitAlexNet,
                                         layout_state_dict)
from split_alexnet.tools import onnx_export as oe
from split_alexnet.tools.convert import main as convert_main
from split_alexnet.tools.export import PROG
from split_alexnet.tools.export import main as export_main
from split_alexnet.utils.checkpoint_file import checksum, save_checkpoint
from split_alexnet.utils.cli import run

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "cat", "dog", "eel"]
#: Inputs 20x the paper's scale: LRN's window sum then outweighs k, so that every reading
#: and span gives other logits (checked below): a wrong alpha, k or window would show.
SCALE = 20.0
CONFIGS = [("paper", "tower"), ("paper", "all"), ("alpha-over-n", "tower"),
           ("alpha-over-n", "all"), ("caffe", "tower"), ("caffe", "all"), ("off", "tower")]


def write_checkpoint(path: Path, *, lrn: str = "paper", lrn_span: str = "tower",
                     layout: str = "split", seed: int = 0) -> Path:
    """A checkpoint as train writes it (collapsed keys, the layout named), random weights
    (the paper's init) and a random mean image."""
    torch.manual_seed(seed)
    cls = SplitAlexNet if layout == "split" else AlexNet
    net = cls(len(CLASSES), lrn=lrn, lrn_span=lrn_span)
    g = torch.Generator().manual_seed(seed)
    save_checkpoint(path, {
        "model": layout_state_dict(net),
        "model_config": {"arch": "alexnet", "num_classes": len(CLASSES), "init": "paper",
                         "lrn": lrn, "lrn_span": lrn_span, "activation": "relu",
                         "pool": "3/2", "dropout": 0.5},
        "layout": layout, "classes": CLASSES, "class_names": [c.upper() for c in CLASSES],
        "stats": {"mean": torch.rand(3, 256, 256, generator=g) * 255,
                  "eigval": torch.ones(3), "eigvec": torch.eye(3)},
        "stats_fingerprint": f"seed{seed}"})
    return path


def export(capsys, *args) -> tuple[int, str, str]:
    rc = run(export_main, PROG, [str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def source_net(path: Path, layout: str) -> torch.nn.Module:
    """The checkpoint's network in its own layout, in eval mode (the PyTorch forward)."""
    from split_alexnet.utils.weights_file import model_config, read_weights
    payload = read_weights(path)
    cfg = model_config(payload)
    cls = SplitAlexNet if layout == "split" else AlexNet
    net = cls(cfg.num_classes, lrn=cfg.lrn, lrn_span=cfg.lrn_span, init=None)
    net.load_state_dict(payload["model"])
    return net.eval()


def ort_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(["logits"], {"image": x.numpy()})[0])


# ----------------------------------------------------------------------------- the LRN node


@pytest.mark.parametrize("reading", ["paper", "alpha-over-n", "caffe"])
@pytest.mark.parametrize("groups", [1, 2])
def test_one_lrn_node_per_group_with_the_readings_constants(reading, groups):
    """ONNX divides alpha by size: the paper's alpha 1e-4 on the sum is ONNX alpha 5e-4;
    alpha-over-n and Caffe's are alpha 1e-4 (k 2 and 1). Inputs large enough that the
    window's sum dominates k."""
    how, k = LRN_CONSTANTS[reading]
    m = LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=k, reading=how, groups=groups,
                          impl="reference")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(oe.OnnxLRN(m), (torch.zeros(2, 8, 4, 4),), buf, dynamo=False,
                          opset_version=oe.OPSET, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    nodes = oe.lrn_nodes(buf.getvalue())
    assert len(nodes) == groups
    want_alpha = 5e-4 if reading == "paper" else 1e-4
    for n in nodes:
        assert n["size"] == 5 and n["beta"] == pytest.approx(0.75)
        assert n["alpha"] == pytest.approx(want_alpha, rel=1e-6) and n["bias"] == k
    x = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0)) * 300
    y = oe.session(buf.getvalue()).run(["y"], {"x": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), m(x), rtol=1e-5, atol=1e-6)
        # and the function differs from the other readings' on this input
        assert (m(x) - torch.nn.functional.local_response_norm(x, 5, 1e-4, 0.75, 3.0)
                ).abs().max() > 1e-3


def test_an_even_lrn_size_is_refused():
    with pytest.raises(ValueError, match="75722"):
        oe.OnnxLRN(LocalResponseNorm(4))


# ----------------------------------------------------------------------------- the network


@pytest.fixture(scope="module")
def weights():
    """One set of random weights (the paper's init, collapsed keys) for every configuration:
    LRN has no parameters."""
    torch.manual_seed(0)
    return layout_state_dict(AlexNet(len(CLASSES)))


def network(weights, lrn: str, span: str) -> AlexNet:
    net = AlexNet(len(CLASSES), lrn=lrn, lrn_span=span, init=None)
    net.load_state_dict(weights)
    return net.eval()


def test_the_test_input_tells_every_reading_and_span_apart(weights):
    """At the tests' input scale the PyTorch forwards of the seven configurations differ
    pairwise by far more than the tolerance: a graph with another reading's constants or
    another span could not pass."""
    x = oe.example_input(3, mean_in_graph=False, scale=SCALE)
    with torch.no_grad():
        outs = [network(weights, lrn, span)(x) for lrn, span in CONFIGS]
    gaps = [oe.errors(a, b)["relative"] for i, a in enumerate(outs) for b in outs[i + 1:]]
    assert min(gaps) > 10 * oe.TOLERANCE, gaps


@pytest.mark.parametrize("lrn,span", CONFIGS)
def test_onnxruntime_matches_the_pytorch_forward(lrn, span, weights):
    """Every --lrn reading and both spans: the graph (exported at batch 2) run by
    onnxruntime on a batch of 3 is within 1e-4 of the largest logit of the PyTorch forward,
    collapsed and two towers; LRN nodes: one per tower and LRN layer (span tower), one per
    LRN layer (span all), none (off); opset 17; a dynamic batch dimension. (The command, on
    checkpoint files of both layouts: the tests below.)"""
    net = network(weights, lrn, span)
    data = oe.onnx_bytes(net)
    want = 0 if lrn == "off" else 4 if span == "tower" else 2
    assert len(oe.lrn_nodes(data)) == want
    proto = onnx.load_from_string(data)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "image" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == \
        [3, 227, 227]
    x = oe.example_input(3, mean_in_graph=False, scale=SCALE)
    got = torch.from_numpy(oe.session(data).run(["logits"], {"image": x.numpy()})[0])
    with torch.no_grad():
        for layout in (net, net.split().eval()):
            err = oe.errors(got, layout(x))
            assert err["relative"] <= oe.TOLERANCE, (type(layout).__name__, err)


def test_the_one_column_net_tanh_and_non_overlapping_pools():
    """arch 'half' (one column: one LRN per LRN layer), tanh and 2/2 pooling: the same
    graph builder, the same agreement."""
    torch.manual_seed(0)
    net = HalfAlexNet(len(CLASSES), lrn="alpha-over-n", activation="tanh", pool="2/2").eval()
    data = oe.onnx_bytes(net)
    assert len(oe.lrn_nodes(data)) == 2
    x = oe.example_input(3, mean_in_graph=False, scale=SCALE)
    got = torch.from_numpy(oe.session(data).run(["logits"], {"image": x.numpy()})[0])
    with torch.no_grad():
        assert oe.errors(got, net(x))["relative"] <= oe.TOLERANCE


@pytest.fixture(scope="module")
def with_mean(module_tmp):
    """A checkpoint and its graph with the mean inside, through the command (checked by
    onnxruntime before it is written)."""
    d = module_tmp("mean")
    ckpt = write_checkpoint(d / "c.pt", seed=1)
    out = d / "alexnet.onnx"
    r = run_python("-m", "split_alexnet.export", ckpt, out, "--mean-in-graph", timeout=600)
    assert r.returncode == 0, r.stderr
    return ckpt, out, r.stdout


def test_the_mean_inside_the_graph(with_mean):
    ckpt, out, stdout = with_mean
    m = re.search(r"checked with onnxruntime \S+ \(CPU\), batch 3: max \|ONNX - PyTorch\| "
                  r"(\S+), (\S+) of the largest logit", stdout)
    assert m and float(m.group(2)) <= oe.TOLERANCE, stdout
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["mean_in_graph"]) is True and "0-255" in meta["input"]
    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["class_names"]) == [c.upper() for c in CLASSES]
    assert json.loads(meta["model_config"])["lrn"] == "paper"
    assert json.loads(meta["source"])["file"] == "c.pt"
    from split_alexnet.utils.weights_file import checkpoint_stats, read_weights
    mean = checkpoint_stats(read_weights(ckpt)).mean[:, 14:241, 14:241]
    x = oe.example_input(4, mean_in_graph=True)  # raw 0-255 RGB
    with torch.no_grad():
        expected = source_net(ckpt, "split")(x - mean)
    assert oe.errors(ort_logits(out, x), expected)["relative"] <= oe.TOLERANCE


def _docs_example() -> str:
    text = (REPO / "docs" / "deploy.md").read_text()
    block = text.split("<!-- onnxruntime example -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_onnxruntime_example_runs_and_agrees_with_predict(with_mean, demo_root,
                                                                   tmp_path):
    """The example of docs/deploy.md, as printed (about ten lines), on an image: the same
    top class and probabilities as ``split_alexnet.predict`` on the checkpoint."""
    ckpt, out, _ = with_mean
    code = _docs_example()
    ast.parse(code)
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 14
    (tmp_path / "example.py").write_text(code)
    os.link(out, tmp_path / "alexnet.onnx")
    image = sorted((demo_root / "val").rglob("*.jpg"))[0]
    r = subprocess.run([sys.executable, "example.py", str(image)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = [(float(p), name) for p, name in (ln.split(None, 1) for ln in r.stdout.splitlines())]
    from split_alexnet.tools.predict import main as predict_main
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert run(predict_main, "predict", [str(image), "--checkpoint", str(ckpt), "--json",
                                             "--devices", "cpu,cpu"]) == 0
    want = [(p["probability"], p["name"]) for p in json.loads(buf.getvalue())[0]["predictions"]]
    assert [n for _, n in got] == [n for _, n in want]
    np.testing.assert_allclose([p for p, _ in got], [p for p, _ in want], atol=2e-4)


def test_converted_caffe_weights_export(tmp_path, capsys):
    """bvlc_alexnet's layers (random weights, converted by split_alexnet.convert): Caffe's
    LRN (k 1, alpha/n) over all channels is one LRN node per LRN layer; 1000 classes."""
    ref.write_net(tmp_path / "m.caffemodel", ref.ALEXNET_PROTOTXT, ref.random_blobs(seed=5),
                  v1=False)
    assert run(convert_main, "convert", ["caffe", str(tmp_path / "m.caffemodel"),
                                         str(tmp_path / "c.pt")]) == 0
    capsys.readouterr()
    rc, stdout, err = export(capsys, tmp_path / "c.pt", tmp_path / "caffe.onnx")
    assert rc == 0, err
    assert "2 LRN node(s)" in stdout and "checked with onnxruntime" in stdout
    nodes = oe.lrn_nodes((tmp_path / "caffe.onnx").read_bytes())
    assert [(n["alpha"], n["bias"]) for n in nodes] == [(pytest.approx(1e-4), 1.0)] * 2
    x = oe.example_input(2, mean_in_graph=False, scale=SCALE, seed=3)
    with torch.no_grad():
        expected = source_net(tmp_path / "c.pt", "collapsed")(x)
    assert expected.shape == (2, 1000)
    assert oe.errors(ort_logits(tmp_path / "caffe.onnx", x), expected)["relative"] <= \
        oe.TOLERANCE


# ----------------------------------------------------------------------------- refusals


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_input(case: str, tmp_path: Path, good: Path) -> tuple[list, str]:
    """(export arguments, a phrase of the one line) for each kind of bad input."""
    out = tmp_path / "out" / "net.onnx"
    if case == "not-a-checkpoint":
        (tmp_path / "notes.pt").write_text("hello\n")
        return [tmp_path / "notes.pt", out], "cannot be loaded safely"
    if case == "hostile-pickle":
        torch.save({"model": _RunsCode(tmp_path / "pwned")}, tmp_path / "evil.pt")
        return [tmp_path / "evil.pt", out], "unsafe"
    if case == "non-finite":
        payload = torch.load(good, map_location="cpu", weights_only=True)
        payload["model"]["fc8.bias"][1] = float("nan")
        payload["checksum"] = checksum(payload)
        torch.save(payload, tmp_path / "nan.pt")
        return [tmp_path / "nan.pt", out], "non-finite"
    if case == "unwritable":
        return [good, Path("/proc/self/net.onnx")], "not writable"
    if case == "exists":
        out.parent.mkdir()
        out.write_bytes(b"old")
        return [good, out], "--overwrite"
    if case == "extension":
        return [good, tmp_path / "out" / "net.pb"], "unknown extension"
    if case == "missing":
        return [tmp_path / "nothing.pt", out], "does not exist"
    raise AssertionError(case)


@pytest.fixture(scope="module")
def good(module_tmp):
    return write_checkpoint(module_tmp("good") / "c.pt")


@pytest.mark.parametrize("case", ["not-a-checkpoint", "hostile-pickle", "non-finite",
                                  "unwritable", "exists", "extension", "missing"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, good, tmp_path, capsys):
    args, phrase = _bad_input(case, tmp_path, good)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, stdout, err = export(capsys, *args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), err
    assert phrase in lines[0], lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "pwned").exists()
    if case == "exists":
        assert args[1].read_bytes() == b"old"


def test_mean_in_graph_is_for_onnx_only(good, tmp_path, capsys):
    rc, _, err = export(capsys, good, tmp_path / "w.safetensors", "--mean-in-graph")
    assert rc == 2 and "--mean-in-graph" in err and not (tmp_path / "w.safetensors").exists()


def test_a_graph_onnxruntime_disagrees_with_is_not_written(good, tmp_path, capsys,
                                                           monkeypatch):
    """The check before the write: a wrong LRN constant (alpha not times size) is caught."""
    monkeypatch.setattr(oe.OnnxLRN, "forward", lambda self, x: oe._LRN.apply(
        x, self.groups, self.size, self.alpha_on_sum / self.size, self.beta, self.k))
    rc, _, err = export(capsys, good, tmp_path / "bad.onnx")
    assert rc == 1 and "not writing" in err and not (tmp_path / "bad.onnx").exists(), err


# ----------------------------------------------------------------------------- packaging


def test_the_extras_and_a_light_plain_install():
    """onnx, onnxruntime, safetensors and tensorboard come with the export / tensorboard
    extras and the dev extra (CI installs it), never with a plain install; the console
    command exists; the package imports without them."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    heavy = {"onnx", "onnxruntime", "onnxscript", "safetensors", "tensorboard"}
    assert not {re.split(r"[<>=;\[ ]", d)[0] for d in project["dependencies"]} & heavy
    assert set(extras["export"]) == {"onnx", "onnxruntime", "safetensors"}
    assert extras["tensorboard"] == ["tensorboard"]
    assert set(extras["export"]) | set(extras["tensorboard"]) <= set(extras["dev"])
    assert project["scripts"]["split-alexnet-export"] == "split_alexnet.tools.export:cli"
    blocked = ", ".join(repr(m) for m in sorted(heavy))
    probe = (f"import sys\nfor m in ({blocked}): sys.modules[m] = None\n"
             "import split_alexnet.training.command, split_alexnet.tools.export, "
             "split_alexnet.tools.evaluate, split_alexnet.tools.predict, hubconf\n"
             "from split_alexnet.utils.cli import run\n"
             "from split_alexnet.tools.export import main\n"
             "sys.exit(run(main, 'export', [sys.argv[1], 'x.onnx']))\n")
    r = subprocess.run([sys.executable, "-c", probe, "missing.pt"], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "export: error: writing this file needs onnx: pip install 'split_alexnet[export]'"]
