"""``lb-dist train --backend fsdp`` under the real torchrun launcher (gloo, CPU): FSDP2 ``fully_shard``
with lb_dist.fsdp, against the one-process references of tests/_worker_train_reference.py, and DCP
checkpoints that reshard: a run saved by 2 processes is resumed by 3 and ends where the uninterrupted
2-process run ends; CLARS with training-pass S_k against one process with accumulation. Two torchrun jobs (2 processes: every training; 3 processes: the resume)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from _data import fake_multi30k
from _train_runs import assert_params_close, final_model
from _worker_launch import REPO, child_env, free_port
from _worker_train_reference import reference_layerwise, reference_sgd
from lb_dist.train.metrics import read_metrics
from test_train_distributed import BATCH, CLARS_REF, IMAGE, SGD, STEPS, TRAIN, common, translation

pytestmark = pytest.mark.filterwarnings("ignore")


def torchrun(spec_path, nproc: int, timeout: float = 300.0) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(REPO / "tests" / "_worker_train.py"), str(spec_path),
           "--backend", "fsdp"]
    proc = subprocess.run(cmd, env=child_env(), cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    out = json.loads((spec_path.parent / (spec_path.name + ".out")).read_text())
    assert out["backend"] == "fsdp" and out["world_size"] == nproc
    return out["runs"]


def lamb_translation(run_dir, data, *extra):
    """The small Transformer (no dropout, no BatchNorm: the result does not depend on how the global
    batch is split over processes), LAMB, 3 steps of 48 sentences (one per epoch)."""
    argv = translation(run_dir, data, "--optimizer", "lamb", "--lr", "0.003", "--keep-checkpoints", "5", *extra)
    for flag, value in (("--batch-size", "48"), ("--train-size", "96"), ("--epochs", "3")):
        argv[argv.index(flag) + 1] = value
    return argv


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp_train")
    data = fake_multi30k(d / "m30k")
    spec = [
        {"name": "sgd_device", "argv": common(d / "sgd_device", *SGD, "--mix", "device", "--mix-std", "0.5")},
        {"name": "clars_device", "argv": common(d / "clars_device", *CLARS_REF, "--mix", "device", "--mix-std", "0.5")},
        # the same run stopped after every step (mid-epoch) and resumed by 2 processes: DCP restores the
        # sharded momentum, the loop the mix step and CLARS' estimator
        {"name": "clars_device_resumed", "repeat_until_done": True,
         "argv": common(d / "clars_device_resumed", *CLARS_REF, "--mix", "device", "--mix-std", "0.5",
                        "--stop-after-steps", "1")},
        {"name": "clars_tp", "argv": common(d / "clars_tp", *CLARS_REF, "--clars-moments", "training-pass")},
        {"name": "full", "argv": lamb_translation(d / "full", data)},
        {"name": "part", "argv": lamb_translation(d / "part", data, "--stop-after-steps", "1")},
    ]
    (d / "spec2.json").write_text(json.dumps(spec))
    runs = torchrun(d / "spec2.json", 2)
    (d / "spec3.json").write_text(json.dumps([{"name": "part", "argv": lamb_translation(d / "part", data)}]))
    runs3 = torchrun(d / "spec3.json", 3)
    return d, runs, runs3


def test_fsdp_sgd_device_mix_equals_one_process_reference(job):
    d, _, _ = job
    want = reference_sgd(steps=STEPS, batch_size=BATCH, world_size=2, accumulation=1, lr=0.05, momentum=0.9,
                         train_size=TRAIN, image_size=IMAGE, mix="device", mix_std=0.5)
    assert_params_close(final_model(d / "sgd_device"), want)


def test_fsdp_clars_device_mix_micro_batch_moments_equals_reference(job):
    """CLARS with lb_dist.fsdp's micro-batch statistics and device-wise mixing == the one-process
    reference written from the equations; ignoring the mixing weights in S_k differs."""
    d, _, _ = job
    kw = dict(optimizer="clars", steps=STEPS, batch_size=BATCH, world_size=2, weight_decay=5e-4, train_size=TRAIN,
              image_size=IMAGE, mix="device", mix_std=0.5, lr=0.2)
    got = final_model(d / "clars_device")
    assert_params_close(got, reference_layerwise(**kw), rtol=1e-4, atol=1e-5)
    control = reference_layerwise(**kw, estimator="unweighted")
    assert max((got[k] - control[k]).abs().max().item() for k in control if k.endswith("weight")) > 1e-4


def test_fsdp_clars_training_pass_equals_one_process(job, tmp_path):
    """CLARS with ``--clars-moments training-pass`` on 2 FSDP2 processes equals one process with 2
    accumulation micro-batches (the same slots, BatchNorm per slot): the same exact S_k each step (the
    per-sample norms' sums riding in the optimizer's one all-reduce) and the same weights."""
    from lb_dist.train import train
    d, _, _ = job
    one = tmp_path / "one"
    train(common(one, *CLARS_REF, "--clars-moments", "training-pass", "--accumulation-steps", "2",
                 "--backend", "single"))
    assert_params_close(final_model(d / "clars_tp"), final_model(one), rtol=1e-5, atol=1e-7)
    got = [r for r in read_metrics(d / "clars_tp" / "metrics.jsonl") if r["kind"] == "step"]
    want = [r for r in read_metrics(one / "metrics.jsonl") if r["kind"] == "step"]
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want):
        assert g["second_moment"] == pytest.approx(w["second_moment"], rel=1e-5)
        assert g["noise_scale_global"] == pytest.approx(w["noise_scale_global"], rel=1e-5)


def test_fsdp_resume_same_world_is_exact(job):
    d, runs, _ = job
    assert runs["clars_device_resumed"]["steps_per_call"] == [1, 2, 3]
    assert_params_close(final_model(d / "clars_device_resumed"), final_model(d / "clars_device"), rtol=0, atol=0)


def test_fsdp_checkpoint_saved_by_two_resumed_by_three(job):
    d, runs, runs3 = job
    assert runs["part"]["steps_per_call"] == [1] and runs3["part"]["steps_per_call"] == [3]
    assert (d / "part" / "checkpoints" / "fsdp" / "step-00000001" / ".metadata").is_file()
    manifest = json.loads((d / "part" / "checkpoints" / "step-00000001.manifest.json").read_text())
    assert any(name.startswith("fsdp/step-00000001/") for name in manifest["files"])   # DCP files checksummed
    full, resumed = final_model(d / "full"), final_model(d / "part")
    assert_params_close(resumed, full, rtol=0, atol=1e-5)
    start = torch.load(d / "part" / "checkpoints" / "step-00000001.pt", weights_only=True)["model"]
    moved = max((full[k] - start[k]).abs().max().item() for k in full)
    assert moved > 1e-3                                   # the resumed steps changed the weights


def test_fsdp_two_nodes_rehearsed_on_one_machine(job, tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 1 with a c10d rendezvous on 127.0.0.1: two launcher
    processes, each rank LOCAL_RANK 0 of its node. The same CLARS + device-mix training as the
    one-node job ends with the same weights: nothing assumes a single node (ranks, local ranks,
    data sharding, checkpoint paths)."""
    d, _, _ = job
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"name": "clars_device", "argv": common(tmp_path / "clars_device", *CLARS_REF,
                                                                       "--mix", "device", "--mix-std", "0.5")}]))
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "lb_dist_fsdp_rehearsal",
           str(REPO / "tests" / "_worker_train.py"), str(spec), "--backend", "fsdp"]
    nodes = [subprocess.Popen(cmd, env=child_env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = []
    try:
        for p in nodes:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[-3000:] for o in outputs)
    out = json.loads((tmp_path / "spec.json.out").read_text())
    assert out["world_size"] == 2 and out["backend"] == "fsdp"
    assert_params_close(final_model(tmp_path / "clars_device"), final_model(d / "clars_device"), rtol=0, atol=1e-6)


def test_fsdp_refuses_per_sample_moments_before_anything(tmp_path):
    """The command line under torchrun: a flag --backend fsdp cannot serve is refused once, naming it,
    before the run directory exists."""
    run_dir = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "lb_dist.train", "--backend", "fsdp",
           *common(run_dir, *CLARS_REF, "--clars-moments", "per-sample", "--per-sample-subset", "8")]
    proc = subprocess.run(cmd, env=child_env(), cwd=str(REPO), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert text.count("error: argument --clars-moments: per-sample is not available with --backend fsdp") == 1
    assert not run_dir.exists()
