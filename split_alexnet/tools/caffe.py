"""Read Caffe's binary protobuf files (a ``.caffemodel`` NetParameter, a ``.binaryproto``
BlobProto) with a small wire-format reader of the few fields a converter needs.

No protobuf package and no generated code: the reader walks the protobuf wire format
(varints, fixed32/fixed64, length-delimited fields) with bounds checks on every length, and
maps packed float arrays straight onto numpy views of the file's bytes (no per-element Python
objects for the 61 million weights of bvlc_alexnet). Unknown fields are skipped, as protobuf
does. Anything malformed (truncated, garbage, a field with the wrong wire type, a blob whose
data does not fill its shape) raises :class:`CaffeFormatError` with one line saying what and
where; nothing in a file is ever executed.

Messages and field numbers, from BVLC/caffe ``src/caffe/proto/caffe.proto``:

    NetParameter      name=1, layer=100 (LayerParameter), layers=2 (V1LayerParameter, old files)
    LayerParameter    name=1, type=2 (string), blobs=7; convolution_param=106,
                      inner_product_param=117, lrn_param=118, pooling_param=121, relu_param=123
    V1LayerParameter  name=4, type=5 (enum LayerType), blobs=6; convolution_param=10,
                      inner_product_param=17, lrn_param=18, pooling_param=19, relu_param=30;
                      layer=1 is the even older V0 format (refused)
    BlobProto         shape=7 (BlobShape: dim=1, packed int64), data=5 (packed float),
                      double_data=8 (packed double), num=1, channels=2, height=3, width=4
                      (the legacy 4-D shape, which Caffe prefers when any of them is set)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # protobuf wire types (3 and 4, groups, are obsolete)

# V1LayerParameter.LayerType -> the type string of the current format (the ones a
# classification net uses; any other number is reported as "V1 type N").
V1_TYPES = {1: "Accuracy", 4: "Convolution", 5: "Data", 6: "Dropout", 9: "HDF5Data",
            12: "ImageData", 14: "InnerProduct", 15: "LRN", 17: "Pooling", 18: "ReLU",
            20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split", 24: "WindowData",
            29: "MemoryData", 32: "DummyData", 36: "Silence"}

# Layer hyper-parameters read from the layer's *_param message: {field: (name, kind)} with kind
# "u" unsigned varint, "i" signed varint, "f" float32. Every value is kept as a list (Caffe
# declares pad, kernel_size and stride repeated).
_CONV = {1: ("num_output", "u"), 2: ("bias_term", "u"), 3: ("pad", "u"), 4: ("kernel_size", "u"),
         5: ("group", "u"), 6: ("stride", "u"), 9: ("pad_h", "u"), 10: ("pad_w", "u"),
         11: ("kernel_h", "u"), 12: ("kernel_w", "u"), 13: ("stride_h", "u"),
         14: ("stride_w", "u"), 16: ("axis", "i"), 18: ("dilation", "u")}
_POOL = {1: ("pool", "u"), 2: ("kernel_size", "u"), 3: ("stride", "u"), 4: ("pad", "u"),
         5: ("kernel_h", "u"), 6: ("kernel_w", "u"), 7: ("stride_h", "u"), 8: ("stride_w", "u"),
         9: ("pad_h", "u"), 10: ("pad_w", "u"), 12: ("global_pooling", "u")}
_LRN = {1: ("local_size", "u"), 2: ("alpha", "f"), 3: ("beta", "f"), 4: ("norm_region", "u"),
        5: ("k", "f")}
_IP = {1: ("num_output", "u"), 2: ("bias_term", "u"), 5: ("axis", "i"), 6: ("transpose", "u")}
_RELU = {1: ("negative_slope", "f")}
#             name, type, blobs, {param field: schema}
_LAYER = (1, 2, 7, {106: _CONV, 117: _IP, 118: _LRN, 121: _POOL, 123: _RELU})
_V1_LAYER = (4, 5, 6, {10: _CONV, 17: _IP, 18: _LRN, 19: _POOL, 30: _RELU})


class CaffeFormatError(ValueError):
    """Bytes that are not a well-formed Caffe message of the kind asked for."""


@dataclass
class Blob:
    """One BlobProto: its shape as written (legacy files: num, channels, height, width) and its
    values, flat, float32 (a read-only view of the file's bytes where possible)."""

    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class Layer:
    name: str
    type: str
    blobs: list[Blob] = field(default_factory=list)
    params: dict[str, list] = field(default_factory=dict)
    """The hyper-parameters the file sets (absent ones take caffe.proto's defaults)."""


@dataclass
class Net:
    name: str
    format: str
    """'layer' (the current LayerParameter field) or 'layers (V1)'."""
    layers: list[Layer]


# ----------------------------------------------------------------------------- wire format

def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise CaffeFormatError(f"truncated: a number at byte {pos} runs past the end")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise CaffeFormatError(f"malformed: a number longer than 10 bytes before byte {pos}")


def _fields(buf: bytes, start: int, end: int):
    """Yield (field number, wire type, value) for each field of the message in
    ``buf[start:end]``: value is the number for a varint, else the (start, end) byte range of
    the field's payload."""
    pos = start
    while pos < end:
        at = pos
        key, pos = _varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise CaffeFormatError(f"malformed: field number 0 at byte {at}")
        if wt == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield num, wt, value
            continue
        if wt == _LEN:
            n, pos = _varint(buf, pos, end)
        elif wt in (_I32, _I64):
            n = 4 if wt == _I32 else 8
        else:
            raise CaffeFormatError(f"malformed: wire type {wt} (field {num}) at byte {at}")
        if pos + n > end:
            raise CaffeFormatError(f"truncated: field {num} at byte {at} needs {n} bytes, "
                                   f"{end - pos} remain")
        yield num, wt, (pos, pos + n)
        pos += n


def _expect(wt: int, allowed: tuple[int, ...], what: str) -> None:
    if wt not in allowed:
        raise CaffeFormatError(f"malformed: {what} has wire type {wt}")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v  # int32/int64 negatives are 10-byte varints


def _numbers(buf: bytes, wt: int, value, kind: str, what: str) -> list:
    """One field's values: a single varint / fixed32, or a packed run of them."""
    if kind == "f":
        _expect(wt, (_I32, _LEN), what)
        s, e = value
        if (e - s) % 4:
            raise CaffeFormatError(f"malformed: {what} is {e - s} bytes, not whole floats")
        return [float(x) for x in np.frombuffer(buf, "<f4", (e - s) // 4, s)]
    _expect(wt, (_VARINT, _LEN), what)
    if wt == _VARINT:
        out = [value]
    else:
        out, pos = [], value[0]
        while pos < value[1]:
            v, pos = _varint(buf, pos, value[1])
            out.append(v)
    return [_signed(v) for v in out] if kind == "i" else out


def _array(buf: bytes, wt: int, value, dtype: str, what: str) -> np.ndarray:
    """A packed float/double field (or one unpacked element) as a numpy view."""
    size = np.dtype(dtype).itemsize
    _expect(wt, (_LEN, _I32 if size == 4 else _I64), what)
    s, e = value
    if (e - s) % size:
        raise CaffeFormatError(f"malformed: {what} is {e - s} bytes, not a whole number of "
                               f"{size}-byte values")
    return np.frombuffer(buf, dtype, (e - s) // size, s)


def _text(buf: bytes, wt: int, value, what: str) -> str:
    _expect(wt, (_LEN,), what)
    try:
        return buf[value[0]:value[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise CaffeFormatError(f"malformed: {what} is not UTF-8 text") from None


# ----------------------------------------------------------------------------- messages

def _blob(buf: bytes, start: int, end: int) -> Blob:
    dims: list[int] | None = None
    legacy: dict[int, int] = {}
    floats, doubles = [], []
    for num, wt, value in _fields(buf, start, end):
        if num == 7:
            _expect(wt, (_LEN,), "BlobProto.shape")
            dims = []
            for n2, wt2, v2 in _fields(buf, *value):
                if n2 == 1:
                    dims += _numbers(buf, wt2, v2, "i", "BlobShape.dim")
        elif num == 5:
            floats.append(_array(buf, wt, value, "<f4", "BlobProto.data"))
        elif num == 8:
            doubles.append(_array(buf, wt, value, "<f8", "BlobProto.double_data"))
        elif num in (1, 2, 3, 4):
            _expect(wt, (_VARINT,), "BlobProto.num/channels/height/width")
            legacy[num] = _signed(value)
    # Caffe's Blob::FromProto: the legacy 4-D shape wins when any of its fields is set.
    if legacy:
        shape = tuple(legacy.get(i, 0) for i in (1, 2, 3, 4))
    else:
        shape = tuple(dims or ())
    if any(d < 0 for d in shape):
        raise CaffeFormatError(f"malformed: a blob with shape {shape}")
    parts = floats or doubles
    data = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0)
    if data.dtype != np.float32:
        data = data.astype(np.float32)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if data.size != count:
        raise CaffeFormatError(f"a blob of shape {'x'.join(map(str, shape)) or '()'} holds "
                               f"{data.size} values, not {count}")
    return Blob(shape, data)


def _layer(buf: bytes, start: int, end: int, v1: bool) -> Layer:
    name_f, type_f, blobs_f, param_fields = _V1_LAYER if v1 else _LAYER
    kind = "V1LayerParameter" if v1 else "LayerParameter"
    layer = Layer(name="", type="")
    params = []
    for num, wt, value in _fields(buf, start, end):
        if num == name_f:
            layer.name = _text(buf, wt, value, f"{kind}.name")
        elif num == type_f and v1:
            _expect(wt, (_VARINT,), f"{kind}.type")
            layer.type = V1_TYPES.get(value, f"V1 type {value}")
        elif num == type_f:
            layer.type = _text(buf, wt, value, f"{kind}.type")
        elif num == blobs_f:
            _expect(wt, (_LEN,), f"{kind}.blobs")
            layer.blobs.append(_blob(buf, *value))
        elif num in param_fields:
            _expect(wt, (_LEN,), f"{kind} field {num}")
            params.append((param_fields[num], value))
        elif v1 and num == 1:
            raise CaffeFormatError("a layer in Caffe's V0 format (V1LayerParameter.layer); "
                                   "upgrade the file with Caffe's upgrade_net_proto_binary")
    for schema, (s, e) in params:
        for num, wt, value in _fields(buf, s, e):
            if num in schema:
                key, t = schema[num]
                what = f"{layer.name or kind}.{key}"
                layer.params.setdefault(key, []).extend(_numbers(buf, wt, value, t, what))
    return layer


def parse_net(buf: bytes) -> Net:
    """A NetParameter (a ``.caffemodel``) in either layer format."""
    name, new, old = "", [], []
    for num, wt, value in _fields(buf, 0, len(buf)):
        if num == 1:
            name = _text(buf, wt, value, "NetParameter.name")
        elif num == 100:
            _expect(wt, (_LEN,), "NetParameter.layer")
            new.append(_layer(buf, *value, v1=False))
        elif num == 2:
            _expect(wt, (_LEN,), "NetParameter.layers")
            old.append(_layer(buf, *value, v1=True))
    if new and old:
        raise CaffeFormatError("it mixes the current `layer` and the V1 `layers` fields")
    if not (new or old):
        raise CaffeFormatError("no layers: not a Caffe NetParameter")
    return Net(name, "layer" if new else "layers (V1)", new or old)


def parse_blob(buf: bytes) -> Blob:
    """A BlobProto (a ``.binaryproto`` such as Caffe's mean image)."""
    if not buf:
        raise CaffeFormatError("empty file")
    return _blob(buf, 0, len(buf))

