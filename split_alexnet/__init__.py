"""split_alexnet: the original two-GPU AlexNet (Krizhevsky, Sutskever, Hinton, NIPS 2012).

    from split_alexnet import SplitAlexNet
    net = SplitAlexNet(num_classes=1000, devices=("cuda:0", "cuda:1"))
    single = net.collapse("cuda:0")       # the same function on one device
"""

from split_alexnet.network.model import (AlexNet, HalfAlexNet, ModelConfig, SplitAlexNet, Transfer, build_model,
                    collapse_state_dict, count_parameters, init_weights_, layout_state_dict,
                    split_state_dict)

__all__ = ["AlexNet", "HalfAlexNet", "ModelConfig", "SplitAlexNet", "Transfer", "build_model",
           "collapse_state_dict", "count_parameters", "init_weights_", "layout_state_dict",
           "split_state_dict"]
__version__ = "0.1.0"  # the one version source: pyproject.toml reads this literal
