"""Hugging Face transformers' Trainer on DeepSpeed with lb_dist: a config naming CLARS (micro-batch
second moments) and gradient_mix, "auto" values filled by the Trainer, 2 processes under the
deepspeed launcher, a tiny randomly initialized BERT, offline (tests/_worker_deepspeed_hf.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _worker_launch import REPO, TESTS, child_env, free_port  # noqa: E402


def test_trainer_with_clars_and_gradient_mix(tmp_path):
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        pytest.skip("the deepspeed launcher is not installed")
    env = {**child_env(), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "lb_dist.deepspeed.prebuild"], cwd=str(REPO), env=env,
                   check=True, capture_output=True, timeout=600)
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
                           str(TESTS / "_worker_deepspeed_hf.py"), str(tmp_path)], cwd=str(REPO), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = json.loads((tmp_path / "hf.json").read_text())
    # the Trainer built lb_dist's engine and ZeRO-exact CLARS from the config, through register()
    assert out["engine"] == "LbDistDeepSpeedEngine" and out["optimizer"] == "ZeROCLARS"
    assert out["zero_stage"] == 2 and out["world_size"] == 2 and out["accumulation"] == 2
    # "auto" values: lr from TrainingArguments (linear decay over 4 steps), clipping max_grad_norm=1
    assert out["learning_rates"] == pytest.approx([0.375, 0.25, 0.125, 0.0])
    assert out["clip"] == 1.0
    # one GradientMix draw and one micro-batch estimate per optimizer step; every layer stepped
    assert out["global_step"] == out["mix_step"] == 4
    assert out["estimator_updates"] == [4]
    assert out["changed"] == out["num_params"] == len(out["trust_layers"])
    assert all(math.isfinite(x) for x in out["losses"]) and len(out["losses"]) == 4
