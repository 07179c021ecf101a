"""Test helpers for the Caffe converter: a protobuf writer for synthetic Caffe files, and
bvlc_alexnet's forward pass in float64 numpy written from Caffe's layer definitions.

Nothing here imports split_alexnet: the writer encodes the wire format itself (field numbers
from BVLC/caffe src/caffe/proto/caffe.proto), and the forward pass follows Caffe's layers
(src/caffe/layers/{conv,relu,lrn,pooling,inner_product,dropout}_layer.cpp), not this
repository's model code.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# ----------------------------------------------------------------------------- the network

# models/bvlc_alexnet/train_val.prototxt, in order (the data layer and the loss included).
ALEXNET_PROTOTXT: list[tuple[str, str, dict]] = [
    ("data", "Data", {}),
    ("conv1", "Convolution", dict(num_output=96, kernel_size=11, stride=4)),
    ("relu1", "ReLU", {}),
    ("norm1", "LRN", dict(local_size=5, alpha=0.0001, beta=0.75)),
    ("pool1", "Pooling", dict(pool=0, kernel_size=3, stride=2)),
    ("conv2", "Convolution", dict(num_output=256, pad=2, kernel_size=5, group=2)),
    ("relu2", "ReLU", {}),
    ("norm2", "LRN", dict(local_size=5, alpha=0.0001, beta=0.75)),
    ("pool2", "Pooling", dict(pool=0, kernel_size=3, stride=2)),
    ("conv3", "Convolution", dict(num_output=384, pad=1, kernel_size=3)),
    ("relu3", "ReLU", {}),
    ("conv4", "Convolution", dict(num_output=384, pad=1, kernel_size=3, group=2)),
    ("relu4", "ReLU", {}),
    ("conv5", "Convolution", dict(num_output=256, pad=1, kernel_size=3, group=2)),
    ("relu5", "ReLU", {}),
    ("pool5", "Pooling", dict(pool=0, kernel_size=3, stride=2)),
    ("fc6", "InnerProduct", dict(num_output=4096)),
    ("relu6", "ReLU", {}),
    ("drop6", "Dropout", dict(dropout_ratio=0.5)),
    ("fc7", "InnerProduct", dict(num_output=4096)),
    ("relu7", "ReLU", {}),
    ("drop7", "Dropout", dict(dropout_ratio=0.5)),
    ("fc8", "InnerProduct", dict(num_output=1000)),
    ("loss", "SoftmaxWithLoss", {}),
]

# Caffe's blob shapes for bvlc_alexnet (weights; the bias has the first dimension).
CAFFE_SHAPES = {"conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
                "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3), "fc6": (4096, 9216),
                "fc7": (4096, 4096), "fc8": (1000, 4096)}


def random_blobs(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random float32 weights of bvlc_alexnet's shapes, He-scaled so activations keep their
    size through the ReLUs (and the LRN, with activations of ~100, is far from linear).
    conv1's filter 0 sees only Caffe's channel 0 (blue), filter 1 only channel 2 (red)."""
    rng = np.random.default_rng(seed)
    blobs = {}
    for name, shape in CAFFE_SHAPES.items():
        fan_in = int(np.prod(shape[1:]))
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        b = rng.standard_normal(shape[0], dtype=np.float32) * np.float32(0.1)
        blobs[name] = (w, b)
    w, b = blobs["conv1"]
    w[0:2] = 0.0
    w[0, 0] = 0.01  # blue only
    w[1, 2] = 0.01  # red only
    b[0:2] = 0.0
    return blobs


# ----------------------------------------------------------------------------- the writer

_V1_TYPE = {"Data": 5, "Convolution": 4, "ReLU": 18, "LRN": 15, "Pooling": 17,
            "InnerProduct": 14, "Dropout": 6, "SoftmaxWithLoss": 21}
# the *_param message of each type: (field in LayerParameter, in V1LayerParameter, and the
# numbers and kinds of its fields)
_PARAMS = {
    "Convolution": (106, 10, dict(num_output=(1, "u"), pad=(3, "u"), kernel_size=(4, "u"),
                                  group=(5, "u"), stride=(6, "u"))),
    "Pooling": (121, 19, dict(pool=(1, "u"), kernel_size=(2, "u"), stride=(3, "u"))),
    "LRN": (118, 18, dict(local_size=(1, "u"), alpha=(2, "f"), beta=(3, "f"), k=(5, "f"))),
    "InnerProduct": (117, 17, dict(num_output=(1, "u"))),
    "Dropout": (108, 12, dict(dropout_ratio=(1, "f"))),
}


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative number is its 64-bit two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(num: int, wire: int) -> bytes:
    return varint(num << 3 | wire)


def _msg(num: int, chunks: list) -> list:
    """A length-delimited field as a list of byte chunks (big arrays are never copied)."""
    return [_key(num, 2) + varint(sum(len(c) for c in chunks))] + chunks


def _scalar(num: int, kind: str, value) -> bytes:
    return (_key(num, 5) + struct.pack("<f", value) if kind == "f"
            else _key(num, 0) + varint(int(value)))


def _text(num: int, s: str) -> bytes:
    return b"".join(_msg(num, [s.encode()]))


def blob_chunks(a: np.ndarray, legacy: bool) -> list:
    """A BlobProto: ``legacy`` writes num/channels/height/width (leading ones up to 4-D), as
    2014's files do; otherwise a BlobShape with packed dims."""
    a = np.ascontiguousarray(a, dtype="<f4")
    if legacy:
        dims = (1,) * (4 - a.ndim) + a.shape
        head = [b"".join(_scalar(i, "u", d) for i, d in enumerate(dims, start=1))]
    else:
        head = _msg(7, _msg(1, [b"".join(varint(d) for d in a.shape)]))
    return head + _msg(5, [memoryview(a).cast("B")])


def layer_chunks(name: str, typ: str, params: dict, blobs=(), *, v1: bool) -> list:
    if v1:
        chunks = [_text(4, name), _scalar(5, "u", _V1_TYPE[typ])]
    else:
        chunks = [_text(1, name), _text(2, typ)]
    for a in blobs:
        chunks += _msg(6 if v1 else 7, blob_chunks(a, legacy=v1))
    if params:
        new_field, v1_field, fields = _PARAMS[typ]
        body = [_scalar(fields[k][0], fields[k][1], v) for k, v in params.items()]
        chunks += _msg(v1_field if v1 else new_field, body)
    return chunks


def net_chunks(spec, blobs: dict, *, v1: bool, name: str = "AlexNet") -> list:
    """A NetParameter of ``spec``'s layers in the V1 ``layers`` field (2) or the current
    ``layer`` field (100), with ``blobs[name]`` as each layer's blobs."""
    chunks = [_text(1, name)]
    for lname, typ, params in spec:
        chunks += _msg(2 if v1 else 100, layer_chunks(lname, typ, params, blobs.get(lname, ()),
                                                      v1=v1))
    return chunks


def write_net(path: Path, spec, blobs: dict, *, v1: bool) -> Path:
    with open(path, "wb") as f:
        f.writelines(net_chunks(spec, blobs, v1=v1))
    return path


def write_blob(path: Path, a: np.ndarray, *, legacy: bool = True) -> Path:
    with open(path, "wb") as f:
        f.writelines(blob_chunks(a, legacy))
    return path


# ----------------------------------------------------------------------------- Caffe's layers

def convolution(x, w, b, *, stride=1, pad=0, group=1):
    """ConvolutionLayer: cross-correlation, zero padding, output (H + 2 pad - k) / stride + 1
    (floor); with ``group`` g, output group i sees only input channel group i."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    assert c == cg * group and o % group == 0
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride][:, :, :oh, :ow]
    og = o // group
    out = [np.einsum("nchwij,ocij->nohw", cols[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og],
                     optimize=True) for g in range(group)]
    return np.concatenate(out, axis=1) + b[None, :, None, None]


def relu(x):
    return np.maximum(x, 0.0)


def lrn_across_channels(x, local_size, alpha, beta, k=1.0):
    """LRNLayer, ACROSS_CHANNELS: scale_c = k + alpha / local_size * sum of x_j^2 over
    j in [c - (local_size - 1) / 2, c + local_size / 2], clipped to the channels (the zero
    padding of CrossChannelForward); y = x * scale^-beta. One window over ALL channels."""
    c = x.shape[1]
    pre = (local_size - 1) // 2
    sq = np.pad(x * x, ((0, 0), (pre, local_size - 1 - pre), (0, 0), (0, 0)))
    scale = k + alpha / local_size * sum(sq[:, i:i + c] for i in range(local_size))
    return x * scale ** -beta


def max_pool(x, kernel, stride):
    """PoolingLayer MAX, no padding: output ceil((H - k) / stride) + 1, windows clipped to the
    input (Caffe rounds up; for AlexNet's 55, 27, 13 the result is the same as rounding down)."""
    n, c, h, w = x.shape
    ph, pw = -(-(h - kernel) // stride) + 1, -(-(w - kernel) // stride) + 1
    out = np.empty((n, c, ph, pw), dtype=x.dtype)
    for i in range(ph):
        for j in range(pw):
            hs, ws = i * stride, j * stride
            window = x[:, :, hs:min(hs + kernel, h), ws:min(ws + kernel, w)]
            out[:, :, i, j] = window.max(axis=(2, 3))
    return out


def inner_product(x, w, b):
    """InnerProductLayer: the bottom flattened from axis 1 in (C, H, W) order, times W^T."""
    return x.reshape(x.shape[0], -1) @ w.T + b


def bvlc_alexnet(blobs: dict, x: np.ndarray) -> np.ndarray:
    """fc8 of bvlc_alexnet in TEST phase (Dropout is the identity) for ``x``: (N, 3, 227, 227)
    BGR, 0-255 minus the mean. Everything in float64."""
    p = {k: (w.astype(np.float64), b.astype(np.float64)) for k, (w, b) in blobs.items()}
    x = x.astype(np.float64)                                                    # (N, 3, 227, 227)

    def norm(t):  # norm1, norm2: local_size 5, alpha 1e-4, beta 0.75, k 1 (the default)
        return lrn_across_channels(t, 5, 1e-4, 0.75)

    x = max_pool(norm(relu(convolution(x, *p["conv1"], stride=4))), 3, 2)        # (N, 96, 27, 27)
    x = max_pool(norm(relu(convolution(x, *p["conv2"], pad=2, group=2))), 3, 2)  # (N, 256, 13, 13)
    x = relu(convolution(x, *p["conv3"], pad=1))                                # (N, 384, 13, 13)
    x = relu(convolution(x, *p["conv4"], pad=1, group=2))                       # (N, 384, 13, 13)
    x = max_pool(relu(convolution(x, *p["conv5"], pad=1, group=2)), 3, 2)       # (N, 256, 6, 6)
    x = relu(inner_product(x, *p["fc6"]))                                       # (N, 4096)
    x = relu(inner_product(x, *p["fc7"]))                                       # (N, 4096)
    return inner_product(x, *p["fc8"])                                          # (N, 1000)
