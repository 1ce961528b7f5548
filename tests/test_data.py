"""lb_dist.data: synthetic images, CIFAR python-format files (safe unpickling), image folders,
Multi30k (real files from ../shared), translation batches, sharding for any world size."""
from __future__ import annotations

import gzip
import importlib.util
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from _data import MULTI30K, needs_multi30k
from lb_dist.data import (
    DATASET_NAMES,
    CifarFormatError,
    MissingDependencyError,
    ShardedSampler,
    SyntheticImages,
    TranslationDataset,
    cifar,
    collate_translation,
    download_multi30k,
    epoch_permutation,
    global_batch_indices,
    image_folder,
    make_dataset,
    read_multi30k,
)

torch.set_num_threads(1)



# ------------------------------------------------------------------------------------ synthetic
def test_synthetic_images_are_deterministic_and_shaped():
    a = SyntheticImages(50, seed=3)
    b = SyntheticImages(50, seed=3)
    x, y = a[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(x, b[7][0]) and y == b[7][1] and torch.equal(a[7][0], x)  # same at every access
    assert torch.equal(a.labels, b.labels)
    xs, ys = a.get_batch([7, 0, 49])
    assert torch.equal(xs[0], x) and torch.equal(xs[2], a[49][0]) and ys.tolist() == [y, a[0][1], a[49][1]]
    assert torch.equal(a[-1][0], a[49][0])
    test = SyntheticImages(50, seed=3, split="test")
    assert torch.equal(test.templates, a.templates)  # the same task
    assert not torch.equal(test[7][0], x)  # other samples
    other = SyntheticImages(20, num_classes=3, image_shape=(1, 8, 8), seed=0)
    assert other[0][0].shape == (1, 8, 8) and set(other.labels.tolist()) <= {0, 1, 2}
    with pytest.raises(IndexError):
        a[50]
    for kwargs, match in [({"n": 0}, "n"), ({"n": 5, "image_shape": (3, 32)}, "image_shape"),
                          ({"n": 5, "split": "dev"}, "split"), ({"n": 5, "seed": 1.5}, "seed")]:
        n = kwargs.pop("n")
        with pytest.raises(ValueError, match=match):
            SyntheticImages(n, **kwargs)


def test_synthetic_task_is_learnable_from_the_templates():
    """Averaging the samples of a class recovers (a scaled copy of) its own template: nearest
    template of the class mean is the class itself, so the labels carry signal."""
    ds = SyntheticImages(600, seed=0, noise=3.0)
    xs, ys = ds.get_batch(range(600))
    t = ds.templates.flatten(1)
    for c in range(10):
        mean = xs[ys == c].mean(0).flatten()
        cos = torch.nn.functional.cosine_similarity(mean[None], t)
        assert int(cos.argmax()) == c


# ----------------------------------------------------------------------------------------- CIFAR
def write_cifar_file(path: Path, n: int, num_classes: int = 10, labels_key: str = "labels", seed: int = 0,
                     protocol: int = 2) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    # the original files: bytes keys (Python 2 str), a uint8 array, a list of ints
    obj = {b"batch_label": b"testing batch", labels_key.encode(): labels, b"data": data,
           b"filenames": [b"x.png"] * n}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return data, labels


def make_cifar10(root: Path, n: int = 6) -> dict[str, tuple[np.ndarray, list[int]]]:
    d = root / "cifar-10-batches-py"
    files = {f"data_batch_{i}": write_cifar_file(d / f"data_batch_{i}", n, seed=i) for i in range(1, 6)}
    files["test_batch"] = write_cifar_file(d / "test_batch", n, seed=9, protocol=5)
    return files


def test_cifar10_reads_the_python_format(tmp_path):
    files = make_cifar10(tmp_path)
    train = cifar(tmp_path, name="cifar10", split="train", augment=False)
    assert len(train) == 30 and train.num_classes == 10 and train.images.dtype == torch.uint8
    data = np.concatenate([files[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((files[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # channel-major rows: pixel (c, h, w) of image i is data[i, c*1024 + h*32 + w]
    assert torch.equal(train.images, torch.from_numpy(data.reshape(30, 3, 32, 32)))
    assert train.labels.tolist() == labels
    x, y = train[13]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    expected = (torch.from_numpy(data[13].reshape(3, 32, 32)).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected)
    assert y == labels[13]
    test = cifar(tmp_path / "cifar-10-batches-py", name="cifar10", split="test")  # the directory itself
    assert not test.augment and len(test) == 6  # protocol 5 pickle (numpy's _frombuffer path)
    assert torch.equal(test.images, torch.from_numpy(files["test_batch"][0].reshape(6, 3, 32, 32)))
    assert make_dataset("cifar10", root=tmp_path, split="train").augment


def test_cifar_augmentation_is_a_padded_crop_with_optional_flip(tmp_path):
    make_cifar10(tmp_path)
    ds = cifar(tmp_path, name="cifar10", split="train")
    plain = cifar(tmp_path, name="cifar10", split="train", augment=False)
    torch.manual_seed(0)
    xs, _ = ds.get_batch(range(12))
    for i in range(12):
        base = torch.nn.functional.pad(plain.images[i].float() / 255, (4, 4, 4, 4))
        candidates = [base[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        candidates += [c.flip(-1) for c in candidates]
        raw = xs[i] * plain.std + plain.mean
        assert min(float((raw - c).abs().max()) for c in candidates) < 1e-5


def test_cifar100(tmp_path):
    d = tmp_path / "cifar-100-python"
    data, labels = write_cifar_file(d / "train", 8, num_classes=100, labels_key="fine_labels")
    write_cifar_file(d / "test", 4, num_classes=100, labels_key="fine_labels")
    ds = make_dataset("cifar100", root=tmp_path, split="train", augment=False)
    assert ds.num_classes == 100 and ds.labels.tolist() == labels and len(ds) == 8
    assert len(make_dataset("cifar100", root=tmp_path, split="test")) == 4


def test_cifar_missing_and_wrong_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cifar(tmp_path / "nowhere", name="cifar10")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        cifar(tmp_path, name="cifar10")
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        cifar(tmp_path, name="cifar10", split="train")
    with pytest.raises(ValueError, match="split"):
        cifar(tmp_path, name="cifar10", split="val")
    with pytest.raises(ValueError, match="name"):
        cifar(tmp_path, name="cifar11")


class _RunsCommand:
    """A pickle payload that would run a shell command when unpickled by the plain pickle module."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return (os.system, (self.command,))


def test_cifar_refuses_malicious_pickles_naming_the_file(tmp_path):
    make_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    marker = tmp_path / "pwned"
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": _RunsCommand(f"touch {marker}"), b"labels": []}, f, protocol=2)
    with pytest.raises(CifarFormatError, match=r"test_batch.*refusing to load global (posix|os)\.system"):
        cifar(tmp_path, name="cifar10", split="test")
    assert not marker.exists()
    # eval smuggled through builtins
    with open(d / "test_batch", "wb") as f:
        f.write(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(CifarFormatError, match="test_batch.*builtins.eval"):
        cifar(tmp_path, name="cifar10", split="test")


@pytest.mark.parametrize("case", ["truncated", "garbage", "not_a_dict", "wrong_shape", "wrong_dtype", "object_array",
                                  "label_range", "label_count", "missing_key"])
def test_cifar_malformed_files_name_the_file(tmp_path, case):
    make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    good = np.zeros((4, 3072), dtype=np.uint8)
    objects = {
        "not_a_dict": [1, 2, 3],
        "wrong_shape": {b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0] * 4},
        "wrong_dtype": {b"data": np.zeros((4, 3072), dtype=np.float32), b"labels": [0] * 4},
        "object_array": {b"data": np.array([[1, 2]], dtype=object), b"labels": [0]},
        "label_range": {b"data": good, b"labels": [0, 1, 2, 10]},
        "label_count": {b"data": good, b"labels": [0, 1]},
        "missing_key": {b"data": good},
    }
    if case == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
    elif case == "garbage":
        path.write_bytes(b"\x00\x01not a pickle at all")
    else:
        with open(path, "wb") as f:
            pickle.dump(objects[case], f, protocol=2)
    with pytest.raises(CifarFormatError, match="data_batch_2"):
        cifar(tmp_path, name="cifar10", split="train")


# ------------------------------------------------------------------------------------- ImageNet
def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train.*<class>"):
        image_folder(tmp_path, split="train")
    with pytest.raises(ValueError, match="split"):
        image_folder(tmp_path, split="test")
    (tmp_path / "val" / "cls").mkdir(parents=True)
    try:
        import torchvision  # noqa: F401
        have_tv = True
    except Exception:  # noqa: BLE001
        have_tv = False
    if have_tv:
        pytest.skip("torchvision is importable here: the missing-dependency error cannot be observed")
    with pytest.raises(MissingDependencyError, match="torchvision"):
        make_dataset("imagenet", root=tmp_path, split="val")
    assert issubclass(MissingDependencyError, ImportError)


# ------------------------------------------------------------------------------------- Multi30k
@needs_multi30k
def test_read_multi30k_real_files():
    train = read_multi30k(MULTI30K, "train")
    val = read_multi30k(MULTI30K, "val")
    test = read_multi30k(MULTI30K, "test")
    assert (len(train), len(val), len(test)) == (29000, 1014, 1000)  # the Multi30k README's counts
    with gzip.open(MULTI30K / "train.en.gz", "rt", encoding="utf-8") as f:
        first_en = f.readline().rstrip("\n")
    with gzip.open(MULTI30K / "train.de.gz", "rt", encoding="utf-8") as f:
        first_de = f.readline().rstrip("\n")
    assert train[0] == (first_en, first_de)
    assert train[0][0].startswith("Two young")
    assert all(s and t for s, t in train[:200])
    assert read_multi30k(MULTI30K, "test_2016_flickr") == test
    assert read_multi30k(MULTI30K, "val", src_lang="de", tgt_lang="en")[3] == val[3][::-1]


@needs_multi30k
def test_multi30k_plain_files_and_download_helper(tmp_path):
    # the download helper, offline: the shared copy served through a file:// URL
    got = download_multi30k(tmp_path / "dl", splits=("val", "test"), base_url=MULTI30K.as_uri())
    assert sorted(p.name for p in got) == sorted(["val.en.gz", "val.de.gz", "test_2016_flickr.en.gz",
                                                  "test_2016_flickr.de.gz"])
    for p in got:
        assert p.read_bytes() == (MULTI30K / p.name).read_bytes()
    assert not list((tmp_path / "dl").glob("*.part"))
    assert download_multi30k(tmp_path / "dl", splits=("val",), base_url="file:///nonexistent/") == \
        [tmp_path / "dl" / "val.en.gz", tmp_path / "dl" / "val.de.gz"]  # present: kept, nothing fetched
    with pytest.raises(OSError, match=r"train\.en\.gz"):
        download_multi30k(tmp_path / "dl2", splits=("train",), base_url="file:///nonexistent/")
    assert not list((tmp_path / "dl2").iterdir())  # no partial file left
    # plain (uncompressed) files read the same
    plain = tmp_path / "plain"
    plain.mkdir()
    for lang in ("en", "de"):
        with gzip.open(MULTI30K / f"val.{lang}.gz", "rb") as src, open(plain / f"val.{lang}", "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert read_multi30k(plain, "val") == read_multi30k(MULTI30K, "val")


def test_multi30k_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_multi30k(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match=r"train\.en"):
        read_multi30k(tmp_path, "train")
    (tmp_path / "val.en").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "val.de").write_text("x\ny\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"val\.en has 3 lines but .*val\.de has 2"):
        read_multi30k(tmp_path, "val")
    (tmp_path / "test_2016_flickr.en.gz").write_bytes(b"this is not gzip")
    (tmp_path / "test_2016_flickr.de").write_text("x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"test_2016_flickr\.en\.gz"):
        read_multi30k(tmp_path, "test")
    (tmp_path / "train.en").write_bytes(b"\xff\xfe bad utf-8\n")
    (tmp_path / "train.de").write_text("x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.en is not UTF-8"):
        read_multi30k(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        read_multi30k(tmp_path, "dev")
    with pytest.raises(ValueError, match="tgt_lang"):
        read_multi30k(tmp_path, "val", tgt_lang="fr")


class _WordTokenizer:
    """A minimal tokenizers-style tokenizer for the dataset tests: one id per word, then </s> = 2."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def __init__(self):
        self.vocab = {}

    def encode_batch(self, texts):
        return [self._Enc([self.vocab.setdefault(w, 4 + len(self.vocab)) for w in t.split()] + [2]) for t in texts]


def test_translation_dataset_and_collate():
    pairs = [("a b c", "x y"), ("d", "z z z z z z z z")]
    ds = TranslationDataset(pairs, _WordTokenizer(), max_length=5)
    assert len(ds) == 2
    item = ds[0]
    assert len(item["input_ids"]) == 4 and item["input_ids"][-1] == 2 and item["labels"][-1] == 2
    long = ds[1]["labels"]
    assert len(long) == 5 and long[-1] == 2  # truncated, end marker kept
    batch = collate_translation([ds[0], ds[1]], pad_id=0)
    assert batch["input_ids"].shape == (2, 4) and batch["labels"].shape == (2, 5)
    assert batch["input_ids"][1].tolist() == ds[1]["input_ids"] + [0, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"][0].tolist() == ds[0]["labels"] + [-100, -100]
    with pytest.raises(ValueError, match="pad_id"):
        collate_translation([ds[0]], pad_id=-1)
    with pytest.raises(ValueError, match="max_length"):
        TranslationDataset(pairs, _WordTokenizer(), max_length=1)


@needs_multi30k
def test_make_dataset_multi30k():
    with pytest.raises(ValueError, match="tokenizer"):
        make_dataset("multi30k", root=MULTI30K, split="val")
    ds = make_dataset("multi30k", root=MULTI30K, split="val", tokenizer=_WordTokenizer(), max_length=16)
    assert len(ds) == 1014 and max(len(x) for x in ds.labels) <= 16


def test_make_dataset_names_and_options():
    assert DATASET_NAMES == ("synthetic", "cifar10", "cifar100", "imagenet", "multi30k")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*synthetic.*multi30k"):
        make_dataset("mnist", split="train")
    ds = make_dataset("synthetic", split="test", n=12, num_classes=4)
    assert len(ds) == 12 and ds.split == "test" and ds.num_classes == 4
    assert len(make_dataset("synthetic", split="train")) == 10000
    with pytest.raises(ValueError, match="does not take option.*'augment'"):
        make_dataset("synthetic", split="train", augment=True)


# ------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [23, 40])
def test_sharded_sampler_disjoint_and_covering(world, n):
    for drop_last in (True, False):
        samplers = [ShardedSampler(n, rank=r, world_size=world, seed=7, drop_last=drop_last) for r in range(world)]
        for epoch in (0, 3):
            for s in samplers:
                s.set_epoch(epoch)
            shares = [list(s) for s in samplers]
            assert len({len(x) for x in shares}) == 1 and len(shares[0]) == len(samplers[0])
            perm = epoch_permutation(n, epoch, seed=7).tolist()
            union = sum(shares, [])
            if drop_last:
                assert len(shares[0]) == n // world
                assert len(set(union)) == len(union)  # disjoint
                assert sorted(union) == sorted(perm[:n // world * world])  # one permutation, tail dropped
            else:
                assert len(shares[0]) == -(-n // world)
                assert set(union) == set(range(n))  # every sample at least once
            # rank r takes positions r, r+K, ... of the permutation
            for r, share in enumerate(shares):
                assert share == [perm[(i * world + r) % n] for i in range(len(share))]
        # shuffle=False is exactly torch's DistributedSampler(shuffle=False)
        for r in range(world):
            ours = list(ShardedSampler(n, rank=r, world_size=world, shuffle=False, drop_last=drop_last))
            ref = list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False, drop_last=drop_last))
            assert ours == ref


def test_sharded_sampler_epochs_seeds_and_global_batches():
    a = ShardedSampler(100, rank=0, world_size=1, seed=1)
    first = list(a)
    a.set_epoch(1)
    assert sorted(list(a)) == sorted(first) and list(a) != first  # a new permutation per epoch
    assert list(ShardedSampler(100, rank=0, world_size=1, seed=2)) != first
    assert list(ShardedSampler(100, rank=0, world_size=1, seed=1)) == first  # deterministic
    # global batch B = 12 over K = 3 ranks: a DataLoader of batch 4 per rank at step s
    n, big_b, k, epoch = 50, 12, 3, 2
    shares = []
    for r in range(k):
        s = ShardedSampler(n, rank=r, world_size=k, seed=5)
        s.set_epoch(epoch)
        shares.append(list(s))
    perm = epoch_permutation(n, epoch, seed=5)
    for step in range(n // big_b):
        block = global_batch_indices(n, big_b, step, epoch, seed=5)
        assert torch.equal(block, perm[step * big_b:(step + 1) * big_b])
        per_rank = [shares[r][step * 4:(step + 1) * 4] for r in range(k)]
        assert sorted(sum(per_rank, [])) == sorted(block.tolist())  # B distinct samples
        for r in range(k):
            assert global_batch_indices(n, big_b, step, epoch, seed=5, rank=r, world_size=k).tolist() == per_rank[r]
    with pytest.raises(ValueError, match="past the end"):
        global_batch_indices(n, big_b, 4, epoch)
    with pytest.raises(ValueError, match="divisible"):
        global_batch_indices(n, 10, 0, 0, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        ShardedSampler(3, rank=0, world_size=4)  # drop_last would leave ranks empty
    with pytest.raises(ValueError, match="epoch"):
        a.set_epoch(-1)
    state = a.state_dict()
    b = ShardedSampler(100, rank=0, world_size=1)
    b.load_state_dict(state)
    assert list(b) == list(a)


def test_sampler_feeds_a_dataloader():
    ds = SyntheticImages(20, image_shape=(1, 4, 4))
    s = ShardedSampler(len(ds), rank=1, world_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, sampler=s)
    seen = torch.cat([y for _, y in loader])
    assert seen.tolist() == [int(ds.labels[i]) for i in s]


if importlib.util.find_spec("torchvision") is None:
    def test_torchvision_is_optional():
        import lb_dist.data  # noqa: F401  (imports without torchvision)
