"""Converting Caffe's bvlc_alexnet: synthetic ``.caffemodel`` files in both layer formats (the
current ``layer`` and the V1 ``layers``), with bvlc_alexnet's layer names and blob shapes and
random weights, checked against an independent float64 implementation of Caffe's layers
(tests/caffe_reference.py). No network access: no real Caffe file is read here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import caffe_reference as ref
from helpers import run_main, run_python
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.data.images import load_rgb256
from split_alexnet.network.lrn import LocalResponseNorm
from split_alexnet.network.model import LRN_CHOICES, AlexNet, SplitAlexNet, collapse_state_dict
from split_alexnet.tools import convert, predict
from split_alexnet.tools.caffe import parse_net
from split_alexnet.tools.evaluate import load_model
from split_alexnet.tools.evaluate import main as evaluate_main
from split_alexnet.tools.predict import ILSVRC2012_WNIDS
from split_alexnet.tools.visualize import KernelGrid
from split_alexnet.tools.visualize import main as visualize_main
from split_alexnet.utils.checkpoint_file import load_checkpoint, save_checkpoint
from split_alexnet.utils.cli import run

CROP = slice(14, 14 + 227)  # the 227 centre crop of a 256 image
TOL = 1e-5  # float32 network vs float64 reference: max |difference| <= TOL * max |logit|
# (measured here: 1.2e-6; the towers' LRN instead of Caffe's: 3e-2)


@pytest.fixture(scope="module")
def caffe_files(module_tmp):
    """One set of random weights written as a current-format and a V1 .caffemodel, a mean
    BlobProto (1x3x256x256, BGR, different in every channel), and both converted: the
    current one by ``python -m split_alexnet.convert`` with ``--mean``, the V1 one in-process
    with Caffe's per-channel mean."""
    d = module_tmp("caffe")
    blobs = ref.random_blobs(seed=0)
    rng = np.random.default_rng(1)
    mean = (rng.uniform(90, 130, (3, 256, 256)) + np.array([0, 10, 20])[:, None, None]
            ).astype(np.float32)  # BGR
    ref.write_net(d / "new.caffemodel", ref.ALEXNET_PROTOTXT, blobs, v1=False)
    ref.write_net(d / "v1.caffemodel", ref.ALEXNET_PROTOTXT, blobs, v1=True)
    ref.write_blob(d / "mean.binaryproto", mean[None])
    r = run_python("-m", "split_alexnet.convert", "caffe", d / "new.caffemodel", d / "new.pt",
                   "--mean", d / "mean.binaryproto", timeout=600)
    assert r.returncode == 0, r.stderr
    assert run(convert.main, convert.PROG, ["caffe", str(d / "v1.caffemodel"),
                                            str(d / "v1.pt")]) == 0
    return SimpleNamespace(dir=d, blobs=blobs, mean=mean, stdout=r.stdout)


@pytest.fixture(scope="module")
def images():
    """Two random RGB images, 0-255, 256x256."""
    return np.random.default_rng(2).integers(0, 256, (2, 3, 256, 256)).astype(np.float32)


@pytest.fixture(scope="module")
def caffe_logits(caffe_files, images):
    """fc8 of the float64 reference: the images as Caffe reads them, BGR minus the BGR mean."""
    bgr = images[:, ::-1, CROP, CROP] - caffe_files.mean[None, :, CROP, CROP]
    return ref.bvlc_alexnet(caffe_files.blobs, bgr)


def loaded(path: Path) -> tuple[AlexNet, dict]:
    ckpt = load_checkpoint(path)  # torch.load(weights_only=True) and the checksum
    model = AlexNet(init=None)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def logits(model: AlexNet, ckpt: dict, images: np.ndarray) -> np.ndarray:
    """Our pipeline's input: RGB minus the checkpoint's (RGB) mean, centre crop."""
    x = torch.from_numpy(images[:, :, CROP, CROP]) - ckpt["stats"]["mean"][:, CROP, CROP]
    with torch.no_grad():
        return model(x).double().numpy()


def caffe_lrn(groups: int = 1) -> LocalResponseNorm:
    """Caffe's LRN through the public module: window 5, alpha/n, k=1, beta 0.75; groups=1 is
    one window across all channels (Caffe), groups=2 each tower's half on its own."""
    return LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0, reading="alpha-over-n",
                             impl="reference", groups=groups)


# ----------------------------------------------------------------------------- conversion

def test_both_formats_convert_to_a_checkpoint_with_caffes_weights(caffe_files):
    new = load_checkpoint(caffe_files.dir / "new.pt")
    old = load_checkpoint(caffe_files.dir / "v1.pt")
    with torch.device("meta"):
        keys = set(AlexNet(init=None).state_dict())
    assert set(new["model"]) == keys
    for name, (w, b) in caffe_files.blobs.items():
        want = np.ascontiguousarray(w[:, ::-1]) if name == "conv1" else w  # BGR -> RGB
        assert torch.equal(new["model"][f"{name}.weight"], torch.from_numpy(want)), name
        assert torch.equal(new["model"][f"{name}.bias"], torch.from_numpy(b)), name
    assert all(torch.equal(new["model"][k], old["model"][k]) for k in keys)
    for key in ("optimizer", "schedule", "progress", "rng"):
        assert key not in new  # no training state: a converted checkpoint
    assert new["config"] == {"arch": "alexnet", "num_classes": 1000, "lrn": "caffe",
                             "lrn_span": "all", "activation": "relu", "pool": "3/2",
                             "dropout": 0.5}
    assert new["layout"] == "collapsed"
    assert new["classes"] == list(ILSVRC2012_WNIDS) == sorted(new["classes"])
    assert len(new["classes"]) == 1000 and new["class_names"][0] == "tench"
    assert new["class_metadata"][1] == {"index": 1, "wnid": "n01443537", "name": "goldfish",
                                        "source_index": 1}
    assert torch.equal(new["stats"]["eigval"], torch.zeros(3))
    assert torch.equal(new["stats"]["eigvec"], torch.eye(3))
    assert isinstance(new["code_version"], str) and new["torch_version"] == torch.__version__


def test_mean_image_is_reordered_to_rgb_or_defaults_to_caffes_channel_mean(caffe_files):
    new = load_checkpoint(caffe_files.dir / "new.pt")
    old = load_checkpoint(caffe_files.dir / "v1.pt")
    m = new["stats"]["mean"]
    assert m.dtype == torch.float32 and tuple(m.shape) == (3, 256, 256)
    assert torch.equal(m, torch.from_numpy(caffe_files.mean[::-1].copy()))
    d = old["stats"]["mean"]  # no --mean: B 104, G 117, R 123 everywhere, as RGB
    assert torch.equal(d, torch.tensor([123.0, 117.0, 104.0])[:, None, None].expand(3, 256, 256))
    assert new["stats_fingerprint"] != old["stats_fingerprint"]


def test_source_records_the_files_and_their_sha1(caffe_files):
    d = caffe_files.dir
    new, old = load_checkpoint(d / "new.pt")["source"], load_checkpoint(d / "v1.pt")["source"]
    assert new["format"] == "caffe" and new["file"] == "new.caffemodel"
    assert new["sha1"] == hashlib.sha1((d / "new.caffemodel").read_bytes()).hexdigest()
    assert new["proto"] == "layer" and old["proto"] == "layers (V1)"
    assert new["zoo_file"] is False and new["net_name"] == "AlexNet"
    assert new["mean"]["sha1"] == hashlib.sha1((d / "mean.binaryproto").read_bytes()).hexdigest()
    assert old["mean"] == {"per_channel_bgr": [104.0, 117.0, 123.0]}
    lines = caffe_files.stdout.splitlines()
    assert len(lines) == 3 and "not the model zoo's bvlc_alexnet.caffemodel" in lines[0]
    assert lines[2].startswith(f"wrote {d / 'new.pt'}: the collapsed AlexNet, 60,965,224 ")


def test_converted_network_computes_caffes_function(caffe_files, images, caffe_logits):
    """Compared: fc8 of our collapsed AlexNet from the converted checkpoint, its LRN module
    replaced by Caffe's (one window across all channels, k=1, alpha/n; :func:`caffe_lrn`),
    on RGB minus the RGB mean; and the float64 reference of Caffe's layers on the same images
    as BGR minus the BGR mean. Then the same net with the towers' LRN (each half on its own,
    Caffe's k and alpha/n): only windows crossing the tower boundary differ, and that must
    show far above the tolerance, or the first comparison would prove nothing about LRN."""
    model, ckpt = loaded(caffe_files.dir / "new.pt")
    scale = np.abs(caffe_logits).max()
    model.lrn = caffe_lrn(groups=1)
    err = np.abs(logits(model, ckpt, images) - caffe_logits).max()
    assert err <= TOL * scale, (err, scale)
    model.lrn = caffe_lrn(groups=2)
    boundary = np.abs(logits(model, ckpt, images) - caffe_logits).max()
    assert boundary > 100 * TOL * scale, (boundary, scale)


def test_evaluate_loads_the_converted_checkpoint_with_caffes_lrn(caffe_files, images,
                                                                 caffe_logits):
    """Both layouts, as the tools build them from the checkpoint's own config (lrn 'caffe',
    lrn_span 'all'), compute Caffe's function; the split layout sends the LRN halo."""
    assert "caffe" in LRN_CHOICES
    scale = np.abs(caffe_logits).max()
    model, ckpt, _ = load_model(caffe_files.dir / "new.pt", single_device=True)
    assert isinstance(model, AlexNet) and model.lrn.groups == 1 and model.lrn.k == 1.0
    collapsed = logits(model.cpu(), ckpt, images)
    assert np.abs(collapsed - caffe_logits).max() <= TOL * scale
    split, _, _ = load_model(caffe_files.dir / "new.pt", devices="cpu,cpu")
    assert isinstance(split, SplitAlexNet)
    assert np.array_equal(logits(split, ckpt, images), collapsed)  # bitwise, on the CPU
    halo = [(t.layer, t.src, t.dst, t.shape, t.bytes) for t in split.traffic[:4]]
    assert halo == [("norm1", 1, 0, (2, 2, 55, 55), 2 * 2 * 55 * 55 * 4),
                    ("norm1", 0, 1, (2, 2, 55, 55), 2 * 2 * 55 * 55 * 4),
                    ("norm2", 1, 0, (2, 2, 27, 27), 2 * 2 * 27 * 27 * 4),
                    ("norm2", 0, 1, (2, 2, 27, 27), 2 * 2 * 27 * 27 * 4)]
    assert [t.layer for t in split.traffic[4:]] == ["conv3"] * 2 + ["fc6"] * 2 + ["fc7"] * 2 \
        + ["fc8"]


def test_conv1_reads_rgb_after_conversion(caffe_files):
    """Caffe's conv1 filter 0 is nonzero only on its channel 0 (blue), filter 1 only on
    channel 2 (red): converted, filter 0 answers a pure blue RGB patch and not a red one."""
    model, ckpt = loaded(caffe_files.dir / "new.pt")
    patch = {c: torch.zeros(1, 3, 11, 11) for c in ("red", "blue")}
    patch["red"][:, 0] = 255.0   # RGB order
    patch["blue"][:, 2] = 255.0
    with torch.no_grad():
        red, blue = (model.conv1(patch[c])[0, :2, 0, 0] for c in ("red", "blue"))
    full = 255.0 * 0.01 * 121  # every weight 0.01 on the 11x11 window of one channel
    assert blue[0].item() == pytest.approx(full, rel=1e-5) and blue[1].item() == 0.0
    assert red[1].item() == pytest.approx(full, rel=1e-5) and red[0].item() == 0.0
    caffe_w = caffe_files.blobs["conv1"][0]
    for c in range(3):  # our RGB channel c is Caffe's BGR channel 2 - c
        assert torch.equal(ckpt["model"]["conv1.weight"][:, c],
                           torch.from_numpy(np.ascontiguousarray(caffe_w[:, 2 - c])))


# ----------------------------------------------------------------------------- the tools

WNIDS = ("n01440764", "n01443537", "n15075141")  # tench, goldfish, toilet tissue: 0, 1, 999


@pytest.fixture(scope="module")
def wnid_val(module_tmp):
    """Real JPEGs (the demo's drawings, 256x256) in val/<wnid>/ folders, 2 per class, and the
    float64 reference's fc8 for each: Caffe's protocol on the decoded 256x256 image (the
    centre 227 crop, BGR, minus the BGR mean image's crop)."""
    root = make_demo_dataset(module_tmp("wnid"), classes=3, train_per_class=1,
                             val_per_class=2, seed=4)
    for shape, wnid in zip(sorted(p.name for p in (root / "val").iterdir()), WNIDS):
        (root / "val" / shape).rename(root / "val" / wnid)
    files = sorted((root / "val").rglob("*.jpg"))
    return SimpleNamespace(root=root, files=files, labels=[ILSVRC2012_WNIDS.index(f.parent.name)
                                                           for f in files],
                           images=np.stack([load_rgb256(f).transpose(2, 0, 1)
                                            for f in files]).astype(np.float32))


@pytest.fixture(scope="module")
def wnid_logits(caffe_files, wnid_val):
    bgr = wnid_val.images[:, ::-1, CROP, CROP] - caffe_files.mean[None, :, CROP, CROP]
    return ref.bvlc_alexnet(caffe_files.blobs, bgr)


def _json_of(capsys, main, prog, argv):
    assert run(main, prog, [str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("layout", [["--single-device"], ["--devices", "cpu,cpu"]])
def test_evaluate_reproduces_caffes_centre_crop_protocol(caffe_files, wnid_val, wnid_logits,
                                                         layout, tmp_path, capsys):
    """evaluate's centre-crop loss and errors on real JPEGs equal those of the float64
    reference of Caffe's layers on the same decoded images (Caffe's protocol); --ten-crop
    runs and agrees between the layouts (checked against predict's own ten-crop path)."""
    out = tmp_path / "r.json"
    assert run(evaluate_main, "evaluate", [
        "--checkpoint", str(caffe_files.dir / "new.pt"), "--data", str(wnid_val.root),
        "--ten-crop", "--workers", "0", "--batch-size", "4", "--json", str(out), *layout]) == 0
    res = json.loads(out.read_text())
    z = torch.from_numpy(wnid_logits)
    y = torch.tensor(wnid_val.labels)
    want = torch.nn.functional.cross_entropy(z, y).item()
    top5 = z.topk(5, dim=1).indices
    c = res["center"]
    assert res["classes"] == 3  # 3 of the checkpoint's 1000, scored over all 1000
    assert c["n"] == len(wnid_val.files) == 6
    assert c["loss"] == pytest.approx(want, rel=1e-5)
    assert c["top1_err"] == (z.argmax(1) != y).double().mean().item()
    assert c["top5_err"] == (top5 != y[:, None]).all(1).double().mean().item()
    model, ckpt, devs = load_model(caffe_files.dir / "new.pt", single_device=True)
    arrays = [im.transpose(1, 2, 0).astype(np.uint8) for im in wnid_val.images]
    probs = predict.predict(model, ckpt, arrays, devs[0], ten_crop=True)
    nll = -probs[torch.arange(6), y].clamp_min(1e-12).log().mean().item()
    assert res["ten_crop"]["n"] == 6
    assert res["ten_crop"]["loss"] == pytest.approx(nll, rel=1e-5)


def test_predict_names_imagenet_classes_in_both_layouts(caffe_files, wnid_val, wnid_logits,
                                                        capsys):
    ckpt = caffe_files.dir / "new.pt"
    argv = [*wnid_val.files[:2], "--checkpoint", ckpt, "--json", "--top", "3"]
    one = _json_of(capsys, predict.main, predict.PROG, argv + ["--single-device"])
    two = _json_of(capsys, predict.main, predict.PROG, argv + ["--devices", "cpu,cpu"])
    names = predict.imagenet_names()
    want = torch.from_numpy(wnid_logits[:2]).softmax(1)
    for a, b, p in zip(one, two, want):
        assert [q["class"] for q in a["predictions"]] == [q["class"] for q in b["predictions"]]
        for q, r in zip(a["predictions"], b["predictions"]):
            assert q["name"] == names[q["class"]]
            assert q["class"] == ILSVRC2012_WNIDS[q["index"]]
            assert q["probability"] == pytest.approx(p[q["index"]].item(), rel=1e-4, abs=1e-7)
            assert q["probability"] == pytest.approx(r["probability"], rel=1e-6, abs=1e-9)
        assert a["predictions"][0]["index"] == int(p.argmax())


def test_visualize_kernels_shows_the_two_towers_in_rgb(caffe_files, tmp_path, capsys):
    """Kernels 0-47 (tower 0, Caffe's group 1 from conv2 on) in the top block, 48-95 below;
    Caffe's filter 0 (blue only) is drawn blue and filter 1 (red only) red."""
    out = tmp_path / "k.png"
    assert run(visualize_main, "visualize", ["kernels", "--checkpoint",
                                             str(caffe_files.dir / "new.pt"),
                                             "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tower 0 (kernels 0-47)" in text and "tower 1 (kernels 48-95)" in text
    img = np.asarray(Image.open(out).convert("RGB"))
    grid = KernelGrid()
    assert img.shape == (grid.size[1], grid.size[0], 3)
    for i, rgb in ((0, (0, 0, 255)), (1, (255, 0, 0))):
        x0, y0, x1, y1 = grid.box(i)
        assert (img[y0:y1, x0:x1] == rgb).all(), i
    x0, y0, _, _ = grid.box(48)  # the first kernel of tower 1 opens the lower block
    assert y0 > grid.block[1] and x0 == grid.gap


def test_caffes_lrn_span_on_real_images(caffe_files, demo_root, capsys):
    """On the 48 JPEGs of the demo fixture (decoded to 256x256 as evaluation does): the split
    layout with the halo equals the collapsed layout bit for bit; the towers' window (Caffe's
    constants, each tower on its own) is another function. Prints the numbers
    docs/pretrained.md quotes (``-s`` shows them)."""
    files = sorted(demo_root.rglob("*.jpg"))
    images = np.stack([load_rgb256(f).transpose(2, 0, 1) for f in files]).astype(np.float32)
    ckpt = load_checkpoint(caffe_files.dir / "new.pt")
    collapsed = AlexNet(init=None, lrn="caffe", lrn_span="all")
    collapsed.load_state_dict(ckpt["model"])
    tower = AlexNet(init=None, lrn="caffe", lrn_span="tower")
    tower.load_state_dict(ckpt["model"])
    split = collapsed.split()
    z = {name: logits(net.eval(), ckpt, images)
         for name, net in (("all", collapsed), ("split", split), ("tower", tower))}
    assert np.array_equal(z["split"], z["all"])
    diff = np.abs(z["tower"] - z["all"])
    rel = diff.max() / np.abs(z["all"]).max()
    agree = int((z["tower"].argmax(1) == z["all"].argmax(1)).sum())
    with capsys.disabled():
        print(f"\nsplit vs collapsed (Caffe's span): max |diff| {np.abs(z['split'] - z['all']).max()}"
              f"; towers' span vs Caffe's: max |diff| {diff.max():.4g}, relative to the largest "
              f"|logit| ({np.abs(z['all']).max():.4g}) {rel:.3g}, top-1 agreement "
              f"{agree}/{len(diff)}")
    assert rel > 1e-3 and len(files) == 48


def test_split_layout_trains_caffes_function_within_rounding():
    """lrn_span 'all' in training: the same loss in both layouts, bit for bit, and gradients
    within float rounding (the halo's gradient reaches its tower as a second sum)."""
    torch.manual_seed(0)
    net = AlexNet(10, lrn="caffe", lrn_span="all", init="caffe")
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.mul_(8.0 if name.endswith("weight") else 1.0)  # activations where LRN bends
    split = net.split()
    x = torch.randn(2, 3, 227, 227) * 60
    losses = []
    for model in (net, split):
        torch.manual_seed(1)  # the same dropout masks
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    grads = collapse_state_dict({k: p.grad for k, p in split.named_parameters()})
    for name, p in net.named_parameters():
        err = (p.grad - grads[name]).abs().max() / p.grad.abs().max()
        assert err <= 1e-6, (name, err.item())


# ----------------------------------------------------------------------------- bad input

def _tiny():
    """One-value blobs: enough for files that must be refused before any shape is read."""
    return {n: (np.zeros(1, np.float32), np.zeros(1, np.float32)) for n in ref.CAFFE_SHAPES}


def _changed(name: str, **params):
    return [(n, t, {**p, **params} if n == name else p) for n, t, p in ref.ALEXNET_PROTOTXT]


def _vgg():
    spec = [("data", "Data", {})]
    for block, (convs, width) in enumerate(((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)), 1):
        for i in range(1, convs + 1):
            spec += [(f"conv{block}_{i}", "Convolution", dict(num_output=width, pad=1,
                                                              kernel_size=3)),
                     (f"relu{block}_{i}", "ReLU", {})]
        spec.append((f"pool{block}", "Pooling", dict(pool=0, kernel_size=2, stride=2)))
    return spec + [s for s in ref.ALEXNET_PROTOTXT if s[0] in
                   ("fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8", "loss")]


def _swapped_norm_and_pool():  # bvlc_reference_caffenet's order: pool, then LRN
    spec = list(ref.ALEXNET_PROTOTXT)
    spec[3], spec[4] = spec[4], spec[3]
    return spec


def _wrong_conv2(full):
    blobs = _tiny()
    blobs["conv1"] = full["conv1"]
    blobs["conv2"] = (np.zeros((256, 96, 5, 5), np.float32), full["conv2"][1])  # no groups
    return blobs


def _nan_conv1(full):
    blobs = _tiny()
    w = full["conv1"][0].copy()
    w[5, 1, 2, 3] = np.nan
    blobs["conv1"] = (w, full["conv1"][1])
    return blobs


BAD_MODELS = {  # id: (write the file into folder d, a piece of the one error line)
    "truncated": (lambda d, f: (d / "x").write_bytes(
        (f.dir / "new.caffemodel").read_bytes()[:120_000_000]), "truncated: field 100"),
    "garbage": (lambda d, f: (d / "x").write_bytes(np.random.default_rng(3).bytes(4096)),
                "malformed: wire type 6 (field 6) at byte 16"),
    "mean file as model": (lambda d, f: (d / "x").write_bytes(
        (f.dir / "mean.binaryproto").read_bytes()), "NetParameter.name has wire type 0"),
    "vgg layers": (lambda d, f: ref.write_net(d / "x", _vgg(), _tiny(), v1=False),
                   "after the input it has Convolution 'conv1_1' where bvlc_alexnet has "
                   "Convolution 'conv1'"),
    "pool before lrn": (lambda d, f: ref.write_net(d / "x", _swapped_norm_and_pool(), _tiny(),
                                                   v1=True),
                        "after relu1 it has Pooling 'pool1' where bvlc_alexnet has LRN 'norm1'"),
    "no fc8": (lambda d, f: ref.write_net(d / "x", [s for s in ref.ALEXNET_PROTOTXT
                                                    if s[0] != "fc8"], _tiny(), v1=False),
               "it ends after drop7, where bvlc_alexnet goes on with InnerProduct 'fc8'"),
    "fc9 after fc8": (lambda d, f: ref.write_net(
        d / "x", ref.ALEXNET_PROTOTXT + [("fc9", "InnerProduct", dict(num_output=10))],
        _tiny(), v1=True), "after fc8 it has InnerProduct 'fc9'; bvlc_alexnet ends with fc8"),
    "lrn window 3": (lambda d, f: ref.write_net(d / "x", _changed("norm2", local_size=3),
                                                _tiny(), v1=False),
                     "norm2 has local_size 3 where bvlc_alexnet has 5"),
    "lrn k 2": (lambda d, f: ref.write_net(d / "x", _changed("norm1", k=2.0), _tiny(), v1=True),
                "norm1 has k 2 where bvlc_alexnet has 1"),
    "conv2 ungrouped": (lambda d, f: ref.write_net(d / "x", _changed("conv2", group=1), _tiny(),
                                                   v1=False),
                        "conv2 has group 1 where bvlc_alexnet has 2"),
    "10 classes": (lambda d, f: ref.write_net(d / "x", _changed("fc8", num_output=10), _tiny(),
                                              v1=False),
                   "fc8 has num_output 10 where bvlc_alexnet has 1000"),
    "wrong shapes": (lambda d, f: ref.write_net(d / "x", ref.ALEXNET_PROTOTXT,
                                                _wrong_conv2(f.blobs), v1=False),
                     "conv2.weight has shape 256x96x5x5, expected 256x48x5x5"),
    "nan weights": (lambda d, f: ref.write_net(d / "x", ref.ALEXNET_PROTOTXT,
                                               _nan_conv1(f.blobs), v1=True),
                    "conv1.weight holds 1 NaN or infinite values"),
}


def one_error_line(capsys, argv) -> str:
    rc = run(convert.main, convert.PROG, argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, (rc, out, err)
    assert lines[0].startswith("split_alexnet.convert: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_models_give_one_line_and_exit_2(case, caffe_files, tmp_path, capsys):
    make, expected = BAD_MODELS[case]
    make(tmp_path, caffe_files)
    line = one_error_line(capsys, ["caffe", str(tmp_path / "x"), str(tmp_path / "out.pt")])
    assert f"{tmp_path / 'x'}: " in line and expected in line, line
    assert not (tmp_path / "out.pt").exists()


def test_weights_that_do_not_fit_the_network_are_one_line(caffe_files, wnid_val, tmp_path,
                                                          capsys):
    """A checkpoint whose tensors do not fit the network of its own config: evaluate and
    predict stop with one line (exit 2), no traceback."""
    good = load_checkpoint(caffe_files.dir / "v1.pt")
    save_checkpoint(tmp_path / "bad.pt", {
        **{k: good[k] for k in ("model_config", "config", "classes", "class_names", "stats",
                                "source")},
        "model": {"conv1.weight": torch.zeros(96, 3, 11, 11), "fc8.bias": torch.zeros(7)}})
    for main, prog, argv in ((evaluate_main, "evaluate", ["--data", str(wnid_val.root),
                                                         "--single-device"]),
                             (predict.main, predict.PROG, [str(wnid_val.files[0])])):
        rc = run(main, prog, ["--checkpoint", str(tmp_path / "bad.pt"), *argv])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert "bad.pt: model conv1.bias is nothing, but arch=alexnet with 1000 classes " \
               "needs shape (96,)" in lines[0], lines[0]


def test_bad_mean_missing_file_and_existing_output(caffe_files, tmp_path, capsys):
    model = str(caffe_files.dir / "new.caffemodel")
    ref.write_blob(tmp_path / "m", np.zeros((1, 3, 227, 227), np.float32))
    line = one_error_line(capsys, ["caffe", model, str(tmp_path / "o.pt"), "--mean",
                                   str(tmp_path / "m")])
    assert "not Caffe's 3x256x256 mean image: the mean image has shape 1x3x227x227" in line
    line = one_error_line(capsys, ["caffe", str(tmp_path / "none"), str(tmp_path / "o.pt")])
    assert line.endswith(f"{tmp_path / 'none'}: no such file")
    (tmp_path / "o.pt").write_bytes(b"earlier work")
    line = one_error_line(capsys, ["caffe", model, str(tmp_path / "o.pt")])
    assert "exists; give --force to replace it" in line
    assert (tmp_path / "o.pt").read_bytes() == b"earlier work"


def test_the_command_on_garbage_prints_one_line(tmp_path, capsys):
    """(The command's main as its console runs it; its own process: the ``caffe_files``
    fixture and tests/test_flags.py::test_convert_refuses_a_fifo_instead_of_hanging_on_it.)"""
    (tmp_path / "g.caffemodel").write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + bytes(100))
    rc, out, err = run_main(convert.main, convert.PROG, ["caffe", tmp_path / "g.caffemodel",
                                                         tmp_path / "o.pt"], capsys)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"split_alexnet.convert: error: {tmp_path / 'g.caffemodel'}: truncated: field 1 at "
        "byte 0 needs 4294967295 bytes, 100 remain"]


# ----------------------------------------------------------------------------- the reader

def _protobuf_classes():
    """NetParameter and the messages it needs, declared as in caffe.proto (a subset of the
    fields; enums as int32, the same varints), built with the protobuf package itself."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="caffe_subset.proto", package="caffe",
                                             syntax="proto2")
    messages = {  # "name number type [repeated | packed]", as caffe.proto declares them
        "BlobShape": "dim 1 int64 packed",
        "BlobProto": "shape 7 BlobShape; data 5 float packed; double_data 8 double packed; "
                     "num 1 int32; channels 2 int32; height 3 int32; width 4 int32",
        "LRNParameter": "local_size 1 uint32; alpha 2 float; beta 3 float; k 5 float",
        "ConvolutionParameter": "num_output 1 uint32; pad 3 uint32 repeated; "
                                "kernel_size 4 uint32 repeated; group 5 uint32; "
                                "stride 6 uint32 repeated",
        "LayerParameter": "name 1 string; type 2 string; blobs 7 BlobProto repeated; "
                          "convolution_param 106 ConvolutionParameter; "
                          "lrn_param 118 LRNParameter",
        "V1LayerParameter": "name 4 string; type 5 int32; blobs 6 BlobProto repeated; "
                            "convolution_param 10 ConvolutionParameter; "
                            "lrn_param 18 LRNParameter",
        "NetParameter": "name 1 string; layers 2 V1LayerParameter repeated; "
                        "layer 100 LayerParameter repeated",
    }
    scalars = {"int32": F.TYPE_INT32, "int64": F.TYPE_INT64, "uint32": F.TYPE_UINT32,
               "float": F.TYPE_FLOAT, "double": F.TYPE_DOUBLE, "string": F.TYPE_STRING}
    for mname, fields in messages.items():
        m = fdp.message_type.add(name=mname)
        for spec in fields.split("; "):
            fname, num, typ, *flags = spec.split()
            f = m.field.add(name=fname, number=int(num), type=scalars.get(typ, F.TYPE_MESSAGE),
                            label=F.LABEL_REPEATED if flags else F.LABEL_OPTIONAL)
            if typ not in scalars:
                f.type_name = f".caffe.{typ}"
            if flags == ["packed"]:
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = getattr(message_factory, "GetMessageClass", None) or \
        message_factory.MessageFactory(pool).GetPrototype
    return get(pool.FindMessageTypeByName("caffe.NetParameter"))


def test_reader_reads_what_protobuf_writes():
    Net = _protobuf_classes()
    for v1 in (False, True):
        msg = Net(name="net")
        conv = msg.layers.add(name="conv1", type=4) if v1 else \
            msg.layer.add(name="conv1", type="Convolution")
        conv.convolution_param.num_output = 96
        conv.convolution_param.kernel_size.append(11)
        conv.convolution_param.stride.extend([4, 4])
        conv.convolution_param.group = 2
        w = conv.blobs.add()
        w.shape.dim.extend([2, 3])
        w.data.extend([0.5, -1.25, 3.0, 1e-4, -0.0, 7.0])
        b = conv.blobs.add(num=1, channels=1, height=1, width=2)
        b.double_data.extend([0.1, 2.5])
        norm = msg.layers.add(name="norm1", type=15) if v1 else \
            msg.layer.add(name="norm1", type="LRN")
        norm.lrn_param.local_size = 5
        norm.lrn_param.alpha = 1e-4
        norm.lrn_param.k = 1.0
        net = parse_net(msg.SerializeToString())
        assert net.name == "net" and net.format == ("layers (V1)" if v1 else "layer")
        c, n = net.layers
        assert (c.name, c.type, n.name, n.type) == ("conv1", "Convolution", "norm1", "LRN")
        assert c.params == {"num_output": [96], "kernel_size": [11], "stride": [4, 4],
                            "group": [2]}
        assert c.blobs[0].shape == (2, 3) and c.blobs[1].shape == (1, 1, 1, 2)
        assert c.blobs[0].data.tolist() == np.float32([0.5, -1.25, 3.0, 1e-4, -0.0, 7.0]).tolist()
        assert c.blobs[1].data.tolist() == np.float32([0.1, 2.5]).tolist()
        assert n.params == {"local_size": [5], "alpha": [float(np.float32(1e-4))], "k": [1.0]}


def test_protobuf_reads_what_the_test_writer_writes():
    """The synthetic files of these tests are real protobuf: the package parses them."""
    Net = _protobuf_classes()
    blobs = {"conv1": (np.arange(6, dtype=np.float32).reshape(2, 3), np.float32([9, 8]))}
    for v1 in (False, True):
        msg = Net()
        msg.ParseFromString(b"".join(bytes(c) for c in
                                     ref.net_chunks(ref.ALEXNET_PROTOTXT, blobs, v1=v1)))
        layers = msg.layers if v1 else msg.layer
        assert [lr.name for lr in layers] == [s[0] for s in ref.ALEXNET_PROTOTXT]
        conv = layers[1]
        assert conv.type == (4 if v1 else "Convolution")
        assert (conv.convolution_param.num_output, list(conv.convolution_param.stride)) == (96, [4])
        w, b = conv.blobs
        assert list(w.data) == [0, 1, 2, 3, 4, 5] and list(b.data) == [9, 8]
        assert ((w.num, w.channels, w.height, w.width) == (1, 1, 2, 3) if v1
                else list(w.shape.dim) == [2, 3])
        lrn = layers[3].lrn_param
        assert (lrn.local_size, lrn.alpha, lrn.beta) == (5, np.float32(1e-4), 0.75)
