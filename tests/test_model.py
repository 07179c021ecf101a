"""The two-tower network, its collapsed layout, and proof that they are one function.

On the CPU both layouts perform the same floating-point operations in the same order, so the
equivalence tests demand bitwise equality (``torch.equal``). GPU tests use a stated tolerance.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F

from helpers import paper_images as images
from split_alexnet import (AlexNet, HalfAlexNet, ModelConfig, SplitAlexNet, build_model,
                           collapse_state_dict, count_parameters, layout_state_dict, place,
                           split_state_dict)
from split_alexnet.network.model import WEIGHT_LAYERS, init_values
from split_alexnet.network.placement import resolve_devices
from split_alexnet.utils.cli import UsageError
from split_alexnet.training.optim import PaperSGD

B = 3  # batch used by most tests: small, and odd so nothing divides by accident




@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    split = SplitAlexNet(num_classes=10)
    return split, split.collapse()


def grads(model) -> dict[str, torch.Tensor]:
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return collapse_state_dict(g) if isinstance(model, SplitAlexNet) else g


# ----------------------------------------------------------------------------- shapes


def test_parameter_counts_match_the_paper():
    torch.manual_seed(0)
    split = SplitAlexNet(num_classes=1000, init=None)
    assert count_parameters(split) == 60_965_224
    assert count_parameters(split.collapse()) == 60_965_224
    fc6 = split.towers[0].fc6.weight.numel() + split.towers[1].fc6.weight.numel() + 4096
    assert fc6 == 37_752_832
    # The paper's ablation: half the kernels in conv1-conv4, conv5 and FC layers full size.
    assert count_parameters(HalfAlexNet(1000, init=None)) == 59_798_312


def test_collapsed_parameters_have_caffe_shapes_in_order():
    net = AlexNet(num_classes=1000, init=None)
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [
        (96, 3, 11, 11), (96,), (256, 48, 5, 5), (256,), (384, 256, 3, 3), (384,),
        (384, 192, 3, 3), (384,), (256, 192, 3, 3), (256,), (4096, 9216), (4096,),
        (4096, 4096), (4096,), (1000, 4096), (1000,)]


def test_per_layer_output_shapes(pair):
    split, _ = pair
    seen = {}
    hooks = []
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
        for t in (0, 1):
            mod = getattr(split.towers[t], name)
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, key=(name, t): seen.__setitem__(key, (i[0].shape, o.shape))))
    split.eval()
    with torch.no_grad():
        out = split(images(B))
    for h in hooks:
        h.remove()
    per_tower = {"conv1": (48, 55, 55), "conv2": (128, 27, 27), "conv3": (192, 13, 13),
                 "conv4": (192, 13, 13), "conv5": (128, 13, 13), "fc6": (2048,), "fc7": (2048,)}
    for (name, t), (inp, o) in seen.items():
        assert tuple(o) == (B, *per_tower[name]), (name, t)
    # Both towers together: 96x55x55, 256x27x27, 384x13x13, 384x13x13, 256x13x13, 4096, 4096.
    assert tuple(seen[("conv3", 0)][0]) == (B, 256, 13, 13)  # conv3 reads both towers
    assert tuple(seen[("fc6", 1)][0]) == (B, 9216)            # 6*6*256 into fc6
    assert tuple(seen[("fc7", 0)][0]) == (B, 4096)
    assert tuple(out.shape) == (B, 10)


def test_half_net_shapes():
    net = HalfAlexNet(num_classes=7).eval()
    widths = [net.conv1.out_channels, net.conv2.out_channels, net.conv3.out_channels,
              net.conv4.out_channels, net.conv5.out_channels, net.fc6.out_features,
              net.fc7.out_features]
    assert widths == [48, 128, 192, 192, 256, 4096, 4096]
    with torch.no_grad():
        assert tuple(net(images(2)).shape) == (2, 7)


# ----------------------------------------------------------------------------- LRN per tower


def lrn_loop(a: torch.Tensor, alpha=1e-4, beta=0.75, k=2.0, n=5) -> torch.Tensor:
    """The paper's formula, literally, over one tower's channels."""
    N = a.shape[1]
    out = torch.empty_like(a)
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        s = sum(a[:, j] ** 2 for j in range(lo, hi + 1))
        out[:, i] = a[:, i] / (k + alpha * s) ** beta
    return out


def test_collapsed_lrn_normalises_each_half_separately():
    x = torch.randn(2, 96, 4, 5, dtype=torch.float64) * 80
    got = AlexNet(10, init=None).lrn(x)  # the collapsed layout's LRN module
    want = torch.cat([lrn_loop(x[:, :48]), lrn_loop(x[:, 48:])], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # Crossing the boundary between the halves would be a different function:
    assert not torch.allclose(got, lrn_loop(x), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- placement, traffic


def test_parameters_live_on_their_towers_device(pair):
    split, _ = pair
    d0, d1 = split.devices
    for name, p in split.named_parameters():
        want = d1 if name.startswith("towers.1.") else d0
        assert p.device == want, name


def test_traffic_lists_the_seven_transfers_with_bytes(pair):
    split, _ = pair
    split.eval()
    with torch.no_grad():
        split(images(5))
    rows = [(t.layer, t.src, t.dst, t.shape, t.bytes) for t in split.traffic]
    f32 = 4
    assert rows == [
        ("conv3", 1, 0, (5, 128, 13, 13), 5 * 128 * 13 * 13 * f32),
        ("conv3", 0, 1, (5, 128, 13, 13), 5 * 128 * 13 * 13 * f32),
        ("fc6", 1, 0, (5, 4608), 5 * 4608 * f32),
        ("fc6", 0, 1, (5, 4608), 5 * 4608 * f32),
        ("fc7", 1, 0, (5, 2048), 5 * 2048 * f32),
        ("fc7", 0, 1, (5, 2048), 5 * 2048 * f32),
        ("fc8", 1, 0, (5, 2048), 5 * 2048 * f32),
    ]
    # The report is for the last forward only.
    with torch.no_grad():
        split(images(2))
    assert len(split.traffic) == 7 and split.traffic[0].shape[0] == 2


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layouts_agree_exactly_in_eval(dtype):
    torch.manual_seed(1)
    split = SplitAlexNet(10, dtype=dtype).eval()
    coll = split.collapse().eval()
    assert coll.fc8.weight.dtype == dtype
    x = images(B, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(split(x), coll(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layouts_agree_exactly_in_training_with_dropout(dtype):
    torch.manual_seed(2)
    split = SplitAlexNet(10, dtype=dtype, init="caffe")
    coll = split.collapse()
    before = layout_state_dict(split)["fc6.weight"]
    assert split.training and coll.training
    opt_s = PaperSGD(split.parameters(), lr=0.01)
    opt_c = PaperSGD(coll.parameters(), lr=0.01)
    labels = torch.tensor([0, 7])
    for step in range(2):
        x = images(2, dtype=dtype, seed=step)
        torch.manual_seed(100 + step)  # the same dropout masks in both layouts
        loss_s = F.cross_entropy(split(x), labels)
        torch.manual_seed(100 + step)
        loss_c = F.cross_entropy(coll(x), labels)
        assert torch.equal(loss_s, loss_c), step
        opt_s.zero_grad()
        opt_c.zero_grad()
        loss_s.backward()
        loss_c.backward()
        gs, gc = grads(split), grads(coll)
        for k in gc:
            assert torch.equal(gs[k], gc[k]), (step, k)
        opt_s.step()
        opt_c.step()
    ps, pc = layout_state_dict(split), layout_state_dict(coll)
    for k in pc:
        assert torch.equal(ps[k], pc[k]), k
    # And the steps really moved the weights (so equality is not vacuous).
    assert not torch.equal(ps["fc6.weight"], before)


def test_dropout_masks_differ_between_draws_and_halves(pair):
    split, _ = pair
    split.train()
    x = images(2)
    torch.manual_seed(5)
    a = split(x)
    torch.manual_seed(6)
    b = split(x)
    assert not torch.equal(a, b)


def test_round_trips_are_lossless_and_keep_dtype():
    torch.manual_seed(3)
    split = SplitAlexNet(10, dtype=torch.float64)
    back = split.collapse().split()
    assert back.fc8.weight.dtype == torch.float64
    a, b = split.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_state_dicts_load_across_layouts():
    torch.manual_seed(4)
    split = SplitAlexNet(10)
    coll = AlexNet(10, init=None)
    coll.load_state_dict(split.state_dict())          # split keys into the collapsed layout
    other = SplitAlexNet(10, init=None)
    other.load_state_dict(coll.state_dict())          # collapsed keys into the towers
    ref = layout_state_dict(split)
    for model in (coll, other):
        got = layout_state_dict(model)
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    # The conversion is a pure reshuffle: dim-0 halves, tower 0 first.
    sd = split_state_dict(dict(coll.state_dict()))
    assert torch.equal(sd["towers.1.conv2.weight"], coll.conv2.weight[128:])
    assert torch.equal(sd["towers.0.fc7.bias"], coll.fc7.bias[:2048])


def test_same_seed_same_weights_in_both_layouts():
    torch.manual_seed(9)
    a = layout_state_dict(SplitAlexNet(10))
    torch.manual_seed(9)
    b = AlexNet(10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


# ----------------------------------------------------------------------------- init


@pytest.mark.parametrize("scheme", ["paper", "cuda-convnet2", "caffe"])
def test_initialisation_by_layer_name(scheme):
    torch.manual_seed(0)
    net = AlexNet(1000, init=scheme)
    expected_bias_one = {"paper": 1.0, "cuda-convnet2": 1.0, "caffe": 0.1}[scheme]
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        w = getattr(net, layer).weight.detach()
        b = getattr(net, layer).bias.detach()
        std, bias = init_values(layer, scheme)
        want_bias = expected_bias_one if layer in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert bias == want_bias
        assert torch.all(b == want_bias), layer
        # Sample std within 5 standard errors of the target, mean near 0.
        n = w.numel()
        tol = 5 * std * math.sqrt(2 / n) + 1e-12
        assert abs(w.std().item() - std) < max(tol, 0.02 * std), (layer, w.std().item(), std)
        assert abs(w.mean().item()) < 5 * std / math.sqrt(n) + 1e-6
    if scheme == "paper":
        assert init_values("conv3", scheme)[0] == 0.01
    if scheme == "cuda-convnet2":
        assert init_values("conv4", scheme)[0] == 0.03
    if scheme == "caffe":
        assert init_values("fc6", scheme)[0] == 0.005


@pytest.mark.parametrize("cls", [AlexNet, SplitAlexNet, HalfAlexNet])
def test_a_network_built_for_loading_draws_nothing(cls):
    """init None (evaluate, predict, export, a resume): the layers are made on the meta
    device and then given memory, without torch's default initialisation, so the generator is
    where it was; the parameters are CPU tensors that take a state like any network's."""
    torch.manual_seed(4)
    source = cls(10, init="caffe")
    before = torch.get_rng_state()
    net = cls(10, init=None)
    assert torch.equal(torch.get_rng_state(), before)
    assert {p.device for p in net.parameters()} == {torch.device("cpu")}
    net.load_state_dict(source.state_dict())
    for (name, p), q in zip(net.named_parameters(), source.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("cls", [AlexNet, SplitAlexNet, HalfAlexNet])
def test_the_init_draws_first(cls):
    """A network to train is made on the meta device too: torch's default initialisation
    draws nothing, so ``--init``'s values are the seeded generator's first draws (conv1's
    weights first, then every layer in order, fc8's last: the collapsed layout's shapes and
    order in both layouts), and the generator then stands where those draws leave it."""
    torch.manual_seed(3)
    net = cls(10, init="paper")
    after = torch.get_rng_state()
    state = layout_state_dict(net)
    weights = {layer: state[f"{layer}.weight"] for layer in WEIGHT_LAYERS}
    torch.manual_seed(3)
    drawn = {layer: torch.empty(w.shape).normal_(0.0, 0.01) for layer, w in weights.items()}
    assert torch.equal(torch.get_rng_state(), after)
    for layer, w in weights.items():
        assert torch.equal(w, drawn[layer]), layer


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("devices, words", [
    (("cpu",), "exactly two devices"),
    (("cpu", "cpu", "cpu"), "exactly two devices"),
    (("cpu", "gpu7"), "unknown device"),
    ("cpu,banana", "unknown device"),
])
def test_bad_devices_raise_clear_value_errors(devices, words):
    with pytest.raises(ValueError, match=words):
        place(SplitAlexNet(10, init=None), devices)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_missing_gpu_is_named():
    with pytest.raises(ValueError, match="cuda:1 requested but this machine has no CUDA"):
        place(SplitAlexNet(10, init=None), ("cpu", "cuda:1"))


@pytest.mark.parametrize("n", [0, -3])
def test_bad_class_count(n):
    with pytest.raises(ValueError, match="num_classes"):
        SplitAlexNet(n)
    with pytest.raises(ValueError, match="num_classes"):
        AlexNet(n)


def test_wrong_input_size_names_the_expected_size(pair):
    split, coll = pair
    for net in (split, coll):
        with pytest.raises(ValueError, match=r"\(B, 3, 227, 227\).*224") as e:
            net(torch.zeros(1, 3, 224, 224))
        assert "(224 - 11) / 4 + 1 is not an integer" in str(e.value)


# ----------------------------------------------------------------------------- GPU (skipped here)

GPU_TOL = dict(rtol=1e-4, atol=1e-4)  # TF32 off; cuDNN vs CPU kernels sum in other orders


@pytest.mark.gpu
@pytest.mark.parametrize("devices", [("cuda:0", "cpu"), ("cuda:0", "cuda:0"), ("cpu", "cuda:0")])
def test_gpu_layouts_match_collapsed(devices):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    ref = SplitAlexNet(10).eval()
    coll_cpu = ref.collapse("cpu").eval()
    split = place(ref.collapse("cpu").split(), devices).eval()
    for name, p in split.named_parameters():
        want = split.devices[1] if name.startswith("towers.1.") else split.devices[0]
        assert p.device == want
    x = images(4)
    with torch.no_grad():
        want = coll_cpu(x)
        got = split(x)
        assert got.device == torch.device(devices[0])
        torch.testing.assert_close(got.cpu(), want, **GPU_TOL)
        coll_gpu = split.collapse("cuda:0").eval()
        torch.testing.assert_close(coll_gpu(x.cuda()).cpu(), want, **GPU_TOL)
    assert {t.dst_device for t in split.traffic} == {str(torch.device(d)) for d in devices} or \
        devices[0] == devices[1]
    # Gradients flow back across the device boundary.
    split.train()
    torch.manual_seed(1)
    split(x).logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in split.parameters())


# ----------------------------------------------------------------------------- placement


def test_networks_are_built_without_devices():
    for cls in (AlexNet, SplitAlexNet, HalfAlexNet):
        assert "devices" not in inspect.signature(cls).parameters, cls
    torch.manual_seed(0)
    split = build_model(ModelConfig(num_classes=10, init="caffe"), "split", "cpu,cpu")
    torch.manual_seed(0)
    coll = build_model(ModelConfig(num_classes=10, init="caffe"), "collapsed", ["cpu"])
    assert isinstance(split, SplitAlexNet) and type(coll) is AlexNet
    a, b = layout_state_dict(split), layout_state_dict(coll)
    assert all(torch.equal(a[k], b[k]) for k in b)  # the same seed, the same weights
    half = build_model(ModelConfig(arch="half", num_classes=10, init=None), "split", "cpu,cpu")
    assert type(half) is HalfAlexNet  # always one device
    with pytest.raises(ValueError, match="layout"):
        build_model(ModelConfig(), "sideways", "cpu")


@pytest.mark.parametrize("n_gpu, default, want", [
    (0, "cpu", ("cpu", "cpu")), (0, "fit", ("cpu", "cpu")), (0, "collapse", ("cpu",)),
    (1, "fit", ("cuda:0", "cuda:0")), (1, "collapse", ("cuda:0",)),
    (2, "paper", ("cuda:0", "cuda:1")), (2, "collapse", ("cuda:0", "cuda:1")),
    (2, "cpu", ("cpu", "cpu")),
])
def test_one_resolver_gives_every_tool_its_default(monkeypatch, n_gpu, default, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n_gpu > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpu)
    assert resolve_devices(default=default) == tuple(map(torch.device, want))
    single = ("cuda:0",) if n_gpu else ("cpu",)
    assert resolve_devices(single_device=True, default=default) == tuple(map(torch.device, single))
    assert resolve_devices(devices="cpu,cpu", default=default) == (torch.device("cpu"),) * 2


@pytest.mark.parametrize("n_gpu, kw, words", [
    (0, {}, "no GPU found: use --devices cpu,cpu"),
    (1, {}, "one GPU found; the paper's layout needs two: use --gpus 0,0"),
    (1, {"gpus": "0"}, "--gpus 0 names one GPU but the towers need two"),
    (1, {"gpus": "x,y"}, "--gpus takes GPU indices such as 0,1"),
    (0, {"devices": "cpu"}, "exactly two devices"),
    (0, {"gpus": "0,1"}, "cuda:0 requested but this machine has no CUDA device"),
])
def test_bad_device_flags_are_one_usage_line(monkeypatch, n_gpu, kw, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n_gpu > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpu)
    with pytest.raises(UsageError, match=re.escape(words)):
        resolve_devices(**kw)
