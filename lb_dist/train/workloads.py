"""The workloads: datasets and model from the flags, and the two tasks (image classification,
translation) as the loop sees them: a batch's per-sample losses and weights' denominators, and the
evaluation.

The loss convention (docs/training.md, "Loss and GradientMix"). Each sample b of the global batch has
a loss ``l_b`` and a count ``c_b``: for images ``l_b`` is its cross-entropy and ``c_b = 1``; for
translation ``l_b`` is the SUM of its target tokens' cross-entropies and ``c_b`` its number of target
tokens. With ``N = sum_b c_b`` over the global batch, the step minimises ``(1/N) sum_b w_b l_b``
(``w_b = 1``, or the sample-wise GradientMix weights ``B pi_b``): the mean per-sample loss for images,
the token-mean loss for translation, however the batch is split over ranks and micro-batches.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from lb_dist.text import token_accuracy, token_sum_losses
from lb_dist.train.config import parse_model_options
from lb_dist.train.metrics import topk_correct

__all__ = ["Workload", "ImageTask", "TranslationTask", "build_workload"]


def _subset(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    return Subset(ds, range(n))


class ImageTask:
    """Image classification: batches ``(images [n, C, H, W], labels [n])``."""

    counts_are_constant = True  # c_b = 1: N = B without communication

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = float(label_smoothing)

    def to(self, batch, device):
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def count(self, batch) -> float:
        return float(batch[1].shape[0])

    def count_tensor(self, batch) -> torch.Tensor:
        """:meth:`count` as a 0-d tensor (no host sync)."""
        return torch.tensor(float(batch[1].shape[0]), dtype=torch.float64)

    def losses(self, module: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(l_b, c_b)`` of the micro-batch (per-sample cross-entropy, ones)."""
        x, y = batch
        loss = F.cross_entropy(module(x), y, reduction="none", label_smoothing=self.label_smoothing)
        return loss, torch.ones_like(loss)

    def mean_loss_fn(self) -> Callable:
        """``loss_fn(outputs, targets)`` (mean reduction), for the per-sample second moments."""
        ls = self.label_smoothing
        return lambda out, y: F.cross_entropy(out, y, label_smoothing=ls)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches, backend, **_) -> dict:
        """Test loss (plain cross-entropy, no smoothing), top-1 and top-5 over this rank's shard,
        all-reduced (float64 sums)."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        for batch in batches:
            x, y = self.to(batch, backend.device)
            logits = model(x)
            hits = topk_correct(logits, y, ks=(1, 5))
            sums += torch.tensor([F.cross_entropy(logits.float(), y, reduction="sum").item(), hits[1], hits[5],
                                  y.shape[0]], dtype=torch.float64)
        model.train(was_training)
        sums = backend.all_reduce_sum(sums.to(backend.device)).cpu()
        n = max(sums[3].item(), 1.0)
        return {"test_loss": sums[0].item() / n, "test_top1": sums[1].item() / n, "test_top5": sums[2].item() / n}


class TranslationTask:
    """Sequence-to-sequence (a Hugging Face encoder-decoder): batches are dicts
    ``input_ids, attention_mask, labels`` (labels padded with -100)."""

    counts_are_constant = False  # c_b = target tokens: N needs one all-reduce per step

    def __init__(self, tokenizer, label_smoothing: float = 0.0, bleu_samples: int = 0,
                 test_pairs: list | None = None, max_length: int = 128) -> None:
        self.tokenizer = tokenizer
        self.label_smoothing = float(label_smoothing)
        self.bleu_samples = bleu_samples
        self.test_pairs = test_pairs or []
        self.max_length = max_length

    def to(self, batch, device):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def count(self, batch) -> float:
        return float(self.count_tensor(batch))

    def count_tensor(self, batch) -> torch.Tensor:
        """The number of target tokens as a 0-d tensor on the batch's device (no host sync)."""
        return (batch["labels"] != -100).sum()

    @staticmethod
    def _forward(module: nn.Module, batch):
        """The model's output for a batch, teacher-forced: the decoder reads the labels shifted right
        (``prepare_decoder_input_ids_from_labels`` of the model inside a DDP/engine wrapper's
        ``.module``). No ``labels`` are passed, so the model does not compute a loss of its own that
        :func:`lb_dist.text.token_sum_losses` would compute again; ``use_cache=False`` as with labels."""
        labels = batch["labels"]
        inner = module
        while not hasattr(inner, "prepare_decoder_input_ids_from_labels") and hasattr(inner, "module"):
            inner = inner.module
        if not hasattr(inner, "prepare_decoder_input_ids_from_labels"):
            return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      decoder_input_ids=inner.prepare_decoder_input_ids_from_labels(labels=labels), use_cache=False)

    def losses(self, module: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._forward(module, batch)
        losses = token_sum_losses(out.logits, batch["labels"], self.label_smoothing)
        return losses, (batch["labels"] != -100).sum(dim=1).to(losses.dtype)

    def mean_loss_fn(self):  # pragma: no cover - refused by the flag checks
        raise NotImplementedError("per-sample second moments are implemented for the image models")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches, backend, *, with_bleu: bool = True, **_) -> dict:
        """Token-mean test loss and teacher-forced token accuracy over this rank's shard (all-reduced);
        BLEU of greedy translations of the first ``bleu_samples`` test sentences (all if 0), each rank
        translating a share, scored on rank 0 with sacrebleu and broadcast (``with_bleu=False``: loss
        and accuracy only, as for the validation split)."""
        from lb_dist.text import bleu, translate

        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for batch in batches:
            batch = self.to(batch, backend.device)
            out = self._forward(model, batch)
            correct, count = token_accuracy(out.logits, batch["labels"])
            sums += torch.tensor([token_sum_losses(out.logits, batch["labels"]).sum().item(), correct, count],
                                 dtype=torch.float64)
        sums = backend.all_reduce_sum(sums.to(backend.device)).cpu()
        n = max(sums[2].item(), 1.0)
        result = {"test_loss": sums[0].item() / n, "test_token_accuracy": sums[1].item() / n}
        if not with_bleu:
            model.train(was_training)
            return result

        pairs = self.test_pairs if not self.bleu_samples else self.test_pairs[:self.bleu_samples]
        mine = list(range(backend.rank, len(pairs), backend.world_size))
        texts = translate(model, self.tokenizer, [pairs[i][0] for i in mine], batch_size=64,
                          max_length=self.max_length)
        gathered = backend.all_gather_object(list(zip(mine, texts)))
        score = None
        if backend.is_main and pairs:
            ordered = sorted((i, t) for part in gathered for i, t in part)
            score = bleu([t for _, t in ordered], [pairs[i][1] for i, _ in ordered])
        result["test_bleu"] = backend.broadcast_object(score)
        model.train(was_training)
        return result


@dataclass
class Workload:
    train: Dataset
    test: Dataset
    task: Any
    build_model: Callable[[], nn.Module]
    collate: Callable | None = None
    val: Dataset | None = None  # multi30k with --val: the validation split, evaluated every epoch (loss only)
    info: dict = field(default_factory=dict)  # e.g. tokenizer fingerprint, classes


def _synthetic(args) -> tuple[Dataset, Dataset, int]:
    from lb_dist.data import SyntheticImages

    classes = args.num_classes or 10
    size = args.image_size or 32
    shape = (3, size, size)
    train = SyntheticImages(args.train_size or 8192, num_classes=classes, image_shape=shape, seed=0, split="train")
    test = SyntheticImages(args.test_size or 2048, num_classes=classes, image_shape=shape, seed=0, split="test")
    return train, test, classes


def build_workload(args: argparse.Namespace, run_dir: Path, backend, resume_state: dict | None = None) -> Workload:
    """Datasets, task and model factory of the flags. For multi30k the tokenizer is trained on the
    training split by rank 0 and saved to ``RUN_DIR/tokenizer.json`` (a resumed run loads it and checks
    its fingerprint against the checkpoint's)."""
    options = parse_model_options(args.model_option)
    name = args.dataset
    if name in ("synthetic", "cifar10", "cifar100", "imagenet"):
        from lb_dist.models import build_model
        if name == "synthetic":
            train, test, classes = _synthetic(args)
        elif name in ("cifar10", "cifar100"):
            from lb_dist.data import cifar
            augment = True if args.augment is None else args.augment
            train = cifar(args.data_dir, name=name, split="train", augment=augment)
            test = cifar(args.data_dir, name=name, split="test", augment=False)
            classes = 10 if name == "cifar10" else 100
        else:
            from lb_dist.data import image_folder
            augment = True if args.augment is None else args.augment
            size = args.image_size or 224
            train = image_folder(args.data_dir, split="train", image_size=size, augment=augment)   # DATA/train/<class>/
            test = image_folder(args.data_dir, split="val", image_size=size, augment=False)       # DATA/val/<class>/
            classes = len(getattr(train, "classes", [])) or 1000
        train, test = _subset(train, args.train_size if name != "synthetic" else None), \
            _subset(test, args.test_size if name != "synthetic" else None)
        return Workload(train=train, test=test, task=ImageTask(args.label_smoothing),
                        build_model=lambda: build_model(args.model, num_classes=classes, **options),
                        info={"num_classes": classes})
    return _translation_workload(args, run_dir, backend, resume_state, options)


def _translation_workload(args, run_dir: Path, backend, resume_state, options) -> Workload:
    from lb_dist.data import TranslationDataset, collate_translation, read_multi30k
    from lb_dist.models import build_model
    from lb_dist.text import load_tokenizer, special_token_ids, tokenizer_fingerprint, train_tokenizer

    train_pairs = read_multi30k(args.data_dir, "train")
    test_pairs = read_multi30k(args.data_dir, "test")
    if args.train_size is not None:
        train_pairs = train_pairs[:args.train_size]
    if args.test_size is not None:
        test_pairs = test_pairs[:args.test_size]
    tok_path = Path(run_dir) / "tokenizer.json"
    if resume_state is not None:
        if not tok_path.exists():
            raise FileNotFoundError(f"{tok_path}: the tokenizer of the run being resumed is missing")
    elif backend.is_main:
        texts = [s for pair in train_pairs for s in pair]
        train_tokenizer(texts, vocab_size=args.vocab_size, save_path=str(tok_path))
    backend.barrier()
    expected = resume_state.get("tokenizer_fingerprint") if resume_state is not None else None
    tokenizer = load_tokenizer(tok_path, expected_fingerprint=expected)  # TokenizerMismatchError names the file
    fingerprint = tokenizer_fingerprint(tokenizer)
    ids = special_token_ids(tokenizer)
    pad, bos, eos = ids["pad"], ids["bos"], ids["eos"]
    vocab = tokenizer.get_vocab_size()
    train = TranslationDataset(train_pairs, tokenizer, args.max_length)
    test = TranslationDataset(test_pairs, tokenizer, args.max_length)
    val = TranslationDataset(read_multi30k(args.data_dir, "val"), tokenizer, args.max_length) \
        if getattr(args, "val", False) else None
    model_options = dict(vocab_size=vocab, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                         max_positions=max(256, args.max_length + 2))
    model_options.update(options)
    task = TranslationTask(tokenizer, args.label_smoothing, args.bleu_samples, test_pairs, args.max_length)
    return Workload(train=train, test=test, task=task, val=val,
                    build_model=lambda: build_model(args.model, **model_options),
                    collate=lambda batch: collate_translation(batch, pad),
                    info={"tokenizer_fingerprint": fingerprint, "vocab_size": vocab})
