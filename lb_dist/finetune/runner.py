"""The run of ``python -m lb_dist.finetune`` as a library: :class:`FinetuneArguments` (lb_dist's
arguments next to ``Seq2SeqTrainingArguments``), :func:`run` (checks, data, model and tokenizer,
:class:`~lb_dist.finetune.trainer.LbDistSeq2SeqTrainer`, training, evaluation, the record in
OUTPUT_DIR), :func:`prepare_deepspeed` (the checks of a ``--deepspeed`` run). The command line is
:mod:`lb_dist.finetune.cli`; the package docstring says what the run computes."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lb_dist import GradientMix
from lb_dist._io import atomic_write_text
from lb_dist.data.multi30k import TranslationDataset, collate_translation, read_multi30k
from lb_dist.finetune.trainer import OPTIMIZERS, LbDistSeq2SeqTrainer, make_optimizer
from lb_dist.mixing import DEFAULT_STD

__all__ = ["FinetuneArguments", "run", "prepare_deepspeed", "deepspeed_summary", "MIX_CHOICES", "TOKENIZER_FILE",
           "RECORD_FILE", "PREDICTIONS_FILE"]

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
    #: The flags given at all (set by :func:`lb_dist.finetune.cli.parse_args`; a flag the DeepSpeed config
    #: decides is refused if given); None: unknown (called from Python). Not a command-line argument.
    given_flags: set | None = field(default=None, init=False, repr=False, compare=False)


#: lb_dist.finetune's own optimizer/mixing arguments and their defaults: under --deepspeed the config decides.
_DEEPSPEED_OWNED = {"optimizer": "lamb", "mix": "none", "momentum": 0.9, "eta": None, "moments_ema": 0.0,
                    "mix_noise": "gaussian", "mix_std": DEFAULT_STD, "mix_seed": 0}


def prepare_deepspeed(fa: FinetuneArguments, ta) -> dict:
    """Check a ``--deepspeed`` run before anything starts and register lb_dist's ``deepspeed.initialize``.
    Returns the config (a dict)."""
    try:
        import lb_dist.deepspeed as lbds
        from lb_dist.deepspeed.config import MixSpec, SecondMomentsSpec, load_config
    except ImportError as e:
        raise RuntimeError(f"--deepspeed needs deepspeed and lb_dist.deepspeed ({e})") from e
    given = fa.given_flags    # the flags on the command line (None: unknown, e.g. called from Python)
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
    # two refusals read before Hugging Face fills the config's "auto" values (the whole config is parsed
    # and validated once, by lb_dist.deepspeed.initialize's parse_config); the defaults are the specs'
    mix = config.get("gradient_mix") or {}
    if isinstance(mix, dict) and mix.get("enabled", MixSpec.enabled) and \
            mix.get("granularity", MixSpec.granularity) == "sample":
        raise ValueError(f"{source}: gradient_mix.granularity \"sample\" needs a training loop that calls "
                         f"lb_dist.deepspeed.get_runtime(engine).weighted_loss; lb_dist.finetune supports the "
                         f"device-wise mix under DeepSpeed (--mix sample without --deepspeed)")
    opt = config.get("optimizer") or {}
    if isinstance(opt, dict) and str(opt.get("type", "")).upper() == "CLARS":
        source_kind = (opt.get("second_moments") or {}).get("source", SecondMomentsSpec.source)
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
    given = fa.given_flags
    if given is not None and "optim" in given and not ta.deepspeed:
        raise ValueError(f"--optim {getattr(ta.optim, 'value', ta.optim)}: lb_dist.finetune builds the optimizer from "
                         f"--optimizer ({', '.join(OPTIMIZERS)}); the Trainer's --optim would be ignored. Remove it")
    if ta.deepspeed:
        return prepare_deepspeed(fa, ta)
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
        results["deepspeed"] = deepspeed_summary(trainer.model_wrapped)
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
        summary["args"] = {"lb_dist": {k: v for k, v in dataclasses.asdict(fa).items() if k != "given_flags"}}
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


def deepspeed_summary(engine) -> dict[str, Any]:
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
