"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", section 4.2).

Depth 6n+2: a 3x3 convolution with 16 filters, three stages of n basic blocks (two 3x3
convolutions each) with 16, 32 and 64 filters on 32x32, 16x16 and 8x8 feature maps (the first
block of stages 2 and 3 has stride 2), global average pooling and a fully connected layer.
Every convolution is followed by BatchNorm. ResNet-20/32/44/56/110 have 0.27M/0.46M/0.66M/0.85M/1.7M
parameters with option A (the paper's Table 6).

Shortcuts where the shape changes:
  * option "A" (the paper's CIFAR choice): identity with stride-2 subsampling and zero-filled extra
    channels, no parameters (as in fb.resnet.torch, the new channels are appended after the old);
  * option "B": a 1x1 convolution with stride 2 followed by BatchNorm (projection).

Initialization: He (Kaiming) normal, fan_out, for convolutions (the paper's [13]); BatchNorm
weight 1 and bias 0, except that ``residual_bn_init`` sets the initial scale gamma_0 of the LAST
BatchNorm of every residual block (0 makes each block start as the identity, Goyal et al. 2017;
the hyperparameter GradientMix tunes); ``nn.Linear``'s default initialization for the classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lb_dist._validation import check_choice, check_finite_number, check_positive_int
from lb_dist.models._init import init_conv_bn_

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes
        self.projection: nn.Module | None = None
        if (stride != 1 or in_planes != planes) and shortcut == "B":
            self.projection = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            return self.projection(x)
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra_channels > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images.

    Args:
        depth: 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202 in the paper).
        num_classes: output logits (10 for CIFAR-10).
        shortcut: "A" (zero-padding identity, parameter-free; the paper's CIFAR models) or "B"
            (1x1 convolution + BatchNorm projection).
        in_channels: input image channels.
        residual_bn_init: initial weight gamma_0 of the last BatchNorm in every residual block.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "A",
                 in_channels: int = 3, residual_bn_init: float = 1.0):
        super().__init__()
        check_positive_int("depth", depth)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        check_positive_int("num_classes", num_classes)
        check_choice("shortcut", shortcut, ("A", "B"))
        check_positive_int("in_channels", in_channels)
        check_finite_number("residual_bn_init", residual_bn_init)
        self.depth, self.shortcut_option = depth, shortcut
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)

        init_conv_bn_(self)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, float(residual_bn_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet20(**kwargs) -> CifarResNet:
    return CifarResNet(depth=20, **kwargs)


def resnet32(**kwargs) -> CifarResNet:
    return CifarResNet(depth=32, **kwargs)


def resnet44(**kwargs) -> CifarResNet:
    return CifarResNet(depth=44, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    return CifarResNet(depth=56, **kwargs)


def resnet110(**kwargs) -> CifarResNet:
    return CifarResNet(depth=110, **kwargs)
