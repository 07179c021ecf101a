"""The start method of the data side's worker processes (prepare and the statistics)."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import BaseContext


def mp_context() -> BaseContext:
    """forkserver where available (one fresh server imports the package - which imports torch -
    once; workers are forked from it cheaply and safely), else spawn."""
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")
