"""Shared fixtures, helpers and markers of the test suite.

* ``demo_root``: a tiny generated CropFolder (4 classes x 8 train x 4 val).
* :func:`paper_images`: random network inputs at the paper's input scale.
* :func:`repeated_tiny_set`: 8 training images, each repeated, for runs of many steps and few
  epochs (an epoch's end writes a full-size checkpoint).
* ``gpu`` tests are skipped by their marker alone when no CUDA device is present.
* Under ``pytest -n N`` (pytest-xdist, the default in pyproject.toml) each worker and the
  processes its tests start use one torch thread: N workers share N cores.
* ``slow``: every test that uses a fixture of :data:`SLOW_FIXTURES` (real training runs,
  torchrun jobs, chaos runs) is marked ``slow``; ``pytest -m "not slow"`` is the quick tier.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker of pytest -n N: one core each, and so
    os.environ["OMP_NUM_THREADS"] = "1"  # for the trainings and jobs it starts
    torch.set_num_threads(1)

from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.network.model import INPUT_SIZE

#: Module fixtures that run real training jobs: the full-size training runs of test_train, the
#: torchrun jobs of test_distributed and the SIGKILL/SIGTERM chaos runs of test_reliability.
SLOW_FIXTURES = {"runs", "dist_runs", "chaos"}


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


def paper_images(n: int, *, size: int = INPUT_SIZE, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, 3, size, size) random inputs at the paper's input scale: raw 0-255 RGB minus the
    mean image has a pixel std of about 60."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g) * 60).to(dtype)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A tiny demo dataset (JPEG, 256x256): root/train/<class>/*.jpg, root/val/<class>/*.jpg."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), classes=4, train_per_class=8,
                             val_per_class=4, seed=0)


def repeated_tiny_set(path: Path, copies: int) -> Path:
    """The demo generator's 2 classes x 4 training images (2 val per class, seed 1), each
    training image in ``copies`` files (hard links): at batch 8 an epoch is ``copies`` steps
    over the same 8 images, and their statistics are those of the 8."""
    root = make_demo_dataset(path, classes=2, train_per_class=4, val_per_class=2, seed=1)
    for image in sorted((root / "train").glob("*/*.jpg")):
        for k in range(1, copies):
            os.link(image, image.with_name(f"{image.stem}_copy{k}{image.suffix}"))
    return root
