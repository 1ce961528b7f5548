"""VGG with BatchNorm (Simonyan & Zisserman 2015, configuration "A" = VGG-11; Ioffe & Szegedy 2015
BatchNorm after every convolution), CIFAR variant as used in the CLARS paper's CIFAR-10 experiments.

Features: 3x3 convolutions (padding 1, with bias as in torchvision's ``vgg11_bn``) each followed by
BatchNorm and ReLU, with 2x2 max pooling ("M") after the widths

    64 M 128 M 256 256 M 512 512 M 512 512 M

so a 32x32 input leaves a 1x1x512 map. Classifier: ONE linear layer 512 -> num_classes (the common
CIFAR variant; the ImageNet VGG has three fully connected layers 25088-4096-4096-1000, 123M
parameters, which is far too large for 32x32 inputs). Parameter count with 10 classes: 9,231,114
(9,225,984 in the features).

Initialization: He (Kaiming) normal, fan_out, for the convolutions with zero bias; BatchNorm weight 1,
bias 0; the classifier N(0, 0.01) with zero bias (as torchvision's VGG).
"""
from __future__ import annotations

import torch
from torch import nn

from lb_dist._validation import check_positive_int
from lb_dist.models._init import init_conv_bn_

__all__ = ["VGG", "VGG11_CONFIG", "vgg11_bn"]

VGG11_CONFIG: tuple = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG-BN for 32x32 inputs with a single linear classifier.

    Args:
        config: widths of the 3x3 convolutions and ``"M"`` for 2x2 max pooling.
        num_classes: output logits.
        in_channels: input image channels.
    """

    def __init__(self, config=VGG11_CONFIG, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                check_positive_int("config entry", item)
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        if channels == in_channels:
            raise ValueError(f"config must contain at least one convolution width, got {config!r}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        init_conv_bn_(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)  # 1x1 already for 32x32 inputs
        return self.classifier(x)


def vgg11_bn(num_classes: int = 10, **kwargs) -> VGG:
    """VGG-11 with BatchNorm, CIFAR variant (9.23M parameters with 10 classes)."""
    return VGG(VGG11_CONFIG, num_classes=num_classes, **kwargs)
