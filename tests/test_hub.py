"""hubconf.py: the real torch.hub against the repository root (``source="local"``);
``torch.hub.list`` and ``torch.hub.help``, which only fetch from GitHub, read the same
hubconf.py with the fetch pointed at this checkout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from split_alexnet.network.model import AlexNet, HalfAlexNet, SplitAlexNet, layout_state_dict
from split_alexnet.utils.checkpoint_file import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def load(entry: str, *args, **kwargs):
    return torch.hub.load(str(REPO), entry, *args, source="local", trust_repo=True, **kwargs)


@pytest.fixture(scope="module")
def ckpt(module_tmp) -> Path:
    path = module_tmp("hub") / "c.pt"
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    save_checkpoint(path, {
        "model": layout_state_dict(AlexNet(3, lrn="caffe", lrn_span="all", init="caffe")),
        "model_config": {"arch": "alexnet", "num_classes": 3, "lrn": "caffe",
                         "lrn_span": "all"},
        "classes": CLASSES, "class_names": ["ant", "bee", "cat"],
        "stats": {"mean": torch.rand(3, 256, 256, generator=g) * 255, "eigval": torch.ones(3),
                  "eigvec": torch.eye(3)}})
    return path


def test_list_and_help_describe_both_entries(monkeypatch):
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *a, **k: str(REPO))
    assert torch.hub.list("owner/split_alexnet", trust_repo=True) == ["alexnet",
                                                                     "split_alexnet"]
    collapsed = torch.hub.help("owner/split_alexnet", "alexnet", trust_repo=True)
    towers = torch.hub.help("owner/split_alexnet", "split_alexnet", trust_repo=True)
    assert collapsed.startswith("The collapsed layout") and towers.startswith("The paper's two")
    for text in (collapsed, towers):
        for word in ("weights", "devices", "num_classes", "lrn_span", ".safetensors", "eval()"):
            assert word in text, word


def test_new_networks_from_model_config_fields():
    net = load("alexnet", num_classes=7, lrn="alpha-over-n", pool="2/2", init="caffe")
    assert type(net) is AlexNet and net.cfg.num_classes == 7 and net.cfg.pool == "2/2"
    assert net.fc8.bias.eq(0).all() and net.conv2.bias.eq(0.1).all()  # Caffe's init
    towers = load("split_alexnet", devices="cpu,cpu", num_classes=5, activation="tanh")
    assert type(towers) is SplitAlexNet and towers.devices == (torch.device("cpu"),) * 2
    assert towers.cfg.activation == "tanh"
    assert type(load("alexnet", arch="half", num_classes=2)) is HalfAlexNet
    with pytest.raises(ValueError, match="one column"):
        load("split_alexnet", arch="half")
    with pytest.raises(TypeError, match="unknown argument"):
        load("alexnet", classes=3)
    with pytest.raises(ValueError, match="lrn"):
        load("alexnet", lrn="sometimes")


def test_weights_from_a_checkpoint_and_a_safetensors_file(ckpt, tmp_path):
    pytest.importorskip("safetensors")
    from split_alexnet.tools.export import main as export_main
    from split_alexnet.utils.cli import run
    assert run(export_main, "export", [str(ckpt), str(tmp_path / "w.safetensors")]) == 0
    x = torch.randn(2, 3, 227, 227, generator=torch.Generator().manual_seed(1)) * 60
    outs = []
    for weights, entry in ((ckpt, "alexnet"), (tmp_path / "w.safetensors", "split_alexnet")):
        net = load(entry, weights=str(weights)).eval()
        assert net.cfg.lrn == "caffe" and net.cfg.lrn_span == "all"
        assert net.classes == CLASSES and net.class_names == ["ant", "bee", "cat"]
        assert net.mean_image.shape == (3, 256, 256)
        with torch.no_grad():
            outs.append(net(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_classes=3, not 10"):
        load("alexnet", weights=str(ckpt), num_classes=10)
    assert load("alexnet", weights=str(ckpt), num_classes=3, init="paper").cfg.init is None
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load("alexnet", weights=str(tmp_path / "junk.safetensors"))
