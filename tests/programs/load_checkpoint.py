"""Loads one checkpoint with ``load_checkpoint`` and prints two lines: the refusal's message
(nothing if it loaded), then how many MB the process's peak memory grew by.

Usage: load_checkpoint.py CKPT (run by tests/test_finite.py::
test_a_small_file_declaring_a_huge_tensor_is_refused_before_allocating)
"""

import resource
import sys

from split_alexnet.utils.checkpoint_file import CheckpointError, load_checkpoint


def peak() -> int:
    """The process's peak resident memory so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


before = peak()
try:
    load_checkpoint(sys.argv[1])
except CheckpointError as e:
    print(e)
print(peak() - before)
