"""The command line of ``lb-dist train`` / ``python -m lb_dist.train``: every flag, and the checks that
run before any work (an error names the offending flag, argparse style, exit status 2).

The parsed namespace is the run's configuration: it is written to ``RUN_DIR/config.json`` and stored
in every checkpoint; a resumed run must agree with it on every flag of :data:`RUN_DEFINING` (the flags
that change what is computed), see docs/training.md.
"""
from __future__ import annotations

import argparse
import math
import os

from lb_dist.mixing import DEFAULT_STD
from lb_dist.moments.per_sample import DEFAULT_CHUNK_SIZE, DEFAULT_SUBSET_SIZE
from lb_dist.train.registry import BACKEND_NAMES

__all__ = ["build_parser", "parse_args", "check_args", "RUN_DEFINING", "OPTIMIZERS", "SCHEDULES",
           "DATASETS", "BACKENDS", "MODEL_DEFAULT", "parse_model_options", "ATTACHMENTS", "to_dict"]

OPTIMIZERS = ("sgd", "nesterov", "lars", "clars", "adam", "adamw", "lamb")
LAYERWISE = ("lars", "clars", "lamb")
SCHEDULES = ("constant", "poly", "inverse-sqrt")
DATASETS = ("synthetic", "cifar10", "cifar100", "imagenet", "multi30k")
BACKENDS = BACKEND_NAMES
MIXES = ("none", "device", "sample")
MOMENT_SOURCES = ("micro-batch", "per-sample", "training-pass")
MODEL_DEFAULT = "resnet20"

#: Flags that define what a run computes. A resumed run (same --run-dir) must give the same values
#: (the others, e.g. --backend, --workers, logging and checkpoint frequency, may change).
RUN_DEFINING = (
    "model", "model_option", "dataset", "data_dir", "train_size", "test_size", "num_classes", "image_size",
    "augment", "max_length", "vocab_size", "epochs", "batch_size", "seed", "label_smoothing", "optimizer",
    "lr", "base_lr", "base_batch_size", "momentum", "weight_decay", "wd_exclusion", "eta", "betas", "eps",
    "clars_moments", "per_sample_subset", "moments_ema", "schedule", "warmup_epochs", "warmup_steps",
    "warmup_base_batch_size", "warmup_power", "decay_power", "lr_init_factor", "lr_final_factor", "mix",
    "mix_noise", "mix_std", "mix_seed",
)


def _int_at_least(minimum: int, expected: str):
    """An argparse ``type``: an integer >= ``minimum``; errors say ``expected {expected}``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _model_option(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def _option_value(text: str):
    low = text.lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_model_options(items) -> dict:
    """``["last_bn_gamma=0", "dropout=0.1"]`` -> ``{"last_bn_gamma": 0, "dropout": 0.1}``."""
    out = {}
    for item in items or ():
        key, value = item.split("=", 1)
        out[key] = _option_value(value)
    return out


def _check_model_options(name: str, options: dict) -> None:
    """Build the model with ``options`` on the meta device (no memory, no work): an option the model
    does not take, or a value it refuses, raises here, before the run starts. The Transformers get
    placeholder vocabulary ids (the tokenizer's come later)."""
    if not options:
        return
    import torch

    from lb_dist.models import build_model
    kwargs = dict(options)
    if name.startswith("transformer"):
        kwargs = {"vocab_size": 8, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "max_positions": 32,
                  **kwargs}
    with torch.device("meta"):
        build_model(name, **kwargs)


def build_parser(prog: str = "lb-dist train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, usage=f"{prog} --run-dir DIR --lr LR [options]   ({prog} --help lists them)",
        description="Train a ResNet or Transformer with lb_dist's optimizers and GradientMix, the same command in "
                    "one process or under torchrun, deepspeed (--module lb_dist.train) or horovodrun. "
                    "Reference: docs/training.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("workload")
    g.add_argument("--model", default=MODEL_DEFAULT,
                   help="model name (lb_dist.models.MODEL_NAMES: resnet20/32/44/56/110, resnet18_cifar, vgg11_bn, "
                        "resnet50, transformer_small, transformer_base; also resnetD for any CIFAR depth D = 6n+2)")
    g.add_argument("--model-option", action="append", default=[], type=_model_option, metavar="KEY=VALUE",
                   help="extra build_model option, repeatable (e.g. last_bn_gamma=0, dropout=0.1)")
    g.add_argument("--dataset", choices=DATASETS, default="synthetic",
                   help="synthetic: deterministic CIFAR-shaped images (offline); cifar10/cifar100: the python-format "
                        "files in --data-dir; imagenet: class folders (needs torchvision); multi30k: En->De raw files")
    g.add_argument("--data-dir", default=None, help="directory of the dataset files (all but synthetic)")
    g.add_argument("--train-size", type=_positive_int, default=None,
                   help="training samples: the size of the synthetic set (default 8192), or the first N of a real one")
    g.add_argument("--test-size", type=_positive_int, default=None,
                   help="test samples: synthetic size (default 2048), or the first N of a real test split")
    g.add_argument("--num-classes", type=_positive_int, default=None, help="classes (synthetic; default 10)")
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help="image height = width (synthetic default 32; imagenet default 224)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="training-set augmentation (default: the dataset's: crop+flip for cifar/imagenet)")
    g.add_argument("--max-length", type=_positive_int, default=128, help="multi30k: tokens per sentence (truncated)")
    g.add_argument("--vocab-size", type=_positive_int, default=8000,
                   help="multi30k: size of the BPE vocabulary trained on the training split")
    g.add_argument("--workers", type=_non_negative_int, default=0, help="DataLoader worker processes per rank")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=1)
    g.add_argument("--batch-size", type=_positive_int, default=DEFAULT_SUBSET_SIZE,
                   help="GLOBAL batch size B per optimizer step = world size x --accumulation-steps x micro-batch")
    g.add_argument("--accumulation-steps", type=_positive_int, default=1,
                   help="micro-batches accumulated per optimizer step on every rank")
    g.add_argument("--eval-batch-size", type=_positive_int, default=256, help="per-rank batch of the evaluation")
    g.add_argument("--seed", type=int, default=0, help="model init, data order, mixing coefficients")
    g.add_argument("--label-smoothing", type=_non_negative_float, default=0.0)

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="clars",
                   help="sgd (heavy ball), nesterov, lars, clars, adam (L2 decay), adamw, lamb")
    g.add_argument("--lr", type=_non_negative_float, default=None,
                   help="peak learning rate (gamma_scale for LARS/CLARS); or give --base-lr and --base-batch-size")
    g.add_argument("--base-lr", type=_non_negative_float, default=None,
                   help="linear scaling rule: lr = base_lr * batch_size / base_batch_size")
    g.add_argument("--base-batch-size", type=_positive_int, default=None, help="the batch size of --base-lr")
    g.add_argument("--momentum", type=_finite_float, default=0.9, help="sgd/nesterov/lars/clars momentum")
    g.add_argument("--weight-decay", type=_non_negative_float, default=0.0)
    g.add_argument("--wd-exclusion", action=argparse.BooleanOptionalAction, default=True,
                   help="exclude biases and normalization parameters from weight decay and layer adaptation "
                        "(lb_dist.optim.param_groups)")
    g.add_argument("--eta", type=_positive_float, default=None,
                   help="LARS/CLARS trust coefficient (default: LARS 0.001, CLARS 0.01)")
    g.add_argument("--betas", type=_finite_float, nargs=2, default=None, metavar=("BETA1", "BETA2"),
                   help="adam/adamw/lamb (default 0.9 0.999)")
    g.add_argument("--eps", type=_positive_float, default=None, help="adam/adamw (1e-8), lamb (1e-6)")
    g.add_argument("--clars-moments", choices=MOMENT_SOURCES, default="micro-batch",
                   help="where CLARS' S_k comes from: micro-batch (free: the data-parallel ranks' and accumulation "
                        "micro-batches' gradients; needs >= 2 per step), per-sample (exact, torch.func, on "
                        "--per-sample-subset samples; image models) or training-pass (exact, on the whole batch, from "
                        "the training step's own activations and output gradients; every backend)")
    g.add_argument("--per-sample-subset", type=_positive_int, default=512,
                   help="|J|, the global per-sample subset (CLARS paper section 4.4)")
    g.add_argument("--per-sample-chunk", type=_positive_int, default=DEFAULT_CHUNK_SIZE, help="samples per vmap call (memory)")
    g.add_argument("--moments-ema", type=_non_negative_float, default=0.0,
                   help="micro-batch estimator smoothing across steps, in [0, 1)")

    g = p.add_argument_group("learning-rate schedule (one step = one optimizer step)")
    g.add_argument("--schedule", choices=SCHEDULES, default="poly",
                   help="poly: GradientMix eq. 15 polynomial warmup/decay; inverse-sqrt: Transformer; constant "
                        "(with optional linear warmup)")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--warmup-epochs", type=_non_negative_float, default=None, help="warmup length in epochs")
    w.add_argument("--warmup-steps", type=_non_negative_int, default=None, help="warmup length in steps")
    g.add_argument("--warmup-base-batch-size", type=_positive_int, default=None,
                   help="scale --warmup-steps given at this batch size by base/B (GradientMix's Transformer: "
                        "4000 steps at 64)")
    g.add_argument("--warmup-power", type=_positive_float, default=1.0, help="poly: p_warmup")
    g.add_argument("--decay-power", type=_positive_float, default=2.0, help="poly: p_decay")
    g.add_argument("--lr-init-factor", type=_non_negative_float, default=0.0, help="poly: eta_init / eta_peak")
    g.add_argument("--lr-final-factor", type=_non_negative_float, default=0.0, help="poly: eta_final / eta_peak")

    g = p.add_argument_group("GradientMix")
    g.add_argument("--mix", choices=MIXES, default="none",
                   help="device: mix the data-parallel workers' gradients (eq. 3; needs >= 2 ranks); sample: "
                        "randomly weighted per-sample losses (eq. 4)")
    g.add_argument("--mix-noise", choices=("gaussian", "rademacher"), default="gaussian")
    g.add_argument("--mix-std", type=_non_negative_float, default=None,
                   help=f"relative std of a coefficient (default lb_dist.mixing.DEFAULT_STD = {DEFAULT_STD})")
    g.add_argument("--mix-seed", type=int, default=None, help="default: --seed")

    g = p.add_argument_group("run directory, checkpoints, logging")
    g.add_argument("--run-dir", required=True,
                   help="where config.json, metrics.jsonl, checkpoints/ go; rerunning the same command resumes "
                        "from its last complete checkpoint")
    g.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto: resume from the run directory's last checkpoint if there is one; never: refuse a run "
                        "directory that already holds checkpoints")
    g.add_argument("--checkpoint-every-steps", type=_non_negative_int, default=0,
                   help="also checkpoint every N optimizer steps (0: only at the end of every epoch)")
    g.add_argument("--keep-checkpoints", type=_positive_int, default=2, help="newest checkpoints kept")
    g.add_argument("--stop-after-steps", type=_positive_int, default=None,
                   help="checkpoint and stop after N optimizer steps of this invocation (time-limited jobs); "
                        "the same command continues")
    g.add_argument("--log-every", type=_positive_int, default=1, help="a step record every N steps")
    g.add_argument("--layer-stats-every", type=_non_negative_int, default=10,
                   help="per-layer trust ratios and M_k in the step record every N steps (0: never)")
    g.add_argument("--bleu-samples", type=_non_negative_int, default=0,
                   help="multi30k: translate only the first N test sentences for BLEU (0: all)")
    g.add_argument("--val", action=argparse.BooleanOptionalAction, default=False,
                   help="multi30k: also evaluate the loss on the validation split every epoch (val_loss in the "
                        "epoch record; what lb-dist reproduce selects learning rates on)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars on rank 0")
    g.add_argument("--tensorboard", choices=("auto", "on", "off"), default="auto",
                   help="also write TensorBoard events to RUN_DIR/tensorboard (auto: when tensorboard is installed)")

    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: fsdp under `accelerate launch --use_fsdp`, torchrun when started by torchrun (or with "
                        "RANK/WORLD_SIZE/MASTER_ADDR set), horovod under horovodrun, deepspeed under the deepspeed "
                        "launcher, else single")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="torch.distributed backend (auto: nccl on CUDA, gloo on CPU)")
    g.add_argument("--num-threads", type=_positive_int, default=None, help="torch intra-op threads per process")
    g.add_argument("--fsdp-wrap", choices=("blocks", "root"), default=None,
                   help="--backend fsdp only: fully_shard each repeated block (the modules of an nn.Sequential / "
                        "nn.ModuleList with parameters and submodules: ResNet blocks, Transformer layers) and then "
                        "the root (blocks, the default), or the root only (root). Under `accelerate launch "
                        "--use_fsdp` the default follows the plugin's --fsdp_auto_wrap_policy")

    g = p.add_argument_group("DeepSpeed (--backend deepspeed only)")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="ZeRO stage (default: the --deepspeed-config file's zero_optimization.stage, else 0); "
                        "LARS/CLARS/LAMB are exact at every stage (lb_dist.deepspeed)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 parameters and gradients (DeepSpeed's bf16 section; ZeRO stage >= 1 with the "
                        "layer-wise optimizers). Default: the --deepspeed-config file's bf16.enabled, else off")
    g.add_argument("--deepspeed-config", default=None, metavar="FILE",
                   help="a DeepSpeed JSON config (e.g. deepspeed_configs/*.json): its optimizer, scheduler, "
                        "gradient_mix, batch and ZeRO settings become the defaults of the corresponding flags "
                        "(flags given on the command line win); its other keys go to DeepSpeed as they are "
                        "(docs/training.md, \"DeepSpeed\")")
    # the deepspeed launcher passes --local_rank=N to the script
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, world_size: int | None = None) -> None:
    """Cross-flag checks; ``p.error`` (exit 2, message naming the flag) on the first problem.
    ``world_size``: checked against the batch layout when known (it is, except in ``--help`` paths)."""
    from lb_dist.models import MODEL_NAMES, cifar_resnet_depth

    if args.model not in MODEL_NAMES and cifar_resnet_depth(args.model) is None:
        p.error(f"argument --model: invalid choice {args.model!r} (choose from {', '.join(MODEL_NAMES)}, or "
                f"resnetD for any CIFAR ResNet depth D = 6n+2)")
    seq2seq = args.model.startswith("transformer")
    if seq2seq != (args.dataset == "multi30k"):
        p.error(f"argument --model: {args.model!r} does not fit --dataset {args.dataset!r} "
                f"(the Transformers train on multi30k, the image models on image datasets)")
    if args.dataset != "synthetic" and args.data_dir is None:
        p.error(f"argument --data-dir: required with --dataset {args.dataset}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        p.error(f"argument --data-dir: {args.data_dir!r} is not a directory")
    if args.num_classes is not None and args.dataset != "synthetic":
        p.error(f"argument --num-classes: only for --dataset synthetic (the {args.dataset} classes are fixed)")
    if args.image_size is not None and args.dataset in ("cifar10", "cifar100", "multi30k"):
        p.error(f"argument --image-size: not used by --dataset {args.dataset}")
    if args.val and args.dataset != "multi30k":
        p.error(f"argument --val: only for --dataset multi30k (the {args.dataset} workload has no validation split)")
    if args.num_classes is not None and args.num_classes < 2:
        p.error(f"argument --num-classes: a classifier needs at least 2 classes, got {args.num_classes}")
    for flag, seed in (("--seed", args.seed), ("--mix-seed", args.mix_seed)):
        if seed is not None and not 0 <= seed < 2 ** 63:
            p.error(f"argument {flag}: must be in [0, 2**63) (a 64-bit seed), got {seed}")
    try:
        _check_model_options(args.model, parse_model_options(args.model_option))
    except (ValueError, TypeError) as e:
        p.error(f"argument --model-option: {e}")

    # learning rate
    if (args.lr is None) == (args.base_lr is None):
        p.error("argument --lr: give exactly one of --lr and --base-lr (with --base-batch-size)")
    if (args.base_lr is None) != (args.base_batch_size is None):
        p.error("argument --base-batch-size: --base-lr and --base-batch-size go together")
    if not 0 <= args.momentum < 1:
        p.error(f"argument --momentum: must be in [0, 1), got {args.momentum}")
    if args.optimizer == "nesterov" and args.momentum == 0:
        p.error("argument --momentum: nesterov needs a momentum > 0")
    if args.eta is not None and args.optimizer not in ("lars", "clars"):
        p.error(f"argument --eta: only for --optimizer lars/clars, not {args.optimizer}")
    if args.betas is not None:
        if args.optimizer not in ("adam", "adamw", "lamb"):
            p.error(f"argument --betas: only for --optimizer adam/adamw/lamb, not {args.optimizer}")
        if not all(0 <= b < 1 for b in args.betas):
            p.error(f"argument --betas: both must be in [0, 1), got {args.betas}")
    if args.eps is not None and args.optimizer not in ("adam", "adamw", "lamb"):
        p.error(f"argument --eps: only for --optimizer adam/adamw/lamb, not {args.optimizer}")
    if not 0 <= args.moments_ema < 1:
        p.error(f"argument --moments-ema: must be in [0, 1), got {args.moments_ema}")
    if args.label_smoothing >= 1:
        p.error(f"argument --label-smoothing: must be < 1, got {args.label_smoothing}")

    # schedule
    # (inverse-sqrt without warmup is allowed: peak / sqrt(t + 1))
    if args.warmup_base_batch_size is not None and args.warmup_steps is None:
        p.error("argument --warmup-base-batch-size: scales --warmup-steps; give --warmup-steps too")
    poly_only = [("--warmup-power", args.warmup_power != 1.0), ("--decay-power", args.decay_power != 2.0),
                 ("--lr-init-factor", args.lr_init_factor != 0.0), ("--lr-final-factor", args.lr_final_factor != 0.0)]
    for flag, given in poly_only:
        if given and args.schedule != "poly":
            p.error(f"argument {flag}: only for --schedule poly")

    # mixing
    if args.mix == "none":
        for flag, value in (("--mix-std", args.mix_std), ("--mix-seed", args.mix_seed)):
            if value is not None:
                p.error(f"argument {flag}: given without --mix device or --mix sample")

    if args.keep_checkpoints < 1:  # pragma: no cover - type checks it
        p.error("argument --keep-checkpoints: must be >= 1")
    if args.stop_after_steps is not None and args.resume == "never":
        p.error("argument --stop-after-steps: a stopped run continues by resuming; it cannot go with --resume never")

    deepspeed_only = [flag for flag, value in (("--zero-stage", args.zero_stage), ("--bf16", args.bf16),
                                               ("--deepspeed-config", args.deepspeed_config)) if value is not None]
    if deepspeed_only and args.backend not in ("auto", "deepspeed"):
        p.error(f"argument {deepspeed_only[0]}: only for --backend deepspeed, not {args.backend}")

    if world_size is not None:
        check_layout(p, args, world_size)


def explicit_flags(argv, prog: str = "lb-dist train") -> set[str]:
    """The destinations of the flags given explicitly in ``argv`` (not left at their defaults)."""
    p = build_parser(prog)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def check_layout(p: argparse.ArgumentParser, args: argparse.Namespace, world_size: int) -> None:
    """The checks that need the number of processes."""
    per_step = world_size * args.accumulation_steps
    if args.batch_size % per_step:
        p.error(f"argument --batch-size: {args.batch_size} is not divisible by world size x --accumulation-steps = "
                f"{world_size} x {args.accumulation_steps}")
    if args.mix == "device" and world_size < 2:
        p.error("argument --mix: device-wise GradientMix mixes the gradients of data-parallel workers and this run "
                "has 1 process; use --mix sample, or start >= 2 processes (torchrun --nproc_per_node N)")
    if args.optimizer == "clars" and args.clars_moments == "micro-batch" and world_size * args.accumulation_steps < 2:
        p.error("argument --clars-moments: the micro-batch estimator needs >= 2 micro-batches per step (world size x "
                "--accumulation-steps); with 1 process give --accumulation-steps >= 2 or --clars-moments per-sample")
    if args.optimizer == "clars" and args.clars_moments == "training-pass" and args.mix == "device":
        p.error("argument --clars-moments: training-pass measures the per-sample gradients of the unmixed "
                "average, and --mix device mixes the ranks' gradients; use --mix sample or another source")
    if args.optimizer == "clars" and args.clars_moments == "per-sample":
        if args.model.startswith("transformer"):
            p.error("argument --clars-moments: per-sample is implemented for the image models; use micro-batch "
                    "with the Transformers")
        if args.per_sample_subset < world_size:
            p.error(f"argument --per-sample-subset: {args.per_sample_subset} is smaller than the world size "
                    f"{world_size}")


def parse_args(argv=None, world_size: int | None = None, prog: str = "lb-dist train") -> argparse.Namespace:
    """Parse and check the flags. With ``--deepspeed-config FILE``, the file's settings fill the flags
    that were not given explicitly (``lb_dist.train.deepspeed_flags``) before the checks."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.deepspeed_config is not None:
        if args.backend not in ("auto", "deepspeed"):
            p.error(f"argument --deepspeed-config: only for --backend deepspeed, not {args.backend}")
        from lb_dist.train.deepspeed_flags import apply_deepspeed_config
        args.deepspeed_file = apply_deepspeed_config(p, args, explicit_flags(argv, prog))
    else:
        args.deepspeed_file = None
    check_args(p, args, world_size)
    args.parser = p  # for later errors that need the environment (an attachment: not saved)
    return args


#: Objects :func:`parse_args` attaches to the namespace next to the flags (not flags: never saved):
#: ``parser`` (argparse-style errors found later, e.g. against the world size) and ``deepspeed_file``
#: (a :class:`lb_dist.train.deepspeed_flags.DeepSpeedFile`, or None).
ATTACHMENTS = ("parser", "deepspeed_file")


def to_dict(args: argparse.Namespace) -> dict:
    """The flags as a JSON-able dict (what config.json and the checkpoints hold)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if not k.startswith("_") and k not in ATTACHMENTS}
