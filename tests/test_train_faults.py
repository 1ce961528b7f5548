"""Fault injection for lb_dist.train (issue 16): kills inside checkpoint writes, damaged and renamed
checkpoint files, a failing rank, a killed launcher, signals. Every case asserts that nothing is lost:
the rerun of the same command ends where the uninterrupted run ends, bit for bit (parameters, buffers,
every metric record), or the damage is refused with an error naming the file before any work.

The kills inside a write use the test-only hook ``lb_dist._io.FAULT_ENV``: the process SIGKILLs itself
after half of the file's bytes reached the temporary file, so the atomic path meets a real crash.
docs/training.md, "What survives what", summarises the cases.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_runs import assert_resume_exact
from _worker_launch import REPO, child_env, free_port
from lb_dist._io import FAULT_ENV
from lb_dist.train import main, train
from lb_dist.train.checkpoint import (atomic_save, checkpoint_path, latest_checkpoint, list_checkpoints,
                                      load_checkpoint, manifest_path, write_manifest)

torch.set_num_threads(1)
BIN = Path(sys.executable).parent


def argv(run, *extra):
    """CLARS (micro-batch S_k with EMA), sample-wise mixing, warmup + decay, a checkpoint every step:
    every kind of state; 2 epochs of 3 steps."""
    return ["--run-dir", str(run), "--model", "resnet20", "--image-size", "8", "--train-size", "96", "--test-size",
            "32", "--batch-size", "32", "--epochs", "2", "--no-progress", "--layer-stats-every", "1",
            "--eval-batch-size", "32", "--optimizer", "clars", "--lr", "0.5", "--accumulation-steps", "2",
            "--moments-ema", "0.5", "--mix", "sample", "--warmup-steps", "2", "--checkpoint-every-steps", "1",
            "--weight-decay", "5e-4", "--num-threads", "1", *extra]


def cli(args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = child_env()
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "lb_dist.train", *args], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout)


def run_main(args, capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "uninterrupted"
    train(argv(run))
    return run


# ------------------------------------------------------------------------- kills inside writes
@pytest.mark.parametrize("target", ["step-00000004.pt", "step-00000004.manifest.json"])
def test_kill_inside_a_checkpoint_write_loses_nothing(reference, tmp_path, target):
    """SIGKILL halfway through writing step 4's checkpoint file, or its manifest (the commit): the
    directory's latest checkpoint stays step 3 (a .pt without its manifest never counts), and the
    rerun ends bit for bit where the uninterrupted run ends."""
    run = tmp_path / "run"
    proc = cli(argv(run), {FAULT_ENV: target})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")][-1] == 3
    leftovers = sorted(p.name for p in (run / "checkpoints").iterdir() if "00000004" in p.name)
    assert [n.split(".tmp-")[0] for n in leftovers] == (
        [".step-00000004.pt"] if target.endswith(".pt") else [".step-00000004.manifest.json", "step-00000004.pt"])
    again = cli(argv(run))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr and "step-00000003.pt" in again.stderr
    assert_resume_exact(reference, run)


# ------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture()
def stopped(tmp_path):
    """A run stopped after 4 steps (checkpoints of steps 3 and 4 kept)."""
    run = tmp_path / "run"
    summary = train(argv(run, "--stop-after-steps", "4"))
    assert summary["stopped"] and summary["step"] == 4
    return run


def test_corrupted_weights_are_refused_naming_the_file(stopped, capsys):
    """A weight changed in place (as flipped bits that still load) fails the checksum: status 1, the
    file named, the hint to delete it; deleting it resumes from the previous checkpoint."""
    ckpt = latest_checkpoint(stopped / "checkpoints")
    state = torch.load(ckpt, weights_only=True)
    name = next(k for k in state["model"] if k.endswith("conv1.weight"))
    raw = ckpt.read_bytes()
    pattern = state["model"][name].contiguous().view(-1)[:16].numpy().tobytes()
    at = raw.index(pattern)
    flipped = bytearray(raw)
    for i in range(0, len(pattern), 4):                       # the lowest mantissa bit of 16 weights
        flipped[at + i] ^= 1
    ckpt.write_bytes(bytes(flipped))
    assert not torch.equal(torch.load(ckpt, weights_only=True)["model"][name], state["model"][name])  # loads
    code, err = run_main(argv(stopped), capsys)
    assert code == 1 and f"checkpoint {ckpt}: {ckpt} is corrupt (its SHA-256 differs" in err, err
    assert "delete it to resume from the previous checkpoint" in err and "Traceback" not in err


def test_non_finite_weights_are_refused_naming_the_tensor(stopped, capsys):
    ckpt = latest_checkpoint(stopped / "checkpoints")
    state = torch.load(ckpt, weights_only=True)
    name = next(k for k in state["model"] if k.endswith("conv1.weight"))
    state["model"][name].view(-1)[3] = float("nan")
    atomic_save(state, ckpt)
    write_manifest(ckpt, 4)                                  # a consistent manifest: the content is refused
    code, err = run_main(argv(stopped), capsys)
    assert code == 1 and f"checkpoint {ckpt}: model tensor {name} is not finite" in err, err


def test_a_renamed_checkpoint_is_never_resumed_nor_prunes_newer_ones(stopped, reference, capsys):
    """A step-3 checkpoint copied under a higher step's name (with or without its manifest) is not a
    checkpoint of that step: the run resumes from its real latest (step 4), pruning (--keep-checkpoints
    2) keeps the real newest checkpoints, and the result equals the uninterrupted run."""
    d = stopped / "checkpoints"
    shutil.copy(checkpoint_path(d, 3), checkpoint_path(d, 90))
    shutil.copy(checkpoint_path(d, 3), checkpoint_path(d, 91))
    shutil.copy(manifest_path(checkpoint_path(d, 3)), manifest_path(checkpoint_path(d, 91)))
    assert [s for s, _ in list_checkpoints(d)] == [3, 4]
    with pytest.raises(Exception, match="holds step 3, not the step 90 of its name"):
        load_checkpoint(checkpoint_path(d, 90))
    summary = train(argv(stopped))
    assert summary["step"] == 6 and not summary["stopped"]
    assert [s for s, _ in list_checkpoints(d)] == [5, 6]
    assert checkpoint_path(d, 90).exists() and checkpoint_path(d, 91).exists()   # not ours to delete
    assert_resume_exact(reference, stopped)


def test_run_dir_or_checkpoints_being_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, err = run_main(argv(f), capsys)
    assert code == 2 and f"argument --run-dir: {f} is a file" in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("x")
    code, err = run_main(argv(run), capsys)
    assert code == 2 and f"argument --run-dir: {run / 'checkpoints'} is a file" in err


# ------------------------------------------------------------------------- the run directory's lock
def test_a_second_live_job_on_the_run_dir_is_refused_and_a_stale_lock_is_not(tmp_path, capsys):
    import socket
    run = tmp_path / "run"
    code = ("import sys, time; from lb_dist.train._process import RunDirLock; RunDirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True,
                              env=child_env(), cwd=str(REPO))
    try:
        assert holder.stdout.readline().strip() == "held"
        code_, err = run_main(argv(run, "--stop-after-steps", "1"), capsys)
        assert code_ == 1 and "is in use by another live job" in err, err
        assert f"host {socket.gethostname()}, pid {holder.pid}" in err
        assert not (run / "checkpoints").exists()                 # refused before any work
    finally:
        holder.kill()                                             # a crashed holder: the lock is stale
        holder.wait()
    code_, err = run_main(argv(run, "--stop-after-steps", "1"), capsys)
    assert code_ == 0, err


# ------------------------------------------------------------------------- launchers, signals, a failing rank
def _torchrun_job(run) -> subprocess.Popen:
    """A long 2-rank torchrun job (it would train for minutes) that has written its first checkpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "lb_dist.train",
           *argv(run, "--epochs", "400", "--optimizer", "sgd", "--lr", "0.01", "--mix", "none",
                 "--moments-ema", "0")]
    proc = subprocess.Popen(cmd, env=child_env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list_checkpoints(run / "checkpoints"):
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    return proc


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _gone_within(pids, seconds: float) -> float:
    start = time.time()
    while time.time() - start < seconds and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return time.time() - start


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("how", ["kill -9 launcher", "SIGINT"])
def test_workers_stop_with_their_launcher(tmp_path, how):
    """kill -9 of torchrun: its workers used to train to the end; now they stop within seconds.
    SIGINT (Ctrl-C) to torchrun: every rank ends within seconds (it took torchrun's 30 s before)."""
    run = tmp_path / "run"
    proc = _torchrun_job(run)
    workers = _children(proc.pid)
    assert len(workers) == 2
    try:
        os.kill(proc.pid, signal.SIGKILL if how.startswith("kill") else signal.SIGINT)
        took = _gone_within(workers, 20)
        assert not any(_alive(p) for p in workers), f"workers still running {took:.1f} s after {how}"
        assert took < 8, took
        if how == "SIGINT":
            proc.wait(timeout=20)
    finally:
        for p in [proc.pid, *workers]:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        proc.wait()
    assert list_checkpoints(run / "checkpoints")       # what was committed stays


@pytest.mark.skipif(not (BIN / "deepspeed").exists(), reason="the deepspeed launcher is not installed")
def test_one_rank_failing_to_resume_ends_the_job_promptly(tmp_path):
    """A truncated per-rank DeepSpeed optimizer file: the job ends in seconds (it waited for gloo's 600 s
    timeout), with one error line naming the file; after deleting the damaged checkpoint the run resumes
    from the previous one."""
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    env = child_env()
    env.setdefault("DS_ACCELERATOR", "cpu")
    base = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "lb_dist.train",
            *argv(run, "--backend", "deepspeed", "--zero-stage", "2", "--optimizer", "lars", "--mix", "device",
                  "--eta", "0.02", "--lr", "0.1", "--moments-ema", "0")]
    first = subprocess.run([*base, "--stop-after-steps", "2"], env=env, cwd=str(REPO), capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    damaged = next((run / "checkpoints" / "deepspeed" / "step-00000002").glob("zero_pp_rank_1_*optim_states.pt"))
    damaged.write_bytes(damaged.read_bytes()[:1000])
    base[4] = str(free_port())
    start = time.time()
    again = subprocess.run(base, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    took = time.time() - start
    assert again.returncode != 0
    errors = [line for line in again.stderr.splitlines() if "lb_dist.train: error:" in line]
    assert len(errors) == 1 and str(damaged) in errors[0] and "truncated" in errors[0], again.stderr[-3000:]
    assert took < 120, took                                  # startup included; the hang was 600 s



# ------------------------------------------------------------------------- one process: the resume matrix
SINGLE = {
    "clars_per_sample": ["--optimizer", "clars", "--clars-moments", "per-sample", "--per-sample-subset", "8",
                         "--lr", "0.5"],
    "lars_sample_mix": ["--optimizer", "lars", "--lr", "0.1", "--eta", "0.02", "--mix", "sample",
                        "--accumulation-steps", "2"],
    "adamw": ["--optimizer", "adamw", "--lr", "0.003", "--accumulation-steps", "2"],
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_process_resume_matrix_is_exact(tmp_path, name):
    """Stopped after every step (mid-epoch) and resumed: bit for bit the uninterrupted run (the CLARS
    micro-batch + EMA + sample-mix case is test_kill_inside_a_checkpoint_write_loses_nothing's)."""
    def args(run, *extra):
        return ["--run-dir", str(run), "--model", "resnet20", "--image-size", "8", "--train-size", "96",
                "--test-size", "32", "--batch-size", "32", "--epochs", "1", "--no-progress", "--layer-stats-every",
                "1", "--eval-batch-size", "32", "--num-threads", "1", "--weight-decay", "5e-4", *SINGLE[name], *extra]
    train(args(tmp_path / "a"))
    calls = []
    while True:
        summary = train(args(tmp_path / "b", "--stop-after-steps", "1"))
        calls.append(summary["step"])
        if not summary["stopped"]:
            break
    assert calls == [1, 2, 3]
    assert_resume_exact(tmp_path / "a", tmp_path / "b", calls)
