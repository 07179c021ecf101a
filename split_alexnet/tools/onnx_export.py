"""The network as an ONNX graph, with LRN as ONNX's own ``LRN`` operator, checked by
onnxruntime (docs/deploy.md).

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter, at opset
:data:`OPSET`. It is the one exporter with the same interface from torch 2.4 to 2.14: from
2.9 it warns that it is deprecated (``dynamo=True`` became the default; the warning is
silenced here), and a custom operator becomes an ONNX node through the ``symbolic`` method of
an autograd Function. The ``torch.export``-based exporter (``dynamo=True``) needs
``onnxscript`` and takes a custom operator's translation only through
``custom_translation_table``, which torch 2.4's ``torch.onnx.export`` does not have.

What is traced is :class:`InferenceNet`: the checkpoint's own layers (shared, not copied), in
eval mode, one ``Conv`` / ``Gemm`` per layer. The collapsed ``AlexNet`` computes conv1, conv3,
fc6 and fc7 as two output halves only so that its gradients equal the towers' bit for bit
(docs/architecture.md); its forward function is the same, and the tests compare the graph
with ``AlexNet.forward`` itself. LRN is exported by :class:`OnnxLRN`, which stands in for
``LocalResponseNorm`` during the export only:

* ONNX's LRN divides alpha by its size (``x / (bias + alpha / size * sum) ** beta``, the
  window ``[c - (size-1)//2, c + ceil((size-1)/2)]`` clipped at the ends): the coefficient
  the module applies to the sum of squares times ``size`` is ONNX's ``alpha``. The paper's
  reading (alpha 1e-4 on the sum) is ``alpha=5e-4``; ``alpha-over-n`` and ``caffe`` are
  ``alpha=1e-4``; ``bias`` is k (2, or Caffe's 1); ``beta`` 0.75; ``size`` 5.
* For odd sizes the windows agree; for an even size they do not (torch puts the extra
  channel before, ONNX after: pytorch issue 75722), so an even size is refused.
* ``groups=2`` (span ``tower``): ONNX ``Split`` of the channels into the towers' halves, one
  ``LRN`` per half, ``Concat``. Span ``all`` (Caffe's): one ``LRN`` over all channels.
"""

from __future__ import annotations

import io
import json
import time
import warnings

import torch
from torch import Tensor, nn

from split_alexnet import __version__
from split_alexnet.network.lrn import LocalResponseNorm, lrn_reference
from split_alexnet.network.model import INPUT_SIZE, WEIGHT_LAYERS, _act, _pool

#: The ONNX opset of the exported graph (LRN is LRN-13 there; ORT runs it on the CPU).
OPSET = 17
INPUT, OUTPUT = "image", "logits"
#: The largest |ONNX - PyTorch| accepted, relative to the largest |logit|.
TOLERANCE = 1e-4


def _need(module: str):
    """Import an optional package of the ``export`` extra, or one line saying how to get it."""
    import importlib

    from split_alexnet.utils.cli import UsageError
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"ONNX export needs the {module} package: "
                         "pip install 'split_alexnet[export]'") from None


# ----------------------------------------------------------------------------- LRN


class _LRN(torch.autograd.Function):
    """LRN over ``groups`` channel groups: the reference formula when traced, ONNX ``LRN``
    nodes in the graph (``symbolic``, the TorchScript exporter's hook)."""

    @staticmethod
    def forward(ctx, x, groups: int, size: int, alpha_on_sum: float, beta: float, k: float):
        parts = x.chunk(groups, dim=1)
        return torch.cat([lrn_reference(p, size, alpha_on_sum, beta, k) for p in parts], dim=1)

    @staticmethod
    def symbolic(g, x, groups, size, alpha_on_sum, beta, k):
        parts = g.op("Split", x, axis_i=1, outputs=groups) if groups > 1 else [x]
        attrs = dict(alpha_f=alpha_on_sum * size, beta_f=beta, bias_f=k, size_i=size)
        ys = [g.op("LRN", p, **attrs) for p in parts]
        return g.op("Concat", *ys, axis_i=1) if groups > 1 else ys[0]


class OnnxLRN(nn.Module):
    """A :class:`LocalResponseNorm` as ONNX ``LRN`` nodes (see the module docstring)."""

    def __init__(self, m: LocalResponseNorm) -> None:
        super().__init__()
        if m.size % 2 == 0:
            raise ValueError(f"LRN size {m.size} is even: ONNX's window differs from this "
                             "project's for even sizes (pytorch issue 75722)")
        self.groups, self.size, self.alpha_on_sum = m.groups, m.size, float(m.alpha)
        self.beta, self.k = float(m.beta), float(m.k)

    @property
    def onnx_alpha(self) -> float:
        return self.alpha_on_sum * self.size

    def forward(self, x: Tensor) -> Tensor:
        return _LRN.apply(x, self.groups, self.size, self.alpha_on_sum, self.beta, self.k)


# ----------------------------------------------------------------------------- the graph


class InferenceNet(nn.Module):
    """The forward function of a collapsed ``AlexNet`` or a ``HalfAlexNet`` in eval mode,
    one call per layer, LRN as :class:`OnnxLRN`; ``mean``: (3, 227, 227) subtracted from
    the input first (the graph then takes raw 0-255 RGB)."""

    def __init__(self, net: nn.Module, mean: Tensor | None = None) -> None:
        super().__init__()
        self.cfg = net.cfg
        for name in WEIGHT_LAYERS:  # the graph's initializers: conv1.weight, ... fc8.bias
            setattr(self, name, getattr(net, name))
        self.lrn = OnnxLRN(net.lrn) if isinstance(net.lrn, LocalResponseNorm) else nn.Identity()
        if mean is not None:
            self.register_buffer("mean", mean.detach().float().reshape(1, 3, INPUT_SIZE,
                                                                       INPUT_SIZE).clone())
        else:
            self.mean = None

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        if self.mean is not None:
            x = x - self.mean
        x = _pool(self.lrn(_act(self.conv1(x), cfg)), cfg)   # (B, 96, 27, 27)
        x = _pool(self.lrn(_act(self.conv2(x), cfg)), cfg)   # (B, 256, 13, 13)
        x = _act(self.conv3(x), cfg)                         # (B, 384, 13, 13)
        x = _act(self.conv4(x), cfg)                         # (B, 384, 13, 13)
        x = _pool(_act(self.conv5(x), cfg), cfg).flatten(1)  # (B, 9216)
        x = _act(self.fc6(x), cfg)                           # (B, 4096); dropout: eval
        x = _act(self.fc7(x), cfg)                           # (B, 4096)
        return self.fc8(x)                                   # (B, num_classes)


def input_description(mean_in_graph: bool) -> str:
    """What the graph's input must be, in one paragraph (also in the file's metadata)."""
    scale = ("raw RGB in 0-255 (float32, not divided by 255); the graph subtracts the "
             "training set's mean image (its centre 227x227 crop) itself") if mean_in_graph \
        else ("raw RGB in 0-255 (float32, not divided by 255) minus the training set's mean "
              "image (its centre 227x227 crop, stored with the weights)")
    return (f"{INPUT}: float32 (batch, 3, {INPUT_SIZE}, {INPUT_SIZE}), channels R, G, B; "
            f"{scale}. Images are prepared as in training: shorter side to 256, the central "
            f"256x256 patch, its centre {INPUT_SIZE}x{INPUT_SIZE} crop. {OUTPUT}: float32 "
            "(batch, classes), before the softmax, classes in the order of the 'classes' "
            "metadata")


def onnx_bytes(net: nn.Module, *, mean: Tensor | None = None, opset: int = OPSET,
               metadata: dict[str, str] | None = None) -> bytes:
    """``net`` (a collapsed AlexNet or a HalfAlexNet, float32, on the CPU) as the bytes of an
    ONNX model: input ``image`` with a dynamic batch dimension, output ``logits``; the
    metadata ``metadata`` plus the input's description and the exporter."""
    onnx = _need("onnx")
    model = InferenceNet(net.eval(), mean).eval()
    example = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # torch >= 2.9: "You are using the legacy TorchScript-based ONNX export" (the choice
        # is deliberate: the module docstring).
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    meta = {"input": input_description(mean is not None),
            "mean_in_graph": json.dumps(mean is not None),
            "exporter": f"torch.onnx.export(dynamo=False), torch {torch.__version__}, "
                        f"split_alexnet {__version__}",
            **(metadata or {})}
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name, proto.producer_version = "split_alexnet", __version__
    proto.doc_string = meta["input"]
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def lrn_nodes(data: bytes) -> list[dict]:
    """The ``LRN`` nodes of an ONNX model, each with its attributes."""
    onnx = _need("onnx")
    proto = onnx.load_from_string(data)
    return [{"name": n.name, **{a.name: onnx.helper.get_attribute_value(a)
                                for a in n.attribute}}
            for n in proto.graph.node if n.op_type == "LRN"]


# ----------------------------------------------------------------------------- checking


def session(data: bytes, *, threads: int | None = None):
    """An onnxruntime CPU session of ``data`` (``threads``: intra-op threads)."""
    ort = _need("onnxruntime")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def example_input(batch: int, *, mean_in_graph: bool, seed: int = 0,
                  scale: float = 1.0) -> Tensor:
    """Inputs in the graph's scale: raw 0-255 values with the mean in the graph, else their
    deviations from the mean (std about 60, as paper-scale images); times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    if mean_in_graph:
        return torch.rand(batch, 3, INPUT_SIZE, INPUT_SIZE, generator=g) * (255 * scale)
    return torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE, generator=g) * (60 * scale)


def errors(ort_out: Tensor, ref: Tensor) -> dict[str, float]:
    """|ONNX - PyTorch|: the largest, the largest relative to the largest |logit|
    (``relative``), and the largest element-wise relative error over the logits of at least
    1e-3 of the largest (``elementwise``)."""
    diff = (ort_out.double() - ref.double()).abs()
    scale = ref.double().abs().max().clamp_min(1e-30)
    big = ref.double().abs() >= 1e-3 * scale
    return {"max_abs": float(diff.max()), "relative": float(diff.max() / scale),
            "elementwise": float((diff[big] / ref.double().abs()[big]).max())}


@torch.no_grad()
def check(data: bytes, net: nn.Module, *, mean: Tensor | None = None, batch: int = 3,
          seed: int = 0, scale: float = 1.0) -> dict:
    """Run the graph in onnxruntime on a batch of ``batch`` (another size than the export's
    2) of :func:`example_input` and compare it with ``net``'s own PyTorch forward (eval
    mode): :func:`errors`, with the batch and onnxruntime's version."""
    ort = _need("onnxruntime")
    x = example_input(batch, mean_in_graph=mean is not None, seed=seed, scale=scale)
    ref = net.eval()(x - mean if mean is not None else x)
    out = torch.from_numpy(session(data).run([OUTPUT], {INPUT: x.numpy()})[0])
    return {"batch": batch, "onnxruntime": ort.__version__, **errors(out, ref)}


@torch.no_grad()
def speed(data: bytes, net: nn.Module, *, batch: int = 16, rounds: int = 5,
          threads: int = 1) -> dict:
    """Images/s of onnxruntime (CPU) and of the PyTorch forward (eval, no_grad) on the same
    batch, interleaved round by round, ``threads`` threads each: the fastest round of each."""
    sess = session(data, threads=threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = example_input(batch, mean_in_graph=False, seed=1)
        feed = {INPUT: x.numpy()}
        net = net.eval()
        sess.run([OUTPUT], feed)
        net(x)  # warm-up (and the LRN kernel's first load)
        best = {"onnxruntime": float("inf"), "pytorch": float("inf")}
        for _ in range(rounds):
            t = time.perf_counter()
            sess.run([OUTPUT], feed)
            best["onnxruntime"] = min(best["onnxruntime"], time.perf_counter() - t)
            t = time.perf_counter()
            net(x)
            best["pytorch"] = min(best["pytorch"], time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return {f"{k}_images_per_s": batch / v for k, v in best.items()} | \
        {"batch": batch, "rounds": rounds, "threads": threads}

