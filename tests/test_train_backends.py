"""lb_dist.train under the real ``deepspeed`` and ``horovodrun`` launchers (2 CPU processes, gloo),
checked against one process.

One launched job per launcher (tests/_worker_train.py) runs several trainings on one started
backend; the tests compare their final checkpoints with the one-process references of
tests/_worker_train_reference.py, written from the documented batch layout with plain torch and the
core's optimizers (the same references the torchrun tests use):

* SGD without mixing, with device-wise GradientMix (eq. 3) and with sample-wise GradientMix (eq. 4):
  ``reference_sgd``;
* LARS and CLARS (micro-batch S_k) with and without device-wise mixing: ``reference_layerwise``, with
  the one big-batch estimate every backend documents (the solve conditioned on the step's
  coefficients, docs/moments.md); under DeepSpeed at ZeRO stages 0-3 (the partitions cut layers: the
  ZeRO-exact norms are needed for the match);
* a run stopped twice by --stop-after-steps and resumed equals the uninterrupted run (CLARS, device
  mixing, accumulation, EMA estimator, 2 epochs);
* non-finite gradients: the steps are skipped and the weights stay finite (DeepSpeed ZeRO-0, where
  the engine checks, and ZeRO-2, where DeepSpeed's overflow check does; Horovod);
* ``--deepspeed-config deepspeed_configs/clars_resnet56_cifar10_b8192.json``: the file's settings
  become the flags (per-sample CLARS, ZeRO-1, constant rate), the run trains.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_runs import assert_params_close, assert_resume_exact, final_model, max_diff, with_resumed
from _worker_launch import REPO, TESTS, child_env, free_port
from _worker_train_reference import reference_layerwise, reference_sgd
from lb_dist.train.checkpoint import list_checkpoints, load_checkpoint
from lb_dist.train.metrics import read_metrics

BIN = Path(sys.executable).parent
IMAGE, TRAIN, TEST, BATCH = 8, 96, 32, 32  # 3 steps per epoch
STEPS = TRAIN // BATCH
SGD = ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--schedule", "constant"]
# moderate rates: the non-adapted parameters (BatchNorm) step with the global rate itself, and at large
# rates the 8x8-pixel, 16-sample BatchNorm gradients amplify float rounding (a 1e-7 change in the weights
# gave 1e-3 in a gradient at --lr 2; LARS with mixing at --lr 0.2 moved 1e-4 with the reference's thread
# count); at these rates the reference is the same with 1 and 2 threads to 1.2e-7
LARS = ["--optimizer", "lars", "--lr", "0.1", "--eta", "0.02", "--weight-decay", "5e-4"]
CLARS = ["--optimizer", "clars", "--lr", "0.2", "--weight-decay", "5e-4"]
LAYERWISE_KW = {"lars": {"lr": 0.1, "eta": 0.02}, "clars": {"lr": 0.2}}
FULL = [*CLARS, "--mix", "device", "--accumulation-steps", "2", "--moments-ema", "0.5", "--epochs", "2",
        "--warmup-steps", "2"]
MIX = ["--mix", "device", "--mix-std", "0.5"]


def common(run_dir, *extra):
    return ["--run-dir", str(run_dir), "--model", "resnet20", "--image-size", str(IMAGE), "--train-size", str(TRAIN),
            "--test-size", str(TEST), "--batch-size", str(BATCH), "--epochs", "1", "--no-progress",
            "--num-threads", "1", "--layer-stats-every", "1", "--eval-batch-size", "32", *extra]


def _launch(cmd: list[str], d: Path, spec: list[dict], timeout: float = 420) -> dict:
    spec_path = d / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = child_env()
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])  # horovodrun starts `python` by name
    env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.run([*cmd, str(TESTS / "_worker_train.py"), str(spec_path), *cmd_tail(cmd)], env=env,
                          cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    out = json.loads((d / "spec.json.out").read_text())
    out["stderr"] = proc.stderr
    return out


def cmd_tail(cmd: list[str]) -> list[str]:
    return ["--backend", "deepspeed" if "deepspeed" in Path(cmd[0]).name else "horovod"]


# ----------------------------------------------------------------------------- DeepSpeed
DS_RESUMED = ("sgd", "sgd_sample", "lars_device", "clars_device", "bf16", "config", "clars_tp")
@pytest.fixture(scope="module")
def ds_job(tmp_path_factory):
    pytest.importorskip("deepspeed")
    launcher = BIN / "deepspeed"
    if not launcher.exists():
        pytest.skip(f"the deepspeed launcher is not installed next to {sys.executable}")
    d = tmp_path_factory.mktemp("ds")
    spec = [
        {"name": "sgd", "argv": common(d / "sgd", *SGD, "--zero-stage", "0")},
        {"name": "sgd_device", "argv": common(d / "sgd_device", *SGD, *MIX, "--zero-stage", "2")},
        {"name": "sgd_sample", "argv": common(d / "sgd_sample", *SGD, "--mix", "sample", "--mix-std", "0.5",
                                              "--mix-noise", "rademacher", "--zero-stage", "1")},
        {"name": "lars_device", "argv": common(d / "lars_device", *LARS, *MIX, "--zero-stage", "3")},
        {"name": "clars", "argv": common(d / "clars", *CLARS, "--zero-stage", "2")},
        {"name": "clars_tp", "argv": common(d / "clars_tp", *CLARS, "--clars-moments", "training-pass",
                                            "--zero-stage", "2")},
        {"name": "clars_tp3", "argv": common(d / "clars_tp3", *CLARS, "--clars-moments", "training-pass",
                                             "--zero-stage", "3")},
        {"name": "clars_device", "argv": common(d / "clars_device", *CLARS, *MIX, "--zero-stage", "3")},
        {"name": "full", "argv": common(d / "full", *FULL, "--zero-stage", "2")},
        {"name": "full_resumed", "repeat_until_done": True,
         "argv": common(d / "full_resumed", *FULL, "--zero-stage", "2", "--stop-after-steps", "2",
                        "--keep-checkpoints", "1")},
        {"name": "nan0", "poison_after": 1, "argv": common(d / "nan0", *SGD, "--zero-stage", "0",
                                                          "--checkpoint-every-steps", "1", "--keep-checkpoints", "5")},
        {"name": "nan2", "poison_after": 1, "argv": common(d / "nan2", *SGD, "--zero-stage", "2",
                                                          "--checkpoint-every-steps", "1", "--keep-checkpoints", "5")},
        {"name": "bf16", "argv": common(d / "bf16", *CLARS, "--zero-stage", "1", "--bf16")},
        {"name": "config", "argv": common(d / "config", "--deepspeed-config",
                                          str(REPO / "deepspeed_configs" / "clars_resnet56_cifar10_b8192.json"),
                                          "--batch-size", str(BATCH), "--per-sample-subset", "8")},
    ]
    # exact resume (issue 16): each ZeRO stage, SGD/LARS/CLARS, mixing off/sample/device, micro-batch and
    # per-sample S_k, bf16; stopped after every step (mid-epoch) and resumed
    spec = with_resumed(spec, DS_RESUMED)
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    return d, _launch(cmd, d, spec)


def test_deepspeed_job_detects_its_launcher(ds_job):
    _, out = ds_job
    assert out["detected"] == "deepspeed" and out["backend"] == "deepspeed" and out["world_size"] == 2


@pytest.mark.parametrize("name,mix,noise", [("sgd", "none", "gaussian"), ("sgd_device", "device", "gaussian"),
                                            ("sgd_sample", "sample", "rademacher")])
def test_deepspeed_sgd_equals_one_process_reference(ds_job, name, mix, noise):
    d, _ = ds_job
    want = reference_sgd(steps=STEPS, batch_size=BATCH, world_size=2, accumulation=1, lr=0.05, momentum=0.9,
                         train_size=TRAIN, image_size=IMAGE, mix=mix, mix_std=0.5, mix_noise=noise)
    got = final_model(d / name)
    assert_params_close(got, want)
    if mix != "none":  # the mixing changes the result: the comparison can fail
        plain = reference_sgd(steps=STEPS, batch_size=BATCH, world_size=2, accumulation=1, lr=0.05, momentum=0.9,
                              train_size=TRAIN, image_size=IMAGE)
        assert max_diff(got, plain) > 1e-4


@pytest.mark.parametrize("name,optimizer,mix", [("lars_device", "lars", "device"), ("clars", "clars", "none"),
                                                ("clars_device", "clars", "device")])
def test_deepspeed_layerwise_equals_one_process_reference(ds_job, name, optimizer, mix):
    """ZeRO-2/3 partitions cut the layers; the trust ratios and S_k are those of whole layers."""
    d, _ = ds_job
    kw = dict(optimizer=optimizer, steps=STEPS, batch_size=BATCH, world_size=2, weight_decay=5e-4, train_size=TRAIN,
              image_size=IMAGE, mix=mix, mix_std=0.5, **LAYERWISE_KW[optimizer])
    want = reference_layerwise(**kw)
    got = final_model(d / name)
    assert_params_close(got, want, rtol=1e-4, atol=1e-5)
    # controls: the comparison can fail (unmixed gradient; S_k with the mixing weights ignored; the schedule)
    control = {"lars_device": dict(kw, mix="none"), "clars_device": dict(kw, estimator="unweighted"),
               "clars": dict(kw, schedule="constant")}[name]
    assert max_diff(got, reference_layerwise(**control)) > 1e-4
    if optimizer == "clars":
        steps = [r for r in read_metrics(d / name / "metrics.jsonl") if r["kind"] == "step"]
        assert all(r["second_moment"] and r["trust_ratio"] and r["variance_factor"] for r in steps)


@pytest.mark.parametrize("name", ["clars_tp", "clars_tp3"])
def test_deepspeed_clars_training_pass_equals_one_process(ds_job, tmp_path, name):
    """``--backend deepspeed --clars-moments training-pass`` (ZeRO-2 and ZeRO-3: ResNet-20's
    convolutions too, 2 processes) equals one process with 2 accumulation micro-batches (the same
    slots): the same S_k each step (the per-sample sums in the ZeRO optimizer's all-reduce) and
    weights; metrics.jsonl has the source's M_k and the gradient noise scale B_simple, as for DDP."""
    from lb_dist.train import train
    d, _ = ds_job
    one = tmp_path / "one"
    train(common(one, *CLARS, "--clars-moments", "training-pass", "--accumulation-steps", "2", "--backend", "single"))
    assert_params_close(final_model(d / name), final_model(one), rtol=1e-5, atol=1e-7)
    got = [r for r in read_metrics(d / name / "metrics.jsonl") if r.get("noise_scale_global") is not None]
    want = [r for r in read_metrics(one / "metrics.jsonl") if r.get("noise_scale_global") is not None]
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want):
        assert g["noise_scale_global"] == pytest.approx(w["noise_scale_global"], rel=1e-5)
        assert g["variance_factor"].keys() == w["variance_factor"].keys()
        for key, value in w["variance_factor"].items():
            assert g["variance_factor"][key] == pytest.approx(value, rel=1e-5)


def test_deepspeed_resume_equals_uninterrupted(ds_job):
    d, out = ds_job
    assert out["runs"]["full_resumed"]["steps_per_call"] == [2, 4, 6]
    # bit for bit: the checkpoint holds the ZeRO-aware optimizer's exact momentum pair (B, c) next to
    # torch's c*B (docs/backend-deepspeed.md); with c*B alone this differed by 1e-7 (issue 16)
    assert_params_close(final_model(d / "full_resumed"), final_model(d / "full"), rtol=0, atol=0)
    a = read_metrics(d / "full" / "metrics.jsonl")
    b = read_metrics(d / "full_resumed" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.get("loss") == rb.get("loss") and ra.get("second_moment") == rb.get("second_moment")
        assert ra.get("mix_noise_amount") == rb.get("mix_noise_amount")
    # DeepSpeed's files live next to the checkpoint file and are pruned with it (--keep-checkpoints 1)
    ckpts = list_checkpoints(d / "full_resumed" / "checkpoints")
    assert [p.name for _, p in ckpts] == ["step-00000006.pt"]
    sidecars = sorted(p.name for p in (d / "full_resumed" / "checkpoints" / "deepspeed").iterdir() if p.is_dir())
    assert sidecars == ["step-00000006"]
    assert sorted(p.name for p in (d / "full_resumed" / "checkpoints" / "deepspeed" / "step-00000006").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.parametrize("name", DS_RESUMED)
def test_deepspeed_resume_matrix_is_exact(ds_job, name):
    d, out = ds_job
    assert_resume_exact(d / name, d / f"{name}_resumed", out["runs"][f"{name}_resumed"]["steps_per_call"])


@pytest.mark.parametrize("name", ["nan0", "nan2"])
def test_deepspeed_non_finite_steps_are_skipped(ds_job, name):
    d, _ = ds_job
    steps = [r for r in read_metrics(d / name / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["skipped"] for r in steps] == [False, True, True]
    after_one = load_checkpoint(d / name / "checkpoints" / "step-00000001.pt")["model"]
    last = final_model(d / name)
    for k, v in after_one.items():
        assert torch.isfinite(last[k].float()).all(), k
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(last[k], v, rtol=0, atol=0)


def test_deepspeed_config_file_becomes_the_flags(ds_job):
    d, out = ds_job
    cfg = json.loads((d / "config" / "config.json").read_text())
    assert cfg["optimizer"] == "clars" and cfg["lr"] == 6.4 and cfg["eta"] == 0.01 and cfg["weight_decay"] == 5e-4
    assert cfg["clars_moments"] == "per-sample" and cfg["per_sample_subset"] == 8  # the flag wins
    assert cfg["zero_stage"] == 1 and cfg["schedule"] == "constant" and cfg["batch_size"] == BATCH
    ds_cfg = json.loads((d / "config" / "deepspeed_config.json").read_text())
    assert ds_cfg["zero_optimization"]["stage"] == 1 and ds_cfg["gradient_clipping"] == 0.0
    assert ds_cfg["optimizer"]["second_moments"] == {"source": "per_sample", "subset_size": 8, "chunk_size": 64}
    assert ds_cfg["train_batch_size"] == BATCH and ds_cfg["train_micro_batch_size_per_gpu"] == BATCH // 2
    assert "train_batch_size = 8192 overridden by --batch-size 32" in out["stderr"]
    steps = [r for r in read_metrics(d / "config" / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == STEPS and all(r["lr"] == 6.4 and not r["skipped"] for r in steps)
    assert all(v > 0 for r in steps for v in r["second_moment"].values())


def test_deepspeed_bf16_is_the_same_training_in_lower_precision(ds_job):
    """--bf16 (ZeRO-1): bf16 weights and gradients, fp32 master weights; the inputs are cast to the
    model's dtype; the result is the fp32 run's within bf16 rounding."""
    d, _ = ds_job
    assert json.loads((d / "bf16" / "deepspeed_config.json").read_text())["bf16"] == {"enabled": True}
    got, fp32 = final_model(d / "bf16"), final_model(d / "clars")
    assert got["conv1.weight"].dtype == torch.bfloat16
    steps = [r for r in read_metrics(d / "bf16" / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == STEPS and not any(r["skipped"] for r in steps)
    for k, v in fp32.items():
        if k.endswith("weight"):
            torch.testing.assert_close(got[k].float(), v, rtol=0.05, atol=0.02)


def test_deepspeed_command_line_detects_the_launcher(tmp_path):
    """``deepspeed --num_gpus 2 --module lb_dist.train ...`` without --backend: the launcher's --local_rank
    selects the deepspeed backend; the run equals the one-process SGD reference."""
    pytest.importorskip("deepspeed")
    run = tmp_path / "cli"
    env = child_env()
    env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "lb_dist.train", *common(run, *SGD, *MIX, "--zero-stage", "1")], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["backend_used"] == "deepspeed" and cfg["world_size"] == 2 and cfg["backend"] == "auto"
    want = reference_sgd(steps=STEPS, batch_size=BATCH, world_size=2, accumulation=1, lr=0.05, momentum=0.9,
                         train_size=TRAIN, image_size=IMAGE, mix="device", mix_std=0.5)
    assert_params_close(final_model(run), want)


# ----------------------------------------------------------------------------- Horovod
HVD_RESUMED = ("sgd_device", "lars", "clars")
@pytest.fixture(scope="module")
def hvd_job(tmp_path_factory):
    pytest.importorskip("horovod.torch")
    d = tmp_path_factory.mktemp("hvd")
    spec = [
        {"name": "sgd", "argv": common(d / "sgd", *SGD)},
        {"name": "sgd_device", "argv": common(d / "sgd_device", *SGD, *MIX)},
        {"name": "lars", "argv": common(d / "lars", *LARS)},
        {"name": "clars", "argv": common(d / "clars", *CLARS)},
        {"name": "clars_device", "argv": common(d / "clars_device", *CLARS, *MIX)},
        {"name": "clars_tp", "argv": common(d / "clars_tp", *CLARS, "--clars-moments", "training-pass")},
        {"name": "full", "argv": common(d / "full", *FULL)},
        {"name": "full_resumed", "repeat_until_done": True,
         "argv": common(d / "full_resumed", *FULL, "--stop-after-steps", "2")},
        {"name": "nan", "poison_after": 1, "argv": common(d / "nan", *SGD, *MIX, "--checkpoint-every-steps", "1",
                                                         "--keep-checkpoints", "5")},
    ]
    spec = with_resumed(spec, HVD_RESUMED)
    cmd = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable]
    return d, _launch(cmd, d, spec)


def test_horovod_job_detects_its_launcher(hvd_job):
    _, out = hvd_job
    assert out["detected"] == "horovod" and out["backend"] == "horovod" and out["world_size"] == 2


@pytest.mark.parametrize("name,mix", [("sgd", "none"), ("sgd_device", "device")])
def test_horovod_sgd_equals_one_process_reference(hvd_job, name, mix):
    d, _ = hvd_job
    want = reference_sgd(steps=STEPS, batch_size=BATCH, world_size=2, accumulation=1, lr=0.05, momentum=0.9,
                         train_size=TRAIN, image_size=IMAGE, mix=mix, mix_std=0.5)
    assert_params_close(final_model(d / name), want)


@pytest.mark.parametrize("name,optimizer,mix", [("lars", "lars", "none"), ("clars", "clars", "none"),
                                                ("clars_device", "clars", "device")])
def test_horovod_layerwise_equals_one_process_reference(hvd_job, name, optimizer, mix):
    d, _ = hvd_job
    kw = dict(optimizer=optimizer, steps=STEPS, batch_size=BATCH, world_size=2, weight_decay=5e-4, train_size=TRAIN,
              image_size=IMAGE, mix=mix, mix_std=0.5, **LAYERWISE_KW[optimizer])
    got = final_model(d / name)
    assert_params_close(got, reference_layerwise(**kw), rtol=1e-4, atol=1e-5)
    if mix == "device":  # S_k with the mixing weights ignored differs: the comparison can fail
        assert max_diff(got, reference_layerwise(**kw, estimator="unweighted")) > 1e-4


def test_horovod_clars_training_pass_equals_one_process(hvd_job, tmp_path):
    """CLARS with ``--clars-moments training-pass`` on 2 Horovod ranks equals one process with 2
    accumulation micro-batches (the same slots, BatchNorm per slot): the same S_k each step (the
    per-sample norms' sums reduced in one Horovod allreduce) and the same weights."""
    from lb_dist.train import train
    d, _ = hvd_job
    one = tmp_path / "one"
    train(common(one, *CLARS, "--clars-moments", "training-pass", "--accumulation-steps", "2", "--backend", "single"))
    assert_params_close(final_model(d / "clars_tp"), final_model(one), rtol=1e-5, atol=1e-7)
    got = [r for r in read_metrics(d / "clars_tp" / "metrics.jsonl") if r["kind"] == "step"]
    want = [r for r in read_metrics(one / "metrics.jsonl") if r["kind"] == "step"]
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want):
        assert g["second_moment"] == pytest.approx(w["second_moment"], rel=1e-5)


def test_horovod_resume_equals_uninterrupted(hvd_job):
    d, out = hvd_job
    assert out["runs"]["full_resumed"]["steps_per_call"] == [2, 4, 6]
    assert_params_close(final_model(d / "full_resumed"), final_model(d / "full"), rtol=0, atol=0)
    a = read_metrics(d / "full" / "metrics.jsonl")
    b = read_metrics(d / "full_resumed" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.get("loss") == rb.get("loss") and ra.get("test_top1") == rb.get("test_top1")


@pytest.mark.parametrize("name", HVD_RESUMED)
def test_horovod_resume_matrix_is_exact(hvd_job, name):
    d, out = hvd_job
    assert_resume_exact(d / name, d / f"{name}_resumed", out["runs"][f"{name}_resumed"]["steps_per_call"])


def test_horovod_non_finite_steps_are_skipped(hvd_job):
    d, _ = hvd_job
    steps = [r for r in read_metrics(d / "nan" / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["skipped"] for r in steps] == [False, True, True]
    after_one = load_checkpoint(d / "nan" / "checkpoints" / "step-00000001.pt")["model"]
    last = final_model(d / "nan")
    for k, v in after_one.items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(last[k], v, rtol=0, atol=0)
