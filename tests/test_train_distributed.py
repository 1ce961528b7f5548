"""lb_dist.train under the real torchrun launcher (2 gloo processes), checked against one process.

One torchrun job (tests/_worker_train.py) runs several trainings in one process group; the tests
compare its final checkpoints with
* a plain-torch one-process SGD reference of the same global batches (tests/_worker_train_reference.py):
  no mixing, device-wise GradientMix (eq. 3) and sample-wise GradientMix (eq. 4);
* a one-process lb_dist.train run of the same global batch as 2 accumulation micro-batches (CLARS with
  the micro-batch estimator: the DDP hook's statistics vs track_backward's);
* the one-process CLARS reference with device-wise mixing (reference_layerwise: S_k from the solve
  conditioned on the step's coefficients, the reference the DeepSpeed and Horovod runs match too);
* an uninterrupted 2-process run (a run stopped twice by --stop-after-steps and resumed).
The command line itself is run under torchrun too: a bad flag is refused (exit 2, the flag named, once)
before any work, and a CLI run resumes.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _data import fake_multi30k
from _train_runs import assert_params_close, assert_resume_exact, final_model, with_resumed
from _worker_launch import REPO, child_env, free_port
from _worker_train_reference import reference_layerwise, reference_sgd
from lb_dist.train import train
from lb_dist.train.metrics import read_metrics

IMAGE, TRAIN, TEST, BATCH = 8, 96, 32, 32  # 3 steps per epoch
STEPS = TRAIN // BATCH


def translation(run_dir, data, *extra):
    """The small Transformer without dropout (deterministic) on tiny Multi30k-format files, Adam with
    the inverse square root schedule: 2 steps of 32 sentences, then token accuracy and BLEU."""
    return ["--run-dir", str(run_dir), "--model", "transformer_small", "--dataset", "multi30k", "--data-dir",
            str(data), "--train-size", "64", "--test-size", "16", "--bleu-samples", "16", "--batch-size", "32",
            "--max-length", "24", "--vocab-size", "60", "--epochs", "1", "--no-progress", "--num-threads", "1",
            "--optimizer", "adam", "--lr", "0.003", "--schedule", "inverse-sqrt", "--warmup-steps", "1",
            "--label-smoothing", "0.1", "--model-option", "d_model=32", "--model-option", "encoder_layers=1",
            "--model-option", "decoder_layers=1", "--model-option", "attention_heads=2",
            "--model-option", "ffn_dim=64", "--model-option", "dropout=0", *extra]


def common(run_dir, *extra):
    return ["--run-dir", str(run_dir), "--model", "resnet20", "--image-size", str(IMAGE), "--train-size", str(TRAIN),
            "--test-size", str(TEST), "--batch-size", str(BATCH), "--epochs", "1", "--no-progress",
            "--num-threads", "1", "--layer-stats-every", "1", "--eval-batch-size", "32", *extra]


SGD = ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--schedule", "constant"]
CLARS = ["--optimizer", "clars", "--lr", "1.0", "--weight-decay", "5e-4"]
# as tests/test_train_backends.py: a moderate rate, at which the reference does not amplify float rounding
CLARS_REF = ["--optimizer", "clars", "--lr", "0.2", "--weight-decay", "5e-4"]


def torchrun(args: list[str], timeout: float = 240.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, env=child_env(), cwd=str(REPO), capture_output=True, text=True, timeout=timeout)


DDP_RESUMED = ("sgd_sample", "clars_per_sample", "transformer")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The 2-process trainings, in one torchrun job."""
    d = tmp_path_factory.mktemp("ddp")
    spec = [
        {"name": "sgd", "argv": common(d / "sgd", *SGD)},
        {"name": "sgd_device", "argv": common(d / "sgd_device", *SGD, "--mix", "device", "--mix-std", "0.5")},
        {"name": "sgd_sample", "argv": common(d / "sgd_sample", *SGD, "--mix", "sample", "--mix-std", "0.5",
                                              "--mix-noise", "rademacher")},
        {"name": "clars", "argv": common(d / "clars", *CLARS)},
        {"name": "clars_device", "argv": common(d / "clars_device", *CLARS_REF, "--mix", "device", "--mix-std", "0.5")},
        {"name": "clars_per_sample", "argv": common(d / "clars_ps", *CLARS, "--clars-moments", "per-sample",
                                                    "--per-sample-subset", "8")},
        # accumulation (DDP no_sync) + device mix + micro-batch moments with EMA: uninterrupted and resumed
        {"name": "full", "argv": common(d / "full", *CLARS, "--mix", "device", "--accumulation-steps", "2",
                                        "--moments-ema", "0.5", "--epochs", "2", "--warmup-steps", "2")},
        {"name": "full_resumed", "repeat_until_done": True,
         "argv": common(d / "full_resumed", *CLARS, "--mix", "device", "--accumulation-steps", "2",
                        "--moments-ema", "0.5", "--epochs", "2", "--warmup-steps", "2", "--stop-after-steps", "2")},
        {"name": "transformer", "argv": translation(d / "transformer", fake_multi30k(d / "m30k"))},
    ]
    # exact resume (issue 16): sample-wise mixing, per-sample S_k, Adam on the Transformer, each stopped
    # after every step (mid-epoch) and resumed
    spec = with_resumed(spec, DDP_RESUMED)
    spec_path = d / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = torchrun([str(REPO / "tests" / "_worker_train.py"), str(spec_path)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    out = json.loads((d / "spec.json.out").read_text())
    assert out["detected"] == "torchrun" and out["world_size"] == 2
    return d, out["runs"]


def test_ddp_sgd_equals_one_process_reference(job):
    d, _ = job
    want = reference_sgd(steps=STEPS, batch_size=BATCH, world_size=2, accumulation=1, lr=0.05, momentum=0.9,
                         train_size=TRAIN, image_size=IMAGE)
    assert_params_close(final_model(d / "sgd"), want)


@pytest.mark.parametrize("mix,noise", [("device", "gaussian"), ("sample", "rademacher")])
def test_ddp_gradientmix_equals_one_process_reference(job, mix, noise):
    d, _ = job
    want = reference_sgd(steps=STEPS, batch_size=BATCH, world_size=2, accumulation=1, lr=0.05, momentum=0.9,
                         train_size=TRAIN, image_size=IMAGE, mix=mix, mix_std=0.5, mix_noise=noise)
    assert_params_close(final_model(d / f"sgd_{mix}"), want)
    # the mixing changes the result (the reference without it differs): the check can fail
    plain = reference_sgd(steps=STEPS, batch_size=BATCH, world_size=2, accumulation=1, lr=0.05, momentum=0.9,
                          train_size=TRAIN, image_size=IMAGE)
    diff = max((final_model(d / f"sgd_{mix}")[k] - plain[k]).abs().max().item() for k in plain
               if k.endswith("weight"))
    assert diff > 1e-4
    if mix == "device":
        steps = [r for r in read_metrics(d / "sgd_device" / "metrics.jsonl") if r["kind"] == "step"]
        assert all(r["mix_noise_amount"] > 0 for r in steps)


def test_ddp_clars_equals_one_process_accumulation(job, tmp_path):
    """2 ranks x 16 samples (S_k from the DDP hook) == 1 process x 2 micro-batches of 16 (track_backward)."""
    d, _ = job
    single = train(common(tmp_path / "single", *CLARS, "--accumulation-steps", "2", "--backend", "single"))
    assert single["step"] == STEPS
    assert_params_close(final_model(d / "clars"), final_model(tmp_path / "single"), rtol=1e-4, atol=1e-5)
    # the logged S_k of the last step agree too
    last = lambda run: [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "step"][-1]  # noqa: E731
    a, b = last(d / "clars"), last(tmp_path / "single")
    for layer, v in a["second_moment"].items():
        assert v == pytest.approx(b["second_moment"][layer], rel=1e-3)
    assert set(a["trust_ratio"]) == set(a["variance_factor"])  # the adapted layers (weights, not BN/bias)
    assert all(name.endswith("weight") and "bn" not in name for name in a["trust_ratio"])


def test_ddp_clars_with_device_mix_equals_one_process_reference(job):
    """CLARS + device-wise GradientMix under torchrun: S_k from the DDP hook's statistics (the core's
    solve conditioned on the step's coefficients) as in the one-process reference written out from
    the equations; ignoring the mixing weights in S_k gives another result (the check can fail)."""
    d, _ = job
    kw = dict(optimizer="clars", steps=STEPS, batch_size=BATCH, world_size=2, weight_decay=5e-4, train_size=TRAIN,
              image_size=IMAGE, mix="device", mix_std=0.5, lr=0.2)
    got = final_model(d / "clars_device")
    assert_params_close(got, reference_layerwise(**kw), rtol=1e-4, atol=1e-5)
    control = reference_layerwise(**kw, estimator="unweighted")
    assert max((got[k] - control[k]).abs().max().item() for k in control if k.endswith("weight")) > 1e-4


def test_ddp_per_sample_moments_logged(job):
    d, _ = job
    steps = [r for r in read_metrics(d / "clars_ps" / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == STEPS
    for r in steps:
        vf = [v for v in r["variance_factor"].values() if v is not None]
        assert vf and all(v >= 1.0 - 1e-6 for v in vf)  # exact per-sample M_k >= 1 (Jensen)


def test_ddp_resume_equals_uninterrupted(job):
    d, out = job
    assert out["full_resumed"]["steps_per_call"] == [2, 4, 6]
    assert_params_close(final_model(d / "full_resumed"), final_model(d / "full"), rtol=0, atol=0)
    a = read_metrics(d / "full" / "metrics.jsonl")
    b = read_metrics(d / "full_resumed" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no duplicated or missing record
    for ra, rb in zip(a, b):
        assert ra.get("loss") == rb.get("loss") and ra.get("train_loss") == rb.get("train_loss")
        assert ra.get("test_top1") == rb.get("test_top1")


@pytest.mark.parametrize("name", DDP_RESUMED)
def test_ddp_resume_matrix_is_exact(job, name):
    d, out = job
    run = {"clars_per_sample": "clars_ps"}.get(name, name)
    assert_resume_exact(d / run, d / f"{run}_resumed", out[f"{name}_resumed"]["steps_per_call"])


def test_ddp_transformer_equals_one_process(job, tmp_path):
    """The Transformer on Multi30k-format files with 2 processes (rank 0 trains the tokenizer, the others
    wait; the step's loss is the token mean over both ranks' sentences, whose token counts differ; BLEU
    gathered from both ranks) ends where one process with the same global batch ends, with the same
    logged losses, token accuracy and BLEU."""
    d, _ = job
    single = train(translation(tmp_path / "single", d / "m30k", "--backend", "single"))
    assert single["step"] == 2
    assert (d / "transformer" / "tokenizer.json").read_text() == (tmp_path / "single" / "tokenizer.json").read_text()
    assert_params_close(final_model(d / "transformer"), final_model(tmp_path / "single"), rtol=1e-4, atol=1e-5)
    two = read_metrics(d / "transformer" / "metrics.jsonl")
    one = read_metrics(tmp_path / "single" / "metrics.jsonl")
    for a, b in zip([r for r in two if r["kind"] == "step"], [r for r in one if r["kind"] == "step"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    ea, eb = [r for r in two if r["kind"] == "epoch"][0], [r for r in one if r["kind"] == "epoch"][0]
    assert ea["test_loss"] == pytest.approx(eb["test_loss"], rel=1e-4)
    assert ea["test_token_accuracy"] == pytest.approx(eb["test_token_accuracy"], abs=1e-9)
    assert ea["test_bleu"] == pytest.approx(eb["test_bleu"], abs=1e-6)
    # the rates follow the inverse square root schedule written out (peak 0.003, 1 warmup step)
    assert [r["lr"] for r in one if r["kind"] == "step"] == pytest.approx([0.003 * min(n / 1, (1 / n) ** 0.5)
                                                                             for n in (1, 2)], rel=1e-12)


def test_cli_under_torchrun_bad_flag_and_resume(tmp_path):
    run = tmp_path / "cli"
    bad = torchrun(["-m", "lb_dist.train", *common(run, *SGD, "--batch-size", "33")], timeout=120)
    assert bad.returncode != 0
    assert bad.stderr.count("error: argument --batch-size") == 1, bad.stderr[-3000:]
    assert not (run / "checkpoints").exists()
    argv = ["-m", "lb_dist.train", *common(run, *SGD, "--mix", "device", "--stop-after-steps", "2")]
    first = torchrun(argv)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "stopped after step 2" in first.stderr
    second = torchrun(argv)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from" in second.stderr
    want = reference_sgd(steps=STEPS, batch_size=BATCH, world_size=2, accumulation=1, lr=0.05, momentum=0.9,
                         train_size=TRAIN, image_size=IMAGE, mix="device")
    assert_params_close(final_model(run), want)
    epochs = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(epochs) == 1 and 0 <= epochs[0]["test_top1"] <= 1
