"""The weight initialization shared by the convolutional models."""
from __future__ import annotations

from torch import nn


def init_conv_bn_(model: nn.Module) -> None:
    """He (fan-out, ReLU) normal init for every ``Conv2d`` weight, zero conv biases, and BatchNorm
    scale 1 / shift 0: the initialization of He et al. (2016) used by the ResNet and VGG-BN models."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
