"""--parallel hybrid (Krizhevsky 2014): the convolutional layers data-parallel, fc6-fc8 split
by units across K processes (real torchrun, gloo, CPU).

* The network's step (tests/programs/hybrid_steps.py, K = 2 and 4) equals the same step in
  one process: schedule 'gather' and 'sequential' with --fc-updates once equal one step on
  the whole K*b batch (what DDP computes); --fc-updates each equals K sequential updates of
  fc6-fc8 on each process's images followed by one update of the convolutional layers.
* The trainer: --parallel hybrid equals --parallel pair DDP at the same K and seed (weights,
  momentum, evaluation and ten-crop test), its checkpoint resumes in one process, and bad
  settings are refused up front.

Tolerances: the one-process references convolve each process's b images apart, as the
processes do (and as DDP's replicas do): convolving all K*b at once would choose other
convolution kernels for another batch size. The fully connected layers still sum K*b images
in one product where the references sum K products of b (or one), so after one step the
states agree to float32 rounding, not bit for bit: |a - b| <= 1e-6 + 1e-5 |b|. The largest
difference seen: 7.5e-9 on torch 2.14.1; the step moves the weights by about 1e-4, and
halving the convolutional gradients (a deliberate error) by 2.6e-5 to 4.4e-5. The program
runs one step: a second would start from weights that differ by rounding, where a ReLU input
or a max-pooling choice that close to a tie can go either way and move the layers below it
elsewhere, by up to 4e-3 of their movement (seen on an AMD EPYC with AVX-512; multiplying
every weight by 1 + 1e-7 noise before the second step does the same). Within the step,
--fc-updates each already updates fc6-fc8 K times, with momentum.
Dropout is 0 in the comparisons: the hybrid draws each unit's mask in the process that owns
the unit, DDP in each replica, so the masks differ (the same distribution).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import PROGRAMS, records, stored, torchrun, torchrun_runs
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.network.hybrid import HybridAlexNet, check_parts
from split_alexnet.network.model import AlexNet, ModelConfig, _act, collapsed_shapes
from split_alexnet.training.distributed import Context, check_parallel
from split_alexnet.training.optim import build_optimizer
from split_alexnet.training.options import parse_config
from split_alexnet.tools.bench.comm import bytes_per_step
from split_alexnet.training.command import main as train_main
from split_alexnet.utils.cli import UsageError, run

STEPS_PROGRAM = PROGRAMS / "hybrid_steps.py"
RTOL, ATOL = 1e-5, 1e-6
DRIVER = PROGRAMS / "train_with_rank_report.py"
COMMON = ["--batch-size", "4", "--epochs", "1", "--workers", "0", "--log-interval", "1",
          "--init", "caffe", "--seed", "5", "--dropout", "0",
          "--devices", "cpu,cpu"]


def _program():
    spec = importlib.util.spec_from_file_location("hybrid_steps", STEPS_PROGRAM)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fc_part(net: AlexNet, h: torch.Tensor) -> torch.Tensor:
    """fc6 to fc8 of ``net`` without dropout: (n, 9216) -> (n, classes)."""
    h = _act(net.fc6(h), net.cfg)
    h = _act(net.fc7(h), net.cfg)
    return net.fc8(h)


def reference(classes: int, k: int, b: int, fc_updates: str | None) -> dict:
    """The steps of hybrid_steps.py in one process: ``fc_updates`` None, one step on the
    whole K*b batch (the mean of the losses of each process's b images, as DDP computes it);
    'each', per step K updates of fc6-fc8 on each process's b images in rank order, then one
    of the convolutional layers with the mean of their gradients. Each process's b images
    are convolved apart, as the processes do (the docstring's tolerances)."""
    prog = _program()
    torch.manual_seed(0)
    net = AlexNet(ModelConfig(num_classes=classes, dropout=0.0, init="caffe"))
    opt = build_optimizer(net, lr=0.01)
    for step in range(prog.STEPS):
        x, y = prog.inputs(classes, k, b, step)
        xs, ys = x.split(b), y.split(b)  # each process's b images and labels, in rank order
        opt.zero_grad(set_to_none=True)
        if fc_updates is None:
            for xj, yj in zip(xs, ys):
                (F.cross_entropy(net(xj), yj) / k).backward()
            opt.step()
            continue
        pool5 = torch.cat([net.features(xj) for xj in xs])           # (K*b, 9216)
        grads = []
        for pj, yj in zip(pool5.split(b), ys):
            h = pj.detach().requires_grad_(True)
            F.cross_entropy(fc_part(net, h), yj).backward()
            opt.step()  # only fc6-fc8 hold gradients
            opt.zero_grad(set_to_none=True)
            grads.append(h.grad)
        pool5.backward(torch.cat(grads) / k)
        opt.step()  # only the convolutional layers hold gradients
    return {n: v.detach() for n, v in net.state_dict().items()}


def assert_close_states(got: dict, want: dict) -> float:
    """Every tensor within the stated tolerance; returns the largest absolute difference."""
    assert got.keys() == want.keys()
    worst = 0.0
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=RTOL, atol=ATOL, msg=name)
        worst = max(worst, (got[name] - w).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def hybrid_steps(module_tmp):
    """The program's states at K = 4 (8 classes, b = 1) and K = 2 (4 classes, b = 2), in one
    job of 4 processes."""
    report = module_tmp("hybrid_steps")
    specs = {4: (8, 1), 2: (4, 2)}
    p, _ = torchrun(STEPS_PROGRAM, report, [f"{k}:{c}:{b}" for k, (c, b) in specs.items()],
                    nproc=4, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return {k: (c, b, torch.load(report / f"hybrid_K{k}.pt", weights_only=True))
            for k, (c, b) in specs.items()}


@pytest.mark.parametrize("k", [2, 4])
def test_gather_and_sequential_once_equal_one_step_on_the_whole_batch(hybrid_steps, k):
    classes, b, states = hybrid_steps[k]
    want = reference(classes, k, b, None)
    assert_close_states(states["gather"], want)
    assert_close_states(states["sequential-once"], want)


@pytest.mark.parametrize("k", [2, 4])
def test_sequential_each_equals_k_sequential_fc_updates(hybrid_steps, k):
    classes, b, states = hybrid_steps[k]
    assert_close_states(states["sequential-each"], reference(classes, k, b, "each"))
    # and it is another run: the K updates move fc8 elsewhere than one update does
    once = states["sequential-once"]["fc8.weight"]
    assert (states["sequential-each"]["fc8.weight"] - once).abs().max() > 100 * ATOL


@pytest.mark.parametrize("k", [2, 4])
def test_bench_comm_counts_what_the_collectives_send(hybrid_steps, k):
    """bench comm's hybrid rows are the bytes the real steps' collectives sent (per process
    per step, as ring algorithms send them); and the pair row is DDP's all-reduce of the
    whole network's 60,965,224 parameters at 1000 classes."""
    classes, b, states = hybrid_steps[k]
    for schedule in ("gather", "sequential"):
        want = bytes_per_step(f"hybrid {schedule}", k, b, classes)["total"]
        for variant in [v for v in ("gather", "sequential-once", "sequential-each")
                        if v.startswith(schedule)]:
            assert states[f"{variant} bytes"].item() == pytest.approx(want, rel=1e-12)
    assert bytes_per_step("pair", 2, 128, 1000)["total"] == 60_965_224 * 4


# ----------------------------------------------------------------------------- the network


def test_the_parts_of_k_processes_are_the_whole_networks_weights():
    whole = AlexNet(ModelConfig(num_classes=8, init="caffe"))
    parts = [HybridAlexNet(whole, rank=r, parts=4) for r in range(4)]
    assert parts[1].fc6.weight.shape == (1024, 9216)
    assert parts[3].fc8.weight.shape == (2, 4096)
    assert parts[0].conv1 is whole.conv1  # the convolutional layers whole, in every process
    for layer in ("fc6", "fc7", "fc8"):
        joined = torch.cat([getattr(p, layer).weight for p in parts])
        assert torch.equal(joined, getattr(whole, layer).weight)
    # a checkpoint's whole state loads as each process's part
    other = HybridAlexNet(AlexNet(ModelConfig(num_classes=8, init=None)), rank=2, parts=4)
    other.load_state_dict(whole.state_dict())
    assert torch.equal(other.fc7.weight, parts[2].fc7.weight)


@pytest.mark.parametrize("k, classes, words", [
    (3, 9, "fc6's 4096 units"),
    (4, 10, "fc8's 10 units"),
])
def test_a_process_count_that_does_not_divide_the_units_is_refused(k, classes, words):
    with pytest.raises(ValueError, match=words):
        check_parts(k, classes)


def test_the_trainer_refuses_such_a_count_before_building_anything():
    """Under --parallel hybrid the trainer checks K against the class count first: one
    UsageError line (exit 2), before any network is built or any group is used."""
    from split_alexnet.training.setup import build_learner
    cfg = parse_config(["--parallel", "hybrid"]).with_classes(10)
    with pytest.raises(UsageError, match=r"--parallel hybrid: 4 processes cannot share "
                                         r"fc8's 10 units"):
        build_learner(cfg, "split", Context(rank=0, world_size=4), (torch.device("cpu"),),
                      None, [str(c) for c in range(10)])


@pytest.mark.parametrize("ctx, argv, words", [
    (Context(), [], "start it with torchrun"),
    (Context(rank=0, world_size=2), ["--arch", "half"], "--arch half has one column"),
    (Context(rank=0, world_size=2), ["--compile"], "drop --compile"),
    (Context(rank=0, world_size=2), ["--hybrid-schedule", "sequential", "--amp", "fp16"],
     "GradScaler"),
])
def test_hybrid_settings_that_cannot_work_are_refused_up_front(ctx, argv, words):
    cfg = parse_config(["--parallel", "hybrid", *argv])
    with pytest.raises(UsageError, match=words):
        check_parallel(cfg, ctx)


def test_fc_updates_each_needs_the_sequential_hybrid():
    with pytest.raises(UsageError, match="--fc-updates each needs --parallel hybrid"):
        parse_config(["--fc-updates", "each"])
    with pytest.raises(UsageError, match="--hybrid-schedule sequential"):
        parse_config(["--parallel", "hybrid", "--fc-updates", "each"])
    cfg = parse_config(["--parallel", "hybrid", "--hybrid-schedule", "sequential",
                        "--fc-updates", "each"])
    assert cfg.runtime.fc_updates == "each"


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def hybrid_runs(module_tmp):
    """One epoch (one step of 4 images, the centre-crop evaluation and the ten-crop test) of
    the same run as pair DDP, as hybrid 'gather' and as hybrid 'sequential', two processes
    each; a hybrid --plan; then the pair and the hybrid run each resumed in one process for
    a second epoch (one more step; both epochs' checkpoints kept).
    Validation: 5 images, so the processes' shares differ (3 and 2)."""
    base = module_tmp("hybrid")
    data = make_demo_dataset(base / "data", classes=2, train_per_class=2, val_per_class=3,
                             seed=0)
    sorted((data / "val").glob("*/*.jpg"))[-1].unlink()
    runs = {"base": base, "data": data}
    flags = {"pair": [], "gather": ["--parallel", "hybrid"],
             "sequential": ["--parallel", "hybrid", "--hybrid-schedule", "sequential"],
             "plan": ["--parallel", "hybrid", "--plan", "--plan-steps", "1"]}
    p, text = torchrun_runs(DRIVER, base, {
        f"report_{name}": ["--data", data, "--out", base / name, *COMMON, *extra]
        for name, extra in flags.items()})  # one job of 2 processes, the runs in turn
    assert p.returncode == 0, f"rc {p.returncode}\n{p.stderr[-4000:]}"
    for name in ("pair", "gather", "sequential"):
        runs[name] = base / name
    runs["plan_out"] = text["report_plan"]
    for name in ("pair", "gather"):  # a hybrid checkpoint resumed by the one-process pair
        assert run(train_main, "train", ["--out", str(base / name), "--resume", "--parallel",
                                         "pair", "--epochs", "2", "--keep-last", "2",
                                         "--no-ten-crop"]) == 0
        runs[f"{name}_resumed"] = base / name
    return runs


def _by_kind(out: Path, kind: str) -> list[dict]:
    return [r for r in records(out) if r["kind"] == kind]


def test_hybrid_trains_what_pair_ddp_trains(hybrid_runs):
    """Both schedules after one epoch (one step) at K = 2: pair DDP's weights and momentum
    (within the stated tolerance), its evaluation and ten-crop test (the same mistakes, the
    loss within 1e-5), on 5 validation images dealt 3 and 2."""
    pair = stored(hybrid_runs["base"] / "pair" / "epoch_001.pt")
    for name in ("gather", "sequential"):
        got = stored(hybrid_runs["base"] / name / "epoch_001.pt")
        assert got["progress"] == pair["progress"]
        assert_close_states(got["model"], pair["model"])
        for buf, named in pair["optimizer"]["buffers"].items():
            assert_close_states(got["optimizer"]["buffers"][buf], named)
        for kind in ("val", "val_ten_crop"):
            a = _by_kind(hybrid_runs[name], kind)[0]  # the first epoch's
            b = _by_kind(hybrid_runs["pair"], kind)[0]
            assert a["n"] == b["n"] == 5
            assert a["top1_err"] == b["top1_err"]
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_plan_under_hybrid_states_the_whole_networks_checkpoint(hybrid_runs):
    """--plan with --parallel hybrid trains its steps in a scratch folder, writes nothing in
    --out, and sizes the checkpoint of the whole network (not one process's part)."""
    assert not (hybrid_runs["base"] / "plan").exists()
    whole = sum(math.prod(s) for s in collapsed_shapes(2).values()) * 4
    assert f"checkpoint size: {2 * whole / 2**20:.0f} MiB ({whole / 2**20:.0f} MiB " \
        "parameters" in hybrid_runs["plan_out"]


def test_a_hybrid_checkpoint_resumes_in_one_process(hybrid_runs):
    """The hybrid run's checkpoint, resumed by --parallel pair in one process for a second
    step, lands where pair DDP's checkpoint resumed the same way lands: within 2e-2 of each
    tensor's movement in that step (the two steps start from weights that differ by rounding,
    where a rounding-close tie can go either way: the module docstring). Largest seen: 1.4e-4
    of fc6's bias's movement."""
    a = stored(hybrid_runs["gather_resumed"] / "last.pt")
    b = stored(hybrid_runs["pair_resumed"] / "last.pt")
    start = stored(hybrid_runs["pair_resumed"] / "epoch_001.pt")["model"]
    assert a["progress"]["step"] == b["progress"]["step"] == 2
    assert a["model"].keys() == b["model"].keys() == start.keys()
    for name, want in b["model"].items():
        off = (a["model"][name] - want).norm().item()
        moved = (want - start[name]).norm().item()
        assert off <= 2e-2 * moved, f"{name}: off by {off:.3g}, {off / moved:.3g} of its movement"


# ----------------------------------------------------------------------------- lr and batch


def test_lr_batch_rule_scales_each_layer_by_the_batch_it_sees():
    """sqrt: conv layers at K*b, fc6-fc8 at b under --fc-updates each; the line says so."""
    from split_alexnet.training.setup import batch_lr_mults, describe_lr_batch_rule
    cfg = parse_config(["--parallel", "hybrid", "--hybrid-schedule", "sequential",
                        "--fc-updates", "each", "--lr-batch-rule", "sqrt",
                        "--batch-size", "512"])
    ctx = Context(rank=0, world_size=4)
    mults = batch_lr_mults(cfg, ctx, 128)
    assert mults["conv1"] == mults["conv5"] == pytest.approx(2.0)  # sqrt(512 / 128)
    assert mults["fc6"] == mults["fc8"] == 1.0                     # 128 images per update
    assert describe_lr_batch_rule(cfg, ctx, 128) == (
        "--lr-batch-rule sqrt (reference batch 128): conv1-conv5 see 512 images: lr x 2; "
        "fc6-fc8 see 128 images: lr x 1")
    linear = parse_config(["--lr-batch-rule", "linear", "--lr-batch-reference", "64"])
    assert batch_lr_mults(linear, Context(rank=0, world_size=2), 64)["fc7"] == 2.0
    assert describe_lr_batch_rule(parse_config([]), ctx, 128) is None
    assert set(batch_lr_mults(parse_config([]), ctx, 128).values()) == {1.0}


def test_the_rule_reaches_the_optimizer_and_the_log(tmp_path, capsys):
    """A one-process run with --lr-batch-rule sqrt at batch 8: every group's rate is lr x
    sqrt(8 / 128) = lr / 4, and the start says it."""
    from helpers import BASE, CPU_PAIR
    from split_alexnet.training.trainer import Trainer
    data = make_demo_dataset(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1,
                             seed=0)
    argv = ["--data", str(data), "--out", str(tmp_path / "run"), *BASE, *CPU_PAIR,
            "--lr-batch-rule", "sqrt"]
    t = Trainer.setup(parse_config(argv))
    try:
        assert {round(g["lr"] / 0.01, 6) for g in t.optimizer.param_groups} == {0.25}
    finally:
        t.close()
    assert "--lr-batch-rule sqrt (reference batch 128): conv1-fc8 see 8 images: lr x 0.25" \
        in capsys.readouterr().err
