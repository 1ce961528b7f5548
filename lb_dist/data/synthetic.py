"""Deterministic synthetic image classification for offline smoke runs (no files, no downloads)."""
from __future__ import annotations

import hashlib

import torch
from torch.utils.data import Dataset

from lb_dist._validation import check_choice, check_non_negative, check_positive_int

__all__ = ["SyntheticImages"]

#: The seed of the class templates: the templates ARE the task, identical for every split and seed.
TEMPLATE_SEED = 1234


def _seed(*parts) -> int:
    digest = hashlib.blake2b(":".join(map(str, ("lb_dist.SyntheticImages", *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SyntheticImages(Dataset):
    """``n`` images of ``image_shape`` in ``num_classes`` classes, as ``(image, label)`` pairs.

    Class c has a smooth random template ``T_c`` (a 4x4 random map per channel, bilinearly upsampled;
    drawn from a fixed seed, so the task is the same for every split and ``seed``). Sample i is
    ``T_{y_i} * s_i + noise * eps_i`` with a label ``y_i`` uniform over the classes, a brightness
    ``s_i ~ U(0.5, 1.5)`` and ``eps_i ~ N(0, I)``: the task needs learning (the default noise of 3.0
    hides the template in every single pixel) and can be overfit. The labels and sample i depend only
    on ``(seed, split, i)``, so the dataset is the same in every process and at every access, and
    needs no memory (images are made on access; :meth:`get_batch` makes a batch at once).
    """

    def __init__(self, n: int, *, num_classes: int = 10, image_shape=(3, 32, 32), seed: int = 0,
                 split: str = "train", noise: float = 3.0) -> None:
        check_positive_int("n", n)
        check_positive_int("num_classes", num_classes)
        image_shape = tuple(image_shape)
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (channels, height, width), got {image_shape!r}")
        for i, d in enumerate(image_shape):
            check_positive_int(f"image_shape[{i}]", d)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        check_choice("split", split, ("train", "val", "test"))
        check_non_negative("noise", noise)
        self.n, self.num_classes, self.image_shape = n, num_classes, image_shape
        self.seed, self.split, self.noise = seed, split, float(noise)
        c, h, w = image_shape
        g = torch.Generator().manual_seed(TEMPLATE_SEED)
        coarse = torch.randn(num_classes, c, 4, 4, generator=g)
        self.templates = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        g = torch.Generator().manual_seed(_seed(seed, split, "labels"))
        self.labels = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return self.n

    def _image(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, self.split, i))
        scale = 0.5 + torch.rand((), generator=g)
        eps = torch.randn(self.image_shape, generator=g)
        return self.templates[self.labels[i]] * scale + self.noise * eps

    def __getitem__(self, index: int):
        i = int(index)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"index {index} out of range for a dataset of {self.n} samples")
        return self._image(i), int(self.labels[i])

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images [N, C, H, W], labels [N])`` of the given indices (the same values as indexing)."""
        idx = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        if not idx:
            return torch.empty(0, *self.image_shape), torch.empty(0, dtype=torch.long)
        images = torch.stack([self[i][0] for i in idx])
        return images, self.labels[torch.tensor(idx) % self.n]
