"""Convert trained weights from another framework into a split_alexnet checkpoint.

    python -m split_alexnet.convert caffe bvlc_alexnet.caffemodel caffe_alexnet.pt
    python -m split_alexnet.convert caffe bvlc_alexnet.caffemodel caffe_alexnet.pt \
        --mean imagenet_mean.binaryproto

``caffe``: Caffe's bvlc_alexnet (BVLC/caffe models/bvlc_alexnet), the one public set of trained
weights for exactly this network. Its grouped convolutions are the collapsed layout
(``network.model.AlexNet``) parameter for parameter, and its layer order is the paper's. The
command checks that the file really is bvlc_alexnet (layer order, every hyper-parameter that
changes the function, every blob shape, finite values), reverses conv1's input channels
(Caffe reads BGR, this repository RGB), takes the mean image from ``--mean`` (Caffe's BGR
BlobProto) or Caffe's per-channel BGR mean (104, 117, 123), and writes a normal checkpoint
(atomic, checksummed, ``weights_only=True``) with the 1000 ILSVRC-2012 classes in Caffe's
order and ``config["lrn"] = "caffe"``, ``config["lrn_span"] = "all"``: Caffe's LRN (k=1,
alpha/n, one window across all channels), which the network computes exactly in both layouts
(docs/pretrained.md). Anything else: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from itertools import zip_longest
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from split_alexnet.data.images import SIZE
from split_alexnet.network.model import (AlexNet, ModelConfig, collapsed_shapes,
                                         count_parameters, layout_state_dict)
from split_alexnet.tools.caffe import Blob, CaffeFormatError, Layer, Net, parse_blob, parse_net
from split_alexnet.tools.predict import ILSVRC2012_WNIDS, imagenet_names
from split_alexnet.utils.checkpoint_file import code_version, save_checkpoint
from split_alexnet.utils.cli import Abort, Parser, UsageError, first_sentence, run
from split_alexnet.utils.flags import check_input, check_output

PROG = "split_alexnet.convert"

ZOO_FILE = "bvlc_alexnet.caffemodel"
ZOO_SHA1 = "9116a64c0fbe4459d18f4bb6b56d647b63920377"  # BVLC/caffe models/bvlc_alexnet/readme.md
# Caffe's per-channel BGR mean: mean_value in BVLC/caffe models/bvlc_googlenet/train_val.prototxt
CAFFE_BGR_MEAN = (104.0, 117.0, 123.0)
NUM_CLASSES = 1000
# The network of a converted checkpoint: Caffe's LRN (k=1, alpha/n) with one window across all
# channels, dropout 0.5 as in train_val.prototxt.
CAFFE_MODEL = ModelConfig(arch="alexnet", num_classes=NUM_CLASSES, init=None, lrn="caffe",
                          lrn_span="all", activation="relu", pool="3/2", dropout=0.5)
CAFFE_LRN = CAFFE_MODEL.lrn

WEIGHT_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# Layers that do not change the function from image to fc8 (inputs, losses, plumbing).
IGNORED_TYPES = frozenset({"Data", "Input", "ImageData", "MemoryData", "DummyData", "HDF5Data",
                           "WindowData", "Accuracy", "Softmax", "SoftmaxWithLoss", "Split",
                           "Silence"})

_LRN = {"local_size": 5, "alpha": 1e-4, "beta": 0.75}
_POOL = {"kernel_size": 3, "stride": 2}
# bvlc_alexnet in order (BVLC/caffe models/bvlc_alexnet/train_val.prototxt): name, type and
# the hyper-parameters it sets; CAFFE_DEFAULTS fills the rest.
BVLC_ALEXNET: tuple[tuple[str, str, dict], ...] = (
    ("conv1", "Convolution", {"num_output": 96, "kernel_size": 11, "stride": 4}),
    ("relu1", "ReLU", {}), ("norm1", "LRN", _LRN), ("pool1", "Pooling", _POOL),
    ("conv2", "Convolution", {"num_output": 256, "pad": 2, "kernel_size": 5, "group": 2}),
    ("relu2", "ReLU", {}), ("norm2", "LRN", _LRN), ("pool2", "Pooling", _POOL),
    ("conv3", "Convolution", {"num_output": 384, "pad": 1, "kernel_size": 3}),
    ("relu3", "ReLU", {}),
    ("conv4", "Convolution", {"num_output": 384, "pad": 1, "kernel_size": 3, "group": 2}),
    ("relu4", "ReLU", {}),
    ("conv5", "Convolution", {"num_output": 256, "pad": 1, "kernel_size": 3, "group": 2}),
    ("relu5", "ReLU", {}), ("pool5", "Pooling", _POOL),
    ("fc6", "InnerProduct", {"num_output": 4096}), ("relu6", "ReLU", {}), ("drop6", "Dropout", {}),
    ("fc7", "InnerProduct", {"num_output": 4096}), ("relu7", "ReLU", {}), ("drop7", "Dropout", {}),
    ("fc8", "InnerProduct", {"num_output": NUM_CLASSES}),
)
# caffe.proto's defaults for the fields a file may leave out (pool 0 = MAX, norm_region 0 =
# ACROSS_CHANNELS). A dropout ratio does not change the function at test time.
CAFFE_DEFAULTS = {
    "Convolution": {"pad": 0, "stride": 1, "group": 1, "dilation": 1, "bias_term": 1, "axis": 1},
    "Pooling": {"pool": 0, "pad": 0, "stride": 1, "global_pooling": 0},
    "LRN": {"local_size": 5, "alpha": 1.0, "beta": 0.75, "norm_region": 0, "k": 1.0},
    "InnerProduct": {"bias_term": 1, "axis": 1, "transpose": 0},
    "ReLU": {"negative_slope": 0.0},
    "Dropout": {},
}


class NotConvertible(ValueError):
    """A well-formed Caffe file that is not bvlc_alexnet."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(module=PROG, description=first_sentence(__doc__))
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    c = sub.add_parser("caffe", help="Caffe's bvlc_alexnet .caffemodel (docs/pretrained.md)",
                       description="Caffe's bvlc_alexnet .caffemodel -> a split_alexnet checkpoint")
    c.add_argument("model", metavar="MODEL.caffemodel", help="Caffe weights (NetParameter)")
    c.add_argument("out", metavar="OUT.pt", help="the checkpoint to write")
    c.add_argument("--mean", metavar="MEAN.binaryproto",
                   help="Caffe's mean image, a 3x256x256 BGR BlobProto (default: Caffe's "
                        "per-channel BGR mean 104, 117, 123)")
    c.add_argument("--force", action="store_true", help="replace OUT.pt if it exists")
    args = p.parse_args(argv)
    check_input("MODEL.caffemodel", args.model)
    check_input("--mean", args.mean)
    check_output("OUT.pt", args.out, {"MODEL.caffemodel": args.model, "--mean": args.mean})
    return args


# ----------------------------------------------------------------------------- checks

def _values(layer: Layer, key: str) -> list:
    """Every value the file gives ``key``, including the _h/_w forms of pad, kernel, stride."""
    vals = list(layer.params.get(key, []))
    if key in ("pad", "kernel_size", "stride"):
        stem = "kernel" if key == "kernel_size" else key
        vals += layer.params.get(f"{stem}_h", []) + layer.params.get(f"{stem}_w", [])
    return vals


def _same(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-6 * abs(b)  # float32 in the file: 1e-4 -> 9.99999975e-05


def check_structure(net: Net) -> dict[str, Layer]:
    """The layers of ``net`` that change the function must be bvlc_alexnet's, in its order, with
    its hyper-parameters. Returns the weight layers by name; raises :class:`NotConvertible`."""
    layers = [layer for layer in net.layers if layer.type not in IGNORED_TYPES]
    found: dict[str, Layer] = {}
    after = "the input"
    for layer, want in zip_longest(layers, BVLC_ALEXNET):
        if layer is None:
            raise NotConvertible(f"not Caffe's bvlc_alexnet: it ends after {after}, where "
                                 f"bvlc_alexnet goes on with {want[1]} '{want[0]}'")
        if want is None:
            raise NotConvertible(f"not Caffe's bvlc_alexnet: after fc8 it has {layer.type} "
                                 f"'{layer.name}'; bvlc_alexnet ends with fc8")
        name, typ, spec = want
        if layer.type != typ or (name in WEIGHT_LAYERS and layer.name != name):
            raise NotConvertible(f"not Caffe's bvlc_alexnet: after {after} it has {layer.type} "
                                 f"'{layer.name}' where bvlc_alexnet has {typ} '{name}'")
        after = layer.name
        for key, expected in {**CAFFE_DEFAULTS[typ], **spec}.items():
            got = _values(layer, key) or ([CAFFE_DEFAULTS[typ][key]]
                                          if key in CAFFE_DEFAULTS[typ] else [])
            if not got or not all(_same(v, expected) for v in got):
                shown = ", ".join(f"{v:g}" for v in got) or "nothing"
                raise NotConvertible(f"not Caffe's bvlc_alexnet: {layer.name} has {key} "
                                     f"{shown} where bvlc_alexnet has {expected:g}")
        if name in WEIGHT_LAYERS:
            found[name] = layer
    return found


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "()"


def blob_tensor(blob: Blob, want: tuple[int, ...], what: str) -> torch.Tensor:
    """A float32 tensor of shape ``want`` from ``blob``; a legacy 4-D shape may carry leading
    ones (Caffe's (1, 1, 4096, 9216) for fc6's weights)."""
    shape, extra = tuple(blob.shape), len(blob.shape) - len(want)
    if not (shape == want or (extra > 0 and all(d == 1 for d in shape[:extra])
                              and shape[extra:] == want)):
        raise NotConvertible(f"{what} has shape {_fmt(shape)}, expected {_fmt(want)}")
    bad = int(np.count_nonzero(~np.isfinite(blob.data)))
    if bad:
        raise NotConvertible(f"{what} holds {bad} NaN or infinite values")
    return torch.from_numpy(np.array(blob.data, dtype=np.float32).reshape(want))


def caffe_state_dict(layers: dict[str, Layer]) -> dict[str, torch.Tensor]:
    """The collapsed layout's parameters from bvlc_alexnet's blobs (weights, then biases),
    shape-checked against ``collapsed_shapes``; conv1's input channels reordered BGR -> RGB."""
    shapes = collapsed_shapes(NUM_CLASSES)
    state: dict[str, torch.Tensor] = {}
    for name in WEIGHT_LAYERS:
        blobs = layers[name].blobs
        if len(blobs) != 2:
            raise NotConvertible(f"{name} holds {len(blobs)} blobs, expected 2 (weights and "
                                 "biases)")
        for kind, blob in zip(("weight", "bias"), blobs):
            key = f"{name}.{kind}"
            state[key] = blob_tensor(blob, shapes[key], key)
    state["conv1.weight"] = state["conv1.weight"].flip(1).contiguous()  # (96, 3, 11, 11) RGB
    return state


def read_mean(buf: bytes) -> torch.Tensor:
    """Caffe's mean image (a BlobProto, 1x3x256x256 or 3x256x256, BGR) -> (3, 256, 256) RGB."""
    bgr = blob_tensor(parse_blob(buf), (3, SIZE, SIZE), "the mean image")
    return bgr.flip(0).contiguous()


def channel_mean(bgr: Sequence[float] = CAFFE_BGR_MEAN) -> torch.Tensor:
    """A per-channel BGR mean as the (3, 256, 256) RGB mean image."""
    rgb = torch.tensor(list(bgr), dtype=torch.float32).flip(0)
    return rgb[:, None, None].expand(3, SIZE, SIZE).contiguous()


# ----------------------------------------------------------------------------- checkpoint

def converted_payload(model: dict[str, torch.Tensor], mean: torch.Tensor, *, fingerprint: str,
                      source: dict) -> dict:
    """The checkpoint of converted weights, in the trainer's format for everything the tools
    read (model, model_config, config, layout, classes, class_names, class_metadata, stats,
    stats_fingerprint, code_version, torch_version) and without training state (no optimizer,
    schedule, progress, rng): ``source`` marks it as converted and names the file it came from.
    Caffe publishes no colour statistics: eigval zeros (PCA noise adds nothing), eigvec the
    identity."""
    names = imagenet_names()
    classes = list(ILSVRC2012_WNIDS)  # Caffe's labels: the sorted wnids
    return {
        "model": model,
        "model_config": dataclasses.asdict(CAFFE_MODEL),
        "config": {f: getattr(CAFFE_MODEL, f) for f in ("arch", "num_classes", "lrn",
                                                         "lrn_span", "activation", "pool",
                                                         "dropout")},
        "layout": "collapsed",
        "classes": classes,
        "class_names": [names[w] for w in classes],
        "class_metadata": [{"index": i, "wnid": w, "name": names[w], "source_index": i}
                           for i, w in enumerate(classes)],
        "stats_fingerprint": fingerprint,
        "stats": {"mean": mean, "eigval": torch.zeros(3), "eigvec": torch.eye(3)},
        "source": source,
        "code_version": code_version(),
        "torch_version": str(torch.__version__),
    }


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


def convert_caffe(model_path: Path | str, out: Path | str, mean_path: Path | str | None = None,
                  *, force: bool = False) -> dict:
    """bvlc_alexnet ``.caffemodel`` -> checkpoint ``out``; returns the ``source`` record."""
    model_path, out = Path(model_path), Path(out)
    if out.is_dir() or (out.exists() and not force):
        raise UsageError(f"{out} exists; give --force to replace it" if not out.is_dir()
                         else f"{out} is a folder, not a checkpoint file")
    if mean_path is not None:
        mean_path = Path(mean_path)
        mbuf = _read(mean_path)
        try:
            mean = read_mean(mbuf)
        except (CaffeFormatError, NotConvertible) as e:
            raise UsageError(f"{mean_path}: not Caffe's 3x256x256 mean image: {e}") from None
        msha = hashlib.sha1(mbuf).hexdigest()
        mean_source = {"file": mean_path.name, "sha1": msha, "order": "BGR, reordered to RGB"}
        fingerprint = f"caffe-mean-file:{msha}"
    else:
        mean = channel_mean()
        mean_source = {"per_channel_bgr": list(CAFFE_BGR_MEAN)}
        fingerprint = "caffe-mean-bgr:" + ",".join(f"{v:g}" for v in CAFFE_BGR_MEAN)
    buf = _read(model_path)
    try:
        net = parse_net(buf)
        state = caffe_state_dict(check_structure(net))
    except (CaffeFormatError, NotConvertible) as e:
        raise UsageError(f"{model_path}: {e}") from None
    sha1 = hashlib.sha1(buf).hexdigest()
    source = {"format": "caffe", "file": model_path.name, "sha1": sha1, "bytes": len(buf),
              "zoo_file": sha1 == ZOO_SHA1, "net_name": net.name, "proto": net.format,
              "mean": mean_source, "converter": f"{PROG} caffe"}
    del buf, net
    model = AlexNet(NUM_CLASSES, lrn=CAFFE_MODEL.lrn, lrn_span=CAFFE_MODEL.lrn_span, init=None)
    model.load_state_dict(state)  # strict: exactly the keys and shapes the tools will load
    payload = converted_payload(layout_state_dict(model), mean, fingerprint=fingerprint,
                                source=source)
    try:
        save_checkpoint(out, payload)
    except OSError as e:
        raise Abort(f"cannot write {out}: {e.strerror or e}") from None
    source["parameters"] = count_parameters(model)
    return source


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    src = convert_caffe(args.model, args.out, args.mean, force=args.force)
    zoo = (f"the Caffe model zoo's {ZOO_FILE}" if src["zoo_file"] else
           f"not the model zoo's {ZOO_FILE} (sha1 {ZOO_SHA1[:12]}...); its layers are "
           "bvlc_alexnet's")
    print(f"{src['file']}: sha1 {src['sha1']}, {zoo}; `{src['proto']}` format")
    m = src["mean"]
    print("mean image: " + (f"{m['file']} (3x256x256, BGR reordered to RGB)" if "file" in m
                            else "Caffe's per-channel BGR mean 104, 117, 123"))
    print(f"wrote {args.out}: the collapsed AlexNet, {src['parameters']:,} parameters, "
          f"{NUM_CLASSES} ILSVRC-2012 classes, lrn '{CAFFE_LRN}', lrn span "
          f"'{CAFFE_MODEL.lrn_span}' (Caffe's LRN: one window across all channels, k=1, "
          "alpha/n)")
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
