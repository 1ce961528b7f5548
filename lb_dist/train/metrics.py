"""Metrics: top-k counts for image classifiers, and the run's metrics file ``RUN_DIR/metrics.jsonl``.

``metrics.jsonl`` holds one JSON object per line, written by rank 0 only, flushed per line. Every
record has ``"kind"`` (``"step"`` or ``"epoch"``), ``"step"`` (optimizer steps done, counted from 1),
``"epoch"`` (0-based epoch the step belongs to) and ``"time"`` (seconds of training so far, summed
over resumed invocations). The fields of each kind are listed in :data:`STEP_FIELDS` and
:data:`EPOCH_FIELDS` (docs/training.md, "Metrics"). Non-finite numbers are written as ``null`` (JSON
has no inf/NaN). Per-layer values are objects keyed by the parameter's name in the model
(``model.named_parameters()``).

On resume the file is cut back to the records whose ``step`` is at most the checkpoint's step (so a
record is never duplicated by the steps replayed after a crash). Nothing is lost doing so: the file
is replaced atomically, and every line taken out (records of the replayed steps, and lines that do
not parse, such as a line torn by a kill mid-write) is appended to ``metrics.discarded.jsonl`` next
to it, with a warning for unparsable lines that are not a torn last line.
"""
from __future__ import annotations

import json
import math
import os
import warnings
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
    "val_loss": "multi30k with --val: token-mean loss on the validation split (teacher forced)",
    "val_token_accuracy": "multi30k with --val: next-token accuracy on the validation split",
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


def _parse_lines(path) -> tuple[list[tuple[str, dict]], list[tuple[int, str]], bool]:
    """``([(line, record)], [(line number, unparsable line)], last line torn)`` of a metrics file."""
    good, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    torn = bool(lines and lines[-1].strip())          # no newline after the last line: a torn write
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append((number, raw))
            continue
        if not isinstance(record, dict):
            bad.append((number, raw))
            continue
        good.append((raw, record))
    return good, bad, torn


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``. A line that does not parse is skipped (a torn last line,
    from a crash mid-write, silently; any other with a warning naming the file and line)."""
    good, bad, torn = _parse_lines(path)
    last = max((n for n, _ in bad), default=0)
    for number, _ in bad:
        if not (torn and number == last):
            warnings.warn(f"{path}: line {number} is not a JSON record; skipped", RuntimeWarning, stacklevel=2)
    return [r for _, r in good]


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
            if self.path.exists() and self.path.stat().st_size > 0:
                self._set_aside(self.path.read_text(encoding="utf-8", errors="replace").splitlines(),
                                "a new run in this directory (no checkpoint)")
            self._file = open(self.path, "w", encoding="utf-8")
        else:
            if self.path.exists():
                self._cut_back(resume_step)
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

    @property
    def discarded_path(self) -> Path:
        return self.path.with_name("metrics.discarded.jsonl")

    def _set_aside(self, lines: list[str], why: str) -> None:
        """Append ``lines`` to :attr:`discarded_path` (flushed and fsync'ed before the metrics file
        changes), preceded by a line saying why."""
        if not lines:
            return
        with open(self.discarded_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": "discarded", "from": self.path.name, "why": why, "lines": len(lines)}) + "\n")
            for line in lines:
                f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _cut_back(self, resume_step: int) -> None:
        """Keep the records up to ``resume_step``; set aside the others and unparsable lines."""
        from lb_dist._io import atomic_write_text

        good, bad, torn = _parse_lines(self.path)
        kept = [line for line, r in good if not isinstance(r.get("step"), (int, float)) or r["step"] <= resume_step]
        later = [line for line, r in good if isinstance(r.get("step"), (int, float)) and r["step"] > resume_step]
        last = max((n for n, _ in bad), default=0)
        unexpected = [n for n, _ in bad if not (torn and n == last)]
        if unexpected:
            warnings.warn(f"{self.path}: line(s) {', '.join(map(str, unexpected))} are not JSON records; moved to "
                          f"{self.discarded_path}", RuntimeWarning, stacklevel=3)
        if not later and not bad:
            return
        self._set_aside([raw for _, raw in bad], "unparsable lines")
        self._set_aside(later, f"records after step {resume_step}, replayed by the resumed run")
        atomic_write_text(self.path, "".join(line.strip() + "\n" for line in kept))

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
