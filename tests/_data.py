"""Test data: the real Multi30k files in ../shared (and the skip marker for clones without them), and
small files in the official formats written by tests (independent of ../shared)."""
from __future__ import annotations

from pathlib import Path

import pytest

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
needs_multi30k = pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"real Multi30k data not found: {MULTI30K} "
                                    f"(../shared is absent on this machine)")


def fake_multi30k(root, n=64):
    """Tiny Multi30k-format raw files (train, val and test_2016_flickr), independent of ../shared: ``n``
    training pairs and 16 validation and 16 test pairs of 2 to 8 words (lengths vary, so token counts differ between
    batches and ranks)."""
    root.mkdir(parents=True, exist_ok=True)
    words_en, words_de = ["a", "dog", "runs", "the", "cat", "sleeps", "two", "men", "play"], \
        ["ein", "hund", "rennt", "die", "katze", "schlaeft", "zwei", "maenner", "spielen"]
    for prefix, count in (("train", n), ("val", 16), ("test_2016_flickr", 16)):
        lengths = [2 + (3 * i) % 7 for i in range(count)]
        en = [" ".join(words_en[(i + j) % 9] for j in range(k)) for i, k in enumerate(lengths)]
        de = [" ".join(words_de[(2 * i + j) % 9] for j in range(k + i % 2)) for i, k in enumerate(lengths)]
        (root / f"{prefix}.en").write_text("\n".join(en) + "\n", encoding="utf-8")
        (root / f"{prefix}.de").write_text("\n".join(de) + "\n", encoding="utf-8")
    return root
