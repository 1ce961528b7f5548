"""The library part of ``lb_dist.finetune``: :class:`LbDistSeq2SeqTrainer` (``Seq2SeqTrainer`` with
lb_dist's GradientMix and CLARS second moments) and :func:`make_optimizer`.

The trainer is ``Seq2SeqTrainer`` plus four named pieces, each a mixin of plain methods (no
transformers import until the class is first used):

* :class:`MixAndMomentsWiring`: at ``on_train_begin`` the GradientMix is attached to the (wrapped)
  optimizer and, under DDP, the ``lb_dist.ddp`` hook registered; in one process CLARS' estimator tracks
  the accumulation micro-batches; undone at ``on_train_end``;
* :class:`GlobalTokenMeanLoss`: the loss of the package docstring (the global batch's token count N
  from ``get_batch_samples``; sample-wise GradientMix weights; the estimator's scale per micro-batch);
* :class:`TeacherForcedAccuracy`: evaluation adds per-example teacher-forced token counts;
* :class:`TiedWeightsLoading`: no missing-key warnings for tied or computed weights on resume.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lb_dist import GradientMix
from lb_dist.distributed import all_reduce_sum_, get_rank, get_world_size
from lb_dist.moments import MicroBatchMoments
from lb_dist.optim import adapted_params, create_optimizer, param_groups
from lb_dist.text import token_sum_losses

__all__ = ["LbDistSeq2SeqTrainer", "make_optimizer", "OPTIMIZERS", "StepInfo", "MixAndMomentsWiring",
           "GlobalTokenMeanLoss", "TeacherForcedAccuracy", "TiedWeightsLoading", "derived_keys"]

OPTIMIZERS = ("adamw", "lamb", "lars", "clars")


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
class StepInfo:
    """The global batch of the current optimizer step (see the package docstring)."""

    global_samples: int          # B
    global_tokens: float         # N
    sample_offset: int           # global index of this rank's first sample
    micro_sizes: list[int]       # this rank's micro-batch sizes
    micro_tokens: list[int]
    next_micro: int = 0


# ------------------------------------------------------------------------------------------ pieces
class MixAndMomentsWiring:
    """The constructor's checks of ``mix``/``moments`` and their wiring around ``train()``."""

    def setup_lb_dist(self, mix: GradientMix | None, moments: MicroBatchMoments | None) -> None:
        """Called by the constructor after ``Seq2SeqTrainer.__init__``: check and keep ``mix`` and
        ``moments`` (default: the ``moments`` of a CLARS given as ``optimizers=(optimizer, None)``)."""
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
        self._step_info: StepInfo | None = None
        self._ddp_state = None
        self._tracking = False

    def attach_lb_dist(self, state) -> None:
        """``on_train_begin``: the mix on the optimizer Accelerate wraps (its step counter from
        ``state.global_step``: resumable); under DDP the ``lb_dist.ddp`` hook; in one process the
        estimator tracking the accumulation micro-batches."""
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

    def detach_lb_dist(self) -> None:
        """``on_train_end``: undo :meth:`attach_lb_dist`'s tracking and the mix's attachment."""
        if self._tracking:
            self.moments.remove_hooks()
            self._tracking = False
        if self.mix is not None:
            self.mix.detach()


class GlobalTokenMeanLoss:
    """The loss over the global batch (package docstring): N and B of the step, then per micro-batch
    ``sum_b w_b sum_t ce_bt / N`` (times K for DDP's mean), and the estimator's per-micro-batch scale."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        sizes = [int(b["labels"].shape[0]) for b in batch_samples]
        tokens = [int(b["labels"].ne(-100).sum()) for b in batch_samples]
        world, rank = get_world_size(), get_rank()
        stats = torch.zeros(world, 2, dtype=torch.float64, device=self.args.device)
        stats[rank, 0], stats[rank, 1] = sum(sizes), sum(tokens)
        all_reduce_sum_(stats)
        stats = stats.cpu()
        self._step_info = StepInfo(global_samples=int(stats[:, 0].sum()), global_tokens=float(stats[:, 1].sum()),
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        info = self._step_info
        if not model.training or info is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs["labels"]
        outputs = self.teacher_forced(model, inputs)
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


class TeacherForcedAccuracy:
    """Evaluation: the generated tokens (Seq2SeqTrainer's) plus teacher-forced token counts."""

    def teacher_forced(self, model, inputs):
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
            logits = self.teacher_forced(model, inputs).logits
        target = inputs["labels"]
        mask = target.ne(-100)
        correct = (logits.argmax(-1).eq(target) & mask).sum(1)
        counts = torch.stack([correct, mask.sum(1)], dim=1)
        return loss, (generated, counts), labels


class TiedWeightsLoading:
    """Resuming: the Trainer's load warnings without the keys a checkpoint never holds."""

    def _issue_warnings_after_load(self, load_result):
        """The Trainer's, without the keys a checkpoint never holds: weights tied to a saved one
        (shared embeddings, output projection) and sinusoidal position tables (computed)."""
        derived = derived_keys(self.accelerator.unwrap_model(self.model), load_result.missing_keys)
        if derived and hasattr(load_result, "unexpected_keys"):   # torch's IncompatibleKeys (a namedtuple)
            self.accelerator.unwrap_model(self.model).tie_weights()
            load_result = type(load_result)(missing_keys=[k for k in load_result.missing_keys if k not in derived],
                                            unexpected_keys=load_result.unexpected_keys)
        return super()._issue_warnings_after_load(load_result)


def derived_keys(model, missing) -> set[str]:
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


# ------------------------------------------------------------------------------------------ the class
def _trainer_class():
    """``Seq2SeqTrainer`` + the pieces above (created on first use: importing lb_dist.finetune does not
    import transformers)."""
    from transformers import Seq2SeqTrainer, TrainerCallback

    class _Hooks(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            self.trainer.attach_lb_dist(state)

        def on_train_end(self, args, state, control, **kwargs):
            self.trainer.detach_lb_dist()

    class _LbDistSeq2SeqTrainer(MixAndMomentsWiring, GlobalTokenMeanLoss, TeacherForcedAccuracy, TiedWeightsLoading,
                                Seq2SeqTrainer):
        __doc__ = LbDistSeq2SeqTrainer.__doc__

        def __init__(self, *args, mix: GradientMix | None = None, moments: MicroBatchMoments | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.setup_lb_dist(mix, moments)
            self.loss_is_scaled_for_ga = True  # compute_loss divides by the global token count N
            self.add_callback(_Hooks(self))

    return _LbDistSeq2SeqTrainer


class LbDistSeq2SeqTrainer:
    """``transformers.Seq2SeqTrainer`` with lb_dist's GradientMix and CLARS second moments.

    ``LbDistSeq2SeqTrainer(*trainer_args, mix=None, moments=None, **trainer_kwargs)`` returns an
    instance of a ``Seq2SeqTrainer`` subclass (created on first use, so importing this module does
    not import transformers). ``mix``: an :class:`lb_dist.GradientMix` (sample-wise: weighted loss;
    device-wise: DDP hook). ``moments``: the :class:`MicroBatchMoments` a CLARS optimizer reads
    (default: the ``moments`` of the optimizer given as ``optimizers=(optimizer, None)``, see
    :func:`make_optimizer`); the trainer feeds it. The loss is computed as in the package docstring.
    """

    _cls = None

    def __new__(cls, *args, **kwargs):
        if cls._cls is None:
            cls._cls = _trainer_class()
        return cls._cls(*args, **kwargs)
