"""A second signal at every line of a checkpoint's save, one save per line: ``save_checkpoint``
(its own lines, ``atomic_write``'s and ``torch.save``'s) is run again and again, and the k-th
time a KeyboardInterrupt (what the second signal's handler raises, wherever Python next
checks) is raised at the k-th line it executes, until a save runs to its end. An interrupted
save's objects are freed with its exception, its file already closed. After each: the
interrupt reached the caller, no temporary file is left, and last.pt holds the previous
checkpoint's bytes or, interrupted after its rename, the new one's (those of the save that
ran to its end). The process must survive every one: an abort (-6) here is torch's zip
writer completing its archive into the closed file from a C++ destructor.

Prints one line of JSON: lines (how many a whole save executes), interrupted, bad (what
failed, by line number), new (the interrupted saves after which last.pt was the new one).

Usage: interrupt_save.py FOLDER (run by tests/test_reliability_signals.py)
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import split_alexnet.utils.checkpoint_file as checkpoint_file
import split_alexnet.utils.fileio as fileio
from split_alexnet.utils.checkpoint_file import save_checkpoint

TRACED = {os.path.abspath(m.__file__) for m in (checkpoint_file, fileio)} | {
    os.path.abspath(torch.serialization.__file__)}
folder = Path(sys.argv[1])
target = folder / "last.pt"
payload = {"model": {"conv1.weight": torch.ones(4, 3), "fc8.bias": torch.zeros(5)},
           "optimizer": {"state": {0: {"momentum_buffer": torch.full((4, 3), 0.5)}}},
           "progress": {"step": 1}}
save_checkpoint(target, payload)
before = hashlib.sha256(target.read_bytes()).hexdigest()
payload["progress"] = {"step": 2}
count, at = [0], [0]


def line(frame, event, arg):
    """Counts the lines of traced files; raises at the chosen one."""
    count[0] += 1
    if count[0] == at[0]:
        raise KeyboardInterrupt
    return line


def call(frame, event, arg):
    """The trace function: the lines of the files of a save only."""
    return line(frame, event, arg) if frame.f_code.co_filename in TRACED else None


k, interrupted, bad, held = 0, 0, [], {}
while True:
    k += 1
    count[0], at[0] = 0, k
    sys.settrace(call)
    try:
        save_checkpoint(target, payload)
        sys.settrace(None)
        break
    except KeyboardInterrupt:
        sys.settrace(None)
        interrupted += 1
    left = sorted(p.name for p in folder.iterdir() if p.name != "last.pt")
    if left:
        bad.append(f"line {k}: left {left}")
    held[k] = hashlib.sha256(target.read_bytes()).hexdigest()
after = hashlib.sha256(target.read_bytes()).hexdigest()
bad += [f"line {k}: last.pt is neither checkpoint" for k, h in held.items()
        if h not in (before, after)]
print(json.dumps({"lines": k, "interrupted": interrupted, "bad": bad,
                  "new": sum(h == after for h in held.values())}))
