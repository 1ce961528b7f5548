"""lb_dist.train in one process: flags, metrics file, schedule, loss, sample-wise GradientMix, checkpoints,
resume after a kill, corrupt checkpoints, non-finite steps. Distributed runs: test_train_distributed.py."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from _data import MULTI30K, fake_multi30k, needs_multi30k
from _train_runs import final_model, params_of
from _worker_launch import REPO, child_env
from _worker_train_reference import reference_sgd
from lb_dist.data import SyntheticImages, epoch_permutation
from lb_dist.models import build_model
from lb_dist.train import main, parse_args, train
from lb_dist.train import trainer as trainer_module
from lb_dist.train.checkpoint import (atomic_save, latest_checkpoint, list_checkpoints, load_checkpoint,
                                      manifest_path, write_manifest)
from lb_dist.train.metrics import EPOCH_FIELDS, STEP_FIELDS, read_metrics, topk_correct

torch.set_num_threads(1)

IMAGE, TRAIN, TEST, BATCH = 8, 96, 32, 32  # 3 steps per epoch


def common(run_dir, *extra):
    return ["--run-dir", str(run_dir), "--model", "resnet20", "--image-size", str(IMAGE), "--train-size", str(TRAIN),
            "--test-size", str(TEST), "--batch-size", str(BATCH), "--epochs", "1", "--no-progress",
            "--layer-stats-every", "1", "--eval-batch-size", "32", *extra]


def run_main(argv, capsys) -> tuple[int, str]:
    """``lb-dist train`` in this process: (exit status, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------------- flags
BAD_FLAGS = [
    (["--optimizer", "lars"], "--lr"),                                                   # no learning rate
    (["--lr", "1", "--base-lr", "0.1", "--base-batch-size", "128"], "--lr"),
    (["--base-lr", "0.1"], "--base-batch-size"),
    (["--lr", "1", "--optimizer", "clars"], "--clars-moments"),                          # 1 process, 1 micro-batch
    (["--lr", "1", "--optimizer", "sgd", "--mix", "device"], "--mix"),                  # device mix, 1 process
    (["--lr", "1", "--optimizer", "sgd", "--accumulation-steps", "5"], "--batch-size"),  # 32 % 5
    (["--lr", "1", "--optimizer", "adam", "--eta", "0.01"], "--eta"),
    (["--lr", "1", "--optimizer", "sgd", "--momentum", "1.5"], "--momentum"),
    (["--lr", "-1", "--optimizer", "sgd"], "--lr"),
    (["--lr", "1", "--optimizer", "sgd", "--model", "resnet7"], "--model"),
    (["--lr", "1", "--optimizer", "sgd", "--dataset", "cifar10"], "--data-dir"),
    (["--lr", "1", "--optimizer", "sgd", "--dataset", "cifar10", "--data-dir", "/nonexistent"], "--data-dir"),
    (["--lr", "1", "--optimizer", "sgd", "--model", "transformer_small"], "--model"),
    (["--lr", "1", "--optimizer", "sgd", "--mix-std", "0.5"], "--mix-std"),
    (["--lr", "1", "--optimizer", "sgd", "--schedule", "constant", "--decay-power", "3"], "--decay-power"),
    (["--lr", "1", "--optimizer", "sgd", "--warmup-epochs", "2"], "--warmup-epochs"),   # warmup >= run
    (["--lr", "1", "--optimizer", "sgd", "--batch-size", "128"], "--batch-size"),       # > training set
    (["--lr", "1", "--optimizer", "sgd", "--epochs", "0"], "--epochs"),
    (["--lr", "1", "--optimizer", "sgd", "--model-option", "nokey"], "--model-option"),
    # issue 16: refused by argparse (status 2, the flag named), no traceback
    (["--lr", "1", "--optimizer", "sgd", "--model-option", "foo=1"], "--model-option"),
    (["--lr", "1", "--optimizer", "sgd", "--model-option", "last_bn_gamma=x"], "--model-option"),
    (["--lr", "1", "--optimizer", "sgd", "--num-classes", "1"], "--num-classes"),
    (["--lr", "1", "--optimizer", "sgd", "--seed", str(2 ** 64)], "--seed"),
    (["--lr", "1", "--optimizer", "sgd", "--mix", "sample", "--mix-seed", "-1"], "--mix-seed"),
]


@pytest.mark.parametrize("extra,flag", BAD_FLAGS, ids=[f for _, f in BAD_FLAGS])
def test_bad_flag_is_refused_before_any_work(tmp_path, capsys, extra, flag):
    run = tmp_path / "run"
    code, err = run_main(common(run, *extra), capsys)
    assert code == 2
    assert f"error: argument {flag}" in err, err
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_deepspeed_flags_need_the_deepspeed_backend(tmp_path, capsys):
    for flag in (["--zero-stage", "2"], ["--bf16"], ["--deepspeed-config", "x.json"]):
        with pytest.raises(SystemExit) as e:
            parse_args(common(tmp_path / "r", "--lr", "1", "--backend", "single", *flag))
        assert e.value.code == 2
        assert f"argument {flag[0]}: only for --backend deepspeed" in capsys.readouterr().err


# ------------------------------------------------------------------------- a whole run
@pytest.fixture(scope="module")
def clars_run(tmp_path_factory):
    """CLARS, 2 accumulation micro-batches (micro-batch S_k), linear scaling + eq. 15 schedule, 2 epochs."""
    run = tmp_path_factory.mktemp("clars") / "run"
    argv = common(run, "--optimizer", "clars", "--base-lr", "0.1", "--base-batch-size", "8", "--accumulation-steps",
                  "2", "--warmup-steps", "2", "--decay-power", "2", "--lr-final-factor", "0.01", "--epochs", "2",
                  "--weight-decay", "5e-4", "--label-smoothing", "0.1", "--checkpoint-every-steps", "1",
                  "--keep-checkpoints", "3")
    summary = train(argv)
    return run, summary, read_metrics(run / "metrics.jsonl")


def test_metrics_schema(clars_run):
    run, summary, records = clars_run
    assert summary["step"] == 6 and not summary["stopped"]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [(e["epoch"], e["step"]) for e in epochs] == [(0, 3), (1, 6)]
    assert records.index(epochs[0]) == 3  # after the epoch's last step record
    for r in steps:
        assert set(r) <= set(STEP_FIELDS) and {"kind", "step", "epoch", "time", "lr", "loss", "skipped"} <= set(r)
        assert math.isfinite(r["loss"]) and r["skipped"] is False
    for e in epochs:
        assert set(e) <= set(EPOCH_FIELDS)
        assert {"train_loss", "test_loss", "test_top1", "test_top5", "samples_per_s"} <= set(e)
        assert 0 <= e["test_top1"] <= e["test_top5"] <= 1
    model = build_model("resnet20", num_classes=10)
    adapted = [n for n, p in model.named_parameters() if p.ndim > 1]  # param_groups: weights of conv/linear
    for r in steps:
        assert sorted(r["trust_ratio"]) == sorted(adapted)
        assert sorted(r["variance_factor"]) == sorted(adapted) == sorted(r["second_moment"])
        assert all(v is None or v > 0 for v in r["trust_ratio"].values())
        assert all(v is None or v >= 1.0 - 1e-9 for v in r["variance_factor"].values())  # M_k >= 1 (S >= ||G||^2)
    config = json.loads((run / "config.json").read_text())
    assert config["optimizer"] == "clars" and config["steps_per_epoch"] == 3 and config["world_size"] == 1
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4, 5, 6]  # --keep-checkpoints 3
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries


def test_logged_lr_follows_linear_scaling_and_eq15(clars_run):
    _, _, records = clars_run
    peak = 0.1 * BATCH / 8  # linear scaling rule
    T, W, final = 6, 2, 0.01 * peak

    def eq15(t):  # GradientMix eq. 15, p_warmup = 1, p_decay = 2, eta_init = 0
        if t <= W:
            return peak * t / W
        return final + (peak - final) * ((T - t) / (T - W)) ** 2

    lrs = [r["lr"] for r in records if r["kind"] == "step"]
    assert lrs == pytest.approx([eq15(t) for t in range(T)], rel=1e-12)


def test_epoch_evaluation_matches_the_final_checkpoint(clars_run):
    """The last epoch record's test loss / top-1 / top-5 are those of the model saved at that step,
    recomputed here in eval mode over the whole test split (plain cross-entropy, a loop for top-k)."""
    run, _, records = clars_run
    last = [r for r in records if r["kind"] == "epoch"][-1]
    state = load_checkpoint(run / "checkpoints" / f"step-{last['step']:08d}.pt")["model"]
    model = build_model("resnet20", num_classes=10)
    model.load_state_dict(state)
    model.eval()
    x, y = SyntheticImages(TEST, num_classes=10, image_shape=(3, IMAGE, IMAGE), seed=0, split="test").get_batch(
        torch.arange(TEST))
    with torch.no_grad():
        logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    ranks = [(logits[i] > logits[i, y[i]]).sum().item() for i in range(TEST)]   # classes scored above the label
    assert last["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert last["test_top1"] == pytest.approx(sum(r < 1 for r in ranks) / TEST, abs=1e-12)
    assert last["test_top5"] == pytest.approx(sum(r < 5 for r in ranks) / TEST, abs=1e-12)


@pytest.mark.parametrize("optimizer,wd_exclusion", [("nesterov", True), ("adamw", True), ("nesterov", False)])
def test_torch_optimizers_equal_a_written_out_loop(tmp_path, optimizer, wd_exclusion):
    """--optimizer nesterov / adamw with weight decay, with and without the exclusion of biases and
    normalization parameters (ndim <= 1 here), against torch's optimizers stepped in a plain loop."""
    lr = 0.05 if optimizer == "nesterov" else 0.003
    extra = ["--optimizer", optimizer, "--lr", str(lr), "--schedule", "constant", "--weight-decay", "0.01"]
    run = tmp_path / "run"
    train(common(run, *extra, *([] if wd_exclusion else ["--no-wd-exclusion"])))
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).train()
    decayed = [p for p in model.parameters() if p.ndim > 1 or not wd_exclusion]
    exempt = [p for p in model.parameters() if p.ndim <= 1 and wd_exclusion]
    groups = [{"params": decayed, "weight_decay": 0.01}] + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])
    if optimizer == "nesterov":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ds = SyntheticImages(TRAIN, num_classes=10, image_shape=(3, IMAGE, IMAGE), seed=0, split="train")
    order = epoch_permutation(TRAIN, 0, 0)
    for s in range(TRAIN // BATCH):
        x, y = ds.get_batch(order[s * BATCH:(s + 1) * BATCH])
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    got = params_of(final_model(run))
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_first_step_loss_is_the_global_batch_mean(clars_run):
    """The logged loss of step 1 = mean label-smoothed cross-entropy of the initial model over the
    global batch perm_0[:B], BatchNorm normalising per micro-batch of 16 (2 accumulation steps)."""
    _, _, records = clars_run
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).train()
    ds = SyntheticImages(TRAIN, num_classes=10, image_shape=(3, IMAGE, IMAGE), seed=0, split="train")
    batch = epoch_permutation(TRAIN, 0, 0)[:BATCH]
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y, reduction="none", label_smoothing=0.1)
                  for x, y in (ds.get_batch(batch[:16]), ds.get_batch(batch[16:]))]
    want = torch.cat(losses).mean().item()
    assert records[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_sample_wise_gradientmix_equals_reference(tmp_path):
    """One process, 2 accumulation micro-batches, sample-wise mixing == the plain-torch reference."""
    run = tmp_path / "run"
    train(common(run, "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--schedule", "constant",
                 "--accumulation-steps", "2", "--mix", "sample", "--mix-std", "0.5"))
    want = reference_sgd(steps=3, batch_size=BATCH, world_size=1, accumulation=2, lr=0.05, momentum=0.9,
                         train_size=TRAIN, image_size=IMAGE, mix="sample", mix_std=0.5)
    got = params_of(final_model(run))
    for k, v in params_of(want).items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- checkpoints
def resume_argv(run):
    # CLARS (micro-batch S_k with EMA), sample-wise mixing, warmup + decay: every kind of state
    return common(run, "--optimizer", "clars", "--lr", "0.5", "--accumulation-steps", "2", "--moments-ema", "0.5",
                  "--mix", "sample", "--warmup-steps", "2", "--epochs", "3", "--checkpoint-every-steps", "1",
                  "--weight-decay", "5e-4")


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    reference = tmp_path / "uninterrupted"
    train(resume_argv(reference))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lb_dist.train", *resume_argv(run), "--num-threads", "1"]
    proc = subprocess.Popen(cmd, env=child_env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list_checkpoints(run / "checkpoints")) >= 2:  # >= 2 complete steps written
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = list_checkpoints(run / "checkpoints")[-1][0]
    assert killed_at < 9
    again = subprocess.run(cmd, env=child_env(), cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    want, got = params_of(final_model(reference)), params_of(final_model(run))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    a, b = read_metrics(reference / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no record lost or duplicated
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    assert [r.get("train_loss") for r in a] == [r.get("train_loss") for r in b]


def test_stop_flag_then_resume_equals_uninterrupted(tmp_path):
    argv = common(tmp_path / "a", "--optimizer", "lamb", "--lr", "0.01", "--epochs", "2", "--warmup-steps", "1")
    train(argv)
    stopped = common(tmp_path / "b", "--optimizer", "lamb", "--lr", "0.01", "--epochs", "2", "--warmup-steps", "1",
                     "--stop-after-steps", "4")
    first = train(stopped)
    assert first["stopped"] and first["step"] == 4
    second = train(stopped)
    assert not second["stopped"] and second["step"] == 6
    want, got = params_of(final_model(tmp_path / "a")), params_of(final_model(tmp_path / "b"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_truncated_checkpoint_names_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    argv = common(run, "--optimizer", "sgd", "--lr", "0.05")
    train(argv)
    ckpt = latest_checkpoint(run / "checkpoints")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    code, err = run_main(argv, capsys)
    assert code == 1
    assert f"checkpoint {ckpt} is corrupt or truncated" in err
    ckpt.write_bytes(b"")
    code, err = run_main(argv, capsys)
    assert code == 1 and f"checkpoint {ckpt} is empty" in err
    atomic_save({"format": "something else"}, ckpt)
    code, err = run_main(argv, capsys)
    assert code == 1 and f"checkpoint {ckpt} is not an lb_dist.train checkpoint" in err


def test_checkpoint_that_does_not_fit_names_the_file(tmp_path, capsys):
    """A checkpoint whose model state lacks a tensor, or has one of another shape, or that lacks the
    optimizer: status 1 and a message naming the file; the file is left as it was."""
    run = tmp_path / "run"
    argv = common(run, "--optimizer", "sgd", "--lr", "0.05")
    train(argv)
    ckpt = latest_checkpoint(run / "checkpoints")
    good = load_checkpoint(ckpt)
    name = next(k for k in good["model"] if k.endswith("conv1.weight"))
    cases = [({**good, "model": {k: v for k, v in good["model"].items() if k != name}}, "does not fit this model"),
             ({**good, "model": {**good["model"], name: good["model"][name][:1]}}, "does not fit this model"),
             ({k: v for k, v in good.items() if k != "optimizer"}, "lacks optimizer")]
    for state, message in cases:
        atomic_save(state, ckpt)
        write_manifest(ckpt, good["trainer"]["step"])   # a well-formed checkpoint, of another model
        before = ckpt.read_bytes()
        code, err = run_main(argv, capsys)
        assert code == 1 and f"checkpoint {ckpt} {message}" in err and "Traceback" not in err, err
        assert ckpt.read_bytes() == before


def test_changed_flag_on_resume_and_resume_never(tmp_path, capsys):
    run = tmp_path / "run"
    argv = common(run, "--optimizer", "sgd", "--lr", "0.05")
    train(argv)
    code, err = run_main(common(run, "--optimizer", "sgd", "--lr", "0.07"), capsys)
    assert code == 2 and "error: argument --lr: 0.07 differs from 0.05 in the checkpoint" in err
    code, err = run_main(argv + ["--resume", "never"], capsys)
    assert code == 2 and "error: argument --resume" in err


def test_crash_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    atomic_save({"format": "x", "v": 1}, d / "step-00000001.pt")

    def explode(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"format": "x", "v": 2}, d / "step-00000002.pt")
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(d)] == [1]
    assert list(d.iterdir()) == [d / "step-00000001.pt"]  # the temporary is gone too
    (d / ".step-00000003.pt.tmp-999").write_bytes(b"torn")  # e.g. from a kill -9 mid-write
    assert latest_checkpoint(d) == d / "step-00000001.pt"


@pytest.mark.parametrize("optimizer", ["sgd", "lars", "clars"])
def test_non_finite_gradients_skip_steps_and_abort(tmp_path, monkeypatch, optimizer):
    """From the 3rd step on the loss is NaN: those steps are skipped (torch's SGD by the loop's check,
    LARS and CLARS by themselves; CLARS' micro-batch estimator skips its update instead of raising),
    the weights stay those of step 2, and after MAX_CONSECUTIVE_SKIPS the run stops with an error."""
    from lb_dist.train.workloads import ImageTask

    monkeypatch.setattr(trainer_module, "MAX_CONSECUTIVE_SKIPS", 3)
    calls = {"n": 0}
    original = ImageTask.losses
    micro_batches = 2 if optimizer == "clars" else 1   # CLARS: S_k from 2 accumulation micro-batches

    def poisoned(self, module, batch):
        losses, counts = original(self, module, batch)
        calls["n"] += 1
        return (losses * float("nan") if calls["n"] > 2 * micro_batches else losses), counts

    monkeypatch.setattr(ImageTask, "losses", poisoned)
    run = tmp_path / "run"
    with pytest.raises(trainer_module.TrainingDiverged, match="3 consecutive optimizer steps had non-finite"):
        train(common(run, "--optimizer", optimizer, "--lr", "0.05", "--epochs", "3", "--schedule", "constant",
                     "--checkpoint-every-steps", "1", "--keep-checkpoints", "10",
                     "--accumulation-steps", str(micro_batches)))
    steps = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["skipped"] for r in steps] == [False, False, True, True, True]
    after_two = params_of(load_checkpoint(run / "checkpoints" / "step-00000002.pt")["model"])
    last = params_of(final_model(run))  # step 4: two skipped steps later
    for k in after_two:
        assert torch.isfinite(last[k]).all()
        torch.testing.assert_close(last[k], after_two[k], rtol=0, atol=0)


def test_topk_correct_against_a_loop():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    got = topk_correct(logits, targets, ks=(1, 3, 5, 10))
    for k in (1, 3, 5, 10):
        want = sum(int(targets[i] in logits[i].argsort(descending=True)[:k].tolist()) for i in range(50))
        assert got[k] == want


# ------------------------------------------------------------------------- translation


def test_translation_losses_teacher_forced_without_the_models_own_loss():
    """TranslationTask feeds the decoder the shifted labels (no ``labels=``, so no discarded loss of
    the model's own) and gets the same per-sentence token sums as a forward with labels, also through
    a wrapper's ``.module`` (DDP)."""
    from lb_dist.models.transformer import build_transformer
    from lb_dist.train.workloads import TranslationTask

    torch.manual_seed(0)
    model = build_transformer("small", vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2, d_model=16,
                              encoder_layers=1, decoder_layers=1, attention_heads=2, ffn_dim=32, dropout=0.0)
    ids = torch.randint(3, 40, (3, 5))
    labels = torch.randint(3, 40, (3, 6))
    labels[1, 3:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kw):
            assert "labels" not in kw
            return self.module(**kw)

    task = TranslationTask(None, label_smoothing=0.1)
    ref = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels)
    mask = labels != -100
    tok = F.cross_entropy(ref.logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none",
                          label_smoothing=0.1).view(labels.shape)
    for module in (model, Wrapper(model)):
        losses, counts = task.losses(module, batch)
        assert torch.equal(losses, (tok * mask).sum(1)) and torch.equal(counts, mask.sum(1).float())
    assert TranslationTask._forward(model, batch).loss is None


def translation_argv(run, *extra):
    return ["--run-dir", str(run), "--model", "transformer_small", "--dataset", "multi30k", "--data-dir",
            str(MULTI30K), "--train-size", "64", "--test-size", "16", "--bleu-samples", "8", "--batch-size", "32",
            "--max-length", "24", "--vocab-size", "300", "--epochs", "1", "--no-progress", "--optimizer", "lamb",
            "--lr", "0.01", "--model-option", "d_model=32", "--model-option", "encoder_layers=1",
            "--model-option", "decoder_layers=1", "--model-option", "attention_heads=2",
            "--model-option", "ffn_dim=64", "--model-option", "dropout=0", "--layer-stats-every", "1", *extra]


@needs_multi30k
def test_multi30k_run_loss_metrics_and_tokenizer_check(tmp_path, capsys):
    """The first step's logged loss is the token mean of the Hugging Face model's own loss on the global
    batch; the epoch record has token accuracy and BLEU; a resumed run refuses another tokenizer."""
    from lb_dist.data import TranslationDataset, collate_translation, read_multi30k
    from lb_dist.text import load_tokenizer

    run = tmp_path / "run"
    summary = train(translation_argv(run))
    assert summary["step"] == 2
    records = read_metrics(run / "metrics.jsonl")
    epoch = [r for r in records if r["kind"] == "epoch"][0]
    assert 0 <= epoch["test_token_accuracy"] <= 1 and epoch["test_bleu"] >= 0 and math.isfinite(epoch["test_loss"])
    steps = [r for r in records if r["kind"] == "step"]
    assert steps[0]["trust_ratio"] and all(math.isfinite(r["loss"]) for r in steps)

    tokenizer = load_tokenizer(run / "tokenizer.json")
    ds = TranslationDataset(read_multi30k(MULTI30K, "train")[:64], tokenizer, max_length=24)
    batch = collate_translation([ds[i] for i in epoch_permutation(64, 0, 0)[:32].tolist()], pad_id=0)
    torch.manual_seed(0)
    model = build_model("transformer_small", vocab_size=tokenizer.get_vocab_size(), pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, max_positions=256, d_model=32, encoder_layers=1, decoder_layers=1,
                        attention_heads=2, ffn_dim=64, dropout=0.0).train()
    with torch.no_grad():
        want = model(**batch).loss.item()  # Hugging Face: mean over the non-padding target tokens
    assert steps[0]["loss"] == pytest.approx(want, rel=1e-5)

    # another tokenizer in the run directory: the resumed run refuses it, naming the file
    from lb_dist.text import train_tokenizer
    train_tokenizer(["ein anderer satz", "another sentence"] * 20, vocab_size=40, save_path=run / "tokenizer.json")
    argv = translation_argv(run)
    argv[argv.index("--epochs") + 1] = "1"
    code, err = run_main(argv, capsys)
    assert code == 1 and str(run / "tokenizer.json") in err and "does not match" in err


def test_console_script_dispatches_train_and_plot(tmp_path, capsys):
    from lb_dist.cli import main as cli_main
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0 and "--clars-moments" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--run-dir", str(tmp_path), "--optimizer", "sgd"])
    assert e.value.code == 2 and "lb-dist train: error: argument --lr" in capsys.readouterr().err
    out = (cli_main([]), capsys.readouterr().out)
    assert out[0] == 2 and "usage: lb-dist {train,plot,reproduce}" in out[1], out


def test_installed_console_script_runs(tmp_path):
    """The ``lb-dist`` executable pip installs next to this interpreter (pyproject's
    [project.scripts]) starts, dispatches and reports a bad flag with status 2."""
    exe = os.path.join(os.path.dirname(sys.executable), "lb-dist")
    assert os.access(exe, os.X_OK), f"{exe} is missing: the package is not installed with its console script"
    env = child_env()
    out = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "--clars-moments" in out.stdout, out.stderr
    bad = subprocess.run([exe, "train", "--run-dir", str(tmp_path / "r"), "--optimizer", "sgd"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "lb-dist train: error: argument --lr" in bad.stderr, bad.stderr


def test_build_model_takes_any_cifar_resnet_depth(tmp_path):
    """``resnetD`` for D = 6n+2 is the CIFAR ResNet of that depth (n basic blocks per stage), through
    lb_dist.models.build_model itself; resnet50 stays the ImageNet model; other depths are refused."""
    from lb_dist.models import CifarResNet, build_model, cifar_resnet_depth

    m = build_model("resnet8", num_classes=7, last_bn_gamma=0.0)
    assert isinstance(m, CifarResNet) and [len(m.layer1), len(m.layer2), len(m.layer3)] == [1, 1, 1]
    assert m.fc.out_features == 7 and float(m.layer1[0].bn2.weight.abs().sum()) == 0.0
    assert cifar_resnet_depth("resnet56") == 56 and cifar_resnet_depth("resnet1202") == 1202
    assert cifar_resnet_depth("resnet50") is None and type(build_model("resnet50")).__name__ == "ResNet"
    for bad in ("resnet10", "resnet2", "resnetx"):
        with pytest.raises(ValueError, match="6n\\+2"):
            build_model(bad)
    assert parse_args(common(tmp_path / "r", "--lr", "1", "--model", "resnet14")).model == "resnet14"
    with pytest.raises(SystemExit):
        parse_args(common(tmp_path / "r", "--lr", "1", "--model", "resnet10"))


# expected flags of every deepspeed_configs/ file (docs: deepspeed_configs/README.md, "With lb-dist train")
DS_CONFIG_FLAGS = {
    "clars_resnet50_imagenet_b16384.json": dict(optimizer="clars", lr=25.0, eta=0.01, weight_decay=1e-4,
                                                batch_size=16384, accumulation_steps=32, zero_stage=1, bf16=True,
                                                clars_moments="per-sample", schedule="poly", warmup_steps=0),
    "lars_resnet50_imagenet_b16384.json": dict(optimizer="lars", lr=25.0, eta=0.001, schedule="poly",
                                               warmup_steps=390, decay_power=2.0, zero_stage=1, bf16=True),
    "clars_resnet56_cifar10_b8192.json": dict(optimizer="clars", lr=6.4, weight_decay=5e-4, batch_size=8192,
                                              schedule="constant", zero_stage=1, bf16=None, mix="none"),
    "gradientmix_nesterov_resnet50_imagenet_b32k.json": dict(optimizer="nesterov", lr=7.05, momentum=0.97603,
                                                             weight_decay=5.8e-5, warmup_steps=706, warmup_power=2.0,
                                                             mix="device", mix_std=0.25, mix_seed=0),
    "gradientmix_lars_resnet50_imagenet_b32k.json": dict(optimizer="lars", lr=29.0, momentum=0.929, eta=0.001,
                                                         lr_final_factor=3.4482758620689654e-06, mix="device"),
    "gradientmix_adam_transformer_multi30k_b1024.json": dict(optimizer="adam", lr=0.008, betas=[0.9, 0.98],
                                                             eps=1e-9, schedule="inverse-sqrt", warmup_steps=250,
                                                             zero_stage=2, mix="device"),
    "gradientmix_lamb_transformer_multi30k_b1024.json": dict(optimizer="lamb", lr=0.008, betas=[0.9, 0.98], eps=1e-6,
                                                             weight_decay=0.01, schedule="inverse-sqrt",
                                                             warmup_steps=250, mix="device", mix_noise="gaussian"),
}


@pytest.mark.parametrize("name", sorted(DS_CONFIG_FLAGS))
def test_deepspeed_configs_become_flags(tmp_path, name):
    """Every file of deepspeed_configs/ translates into lb-dist train's flags (--deepspeed-config), without
    starting anything; a flag given on the command line wins over the file."""
    path = REPO / "deepspeed_configs" / name
    model = ["--model", "transformer_small", "--dataset", "multi30k", "--data-dir", str(tmp_path)] \
        if "transformer" in name else ["--model", "resnet20"]
    args = parse_args(["--run-dir", str(tmp_path / "r"), "--backend", "deepspeed", "--deepspeed-config", str(path),
                       *model])
    for key, want in DS_CONFIG_FLAGS[name].items():
        assert getattr(args, key) == want, (key, getattr(args, key), want)
    assert args.deepspeed_file.notes == []
    args = parse_args(["--run-dir", str(tmp_path / "r"), "--backend", "deepspeed", "--deepspeed-config", str(path),
                       *model, "--batch-size", "64", "--lr", "0.5", "--zero-stage", "0", "--no-bf16"])
    assert (args.batch_size, args.lr, args.zero_stage, args.bf16) == (64, 0.5, 0, False)
    assert any("overridden by --batch-size 64" in n for n in args.deepspeed_file.notes)


@pytest.mark.parametrize("config,match", [
    ({"optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}}, "optimizer.type 'OneBitAdam'"),
    ({"optimizer": {"type": "LARS", "params": {"lr": 1.0, "nesterov": True}}}, "optimizer.params.nesterov = true for LARS"),
    ({"optimizer": {"type": "CLARS", "params": {"lr": 1.0, "nesterov": False}}}, "Nesterov momentum whenever"),
    ({"optimizer": {"type": "CLARS", "params": {"lr": 1.0, "trust_clip": 1}}}, "optimizer.params.trust_clip"),
    ({"scheduler": {"type": "WarmupLR", "params": {}}}, "scheduler.type 'WarmupLR'"),
    ({"gradient_mix": {"noise": "uniform"}}, "gradient_mix"),
    ({"train_batch_size": "auto"}, "train_batch_size must be a positive integer"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
])
def test_deepspeed_config_errors_name_the_key(tmp_path, capsys, config, match):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        parse_args(["--run-dir", str(tmp_path / "r"), "--backend", "deepspeed", "--deepspeed-config", str(path),
                    "--lr", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --deepspeed-config: {path}" in err and match in err, err


def test_detect_backend_from_the_launchers_environment():
    """The environments the launchers set (seen under the real launchers in the distributed tests)."""
    from lb_dist.train import detect_backend

    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert detect_backend({}) == "single"
    assert detect_backend({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}) == "horovod"                 # horovodrun --gloo
    assert detect_backend({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}) == "horovod"  # --mpi / mpirun
    assert detect_backend({"OMPI_COMM_WORLD_SIZE": "1"}) == "single"
    assert detect_backend({**env, "TORCHELASTIC_RUN_ID": "x", "LOCAL_SIZE": "2"}) == "torchrun"
    assert detect_backend(env, local_rank_flag=0) == "deepspeed"                                   # --local_rank=0
    assert detect_backend({**env, "CROSS_RANK": "0", "LOCAL_SIZE": "2"}) == "deepspeed"            # --no_local_rank
    assert detect_backend(env) == "torchrun"


# ----------------------------------------------------------------- bad data: one line naming the file
def _fake_translation_argv(run, data, *extra):
    argv = translation_argv(run, *extra)
    argv[argv.index("--data-dir") + 1] = str(data)
    argv[argv.index("--vocab-size") + 1] = "40"
    return argv


def test_malformed_multi30k_and_tokenizer_files_are_named(tmp_path, capsys):
    """Bad data and a corrupt or missing tokenizer of a resumed run end in status 1 and one
    ``lb-dist train: error:`` line naming the file, not a traceback."""
    data = fake_multi30k(tmp_path / "m30k")
    run = tmp_path / "run"
    assert train(_fake_translation_argv(run, data))["step"] == 2
    again = _fake_translation_argv(run, data)      # the same command: resumes (and loads the tokenizer)
    tok = run / "tokenizer.json"
    tok.write_text("{not json", encoding="utf-8")
    code, err = run_main(again, capsys)
    assert code == 1 and f"error: {tok} is not a tokenizers JSON file" in err and "Traceback" not in err, err
    tok.unlink()
    code, err = run_main(again, capsys)
    assert code == 1 and f"{tok}: the tokenizer of the run being resumed is missing" in err, err

    (data / "train.de").write_text("ein hund\n", encoding="utf-8")          # 1 line against 64
    code, err = run_main(_fake_translation_argv(tmp_path / "run2", data), capsys)
    assert code == 1 and f"{data / 'train.en'} has 64 lines but {data / 'train.de'} has 1" in err, err
    (data / "train.de").write_bytes(b"\xff\xfe bad")
    code, err = run_main(_fake_translation_argv(tmp_path / "run3", data), capsys)
    assert code == 1 and f"{data / 'train.de'} is not UTF-8 text" in err, err


def test_imagenet_folders_are_data_dir_train_and_val(tmp_path, capsys):
    """--dataset imagenet reads DATA/train/<class>/ and DATA/val/<class>/ (docs/training.md): a missing
    split names its folder; with DATA/train present the next check is torchvision's (not a
    DATA/train/train folder)."""
    data = tmp_path / "imagenet"
    data.mkdir()
    argv = common(tmp_path / "run", "--optimizer", "sgd", "--lr", "0.1", "--dataset", "imagenet",
                  "--data-dir", str(data))
    code, err = run_main(argv, capsys)
    assert code == 1 and f"imagenet: {data / 'train'} does not exist" in err, err
    (data / "train" / "n01").mkdir(parents=True)
    (data / "val" / "n01").mkdir(parents=True)
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or its C ops fail to load with this torch
        code, err = run_main(argv, capsys)
        assert code == 1 and "needs torchvision" in err and "does not exist" not in err, err
    else:
        code, err = run_main(argv, capsys)   # empty class folders: ImageFolder finds no images, named
        assert code == 1 and str(data / "train") in err and "train/train" not in err, err


def test_cifar10_files_through_the_trainer(tmp_path):
    """--dataset cifar10 on python-format files: the first step's logged loss is the mean cross-entropy
    of the initial model over perm_0[:B] of the first --train-size images, read here from the pickles
    with numpy and normalised with the CIFAR statistics written out in this test."""
    from test_data import make_cifar10

    files = make_cifar10(tmp_path / "cifar", n=20)                       # 100 training, 20 test images
    run = tmp_path / "run"
    summary = train(["--run-dir", str(run), "--model", "resnet20", "--dataset", "cifar10", "--data-dir",
                     str(tmp_path / "cifar"), "--train-size", "64", "--batch-size", "32", "--epochs", "1",
                     "--no-augment", "--no-progress", "--optimizer", "lars", "--lr", "0.5", "--eval-batch-size", "10"])
    assert summary["step"] == 2
    records = read_metrics(run / "metrics.jsonl")
    epoch = [r for r in records if r["kind"] == "epoch"][0]
    assert math.isfinite(epoch["test_loss"]) and epoch["test_top1"] in {i / 20 for i in range(21)}
    import numpy as np
    data = np.concatenate([files[f"data_batch_{i}"][0] for i in range(1, 6)])[:64]
    labels = torch.tensor(sum((files[f"data_batch_{i}"][1] for i in range(1, 6)), []))[:64]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    x = (torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255 - mean) / std
    batch = epoch_permutation(64, 0, 0)[:32]
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).train()
    with torch.no_grad():
        want = F.cross_entropy(model(x[batch]), labels[batch]).item()
    first = [r for r in records if r["kind"] == "step"][0]
    assert first["loss"] == pytest.approx(want, rel=1e-4)


def test_tensorboard_on_without_tensorboard_is_one_line(tmp_path, capsys):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    code, err = run_main(common(tmp_path / "run", "--optimizer", "sgd", "--lr", "0.1", "--tensorboard", "on"), capsys)
    assert code == 1 and "--tensorboard on: the tensorboard package is not installed" in err, err


def test_metrics_history_is_never_deleted_on_resume(tmp_path):
    """Issue 16: a bad line in metrics.jsonl used to cut the history at that line on resume. Now every
    record up to the checkpoint's step is kept, and what is taken out (the bad line, the records of
    the steps the resumed run replays, a torn last line) is set aside in metrics.discarded.jsonl."""
    from lb_dist.train.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "step", "step": s, "loss": 1.0 / s} for s in range(1, 7)]
    lines = [json.dumps(r) for r in records]
    lines.insert(2, "{not json")
    path.write_text("\n".join(lines) + '\n{"kind": "step", "st')          # torn by a kill mid-write
    with pytest.warns(RuntimeWarning, match="line\\(s\\) 3 are not JSON records"):
        logger = MetricsLogger(tmp_path, enabled=True, resume_step=4, tensorboard="off")
    logger.write({"kind": "step", "step": 5, "loss": 0.2})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    aside = (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    assert "{not json" in aside and '{"kind": "step", "st' in aside
    assert json.dumps(records[4]) in aside and json.dumps(records[5]) in aside
    with pytest.warns(RuntimeWarning, match="line 2 is not a JSON record"):
        (tmp_path / "m2.jsonl").write_text('{"step": 1}\nbad\n{"step": 2}\n')
        assert [r["step"] for r in read_metrics(tmp_path / "m2.jsonl")] == [1, 2]
