"""Export a checkpoint's network: an ONNX graph, or its weights alone as safetensors.

    python -m split_alexnet.export runs/alexnet/best.pt alexnet.onnx
    python -m split_alexnet.export runs/alexnet/best.pt alexnet.onnx --mean-in-graph
    python -m split_alexnet.export runs/alexnet/best.pt alexnet.safetensors
    python -m split_alexnet.export caffe_alexnet.pt caffe_alexnet.onnx

CHECKPOINT is any checkpoint of this project (written by train in either layout, or by
``split_alexnet.convert``) or a ``.safetensors`` weights file written by this command. What
OUT becomes is its extension:

* ``.onnx``: the network's function (eval mode) as an ONNX graph, opset 17, input ``image``
  (batch, 3, 227, 227) with a dynamic batch dimension, output ``logits``; LRN as ONNX's
  ``LRN`` operator, one per tower's channel slice (span ``tower``) or one over all channels
  (span ``all``). ``--mean-in-graph`` puts the mean image's centre crop inside: the graph
  then takes raw 0-255 RGB. Checked before it is written: onnxruntime (when installed) runs
  it on a batch of 3 and its logits must be within 1e-4 (relative to the largest) of the
  PyTorch forward's; the errors are printed. Exporter and LRN mapping:
  ``split_alexnet/tools/onnx_export.py`` and docs/deploy.md.
* ``.safetensors``: the weights only, under the collapsed layout's names and shapes, with the
  ModelConfig, the classes, the class names and the mean image in its metadata
  (``split_alexnet/utils/weights_file.py``). ``--init-from``, evaluate, predict, visualize and
  ``hubconf.py`` read it like a checkpoint.

A file that is not a checkpoint, an unsafe or damaged one, non-finite weights, an OUT that
exists (without ``--overwrite``) or cannot be written, and an unknown extension are each one
line and exit code 2, and nothing is written. OUT is written atomically.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from split_alexnet.data.dataset import CENTER, CROP
from split_alexnet.network.placement import build_model
from split_alexnet.tools import onnx_export
from split_alexnet.utils.weights_file import (CheckpointError, checkpoint_stats, model_config,
                                            read_weights, safetensors_bytes)
from split_alexnet.utils.cli import Abort, UsageError, run
from split_alexnet.utils.fileio import atomic_write
from split_alexnet.utils.flags import check_input, check_output

PROG = "split_alexnet.export"
#: OUT's extension -> what is written, and the packages that needs.
KINDS = {".onnx": ("onnx", ("onnx",)), ".safetensors": ("safetensors", ("safetensors",))}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a .pt checkpoint (train, either layout; split_alexnet.convert) or a "
                        ".safetensors weights file")
    p.add_argument("out", metavar="OUT",
                   help="OUT.onnx (the network as an ONNX graph) or OUT.safetensors (the "
                        "weights only)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--mean-in-graph", action="store_true",
                   help=".onnx: subtract the mean image (its centre 227 crop) inside the "
                        "graph, which then takes raw 0-255 RGB (default: the input is the "
                        "image minus the mean, as the network's)")
    p.add_argument("--no-check", action="store_true",
                   help=".onnx: skip the onnxruntime check (run by default when onnxruntime "
                        "is installed)")
    return p.parse_args(argv)


def _has(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _packages(names: Sequence[str]) -> None:
    missing = [n for n in names if not _has(n)]
    if missing:
        raise UsageError(f"writing this file needs {' and '.join(missing)}: pip install "
                         "'split_alexnet[export]'")


def check_out(out: Path, overwrite: bool) -> str:
    """What OUT becomes (``onnx`` or ``safetensors``), after checking that it may be
    written: a known extension, not an existing file without ``--overwrite``, writable."""
    kind = KINDS.get(out.suffix.lower())
    if kind is None:
        raise UsageError(f"OUT {out}: unknown extension {out.suffix or '(none)'!r}; give "
                         f"{' or '.join(KINDS)}")
    check_output("OUT", out)
    if out.exists() and not overwrite:
        raise UsageError(f"OUT {out} exists; give --overwrite to replace it")
    _packages(kind[1])
    return kind[0]


def network(payload: dict) -> nn.Module:
    """The checkpoint's network, collapsed (or the one-column ablation), float32, on the
    CPU, in eval mode, with its weights."""
    cfg = model_config(payload)
    net = build_model(replace(cfg, init=None), "collapsed", ("cpu",))
    net.load_state_dict({k: v.float() for k, v in payload["model"].items()})
    return net.float().eval()


def mean_crop(payload: dict) -> torch.Tensor:
    """The centre 227x227 crop of the checkpoint's mean image: what the network's input has
    subtracted (the evaluation's centre crop)."""
    mean = checkpoint_stats(payload).mean.float()
    return mean[:, CENTER:CENTER + CROP, CENTER:CENTER + CROP].contiguous()


def onnx_metadata(payload: dict, source: Path) -> dict[str, str]:
    classes = [str(c) for c in payload["classes"]]
    names = payload.get("class_names")
    if not (isinstance(names, (list, tuple)) and len(names) == len(classes)):
        names = classes
    return {"model_config": json.dumps(asdict(model_config(payload))),
            "classes": json.dumps(classes), "class_names": json.dumps([str(n) for n in names]),
            "source": json.dumps({"file": source.name,
                                  "checksum": str(payload.get("checksum", ""))})}


def export_onnx(payload: dict, source: Path, *, mean_in_graph: bool = False,
                verify: bool = True) -> tuple[bytes, dict | None]:
    """(the ONNX model's bytes, onnxruntime's check or None). A graph that onnxruntime finds
    further from the PyTorch forward than ``onnx_export.TOLERANCE`` is an :class:`Abort`."""
    net = network(payload)
    mean = mean_crop(payload) if mean_in_graph else None
    data = onnx_export.onnx_bytes(net, mean=mean, metadata=onnx_metadata(payload, source))
    result = None
    if verify:
        result = onnx_export.check(data, net, mean=mean)
        if result["relative"] > onnx_export.TOLERANCE:
            raise Abort(f"not writing: onnxruntime's logits differ from PyTorch's by "
                        f"{result['relative']:.2e} of the largest (more than "
                        f"{onnx_export.TOLERANCE:g})")
    return data, result


def write(out: Path, data: bytes) -> None:
    """OUT, atomically: a failed write (a full disk) leaves no file and is one line."""
    try:
        atomic_write(out, lambda f: f.write(data), private=False)
    except OSError as e:
        raise Abort(f"could not write {out}: {e.strerror or e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    src, out = Path(args.checkpoint), Path(args.out)
    kind = check_out(out, args.overwrite)
    if kind == "safetensors" and args.mean_in_graph:
        raise UsageError("--mean-in-graph is for an .onnx OUT (a .safetensors file holds the "
                         "mean image in its metadata)")
    check_input("CHECKPOINT", src)
    try:
        payload = read_weights(src)
        cfg = model_config(payload)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    what = f"{cfg.arch}, {cfg.num_classes} classes, --lrn {cfg.lrn} --lrn-span {cfg.lrn_span}"
    if kind == "safetensors":
        data = safetensors_bytes(payload, source=src.name)
        write(out, data)
        print(f"{out}: {len(payload['model'])} tensors ({what}), {len(data) / 1e6:.1f} MB, "
              "with the model config, classes and mean image in its metadata")
        return 0
    verify = not args.no_check
    if verify and not _has("onnxruntime"):
        print(f"{PROG}: note: onnxruntime is not installed: the graph is not checked",
              file=sys.stderr)
        verify = False
    data, result = export_onnx(payload, src, mean_in_graph=args.mean_in_graph, verify=verify)
    write(out, data)
    lrn = len(onnx_export.lrn_nodes(data))
    print(f"{out}: opset {onnx_export.OPSET}, input {onnx_export.INPUT} (batch, 3, 227, 227) "
          f"{'raw 0-255 RGB, mean subtracted in the graph' if args.mean_in_graph else 'minus the mean image'}, "
          f"output {onnx_export.OUTPUT} (batch, {cfg.num_classes}); {lrn} LRN node(s); "
          f"{what}; {len(data) / 1e6:.1f} MB")
    if result:
        print(f"checked with onnxruntime {result['onnxruntime']} (CPU), batch {result['batch']}: "
              f"max |ONNX - PyTorch| {result['max_abs']:.2e}, {result['relative']:.2e} of the "
              f"largest logit")
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
