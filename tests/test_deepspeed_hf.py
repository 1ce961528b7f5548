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
    _check_micro_batch_statistics(tmp_path)


def _check_micro_batch_statistics(out_dir: Path) -> None:
    """CLARS' micro-batch statistics under the Trainer, recomputed here in float64 from the recorded
    inputs and weights of every micro-step and the step's GradientMix coefficients.

    The Trainer calls ``engine.backward(loss, scale_wrt_gas=False)`` with a loss it has already
    scaled itself (``c`` times the model's mean loss; the worker records ``c``), so DeepSpeed's
    reduced gradient is ``M = sum_k pi_k sum_j c_kj g_kj`` with ``g_kj`` the micro-batch's mean-loss
    gradient. On that scale the micro-batch gradients are ``e_kj = A c_kj g_kj`` (``M = sum w e``,
    ``w = pi_k / A``), and the estimator must see ``sum_{k,j} ||e_kj||^2`` and ``||M||^2`` per layer,
    and the big-batch value solved from them conditioned on the weights (W1 = sum w, W2 = sum w^2,
    n = 2A micro-batches): ``u = (||M||^2 - W1^2 small) / (W2 - W1^2)``, ``big = small - u (1 - 1/n)``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from _worker_deepspeed_hf import ACC, BERT
    from lb_dist import GradientMix

    ranks = [torch.load(out_dir / f"hf_rank{r}.pt", weights_only=False) for r in range(2)]
    layers = ranks[0]["estimator_layers"]
    net = BertForSequenceClassification(BertConfig(**BERT)).double().train()
    params = dict(net.named_parameters())

    def grad_of(record):
        net.load_state_dict({n: w.double() for n, w in record["weights"].items()}, strict=False)
        batch = record["batch"]
        loss = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"]).loss
        grads = torch.autograd.grad(loss, [params[n] for n in layers], allow_unused=True)
        return [torch.zeros_like(params[n]) if g is None else g for n, g in zip(layers, grads)]

    mix = GradientMix(noise="gaussian", std=0.25, seed=0, world_size=2)
    steps = len(ranks[0]["updates"])
    assert steps == 4 and all(len(r["micro_steps"]) == steps * ACC for r in ranks)
    for t in range(steps):
        pi = mix.coefficients(step=t)
        per_rank = []
        for r in ranks:
            rank_grads = []
            for j in range(ACC):
                rec = r["micro_steps"][t * ACC + j]
                assert rec["scale_wrt_gas"] is False
                c = rec["backward_loss"] / rec["model_loss"]
                rank_grads.append([ACC * c * g for g in grad_of(rec)])
            per_rank.append(rank_grads)
        small_sum = torch.stack([sum(g[i].square().sum() for rank in per_rank for g in rank)
                                 for i in range(len(layers))])
        mixed = [sum(float(pi[k]) / ACC * per_rank[k][j][i] for k in range(2) for j in range(ACC))
                 for i in range(len(layers))]
        mixed_sq = torch.stack([m.square().sum() for m in mixed])
        n = 2 * ACC
        w = [float(pi[k]) / ACC for k in range(2) for _ in range(ACC)]
        w1, w2 = sum(w), sum(x * x for x in w)
        small = small_sum / n
        u = (mixed_sq - w1 ** 2 * small) / (w2 - w1 ** 2)
        got = ranks[0]["updates"][t]
        assert not got.get("skipped"), got
        assert got["num_micro_batches"] == n
        assert got["weights"] == pytest.approx((w1, w2), rel=1e-12)
        torch.testing.assert_close(got["micro_sq_sum"].double(), small_sum, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(got["weighted_mean_sq"].double(), mixed_sq, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(got["mean_sq"].double(), small - u * (1 - 1 / n), rtol=1e-3, atol=1e-10)
