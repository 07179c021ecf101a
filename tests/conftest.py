"""Shared fixtures and markers of the test suite (the shared functions are in helpers.py).

* ``demo_root``: a tiny generated CropFolder (4 classes x 8 train x 4 val).
* Real runs shared by several test files (session fixtures: built once per worker, never
  changed; a test that continues one works on a :func:`helpers.copy_run` of it):
  ``one_step`` (one step), ``reference`` (8 steps, uninterrupted); and ``short_root``, a set
  of one training step per epoch and 40 validation images.
* ``module_tmp(name)``: a new folder for a module fixture, removed with the module's other
  fixtures once its tests are done, unless one of them failed (each full-size checkpoint is
  ~450 MB; kept to the end, a whole run's would fill 19 GB).
* ``gpu`` tests are skipped by their marker alone when no CUDA device is present.
* Under ``pytest -n N`` (pytest-xdist, the default in pyproject.toml) each worker and the
  processes its tests start use one torch thread: N workers share N cores.
* glibc's malloc, in this process and every process it starts, keeps freed memory for the
  next allocation (:data:`MALLOC`) instead of handing each block over 32 MB (fc6's weights,
  gradients and momentum; every checkpoint's tensors) its own mmap, returned at free and
  faulted in again page by page at the next: the suite ran in 545 s instead of 628 s on a
  2-core VM, kernel time 202 s instead of 356 s (docs/benchmarks.md). A variable already set
  is kept.
* Child processes: a test's command in a process of its own (``helpers.start_python``,
  ``helpers.run_python``) is forked from an interpreter that has imported torch once
  (fork_server.py: about 4 CPU-seconds saved per process); ``--fresh-interpreters`` starts
  each from a new interpreter instead.
* ``slow``: every test that uses a fixture of :data:`SLOW_FIXTURES` (real training runs,
  torchrun jobs, chaos runs) is marked ``slow``; ``pytest -m "not slow"`` is the quick tier.
  The files with slow tests run first (the two workers then finish close together).
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
from collections import Counter

import pytest
import torch

#: glibc malloc's settings for the suite (mallopt's M_MMAP_MAX, M_TRIM_THRESHOLD and M_TOP_PAD,
#: as the environment variables glibc reads at a process's start): no block gets its own mmap,
#: up to 1 GiB freed at the heap's top stays for the next allocation, and the heap grows by
#: 64 MiB at least.
MALLOC = {"MALLOC_MMAP_MAX_": (-4, 0), "MALLOC_TRIM_THRESHOLD_": (-1, 2**30),
          "MALLOC_TOP_PAD_": (-2, 2**26)}

if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
    _libc = ctypes.CDLL(None)
    for _name, (_param, _value) in MALLOC.items():
        if _name not in os.environ:  # for the processes the tests start, and for this one
            os.environ[_name] = str(_value)
            _libc.mallopt(_param, _value)

if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker of pytest -n N: one core each, and so
    os.environ["OMP_NUM_THREADS"] = "1"  # for the trainings and jobs it starts
    torch.set_num_threads(1)

from helpers import CPU_PAIR, FRESH, train
from split_alexnet.data.demo import make_demo_dataset

#: Module fixtures that run real training jobs: the full-size training runs of test_train, the
#: torchrun jobs of test_distributed, test_distributed_failures, test_hybrid and test_towers,
#: and the SIGKILL/SIGTERM chaos runs of test_reliability_chaos.
SLOW_FIXTURES = {"runs", "dist_runs", "chaos", "tower_job", "hybrid_runs", "hybrid_steps",
                 "three_runs"}


def pytest_addoption(parser):
    parser.addoption("--fresh-interpreters", action="store_true",
                     help="start every child process of a test from a new interpreter instead "
                          "of forking it from one that has imported torch (fork_server.py)")


def pytest_configure(config):
    FRESH["interpreters"] = config.getoption("fresh_interpreters")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
    # The files with slow tests first, then the others by their number of tests: pytest-xdist
    # (--dist loadfile --no-loadscope-reorder) hands the files out in this order, so that no
    # long file starts last and keeps one worker busy after the other is done.
    slow_files = {item.path for item in items if "slow" in item.keywords}
    tests_in = Counter(item.path for item in items)
    items.sort(key=lambda item: (item.path not in slow_files, -tests_in[item.path]))


#: The test files (node ids up to "::") in which a test has failed in this process.
FAILED_FILES: set[str] = set()


def pytest_runtest_logreport(report):
    if report.failed:
        FAILED_FILES.add(report.nodeid.split("::")[0])


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """``module_tmp(name)``: a new folder for this module's fixtures (see the docstring)."""
    base = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    made = 0

    def mktemp(name: str):
        nonlocal made
        made += 1
        path = base / f"{name}{made}"
        path.mkdir()
        return path
    yield mktemp
    if request.node.nodeid.split("::")[0] not in FAILED_FILES:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A tiny demo dataset (JPEG, 256x256): root/train/<class>/*.jpg, root/val/<class>/*.jpg."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), classes=4, train_per_class=8,
                             val_per_class=4, seed=0)


@pytest.fixture(scope="session")
def one_step(demo_root, tmp_path_factory):
    """A real run stopped after its first step: last.pt at step 1 of 4 in epoch 1."""
    out = tmp_path_factory.mktemp("one_step") / "run"
    assert train(demo_root, out, *CPU_PAIR, "--max-steps", "1") == 0
    return out


@pytest.fixture(scope="session")
def reference(demo_root, tmp_path_factory):
    """One uninterrupted in-process run of the demo set: 8 steps, 2 epochs."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train(demo_root, out, *CPU_PAIR) == 0
    return out


@pytest.fixture(scope="session")
def short_root(tmp_path_factory):
    """One step per epoch (2 classes x 4 training images, batch 8) and 40 validation images:
    5 centre-crop batches, 40 ten-crop batches of one image."""
    return make_demo_dataset(tmp_path_factory.mktemp("short"), classes=2, train_per_class=4,
                             val_per_class=20, seed=0)
