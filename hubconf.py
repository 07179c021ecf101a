"""torch.hub entries of split_alexnet: the original two-GPU AlexNet (Krizhevsky, Sutskever &
Hinton, NIPS 2012), collapsed onto one device or as two towers (docs/deploy.md).

    import torch
    net = torch.hub.load("path/to/split_alexnet", "alexnet", source="local",
                         weights="alexnet.safetensors").eval()
    towers = torch.hub.load("path/to/split_alexnet", "split_alexnet", source="local",
                            devices="cuda:0,cuda:1", num_classes=10)
"""

from split_alexnet.tools.hub import build as _build

dependencies = ["torch", "torchvision", "numpy", "PIL"]

_ARGS = """
    weights: None (a new network, initialised by ``init``), or the path of a checkpoint of
        this project (written by train in either layout, or by split_alexnet.convert) or of
        a ``.safetensors`` weights file (split_alexnet.export). Its network is built: the
        fields below, if given, must agree with it. The network then carries ``classes``,
        ``class_names`` and ``mean_image`` ((3, 256, 256) raw 0-255 RGB).
    {devices}
    arch, num_classes, init, lrn, lrn_span, activation, pool, dropout: the ModelConfig
        fields (split_alexnet/network/model.py; the training flags of the same names):
        arch 'alexnet' (or 'half', the one-column ablation, collapsed only), num_classes
        1000, init 'paper' | 'cuda-convnet2' | 'caffe', lrn 'paper' | 'alpha-over-n' |
        'caffe' | 'off', lrn_span 'tower' | 'all', activation 'relu' | 'tanh', pool '3/2' |
        '2/2', dropout 0.5.

    Input: float32 (B, 3, 227, 227), raw 0-255 RGB minus the mean image's centre crop.
    Returns the module in training mode, as torch.nn modules start: call .eval() to
    predict.
"""


def alexnet(weights=None, *, devices="cpu", **config):
    return _build("collapsed", devices, weights, **config)


def split_alexnet(weights=None, *, devices="cpu,cpu", **config):
    return _build("split", devices, weights, **config)


alexnet.__doc__ = (
    "The collapsed layout (AlexNet): both towers' weights on one device, grouped "
    "convolutions, per-tower LRN; the same function as the two towers.\n"
    + _ARGS.format(devices="devices: the one device ('cpu', 'cuda:0'); default 'cpu'."))
split_alexnet.__doc__ = (
    "The paper's two towers (SplitAlexNet), tower i on devices[i], the four cross-device "
    "links recorded in net.traffic.\n"
    + _ARGS.format(devices="devices: two devices, one per tower ('cuda:0,cuda:1', "
                           "('cuda:0', 'cpu'), one named twice); default 'cpu,cpu'."))
