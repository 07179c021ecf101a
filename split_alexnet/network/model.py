"""The 2012 AlexNet as plain math (Krizhevsky, Sutskever, Hinton, NIPS 2012, Figure 2).

Three networks, one set of rules:

* ``SplitAlexNet``: the paper's two columns ("towers"), each on its own device. The towers
  talk at exactly four places, all through ``SplitAlexNet._send``: into conv3 (each tower gets
  the other's pooled conv2 maps), into fc6, into fc7, and into fc8 (tower 1's fc7 output goes
  to the first device, where fc8 lives, as in cuda-convnet2); with ``lrn_span="all"`` also
  into norm1 and norm2 (below).
* ``AlexNet``: the same function on one device, with grouped convolutions (groups=2 in conv2,
  conv4, conv5) like Caffe's bvlc_alexnet, but with LRN and dropout applied to each half
  separately, so that it computes exactly what the towers compute.

``lrn_span="all"`` is Caffe's reading of LRN (its window runs across all channels, over the
tower boundary): the collapsed layout then normalises all 96 (256) channels at once, and the
towers exchange the two channels on each side of the boundary before they normalise (a "halo",
two more transfers into norm1 and norm2, sent through ``_send`` like the others).
* ``HalfAlexNet``: the paper's one-device ablation (section 3.2): half the kernels in
  conv1-conv4, conv5 and the FC layers at full size.

Global channel and unit order is always tower 0 then tower 1, so every parameter of the
collapsed layout is the dim-0 concatenation of the two towers' parameters.

Nothing in this file names a device: every network is built on the CPU, and
``placement.py`` (``place``, ``build_model``) puts it on its devices.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from split_alexnet.network.lrn import LocalResponseNorm

INPUT_SIZE = 227  # the paper's "224" cannot give 55x55 after an 11x11 stride-4 conv; see docs
TOWER_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
WEIGHT_LAYERS = TOWER_LAYERS + ("fc8",)  # every layer with parameters, in order


def layers_through(last: str) -> tuple[str, ...]:
    """``last`` and every tower layer before it ('conv2' -> conv1, conv2)."""
    return TOWER_LAYERS[:TOWER_LAYERS.index(last) + 1]
ARCHS = ("alexnet", "half")
ACTIVATIONS = ("relu", "tanh")
POOLS = ("3/2", "2/2")
LRN_CHOICES = ("paper", "alpha-over-n", "caffe", "off")
LRN_SPANS = ("tower", "all")
# Each LRN choice but "off": (how alpha is read, k). alpha 1e-4, n 5, beta 0.75 in all.
LRN_CONSTANTS = {"paper": ("paper", 2.0), "alpha-over-n": ("alpha-over-n", 2.0),
                 "caffe": ("alpha-over-n", 1.0)}
INIT_SCHEMES = ("paper", "cuda-convnet2", "caffe")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network: which net, its switches, and how its weights
    start (saved inside every checkpoint). ``help`` and ``choices`` in each field's metadata
    are the training flags' help text and allowed values (``--arch``, ``--lrn``, ...)."""

    arch: str = field(default="alexnet", metadata={
        "choices": ARCHS,
        "help": "'alexnet' (two towers) or 'half' (the paper's one-device ablation, section "
                "3.2: always the single-device layout)."})
    num_classes: int = 1000
    """Units in fc8 (training takes it from the dataset's class folders: not a flag)."""
    # None (in code, not a flag value): built without initialising, for weights loaded next.
    init: str | None = field(default="paper", metadata={
        "choices": INIT_SCHEMES,
        "help": "'paper' (biases 1, std 0.01), 'cuda-convnet2' (std 0.03 in conv3-5), 'caffe' "
                "(biases 0.1)."})
    lrn: str = field(default="paper", metadata={
        "choices": LRN_CHOICES,
        "help": "'paper': alpha=1e-4 multiplies the window's sum of squares (section 3.3, as "
                "printed); 'alpha-over-n': Krizhevsky's code, alpha/n on the sum; 'caffe': "
                "alpha/n with Caffe's k=1 (not 2); 'off': no LRN (an ablation)."})
    lrn_span: str = field(default="tower", metadata={
        "choices": LRN_SPANS,
        "help": "Where the LRN window reaches: 'tower' (the paper: each tower normalises its "
                "own maps) or 'all' (Caffe's bvlc_alexnet: one window across both towers' "
                "channels; the split layout then exchanges the two border channels of each "
                "tower, counted in net.traffic)."})
    activation: str = field(default="relu", metadata={
        "choices": ACTIVATIONS, "help": "'relu' (the paper) or 'tanh' (Figure 1's comparison)."})
    pool: str = field(default="3/2", metadata={
        "choices": POOLS,
        "help": "'3/2': overlapping max-pool, window 3, stride 2 (section 3.4); '2/2': "
                "non-overlapping."})
    dropout: float = field(default=0.5, metadata={
        "help": "Dropout probability on the outputs of fc6 and fc7 (section 4.2)."})

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        for f in fields(self):
            allowed, value = f.metadata.get("choices"), getattr(self, f.name)
            if allowed and value not in allowed and not (f.name == "init" and value is None):
                raise ValueError(f"{f.name} must be one of {', '.join(allowed)}; got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


def model_config(cfg: ModelConfig | int | None = None, *, arch: str = "alexnet",
                 **fields) -> ModelConfig:
    """A network's config: ``cfg`` (with ``fields`` changed), or the defaults with ``fields``;
    an int is the class count (``AlexNet(10)``). Every network is built from one, and it
    must be of the network's ``arch``."""
    if isinstance(cfg, ModelConfig):
        cfg = replace(cfg, **fields) if fields else cfg
    else:
        cfg = ModelConfig(**({"num_classes": cfg} if cfg is not None else {}), arch=arch,
                          **fields)
    if cfg.arch != arch:
        raise ValueError(f"a ModelConfig of arch {cfg.arch!r} builds "
                         f"{'HalfAlexNet' if cfg.arch == 'half' else 'AlexNet or SplitAlexNet'}")
    return cfg


# --------------------------------------------------------------------------------------
# Small functional pieces shared by all layouts


def _act(x: Tensor, cfg: ModelConfig) -> Tensor:
    return F.relu(x) if cfg.activation == "relu" else torch.tanh(x)


def _pool(x: Tensor, cfg: ModelConfig) -> Tensor:
    k = 3 if cfg.pool == "3/2" else 2
    return F.max_pool2d(x, kernel_size=k, stride=2)  # 55 -> 27 -> 13 -> 6 with either choice


def _make_lrn(cfg: ModelConfig, groups: int = 1) -> nn.Module:
    """The LRN of ``cfg.lrn`` over ``groups`` separate blocks of channels (2 in the collapsed
    layout with span 'tower': each tower's half on its own, never across the boundary)."""
    if cfg.lrn == "off":
        return nn.Identity()
    reading, k = LRN_CONSTANTS[cfg.lrn]
    return LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=k, reading=reading, groups=groups)


def _halves(fn, x: Tensor) -> Tensor:
    """Apply ``fn`` to each tower's half of the channels (dim 1), tower 0 first."""
    a, b = x.chunk(2, dim=1)
    return torch.cat([fn(a), fn(b)], dim=1)


def _by_output_half(layer: nn.Module, x: Tensor) -> Tensor:
    """A layer whose towers both read the whole input (conv1, conv3, fc6, fc7), computed as
    two output halves: exactly the towers' arithmetic, so gradients match the split layout
    bit for bit on the CPU. One full GEMM would sum the input gradient in another order, and
    CPU convolution kernels block a 96-channel weight gradient differently from a 48-channel
    one. The parameters keep Caffe's full shapes; only the call is halved."""
    w0, w1 = layer.weight.chunk(2, dim=0)
    b0, b1 = layer.bias.chunk(2, dim=0)
    if isinstance(layer, nn.Conv2d):
        return torch.cat([layer._conv_forward(x, w0, b0), layer._conv_forward(x, w1, b1)], dim=1)
    return torch.cat([F.linear(x, w0, b0), F.linear(x, w1, b1)], dim=1)


def check_input(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(
            f"AlexNet takes images of shape (B, 3, {INPUT_SIZE}, {INPUT_SIZE}) (the paper's "
            f"\"224\" cannot give conv1's 55x55 output: (224 - 11) / 4 + 1 is not an integer, "
            f"({INPUT_SIZE} - 11) / 4 + 1 = 55); got {tuple(x.shape)}")


# --------------------------------------------------------------------------------------
# Initialisation, chosen by layer name (section 5)

_BIAS_ONE = {"conv2", "conv4", "conv5", "fc6", "fc7"}  # "biases ... constant 1" (section 5)


def init_values(layer: str, scheme: str) -> tuple[float, float]:
    """(std, bias) for a parameter of ``layer``: the weight's std, or the bias constant.

    paper: N(0, 0.01) weights; biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.
    cuda-convnet2: the paper's, with std 0.03 in conv3-conv5.
    caffe (bvlc_alexnet): std 0.005 in fc6/fc7, and biases 0.1 where the paper has 1.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {', '.join(INIT_SCHEMES)}; got {scheme!r}")
    std, bias = 0.01, (1.0 if layer in _BIAS_ONE else 0.0)
    if scheme == "cuda-convnet2" and layer in ("conv3", "conv4", "conv5"):
        std = 0.03
    if scheme == "caffe":
        if layer in ("fc6", "fc7"):
            std = 0.005
        if bias == 1.0:
            bias = 0.1
    return std, bias


@torch.no_grad()
def _init_(name: str, t: Tensor, scheme: str) -> None:
    *_, layer, kind = name.split(".")
    std, bias = init_values(layer, scheme)
    if kind == "weight":
        t.normal_(0.0, std)
    else:
        t.fill_(bias)


def layers_made() -> AbstractContextManager:
    """Where a network makes its layers: on the meta device, so that torch's default
    initialisation, whose 61 M values ``cfg.init`` would overwrite, draws nothing (0.25 s a
    build on one core, docs/benchmarks.md). :func:`initialise` ends the construction."""
    return torch.device("meta")


def initialise(model: nn.Module, cfg: ModelConfig) -> None:
    """A network's last step of construction: memory on the default device for the layers
    made in :func:`layers_made`, then ``cfg.init``'s values by parameter name
    (:func:`init_weights_`, the first draws from the global generator), or, with init None,
    nothing: the weights are loaded next."""
    model.to_empty(device=torch.get_default_device())
    if cfg.init is not None:
        init_weights_(model, cfg.init)


@torch.no_grad()
def init_weights_(model: nn.Module, scheme: str = "paper") -> None:
    """Initialise ``model`` in place by parameter name.

    A SplitAlexNet draws its values in the collapsed layout's shapes and order, so that the
    same seed gives identical weights in both layouts.
    """
    if isinstance(model, SplitAlexNet):
        state = {name: torch.empty(shape) for name, shape in
                 collapsed_shapes(model.cfg.num_classes).items()}
        for name, t in state.items():
            _init_(name, t, scheme)
        model.load_state_dict(state)
    else:
        for name, p in model.named_parameters():
            _init_(name, p, scheme)


# --------------------------------------------------------------------------------------
# State-dict conversion between layouts: every collapsed tensor is the towers' dim-0 concat


def collapsed_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the collapsed layout, in order (Caffe's bvlc_alexnet shapes)."""
    shapes = {
        "conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
        "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3), "fc6": (4096, 9216),
        "fc7": (4096, 4096), "fc8": (num_classes, 4096),
    }
    out: dict[str, tuple[int, ...]] = {}
    for layer, w in shapes.items():
        out[f"{layer}.weight"] = w
        out[f"{layer}.bias"] = (w[0],)
    return out


def split_state_dict(sd: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Collapsed -> split keys, in place (and returned). Unrelated keys are left alone."""
    for layer in TOWER_LAYERS:
        for kind in ("weight", "bias"):
            key = f"{prefix}{layer}.{kind}"
            if key in sd:
                a, b = sd.pop(key).chunk(2, dim=0)
                sd[f"{prefix}towers.0.{layer}.{kind}"] = a
                sd[f"{prefix}towers.1.{layer}.{kind}"] = b
    return sd


def collapse_state_dict(sd: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Split -> collapsed keys, in place (and returned). Tower 1's tensors move to tower 0's
    device."""
    for layer in TOWER_LAYERS:
        for kind in ("weight", "bias"):
            k0, k1 = f"{prefix}towers.0.{layer}.{kind}", f"{prefix}towers.1.{layer}.{kind}"
            if k0 in sd and k1 in sd:
                a, b = sd.pop(k0), sd.pop(k1)
                sd[f"{prefix}{layer}.{kind}"] = torch.cat([a, b.to(a.device)], dim=0)
    return sd


def _accept_split_keys(state_dict, prefix, *args) -> None:  # load_state_dict pre-hook
    collapse_state_dict(state_dict, prefix)


def _accept_collapsed_keys(state_dict, prefix, *args) -> None:  # load_state_dict pre-hook
    split_state_dict(state_dict, prefix)


# --------------------------------------------------------------------------------------
# The collapsed single-device layout


class AlexNet(nn.Module):
    """The two-column network on one device: grouped convolutions, per-half LRN (one window
    over all channels with ``lrn_span="all"``) and per-half dropout."""

    def __init__(self, cfg: ModelConfig | int | None = None, **fields) -> None:
        super().__init__()
        self.cfg = cfg = model_config(cfg, **fields)
        with layers_made():
            self.conv1 = nn.Conv2d(3, 96, 11, stride=4)                 # both halves see it
            self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)     # half-local
            self.conv3 = nn.Conv2d(256, 384, 3, padding=1)              # crosses the halves
            self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)    # half-local
            self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)    # half-local
            self.fc6 = nn.Linear(9216, 4096)                            # crosses the halves
            self.fc7 = nn.Linear(4096, 4096)                            # crosses the halves
            self.fc8 = nn.Linear(4096, cfg.num_classes)
        # per half, as the towers normalise; span "all": one window over both halves
        self.lrn = _make_lrn(cfg, groups=2 if cfg.lrn_span == "tower" else 1)
        self._register_load_state_dict_pre_hook(_accept_split_keys)
        initialise(self, cfg)

    def _dropout(self, x: Tensor) -> Tensor:
        # One mask per half, drawn in tower order: the towers draw the same masks.
        return _halves(lambda h: F.dropout(h, self.cfg.dropout, self.training), x)

    def features(self, x: Tensor) -> Tensor:
        """conv1 to pool5, both halves: (B, 3, 227, 227) -> (B, 9216), fc6's input."""
        check_input(x)
        cfg = self.cfg
        x = _by_output_half(self.conv1, x)                           # (B, 96, 55, 55)
        x = _pool(self.lrn(_act(x, cfg)), cfg)                       # (B, 96, 27, 27)
        x = _pool(self.lrn(_act(self.conv2(x), cfg)), cfg)           # (B, 256, 13, 13)
        x = _act(_by_output_half(self.conv3, x), cfg)                # (B, 384, 13, 13)
        x = _act(self.conv4(x), cfg)                                 # (B, 384, 13, 13)
        x = _pool(_act(self.conv5(x), cfg), cfg)                     # (B, 256, 6, 6)
        return x.flatten(1)                                          # (B, 9216)

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        x = self.features(x)                                         # (B, 9216)
        x = self._dropout(_act(_by_output_half(self.fc6, x), cfg))   # (B, 4096)
        x = self._dropout(_act(_by_output_half(self.fc7, x), cfg))   # (B, 4096)
        return self.fc8(x)                                           # (B, num_classes)

    def split(self) -> "SplitAlexNet":
        """The same weights as two towers, both on this network's device (dtype kept);
        ``placement.place(net, devices)`` moves them apart."""
        net = SplitAlexNet(replace(self.cfg, init=None), dtype=self.fc8.weight.dtype)
        net.to(self.fc8.weight.device)
        net.load_state_dict(self.state_dict())
        return net.train(self.training)


# --------------------------------------------------------------------------------------
# The two towers


class Tower(nn.Module):
    """One column of Figure 2. Its layers take both towers' outputs only at conv3, fc6, fc7."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, 48, 11, stride=4)
        self.conv2 = nn.Conv2d(48, 128, 5, padding=2)
        self.conv3 = nn.Conv2d(256, 192, 3, padding=1)  # input: both towers' conv2 maps
        self.conv4 = nn.Conv2d(192, 192, 3, padding=1)
        self.conv5 = nn.Conv2d(192, 128, 3, padding=1)
        self.fc6 = nn.Linear(9216, 2048)                # input: both towers' pool5
        self.fc7 = nn.Linear(4096, 2048)                # input: both towers' fc6
        self.lrn = _make_lrn(cfg)

    # layer1 and layer2 stop before their LRN and pooling (norm_pool), where the towers may
    # exchange a halo of channels (SplitAlexNet._norm_pool).
    def layer1(self, x: Tensor) -> Tensor:  # (B, 3, 227, 227) -> (B, 48, 55, 55)
        return _act(self.conv1(x), self.cfg)

    def layer2(self, x: Tensor) -> Tensor:  # (B, 48, 27, 27) -> (B, 128, 27, 27)
        return _act(self.conv2(x), self.cfg)

    def norm_pool(self, x: Tensor) -> Tensor:  # (B, C, 55, 55) -> (B, C, 27, 27), or 27 -> 13
        return _pool(self.lrn(x), self.cfg)

    def layer3(self, x: Tensor) -> Tensor:  # (B, 256, 13, 13) -> (B, 192, 13, 13)
        return _act(self.conv3(x), self.cfg)

    def layer4(self, x: Tensor) -> Tensor:  # (B, 192, 13, 13) -> (B, 192, 13, 13)
        return _act(self.conv4(x), self.cfg)

    def layer5(self, x: Tensor) -> Tensor:  # (B, 192, 13, 13) -> (B, 4608)
        return _pool(_act(self.conv5(x), self.cfg), self.cfg).flatten(1)  # (B, 128*6*6)

    def layer6(self, x: Tensor) -> Tensor:  # (B, 9216) -> (B, 2048)
        return F.dropout(_act(self.fc6(x), self.cfg), self.cfg.dropout, self.training)

    def layer7(self, x: Tensor) -> Tensor:  # (B, 4096) -> (B, 2048)
        return F.dropout(_act(self.fc7(x), self.cfg), self.cfg.dropout, self.training)


@dataclass(frozen=True)
class Transfer:
    """One tensor crossing between the towers in a forward pass."""

    layer: str               # the layer that consumes it: conv3, fc6, fc7 or fc8 (and
                             # norm1, norm2 with lrn_span "all")
    src: int                 # sending tower
    dst: int                 # receiving tower
    src_device: str
    dst_device: str
    shape: tuple[int, ...]
    bytes: int               # counted even when both towers share a device


def transfer(x: Tensor, device: torch.device) -> Tensor:
    """Move ``x`` to ``device``. Asynchronous where that is safe: device-to-device and
    host-to-device copies are queued on the streams; a copy to the host must block, or the
    host would read memory the copy has not filled yet."""
    if x.device == device:
        return x
    return x.to(device, non_blocking=device.type != "cpu")


class SplitAlexNet(nn.Module):
    """The paper's network as two towers (tower 0 first in every concat). It is built on the
    CPU, as every module is; ``placement.place(net, devices)`` puts tower i on devices[i]."""

    def __init__(self, cfg: ModelConfig | int | None = None, *,
                 dtype: torch.dtype | None = None, **fields) -> None:
        super().__init__()
        self.cfg = cfg = model_config(cfg, **fields)
        with layers_made():
            self.towers = nn.ModuleList([Tower(cfg), Tower(cfg)])
            self.fc8 = nn.Linear(4096, cfg.num_classes)  # with tower 0, as in cuda-convnet2
        self._register_load_state_dict_pre_hook(_accept_collapsed_keys)
        # net.traffic: the tensors that crossed between the towers in the last forward pass
        # (reset by every forward). Forward transfers only: the backward pass sends the
        # gradients of the same tensors the other way, as many bytes, and is not recorded.
        self.traffic: list[Transfer] = []
        if dtype is not None:
            self.to(dtype)
        initialise(self, cfg)

    @property
    def devices(self) -> tuple[torch.device, torch.device]:
        return (self.towers[0].conv1.weight.device, self.towers[1].conv1.weight.device)

    # The one place where tensors cross between towers -----------------------------------
    def _send(self, x: Tensor, src: int, dst: int, layer: str) -> Tensor:
        device = self.fc8.weight.device if layer == "fc8" else self.devices[dst]
        self.traffic.append(Transfer(layer, src, dst, str(x.device), str(device),
                                     tuple(x.shape), x.numel() * x.element_size()))
        return transfer(x, device)

    def _exchange(self, h: list[Tensor], layer: str) -> list[Tensor]:
        """Each tower receives the other's output; both concat in tower order (0, 1)."""
        from1 = self._send(h[1], 1, 0, layer)
        from0 = self._send(h[0], 0, 1, layer)
        return [torch.cat([h[0], from1], dim=1), torch.cat([from0, h[1]], dim=1)]

    def _norm_pool(self, h: list[Tensor], layer: str) -> list[Tensor]:
        """Each tower's LRN and max-pooling. With lrn_span 'all' the LRN window crosses the
        boundary, as one window over the collapsed layout's channels does: tower 0 receives
        tower 1's first ``hi`` channels and tower 1 tower 0's last ``lo`` (the 2 + 2 channels
        of the halo, for Caffe's window of 5), each tower normalises its maps with the halo
        beside them and drops the halo's outputs."""
        t = self.towers
        if self.cfg.lrn_span == "tower" or self.cfg.lrn == "off":
            return [t[i].norm_pool(h[i]) for i in (0, 1)]
        lo = t[0].lrn.size // 2
        hi = t[0].lrn.size - 1 - lo
        from1 = self._send(h[1][:, :hi], 1, 0, layer)                # (B, hi, H, W)
        from0 = self._send(h[0][:, -lo:], 0, 1, layer)               # (B, lo, H, W)
        n0 = t[0].lrn(torch.cat([h[0], from1], dim=1))[:, :-hi]      # (B, C, H, W)
        n1 = t[1].lrn(torch.cat([from0, h[1]], dim=1))[:, lo:]       # (B, C, H, W)
        return [_pool(n0, self.cfg), _pool(n1, self.cfg)]

    def forward(self, x: Tensor) -> Tensor:
        check_input(x)
        self.traffic = []
        t = self.towers
        # Each tower gets its own copy of the batch (not traffic between towers).
        h = [transfer(x, d) for d in self.devices]       # (B, 3, 227, 227) on each device
        # Layer by layer, tower 0 then tower 1: no host sync, so two GPUs run concurrently.
        h = [t[i].layer1(h[i]) for i in (0, 1)]           # (B, 48, 55, 55)
        h = self._norm_pool(h, "norm1")                   # (B, 48, 27, 27)
        h = [t[i].layer2(h[i]) for i in (0, 1)]           # (B, 128, 27, 27)
        h = self._norm_pool(h, "norm2")                   # (B, 128, 13, 13)
        h = self._exchange(h, "conv3")                    # (B, 256, 13, 13)
        h = [t[i].layer3(h[i]) for i in (0, 1)]           # (B, 192, 13, 13)
        h = [t[i].layer4(h[i]) for i in (0, 1)]           # (B, 192, 13, 13)
        h = [t[i].layer5(h[i]) for i in (0, 1)]           # (B, 4608)
        h = self._exchange(h, "fc6")                      # (B, 9216)
        h = [t[i].layer6(h[i]) for i in (0, 1)]           # (B, 2048)
        h = self._exchange(h, "fc7")                      # (B, 4096)
        h = [t[i].layer7(h[i]) for i in (0, 1)]           # (B, 2048)
        h = torch.cat([h[0], self._send(h[1], 1, 0, "fc8")], dim=1)  # (B, 4096) on device 0
        return self.fc8(h)                                # (B, num_classes) on device 0

    def collapse(self, device: str | torch.device | None = None) -> AlexNet:
        """The same weights as the single-device ``AlexNet`` on ``device`` (default: tower
        0's device), dtype kept."""
        device = self.devices[0] if device is None else torch.device(device)
        net = AlexNet(replace(self.cfg, init=None))
        net.to(device=device, dtype=self.fc8.weight.dtype)
        net.load_state_dict(self.state_dict())
        return net.train(self.training)


# --------------------------------------------------------------------------------------
# The paper's one-device ablation (section 3.2)


class HalfAlexNet(nn.Module):
    """One column with half the kernels in conv1-conv4 (48, 128, 192, 192), conv5 at 256 and
    full-size FC layers: the "one GPU" net the paper compares the two towers against."""

    def __init__(self, cfg: ModelConfig | int | None = None, **fields) -> None:
        super().__init__()
        self.cfg = cfg = model_config(cfg, arch="half", **fields)
        with layers_made():
            self.conv1 = nn.Conv2d(3, 48, 11, stride=4)
            self.conv2 = nn.Conv2d(48, 128, 5, padding=2)
            self.conv3 = nn.Conv2d(128, 192, 3, padding=1)
            self.conv4 = nn.Conv2d(192, 192, 3, padding=1)
            self.conv5 = nn.Conv2d(192, 256, 3, padding=1)
            self.fc6 = nn.Linear(9216, 4096)
            self.fc7 = nn.Linear(4096, 4096)
            self.fc8 = nn.Linear(4096, cfg.num_classes)
        self.lrn = _make_lrn(cfg)  # one column: its window spans all its channels
        initialise(self, cfg)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x)
        cfg, p = self.cfg, self.cfg.dropout
        x = _pool(self.lrn(_act(self.conv1(x), cfg)), cfg)           # (B, 48, 27, 27)
        x = _pool(self.lrn(_act(self.conv2(x), cfg)), cfg)           # (B, 128, 13, 13)
        x = _act(self.conv3(x), cfg)                                 # (B, 192, 13, 13)
        x = _act(self.conv4(x), cfg)                                 # (B, 192, 13, 13)
        x = _pool(_act(self.conv5(x), cfg), cfg).flatten(1)          # (B, 9216)
        x = F.dropout(_act(self.fc6(x), cfg), p, self.training)      # (B, 4096)
        x = F.dropout(_act(self.fc7(x), cfg), p, self.training)      # (B, 4096)
        return self.fc8(x)                                           # (B, num_classes)


def layout_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A layout-independent state (the collapsed layout's keys and shapes), on the CPU, of a
    plain network (not its DDP or compile wrapper: ``parallelize.unwrap``)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return cpu_snapshot(sd, split=isinstance(model, SplitAlexNet))


def cpu_snapshot(sd: dict[str, Tensor], *, split: bool) -> dict[str, Tensor]:
    """``sd`` as CPU tensors that share no memory with it, in the collapsed layout's keys
    (``split``: ``sd`` has the towers' keys). The towers' tensors are joined into new ones, so
    only the others are copied (one copy of each tensor, not two: 250 MB less to allocate per
    checkpoint of the split layout)."""
    if not split:
        return {k: v.to("cpu", copy=True) for k, v in sd.items()}
    own = set(sd)
    return {k: v.to("cpu", copy=k in own) for k, v in collapse_state_dict(dict(sd)).items()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
