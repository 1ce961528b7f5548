"""horovod_examples/: the CLARS ResNet script runs under horovodrun (2 Gloo processes), in its smoke mode
shrunk further by extra flags, and leaves the run it describes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _worker_launch import REPO, child_env
from lb_dist.train.metrics import read_metrics

pytest.importorskip("horovod.torch")
BIN = Path(sys.executable).parent


def test_resnet_clars_script_smoke(tmp_path):
    run = tmp_path / "run"
    env = child_env()
    env.update(PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]), SMOKE="1", NP="2", HOSTS="localhost:2",
               HOROVODRUN_ARGS="--gloo", RUN_DIR=str(run), TRAIN_CMD=f"{sys.executable} -m lb_dist.train")
    script = REPO / "horovod_examples" / "resnet56_cifar10_clars.sh"
    extra = ["--image-size", "8", "--train-size", "128", "--test-size", "32", "--batch-size", "64",
             "--epochs", "1", "--per-sample-subset", "8", "--no-progress", "--layer-stats-every", "1"]
    proc = subprocess.run(["bash", str(script), *extra], env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["backend_used"] == "horovod" and cfg["world_size"] == 2
    assert cfg["optimizer"] == "clars" and cfg["clars_moments"] == "per-sample" and cfg["schedule"] == "constant"
    assert cfg["batch_size"] == 64 and cfg["epochs"] == 1  # the extra flags won
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 2 and all(r["lr"] == pytest.approx(0.1 * 64 / 128) and not r["skipped"] for r in steps)
    assert all(v > 0 for v in steps[-1]["second_moment"].values())
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 1 and 0 <= epochs[0]["test_top1"] <= 1
