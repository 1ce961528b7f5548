"""Fine-tune (or train from a config) a Hugging Face seq2seq model on Multi30k with ``Seq2SeqTrainer``,
lb_dist's optimizers and GradientMix: ``python -m lb_dist.finetune --help``.

Two ways to get the model:

* ``--model_name_or_path NAME_OR_DIR``: a pretrained ``AutoModelForSeq2SeqLM`` and its tokenizer
  (from the Hub when online, or a local directory);
* otherwise a Transformer built offline from a config (``--model_size small|base``, lb_dist.models)
  with a BPE tokenizer trained on the training split (lb_dist.text), saved in ``OUTPUT_DIR``.

What lb_dist adds to ``Seq2SeqTrainer`` (:class:`LbDistSeq2SeqTrainer`):

* the optimizer (``--optimizer adamw|lamb|lars|clars``), built by :func:`make_optimizer` from
  ``lb_dist.optim.param_groups`` (biases and LayerNorm parameters neither decayed nor adapted) and
  handed to the Trainer as ``optimizers=(optimizer, None)``; the Trainer builds the schedule
  (``--lr_scheduler_type``, e.g. ``inverse_sqrt`` with ``--warmup_steps``);
* CLARS' per-layer second moments ``S_k`` from :class:`lb_dist.moments.MicroBatchMoments`: in one
  process from the gradient-accumulation micro-batches (``--gradient_accumulation_steps >= 2``),
  under torchrun from the DDP communication hook ``lb_dist.ddp`` (one micro-batch per rank and step);
* GradientMix: ``--mix sample`` (paper eq. 4) as a randomly weighted loss in ``compute_loss``;
  ``--mix device`` (eq. 3) in the DDP all-reduce (``lb_dist.ddp``; needs >= 2 processes).

The loss. For every training step the Trainer collects the micro-batches of the accumulation; over
the whole global batch (all micro-batches, all ranks) let N be the number of target tokens and B the
number of sentences. Sentence b with token losses ``ce_bt`` contributes ``w_b * sum_t ce_bt / N``,
where ``w_b = 1 + std * xi_b`` are the GradientMix sample weights (1 without sample-wise mixing).
Without mixing this is exactly the Trainer's own token-mean loss over the global batch; with mixing
the gradient is ``sum_b pi_b grad l_b`` with ``pi_b = w_b / B`` and the per-sentence loss
``l_b = (B/N) sum_t ce_bt`` (a sentence's share of the token-mean loss), i.e. eq. 4 with sentences as
samples. Label smoothing (``--label_smoothing_factor``) applies per token.

``--deepspeed ds.json``: the Trainer builds a DeepSpeed engine through Accelerate, and
:func:`lb_dist.deepspeed.register` (called here first) makes that ``lb_dist.deepspeed.initialize``: the
config names the optimizer (``"type": "CLARS" | "LARS" | "LAMB"``, ZeRO-exact at every stage;
``"auto"`` values filled from the Trainer's arguments) and the device-wise ``gradient_mix`` section
(applied in ``engine.backward``); docs/config-deepspeed.md. lb_dist.finetune's own ``--optimizer``,
``--mix*``, ``--momentum``, ``--eta``, ``--moments_ema`` are then refused (the config decides), as are
what the Trainer loop cannot feed (CLARS' ``per_sample`` source, sample-wise ``gradient_mix``). CLARS'
micro-batch source works with gradient accumulation (the estimator follows the scale of the loss the
Trainer backpropagates). The loss is the same token-mean loss over the global batch.
"""
from __future__ import annotations

from lb_dist.finetune.cli import main, parse_args
from lb_dist.finetune.runner import FinetuneArguments, prepare_deepspeed, run
from lb_dist.finetune.trainer import OPTIMIZERS, LbDistSeq2SeqTrainer, make_optimizer
from lb_dist.text import token_sum_losses

__all__ = ["FinetuneArguments", "LbDistSeq2SeqTrainer", "make_optimizer", "token_sum_losses", "main", "OPTIMIZERS",
           "parse_args", "run", "prepare_deepspeed"]
