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

import dataclasses
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lb_dist import GradientMix
from lb_dist._io import atomic_write_text
from lb_dist.data.multi30k import TranslationDataset, collate_translation, read_multi30k
from lb_dist.distributed import all_reduce_sum_, get_rank, get_world_size
from lb_dist.mixing import DEFAULT_STD
from lb_dist.moments import MicroBatchMoments
from lb_dist.optim import adapted_params, create_optimizer, param_groups
from lb_dist.text import token_sum_losses

__all__ = ["FinetuneArguments", "LbDistSeq2SeqTrainer", "make_optimizer", "token_sum_losses", "main", "OPTIMIZERS"]

OPTIMIZERS = ("adamw", "lamb", "lars", "clars")
MIX_CHOICES = ("none", "sample", "device")
#: The tokenizer of a config-built model, in OUTPUT_DIR (not tokenizer.json: the Trainer writes its own copy there).
TOKENIZER_FILE = "lb_dist_tokenizer.json"
RECORD_FILE = "lb_dist_finetune.json"


@dataclass
class FinetuneArguments:
    """lb_dist's arguments (the Trainer's own come from ``Seq2SeqTrainingArguments``)."""

    data_dir: str = field(metadata={"help": "Directory with the Multi30k raw files (train.en(.gz), ...)."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained seq2seq model (Hub name or local directory). Default: build a Transformer "
                "from a config (--model_size), offline."})
    model_size: str = field(default="small", metadata={"help": "small | base (config-built Transformer)."})
    model_options: str | None = field(default=None, metadata={
        "help": "JSON dict of extra Transformer options, e.g. '{\"d_model\": 64}' (config-built model)."})
    tokenizer_path: str | None = field(default=None, metadata={
        "help": "Tokenizer JSON for a config-built model. Default: OUTPUT_DIR/lb_dist_tokenizer.json if it exists "
                "(a resumed run), else trained on the training split and saved there."})
    vocab_size: int = field(default=8000, metadata={
        "help": "Vocabulary size of a newly trained tokenizer (a resumed run keeps its tokenizer: a different "
                "value is refused)."})
    src_lang: str = field(default="en", metadata={"help": "Source language suffix of the Multi30k files."})
    tgt_lang: str = field(default="de", metadata={"help": "Target language suffix of the Multi30k files."})
    max_length: int = field(default=128, metadata={"help": "Maximum source/target length in tokens."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Use only the first N training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Use only the first N pairs of the evaluation split AND of the test split (--test_bleu)."})
    eval_split: str = field(default="val", metadata={"help": "val | test: split for evaluation during training."})
    test_bleu: bool = field(default=True, metadata={"help": "Translate the test split (test_2016_flickr) at the end "
                                                             "and report its BLEU and token accuracy "
                                                             "(with --predict_with_generate)."})
    optimizer: str = field(default="lamb", metadata={"help": "adamw | lamb | lars | clars."})
    momentum: float = field(default=0.9, metadata={"help": "LARS/CLARS momentum."})
    eta: float | None = field(default=None, metadata={"help": "LARS/CLARS trust coefficient (default 0.001 / 0.01)."})
    moments_ema: float = field(default=0.0, metadata={"help": "CLARS: EMA of the micro-batch S_k estimate."})
    mix: str = field(default="none", metadata={"help": "GradientMix: none | sample | device."})
    mix_noise: str = field(default="gaussian", metadata={"help": "gaussian | rademacher."})
    mix_std: float = field(default=DEFAULT_STD, metadata={"help": "Relative std of a mixing coefficient."})
    mix_seed: int = field(default=0, metadata={"help": "Seed of the mixing coefficients (GradientMix)."})


def make_optimizer(model: torch.nn.Module, name: str, *, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9, eta: float | None = None, betas=(0.9, 0.999), eps: float = 1e-6,
                   moments_ema: float = 0.0):
    """``(optimizer, moments)``: ``name`` in ``OPTIMIZERS`` over ``lb_dist.optim.param_groups(model,
    weight_decay)``; ``moments`` is the :class:`MicroBatchMoments` CLARS reads ``S_k`` from (over
    the adapted parameters), None for the others."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}; got {name!r}")
    groups = param_groups(model, weight_decay)
    moments = MicroBatchMoments(adapted_params(groups), ema=moments_ema) if name == "clars" else None
    return create_optimizer(name, groups, lr=lr, momentum=momentum, eta=eta, betas=betas, eps=eps,
                            moments=moments), moments


@dataclass
class _StepInfo:
    """The global batch of the current optimizer step (see the module docstring)."""

    global_samples: int          # B
    global_tokens: float         # N
    sample_offset: int           # global index of this rank's first sample
    micro_sizes: list[int]       # this rank's micro-batch sizes
    micro_tokens: list[int]
    next_micro: int = 0


def _import_trainer():
    from transformers import Seq2SeqTrainer, TrainerCallback

    return Seq2SeqTrainer, TrainerCallback


def _trainer_class():
    Seq2SeqTrainer, TrainerCallback = _import_trainer()

    class _Hooks(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            self.trainer._attach(state)

        def on_train_end(self, args, state, control, **kwargs):
            self.trainer._detach()

    class _LbDistSeq2SeqTrainer(Seq2SeqTrainer):
        __doc__ = LbDistSeq2SeqTrainer.__doc__

        def __init__(self, *args, mix: GradientMix | None = None, moments: MicroBatchMoments | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            if moments is None:  # a CLARS handed in through optimizers=(...) brings its estimator
                candidate = getattr(self.optimizer, "moments", None)
                moments = candidate if isinstance(candidate, MicroBatchMoments) else None
            if mix is not None and not isinstance(mix, GradientMix):
                raise TypeError(f"mix must be an lb_dist.GradientMix, got {type(mix).__name__}")
            if self.is_deepspeed_enabled and (mix is not None or moments is not None):
                raise ValueError("under DeepSpeed the config's gradient_mix section and optimizer (lb_dist.deepspeed) "
                                 "mix and estimate S_k; pass neither mix= nor moments= (nor a CLARS optimizer)")
            self.mix, self.moments = mix, moments
            world = self.args.world_size
            if mix is not None and mix.granularity == "device" and world < 2:
                raise ValueError("device-wise GradientMix (--mix device) mixes the gradients of >= 2 data-parallel "
                                 "processes; this run has 1 (launch with torchrun, or use --mix sample)")
            if moments is not None and world < 2 and self.args.gradient_accumulation_steps < 2:
                raise ValueError("CLARS in a single process estimates S_k from the gradient-accumulation "
                                 "micro-batches: set --gradient_accumulation_steps >= 2 (or run >= 2 processes)")
            self._step_info: _StepInfo | None = None
            self._ddp_state = None
            self._tracking = False
            self.loss_is_scaled_for_ga = True  # compute_loss divides by the global token count N
            self.add_callback(_Hooks(self))

        # ------------------------------------------------------------ wiring
        def _attach(self, state) -> None:
            if self.mix is not None:
                self.mix.step = state.global_step  # one advance per optimizer step: resumable
                self.mix.detach()
                self.mix.attach(getattr(self.optimizer, "optimizer", self.optimizer))  # inside accelerate's wrapper
            device_mix = self.mix if (self.mix is not None and self.mix.granularity == "device") else None
            if self.args.world_size > 1:
                from torch.nn.parallel import DistributedDataParallel

                import lb_dist.ddp

                if device_mix is not None or self.moments is not None:
                    ddp = self.model_wrapped
                    if not isinstance(ddp, DistributedDataParallel):
                        raise RuntimeError(f"lb_dist needs the model wrapped in DistributedDataParallel to mix or "
                                           f"collect statistics in the all-reduce, got {type(ddp).__name__}")
                    if self._ddp_state is None:
                        b = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
                        self._ddp_state = lb_dist.ddp.register(ddp, mix=device_mix, moments=self.moments,
                                                               micro_batch_size=b)
            elif self.moments is not None and not self._tracking:
                self.moments.track_backward()
                self._tracking = True

        def _detach(self) -> None:
            if self._tracking:
                self.moments.remove_hooks()
                self._tracking = False
            if self.mix is not None:
                self.mix.detach()

        def _issue_warnings_after_load(self, load_result):
            """The Trainer's, without the keys a checkpoint never holds: weights tied to a saved one
            (shared embeddings, output projection) and sinusoidal position tables (computed)."""
            derived = _derived_keys(self.accelerator.unwrap_model(self.model), load_result.missing_keys)
            if derived and hasattr(load_result, "_replace"):
                self.accelerator.unwrap_model(self.model).tie_weights()
                load_result = load_result._replace(
                    missing_keys=[k for k in load_result.missing_keys if k not in derived])
            return super()._issue_warnings_after_load(load_result)

        # ------------------------------------------------------------- steps
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            sizes = [int(b["labels"].shape[0]) for b in batch_samples]
            tokens = [int(b["labels"].ne(-100).sum()) for b in batch_samples]
            world, rank = get_world_size(), get_rank()
            stats = torch.zeros(world, 2, dtype=torch.float64, device=self.args.device)
            stats[rank, 0], stats[rank, 1] = sum(sizes), sum(tokens)
            all_reduce_sum_(stats)
            stats = stats.cpu()
            self._step_info = _StepInfo(global_samples=int(stats[:, 0].sum()), global_tokens=float(stats[:, 1].sum()),
                                        sample_offset=int(stats[:rank, 0].sum()), micro_sizes=sizes,
                                        micro_tokens=tokens)
            return batch_samples, num_items

        def training_step(self, model, inputs, num_items_in_batch=None):
            info = self._step_info
            if self._tracking and info is not None:
                # the backward'ed loss is (N_j / N) x the micro-batch's token-mean loss
                j = min(info.next_micro, len(info.micro_tokens) - 1)
                self.moments.grad_scale = max(info.micro_tokens[j], 1) / max(info.global_tokens, 1.0)
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self._tracking and self.accelerator.sync_gradients:
                n = self.moments.num_tracked_micro_batches
                params = self.moments.params
                mean_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                b = max(1, round(info.global_samples / max(n, 1))) if info is not None else None
                self.moments.finish_step(mean_grads=mean_grads, micro_batch_size=b)
            return loss

        def _teacher_forced(self, model, inputs):
            """The model's outputs on the reference prefix (decoder input = labels shifted right)."""
            fwd = dict(inputs)
            unwrapped = self.accelerator.unwrap_model(model)
            if "decoder_input_ids" not in fwd and hasattr(unwrapped, "prepare_decoder_input_ids_from_labels"):
                labels = fwd.pop("labels")
                fwd["decoder_input_ids"] = unwrapped.prepare_decoder_input_ids_from_labels(labels=labels)
                fwd["use_cache"] = False          # as the model itself does when given labels: no cache to build
            return model(**fwd)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
            """Seq2SeqTrainer's (generated tokens), plus per-example teacher-forced token counts
            ``[correct, total]`` as a second prediction array (token accuracy)."""
            loss, generated, labels = super().prediction_step(model, inputs, prediction_loss_only,
                                                              ignore_keys=ignore_keys, **gen_kwargs)
            if prediction_loss_only or not self.args.predict_with_generate or "labels" not in inputs \
                    or generated is None:
                return loss, generated, labels
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                logits = self._teacher_forced(model, inputs).logits
            target = inputs["labels"]
            mask = target.ne(-100)
            correct = (logits.argmax(-1).eq(target) & mask).sum(1)
            counts = torch.stack([correct, mask.sum(1)], dim=1)
            return loss, (generated, counts), labels

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            info = self._step_info
            if not model.training or info is None or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            labels = inputs["labels"]
            outputs = self._teacher_forced(model, inputs)
            per_sentence = token_sum_losses(outputs.logits, labels, self.args.label_smoothing_factor)
            world = get_world_size()
            n_tokens = max(info.global_tokens, 1.0)
            j = info.next_micro
            info.next_micro += 1
            if self.mix is not None and self.mix.granularity == "sample":
                start = info.sample_offset + sum(info.micro_sizes[:j])
                idx = torch.arange(start, start + labels.shape[0])
                big_b = info.global_samples
                # weighted_loss = K/B sum_b w_b l_b with l_b = (B/N) sum_t ce_bt
                loss = self.mix.weighted_loss(per_sentence * (big_b / n_tokens), indices=idx,
                                              global_batch_size=big_b)
            else:
                loss = per_sentence.sum() * (world / n_tokens)
            return (loss, outputs) if return_outputs else loss

    return _LbDistSeq2SeqTrainer


def _derived_keys(model, missing) -> set[str]:
    """The ``missing`` state-dict keys of ``model`` that need no checkpoint value: tensors tied to a key
    that is not missing, and the weights of sinusoidal position embeddings."""
    missing = set(missing)
    sd = model.state_dict()
    holders: dict[tuple, list[str]] = {}
    for key, t in sd.items():
        holders.setdefault((t.data_ptr(), tuple(t.shape)), []).append(key)
    derived = {k for keys in holders.values() if any(k2 not in missing for k2 in keys) for k in keys if k in missing}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("SinusoidalPositionalEmbedding"):
            derived.update(k for k in missing if k.startswith(f"{name}.") and k.count(".") == name.count(".") + 1)
    return derived


class LbDistSeq2SeqTrainer:
    """``transformers.Seq2SeqTrainer`` with lb_dist's GradientMix and CLARS second moments.

    ``LbDistSeq2SeqTrainer(*trainer_args, mix=None, moments=None, **trainer_kwargs)`` returns an
    instance of a ``Seq2SeqTrainer`` subclass (created on first use, so importing this module does
    not import transformers). ``mix``: an :class:`lb_dist.GradientMix` (sample-wise: weighted loss;
    device-wise: DDP hook). ``moments``: the :class:`MicroBatchMoments` a CLARS optimizer reads
    (default: the ``moments`` of the optimizer given as ``optimizers=(optimizer, None)``, see
    :func:`make_optimizer`); the trainer feeds it. The loss is computed as in the module docstring.
    """

    _cls = None

    def __new__(cls, *args, **kwargs):
        if LbDistSeq2SeqTrainer._cls is None:
            LbDistSeq2SeqTrainer._cls = _trainer_class()
        return LbDistSeq2SeqTrainer._cls(*args, **kwargs)


#: lb_dist.finetune's own optimizer/mixing arguments and their defaults: under --deepspeed the config decides.
_DEEPSPEED_OWNED = {"optimizer": "lamb", "mix": "none", "momentum": 0.9, "eta": None, "moments_ema": 0.0,
                    "mix_noise": "gaussian", "mix_std": DEFAULT_STD, "mix_seed": 0}


def _prepare_deepspeed(fa: FinetuneArguments, ta) -> dict:
    """Check a ``--deepspeed`` run before anything starts and register lb_dist's ``deepspeed.initialize``.
    Returns the config (a dict)."""
    try:
        import lb_dist.deepspeed as lbds
        from lb_dist.deepspeed.config import load_config
    except ImportError as e:
        raise RuntimeError(f"--deepspeed needs deepspeed and lb_dist.deepspeed ({e})") from e
    given = getattr(fa, "_given", None)    # the flags on the command line (None: unknown, e.g. called from Python)
    for name, default in _DEEPSPEED_OWNED.items():
        if (name in given) if given is not None else getattr(fa, name) != default:
            raise ValueError(f"--{name} {getattr(fa, name)!r}: with --deepspeed the DeepSpeed config decides the optimizer "
                             f"(optimizer.type CLARS/LARS/LAMB and its params) and the mixing (gradient_mix); remove "
                             f"--{name} and set it in {ta.deepspeed if isinstance(ta.deepspeed, str) else 'the config'}")
    config = load_config(ta.deepspeed)
    source = ta.deepspeed if isinstance(ta.deepspeed, str) else "the DeepSpeed config"
    if given is not None and "optim" in given and config.get("optimizer"):
        optim = getattr(ta, "optim", "")
        raise ValueError(f"--optim {getattr(optim, 'value', optim)}: {source} has an optimizer section, which "
                         f"decides the optimizer; remove --optim")
    _adopt_gradient_clipping(config, ta, given, source)
    mix = config.get("gradient_mix") or {}
    if isinstance(mix, dict) and mix.get("enabled", True) and mix.get("granularity", "device") == "sample":
        raise ValueError(f"{source}: gradient_mix.granularity \"sample\" needs a training loop that calls "
                         f"lb_dist.deepspeed.get_runtime(engine).weighted_loss; lb_dist.finetune supports the "
                         f"device-wise mix under DeepSpeed (--mix sample without --deepspeed)")
    opt = config.get("optimizer") or {}
    if isinstance(opt, dict) and str(opt.get("type", "")).upper() == "CLARS":
        source_kind = (opt.get("second_moments") or {}).get("source", "micro_batch")
        if source_kind == "per_sample":
            raise ValueError(f"{source}: optimizer.second_moments.source \"per_sample\" is not available in "
                             f"lb_dist.finetune (per-sample gradients of the seq2seq model); use \"micro_batch\"")
    lbds.register()
    return config


PREDICTIONS_FILE = "{prefix}_predictions.txt"


def _adopt_gradient_clipping(config: dict, ta, given, source: str) -> None:
    """A number in the config's ``gradient_clipping`` decides the clipping: the Trainer's
    ``max_grad_norm`` (default 1.0, which transformers requires to equal it) takes its value, unless
    ``--max_grad_norm`` was given with another value (refused, naming both)."""
    clip = config.get("gradient_clipping")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not hasattr(ta, "max_grad_norm"):
        return
    if float(clip) == float(ta.max_grad_norm):
        return
    if given is not None and "max_grad_norm" in given:
        raise ValueError(f"--max_grad_norm {ta.max_grad_norm} disagrees with gradient_clipping {clip} in {source}; "
                         f"give one of them (or \"gradient_clipping\": \"auto\" to take --max_grad_norm)")
    ta.max_grad_norm = float(clip)
    hf = getattr(ta, "hf_deepspeed_config", None)
    if hf is not None and hasattr(hf, "mismatches"):  # recorded when the arguments were parsed
        hf.mismatches = [m for m in hf.mismatches if not m.startswith("- ds gradient_clipping=")]


class _TranslationMetrics:
    """compute_metrics for predict_with_generate over exactly one split: BLEU of the decoded
    predictions against the split's raw reference sentences, and teacher-forced token accuracy
    (share of target tokens whose argmax prediction, given the reference prefix, is the reference
    token: the metric of the GradientMix paper's Multi30k results). :meth:`use` sets the split.

    With several processes the Trainer evaluates a set padded to a multiple of processes x batch size
    (samples repeated at its end); the first ``len(references)`` rows are the split in order, which
    is checked against the label ids before the padding is dropped."""

    def __init__(self, tokenizer, pad_id: int):
        self.tokenizer, self.pad_id = tokenizer, pad_id
        self.references: list[str] = []
        self.labels: list[list[int]] = []
        self.hypotheses: list[str] = []

    def use(self, dataset, references: list[str]) -> None:
        if len(dataset) != len(references):
            raise ValueError(f"{len(dataset)} evaluation examples but {len(references)} references")
        self.references, self.labels = list(references), [list(map(int, t)) for t in dataset.labels]

    def __call__(self, pred) -> dict[str, float]:
        import numpy as np

        from lb_dist.text import bleu, decode

        preds, counts = (pred.predictions[0], pred.predictions[1]) if isinstance(pred.predictions, tuple) \
            else (pred.predictions, None)
        n = len(self.references)
        if len(preds) < n:
            raise RuntimeError(f"BLEU: {len(preds)} predictions for {n} references")
        labels = pred.label_ids
        if labels is not None:
            for i in range(n):
                row = np.asarray(labels[i])
                got = row[(row != -100) & (row != self.pad_id)].tolist()
                if got != self.labels[i]:
                    raise RuntimeError(f"evaluation row {i} does not hold example {i} of the split; the "
                                       f"predictions cannot be matched with the references")
        preds = np.where(preds[:n] < 0, self.pad_id, preds[:n])
        self.hypotheses = decode(self.tokenizer, preds.tolist())
        out = {"bleu": bleu(self.hypotheses, self.references)}
        if counts is not None:
            c = np.asarray(counts[:n], dtype=np.float64)
            out["token_accuracy"] = float(c[:, 0].sum() / max(c[:, 1].sum(), 1.0))
        return out


def _load_model_and_tokenizer(fa: FinetuneArguments, output_dir: Path, train_pairs, is_main: bool):
    """(model, tokenizer for the datasets, transformers tokenizer for the Trainer). For a config-built
    model the tokenizer is loaded or trained (identically on every rank; the main process saves it)
    and its fingerprint is recorded in OUTPUT_DIR/lb_dist_finetune.json; a later run in the same
    OUTPUT_DIR with another tokenizer is refused."""
    from transformers import PreTrainedTokenizerFast

    from lb_dist.text import SPECIAL_TOKENS, check_tokenizer, load_tokenizer, tokenizer_fingerprint, train_tokenizer

    if fa.model_name_or_path is not None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        name = fa.model_name_or_path
        local = os.path.isabs(os.path.expanduser(name)) or name.startswith((".", "~")) or name.count("/") > 1
        if local and not Path(name).expanduser().is_dir():
            raise FileNotFoundError(f"--model_name_or_path {name}: no such directory")
        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForSeq2SeqLM.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise type(e)(f"--model_name_or_path {name}: neither a local model directory nor loadable from the "
                          f"Hugging Face Hub ({e})") from e
        return model, tok, tok
    from lb_dist.models import build_model

    record = output_dir / RECORD_FILE
    recorded = None
    if record.is_file():
        recorded = _read_record(output_dir).get("tokenizer_fingerprint")
    path = Path(fa.tokenizer_path) if fa.tokenizer_path else output_dir / TOKENIZER_FILE
    if fa.tokenizer_path or path.is_file():
        tok = load_tokenizer(path)
    else:
        tok = train_tokenizer([s for pair in train_pairs for s in pair], vocab_size=fa.vocab_size,
                              save_path=path if is_main else None)
    fingerprint = tokenizer_fingerprint(tok)
    if recorded is not None:
        check_tokenizer(tok, recorded, source=str(path), expected_file=f"the tokenizer the run in {output_dir} "
                        f"was trained with ({output_dir / TOKENIZER_FILE})")
    elif is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        entries = {**_read_record(output_dir), "tokenizer_fingerprint": fingerprint, "tokenizer": str(path)}
        atomic_write_text(record, json.dumps(entries) + "\n")
    try:
        options = json.loads(fa.model_options) if fa.model_options else {}
    except ValueError as e:
        raise ValueError(f"--model_options is not valid JSON ({e}): {fa.model_options!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--model_options must be a JSON object, got {fa.model_options!r}")
    options.setdefault("max_positions", max(fa.max_length, 8))
    model = build_model(f"transformer_{fa.model_size}", vocab_size=tok.get_vocab_size(), **options)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[1],
                                     eos_token=SPECIAL_TOKENS[2], unk_token=SPECIAL_TOKENS[3])
    return model, tok, hf_tok


def _check_args(fa: FinetuneArguments, ta) -> dict | None:
    """Refuse what cannot run, before anything is created; returns the DeepSpeed config (or None)."""
    if fa.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {fa.optimizer!r}")
    if fa.mix not in MIX_CHOICES:
        raise ValueError(f"--mix must be one of {', '.join(MIX_CHOICES)}; got {fa.mix!r}")
    if fa.model_size not in ("small", "base"):
        raise ValueError(f"--model_size must be 'small' or 'base'; got {fa.model_size!r}")
    if fa.eval_split not in ("val", "test"):
        raise ValueError(f"--eval_split must be 'val' or 'test'; got {fa.eval_split!r}")
    for name in ("max_train_samples", "max_eval_samples"):
        v = getattr(fa, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    if not Path(fa.data_dir).is_dir():
        raise FileNotFoundError(f"--data_dir {fa.data_dir} does not exist")
    if fa.model_options:
        try:
            json.loads(fa.model_options)
        except ValueError as e:
            raise ValueError(f"--model_options is not valid JSON ({e}): {fa.model_options!r}") from None
    given = getattr(fa, "_given", None)
    if given is not None and "optim" in given and not ta.deepspeed:
        raise ValueError(f"--optim {getattr(ta.optim, 'value', ta.optim)}: lb_dist.finetune builds the optimizer from "
                         f"--optimizer ({', '.join(OPTIMIZERS)}); the Trainer's --optim would be ignored. Remove it")
    if ta.deepspeed:
        return _prepare_deepspeed(fa, ta)
    return None


def _run_settings(fa: FinetuneArguments, ta, config: dict | None) -> dict[str, Any]:
    """What a resumed run must keep: the optimizer (lb_dist's ``--optimizer`` or the DeepSpeed config's
    ``optimizer.type``), the learning rate and, for a config-built model, the vocabulary size."""
    if config is not None:
        opt = config.get("optimizer") or {}
        optimizer = f"deepspeed:{opt.get('type')}" if isinstance(opt, dict) and opt.get("type") else "deepspeed:trainer"
    else:
        optimizer = fa.optimizer
    out = {"optimizer": optimizer, "learning_rate": float(ta.learning_rate), "mix": fa.mix}
    if fa.model_name_or_path is None:
        out["vocab_size"] = fa.vocab_size
    return out


_SETTING_FLAGS = {"optimizer": "--optimizer (or the DeepSpeed config's optimizer.type)",
                  "learning_rate": "--learning_rate", "mix": "--mix", "vocab_size": "--vocab_size"}


def _check_resume(record: dict, settings: dict, checkpoint) -> None:
    saved = record.get("run")
    if not isinstance(saved, dict):
        return
    for key, value in settings.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"{_SETTING_FLAGS[key]} {value!r} differs from the run being resumed from {checkpoint} "
                             f"({saved[key]!r}): its optimizer, scheduler and model state belong to the recorded "
                             f"value. Resume with {_SETTING_FLAGS[key].split()[0]} {saved[key]!r}, or start a new run "
                             f"(another --output_dir, or --overwrite_output_dir without a checkpoint)")


def _read_record(output_dir: Path) -> dict:
    path = output_dir / RECORD_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not a valid lb_dist.finetune record ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a valid lb_dist.finetune record (not a JSON object)")
    return record


def run(fa: FinetuneArguments, ta) -> dict[str, Any]:
    """Fine-tune with parsed arguments (``ta``: ``Seq2SeqTrainingArguments``); returns the metrics
    (train loss, eval BLEU/token accuracy/loss, test BLEU/token accuracy) that are also written to
    ``OUTPUT_DIR/results.json``. A start that fails before training leaves nothing new in OUTPUT_DIR."""
    config = _check_args(fa, ta)
    output_dir = Path(ta.output_dir)
    is_main = ta.process_index == 0
    existed = set(output_dir.iterdir()) if output_dir.is_dir() else None
    try:
        trainer, resume, tok, metric, eval_ds, eval_pairs = _setup(fa, ta, config, output_dir, is_main)
    except BaseException:
        if is_main:
            _remove_new_files(output_dir, existed)
        raise
    results: dict[str, Any] = {}
    train_out = trainer.train(resume_from_checkpoint=resume)
    results["train_loss"] = train_out.training_loss
    results["global_step"] = trainer.state.global_step
    results["log_history"] = trainer.state.log_history
    if ta.deepspeed:
        results["deepspeed"] = _deepspeed_summary(trainer.model_wrapped)
    if ta.predict_with_generate:
        metric.use(eval_ds, [t for _, t in eval_pairs])
        results.update({k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
        _write_predictions(trainer, output_dir, "eval", metric.hypotheses)
        if fa.test_bleu:
            test_pairs = read_multi30k(fa.data_dir, "test", src_lang=fa.src_lang, tgt_lang=fa.tgt_lang)
            if fa.max_eval_samples:
                test_pairs = test_pairs[:fa.max_eval_samples]
            test_ds = TranslationDataset(test_pairs, tok, fa.max_length)
            metric.use(test_ds, [t for _, t in test_pairs])
            pred = trainer.predict(test_ds, metric_key_prefix="test")
            results.update({k: v for k, v in pred.metrics.items() if isinstance(v, (int, float))})
            _write_predictions(trainer, output_dir, "test", metric.hypotheses)
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in results.items() if k != "log_history"}
        summary["args"] = {"lb_dist": dataclasses.asdict(fa)}
        if config is not None:
            summary["args"]["decided_by_deepspeed_config"] = sorted(_DEEPSPEED_OWNED)
        atomic_write_text(output_dir / "results.json", json.dumps(summary, indent=1, default=str) + "\n")
    trainer.save_model()
    return results


def _write_predictions(trainer, output_dir: Path, prefix: str, hypotheses: list[str]) -> None:
    """OUTPUT_DIR/{eval,test}_predictions.txt: the decoded translations the BLEU was computed on."""
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(h.replace("\n", " ") + "\n" for h in hypotheses)
        atomic_write_text(output_dir / PREDICTIONS_FILE.format(prefix=prefix), text)


def _remove_new_files(output_dir: Path, existed: set | None) -> None:
    """Undo what a failed start created in OUTPUT_DIR (the tokenizer, the record, the Trainer's logs)."""
    import shutil

    if not output_dir.is_dir():
        return
    for path in output_dir.iterdir():
        if existed is None or path not in existed:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if existed is None:
        try:
            output_dir.rmdir()
        except OSError:
            pass


def _setup(fa: FinetuneArguments, ta, config, output_dir: Path, is_main: bool):
    train_pairs = read_multi30k(fa.data_dir, "train", src_lang=fa.src_lang, tgt_lang=fa.tgt_lang)
    eval_pairs = read_multi30k(fa.data_dir, fa.eval_split, src_lang=fa.src_lang, tgt_lang=fa.tgt_lang)
    if fa.max_train_samples:
        train_pairs = train_pairs[:fa.max_train_samples]
    if fa.max_eval_samples:
        eval_pairs = eval_pairs[:fa.max_eval_samples]
    resume = ta.resume_from_checkpoint
    if resume is None and output_dir.is_dir():
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(output_dir))
    settings = _run_settings(fa, ta, config)
    if resume:
        _check_resume(_read_record(output_dir), settings, resume)
    from transformers import set_seed

    set_seed(ta.seed)    # a config-built model's initial weights follow --seed, not the process's RNG history
    model, tok, hf_tok = _load_model_and_tokenizer(fa, output_dir, train_pairs, is_main)
    if is_main and not resume:
        output_dir.mkdir(parents=True, exist_ok=True)
        record = _read_record(output_dir)
        record["run"] = settings
        atomic_write_text(output_dir / RECORD_FILE, json.dumps(record) + "\n")
    model.to(ta.device)
    pad_id = hf_tok.pad_token_id
    train_ds = TranslationDataset(train_pairs, tok, fa.max_length)
    eval_ds = TranslationDataset(eval_pairs, tok, fa.max_length)
    optimizer, mix = None, None
    if not ta.deepspeed:  # under DeepSpeed the config's optimizer and gradient_mix (lb_dist.deepspeed)
        optimizer, _ = make_optimizer(model, fa.optimizer, lr=ta.learning_rate, weight_decay=ta.weight_decay,
                                      momentum=fa.momentum, eta=fa.eta, betas=(ta.adam_beta1, ta.adam_beta2),
                                      eps=ta.adam_epsilon, moments_ema=fa.moments_ema)
    if fa.mix != "none":
        mix = GradientMix(noise=fa.mix_noise, std=fa.mix_std, granularity=fa.mix, seed=fa.mix_seed)
    metric = _TranslationMetrics(tok, pad_id)
    metric.use(eval_ds, [t for _, t in eval_pairs])
    if ta.predict_with_generate and ta.generation_max_length is None:
        ta.generation_max_length = fa.max_length
    trainer = LbDistSeq2SeqTrainer(
        model=model, args=ta, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=functools.partial(collate_translation, pad_id=pad_id), processing_class=hf_tok,
        compute_metrics=metric if ta.predict_with_generate else None, optimizers=(optimizer, None), mix=mix)
    return trainer, resume, tok, metric, eval_ds, eval_pairs


def _deepspeed_summary(engine) -> dict[str, Any]:
    """What the DeepSpeed engine of a --deepspeed run is: lb_dist's (ZeRO-aware optimizer, mix, estimator) or not."""
    runtime = getattr(engine, "lb_dist", None)
    out: dict[str, Any] = {"engine": type(engine).__name__,
                           "optimizer": type(getattr(engine, "basic_optimizer", None)).__name__,
                           "zero_stage": int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage")
                           else None, "lb_dist": runtime is not None}
    if runtime is not None:
        out["world_size"] = runtime.world_size
        out["mix_step"] = runtime.mix.step if runtime.mix is not None else None
        if runtime.step_moments is not None:
            out["estimator_updates"] = [e.num_updates for e in runtime.step_moments.estimators.values()]
    return out


def parse_args(argv=None):
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    parser = HfArgumentParser((FinetuneArguments, Seq2SeqTrainingArguments))
    if argv is None:
        argv = sys.argv[1:]
    if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv) or (
            len(argv) == 1 and argv[0].endswith(".json") and '"deepspeed"' in Path(argv[0]).read_text()):
        # before Seq2SeqTrainingArguments sets up DeepSpeed's communication: the import keeps DeepSpeed
        # from JIT-building its CPU comm op (lb_dist.deepspeed.cpu_comm); register() comes later
        import lb_dist.deepspeed  # noqa: F401
    if len(argv) == 1 and argv[0].endswith(".json"):
        fa, ta = parser.parse_json_file(json_file=argv[0])
        given = set(json.loads(Path(argv[0]).read_text()))
    else:
        fa, ta = parser.parse_args_into_dataclasses(args=list(argv))
        given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if isinstance(a, str) and a.startswith("--")}
    fa._given = given      # the flags given at all (a flag the DeepSpeed config decides is refused if given)
    return fa, ta


def main(argv=None) -> dict[str, Any]:
    fa, ta = parse_args(argv)
    results = run(fa, ta)
    if get_rank() == 0:
        keys = [k for k in ("train_loss", "eval_loss", "eval_bleu", "eval_token_accuracy", "test_bleu",
                            "test_token_accuracy") if k in results]
        print("[lb_dist.finetune] " + ", ".join(
            f"{k} {results[k]:.4f}" if isinstance(results[k], float) and math.isfinite(results[k])
            else f"{k} {results[k]}" for k in keys), flush=True)
    return results


def _exit_after_distributed_job() -> None:
    """The process entry point's end (``python -m lb_dist.finetune``, launched by ``deepspeed`` or
    ``torchrun``): leave the process group together and exit without interpreter teardown, where
    torch 2.13 + gloo occasionally aborts ("terminate called without an active exception", seen in
    this module's 2-rank DeepSpeed test after training and saving had finished), as ``lb-dist train``
    does. Nothing to do after a single-process run."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    _exit_after_distributed_job()
