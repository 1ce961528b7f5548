"""``lb-dist reproduce EXPERIMENT --scale {smoke,cpu,paper} --seeds N --out DIR``: the papers' claims
as named experiments, each a set of ordinary ``lb-dist train`` runs, then aggregated over seeds.

An experiment is data (:data:`EXPERIMENTS`): per scale, the flags every run shares, and a list of
configurations (name, extra flags, a learning-rate sweep, the number of processes). The protocol:

1. **Sweep**: every rate of a configuration's sweep is trained with the first seed.
2. **Selection**: the rate with the lowest final validation loss (``val_loss`` of the last epoch;
   ``test_loss`` where the workload has no validation split) is the configuration's rate.
3. **Seeds**: the selected rate is trained with the other seeds (the sweep's run is seed 0's).
4. **Aggregation**: per configuration, mean and sample standard deviation (``ddof = 1``) over seeds
   of every metric (:func:`aggregate`), written to ``OUT/results.json`` and ``OUT/results.md``, with
   the sweep it selected from; figures ``OUT/val_loss.png`` and ``OUT/train_loss.png`` (mean over
   seeds, band = mean +- one standard deviation).

Every run lives in ``OUT/runs/CONFIG/lr-LR/seed-S`` and is an ordinary run directory: rerunning the
command skips the runs whose last epoch is recorded and resumes the others from their checkpoints.
docs/results.md has the results of ``--scale cpu`` and the reading of them.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EXPERIMENTS", "Config", "Scale", "aggregate", "mean_std", "run_metrics", "main"]

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = REPO / "deepspeed_configs"


@dataclass(frozen=True)
class Config:
    """One configuration: ``flags`` added to the scale's common flags, trained at every rate of
    ``lrs`` (``(None,)``: the rate of the flags / the DeepSpeed config file) with ``nproc`` processes."""
    name: str
    flags: tuple = ()
    lrs: tuple = (None,)
    nproc: int = 1


@dataclass(frozen=True)
class Scale:
    common: tuple
    configs: tuple
    dataset: str = "multi30k"           # subdirectory of --data-dir that must exist
    launcher: str = "python"            # python (one process; torchrun when nproc > 1) or deepspeed
    gpus: int = 0                       # GPUs the scale needs (refused when fewer are visible)
    loss_threshold: float | None = None  # "steps to reach": the first epoch end with val loss <= this
    train_threshold: float | None = None  # the first step whose training loss (running mean of 5 records) <= this
    notes: str = ""


def _ds(name: str) -> tuple:
    path = DS_CONFIGS / name
    return ("--deepspeed-config", str(path))


# ---- the Transformer on Multi30k at CPU scale (sized by measurement: docs/results.md)
_CPU_T = ("--model", "transformer_small", "--model-option", "d_model=64", "--model-option", "ffn_dim=256",
          "--dataset", "multi30k", "--max-length", "32", "--vocab-size", "2000", "--val",
          "--schedule", "poly", "--decay-power", "1", "--layer-stats-every", "0", "--log-every", "2")
_CPU_WARMUP = _CPU_T + ("--train-size", "14500", "--batch-size", "256", "--epochs", "2")
_SMOKE_T = ("--model", "transformer_small", "--model-option", "d_model=16", "--model-option", "ffn_dim=32",
            "--model-option", "encoder_layers=1", "--model-option", "decoder_layers=1",
            "--model-option", "attention_heads=2", "--dataset", "multi30k", "--max-length", "16",
            "--vocab-size", "60", "--val", "--schedule", "poly", "--decay-power", "1", "--epochs", "2",
            "--batch-size", "16", "--layer-stats-every", "0")

_W = ("--warmup-epochs", "0.5")        # "usual warmup" at CPU scale: the first quarter of the 2 epochs
_CLARS = ("--optimizer", "clars", "--accumulation-steps", "4")   # micro-batch S_k from 4 micro-batches

EXPERIMENTS: dict[str, dict[str, Scale]] = {
    "warmup": {
        "smoke": Scale(common=_SMOKE_T, loss_threshold=4.0, train_threshold=4.0, configs=(
            Config("adam-warmup", ("--optimizer", "adam", "--warmup-epochs", "1"), (3e-3, 1e-2)),
            Config("adam-nowarmup", ("--optimizer", "adam"), (1e-2,)),
            Config("clars-nowarmup", ("--optimizer", "clars", "--accumulation-steps", "2"), (1.0,)),
        )),
        "cpu": Scale(common=_CPU_WARMUP, loss_threshold=5.0, train_threshold=5.5, configs=(
            Config("adam-warmup", ("--optimizer", "adam") + _W, (6e-3, 3e-3, 1.2e-2, 2.4e-2)),
            Config("adam-nowarmup", ("--optimizer", "adam"), (6e-3, 3e-3, 1.2e-2, 2.4e-2)),
            Config("lamb-warmup", ("--optimizer", "lamb") + _W, (2e-2, 5e-2, 0.1, 0.2)),
            Config("lamb-nowarmup", ("--optimizer", "lamb"), (2e-2, 5e-2, 0.1, 0.2)),
            Config("clars-nowarmup", _CLARS, (1.0, 3.0, 10.0, 30.0)),
        )),
        # CLARS paper section 5: CIFAR-10 at B = 8192 for 20 epochs, LARS with 5/10/20 warmup epochs vs
        # CLARS without; the settings are deepspeed_configs/clars_resnet56_cifar10_b8192.json (the LARS
        # runs override its optimizer as horovod_examples/resnet56_cifar10_lars_warmup.sh does).
        "paper": Scale(common=("--dataset", "cifar10", "--epochs", "20") + _ds("clars_resnet56_cifar10_b8192.json"),
                       dataset="cifar10", launcher="deepspeed", gpus=8, configs=tuple(
            [Config(f"{m}-lars-warmup{w}", ("--model", m, "--optimizer", "lars", "--eta", "0.001",
                                            "--schedule", "poly", "--warmup-epochs", str(w)))
             for m in ("resnet56", "vgg11_bn") for w in (5, 10, 20)]
            + [Config(f"{m}-clars", ("--model", m)) for m in ("resnet56", "vgg11_bn")]),
            notes="ImageNet (B = 16384, 90 epochs): experiment warmup-imagenet"),
    },
    # the same comparison at 4 times the batch (B = 1024 on all 29,000 pairs, 4 epochs: 113 steps, the step count of
    # `warmup`'s cpu scale), where "the usual warmup" is expected to matter: rates scaled by sqrt(4) from `warmup`'s
    # selections, listed best guess first (--sweep-limit runs the first ones)
    "warmup-large": {
        "cpu": Scale(common=_CPU_T + ("--train-size", "29000", "--batch-size", "1024", "--epochs", "4"),
                     loss_threshold=5.0, train_threshold=5.5, configs=(
            Config("adam-warmup", ("--optimizer", "adam", "--warmup-epochs", "1"), (2.4e-2, 1.2e-2, 6e-3)),
            Config("adam-nowarmup", ("--optimizer", "adam"), (1.2e-2, 2.4e-2, 6e-3)),
            Config("lamb-warmup", ("--optimizer", "lamb", "--warmup-epochs", "1"), (0.1, 0.2, 0.05)),
            Config("lamb-nowarmup", ("--optimizer", "lamb"), (0.2, 0.1, 0.05)),
            Config("clars-nowarmup", _CLARS, (3.0, 1.0, 10.0)),
        )),
    },
    "warmup-imagenet": {
        "paper": Scale(common=("--model", "resnet50", "--dataset", "imagenet", "--epochs", "90"),
                       dataset="imagenet", launcher="deepspeed", gpus=8, configs=(
            Config("lars-warmup5", _ds("lars_resnet50_imagenet_b16384.json")),
            Config("clars", _ds("clars_resnet50_imagenet_b16384.json")),
        )),
    },
    "gradientmix": {
        "smoke": Scale(common=_SMOKE_T, loss_threshold=4.0, configs=(
            Config("adam", ("--optimizer", "adam", "--warmup-epochs", "1"), (1e-2,)),
            Config("adam-device0.5", ("--optimizer", "adam", "--warmup-epochs", "1", "--mix", "device",
                                      "--mix-std", "0.5"), (1e-2,), nproc=2),
            Config("adam-sample0.5", ("--optimizer", "adam", "--warmup-epochs", "1", "--mix", "sample",
                                      "--mix-std", "0.5"), (1e-2,)),
        )),
        # the best baseline of `warmup` at CPU scale (Adam with warmup), +- mixing, std swept, at the warmup
        # experiment's B = 256 and at B = 64; the rate is the warmup experiment's selection at 256 and
        # 1/sqrt(4) of it at 64 (no second sweep).
        "cpu": Scale(common=_CPU_T + ("--train-size", "14500", "--epochs", "2", "--optimizer", "adam") + _W,
                     loss_threshold=5.0, train_threshold=5.5, configs=tuple(
            [Config(f"b{b}-none", ("--batch-size", str(b)), (lr,)) for b, lr in ((256, 6e-3), (64, 3e-3))]
            + [Config(f"b{b}-{g}{s}", ("--batch-size", str(b), "--mix", g, "--mix-std", str(s)), (lr,),
                      nproc=2 if g == "device" else 1)
               for b, lr in ((256, 6e-3), (64, 3e-3)) for g in ("sample", "device") for s in (0.25, 0.5, 1.0)])),
        # GradientMix Table 3 (ResNet-50, ImageNet, 32K) and its Transformer-base Multi30k runs
        "paper": Scale(common=(), dataset="imagenet", launcher="deepspeed", gpus=8, configs=tuple(
            [Config(f"resnet50-{o}{'-mix' if mix else ''}",
                    ("--model", "resnet50", "--dataset", "imagenet", "--epochs", "90", "--label-smoothing", "0.1")
                    + _ds(f"gradientmix_{o}_resnet50_imagenet_b32k.json") + (() if mix else ("--mix", "none")))
             for o in ("nesterov", "lars") for mix in (False, True)]),
            notes="Transformer base on Multi30k: experiment gradientmix-multi30k"),
    },
    "gradientmix-multi30k": {
        "paper": Scale(common=("--model", "transformer_base", "--dataset", "multi30k", "--epochs", "100", "--val"),
                       dataset="multi30k", launcher="deepspeed", gpus=8, configs=tuple(
            Config(f"{o}{'-mix' if mix else ''}",
                   _ds(f"gradientmix_{o}_transformer_multi30k_b1024.json") + (() if mix else ("--mix", "none")))
            for o in ("adam", "lamb") for mix in (False, True))),
    },
}
SCALES = ("smoke", "cpu", "paper")


# ---------------------------------------------------------------------------------------------- runs
def _fmt_lr(lr) -> str:
    return "config" if lr is None else f"{lr:g}"


def run_dir(out: Path, config: Config, lr, seed: int) -> Path:
    return out / "runs" / config.name / f"lr-{_fmt_lr(lr)}" / f"seed-{seed}"


def _epochs(scale: Scale, config: Config) -> int:
    flags = list(scale.common) + list(config.flags)
    return int(flags[len(flags) - 1 - flags[::-1].index("--epochs") + 1]) if "--epochs" in flags else 1


def _records(d: Path) -> list[dict]:
    from lb_dist.train.metrics import read_metrics
    path = d / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def is_finished(d: Path, epochs: int) -> bool:
    """The run's last epoch is recorded in its ``metrics.jsonl``."""
    return any(r.get("kind") == "epoch" and r.get("epoch") == epochs - 1 for r in _records(d))


def train_command(scale: Scale, config: Config, lr, seed: int, d: Path, data_root: Path,
                  threads: int | None) -> list[str]:
    """The ``lb-dist train`` command line of one run (under torchrun / deepspeed with several processes)."""
    flags = list(scale.common) + list(config.flags)
    if "--dataset" in flags and scale.dataset:
        ds = flags[flags.index("--dataset") + 1]
        flags += ["--data-dir", str(data_root / ds)]
    if lr is not None:
        flags += ["--lr", repr(lr)]
    flags += ["--seed", str(seed), "--run-dir", str(d), "--no-progress", "--tensorboard", "off"]
    if threads:
        flags += ["--num-threads", str(threads)]
    if scale.launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(scale.gpus), "--module", "lb_dist.train", *flags]
    if config.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(config.nproc),
                "--master_port", str(29500 + (hash((config.name, lr, seed)) % 2000)), "-m", "lb_dist.train", *flags]
    return [sys.executable, "-m", "lb_dist.train", *flags]


def check_inputs(experiment: str, scale_name: str, data_root: Path) -> Scale:
    """The scale of the experiment, after checking that its data (and GPUs) are there; ``SystemExit``
    with a message naming what is missing otherwise, before any run starts."""
    if experiment not in EXPERIMENTS:
        raise SystemExit(f"lb-dist reproduce: error: unknown experiment {experiment!r} "
                         f"(choose from {', '.join(EXPERIMENTS)})")
    scales = EXPERIMENTS[experiment]
    if scale_name not in scales:
        raise SystemExit(f"lb-dist reproduce: error: experiment {experiment!r} has no --scale {scale_name} "
                         f"(it has {', '.join(scales)})")
    scale = scales[scale_name]
    needed = {scale.dataset} | {c.flags[c.flags.index("--dataset") + 1] for c in scale.configs if "--dataset" in c.flags}
    for ds in sorted(needed):
        path = data_root / ds
        if not path.is_dir() or not any(path.iterdir()):
            raise SystemExit(f"lb-dist reproduce: error: --data-dir {data_root}: the {ds} dataset is missing "
                             f"(expected the directory {path}; the experiment {experiment!r} at --scale {scale_name} "
                             f"trains on {ds})")
    if scale.gpus:
        import torch
        have = torch.cuda.device_count()
        if have < scale.gpus:
            raise SystemExit(f"lb-dist reproduce: error: --scale {scale_name} of {experiment!r} needs {scale.gpus} GPUs "
                             f"(the papers' settings); {have} visible")
    return scale


_CHILDREN: set = set()   # the lb-dist train processes running now (ended on SIGTERM/SIGINT, see main)


def _run(cmd: list[str], d: Path, log) -> int:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "train.log", "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        t = time.time()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _CHILDREN.add(proc)
        try:
            rc = proc.wait()
        finally:
            _CHILDREN.discard(proc)
    log(f"{'done' if rc == 0 else f'FAILED (exit {rc}, see {d}/train.log)'} in {time.time() - t:.0f} s: {d}")
    return rc


def final_metric(d: Path, key: str):
    ep = [r for r in _records(d) if r.get("kind") == "epoch"]
    return ep[-1].get(key) if ep else None


def _selection_key(d: Path):
    v = final_metric(d, "val_loss")
    v = final_metric(d, "test_loss") if v is None else v
    return math.inf if v is None or not math.isfinite(v) else v


def _limit_sweep(scale: Scale, sweep_limit: int | None, only=None) -> Scale:
    """The scale with the first ``sweep_limit`` rates of each sweep, and only the configurations named
    in ``only`` (``SystemExit`` naming an unknown one)."""
    configs = scale.configs
    if only:
        names = [c.name for c in configs]
        for name in only:
            if name not in names:
                raise SystemExit(f"lb-dist reproduce: error: argument --only: no configuration {name!r} "
                                 f"(this scale has {', '.join(names)})")
        configs = tuple(c for c in configs if c.name in only)
    if sweep_limit:
        configs = tuple(Config(c.name, c.flags, c.lrs[:sweep_limit], c.nproc) for c in configs)
    return Scale(**{**scale.__dict__, "configs": configs})


def run_experiment(experiment: str, scale_name: str, seeds: int, out: Path, data_root: Path, jobs: int = 1,
                   threads: int | None = 1, dry_run: bool = False, log=print, sweep_limit: int | None = None,
                   only=None) -> dict:
    """Sweep, select, train the seeds (skipping finished runs), aggregate. Returns the results dict.
    ``sweep_limit``: only the first rates of every sweep (a reduced sweep; the others are not run)."""
    scale = _limit_sweep(check_inputs(experiment, scale_name, data_root), sweep_limit, only)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []

    def execute(tasks):
        todo = []
        for config, lr, seed in tasks:
            d = run_dir(out, config, lr, seed)
            if is_finished(d, _epochs(scale, config)):
                continue
            todo.append((config, d, train_command(scale, config, lr, seed, d, data_root, threads)))
        for _, d, cmd in todo:
            log(("would run: " if dry_run else "run: ") + shlex.join(cmd))
        if dry_run or not todo:
            return
        # a run with P processes takes P of the --jobs slots: several-process runs go one at a time
        single = [t for t in todo if t[0].nproc <= 1 or jobs <= 1]
        multi = [t for t in todo if t not in single]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for (_, d, cmd), rc in zip(single, pool.map(lambda t: _run(t[2], t[1], log), single)):
                if rc:
                    failed.append(str(d))
        for _, d, cmd in multi:
            if _run(cmd, d, log):
                failed.append(str(d))

    seed_list = list(range(seeds))
    single_rate = all(len(c.lrs) == 1 for c in scale.configs)
    if single_rate:                                    # nothing to select: every run at once (no idle slot)
        execute([(c, c.lrs[0], s) for s in seed_list for c in scale.configs])
    else:
        execute([(c, lr, seed_list[0]) for c in scale.configs for lr in c.lrs])        # 1. sweep
    selected = {}
    for c in scale.configs:                                                            # 2. selection
        scores = {lr: _selection_key(run_dir(out, c, lr, seed_list[0])) for lr in c.lrs}
        selected[c.name] = min(c.lrs, key=lambda lr: (scores[lr], c.lrs.index(lr)))
    if not single_rate:
        execute([(c, selected[c.name], s) for c in scale.configs for s in seed_list[1:]])   # 3. seeds
    if dry_run:
        return {}
    results = aggregate(out, scale, selected, seed_list)                               # 4. aggregation
    results.update(experiment=experiment, scale=scale_name, failed_runs=failed, sweep_limit=sweep_limit, only=only)
    write_results(out, results)
    plot_results(out, results)
    if failed:
        log(f"{len(failed)} run(s) failed: " + ", ".join(failed))
    return results


# ---------------------------------------------------------------------------------------- aggregation
def mean_std(values) -> dict:
    """``{"mean", "std", "n"}`` of the finite values (sample standard deviation, ``ddof = 1``; ``None``
    with fewer than 2 values)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if not n:
        return {"mean": None, "std": None, "n": 0}
    m = sum(xs) / n
    std = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": m, "std": std, "n": n}


def _running_mean(xs: list[float], window: int = 5) -> list[float]:
    return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]


def run_metrics(records: list[dict], loss_threshold: float | None = None,
                train_threshold: float | None = None) -> dict:
    """The per-run metrics the tables report, from one run's ``metrics.jsonl`` records."""
    epochs = sorted((r for r in records if r.get("kind") == "epoch"), key=lambda r: r["step"])
    steps = sorted((r for r in records if r.get("kind") == "step"), key=lambda r: r["step"])
    val_key = "val_loss" if any(r.get("val_loss") is not None for r in epochs) else "test_loss"
    last = epochs[-1] if epochs else {}
    out = {
        "val_loss_per_epoch": [r.get(val_key) for r in epochs],
        "train_loss_per_epoch": [r.get("train_loss") for r in epochs],
        "final_val_loss": last.get(val_key),
        "final_train_loss": last.get("train_loss"),
        "final_test_loss": last.get("test_loss"),
        "final_bleu": last.get("test_bleu"),
        "final_top1": last.get("test_top1"),
        "generalization_gap": (last[val_key] - last["train_loss"])
        if last.get(val_key) is not None and last.get("train_loss") is not None else None,
        "steps_to_threshold": None,
        "steps_to_train_threshold": None,
        "train_time_s": last.get("time"),
        "step_losses": [(r["step"], r.get("loss")) for r in steps],
    }
    if loss_threshold is not None:
        out["steps_to_threshold"] = next((r["step"] for r in epochs if r.get(val_key) is not None
                                          and r[val_key] <= loss_threshold), None)
    if train_threshold is not None:
        pairs = [(r["step"], r["loss"]) for r in steps if r.get("loss") is not None]
        smooth = _running_mean([x for _, x in pairs])
        out["steps_to_train_threshold"] = next((s for (s, _), x in zip(pairs, smooth) if x <= train_threshold), None)
    return out


SCALAR_METRICS = ("final_val_loss", "final_bleu", "final_top1", "generalization_gap", "final_train_loss",
                  "steps_to_threshold", "steps_to_train_threshold", "train_time_s")


def aggregate(out: Path, scale: Scale, selected: dict, seeds: list[int]) -> dict:
    """Mean +- sample std over seeds of every metric of every configuration at its selected rate; the
    sweep (seed 0's final selection loss per rate); the number of seeds that reached the threshold."""
    configs = []
    for c in scale.configs:
        lr = selected[c.name]
        per_seed = {}
        for s in seeds:
            d = run_dir(out, c, lr, s)
            if is_finished(d, _epochs(scale, c)):            # unfinished runs are not aggregated
                per_seed[s] = run_metrics(_records(d), scale.loss_threshold, scale.train_threshold)
        entry = {"name": c.name, "flags": list(c.flags), "nproc": c.nproc, "selected_lr": lr,
                 "sweep": {_fmt_lr(x): _nan_to_none(_selection_key(run_dir(out, c, x, seeds[0]))) for x in c.lrs},
                 "seeds": sorted(per_seed), "metrics": {}}
        for key in SCALAR_METRICS:
            entry["metrics"][key] = mean_std([m[key] for m in per_seed.values()])
        for key in ("steps_to_threshold", "steps_to_train_threshold"):
            entry["metrics"][key]["reached"] = sum(m[key] is not None for m in per_seed.values())
        n_ep = max((len(m["val_loss_per_epoch"]) for m in per_seed.values()), default=0)
        entry["metrics"]["val_loss_per_epoch"] = [
            mean_std([m["val_loss_per_epoch"][e] for m in per_seed.values() if len(m["val_loss_per_epoch"]) > e])
            for e in range(n_ep)]
        entry["per_seed"] = {str(s): {k: v for k, v in m.items() if k != "step_losses"} for s, m in per_seed.items()}
        entry["_step_losses"] = {str(s): m["step_losses"] for s, m in per_seed.items()}
        configs.append(entry)
    return {"loss_threshold": scale.loss_threshold, "train_threshold": scale.train_threshold, "common_flags": list(scale.common), "configs": configs}


def _nan_to_none(v):
    return None if v is None or not math.isfinite(v) else v


def _pm(ms: dict, digits: int = 3) -> str:
    if ms is None or ms.get("mean") is None:
        return "-"
    if ms.get("std") is None:
        return f"{ms['mean']:.{digits}f} (n={ms['n']})"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def results_markdown(results: dict) -> str:
    lines = [f"### {results.get('experiment', '')} (scale {results.get('scale', '')})", "",
             "mean ± sample standard deviation over seeds, at the rate selected on the final validation loss", "",
             "| configuration | rate (sweep: final val loss of seed 0) | seeds | final val loss | BLEU test_2016 | "
             f"gap val−train | steps to val loss ≤ {results.get('loss_threshold')} (epoch ends) | steps to train loss "
             f"≤ {results.get('train_threshold')} | val loss per epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in results["configs"]:
        m = c["metrics"]
        sweep = ", ".join(f"{lr}: {'-' if v is None else f'{v:.3f}'}" for lr, v in c["sweep"].items())
        steps, tsteps = (_pm(m[k], 0) + f" ({m[k].get('reached', 0)}/{len(c['seeds'])} reached)"
                         for k in ("steps_to_threshold", "steps_to_train_threshold"))
        per_epoch = " / ".join(_pm(x, 3) for x in m["val_loss_per_epoch"])
        bleu = _pm(m["final_bleu"], 2) if m["final_bleu"]["n"] else _pm(m["final_top1"], 4)
        lines.append(f"| {c['name']} | **{_fmt_lr(c['selected_lr'])}** ({sweep}) | {len(c['seeds'])} | "
                     f"{_pm(m['final_val_loss'])} | {bleu} | {_pm(m['generalization_gap'])} | {steps} | {tsteps} | {per_epoch} |")
    if results.get("failed_runs"):
        lines += ["", "Failed runs: " + ", ".join(results["failed_runs"])]
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict) -> None:
    from lb_dist._io import atomic_write_text
    public = {**results, "configs": [{k: v for k, v in c.items() if not k.startswith("_")} for c in results["configs"]]}
    atomic_write_text(out / "results.json", json.dumps(public, indent=1) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))


def _plot_band(ax, xs, mean, sd, **line) -> None:
    """A mean curve with a band of one standard deviation in its colour."""
    drawn, = ax.plot(xs, mean, **line)
    ax.fill_between(xs, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)],
                    color=drawn.get_color(), alpha=0.2)


def _save_band_figure(plt, fig, ax, results: dict, path: Path, xlabel: str, ylabel: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{results.get('experiment')} ({results.get('scale')}): mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_results(out: Path, results: dict) -> list[Path]:
    """``val_loss.png`` (per epoch) and ``train_loss.png`` (per step, running mean over 5 records):
    mean over seeds, band = mean ± one sample standard deviation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in results["configs"]:
        ms = c["metrics"]["val_loss_per_epoch"]
        xs = [i + 1 for i, m in enumerate(ms) if m["mean"] is not None]
        mean = [m["mean"] for m in ms if m["mean"] is not None]
        sd = [m["std"] or 0.0 for m in ms if m["mean"] is not None]
        if not xs:
            continue
        _plot_band(ax, xs, mean, sd, label=f"{c['name']} (lr {_fmt_lr(c['selected_lr'])})", marker="o")
    paths.append(_save_band_figure(plt, fig, ax, results, out / "val_loss.png", "epoch", "validation loss"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in results["configs"]:
        runs = [dict((s, l) for s, l in v if l is not None) for v in c.get("_step_losses", {}).values()]
        common = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
        if not common:
            continue
        series = [[r[s] for s in common] for r in runs]
        smooth = [[sum(x[max(0, i - 4):i + 1]) / len(x[max(0, i - 4):i + 1]) for i in range(len(x))] for x in series]
        stats = [mean_std(col) for col in zip(*smooth)]
        mean = [m["mean"] for m in stats]
        sd = [m["std"] or 0.0 for m in stats]
        _plot_band(ax, common, mean, sd, label=c["name"])
    paths.append(_save_band_figure(plt, fig, ax, results, out / "train_loss.png", "optimizer step",
                                   "training loss (running mean of 5 records)"))
    return paths


# ------------------------------------------------------------------------------------------------ CLI
def build_parser(prog: str = "lb-dist reproduce") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run a named experiment of the papers as a set of lb-dist "
                                "train runs (lr sweep on seed 0, best rate on val loss, then the other seeds) and "
                                "aggregate it over seeds. Reference: docs/results.md.")
    p.add_argument("experiment", help=f"one of {', '.join(EXPERIMENTS)}")
    p.add_argument("--scale", choices=SCALES, default="cpu",
                   help="smoke: minutes, tiny model (tests); cpu: the Multi30k runs of docs/results.md; paper: the "
                        "papers' settings (deepspeed_configs/), needs the data and GPUs")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (the sweep uses seed 0)")
    p.add_argument("--out", required=True, help="output directory (runs/, results.json, results.md, figures)")
    p.add_argument("--data-dir", default=None,
                   help="directory holding one subdirectory per dataset (multi30k/, cifar10/, imagenet/); "
                        "default: ../shared/data next to the repository")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (a several-process run uses all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (--num-threads); 0: torch's")
    p.add_argument("--sweep-limit", type=int, default=None,
                   help="run only the first N rates of every configuration's sweep (a reduced sweep, for a budget)")
    p.add_argument("--only", default=None, help="comma-separated configuration names: run only these")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do")
    p.add_argument("--aggregate-only", action="store_true",
                   help="no training: aggregate the runs present (the selection uses the finished sweep runs)")
    return p


def _stop_children(signum, frame):
    """SIGTERM/SIGINT: end the running lb-dist train processes (they resume on the next invocation)."""
    for proc in list(_CHILDREN):
        proc.terminate()
    raise SystemExit(128 + signum)


def main(argv=None, prog: str = "lb-dist reproduce") -> int:
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_children)
        signal.signal(signal.SIGINT, _stop_children)
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"argument --seeds: expected a positive integer, got {args.seeds}")
    if args.jobs < 1:
        p.error(f"argument --jobs: expected a positive integer, got {args.jobs}")
    data_root = Path(args.data_dir) if args.data_dir else REPO.parent / "shared" / "data"
    out = Path(args.out)
    only = [x for x in args.only.split(",") if x] if args.only else None
    try:
        if args.aggregate_only:
            scale = _limit_sweep(check_inputs(args.experiment, args.scale, data_root), args.sweep_limit, only)
            seeds = list(range(args.seeds))
            selected = {c.name: min(c.lrs, key=lambda lr: (_selection_key(run_dir(out, c, lr, 0)), c.lrs.index(lr)))
                        for c in scale.configs}
            results = aggregate(out, scale, selected, seeds)
            results.update(experiment=args.experiment, scale=args.scale, failed_runs=[], sweep_limit=args.sweep_limit,
                           only=only)
            write_results(out, results)
            plot_results(out, results)
        else:
            results = run_experiment(args.experiment, args.scale, args.seeds, out, data_root, jobs=args.jobs,
                                     threads=args.threads or None, dry_run=args.dry_run, sweep_limit=args.sweep_limit,
                                     only=only,
                                     log=lambda m: print(f"[lb-dist reproduce] {m}", file=sys.stderr, flush=True))
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    if results:
        print(results_markdown(results), end="")
        return 1 if results.get("failed_runs") else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
