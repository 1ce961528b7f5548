"""Multi30k (Elliott et al. 2016, task 1: English-German image descriptions) from the official raw
files, a download helper, and a tokenized translation dataset with its collate function.

Files (https://github.com/multi30k/dataset, ``data/task1/raw``), plain or gzipped::

    ROOT/train.en(.gz)              ROOT/train.de(.gz)               29,000 sentence pairs
    ROOT/val.en(.gz)                ROOT/val.de(.gz)                  1,014
    ROOT/test_2016_flickr.en(.gz)   ROOT/test_2016_flickr.de(.gz)     1,000

one UTF-8 sentence per line, line i of the .en file translated by line i of the .de file. The
papers' "Multi30k" test split is ``test_2016_flickr`` (``split="test"`` reads it).
"""
from __future__ import annotations

import gzip
import shutil
import urllib.request
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from lb_dist._io import atomic_write
from lb_dist._validation import check_positive_int

__all__ = ["read_multi30k", "download_multi30k", "TranslationDataset", "collate_translation", "encode", "truncate",
           "MULTI30K_URL", "MULTI30K_SPLITS", "MULTI30K_SIZES", "Multi30kFormatError"]

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
#: split name -> file prefix
MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr", "test_2016_flickr": "test_2016_flickr"}
MULTI30K_SIZES = {"train": 29000, "val": 1014, "test_2016_flickr": 1000}
LANGS = ("en", "de")


class Multi30kFormatError(ValueError):
    """A Multi30k file that cannot be read as the official raw text files (the message names it)."""


def _file(root: Path, prefix: str, lang: str) -> Path:
    plain, gz = root / f"{prefix}.{lang}", root / f"{prefix}.{lang}.gz"
    if plain.is_file():
        return plain
    if gz.is_file():
        return gz
    raise FileNotFoundError(f"Multi30k: neither {plain} nor {gz} exists (official raw files from "
                            f"{MULTI30K_URL}; lb_dist.data.download_multi30k(root) fetches them)")


def _read_lines(path: Path) -> list[str]:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise Multi30kFormatError(f"Multi30k: cannot read {path} ({type(e).__name__}: {e})") from None
    except UnicodeDecodeError as e:
        raise Multi30kFormatError(f"Multi30k: {path} is not UTF-8 text ({e})") from None
    if "\x00" in text:
        raise Multi30kFormatError(f"Multi30k: {path} contains NUL bytes: not a text file")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_multi30k(root, split: str = "train", *, src_lang: str = "en", tgt_lang: str = "de") -> list[tuple[str, str]]:
    """The ``(source, target)`` sentence pairs of ``split`` ("train", "val", "test" =
    "test_2016_flickr"), by default (English, German). Errors name the file: missing, unreadable,
    not UTF-8, or a line count that differs between the two languages."""
    if split not in MULTI30K_SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, MULTI30K_SPLITS))}; got {split!r}")
    for name, lang in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
        if lang not in LANGS:
            raise ValueError(f"{name} must be one of {LANGS}, got {lang!r}")
    if src_lang == tgt_lang:
        raise ValueError(f"src_lang and tgt_lang must differ, both are {src_lang!r}")
    if root is None:
        raise ValueError("multi30k needs root=<directory with the raw files train.en(.gz), train.de(.gz), ...>")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Multi30k: data directory {root} does not exist")
    prefix = MULTI30K_SPLITS[split]
    src_file, tgt_file = _file(root, prefix, src_lang), _file(root, prefix, tgt_lang)
    src, tgt = _read_lines(src_file), _read_lines(tgt_file)
    if len(src) != len(tgt):
        raise Multi30kFormatError(f"Multi30k {split}: {src_file} has {len(src)} lines but {tgt_file} has {len(tgt)}: "
                         f"the files must be line-aligned translations")
    if not src:
        raise Multi30kFormatError(f"Multi30k {split}: {src_file} is empty")
    return list(zip(src, tgt))


def download_multi30k(root, *, splits: Sequence[str] = ("train", "val", "test"), langs: Sequence[str] = LANGS,
                      base_url: str = MULTI30K_URL, timeout: float = 60.0) -> list[Path]:
    """Download the official gzipped raw files into ``root`` (for users who are online) and return
    their paths. Files already present (plain or gzipped) are kept. Each file is written to a
    temporary name and renamed when complete, then checked to be readable gzip."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for split in splits:
        if split not in MULTI30K_SPLITS:
            raise ValueError(f"splits: unknown split {split!r}; valid: {', '.join(MULTI30K_SPLITS)}")
        prefix = MULTI30K_SPLITS[split]
        for lang in langs:
            if lang not in LANGS:
                raise ValueError(f"langs: unknown language {lang!r}; valid: {LANGS}")
            plain, target = root / f"{prefix}.{lang}", root / f"{prefix}.{lang}.gz"
            if plain.is_file() or target.is_file():
                out.append(plain if plain.is_file() else target)
                continue
            url = base_url.rstrip("/") + "/" + target.name
            def fetch(f, url=url):
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    shutil.copyfileobj(r, f)
                f.flush()
                with gzip.open(f.name, "rb") as g:  # readable gzip, or no file
                    while g.read(1 << 20):
                        pass

            try:
                atomic_write(target, fetch, suffix=".part")
            except Exception as e:
                raise OSError(f"Multi30k: downloading {url} to {target} failed: {type(e).__name__}: {e}") from None
            out.append(target)
    return out


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens (an HF ``tokenizers.Tokenizer`` from
    :func:`lb_dist.text.train_tokenizer`, or a ``transformers`` tokenizer)."""
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return [e.ids for e in tokenizer.encode_batch(texts)]
    if callable(tokenizer):  # transformers.PreTrainedTokenizerBase
        return list(tokenizer(texts, add_special_tokens=True)["input_ids"])
    raise TypeError(f"tokenizer must be a tokenizers.Tokenizer or a transformers tokenizer, got "
                    f"{type(tokenizer).__name__}")


def truncate(ids: list[int], max_length: int) -> list[int]:
    """``ids`` cut to ``max_length`` tokens, keeping the last one (the end-of-sentence marker the
    tokenizer appended)."""
    return ids if len(ids) <= max_length else ids[:max_length - 1] + ids[-1:]


class TranslationDataset(Dataset):
    """Tokenized ``(source, target)`` pairs: item i is ``{"input_ids": [...], "labels": [...]}``,
    each ending with the tokenizer's end-of-sentence token and truncated to ``max_length`` tokens
    (keeping that last token). Everything is tokenized once, at construction.

    ``tokenizer``: a ``tokenizers.Tokenizer`` from :func:`lb_dist.text.train_tokenizer` (its
    post-processor appends ``</s>``) or a ``transformers`` tokenizer (for a pretrained model; the
    target side is then tokenized with ``text_target``).
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], tokenizer, max_length: int = 128) -> None:
        check_positive_int("max_length", max_length)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a token and the end marker), got {max_length}")
        pairs = list(pairs)
        if not pairs:
            raise ValueError("pairs is empty")
        for i, p in enumerate(pairs[:1] + pairs[-1:]):
            if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(s, str) for s in p)):
                raise ValueError(f"pairs must hold (source, target) string pairs, got {p!r}")
        self.pairs, self.max_length = pairs, max_length
        src = [s for s, _ in pairs]
        tgt = [t for _, t in pairs]
        src_ids = encode(tokenizer, src)
        if hasattr(tokenizer, "encode_batch"):
            tgt_ids = encode(tokenizer, tgt)
        else:
            tgt_ids = list(tokenizer(text_target=tgt, add_special_tokens=True)["input_ids"])
        self.input_ids = [truncate(ids, max_length) for ids in src_ids]
        self.labels = [truncate(ids, max_length) for ids in tgt_ids]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def num_target_tokens(self) -> int:
        return sum(len(x) for x in self.labels)


def collate_translation(batch: Sequence[dict], pad_id: int, label_pad_id: int = -100) -> dict[str, torch.Tensor]:
    """Pad a list of :class:`TranslationDataset` items into ``input_ids`` (padded with ``pad_id``),
    ``attention_mask`` (1 on real tokens) and ``labels`` (padded with -100, which the loss ignores)."""
    if not batch:
        raise ValueError("collate_translation got an empty batch")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative integer token id, got {pad_id!r}")
    n = len(batch)
    src_len = max(len(b["input_ids"]) for b in batch)
    tgt_len = max(len(b["labels"]) for b in batch)
    input_ids = torch.full((n, src_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, src_len), dtype=torch.long)
    labels = torch.full((n, tgt_len), label_pad_id, dtype=torch.long)
    for i, b in enumerate(batch):
        s, t = b["input_ids"], b["labels"]
        input_ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
        labels[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
