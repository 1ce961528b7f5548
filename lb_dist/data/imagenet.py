"""ImageNet-style class folders (``ROOT/train/<class>/<image>``, ``ROOT/val/<class>/<image>``)
through torchvision, which is an optional dependency (see docs/workloads.md)."""
from __future__ import annotations

from pathlib import Path

from lb_dist._validation import check_choice, check_positive_int

__all__ = ["image_folder", "MissingDependencyError", "IMAGENET_MEAN_STD"]

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class MissingDependencyError(ImportError):
    """An optional package a feature needs is not installed (or does not import)."""


def _import_torchvision():
    try:
        import torchvision
        from torchvision import datasets, transforms
    except Exception as e:  # noqa: BLE001 - ImportError, or a torchvision built for another torch
        raise MissingDependencyError(
            f"image_folder (ImageNet-style class folders) needs torchvision, which could not be imported "
            f"({type(e).__name__}: {e}). Install the torchvision build that matches your torch "
            f"(for a CPU torch: pip install torchvision --index-url https://download.pytorch.org/whl/cpu; "
            f"a plain `pip install torchvision` may replace torch with a CUDA build)") from e
    return torchvision, datasets, transforms


def image_folder(root, *, split: str = "train", image_size: int = 224, augment: bool | None = None):
    """``torchvision.datasets.ImageFolder`` over ``root/split`` with the standard ImageNet transforms:
    train (``augment``, default for "train"): ``RandomResizedCrop(image_size)``, horizontal flip;
    otherwise: resize to ``image_size * 256 / 224``, center crop ``image_size``; then ToTensor and
    normalisation with the ImageNet mean and std. Items are ``(image [3, S, S], label)``."""
    check_choice("split", split, ("train", "val"))
    check_positive_int("image_size", image_size)
    if root is None:
        raise ValueError("imagenet needs root=<directory with train/ and val/ class folders>")
    path = Path(root) / split
    if not path.is_dir():
        raise FileNotFoundError(f"imagenet: {path} does not exist (expected ImageNet-style class folders "
                                f"{Path(root)}/{split}/<class>/<image>)")
    _, datasets, transforms = _import_torchvision()
    mean, std = IMAGENET_MEAN_STD
    if (split == "train") if augment is None else augment:
        tf = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        tf = [transforms.Resize(int(round(image_size * 256 / 224))), transforms.CenterCrop(image_size)]
    tf += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    try:
        return datasets.ImageFolder(str(path), transform=transforms.Compose(tf))
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"imagenet: {path}: {e}") from None
