"""The last hidden layer (fc7, 4096-d, after its ReLU) for any layout, and the inputs that
the inference tools (``predict``, ``visualize retrieval``) share.

In every layout fc8 reads exactly the fc7 activations, concatenated in tower order (tower 0's
2048 units first): in ``SplitAlexNet.forward`` tower 1's ``layer7`` output is sent to the first
device and concatenated after tower 0's; ``AlexNet`` and ``HalfAlexNet`` feed fc8 the output of
``act(fc7(x))`` (then dropout, which is the identity in eval mode). So :func:`fc7_features`
runs the model's own ``forward`` with a pre-hook on ``fc8`` and returns fc8's input: no copy of
the forward pass that could drift from ``model.py``, one code path for all layouts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from split_alexnet.data.augment import finish_batch
from split_alexnet.data.dataset import CENTER, CROP, tencrop_offsets
from split_alexnet.data.stats import Stats
from split_alexnet.network.parallelize import unwrap

__all__ = ["fc7_features", "forward_with_features", "center_batch", "tencrop_batch",
           "prepare_input"]


class _Captured(Exception):
    """Raised by the fc8 pre-hook to stop the forward pass once fc7 is known (saves fc8)."""


@torch.no_grad()
def forward_with_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(fc7 features (B, 4096), logits (B, classes)) of one forward pass of ``model`` on ``x``.

    The features are the input of fc8: post-activation fc7 of both towers, tower 0 first, on
    the device of fc8 (the first device). Call it on a model in eval mode (no dropout)."""
    net = unwrap(model)
    box: list[Tensor] = []
    handle = net.fc8.register_forward_pre_hook(lambda _m, args: box.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return box[0], logits


@torch.no_grad()
def fc7_features(model: nn.Module, x: Tensor) -> Tensor:
    """fc7 activations (B, 4096), post-ReLU, towers in order 0, 1, for ``x`` (B, 3, 227, 227)
    in the model's input scale (raw 0-255 minus the mean image). Any layout. fc8 is skipped."""
    net = unwrap(model)
    box: list[Tensor] = []

    def hook(_m, args):
        box.append(args[0])
        raise _Captured

    handle = net.fc8.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not box:  # pragma: no cover - a model whose forward does not reach fc8
        raise RuntimeError("the model's forward never reached fc8")
    return box[0]


def center_batch(images: Tensor) -> dict:
    """Batch dict for :func:`split_alexnet.data.finish_batch` from (B, 3, 256, 256) uint8
    images: the 227 centre crop, no flip, no colour noise."""
    b = images.shape[0]
    crop = images[:, :, CENTER:CENTER + CROP, CENTER:CENTER + CROP].contiguous()
    return {"image": crop, "top": torch.full((b,), CENTER, dtype=torch.int64),
            "left": torch.full((b,), CENTER, dtype=torch.int64),
            "flip": torch.zeros(b, dtype=torch.bool), "alpha": torch.zeros((b, 3)),
            "pca": "off"}


def tencrop_batch(images: Tensor) -> dict:
    """Batch dict (``image`` (B, 10, 3, 227, 227)) of the paper's ten crops, in
    :data:`split_alexnet.data.TENCROP_ORDER`, from (B, 3, 256, 256) uint8 images."""
    crops = []
    for t, l, f in tencrop_offsets():
        c = images[:, :, t:t + CROP, l:l + CROP]
        crops.append(c.flip(-1) if f else c)
    return {"image": torch.stack(crops, dim=1).contiguous()}


def prepare_input(images: Tensor, stats: Stats, device, *, ten_crop: bool = False) -> Tensor:
    """(B, 3, 256, 256) uint8 -> the network's input on ``device``: (B, 3, 227, 227) centre
    crops, or (B, 10, 3, 227, 227) ten crops, minus the mean image, raw 0-255 scale."""
    batch = tencrop_batch(images) if ten_crop else center_batch(images)
    return finish_batch(batch, stats, device)
