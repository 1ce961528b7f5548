"""lb_dist.text: tokenizer trained on real Multi30k, save/load/fingerprint, decoding, BLEU against
the BLEU formula written here, token accuracy against a loop, translation with a small model."""
from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter

import pytest
import torch

from _data import MULTI30K, needs_multi30k
from lb_dist.text import (
    SPECIAL_TOKENS,
    TokenizerMismatchError,
    bleu,
    check_tokenizer,
    decode,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    token_accuracy,
    tokenizer_fingerprint,
    train_tokenizer,
    translate,
)

torch.set_num_threads(1)



@pytest.fixture(scope="module")
def pairs():
    from lb_dist.data import read_multi30k

    if not MULTI30K.is_dir():
        pytest.skip(f"real Multi30k data not found: {MULTI30K}")
    return read_multi30k(MULTI30K, "train")[:3000]


@pytest.fixture(scope="module")
def tok(pairs):
    return train_tokenizer([s for p in pairs for s in p], vocab_size=2000)


@needs_multi30k
def test_tokenizer_on_multi30k(tok, pairs):
    assert tok.get_vocab_size() == 2000
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert special_token_ids(tok) == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    vocab = tok.get_vocab()
    assert any(t.startswith("\u2581M\u00e4nn") for t in vocab)  # German subwords in the shared vocabulary
    assert any(t.startswith("\u2581wom") for t in vocab)  # English ones
    for en, de in pairs[:300]:
        for s in (en, de):
            ids = tok.encode(s).ids
            assert ids[-1] == 2 and 2 not in ids[:-1]  # </s> appended once
            assert 3 not in ids  # no <unk> on training text
            # decoding restores the (NFKC-normalised) sentence exactly
            assert decode(tok, [[1] + ids + [0, 0]]) == [unicodedata.normalize("NFKC", s)]
    # subwords: far fewer tokens than characters, at most a few per word
    en = pairs[0][0]
    assert len(en.split()) <= len(tok.encode(en).ids) - 1 <= 3 * len(en.split())


@needs_multi30k
def test_tokenizer_save_load_fingerprint(tok, pairs, tmp_path):
    path = save_tokenizer(tok, tmp_path / "run" / "tokenizer.json")
    loaded = load_tokenizer(path)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    assert len(tokenizer_fingerprint(tok)) == 64
    for en, _ in pairs[:50]:
        assert loaded.encode(en).ids == tok.encode(en).ids
    again = train_tokenizer([s for p in pairs for s in p], vocab_size=2000, save_path=tmp_path / "again.json")
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)  # training is deterministic
    assert (tmp_path / "again.json").is_file()
    other = train_tokenizer([s for p in pairs for s in p], vocab_size=1500)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    check_tokenizer(loaded, tokenizer_fingerprint(tok))
    with pytest.raises(TokenizerMismatchError, match="my-run/tokenizer.json does not match"):
        check_tokenizer(other, tokenizer_fingerprint(tok), source="my-run/tokenizer.json")
    with pytest.raises(TokenizerMismatchError, match=str(path)):
        load_tokenizer(path, expected_fingerprint=tokenizer_fingerprint(other))
    assert not list((tmp_path / "run").glob("*.tmp*"))  # atomic save leaves no temporary file


def test_load_tokenizer_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a tokenizers JSON file"):
        load_tokenizer(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="wrong.json"):
        load_tokenizer(wrong)
    # a valid tokenizer whose special tokens are not lb_dist's
    from tokenizers import Tokenizer, models
    t = Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]"))
    (tmp_path / "other.json").write_text(t.to_str())
    with pytest.raises(ValueError, match="other.json: special token '<pad>'"):
        load_tokenizer(tmp_path / "other.json")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], vocab_size=4)
    with pytest.raises(ValueError, match="texts"):
        train_tokenizer([])


def reference_bleu(hyps, refs, max_n=4):
    """Papineni et al. 2002: corpus-level clipped n-gram precisions, geometric mean, brevity penalty
    (whitespace tokens; the test sentences have no punctuation, where sacrebleu's 13a tokenizer
    splits the same way)."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for h, r in zip(hyps, refs):
        h, r = h.split(), r.split()
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, max_n + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(log_p)


def test_bleu_against_the_formula():
    refs = ["a man is riding a red bike down the street",
            "two dogs play in the green grass near a lake",
            "the little girl is eating an ice cream"]
    hyps = ["a man rides a red bike down the street",
            "two dogs are playing in the green grass near the lake",
            "the girl is eating an ice cream"]
    assert bleu(hyps, refs) == pytest.approx(reference_bleu(hyps, refs), abs=1e-9)
    assert 20 < bleu(hyps, refs) < 90
    assert bleu(refs, refs) == pytest.approx(100.0)
    short = ["a man is riding a", "two dogs play in", "the little girl is"]  # brevity penalty
    assert bleu(short, refs) == pytest.approx(reference_bleu(short, refs), abs=1e-9)
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        bleu(hyps[:2], refs)
    with pytest.raises(ValueError, match="no sentences"):
        bleu([], [])


def test_token_accuracy_against_a_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 3:] = -100
    labels[2, 0] = logits[2, 0].argmax()
    correct = count = 0
    for i in range(3):
        for j in range(5):
            if labels[i, j] != -100:
                count += 1
                correct += int(int(logits[i, j].argmax()) == int(labels[i, j]))
    assert token_accuracy(logits, labels) == (correct, count) and count == 13 and correct >= 1
    assert token_accuracy(logits, torch.full((3, 5), -100)) == (0, 0)
    with pytest.raises(ValueError, match="do not match"):
        token_accuracy(logits, labels[:, :4])


def test_decode_cuts_at_the_first_eos():
    tok = train_tokenizer(["the cat sat", "die katze sass"] * 5, vocab_size=40, min_frequency=1)
    ids = tok.encode("the cat sat").ids  # ends with </s>
    extra = tok.encode("die katze").ids
    assert decode(tok, [[1] + ids + extra]) == ["the cat sat"]  # what follows </s> is dropped
    assert decode(tok, torch.tensor([[1] + ids + [0, 0, 0]])) == ["the cat sat"]
    assert decode(tok, [[1, 2, 5, 6]]) == [""]


@needs_multi30k
def test_translate_with_a_small_model(tok, pairs):
    pytest.importorskip("transformers")
    from lb_dist.models import build_model

    torch.manual_seed(0)
    model = build_model("transformer_small", vocab_size=tok.get_vocab_size(), d_model=32, ffn_dim=64,
                        encoder_layers=1, decoder_layers=1, max_positions=64)
    model.train()
    sources = [en for en, _ in pairs[:5]]
    out = translate(model, tok, sources, batch_size=2, max_length=12)
    assert len(out) == 5 and all(isinstance(s, str) for s in out)
    assert model.training  # mode restored
    refs = [de for _, de in pairs[:5]]
    score = bleu(out, refs)
    assert 0.0 <= score <= 100.0 and math.isfinite(score)
    assert translate(model, tok, []) == []


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    from lb_dist._io import atomic_write, atomic_write_text

    path = tmp_path / "sub" / "tokenizer.json"
    assert atomic_write_text(path, "old ü") == path and path.read_text(encoding="utf-8") == "old ü"

    def torn(f):
        f.write(b"half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        atomic_write(path, torn)
    assert path.read_text(encoding="utf-8") == "old ü"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]  # no temporary left
