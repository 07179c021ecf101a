"""Finite or refused, and checkpoints that cannot cost more than they hold.

* Training stops, one line and exit 1, when a batch makes the loss non-finite, or an update
  leaves non-finite weights although its loss was finite (the check shares the loss's host
  sync), before anything is saved, naming the step and the last good checkpoint;
  ``save_checkpoint`` never writes non-finite values.
* A checkpoint with non-finite values (as the code before this check could write) is refused
  by ``load_checkpoint``, by evaluate and predict (one line, exit 2), and ``--resume`` falls
  back to the previous good one.
* Loading allocates nothing a file merely declares: a compressed record that would inflate
  to hundreds of MB is refused from the zip directory, and every tensor's shape is checked
  against the network the checkpoint declares before it is used.
* The weights-only refusal says the file is not a checkpoint of this project or is unsafe,
  and never suggests turning the protection off.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import (BASE, CPU_PAIR, PROGRAMS, RunsCode, error_lines, records, run_python,
                     train)
from split_alexnet.tools.evaluate import main as evaluate_main
from split_alexnet.tools.predict import main as predict_main
import split_alexnet.utils.checkpoint_file as checkpoint_file
from split_alexnet.training import loop
from split_alexnet.training.options import parse_command, parse_config
from split_alexnet.utils.checkpoint_file import (FORMAT, CheckpointError, check_archive, checksum,
                                                 load_checkpoint, nonfinite, save_checkpoint)
from split_alexnet.training.optim import set_lr
from split_alexnet.training.command import main as train_main
from split_alexnet.training.state import StopReason
from split_alexnet.training.trainer import Trainer
from split_alexnet.utils.cli import Abort, run

# ----------------------------------------------------------------------------- training


def test_weights_made_non_finite_by_an_update_stop_before_any_save(demo_root, tmp_path,
                                                                   capsys):
    """--lr 1e38 is finite, and so is the first loss; the first update overflows float32.
    Before the check, that step's NaN weights were saved as last.pt and called the last good
    checkpoint one step later."""
    out = tmp_path / "run"
    rc = run(train_main, "train", ["--data", str(demo_root), "--out", str(out), *BASE,
                                   *CPU_PAIR, "--checkpoint-minutes", "0",
                                   "--lr", "1e38", "--max-steps", "3"])
    (line,) = error_lines(capsys.readouterr().err)
    assert rc == 1
    assert "the weights became non-finite" in line and "at step 1 (epoch 1)" in line, line
    assert line.endswith("Last good checkpoint: none yet"), line
    assert "try a smaller --lr (e.g. 1e+37) or --recipe bvlc" in line, line
    assert "--init caffe" not in line  # the run's own init
    assert sorted(p.name for p in out.glob("*.pt")) == []
    assert sorted(out.glob(".*.tmp")) == []
    (rec,) = [r for r in records(out) if r["kind"] == "divergence"]
    assert rec["step"] == 1 and rec["reason"] == "non-finite weights"


def test_a_loss_far_above_chance_raises_the_alarm_and_can_stop_the_run(demo_root, tmp_path,
                                                                       capsys):
    """--lr 0.3 on the 4-class set: finite, but the mean loss of steps 3-4 is about 6, above
    3 x ln 4 = 4.16. The first steps' losses are logged although --log-interval is 20."""
    out = tmp_path / "run"
    flags = [*CPU_PAIR, "--lr", "0.3", "--max-steps", "4", "--log-interval", "20",
             "--stop-on-divergence"]
    rc = train(demo_root, out, *flags)
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert rc == 1, err
    assert "the training loss diverged: " in line and " over steps 3-4 (epoch 1) is above " \
           "3 x ln(classes) = 4.159; try a smaller --lr (e.g. 0.03)" in line, line
    assert "Stopping (--stop-on-divergence) without saving; the last good checkpoint: none " \
           "yet" in line, line
    assert "epoch 1/2: 1/4 ( 25.0%)" in err and " | loss " in err.split("1/4 ( 25.0%)")[1]
    assert sorted(p.name for p in out.glob("*.pt")) == []
    (rec,) = [r for r in records(out) if r["kind"] == "divergence"]
    assert rec["step"] == 4 and rec["loss"] > rec["bound"] == pytest.approx(3 * math.log(4))
    assert [r["step"] for r in records(out) if r["kind"] == "train"] == [1, 2, 4]


def test_poisoned_batch_stops_naming_the_step_and_the_last_good_checkpoint(
        demo_root, tmp_path, monkeypatch, capsys):
    real_finish, real_checksum = loop.finish_batch, checkpoint_file.checksum
    calls, sums = [0], {}

    def finish_batch(batch, stats, device, **kw):
        x = real_finish(batch, stats, device, **kw)
        if torch.is_grad_enabled():  # a training batch (evaluation runs under no_grad)
            calls[0] += 1
            if calls[0] == 3:
                x = torch.full_like(x, float("inf"))
        return x

    def checksum(payload, crcs=None):
        h = real_checksum(payload, crcs)
        sums.setdefault(payload["progress"]["step"], h)
        return h

    monkeypatch.setattr(loop, "finish_batch", finish_batch)
    monkeypatch.setattr(checkpoint_file, "checksum", checksum)
    out = tmp_path / "poison"
    rc = train(demo_root, out, *CPU_PAIR, "--checkpoint-minutes", "0")
    err = capsys.readouterr().err
    assert rc == 1
    (line,) = error_lines(err)
    assert "loss is nan at step 3 (epoch 1)" in line, line
    assert f"Last good checkpoint: {out / 'last.pt'}" in line, line
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["progress"]["step"] == 2 and sorted(sums) == [1, 2]
    assert ckpt["checksum"] == sums[2]  # exactly step 2's state
    for t in ckpt["model"].values():
        assert torch.isfinite(t).all()


@pytest.fixture(scope="module")
def diverged(demo_root, module_tmp):
    """Two good steps saved as last.pt, then the learning rate raised to 1e38 in the same
    trainer: the next update overflows. Returns (run folder, the Abort, last.pt's checksum
    after the good steps)."""
    out = module_tmp("diverged") / "run"
    cfg = parse_config(["--data", str(demo_root), "--out", str(out), *BASE, *CPU_PAIR,
                        "--checkpoint-minutes", "0", "--max-steps", "2"])
    t = Trainer.setup(cfg)
    assert t.train_epoch() is StopReason.MAX_STEPS
    t.save()
    good = load_checkpoint(out / "last.pt")["checksum"]
    set_lr(t.optimizer, 1e38)
    t.cfg = t.cfg.with_settings(max_steps=4)
    with pytest.raises(Abort) as e:
        t.train_epoch()
    return out, e.value, good


def test_divergence_after_good_steps_names_the_last_good_checkpoint_and_keeps_it(diverged):
    out, abort, good = diverged
    msg = str(abort)
    assert abort.code == 1
    assert "the weights became non-finite" in msg and "at step 3 (epoch 1)" in msg, msg
    assert msg.endswith(f"Last good checkpoint: {out / 'last.pt'}"), msg
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["checksum"] == good and ckpt["progress"]["step"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values())


def test_a_checkpoint_with_non_finite_values_is_never_written(tmp_path):
    path = tmp_path / "last.pt"
    good = {"model": {"w": torch.ones(3)}, "stats": {"mean": torch.zeros(2)}}
    save_checkpoint(path, good)
    before = path.read_bytes()
    for table, name in (("model", "w"), ("stats", "mean")):
        bad = {k: dict(v) for k, v in good.items()}
        bad[table][name] = torch.tensor([1.0, float("nan"), float("inf")])
        with pytest.raises(Abort, match=f"not writing {path}: {table} {name} is not finite"):
            save_checkpoint(path, bad)
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_finite_check_finds_one_bad_value_and_passes_huge_finite_ones(dtype):
    big = torch.finfo(dtype).max
    huge = torch.full((4096,), big, dtype=dtype)  # its float32 sum overflows; all finite
    assert nonfinite({"model": {"w": huge, "v": -huge}}) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        for at in (0, 2047, 4095):
            w = huge.clone()
            w[at] = bad
            assert nonfinite({"model": {"ok": huge, "w": w}}) == "model w", (bad, at)
    both = huge.clone()
    both[0], both[1] = float("inf"), -float("inf")  # the sum is NaN, not a cancelling 0
    assert nonfinite({"stats": {"m": both}}) == "stats m"

def _rewrite(src: Path, dst: Path, change) -> None:
    """dst: src's payload after ``change(payload)``, with a valid checksum, saved as a plain
    torch.save (as the code before the finite check could write it)."""
    payload = torch.load(src, map_location="cpu", weights_only=True)
    change(payload)
    payload["checksum"] = checksum(payload)
    torch.save(payload, dst)


def _nan_fc8_bias(payload: dict) -> None:
    payload["model"]["fc8.bias"][1] = float("nan")


def test_evaluate_and_predict_refuse_non_finite_weights_in_one_line(diverged, demo_root,
                                                                    tmp_path, capsys):
    out, _, _ = diverged
    nan = tmp_path / "nan.pt"
    _rewrite(out / "last.pt", nan, _nan_fc8_bias)
    with pytest.raises(CheckpointError, match=r"non-finite values \(model fc8.bias\)"):
        load_checkpoint(nan)
    image = next((demo_root / "val").rglob("*.jpg"))
    capsys.readouterr()
    for main, prog, argv in (
            (evaluate_main, "evaluate", ["--checkpoint", str(nan), "--data", str(demo_root),
                                         "--workers", "0", "--devices", "cpu,cpu"]),
            (predict_main, "predict", [str(image), "--checkpoint", str(nan)])):
        assert run(main, prog, argv) == 2
        cap = capsys.readouterr()
        err = cap.err.strip().splitlines()
        assert len(err) == 1 and "non-finite values (model fc8.bias)" in err[0], err
        assert cap.out == ""


def test_resume_passes_over_a_non_finite_last_checkpoint(diverged, demo_root, tmp_path,
                                                         capsys):
    out, _, _ = diverged
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copyfile(out / "last.pt", run_dir / "epoch_001.pt")
    _rewrite(out / "last.pt", run_dir / "last.pt", _nan_fc8_bias)
    capsys.readouterr()
    t = Trainer.setup(*parse_command(["--data", str(demo_root), "--out", str(run_dir), *BASE,
                                      *CPU_PAIR, "--checkpoint-minutes", "0", "--resume"]))
    err = capsys.readouterr().err
    assert "non-finite values (model fc8.bias)" in err and "trying the previous" in err, err
    assert f"resumed from {run_dir / 'epoch_001.pt'}" in err, err
    assert t.pos.step == 2


# ----------------------------------------------------------------------------- checkpoint sizes


def _bomb(path: Path, nbytes: int) -> None:
    """A checkpoint-shaped zip (torch.save's layout) whose only tensor's record is DEFLATE
    compressed zeros that inflate to ``nbytes``, and whose pickle declares that tensor:
    a file of a few hundred KB that a plain torch.load inflates in full."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(10)}}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    n = nbytes // 4
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):  # 10 floats -> n floats (storage, size)
                assert data.count(b"K\nt") == 1 and data.count(b"K\n\x85") == 1
                data = data.replace(b"K\nt", b"J" + struct.pack("<i", n) + b"t")
                data = data.replace(b"K\n\x85", b"J" + struct.pack("<i", n) + b"\x85")
            if info.filename.endswith("/data/0"):
                record = zipfile.ZipInfo(info.filename)
                record.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(record, "w", force_zip64=True) as f:
                    for _ in range(nbytes >> 20):
                        f.write(bytes(1 << 20))
                continue
            dst.writestr(info, data)


def test_a_small_file_declaring_a_huge_tensor_is_refused_before_allocating(tmp_path):
    bomb = tmp_path / "bomb.pt"
    _bomb(bomb, 256 << 20)
    assert bomb.stat().st_size < 1 << 20
    with zipfile.ZipFile(bomb) as z:  # the file really declares 256 MB...
        assert max(i.file_size for i in z.infolist()) == 256 << 20
    p = run_python(PROGRAMS / "load_checkpoint.py", bomb)
    assert p.returncode == 0, p.stderr
    message, grown_mb = p.stdout.strip().splitlines()
    assert f"checkpoint {bomb} is not a checkpoint of this project" in message, message
    assert "is compressed" in message and "268,435,456" in message, message
    assert int(grown_mb) < 64, grown_mb  # ...and loading it allocated none of them


def test_a_tensor_of_the_wrong_shape_is_one_line_naming_it(diverged, demo_root, tmp_path,
                                                          capsys):
    out, _, _ = diverged
    wide = tmp_path / "wide.pt"
    _rewrite(out / "last.pt", wide,
             lambda p: p["model"].__setitem__("fc8.bias", torch.zeros(5000)))
    capsys.readouterr()
    assert run(evaluate_main, "evaluate", ["--checkpoint", str(wide), "--data", str(demo_root),
                                           "--workers", "0", "--devices", "cpu,cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "model fc8.bias is shape (5000,), but arch=alexnet with 4 classes needs shape (4,)" \
        in err[0], err
    missing = tmp_path / "missing.pt"
    _rewrite(out / "last.pt", missing,
             lambda p: p["optimizer"]["buffers"]["velocity"].pop("conv1.weight"))
    with pytest.raises(CheckpointError, match="optimizer velocity conv1.weight is nothing"):
        load_checkpoint(missing)


# ----------------------------------------------------------------------------- weights-only refusal


class _Foreign:
    """A class no checkpoint of this project holds."""


def _garbage_pickle(path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"model": {}}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, b"\x80\x02?garbage" if info.filename.endswith("data.pkl")
                         else data)


@pytest.mark.parametrize("kind", ["runs-code", "foreign-class", "garbage-pickle"])
def test_the_weights_only_refusal_never_suggests_turning_it_off(tmp_path, kind):
    path, marker = tmp_path / "x.pt", tmp_path / "MARKER"
    if kind == "runs-code":
        torch.save({"format": FORMAT, "x": RunsCode(marker)}, path)
    elif kind == "foreign-class":
        torch.save({"format": FORMAT, "x": _Foreign()}, path)
    else:
        _garbage_pickle(path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {path} cannot be loaded safely (weights_only=True): it "
                          "is not a checkpoint of this project, or it is unsafe"), msg
    if kind == "runs-code":
        assert "names posix.system" in msg or "names nt.system" in msg, msg
    for advice in ("weights_only=False", "`weights_only` set to `False`", "safe_globals",
                   "trust", "Re-running"):
        assert advice not in msg, msg
    assert "\n" not in msg and not marker.exists()


def test_the_records_of_a_real_checkpoint_pass_the_archive_check(diverged):
    """What the archive check asks of a file holds for every file torch.save writes here."""
    out, _, _ = diverged
    with zipfile.ZipFile(out / "last.pt") as z:
        records = z.infolist()
    assert {r.compress_type for r in records} == {zipfile.ZIP_STORED}
    assert sum(r.file_size for r in records) <= (out / "last.pt").stat().st_size
    check_archive(out / "last.pt")
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01
    # written without the zip's CRC-32 where torch has the switch (the checksum covers the
    # bytes), which is left as it was
    try:
        from torch.utils.serialization import config as serialization_config
    except ImportError:  # torch < 2.6: no switch, the CRC is written
        serialization_config = None
    if hasattr(getattr(serialization_config, "save", None), "compute_crc32"):
        assert {r.CRC for r in records if r.file_size} == {0}
        assert serialization_config.save.compute_crc32 is True
