"""Transformer encoder-decoder (Vaswani et al. 2017) for Multi30k En->De, built offline from a config.

The model is a Hugging Face ``transformers`` ``MarianMTModel`` built from a ``MarianConfig``: no
weights are downloaded, every weight is freshly initialised. Marian is the HF architecture closest
to the original Transformer: post-LayerNorm residual blocks, fixed sinusoidal position encodings,
embeddings scaled by sqrt(d_model), the output projection tied to the (decoder) embedding. The
choices that differ from Marian's defaults and follow Vaswani et al.: ReLU feed-forward
activation, dropout 0.1 on the residual branches, no attention dropout.

Sizes (``SIZES``)::

    base   d_model 512, 6 + 6 layers, 8 heads, FFN 2048, 256 positions    (Vaswani "base")
    small  d_model 128, 2 + 2 layers, 4 heads, FFN 512,  256 positions    (trains on a CPU)

Trainable parameters (sinusoidal positions are frozen buffers-as-parameters and not counted;
``final_logits_bias`` is a buffer), d = d_model, f = FFN width, L_e/L_d layers::

    encoder layer  4 d^2 + 4 d  (self-attention)  + 2 d f + f + d  (FFN)  + 4 d  (2 LayerNorms)
    decoder layer  8 d^2 + 8 d  (two attentions)  + 2 d f + f + d  (FFN)  + 6 d  (3 LayerNorms)
    embeddings     d V          (shared vocabulary, tied to the output projection)
                   d (V_src + V_tgt)   (separate vocabularies; the output projection tied to the
                                        target embedding)

Base with a shared vocabulary of V tokens: 44,138,496 + 512 V, i.e. 48.2M at V = 8000 (the default
tokenizer size for Multi30k) and 63.1M at V = 37000 (the paper's WMT vocabulary; the paper reports
65M).

The forward takes ``input_ids, attention_mask, labels`` (labels padded with -100; the decoder
inputs are the labels shifted right behind ``decoder_start_token_id``, which is set to the BOS id)
and returns ``.loss`` and ``.logits``; ``model.generate(input_ids, attention_mask=...)`` translates.
"""
from __future__ import annotations

from typing import Any

from lb_dist._validation import check_non_negative, check_positive_int

__all__ = ["SIZES", "transformer_config", "build_transformer", "transformer_parameter_count"]

SIZES: dict[str, dict[str, Any]] = {
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, attention_heads=8, ffn_dim=2048),
    "small": dict(d_model=128, encoder_layers=2, decoder_layers=2, attention_heads=4, ffn_dim=512),
}

#: Default special-token ids: those of :func:`lb_dist.text.train_tokenizer` (<pad>, <s>, </s>, <unk>).
DEFAULT_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

_OVERRIDES = ("d_model", "encoder_layers", "decoder_layers", "attention_heads", "ffn_dim")


def _check_id(name: str, value, vocab: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise ValueError(f"{name} must be an integer token id in [0, {vocab}), got {value!r}")
    return value


def transformer_config(size: str = "base", *, vocab_size: int | None = None, src_vocab_size: int | None = None,
                       tgt_vocab_size: int | None = None, pad_token_id: int = 0, bos_token_id: int = 1,
                       eos_token_id: int = 2, max_positions: int = 256, dropout: float = 0.1,
                       attention_dropout: float = 0.0, **overrides):
    """The ``transformers.MarianConfig`` of a size, with the vocabulary and special ids given.

    Either ``vocab_size`` (one vocabulary shared by source and target, embeddings shared) or both
    ``src_vocab_size`` and ``tgt_vocab_size``. ``overrides`` may change ``d_model``,
    ``encoder_layers``, ``decoder_layers``, ``attention_heads``, ``ffn_dim``.
    """
    from transformers import MarianConfig

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(map(repr, SIZES))}; got {size!r}")
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown Transformer option(s) {', '.join(map(repr, unknown))}; valid: "
                         f"vocab_size, src_vocab_size, tgt_vocab_size, pad_token_id, bos_token_id, eos_token_id, "
                         f"max_positions, dropout, attention_dropout, {', '.join(_OVERRIDES)}")
    dims = {**SIZES[size], **overrides}
    for name in _OVERRIDES:
        check_positive_int(name, dims[name])
    if dims["d_model"] % dims["attention_heads"]:
        raise ValueError(f"d_model ({dims['d_model']}) must be divisible by attention_heads "
                         f"({dims['attention_heads']})")
    if vocab_size is not None:
        if src_vocab_size is not None or tgt_vocab_size is not None:
            raise ValueError("give either vocab_size (shared) or src_vocab_size and tgt_vocab_size, not both")
        check_positive_int("vocab_size", vocab_size)
        src_vocab_size = tgt_vocab_size = vocab_size
        shared = True
    else:
        if src_vocab_size is None or tgt_vocab_size is None:
            raise ValueError("the Transformer needs its vocabulary size: vocab_size=... (shared) or both "
                             "src_vocab_size=... and tgt_vocab_size=...")
        check_positive_int("src_vocab_size", src_vocab_size)
        check_positive_int("tgt_vocab_size", tgt_vocab_size)
        shared = False
    for name, value in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        _check_id(name, value, min(src_vocab_size, tgt_vocab_size))
    check_positive_int("max_positions", max_positions)
    for name, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
        check_non_negative(name, value)
        if value >= 1:
            raise ValueError(f"{name} must be < 1, got {value!r}")
    return MarianConfig(
        vocab_size=src_vocab_size, decoder_vocab_size=tgt_vocab_size,
        share_encoder_decoder_embeddings=shared, tie_word_embeddings=True,
        d_model=dims["d_model"], encoder_layers=dims["encoder_layers"], decoder_layers=dims["decoder_layers"],
        encoder_attention_heads=dims["attention_heads"], decoder_attention_heads=dims["attention_heads"],
        encoder_ffn_dim=dims["ffn_dim"], decoder_ffn_dim=dims["ffn_dim"],
        activation_function="relu", dropout=float(dropout), attention_dropout=float(attention_dropout),
        activation_dropout=0.0, scale_embedding=True, max_position_embeddings=max_positions,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        decoder_start_token_id=bos_token_id, forced_eos_token_id=None,
    )


def build_transformer(size: str = "base", **options):
    """A freshly initialised ``MarianMTModel`` of :func:`transformer_config` (offline)."""
    from transformers import MarianMTModel

    config = transformer_config(size, **options)
    model = MarianMTModel(config)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id = config.pad_token_id, config.eos_token_id
    gen.bos_token_id, gen.decoder_start_token_id = config.bos_token_id, config.decoder_start_token_id
    gen.forced_eos_token_id = None
    gen.bad_words_ids = None
    gen.max_length = config.max_position_embeddings
    gen.num_beams = 1
    return model


def transformer_parameter_count(d_model: int, ffn_dim: int, encoder_layers: int, decoder_layers: int,
                                src_vocab_size: int, tgt_vocab_size: int | None = None) -> int:
    """Trainable parameters of the model by the formula of the module docstring
    (``tgt_vocab_size=None``: one shared vocabulary)."""
    d, f = d_model, ffn_dim
    enc = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    dec = 8 * d * d + 8 * d + 2 * d * f + f + d + 6 * d
    emb = d * src_vocab_size if tgt_vocab_size is None else d * (src_vocab_size + tgt_vocab_size)
    return encoder_layers * enc + decoder_layers * dec + emb
