"""FLOPs per image from the layer shapes (docs/benchmarks.md, "FLOP accounting").

Counting rules (one multiply-add = 2 FLOPs; bias adds, ReLU, LRN, pooling, dropout and the
loss are not counted: together they are well under 1% of the total):

* convolution: ``2 * Cin/groups * k * k * Cout * Hout * Wout``
* linear:      ``2 * in * out``
* backward:    for every layer a weight gradient (wgrad, the same FLOPs as the forward) and an
  input gradient (dgrad, the same FLOPs again), except conv1, whose input is the image and
  needs no gradient. So ``backward = 2 * forward - conv1``, a little under 2x.
* a training step = forward + backward.

The two-tower net (``arch="alexnet"``, split or collapsed: the same arithmetic) does
1,448,813,632 FLOPs forward per 227x227 image; torchvision's one-column variant does
1,428,376,960 at 224x224. ``torch.utils.flop_counter.FlopCounterMode`` gives the same
numbers on the real modules (tests/test_bench.py).
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("alexnet", "half", "torchvision")


@dataclass(frozen=True)
class _Conv:
    name: str
    cin: int
    cout: int
    k: int
    stride: int = 1
    pad: int = 0
    groups: int = 1
    pool_after: bool = False  # max-pool 3/2 after the layer (55 -> 27 -> 13 -> 6)


@dataclass(frozen=True)
class _Linear:
    name: str
    fin: int
    fout: int


def _layers(arch: str, num_classes: int):
    if arch == "alexnet":  # the two towers; conv2/4/5 see their own tower only (groups=2)
        convs = [_Conv("conv1", 3, 96, 11, 4, 0, 1, True), _Conv("conv2", 96, 256, 5, 1, 2, 2, True),
                 _Conv("conv3", 256, 384, 3, 1, 1), _Conv("conv4", 384, 384, 3, 1, 1, 2),
                 _Conv("conv5", 384, 256, 3, 1, 1, 2, True)]
    elif arch == "half":  # section 3.2's one-column ablation: half kernels in conv1-4
        convs = [_Conv("conv1", 3, 48, 11, 4, 0, 1, True), _Conv("conv2", 48, 128, 5, 1, 2, 1, True),
                 _Conv("conv3", 128, 192, 3, 1, 1), _Conv("conv4", 192, 192, 3, 1, 1),
                 _Conv("conv5", 192, 256, 3, 1, 1, 1, True)]
    elif arch == "torchvision":  # torchvision.models.alexnet ("one weird trick" widths)
        convs = [_Conv("conv1", 3, 64, 11, 4, 2, 1, True), _Conv("conv2", 64, 192, 5, 1, 2, 1, True),
                 _Conv("conv3", 192, 384, 3, 1, 1), _Conv("conv4", 384, 256, 3, 1, 1),
                 _Conv("conv5", 256, 256, 3, 1, 1, 1, True)]
    else:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    fcs = [_Linear("fc6", 9216, 4096), _Linear("fc7", 4096, 4096),
           _Linear("fc8", 4096, num_classes)]
    return convs, fcs


def default_input_size(arch: str) -> int:
    return 224 if arch == "torchvision" else 227


def flops_per_image(arch: str = "alexnet", *, input_size: int | None = None,
                    num_classes: int = 1000) -> dict:
    """FLOPs for one image: ``{"layers": {name: forward FLOPs}, "forward", "backward",
    "train" (forward + backward), "input_size"}``. See the module docstring for the rules."""
    convs, fcs = _layers(arch, num_classes)
    size = default_input_size(arch) if input_size is None else int(input_size)
    layers: dict[str, int] = {}
    h = size
    for c in convs:
        h = (h + 2 * c.pad - c.k) // c.stride + 1
        if h < 1:
            raise ValueError(f"input {size} is too small for {arch}")
        layers[c.name] = 2 * (c.cin // c.groups) * c.k * c.k * c.cout * h * h
        if c.pool_after:
            h = (h - 3) // 2 + 1
    if arch == "torchvision":
        h = 6  # AdaptiveAvgPool2d((6, 6)) before the classifier (free at 224: already 6x6)
    elif h != 6:
        raise ValueError(f"{arch} needs a {default_input_size(arch)}x{default_input_size(arch)} "
                         f"input (pool5 must be 6x6, got {h}x{h} from {size})")
    for f in fcs:
        layers[f.name] = 2 * f.fin * f.fout
    forward = sum(layers.values())
    backward = 2 * forward - layers["conv1"]  # wgrad everywhere, dgrad everywhere but conv1
    return {"arch": arch, "input_size": size, "layers": layers, "forward": forward,
            "backward": backward, "train": forward + backward}


def flops_per_step(arch: str, mode: str, batch_size: int, **kw) -> int:
    """FLOPs of one step: ``mode`` 'train' (forward + backward) or 'infer' (forward)."""
    f = flops_per_image(arch, **kw)
    return batch_size * (f["train"] if mode == "train" else f["forward"])


if __name__ == "__main__":  # pragma: no cover
    for a in ARCHS:
        f = flops_per_image(a)
        print(f"{a:12s} {f['input_size']}: forward {f['forward'] / 1e9:.4f} GFLOP, backward "
              f"{f['backward'] / 1e9:.4f}, train step {f['train'] / 1e9:.4f} per image")
