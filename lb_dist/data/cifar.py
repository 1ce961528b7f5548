"""CIFAR-10 / CIFAR-100 from the standard python-format files, unpickled safely.

Files (as distributed at https://www.cs.toronto.edu/~kriz/cifar.html, extracted)::

    ROOT/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch     (keys: data, labels)
    ROOT/cifar-100-python/train, test                                       (keys: data, fine_labels)

``ROOT`` may also be the ``cifar-10-batches-py`` / ``cifar-100-python`` directory itself. Each file
is a pickled dict with ``data``: a uint8 numpy array [N, 3072] (the 3x32x32 image, channel-major)
and the labels as a list of ints. The files are read with a restricted unpickler that resolves only
the few globals such a file needs (numpy's array reconstructors, ``numpy.ndarray``, ``numpy.dtype``,
``_codecs.encode``); any other global (``os.system``, ``builtins.eval``, ...) raises before it is
called, so a malicious file cannot run code. The content is then checked (types, shapes, label
range). Every error names the file.

Transform: pixels / 255, normalised per channel with the dataset's mean and std; with ``augment``
(default for the train split) the usual random crop (4 pixels of zero padding, a random 32x32 crop)
and random horizontal flip, written with torch ops (no torchvision).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lb_dist._validation import check_choice

__all__ = ["CifarDataset", "cifar", "load_cifar_file", "CifarFormatError", "MEAN_STD"]

#: Per-channel mean and std of the training images.
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "labels", 10),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels", 100),
}


class CifarFormatError(ValueError):
    """A CIFAR file that is not what the python-format CIFAR files are (or that tries to run code)."""


def _numpy_globals() -> dict[tuple[str, str], object]:
    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = numeric._frombuffer
    import _codecs
    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a CIFAR file needs; anything else is refused before it exists."""

    def __init__(self, file, allowed):
        super().__init__(file, encoding="bytes")
        self._allowed = allowed

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays, "
                                         f"lists, dicts, numbers and strings are accepted)")
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id")


def _key(d: dict, name: str):
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    return None


def load_cifar_file(path, *, num_classes: int, labels_key: str = "labels") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 3, 32, 32], labels int64 [N])`` of one python-format CIFAR file, read
    with the restricted unpickler and checked; :class:`CifarFormatError` (or ``FileNotFoundError``)
    naming the file otherwise."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} does not exist")
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, _numpy_globals()).load()
    except pickle.UnpicklingError as e:
        raise CifarFormatError(f"{path}: not a valid CIFAR python-format file: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            UnicodeDecodeError, OverflowError) as e:
        raise CifarFormatError(f"{path}: not a valid CIFAR python-format file (truncated or corrupt: "
                               f"{type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CifarFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    data, labels = _key(obj, "data"), _key(obj, labels_key)
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in obj)
        raise CifarFormatError(f"{path}: expected keys 'data' and {labels_key!r}, found {keys}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = (f"array of dtype {data.dtype} and shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise CifarFormatError(f"{path}: 'data' must be a uint8 array of shape [N, 3072], got {what}")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise CifarFormatError(f"{path}: {labels_key!r} must be a list of integers")
    if len(labels) != data.shape[0]:
        raise CifarFormatError(f"{path}: {data.shape[0]} images but {len(labels)} labels")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise CifarFormatError(f"{path}: labels must lie in [0, {num_classes}), found {bad[0]}")
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return images, torch.tensor(labels, dtype=torch.long)


def _dataset_dir(root: Path, name: str) -> Path:
    dirname, files, _, _ = _LAYOUT[name]
    if (root / dirname).is_dir():
        return root / dirname
    if root.name == dirname or (root / files["test"][0]).exists():
        return root
    raise FileNotFoundError(f"{name}: no {dirname}/ directory under {root} (expected "
                            f"{root / dirname}/{', '.join(files['train'] + files['test'])} as extracted "
                            f"from the python-format archive)")


class CifarDataset(Dataset):
    """Images and labels of a CIFAR split held in memory as uint8, transformed on access.

    Attributes: ``images`` (uint8 [N, 3, 32, 32]), ``labels`` (int64 [N]), ``num_classes``,
    ``mean``/``std`` ([3, 1, 1]), ``augment``, ``files`` (the files read).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, name: str, augment: bool,
                 files: list[Path] | None = None) -> None:
        self.images, self.labels, self.name, self.augment = images, labels, name, bool(augment)
        self.num_classes = _LAYOUT[name][3]
        mean, std = MEAN_STD[name]
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.files = files or []

    def __len__(self) -> int:
        return self.labels.numel()

    def _transform(self, batch_u8: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = batch_u8.float().div_(255)
        if self.augment:
            n = x.shape[0]
            padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
            offsets = torch.randint(0, 9, (n, 2), generator=generator)
            flips = torch.rand(n, generator=generator) < 0.5
            out = torch.empty_like(x)
            for i in range(n):
                dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
                crop = padded[i, :, dy:dy + 32, dx:dx + 32]
                out[i] = crop.flip(-1) if flips[i] else crop
            x = out
        return (x - self.mean) / self.std

    def __getitem__(self, index: int):
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        return self._transform(self.images[i:i + 1], None)[0], int(self.labels[i])

    def get_batch(self, indices, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images float [N, 3, 32, 32], labels [N])``, transformed (and augmented) as a batch."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return self._transform(self.images[idx], generator), self.labels[idx]


def cifar(root, *, name: str = "cifar10", split: str = "train", augment: bool | None = None) -> CifarDataset:
    """CIFAR-10 or CIFAR-100 (``name``) ``split`` ("train" or "test") from ``root`` (see the module
    docstring). ``augment`` defaults to True for "train" and False for "test"."""
    check_choice("name", name, tuple(_LAYOUT))
    check_choice("split", split, ("train", "test"))
    if root is None:
        raise ValueError(f"{name} needs root=<directory holding {_LAYOUT[name][0]}/>")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: data directory {root} does not exist")
    directory = _dataset_dir(root, name)
    _, files, labels_key, num_classes = _LAYOUT[name]
    paths = [directory / f for f in files[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{name} {split}: missing file(s) {', '.join(missing)}")
    parts = [load_cifar_file(p, num_classes=num_classes, labels_key=labels_key) for p in paths]
    images = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return CifarDataset(images, labels, name=name, augment=(split == "train") if augment is None else augment,
                        files=paths)
