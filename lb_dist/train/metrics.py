"""Metrics: top-k counts for image classifiers, and the run's metrics file ``RUN_DIR/metrics.jsonl``.

``metrics.jsonl`` holds one JSON object per line, written by rank 0 only, flushed per line. Every
record has ``"kind"`` (``"step"`` or ``"epoch"``), ``"step"`` (optimizer steps done, counted from 1),
``"epoch"`` (0-based epoch the step belongs to) and ``"time"`` (seconds of training so far, summed
over resumed invocations). The fields of each kind are listed in :data:`STEP_FIELDS` and
:data:`EPOCH_FIELDS` (docs/training.md, "Metrics"). Non-finite numbers are written as ``null`` (JSON
has no inf/NaN). Per-layer values are objects keyed by the parameter's name in the model
(``model.named_parameters()``).

On resume the file is cut back to the records whose ``step`` is at most the checkpoint's step (so a
record is never duplicated by the steps replayed after a crash).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

__all__ = ["topk_correct", "MetricsLogger", "STEP_FIELDS", "EPOCH_FIELDS", "read_metrics", "finite_or_none"]

#: Fields of a ``"kind": "step"`` record (those marked optional appear when they apply).
STEP_FIELDS = {
    "kind": "'step'",
    "step": "optimizer steps done (1-based: the record of the first step has step 1)",
    "epoch": "0-based epoch of this step",
    "time": "training seconds so far (excluding evaluation), summed over resumed invocations",
    "lr": "learning rate of the first param group used by this step",
    "loss": "mean training loss of this step's global batch (unweighted by GradientMix; token mean for "
            "multi30k), all-reduced",
    "skipped": "true if the optimizer skipped the step (non-finite gradient)",
    "mix_noise_amount": "optional, device-wise GradientMix: gamma_t = K sum_k pi_k^2 of this step",
    "trust_ratio": "optional (every --layer-stats-every steps, LARS/CLARS/LAMB): {layer: trust ratio of this step}",
    "variance_factor": "optional (same steps, CLARS): {layer: M_k = S_k / ||G_k||^2} of the estimate used by "
                       "this step (micro-batch or per-sample)",
    "second_moment": "optional (same steps, CLARS): {layer: S_k} used by this step",
    "noise_scale": "optional (same steps, CLARS): {layer: B_simple = tr(Sigma_k) / ||G_k||^2} (McCandlish et al. "
                   "2018) from the same statistics",
    "noise_scale_global": "optional (same steps, CLARS): sum_k tr(Sigma_k) / sum_k ||G_k||^2 over the adapted "
                          "layers, the critical-batch-size estimate",
}

#: Fields of a ``"kind": "epoch"`` record.
EPOCH_FIELDS = {
    "kind": "'epoch'",
    "step": "optimizer steps done at the end of the epoch",
    "epoch": "0-based epoch",
    "time": "training seconds so far",
    "train_loss": "mean training loss over the epoch's samples (token mean for multi30k)",
    "test_loss": "mean loss on the test split",
    "test_top1": "images: top-1 accuracy on the test split",
    "test_top5": "images: top-5 accuracy on the test split (top-k with k = number of classes if fewer than 5)",
    "test_token_accuracy": "multi30k: teacher-forced next-token accuracy on the test split",
    "test_bleu": "multi30k: sacrebleu corpus BLEU of greedy translations of the test split",
    "eval_time": "seconds of this evaluation",
    "samples_per_s": "training samples per second over the epoch, all processes together",
    "skipped_steps": "optimizer steps skipped so far (non-finite gradients)",
}


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """``{k: number of samples whose target is among the k largest logits}`` (k capped at the number
    of classes)."""
    if logits.dim() != 2 or targets.dim() != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits must be [N, C] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax], sorted
    hit = top.eq(targets.unsqueeze(1))
    return {k: int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks}


def finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a crash mid-write, is ignored)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class MetricsLogger:
    """Writes records to ``metrics.jsonl`` (and TensorBoard) on the main process; no-op elsewhere."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int | None, tensorboard: str = "auto"):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        if resume_step is None:
            self._file = open(self.path, "w", encoding="utf-8")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if self.path.exists() else []
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard == "on":
                    from lb_dist.data.imagenet import MissingDependencyError
                    raise MissingDependencyError("--tensorboard on: the tensorboard package is not installed "
                                                 "(pip install tensorboard)") from None
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = finite_or_none(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = "train" if record["kind"] == "step" else "epoch"
            for key, value in record.items():
                if key in ("kind", "step", "epoch", "time"):
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
                elif isinstance(value, dict):
                    for layer, v in value.items():
                        if v is not None:
                            self._tb.add_scalar(f"{key}/{layer}", v, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
