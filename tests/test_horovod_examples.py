"""horovod_examples/: each script runs under horovodrun (2 Gloo processes), in its smoke mode shrunk
further by extra flags, and leaves the run it describes (optimizer, schedule, mixing as its header says)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _data import fake_multi30k
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


def _run_script(name, run, extra, **env_extra):
    env = child_env()
    env.update(PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]), SMOKE="1", NP="2", HOSTS="localhost:2",
               HOROVODRUN_ARGS="--gloo", RUN_DIR=str(run), TRAIN_CMD=f"{sys.executable} -m lb_dist.train", **env_extra)
    proc = subprocess.run(["bash", str(REPO / "horovod_examples" / name), *extra], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run / "config.json").read_text()), read_metrics(run / "metrics.jsonl")


def test_resnet_lars_warmup_script_smoke(tmp_path):
    cfg, records = _run_script("resnet56_cifar10_lars_warmup.sh", tmp_path / "run",
                               ["--image-size", "8", "--train-size", "128", "--test-size", "32", "--batch-size", "64",
                                "--epochs", "2", "--warmup-epochs", "1", "--no-progress"])
    assert cfg["backend_used"] == "horovod" and cfg["world_size"] == 2
    assert cfg["optimizer"] == "lars" and cfg["schedule"] == "poly" and cfg["eta"] == 0.001
    steps = [r for r in records if r["kind"] == "step"]
    peak = 0.1 * 64 / 128                                      # --base-lr 0.1 at --base-batch-size 128
    # eq. 15: linear warmup over 2 steps, then decay with power 2 to 0 at step T = 4
    want = [peak * t / 2 if t <= 2 else peak * ((4 - t) / 2) ** 2 for t in range(4)]
    assert [r["lr"] for r in steps] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert all(not r["skipped"] for r in steps)


def test_transformer_lamb_gradientmix_script_smoke(tmp_path):
    data = fake_multi30k(tmp_path / "m30k", n=128)
    cfg, records = _run_script("transformer_multi30k_lamb_gradientmix.sh", tmp_path / "run",
                               ["--train-size", "128", "--test-size", "16", "--bleu-samples", "8", "--batch-size", "64",
                                "--vocab-size", "60", "--epochs", "1", "--max-length", "24", "--no-progress"],
                               DATA_DIR=str(data))
    assert cfg["backend_used"] == "horovod" and cfg["world_size"] == 2 and cfg["model"] == "transformer_small"
    assert cfg["optimizer"] == "lamb" and cfg["schedule"] == "inverse-sqrt" and cfg["mix"] == "device"
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 2 and all(r["mix_noise_amount"] > 0 and not r["skipped"] for r in steps)
    epoch = [r for r in records if r["kind"] == "epoch"][0]
    assert 0 <= epoch["test_token_accuracy"] <= 1 and 0 <= epoch["test_bleu"] <= 100
    assert (tmp_path / "run" / "tokenizer.json").is_file()
