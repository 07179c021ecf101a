"""Shared fixtures. ``demo_root``: a tiny generated CropFolder (4 classes x 8 train x 4 val)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A tiny demo dataset (JPEG, 256x256): root/train/<class>/*.jpg, root/val/<class>/*.jpg."""
    from split_alexnet.data.demo import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), classes=4, train_per_class=8,
                             val_per_class=4, seed=0)
