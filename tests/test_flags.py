"""Every bad flag of every command is one line on stderr and exit code 2, before any work.

Each case runs the command's ``main`` through ``utils.cli.run`` (a subprocess where the old
behaviour was to hang) and checks the exit code, that stderr is exactly one line with the
expected words, and, where the command would create something, that nothing was created.
The paths the commands are pointed at do not exist, so a check that came after any work
would report those instead. TOML settings are checked per field, with their types.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import run_python, write_records
from split_alexnet.tools.bench.main import main as bench_main
from split_alexnet.tools.compare import main as compare_main
from split_alexnet.tools.convert import main as convert_main
from split_alexnet.tools.evaluate import main as evaluate_main
from split_alexnet.tools.experiments import main as experiments_main
from split_alexnet.tools.predict import main as predict_main
from split_alexnet.tools.summary import main as summary_main
from split_alexnet.tools.visualize import main as visualize_main
from split_alexnet.training.config import TrainConfig
from split_alexnet.training.options import parse_config
from split_alexnet.training.command import main as train_main
from split_alexnet.utils.cli import UsageError, run

MAINS = {"train": train_main, "evaluate": evaluate_main, "predict": predict_main,
         "compare": compare_main, "visualize": visualize_main, "summary": summary_main,
         "bench": bench_main, "experiments": experiments_main, "convert": convert_main}

TRAIN = ["--data", "{tmp}/none", "--out", "{tmp}/out", "--devices", "cpu,cpu"]
EVAL = ["--checkpoint", "{tmp}/none.pt", "--data", "{tmp}/none", "--devices", "cpu,cpu"]
PREDICT = ["{tmp}/none.jpg", "--checkpoint", "{tmp}/none.pt"]
KERNELS = ["kernels", "--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/out/k.png"]
RETRIEVAL = ["retrieval", "--checkpoint", "{tmp}/none.pt", "--data", "{tmp}/none",
             "--out", "{tmp}/out/r.png"]
EXPERIMENT = ["init", "--demo", "--out", "{tmp}/out"]

CASES = [
    # train: ranges and finiteness from TrainConfig's field metadata
    ("train", ["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    ("train", ["--dropout", "nan"], "--dropout must be a finite number, got nan"),
    ("train", ["--log-interval", "0"], "--log-interval must be at least 1, got 0"),
    ("train", ["--log-interval", "-3"], "--log-interval must be at least 1, got -3"),
    ("train", ["--eval-every", "0"], "--eval-every must be at least 1, got 0"),
    ("train", ["--plan", "--plan-steps", "0"],
     "--plan-steps must be at least 1 and at most 10000, got 0"),
    ("train", ["--seed", "12345678901234567890"],
     "--seed must be at least 0 and at most 4611686018427387904, got 12345678901234567890"),
    ("train", ["--seed", "-1"], "--seed must be at least 0"),
    ("train", ["--checkpoint-minutes", "-5"], "--checkpoint-minutes must be at least 0, got -5.0"),
    ("train", ["--checkpoint-minutes", "nan"],
     "--checkpoint-minutes must be a finite number, got nan"),
    ("train", ["--keep-last", "-1"], "--keep-last must be at least 0, got -1"),
    ("train", ["--plateau-patience", "-1"], "--plateau-patience must be at least 0, got -1"),
    ("train", ["--lr-drops", "-1"], "--lr-drops must be at least 0, got -1"),
    ("train", ["--lr", "nan"], "--lr must be a finite number, got nan"),
    ("train", ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ("train", ["--lr", "0"], "--lr must be greater than 0 and at most 3.4e+38"),
    ("train", ["--lr", "1e39"], "--lr must be greater than 0 and at most"),
    ("train", ["--lr", "abc"], "--lr must be a number, got 'abc'"),
    ("train", ["--lr", "1e30", "--weight-decay", "1e10"],
     "--lr times --weight-decay is 1e+40, beyond float32"),
    ("train", ["--momentum", "nan"], "--momentum must be a finite number, got nan"),
    ("train", ["--momentum", "1"], "--momentum must be at least 0 and less than 1, got 1.0"),
    ("train", ["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    ("train", ["--weight-decay", "-1"], "--weight-decay must be at least 0"),
    ("train", ["--epochs", "0"], "--epochs must be at least 1, got 0"),
    ("train", ["--batch-size", "4.5"], "--batch-size must be an integer, got '4.5'"),
    ("train", ["--workers", "-1"], "--workers must be at least 0 and at most 256, got -1"),
    ("train", ["--workers", "100000"], "--workers must be at least 0 and at most 256"),
    ("train", ["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
    ("train", ["--watchdog-steps", "-1"], "--watchdog-steps must be at least 0, got -1"),
    # evaluate
    ("evaluate", [*EVAL, "--workers", "-1"], "--workers must be at least 0 and at most 256"),
    ("evaluate", [*EVAL, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("evaluate", [*EVAL, "--json", "{tmp}/file/results.json"],
     "--json {tmp}/file/results.json: {tmp}/file is not a folder"),
    ("evaluate", [*EVAL, "--json", "{tmp}"], "--json {tmp} is a folder, not a file"),
    # predict
    ("predict", [*PREDICT, "--top", "0"], "--top must be at least 1, got 0"),
    ("predict", [*PREDICT, "--top", "abc"], "--top must be an integer, got 'abc'"),
    ("predict", [*PREDICT, "--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
    # compare
    ("compare", ["{tmp}/run_a", "{tmp}/run_b", "--rows", "0"], "--rows must be at least 1, got 0"),
    ("compare", ["{tmp}/run_a", "{tmp}/run_b", "--rows", "-1"], "--rows must be at least 1"),
    ("compare", ["{tmp}/run_a", "{tmp}/run_b", "--out", "{tmp}/file/c.png"],
     "--out {tmp}/file/c.png: {tmp}/file is not a folder"),
    # visualize: image sizes are capped (50 megapixels), checked from the flags
    ("visualize", [*KERNELS, "--scale", "100000"],
     "--cols 16 --scale 100000 ask for a 17,600,034x6,600,048 px image; images are limited "
     "to 50,000,000 pixels"),
    ("visualize", [*KERNELS, "--scale", "0"], "--scale must be at least 1, got 0"),
    ("visualize", [*KERNELS, "--cols", "0"], "--cols must be at least 1, got 0"),
    ("visualize", ["kernels", "--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/k.xyz"],
     "unknown file extension: .xyz"),
    ("visualize", ["kernels", "--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/file/k.png"],
     "--out {tmp}/file/k.png: {tmp}/file is not a folder"),
    ("visualize", ["curves", "{tmp}/run_a", "--out", "{tmp}/out/c.png", "--size",
                   "100000x100000"],
     "--size 100000x100000 ask for a 100,000x100,000 px image; images are limited to"),
    ("visualize", [*RETRIEVAL, "--tile", "100000"], "--tile 100000 ask for a"),
    ("visualize", [*RETRIEVAL, "--tile", "8"], "--tile must be at least 16, got 8"),
    ("visualize", [*RETRIEVAL, "--workers", "-1"], "--workers must be at least 0"),
    ("visualize", [*RETRIEVAL, "--queries", "0"], "--queries must be at least 1, got 0"),
    ("visualize", [*RETRIEVAL, "--max-train", "0"], "--max-train must be at least 1, got 0"),
    # summary: fc8 is capped
    ("summary", ["--classes", "0"], "--classes must be at least 1 and at most 100000, got 0"),
    ("summary", ["--classes", "1000000000"], "--classes must be at least 1 and at most 100000"),
    # bench: the flags of every benchmark, checked before any runs
    ("bench", ["model", "--batch-size", "-4"], "--batch-size must be at least 1, got -4"),
    ("bench", ["model", "--threads", "0"], "--threads must be at least 1, got 0"),
    ("bench", ["data", "--images", "-1"], "--images must be at least 1, got -1"),
    ("bench", ["data", "--workers", "-1"], "--workers must be at least 0 and at most 256"),
    ("bench", ["lrn", "--threads", "0"], "--threads must be at least 1, got 0"),
    ("bench", ["lrn", "--rounds", "0"], "--rounds must be at least 1, got 0"),
    ("bench", ["lrn", "--batch", "0"], "--batch must be at least 1, got 0"),
    ("bench", ["lrn", "--json", "{tmp}/file/b.json"], "--json {tmp}/file/b.json: {tmp}/file"),
    # experiments: its own flags, and the trainer's after --
    ("experiments", [*EXPERIMENT, "--workers", "-1"], "--workers must be at least 0"),
    ("experiments", [*EXPERIMENT, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("experiments", [*EXPERIMENT, "--seeds", "0"], "--seeds must be at least 1, got 0"),
    ("experiments", [*EXPERIMENT, "--", "--lr", "nan"], "--lr must be a finite number, got nan"),
    # convert
    ("convert", ["caffe", "{tmp}", "{tmp}/out/o.pt"], "MODEL.caffemodel {tmp} is a folder"),
    ("convert", ["caffe", "{tmp}/file", "{tmp}/file/o.pt"],
     "OUT.pt {tmp}/file/o.pt: {tmp}/file is not a folder"),
]


def _places(tmp: Path) -> None:
    (tmp / "file").write_text("a regular file\n")
    for name in ("run_a", "run_b"):
        write_records(tmp / name, [{"kind": "train", "step": s, "loss": 2.0 - 0.1 * s,
                                 "top1_err": 0.9} for s in range(1, 6)])


def _fill(argv: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in argv]


@pytest.mark.parametrize("tool, argv, words", CASES,
                         ids=[f"{t}:{' '.join(a[-2:])}" for t, a, _ in CASES])
def test_a_bad_flag_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, tool, argv,
                                                           words):
    _places(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = run(MAINS[tool], tool, _fill(argv, tmp_path))
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert rc == 2, cap.err
    assert len(err) == 1, err
    assert err[0].startswith(f"{tool}: error: ") and _fill([words], tmp_path)[0] in err[0], err
    assert cap.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created


# ----------------------------------------------------------------------------- special inputs


@pytest.mark.parametrize("which", ["MODEL", "--mean"])
def test_convert_refuses_a_fifo_instead_of_hanging_on_it(tmp_path, which):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "model").write_bytes(b"not read")
    model = fifo if which == "MODEL" else tmp_path / "model"
    argv = ["caffe", str(model), str(tmp_path / "o.pt")] + \
        (["--mean", str(fifo)] if which == "--mean" else [])
    p = run_python("-m", "split_alexnet.convert", *argv, timeout=120)
    assert p.returncode == 2, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert f"{fifo} is not a regular file" in line, line
    assert not (tmp_path / "o.pt").exists()


# ----------------------------------------------------------------------------- compare's records

NEEDS = "; compare needs an integer step and finite numbers"


@pytest.mark.parametrize("record, words", [
    ([1, 2], "record 6 is not a JSON object: [1, 2]"),
    ({"kind": "train", "step": 6, "loss": "low"}, "record 6 (train) has loss = 'low'" + NEEDS),
    ({"kind": "train", "loss": 1.0}, "record 6 (train) has step = None" + NEEDS),
    ({"kind": "train", "step": True, "loss": 1.0}, "record 6 (train) has step = True" + NEEDS),
    ({"kind": "train", "step": 6, "loss": float("nan")},
     "record 6 (train) has loss = nan" + NEEDS),
    ({"kind": "val", "step": 5, "top1_err": None, "top5_err": 0.5},
     "record 6 (val) has top1_err = None" + NEEDS),
])
def test_compare_names_a_malformed_record_in_one_line(tmp_path, capsys, record, words):
    good = [{"kind": "train", "step": s, "loss": 1.0} for s in range(1, 6)]
    a = write_records(tmp_path / "a", good)
    b = write_records(tmp_path / "b", [*good, record])
    assert run(compare_main, "compare", [str(a), str(b)]) == 2
    cap = capsys.readouterr()
    (line,) = cap.err.strip().splitlines()
    assert line.endswith(f"{b / 'metrics.jsonl'}: {words}"), line
    assert cap.out == ""
    # Records of other kinds, and fields compare does not read, are not its business.
    write_records(b, [*good, {"kind": "resume", "from": 3}, {"kind": "train", "step": 7,
                                                          "loss": 0.5, "lr": "?"}])
    assert run(compare_main, "compare", [str(a), str(b)]) == 0
    assert "train loss: 5 shared steps, largest difference 0" in capsys.readouterr().out


# ----------------------------------------------------------------------------- TOML


@pytest.mark.parametrize("text, words", [
    ("lr = 1e400\n", "lr must be a finite number, got inf"),
    ("lr = nan\n", "lr must be a finite number, got nan"),
    ('epochs = "ten"\n', "epochs must be an integer, got 'ten'"),
    ("batch-size = 4.5\n", "batch-size must be an integer, got 4.5"),
    ('single-device = "false"\n', "single-device must be true or false, got 'false'"),
    ("seed = true\n", "seed must be an integer, got True"),
    ("checkpoint_minutes = -5\n", "checkpoint-minutes must be at least 0, got -5"),
    ('data = 5\n', "data must be a string, got 5"),
    ("devices = [\"cpu\", \"cpu\"]\n", "devices must be a string, got ['cpu', 'cpu']"),
    ('dropout = "0.5"\n', "dropout must be a number, got '0.5'"),
])
def test_toml_values_are_checked_per_field(tmp_path, capsys, text, words):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    rc = run(train_main, "train", ["--config", str(cfg), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"config file {cfg}: {words}" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_toml_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes("lr = 0.01  # caf\u00e9\n".encode("latin-1"))
    assert run(train_main, "train", ["--config", str(cfg)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"config file {cfg} is not UTF-8 text" in line, line


def test_toml_integers_are_accepted_where_floats_are_due(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("lr = 1\ncheckpoint-minutes = 0\nmomentum = 0\n")
    from_file = parse_config(["--config", str(cfg)])
    got = (from_file.optim.lr, from_file.checkpoint.checkpoint_minutes,
           from_file.optim.momentum)
    assert got == (1.0, 0.0, 0.0)
    assert all(isinstance(v, float) for v in got)
    assert from_file.optim.lr == parse_config(["--lr", "1"]).optim.lr


def test_configs_built_in_code_are_checked_alike():
    """The same ranges and types for a TrainConfig made directly (experiments, tests)."""
    for kw, words in (({"lr": float("nan")}, "--lr must be a finite number, got nan"),
                      ({"epochs": "ten"}, "--epochs must be an integer, got 'ten'"),
                      ({"single_device": "false"}, "--single-device must be true or false"),
                      ({"keep_last": -1}, "--keep-last must be at least 0, got -1")):
        with pytest.raises(UsageError, match=words):
            TrainConfig.from_flat(kw)
    with pytest.raises(UsageError, match="--log-interval must be at least 1, got 0"):
        TrainConfig().with_settings(log_interval=0)
    with pytest.raises(UsageError, match="--dropout must be a finite number"):
        TrainConfig().with_settings(dropout=float("inf"))


def test_help_states_the_range_of_each_numeric_flag(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("(default: 128); at least 1", "(default: 0.9); at least 0 and less than 1",
                  "(default: 30.0); at least 0", "(default: 4); at least 0 and at most 256"):
        assert words in text, words
