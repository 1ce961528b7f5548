"""CIFAR ResNets: parameter counts against He et al. 2016 (Table 6) and a hand count, shapes, shortcuts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lb_dist.models import BasicBlock, CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110

torch.set_num_threads(1)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def hand_count(depth: int, num_classes: int = 10, option: str = "A") -> int:
    """Count from the architecture description: 3x3 convs without bias, BN (2 params per channel)."""
    n = (depth - 2) // 6
    conv = lambda cin, cout, k=3: cin * cout * k * k
    total = conv(3, 16) + 2 * 16
    cin = 16
    for width in (16, 32, 64):
        for i in range(n):
            total += conv(cin, width) + conv(width, width) + 4 * width
            if option == "B" and cin != width:
                total += conv(cin, width, 1) + 2 * width
            cin = width
    return total + 64 * num_classes + num_classes


def test_resnet20_has_about_0_27M_parameters():
    model = resnet20()
    assert n_params(model) == hand_count(20) == 269_722
    assert round(n_params(model) / 1e6, 2) == 0.27  # He et al. 2016, Table 6
    assert n_params(resnet20(shortcut="B")) == hand_count(20, option="B")
    assert n_params(resnet20(num_classes=100)) == hand_count(20, num_classes=100)


@pytest.mark.parametrize("factory,millions", [(resnet32, 0.46), (resnet44, 0.66), (resnet56, 0.85), (resnet110, 1.7)])
def test_deeper_resnets_match_the_paper(factory, millions):
    count = n_params(factory())
    digits = 1 if millions >= 1 else 2
    assert round(count / 1e6, digits) == millions
    assert count == hand_count(factory().depth)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_forward_shape_and_backward(shortcut):
    model = resnet20(shortcut=shortcut, num_classes=7)
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert out.shape == (3, 7)
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert CifarResNet(8, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("depth", [0, 2, 7, 19, 21, 33])
def test_depth_validation(depth):
    with pytest.raises(ValueError, match="depth"):
        CifarResNet(depth)


def test_argument_validation():
    with pytest.raises(ValueError, match="depth"):
        CifarResNet("20")
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNet(20, shortcut="C")
    with pytest.raises(ValueError, match="num_classes"):
        CifarResNet(20, num_classes=0)
    with pytest.raises(ValueError, match="residual_bn_init"):
        CifarResNet(20, residual_bn_init=float("nan"))


def test_option_a_shortcut_is_subsampled_zero_padded_identity():
    torch.manual_seed(0)
    block = BasicBlock(16, 32, stride=2, shortcut="A")
    assert n_params(block) == 16 * 32 * 9 + 32 * 32 * 9 + 4 * 32  # no shortcut parameters
    x = torch.randn(2, 16, 8, 8)
    expected = torch.zeros(2, 32, 4, 4)
    for i in range(4):
        for j in range(4):
            expected[:, :16, i, j] = x[:, :, 2 * i, 2 * j]
    torch.testing.assert_close(block.shortcut(x), expected, rtol=0, atol=0)


def test_residual_bn_init_zero_makes_blocks_identity():
    torch.manual_seed(0)
    model = resnet20(residual_bn_init=0.0)
    block = model.layer1[1]
    assert torch.equal(block.bn2.weight, torch.zeros(16)) and torch.equal(block.bn1.weight, torch.ones(16))
    x = torch.relu(torch.randn(4, 16, 8, 8))  # block inputs are post-ReLU
    torch.testing.assert_close(block(x), x)
