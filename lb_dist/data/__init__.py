"""Datasets of the experiments (see docs/workloads.md).

* :class:`SyntheticImages`: deterministic CIFAR-shaped classification, offline;
* :func:`cifar`: CIFAR-10/100 from the python-format files, unpickled safely;
* :func:`image_folder`: ImageNet-style class folders (torchvision, optional);
* :func:`read_multi30k`, :func:`download_multi30k`, :class:`TranslationDataset`,
  :func:`collate_translation`: Multi30k En-De from the official raw files;
* :class:`ShardedSampler`, :func:`global_batch_indices`: one permutation per epoch, disjoint shares
  for any number of ranks;
* :func:`make_dataset` (names ``DATASET_NAMES``): one entry point for the training script.
"""
from __future__ import annotations

from torch.utils.data import Dataset

from lb_dist._validation import check_options
from lb_dist.data.cifar import CifarDataset, CifarFormatError, cifar, load_cifar_file
from lb_dist.data.imagenet import MissingDependencyError, image_folder
from lb_dist.data.multi30k import (
    MULTI30K_URL,
    Multi30kFormatError,
    TranslationDataset,
    collate_translation,
    download_multi30k,
    read_multi30k,
)
from lb_dist.data.sampler import ShardedSampler, epoch_permutation, global_batch_indices
from lb_dist.data.synthetic import SyntheticImages

__all__ = ["make_dataset", "DATASET_NAMES", "SyntheticImages", "cifar", "CifarDataset", "CifarFormatError",
           "load_cifar_file", "image_folder", "MissingDependencyError", "read_multi30k", "Multi30kFormatError", "download_multi30k",
           "TranslationDataset", "collate_translation", "MULTI30K_URL", "ShardedSampler", "epoch_permutation",
           "global_batch_indices"]

DATASET_NAMES: tuple[str, ...] = ("synthetic", "cifar10", "cifar100", "imagenet", "multi30k")

#: Default sizes of the synthetic splits (CIFAR-like proportions, small enough for a CPU).
SYNTHETIC_SIZES = {"train": 10000, "val": 2000, "test": 2000}


def make_dataset(name: str, *, root=None, split: str = "train", **options) -> Dataset:
    """A dataset by name (``DATASET_NAMES``).

    =========  ===============================  ==================================================
    name       splits                           options
    =========  ===============================  ==================================================
    synthetic  train, val, test (root unused)   n (default 10000 train / 2000 otherwise),
                                                num_classes, image_shape, seed, noise
    cifar10    train, test                      augment (default: train only)
    cifar100   train, test                      augment
    imagenet   train, val                       image_size (224), augment
    multi30k   train, val, test                 tokenizer (required), max_length (128),
                                                src_lang ("en"), tgt_lang ("de")
    =========  ===============================  ==================================================

    Image datasets yield ``(image, label)``; ``multi30k`` yields ``{"input_ids", "labels"}`` token
    lists to be batched with :func:`collate_translation`.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")
    if name == "synthetic":
        check_options("dataset", name, options, ("n", "num_classes", "image_shape", "seed", "noise"))
        if split not in SYNTHETIC_SIZES:
            raise ValueError(f"split must be one of {', '.join(map(repr, SYNTHETIC_SIZES))}; got {split!r}")
        n = options.pop("n", SYNTHETIC_SIZES[split])
        return SyntheticImages(n, split=split, **options)
    if name in ("cifar10", "cifar100"):
        check_options("dataset", name, options, ("augment",))
        return cifar(root, name=name, split=split, **options)
    if name == "imagenet":
        check_options("dataset", name, options, ("image_size", "augment"))
        return image_folder(root, split=split, **options)
    check_options("dataset", name, options, ("tokenizer", "max_length", "src_lang", "tgt_lang"))
    tokenizer = options.pop("tokenizer", None)
    if tokenizer is None:
        raise ValueError("dataset 'multi30k' needs tokenizer=... (lb_dist.text.train_tokenizer on the train "
                         "split, or lb_dist.text.load_tokenizer(path))")
    max_length = options.pop("max_length", 128)
    pairs = read_multi30k(root, split, **options)
    return TranslationDataset(pairs, tokenizer, max_length=max_length)
