"""Weight files: the one reader of a network's weights for every tool, and the safetensors
format that shares the weights without a training checkpoint's optimizer state and RNG.

:func:`read_weights` takes either kind of file and returns a checkpoint-shaped dict (the keys
the tools read: ``model``, ``model_config``, ``classes``, ``class_names``, ``stats``,
``stats_fingerprint``, ``checksum``), checked alike: every tensor's shape against the network
the file declares, a checksum, and finite values. A file that cannot be used is one
:class:`CheckpointError`. ``--init-from``, ``evaluate``, ``predict``, ``visualize``, the
exporter and ``hubconf.py`` all read through it.

    a training checkpoint (``.pt``, a zip archive)  ->  ``checkpoint.load_checkpoint``
    a weights file (``.safetensors``)               ->  :func:`load_safetensors`

Which one a file is comes from its first bytes, not its name.

The safetensors file (:func:`save_safetensors`) holds the weights only, under the collapsed
layout's names and shapes (Caffe's: ``conv1.weight`` (96, 3, 11, 11) ... ``fc8.bias``), in the
checkpoint's dtype, and its metadata (strings, as the format requires) holds the rest:

    format             "split_alexnet/weights-v2" (v2: the checksum reads tensors through CRC-32)
    model_config       the ModelConfig as JSON ({"arch": "alexnet", "num_classes": 1000, ...})
    classes            the class folder names (or wnids) in label order, JSON
    class_names        human-readable names in label order, JSON
    mean               the training set's mean image, (3, 256, 256) RGB 0-255: JSON with
                       "dtype", "shape" and "base64" (the little-endian bytes)
    eigval, eigvec     the RGB colour statistics (JSON lists; PCA noise of a fine-tuning run)
    stats_fingerprint  the statistics' fingerprint, as in the checkpoint
    source             the checkpoint it was written from (its file name and checksum)
    checksum           as a checkpoint's (``checkpoint_file.checksum``): a sha256 over every
                       metadata value and every tensor's dtype, shape and CRC-32

Any safetensors reader opens it (``safetensors.torch.load_file``; ``safe_open(...).metadata()``
for the rest); this project's reader refuses one without this metadata, or whose checksum,
shapes or values are wrong, with one line.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
import torch

from split_alexnet import __version__
# The checkpoint file format, imported here only: every other module reads weights through
# this one.
from split_alexnet.utils.checkpoint_file import (CheckpointError, check_shapes,
                                                 checkpoint_stats, checksum, load_checkpoint,
                                                 model_config, nonfinite, other_version)
from split_alexnet.utils.fileio import atomic_write

__all__ = ["CheckpointError", "FORMAT", "read_weights", "save_safetensors", "load_safetensors",
           "safetensors_bytes", "model_config", "checkpoint_stats", "is_safetensors"]

FORMAT = "split_alexnet/weights-v2"
SUFFIX = ".safetensors"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def _safetensors():
    """The ``safetensors`` package, or one line that says how to install it."""
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError("safetensors files need the safetensors package: "
                              "pip install 'split_alexnet[export]'") from None
    return safe_open, safetensors.torch


def is_safetensors(path: Path | str) -> bool:
    """Whether the file starts as a safetensors file does: an 8-byte little-endian header
    length, then the header's JSON object (a zip archive, as torch.save writes, starts with
    ``PK``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def read_weights(path: Path | str) -> dict:
    """A network's weights and what the tools need with them, from a training checkpoint or
    a safetensors weights file: a checkpoint-shaped dict (see the module docstring), or a
    :class:`CheckpointError` with one line."""
    path = Path(path)
    if path.is_file() and is_safetensors(path):
        return load_safetensors(path)
    return load_checkpoint(path)


# ----------------------------------------------------------------------------- writing


def _encode_tensor(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"cannot store a {name} mean image")
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return json.dumps({"dtype": name, "shape": list(t.shape),
                       "base64": base64.b64encode(data).decode("ascii")})


def _decode_tensor(text: str) -> torch.Tensor:
    obj = json.loads(text)
    dtype, shape = _DTYPES[obj["dtype"]], [int(n) for n in obj["shape"]]
    raw = bytearray(base64.b64decode(obj["base64"], validate=True))
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone() \
        if raw else torch.zeros(shape, dtype=dtype)


def _metadata_checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    return checksum({"model": tensors, "metadata": {k: v for k, v in meta.items()
                                                    if k != "checksum"}})


def safetensors_bytes(payload: dict, *, source: str = "") -> bytes:
    """A checkpoint's (``read_weights``) weights and metadata as the bytes of a safetensors
    file (see the module docstring). ``source``: the name of the file they came from."""
    _, st = _safetensors()
    cfg = model_config(payload)
    stats = checkpoint_stats(payload)
    classes = [str(c) for c in payload["classes"]]
    names = payload.get("class_names")
    if not (isinstance(names, (list, tuple)) and len(names) == len(classes)):
        names = classes
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in payload["model"].items()}
    meta = {
        "format": FORMAT,
        "model_config": json.dumps(dataclasses.asdict(cfg)),
        "classes": json.dumps(classes),
        "class_names": json.dumps([str(n) for n in names]),
        "mean": _encode_tensor(stats.mean),
        "eigval": json.dumps(stats.eigval.double().tolist()),
        "eigvec": json.dumps(stats.eigvec.double().tolist()),
        "stats_fingerprint": stats.fingerprint,
        "source": json.dumps({"file": source, "checksum": str(payload.get("checksum", ""))}),
        "code_version": __version__,
    }
    meta["checksum"] = _metadata_checksum(tensors, meta)
    return st.save(tensors, metadata=meta)


def save_safetensors(path: Path | str, payload: dict, *, source: str = "") -> None:
    """:func:`safetensors_bytes` written atomically to ``path``."""
    data = safetensors_bytes(payload, source=source)
    atomic_write(Path(path), lambda f: f.write(data), private=False, uncached=True)


# ----------------------------------------------------------------------------- reading


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def load_safetensors(path: Path | str) -> dict:
    """A weights file of this project as a checkpoint-shaped dict, checked: its metadata,
    the shapes the declared network needs (nothing missing or extra), the checksum and
    finite values. Anything else (a foreign safetensors file, a damaged one) is one
    :class:`CheckpointError`."""
    path = Path(path)
    safe_open, _ = _safetensors()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(
                    other_version(meta.get("format"), path, FORMAT, "weights file") or
                    f"{path} is a safetensors file but not a split_alexnet weights file (its "
                    f"metadata names no {FORMAT!r} format)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or corrupt header, offsets beyond the file
        raise CheckpointError(f"{path} is not a readable safetensors file: "
                              f"{_first_line(e)}") from None
    try:
        payload = {
            "format": FORMAT,
            "model": tensors,
            "model_config": json.loads(meta["model_config"]),
            "classes": json.loads(meta["classes"]),
            "class_names": json.loads(meta["class_names"]),
            "stats": {"mean": _decode_tensor(meta["mean"]),
                      "eigval": torch.tensor(json.loads(meta["eigval"]), dtype=torch.float32),
                      "eigvec": torch.tensor(json.loads(meta["eigvec"]), dtype=torch.float32)},
            "stats_fingerprint": meta.get("stats_fingerprint", ""),
            "source": json.loads(meta.get("source", "{}")),
            "checksum": meta["checksum"],
        }
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its split_alexnet metadata is damaged "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(payload["model_config"], dict):
        raise CheckpointError(f"{path}: its split_alexnet metadata is damaged (model_config)")
    check_shapes(payload, path)
    if _metadata_checksum(tensors, meta) != meta["checksum"]:
        raise CheckpointError(f"{path} is corrupt: checksum mismatch")
    bad = nonfinite(payload)
    if bad:
        raise CheckpointError(f"{path} holds non-finite values ({bad}): the weights of a "
                              "diverged run, not usable")
    model_config(payload)  # a usable ModelConfig, or one line
    return payload
