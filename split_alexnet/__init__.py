"""split_alexnet: the original two-GPU AlexNet (Krizhevsky, Sutskever, Hinton, NIPS 2012).

    from split_alexnet import ModelConfig, SplitAlexNet, build_model, place
    net = place(SplitAlexNet(num_classes=1000), ("cuda:0", "cuda:1"))  # one tower per GPU
    single = net.collapse("cuda:0")       # the same function on one device
    same = build_model(ModelConfig(num_classes=1000), "split", "cuda:0,cuda:1")
"""

from split_alexnet.network.model import (AlexNet, HalfAlexNet, ModelConfig, SplitAlexNet,
                                         Transfer, collapse_state_dict, count_parameters,
                                         init_weights_, layout_state_dict, split_state_dict)
from split_alexnet.network.placement import build_model, place

__all__ = ["AlexNet", "HalfAlexNet", "ModelConfig", "SplitAlexNet", "Transfer", "build_model",
           "collapse_state_dict", "count_parameters", "init_weights_", "layout_state_dict",
           "place", "split_state_dict"]
__version__ = "0.1.0"  # the one version source: pyproject.toml reads this literal
