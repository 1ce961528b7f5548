"""ResNets with projection shortcuts (He et al. 2016, "Deep Residual Learning", Table 1), in the
layout of torchvision's ``resnet18`` / ``resnet50`` (plain torch.nn, no torchvision needed).

* ``stem="imagenet"``: 7x7/2 convolution with 64 filters, BatchNorm, ReLU, 3x3/2 max pooling
  (ImageNet, 224x224 inputs).
* ``stem="cifar"``: one 3x3/1 convolution with 64 filters, BatchNorm, ReLU, no pooling: the usual
  CIFAR variant of ResNet-18 (32x32 inputs keep a 4x4 map before the global average pooling).

Four stages of basic blocks (two 3x3 convolutions; ResNet-18/34) or bottleneck blocks (1x1, 3x3,
1x1 with 4x expansion; ResNet-50/101/152) with 64, 128, 256, 512 base widths; the first block of
stages 2-4 has stride 2. Where the shape changes the shortcut is a 1x1 convolution with the block's
stride followed by BatchNorm (option B). The bottleneck has its stride on the 3x3 convolution
("ResNet v1.5", as torchvision and MLPerf; the 2016 paper put it on the first 1x1; same parameter
count).

Parameter counts: ResNet-50 with 1000 classes 25,557,032; ResNet-18 with 1000 classes 11,689,512;
ResNet-18-CIFAR with 10 classes 11,173,962.

Initialization: He (Kaiming) normal, fan_out, for convolutions; BatchNorm weight 1 and bias 0,
except ``last_bn_gamma``: the initial scale gamma_0 of the LAST BatchNorm of every residual block
(GradientMix paper, appendix A, Table 3 tunes it for ResNet-50 on ImageNet; 0 makes every block
start as the identity, Goyal et al. 2017); ``nn.Linear``'s default initialization for the classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from lb_dist._validation import check_choice, check_finite_number, check_positive_int
from lb_dist.models._init import init_conv_bn_

__all__ = ["ResNet", "ResidualBasicBlock", "Bottleneck", "resnet18", "resnet18_cifar", "resnet50"]


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


class ResidualBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (projection where the shape changes), ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), _bn(planes))

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN + shortcut, ReLU (ResNet v1.5)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = _bn(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                                            _bn(out_planes))

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_BLOCKS = {"basic": ResidualBasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet with four stages.

    Args:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50/101/152).
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18, ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: output logits.
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool) or ``"cifar"`` (3x3/1 conv, no pooling).
        in_channels: input image channels.
        last_bn_gamma: initial weight gamma_0 of the last BatchNorm in every residual block; ``None``
            keeps 1 (the BatchNorm default).
    """

    def __init__(self, block: str = "bottleneck", layers=(3, 4, 6, 3), num_classes: int = 1000,
                 stem: str = "imagenet", in_channels: int = 3, last_bn_gamma: float | None = None):
        super().__init__()
        check_choice("block", block, tuple(_BLOCKS))
        check_choice("stem", stem, ("imagenet", "cifar"))
        layers = tuple(layers)
        if len(layers) != 4:
            raise ValueError(f"layers must give the number of blocks of 4 stages, got {layers!r}")
        for i, n in enumerate(layers):
            check_positive_int(f"layers[{i}]", n)
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        if last_bn_gamma is not None:
            check_finite_number("last_bn_gamma", last_bn_gamma)
        block_cls = _BLOCKS[block]
        self.block, self.layers_per_stage, self.stem = block, layers, stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = _bn(64)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 64
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block_cls(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

        init_conv_bn_(self)
        if last_bn_gamma is not None:
            for m in self.residual_blocks():
                nn.init.constant_(m.last_bn.weight, float(last_bn_gamma))

    def residual_blocks(self) -> list[nn.Module]:
        """The residual blocks in order (each has ``.last_bn``)."""
        return [m for m in self.modules() if isinstance(m, (ResidualBasicBlock, Bottleneck))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """ImageNet ResNet-18 (11.69M parameters with 1000 classes)."""
    return ResNet("basic", (2, 2, 2, 2), num_classes=num_classes, **kwargs)


def resnet18_cifar(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-18 with the CIFAR stem (3x3/1 convolution, no max pooling): 11.17M parameters with 10
    classes."""
    return ResNet("basic", (2, 2, 2, 2), num_classes=num_classes, stem="cifar", **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ImageNet ResNet-50 v1.5 (25.56M parameters with 1000 classes)."""
    return ResNet("bottleneck", (3, 4, 6, 3), num_classes=num_classes, **kwargs)
