"""Reference models for the experiments (plain torch.nn, no torchvision; the Transformer through
Hugging Face ``transformers``, built from a config, offline). See docs/workloads.md.

``build_model(name, num_classes=None, **options)`` is the one entry point the training script uses:

==================  =========================================  ===============  =====================
name                model                                      default classes  parameters
==================  =========================================  ===============  =====================
resnet20 ... 110    CIFAR ResNet-(6n+2), option A shortcuts     10               0.27M ... 1.7M
resnetD             any other CIFAR depth D = 6n+2 >= 8         10               (resnet8: 0.08M)
resnet18_cifar      ResNet-18, 3x3 stem, no max pooling         10               11.17M
vgg11_bn            VGG-11 + BatchNorm, one linear classifier   10               9.23M
resnet50            ImageNet ResNet-50 v1.5                     1000             25.56M
transformer_small   Marian-style Transformer, d 128, 2+2        (vocabulary)     0.93M + 128 V
transformer_base    Vaswani base, d 512, 6+6                    (vocabulary)     44.1M + 512 V
==================  =========================================  ===============  =====================

Options: the image models take ``last_bn_gamma`` (initial scale of the last BatchNorm of every
residual block; GradientMix Table 3) and ``in_channels``; the CIFAR ResNets also ``shortcut``; the
Transformers take ``vocab_size`` (shared) or ``src_vocab_size`` + ``tgt_vocab_size``,
``pad_token_id``, ``bos_token_id``, ``eos_token_id``, ``max_positions``, ``dropout``,
``attention_dropout`` and the size overrides ``d_model``, ``encoder_layers``, ``decoder_layers``,
``attention_heads``, ``ffn_dim``.
"""
from __future__ import annotations

import re

from torch import nn

from lb_dist._validation import check_options
from lb_dist.models.cifar_resnet import (
    BasicBlock,
    CifarResNet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from lb_dist.models.resnet import Bottleneck, ResidualBasicBlock, ResNet, resnet18, resnet18_cifar, resnet50
from lb_dist.models.vgg import VGG, vgg11_bn

__all__ = ["build_model", "is_seq2seq", "cifar_resnet_depth", "MODEL_NAMES", "BasicBlock", "CifarResNet", "resnet20", "resnet32",
           "resnet44", "resnet56", "resnet110", "ResNet", "ResidualBasicBlock", "Bottleneck", "resnet18",
           "resnet18_cifar", "resnet50", "VGG", "vgg11_bn"]

_CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
_IMAGE_DEFAULT_CLASSES = {**{name: 10 for name in _CIFAR_DEPTHS}, "resnet18_cifar": 10, "vgg11_bn": 10,
                          "resnet50": 1000}
_TRANSFORMERS = {"transformer_small": "small", "transformer_base": "base"}

MODEL_NAMES: tuple[str, ...] = (*_CIFAR_DEPTHS, "resnet18_cifar", "vgg11_bn", "resnet50", *_TRANSFORMERS)


def cifar_resnet_depth(name: str) -> int | None:
    """The depth D of a CIFAR ResNet name: ``resnet20`` ... ``resnet110``, and ``resnetD`` for any other
    D = 6n+2 >= 8 (``resnet8``, ``resnet1202``); None for every other name (``resnet50`` is the ImageNet
    model, ``resnet18_cifar`` its own architecture)."""
    if name in _CIFAR_DEPTHS:
        return _CIFAR_DEPTHS[name]
    if name in MODEL_NAMES:
        return None
    m = re.fullmatch(r"resnet(\d+)", name)
    if m is None:
        return None
    depth = int(m.group(1))
    return depth if depth >= 8 and (depth - 2) % 6 == 0 else None


def build_model(name: str, *, num_classes: int | None = None, **options) -> nn.Module:
    """Build a model by name (``MODEL_NAMES``, or ``resnetD`` for any CIFAR depth D = 6n+2, see
    :func:`cifar_resnet_depth`), freshly initialised.

    ``num_classes`` is for the image models (default: 10 for the CIFAR models, 1000 for
    ``resnet50``); the Transformers take their vocabulary instead and refuse ``num_classes``.
    ``last_bn_gamma=None`` keeps the BatchNorm default 1.
    """
    depth = cifar_resnet_depth(name)
    if name not in MODEL_NAMES and depth is None:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}, or resnetD for any CIFAR "
                         f"ResNet depth D = 6n+2 >= 8")
    if name in _TRANSFORMERS:
        if num_classes is not None:
            raise ValueError(f"model {name!r} is a sequence-to-sequence model: give vocab_size (or "
                             f"src_vocab_size and tgt_vocab_size), not num_classes")
        from lb_dist.models.transformer import build_transformer
        return build_transformer(_TRANSFORMERS[name], **options)
    classes = _IMAGE_DEFAULT_CLASSES.get(name, 10) if num_classes is None else num_classes
    if depth is not None:
        check_options("model", name, options, ("last_bn_gamma", "shortcut", "in_channels"))
        gamma = options.pop("last_bn_gamma", None)
        return CifarResNet(depth, num_classes=classes,
                           residual_bn_init=1.0 if gamma is None else gamma, **options)
    if name == "vgg11_bn":
        check_options("model", name, options, ("in_channels",))
        return vgg11_bn(num_classes=classes, **options)
    check_options("model", name, options, ("last_bn_gamma", "in_channels"))
    factory = resnet18_cifar if name == "resnet18_cifar" else resnet50
    return factory(num_classes=classes, **options)


def is_seq2seq(model: nn.Module) -> bool:
    """True for encoder-decoder models (a Hugging Face model whose config says
    ``is_encoder_decoder``), which take ``input_ids, attention_mask, labels``; False for the image
    classifiers. Sees through ``DistributedDataParallel`` / DeepSpeed-style ``.module`` wrappers."""
    seen = 0
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) and seen < 4:
        model, seen = model.module, seen + 1
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))
