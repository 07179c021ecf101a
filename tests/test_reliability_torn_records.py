"""A metrics record cut short by a crash or a full disk is skipped with a warning, and a
resumed run starts a new line after it; nothing else is skipped (docs/reliability.md).
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from helpers import CPU_PAIR, copy_run, train
from split_alexnet.training.metrics import read_records
from split_alexnet.utils.cli import UsageError


def test_a_torn_record_is_skipped_and_a_resumed_run_starts_a_new_line(one_step, demo_root,
                                                                      tmp_path, capsys):
    out = copy_run(one_step, tmp_path / "run")
    torn = '{"time": 1700000000.5, "kind": "train", "step": 2, "lo'  # power lost mid-write
    with open(out / "metrics.jsonl", "a") as f:
        f.write(torn)
    capsys.readouterr()
    # To the end of epoch 1: the evaluation, the epoch's checkpoint and curves.png.
    assert train(demo_root, out, *CPU_PAIR, "--resume", "--max-steps", "4") == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and f"{out / 'metrics.jsonl'} ends in a torn record" in warned[0]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    n = lines.index(torn) + 1
    assert json.loads(lines[n])["kind"] == "resume"
    recs = read_records(out)
    assert capsys.readouterr().err.strip() == (
        f"warning: {out / 'metrics.jsonl'}: skipped 1 torn record(s) (line {n}), cut short "
        "by a crash or a full disk")
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["epoch"] for r in recs if r["kind"] == "val"] == [1]
    assert Image.open(out / "curves.png").size == (800, 500)


@pytest.mark.parametrize("lines, torn", [
    (['{"kind": "train", "step": 1}', '{"kind": "tr'], [2]),
    (['{"kind": "train", "step": 1}', '{"kind": "tr', '{"kind": "resume", "step": 1}',
      '{"kind": "train", "step": 2}', "\0\0\0\0"], [2, 5]),
    (['{"kind": "train", "step": 1}', '{"kind": "tr', '{"kind": "train", "step": 2}'], None),
])
def test_the_reader_skips_torn_records_and_nothing_else(tmp_path, capsys, lines, torn):
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    if torn is None:  # a damaged line inside the records: not a torn write
        with pytest.raises(UsageError, match=r"metrics.jsonl:2 is not valid JSON"):
            read_records(tmp_path)
        return
    recs = read_records(tmp_path)
    assert len(recs) == len(lines) - len(torn)
    assert f"skipped {len(torn)} torn record(s) (line {', '.join(map(str, torn))})" in \
        capsys.readouterr().err
