"""Text helpers for the translation workload: a subword tokenizer trained on the training split,
its fingerprint, translation with ``generate``, corpus BLEU and token accuracy.

The tokenizer is a Hugging Face ``tokenizers.Tokenizer``: BPE over NFKC-normalised text, split
into words by the SentencePiece-style ``Metaspace`` pre-tokenizer (a space becomes the word-start
marker) and then at punctuation, so decoding restores the (NFKC-normalised) sentence exactly, which
BLEU on detokenized text needs; ONE vocabulary shared by English and German (trained on both sides
of the training split); special tokens ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3; a
post-processor that appends ``</s>`` to every encoded sentence. It is saved as one JSON file
(``tokenizer.json``) next to the run.

:func:`tokenizer_fingerprint` is the SHA-256 of that JSON: a resumed run compares it with the one it
recorded (:func:`check_tokenizer`) and refuses a different tokenizer, whose ids would silently mean
different words to the trained embeddings.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from lb_dist._io import atomic_write_text
from lb_dist._validation import check_positive_int

__all__ = ["SPECIAL_TOKENS", "train_tokenizer", "save_tokenizer", "load_tokenizer", "tokenizer_fingerprint",
           "check_tokenizer", "TokenizerMismatchError", "TokenizerFileError", "special_token_ids", "decode", "translate", "bleu",
           "token_accuracy", "token_sum_losses"]

#: The special tokens, in id order (pad 0, bos 1, eos 2, unk 3).
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


class TokenizerMismatchError(ValueError):
    """The tokenizer is not the one a run (or a model) was trained with."""


class TokenizerFileError(ValueError):
    """A tokenizer file that is not an lb_dist tokenizer (not tokenizers JSON, or special tokens moved)."""


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 8000, save_path=None, min_frequency: int = 2):
    """Train the BPE tokenizer of the module docstring on ``texts`` (for Multi30k: the English AND
    German sentences of the training split, so source and target share one vocabulary) and save it to
    ``save_path`` when given. Returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    check_positive_int("vocab_size", vocab_size)
    check_positive_int("min_frequency", min_frequency)
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty sequence of strings")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    _check_specials(tok, "the trained tokenizer")
    if save_path is not None:
        save_tokenizer(tok, save_path)
    return tok


def _check_specials(tok, where: str) -> None:
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got != i:
            raise TokenizerFileError(f"{where}: special token {t!r} has id {got}, expected {i} "
                             f"(lb_dist tokenizers use {', '.join(f'{s}={j}' for j, s in enumerate(SPECIAL_TOKENS))})")


def save_tokenizer(tokenizer, path) -> Path:
    """Write the tokenizer JSON to ``path`` atomically (:func:`lb_dist._io.atomic_write_text`:
    temporary file in the same directory, fsync, rename), so a crash never leaves half a tokenizer."""
    return atomic_write_text(path, tokenizer.to_str())


def load_tokenizer(path, *, expected_fingerprint: str | None = None):
    """Load a tokenizer saved by :func:`train_tokenizer` / :func:`save_tokenizer`; errors name the
    file (missing, not tokenizer JSON, special tokens not at ids 0-3). With
    ``expected_fingerprint``, also :func:`check_tokenizer`."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
        tok = Tokenizer.from_str(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, Exception) as e:  # noqa: BLE001 - tokenizers raises Exception
        raise TokenizerFileError(f"{path} is not a tokenizers JSON file ({type(e).__name__}: {e})") from None
    _check_specials(tok, str(path))
    if expected_fingerprint is not None:
        check_tokenizer(tok, expected_fingerprint, source=str(path))
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 (hex) of the tokenizer's canonical JSON (keys sorted): equal for the same vocabulary,
    merges, normalizer and special tokens, whatever file it was loaded from."""
    if hasattr(tokenizer, "to_str"):
        text = tokenizer.to_str()
    elif hasattr(tokenizer, "backend_tokenizer"):  # transformers fast tokenizer
        text = tokenizer.backend_tokenizer.to_str()
    else:
        raise TypeError(f"cannot fingerprint a {type(tokenizer).__name__}: need a tokenizers.Tokenizer "
                        f"or a transformers fast tokenizer")
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_tokenizer(tokenizer, expected_fingerprint: str, *, source: str = "the tokenizer",
                    expected_file: str | None = None) -> None:
    """Raise :class:`TokenizerMismatchError` naming ``source`` when the tokenizer's fingerprint is not
    ``expected_fingerprint`` (e.g. the one recorded in a checkpoint); ``expected_file`` names the file
    the run's own tokenizer is in (default: "the run's own tokenizer file")."""
    got = tokenizer_fingerprint(tokenizer)
    if got != expected_fingerprint:
        expected_file = expected_file or "the run's own tokenizer file"
        raise TokenizerMismatchError(
            f"{source} does not match the tokenizer the run was trained with (fingerprint {got[:16]}... "
            f"!= recorded {str(expected_fingerprint)[:16]}...): token ids would mean different words. "
            f"Use {expected_file}.")


def special_token_ids(tokenizer) -> dict[str, int]:
    """``{"pad": 0, "bos": 1, "eos": 2, "unk": 3}`` of an lb_dist tokenizer (or the ids of a
    transformers tokenizer's pad/bos/eos/unk tokens, None where it has none)."""
    if hasattr(tokenizer, "token_to_id"):
        return {name: tokenizer.token_to_id(t) for name, t in zip(("pad", "bos", "eos", "unk"), SPECIAL_TOKENS)}
    return {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
            "unk": tokenizer.unk_token_id}


def decode(tokenizer, sequences) -> list[str]:
    """Text of generated token id sequences: each sequence is cut at its first end-of-sentence token
    after the first position, and special tokens are dropped."""
    if torch.is_tensor(sequences):
        sequences = sequences.tolist()
    eos = special_token_ids(tokenizer)["eos"]
    cut = []
    for seq in sequences:
        seq = list(seq)
        if eos is not None and eos in seq[1:]:
            seq = seq[:seq[1:].index(eos) + 1]
        cut.append(seq)
    if hasattr(tokenizer, "decode_batch"):
        return tokenizer.decode_batch(cut, skip_special_tokens=True)
    return tokenizer.batch_decode(cut, skip_special_tokens=True)


@torch.no_grad()
def translate(model, tokenizer, sources: Sequence[str], *, batch_size: int = 64, max_length: int = 128,
              num_beams: int = 1) -> list[str]:
    """Translate ``sources`` with ``model.generate`` (greedy by default), in batches, and decode.
    ``max_length`` bounds the generated target (tokens, including the decoder start token). The
    model's train/eval mode is restored afterwards."""
    from lb_dist.data.multi30k import collate_translation, encode, truncate

    check_positive_int("batch_size", batch_size)
    check_positive_int("max_length", max_length)
    check_positive_int("num_beams", num_beams)
    sources = list(sources)
    if not sources:
        return []
    pad = special_token_ids(tokenizer)["pad"]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or max_length
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(sources), batch_size):
            ids = [truncate(x, limit) for x in encode(tokenizer, sources[start:start + batch_size])]
            batch = collate_translation([{"input_ids": x, "labels": x} for x in ids], pad_id=pad)
            gen = model.generate(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device),
                                 max_length=min(max_length, limit), num_beams=num_beams)
            out.extend(decode(tokenizer, gen.cpu()))
    finally:
        model.train(was_training)
    return out


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, its default 13a tokenization, one reference per sentence), 0-100."""
    import sacrebleu

    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("bleu: no sentences")
    for name, seq in (("hypotheses", hypotheses), ("references", references)):
        if not all(isinstance(s, str) for s in seq):
            raise ValueError(f"bleu: {name} must be strings")
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[int, int]:
    """``(correct, count)``: positions where ``argmax(logits)`` equals the label, and the number of
    positions whose label is not ``ignore_index``. ``logits [..., V]``, ``labels [...]``."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"token_accuracy: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} "
                         f"(expected logits of shape labels.shape + (vocab,))")
    mask = labels != ignore_index
    correct = (logits.argmax(-1) == labels) & mask
    return int(correct.sum()), int(mask.sum())


def token_sum_losses(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                     ignore_index: int = -100) -> torch.Tensor:
    """Per-sentence sum of the token cross-entropies ``[B]`` (positions labelled ``ignore_index``
    contribute 0), with label smoothing per token (``torch.nn.functional.cross_entropy``'s)."""
    b, t, v = logits.shape
    ce = torch.nn.functional.cross_entropy(logits.reshape(b * t, v).float(), labels.reshape(b * t),
                                           ignore_index=ignore_index, reduction="none",
                                           label_smoothing=label_smoothing)
    return ce.view(b, t).sum(1)
