"""The README's main job (`make demo` = `python -m lb_dist.demo`) end to end, at a tiny size:
the real torchrun launcher, 2 gloo processes, LARS+warmup, CLARS (micro-batch S_k from the DDP hook)
and CLARS+GradientMix."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_all_three_configurations(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "lb_dist.demo", "--epochs", "2", "--batch-size", "256",
         "--train-size", "1024", "--test-size", "256", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"lars+warmup", "clars", "clars+gradientmix"}
    for run, r in results.items():
        assert r["finite"], run
        assert len(r["train_loss_per_epoch"]) == 2
        assert all(math.isfinite(v) for v in r["train_loss_per_epoch"]), run
        assert 0.0 <= r["test_accuracy"] <= 1.0
    # CLARS needs no warmup: after 2 epochs its training loss is below chance level (ln 10).
    assert results["clars"]["final_train_loss"] < math.log(10)
    for run in results:
        assert run in proc.stdout  # the comparison table is printed
