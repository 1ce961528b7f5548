"""``lb-dist plot RUN_DIR [RUN_DIR ...] [--out DIR]``: PNG figures that compare training runs, from
their ``metrics.jsonl`` (written by ``lb-dist train``; schema in docs/training.md).

* ``curves.png``: training loss over epochs (every step record, x = step / steps per epoch), test
  loss per epoch and test accuracy per epoch (top-1 for images; token accuracy for translation, with
  BLEU in a fourth panel), one line per run: the papers' Fig. 4/5 comparison.
* ``variance_factor.png``: the gradient-variance factor ``M_k = S_k / ||G_k||^2`` of every layer
  over training, one panel per run that logged it (CLARS runs), layers coloured from the input
  (dark) to the output (light), log scale, running median over ``--smooth`` logged steps (default 5):
  the CLARS paper's Fig. 3.
* ``trust_ratio.png``: the per-layer trust ratios of the layer-wise optimizers, the same way.
* ``noise_scale.png``: the gradient noise scale ``B_simple = tr(Sigma) / ||G||^2`` (McCandlish et
  al. 2018) over training, all adapted layers together (the critical-batch-size estimate), one line
  per run that logged it (CLARS runs), with each run's batch size as a dashed line; and
  ``noise_scale_layers.png``, per layer as ``variance_factor.png``.

Figures without data (e.g. no CLARS run) are not written. Returns the written paths.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = ["main", "plot_runs", "load_run"]


class RunData:
    def __init__(self, path: Path, label: str, records: list[dict], config: dict):
        self.path, self.label, self.config = path, label, config
        self.steps = [r for r in records if r.get("kind") == "step"]
        self.epochs = [r for r in records if r.get("kind") == "epoch"]
        spe = config.get("steps_per_epoch")
        if not spe and self.epochs:
            first = self.epochs[0]
            spe = first["step"] / (first["epoch"] + 1)
        self.steps_per_epoch = spe or 1


def load_run(run_dir, label: str | None = None) -> RunData:
    """Read ``RUN_DIR/metrics.jsonl`` (and ``config.json`` if present); ``ValueError`` naming the file
    when it is missing or holds no record."""
    from lb_dist.train.metrics import read_metrics

    d = Path(run_dir)
    path = d / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no metrics file (is {d} a run directory of lb-dist train?)")
    records = read_metrics(path)
    if not records:
        raise ValueError(f"{path}: holds no metrics record")
    config = {}
    cfg = d / "config.json"
    if cfg.is_file():
        try:
            config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg}: not valid JSON ({e})") from e
    return RunData(d, label or d.name, records, config)


def _running_median(values: list[float], window: int) -> list[float]:
    """Centered running median over ``window`` points (shrinking at the ends); 1 = unchanged."""
    if window <= 1:
        return list(values)
    half = window // 2
    out = []
    for i in range(len(values)):
        part = sorted(values[max(0, i - half):i + half + 1])
        mid = len(part) // 2
        out.append(part[mid] if len(part) % 2 else (part[mid - 1] * part[mid]) ** 0.5)  # geometric: log scale
    return out


def _layer_panel(fig_path: Path, runs: list[RunData], key: str, title: str, ylabel: str, smooth: int = 1):
    import matplotlib.pyplot as plt
    from matplotlib import cm

    having = [r for r in runs if any(key in s for s in r.steps)]
    if not having:
        return None
    fig, axes = plt.subplots(1, len(having), figsize=(5.5 * len(having), 4.2), squeeze=False)
    for ax, run in zip(axes[0], having):
        records = [s for s in run.steps if key in s]
        layers = list(records[0][key])
        colors = cm.viridis([i / max(len(layers) - 1, 1) for i in range(len(layers))])
        for layer, color in zip(layers, colors):
            xs, ys = [], []
            for s in records:
                v = s[key].get(layer)
                if v is not None and v > 0 and math.isfinite(v):
                    xs.append(s["step"] / run.steps_per_epoch)
                    ys.append(v)
            if xs:
                ax.plot(xs, _running_median(ys, smooth), color=color, lw=1.0, alpha=0.85, label=layer)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(run.label + (f" (running median of {smooth} logged steps)" if smooth > 1 else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
        if len(layers) <= 12:
            ax.legend(fontsize=6, loc="best")
        else:
            ax.text(0.01, 0.01, f"{len(layers)} layers: dark = input side, light = output side",
                    transform=ax.transAxes, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(fig_path, dpi=110)
    plt.close(fig)
    return fig_path


def plot_runs(run_dirs, out_dir, labels=None, smooth_mk: int = 5) -> list[Path]:
    """Write the figures comparing ``run_dirs`` into ``out_dir``; returns their paths. ``smooth_mk``:
    the M_k lines are running medians over that many logged steps (a one-step micro-batch estimate
    of ``||G_k||^2`` from few micro-batches is noisy; the raw values are in metrics.jsonl)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [None] * len(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"--labels gives {len(labels)} labels for {len(run_dirs)} run directories")
    runs = [load_run(d, lab) for d, lab in zip(run_dirs, labels)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    translation = any("test_bleu" in e for r in runs for e in r.epochs)
    acc_key = "test_token_accuracy" if translation else "test_top1"
    panels = [("training loss", None), ("test loss", "test_loss"),
              ("test token accuracy" if translation else "test top-1 accuracy", acc_key)]
    if translation:
        panels.append(("test BLEU", "test_bleu"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for run in runs:
        xs = [s["step"] / run.steps_per_epoch for s in run.steps if s.get("loss") is not None]
        ys = [s["loss"] for s in run.steps if s.get("loss") is not None]
        (line,) = axes[0].plot(xs, ys, lw=0.8, alpha=0.6, label=f"{run.label} (steps)")
        ex = [e["epoch"] + 1 for e in run.epochs if e.get("train_loss") is not None]
        ey = [e["train_loss"] for e in run.epochs if e.get("train_loss") is not None]
        axes[0].plot(ex, ey, "o-", color=line.get_color(), lw=1.8, ms=4, label=f"{run.label} (epoch mean)")
        for ax, (_, key) in zip(axes[1:], panels[1:]):
            pts = [(e["epoch"] + 1, e[key]) for e in run.epochs if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", color=line.get_color(), lw=1.8, ms=4, label=run.label)
    for ax, (title, _) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    for name, key, title, ylabel, smooth in (
            ("variance_factor.png", "variance_factor",
             "gradient-variance factor M_k = S_k / ||G_k||^2 per layer (CLARS paper, Fig. 3)", "M_k", smooth_mk),
            ("trust_ratio.png", "trust_ratio", "per-layer trust ratio (rate / lr)", "trust ratio", 1),
            ("noise_scale_layers.png", "noise_scale", "gradient noise scale B_simple per layer", "B_simple",
             smooth_mk)):
        p = _layer_panel(out / name, runs, key, title, ylabel, smooth)
        if p is not None:
            written.append(p)
    having = [r for r in runs if any(s.get("noise_scale_global") for s in r.steps)]
    if having:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for run in having:
            pts = [(s["step"] / run.steps_per_epoch, s["noise_scale_global"]) for s in run.steps
                   if s.get("noise_scale_global") is not None and s["noise_scale_global"] > 0]
            if not pts:
                continue
            xs, ys = zip(*pts)
            (line,) = ax.plot(xs, _running_median(list(ys), smooth_mk), lw=1.2, label=f"{run.label} B_simple")
            batch = run.config.get("batch_size")
            if batch:
                ax.axhline(batch, color=line.get_color(), ls="--", lw=0.9, label=f"{run.label} batch {batch}")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("samples")
        ax.set_title("gradient noise scale B_simple = tr(Sigma) / ||G||^2 (critical batch size)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "noise_scale.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None, prog: str = "lb-dist plot") -> int:
    p = argparse.ArgumentParser(prog=prog, description="PNG figures comparing lb-dist train runs (curves.png, "
                                                       "variance_factor.png, trust_ratio.png).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default: the first RUN_DIR's parent / plots)")
    p.add_argument("--labels", nargs="+", default=None, help="one label per RUN_DIR (default: directory names)")
    p.add_argument("--smooth", type=int, default=5,
                   help="M_k lines: running median over this many logged steps (1: raw values)")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error(f"argument --smooth: must be >= 1, got {args.smooth}")
    out = args.out or str(Path(args.run_dirs[0]).resolve().parent / "plots")
    try:
        written = plot_runs(args.run_dirs, out, args.labels, smooth_mk=args.smooth)
    except ValueError as e:
        p.error(str(e))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
