"""FLOP accounting, the model benchmark's rows, and the fast paths' equivalence.

Fast on busy cores: the benchmark runs at batch 2 with 1 warm-up + 1 timed step on two
layouts. torch.compile of the full network takes about a minute on 2 CPU cores, so its test
runs only with SPLIT_ALEXNET_SLOW_TESTS=1 (docs/benchmarks.md says what it measured).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import paper_images as images
from helpers import records
from split_alexnet.tools.bench.main import main as bench_main
from split_alexnet.network.parallelize import (amp_dtype, autocast_context, grad_scaler,
                                               parallelize, to_input_format, unwrap)
from split_alexnet.network.flops import flops_per_image, flops_per_step
from split_alexnet.network.model import AlexNet, HalfAlexNet, SplitAlexNet

SLOW = pytest.mark.skipif(os.environ.get("SPLIT_ALEXNET_SLOW_TESTS") != "1",
                          reason="torch.compile of AlexNet takes ~1 min on 2 CPU cores; "
                                 "set SPLIT_ALEXNET_SLOW_TESTS=1 to run")




# ----------------------------------------------------------------------------- FLOPs
def test_flops_by_hand():
    f = flops_per_image("alexnet")
    # 2 * Cin/groups * k*k * Cout * Hout*Wout, by hand:
    want = {"conv1": 2 * 3 * 121 * 96 * 55 * 55,      # 210,830,400
            "conv2": 2 * 48 * 25 * 256 * 27 * 27,     # groups=2: 447,897,600
            "conv3": 2 * 256 * 9 * 384 * 13 * 13,     # crosses the towers: 299,040,768
            "conv4": 2 * 192 * 9 * 384 * 13 * 13,     # 224,280,576
            "conv5": 2 * 192 * 9 * 256 * 13 * 13,     # 149,520,384
            "fc6": 2 * 9216 * 4096, "fc7": 2 * 4096 * 4096, "fc8": 2 * 4096 * 1000}
    assert f["layers"] == want
    assert f["forward"] == 1_448_813_632  # ~1.45 GFLOP
    assert f["backward"] == 2 * 1_448_813_632 - 210_830_400  # conv1 has no dgrad
    assert f["train"] == f["forward"] + f["backward"]
    tv = flops_per_image("torchvision")
    assert tv["input_size"] == 224 and tv["forward"] == 1_428_376_960  # ~1.43 GFLOP
    # half: conv1-4 at half width, conv5 and the FC layers full size
    assert flops_per_image("half")["forward"] == 783_028_768 == (
        2 * 3 * 121 * 48 * 3025 + 2 * 48 * 25 * 128 * 729 + 2 * 128 * 9 * 192 * 169
        + 2 * 192 * 9 * 192 * 169 + 2 * 192 * 9 * 256 * 169 + want["fc6"] + want["fc7"]
        + want["fc8"])
    assert flops_per_step("alexnet", "infer", 4) == 4 * f["forward"]
    assert flops_per_step("alexnet", "train", 4) == 4 * f["train"]
    with pytest.raises(ValueError, match="227"):
        flops_per_image("alexnet", input_size=224)
    with pytest.raises(ValueError, match="arch"):
        flops_per_image("vgg")


def test_flops_match_torch_flop_counter():
    """torch's own counter on the real modules, forward + backward at batch 1 (split net, and
    half; the collapsed net's forward only: FlopCounterMode over-counts grouped-conv
    backwards)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    for net, arch in ((SplitAlexNet(10, init=None), "alexnet"),
                      (HalfAlexNet(10, init=None), "half")):
        with FlopCounterMode(display=False) as fc:
            net(images(1)).sum().backward()
        assert fc.get_total_flops() == flops_per_image(arch, num_classes=10)["train"], arch
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        AlexNet(10, init=None)(images(1))
    assert fc.get_total_flops() == flops_per_image("alexnet", num_classes=10)["forward"]


# ----------------------------------------------------------------------------- the bench
MODEL_KEYS = {"layout", "devices", "mode", "batch_size", "images_per_s"}


def test_bench_model_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_main(["model", "--quick", "--batch-size", "2", "--steps", "1,1",
                       "--layouts", "collapsed,split", "--fast-paths", "none",
                       "--modes", "train,infer", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["layout"], r["mode"], r["fast_path"]) for r in rows} == {
        ("collapsed", "train", "fp32"), ("collapsed", "infer", "fp32"),
        ("split", "train", "fp32"), ("split", "infer", "fp32")}
    for r in rows:
        assert MODEL_KEYS <= r.keys()
        assert r["batch_size"] == 2 and r["images_per_s"] > 0
        assert 0 < r["fraction_of_peak"] and r["gflops"] > 0
        assert r["layout"] in ("split", "split-one-device", "collapsed", "half", "torchvision")
        assert r["mode"] in ("train", "infer")
    split = {r["mode"]: r for r in rows if r["layout"] == "split"}
    assert split["train"]["devices"] == "cpu,cpu"
    # conv3 2x(2,128,13,13), fc6 2x(2,4608), fc7 2x(2,2048), fc8 (2,2048): fp32, both ways
    fwd = 4 * 2 * (2 * 128 * 169 + 2 * 4608 + 2 * 2048) + 4 * 2 * 2048
    assert split["infer"]["bytes_between_towers"] == fwd
    assert split["train"]["bytes_between_towers"] == 2 * fwd
    assert "img/s" in capsys.readouterr().out  # the table


def test_bench_model_trains_torchvisions_network_and_names_each_rows_optimizer(tmp_path,
                                                                               capsys):
    out = tmp_path / "rows.json"
    assert bench_main(["model", "--quick", "--batch-size", "2", "--steps", "1,1",
                       "--layouts", "torchvision,collapsed", "--fast-paths", "none",
                       "--modes", "train,infer", "--json", str(out)]) == 0
    rows = {(r["layout"], r["mode"]): r for r in json.loads(out.read_text())}
    assert rows[("torchvision", "train")]["optimizer"] == "torch.optim.SGD"
    assert rows[("torchvision", "train")]["images_per_s"] > 0
    assert rows[("collapsed", "train")]["optimizer"] == "PaperSGD"
    assert rows[("torchvision", "infer")]["optimizer"] is None
    table = capsys.readouterr().out
    assert "optimizer" in table and "torch.optim.SGD" in table and "PaperSGD" in table


def test_measured_and_interleaved_rows_have_the_same_columns():
    """One row builder: a row measured alone and one from an A/B group have the same keys in
    the same order, but for the one that says how they were warmed up."""
    from split_alexnet.tools.bench.timing import interleaved, measure
    cpu = (torch.device("cpu"), torch.device("cpu"))
    ceiling = lambda d, dt: 1e12  # noqa: E731 - a fixed ceiling: the columns are the point
    alone = measure("collapsed", "infer", "fp32", cpu, 1, 0, 1, ceiling).to_dict()
    (ab,) = interleaved("collapsed", "infer", ["fp32"], cpu, 1, 0, 1, ceiling)
    ab = ab.to_dict()
    assert [k if k != "warmup_s" else "how" for k in alone] == \
        [k if k != "interleaved" else "how" for k in ab]
    assert alone["warmup_s"] >= 0 and ab["interleaved"] is True
    assert alone["peak_mem"] and ab["peak_mem"] is None
    for r in (alone, ab):
        assert (r["layout"], r["devices"], r["mode"], r["fast_path"]) == \
            ("collapsed", "cpu", "infer", "fp32")
        assert r["steps"] == len(r["times_s"]) == 1 and r["peak_gflops"] == 1000.0
        assert r["gflop_per_image"] == flops_per_image("alexnet")["forward"] / 1e9
        assert r["bytes_between_towers"] is None and r["kind"] == "model"


def test_rounds_pool_their_timed_steps():
    from split_alexnet.tools.bench.timing import Row
    row = Row(layout="split", devices="cpu,cpu", mode="infer", batch_size=4, fast_path="fp32",
              times_s=[0.4, 0.2], flops=8e9, peak_flops=100e9, bytes_between_towers=10,
              peak_mem={"cpu (rss growth)": 1}, warmup_s=1.5, device_name="cpu x2")
    later = Row(**{**row.__dict__, "times_s": [0.1], "peak_flops": 40e9, "warmup_s": 9.0})
    row.add_round(later)
    r = row.to_dict()
    assert r["times_s"] == [0.4, 0.2, 0.1] and r["steps"] == 3 and r["rounds"] == 2
    assert r["step_ms"] == pytest.approx(200) and r["min_step_ms"] == pytest.approx(100)
    assert r["images_per_s"] == pytest.approx(20) and r["images_per_s_best"] == pytest.approx(40)
    assert r["gflops"] == pytest.approx(40) and r["peak_gflops"] == pytest.approx(70)
    assert r["fraction_of_peak"] == pytest.approx(40 / 70)
    assert r["warmup_s"] == 1.5  # the first round's


def test_bench_model_options_are_read_once():
    from split_alexnet.tools.bench.main import build_parser
    from split_alexnet.tools.bench.model import read_options
    opts = read_options(build_parser().parse_args(
        ["model", "--quick", "--devices", "cpu,cpu", "--layouts", "collapsed", "--json", "r"]))
    assert (opts.batch, opts.warmup, opts.timed, opts.rounds) == (8, 2, 3, 1)
    assert opts.layouts == ("collapsed",) and opts.partial_json == "r"
    assert opts.extra == (("collapsed", "channels_last"), ("collapsed", "bf16"))  # planned
    assert opts.configs()[:2] == [("collapsed", "train", "fp32"), ("collapsed", "infer", "fp32")]
    opts = read_options(build_parser().parse_args(
        ["all", "--devices", "cpu,cpu", "--steps", "0,4", "--json", "r", "--modes", "infer",
         "--fast-paths", "split:bf16,collapsed:fp16,split:channels_last"]))
    assert (opts.batch, opts.warmup, opts.timed) == (32, 0, 4)
    assert opts.partial_json is None  # `all` writes its rows once, at the end
    assert opts.groups() == [("split", ["fp32", "bf16", "channels_last"]),
                             ("collapsed", ["fp32", "fp16"])]
    assert opts.configs()[-1] == ("split", "infer", "channels_last")


def test_bench_rejects_bad_options():
    from split_alexnet.utils.cli import UsageError
    with pytest.raises(UsageError, match="fast path"):
        bench_main(["model", "--fast-paths", "collapsed:turbo", "--layouts", "collapsed"])
    with pytest.raises(UsageError, match="layouts"):
        bench_main(["model", "--layouts", "vgg"])
    from split_alexnet.tools.bench.model import parse_fast_path
    assert parse_fast_path("channels_last+bf16+cudnn-benchmark") == {
        "channels_last": True, "amp": "bf16", "compile": False, "cudnn_benchmark": True}
    with pytest.raises(ValueError, match="exclusive"):
        parse_fast_path("bf16+fp16")


# ----------------------------------------------------------------------------- fast paths
@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return AlexNet(10).eval()


def test_channels_last_same_outputs_on_cpu(net):
    x = images(2)
    with torch.no_grad():
        want = net(x)
        cl = parallelize(AlexNet(10, init=None), "cpu", channels_last=True).eval()
        cl.load_state_dict(net.state_dict())
        assert cl.conv2.weight.is_contiguous(memory_format=torch.channels_last)
        got = cl(to_input_format(x, True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_channels_last_split_keeps_devices_and_function():
    torch.manual_seed(0)
    split = SplitAlexNet(10).eval()
    x = images(2)
    with torch.no_grad():
        want = split(x)
        parallelize(split, ("cpu", "cpu"), channels_last=True)
        got = split(to_input_format(x, True))
    assert split.devices == (torch.device("cpu"), torch.device("cpu"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_close_to_fp32_on_cpu(net):
    """bf16 has an 8-bit mantissa: the logits of the real network at batch 2 agree with fp32
    to within 5% of their largest magnitude (measured: about 1%)."""
    x = images(2)
    with torch.no_grad():
        want = net(x)
        with autocast_context("cpu", "bf16"):
            got = net(x)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 5e-2, float(err)


def test_autocast_off_is_a_no_op_and_dtypes_parse(net):
    x = images(1)
    with torch.no_grad(), autocast_context("cpu", "off"):
        assert net(x).dtype == torch.float32
    assert amp_dtype("fp16") is torch.float16 and amp_dtype(None) is None
    with pytest.raises(ValueError, match="amp"):
        amp_dtype("fp8")
    assert not grad_scaler("cpu", "fp16").is_enabled()  # a GradScaler only for fp16 on CUDA


def test_bf16_train_step_runs_with_paper_optimizer():
    from split_alexnet.training.optim import build_optimizer
    torch.manual_seed(0)
    split = SplitAlexNet(10, init="caffe")
    opt = build_optimizer(split)
    before = split.fc8.weight.detach().clone()
    with autocast_context(split.devices, "bf16"):
        loss = F.cross_entropy(split(images(2)), torch.tensor([1, 2]))
    loss.backward()
    opt.step()
    assert split.fc8.weight.dtype == torch.float32  # weights and update stay fp32
    assert torch.isfinite(loss) and not torch.equal(before, split.fc8.weight)


def test_train_config_fast_path_flags():
    from split_alexnet.utils.cli import UsageError
    from split_alexnet.training.options import parse_config
    cfg = parse_config(["--data", "x", "--amp", "bf16", "--channels-last", "--compile",
                        "--cudnn-benchmark"])
    rt = cfg.runtime
    assert (rt.amp, rt.channels_last, rt.compile, rt.cudnn_benchmark) == \
        ("bf16", True, True, True)
    d = parse_config(["--data", "x"]).runtime
    assert (d.amp, d.channels_last, d.compile, d.cudnn_benchmark) == ("off", False, False, False)
    with pytest.raises(UsageError, match="amp"):
        parse_config(["--data", "x", "--amp", "fp8"])


def test_trainer_runs_with_fast_paths(demo_root, tmp_path):
    """One step of the real trainer with channels_last + bf16 autocast (CPU)."""
    from split_alexnet.utils.cli import run
    from split_alexnet.training.command import main as train_main
    rc = run(train_main, "train", ["--data", str(demo_root), "--out", str(tmp_path / "r"),
                                   "--devices", "cpu,cpu", "--batch-size", "4", "--epochs", "1",
                                   "--workers", "0", "--max-steps", "1", "--no-ten-crop",
                                   "--init", "caffe", "--log-interval", "1", "--channels-last",
                                   "--amp", "bf16"])
    assert rc == 0
    recs = records(tmp_path / "r")
    assert any(r["kind"] == "train" for r in recs)


@SLOW
def test_compile_matches_eager_on_cpu(net):
    x = images(2)
    eager = AlexNet(10, init=None).eval()
    eager.load_state_dict(net.state_dict())
    with torch.no_grad():
        want = eager(x)
    compiled = parallelize(eager, "cpu", compile=True)  # in place: the module stays itself
    assert compiled is eager and unwrap(compiled) is eager
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_bench_and_fast_paths(tmp_path):
    out = tmp_path / "rows.json"
    assert bench_main(["model", "--quick", "--devices", "cuda:0,cuda:0", "--batch-size", "4",
                       "--steps", "1,2", "--layouts", "collapsed,split",
                       "--fast-paths", "collapsed:channels_last+bf16,split:fp16",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 8 and all(r["peak_mem"].get("cuda:0", 0) > 0 for r in rows)


@pytest.mark.gpu
def test_gpu_fp16_grad_scaler_step():
    from split_alexnet.training.optim import build_optimizer
    torch.manual_seed(0)
    split = parallelize(SplitAlexNet(10, init="caffe"), ("cuda:0", "cuda:0"),
                        channels_last=True)
    opt, scaler = build_optimizer(split), grad_scaler("cuda:0", "fp16")
    assert scaler.is_enabled()
    x = to_input_format(images(4).cuda(), True)
    with autocast_context(split.devices, "fp16"):
        loss = F.cross_entropy(split(x), torch.arange(4, device="cuda:0"))
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.isfinite(loss)


@pytest.mark.gpu
def test_gpu_channels_last_and_bf16_close():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    net = AlexNet(10).eval()
    x = images(2)
    with torch.no_grad():
        want = net(x)
        g = parallelize(net, "cuda:0", channels_last=True)
        got = g(to_input_format(x.cuda(), True)).cpu()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        with autocast_context("cuda:0", "bf16"):
            lo = g(x.cuda()).float().cpu()
    assert ((lo - want).abs().max() / want.abs().max()) < 5e-2
