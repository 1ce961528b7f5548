"""The README's main job (`make demo` = `python -m lb_dist.demo`) end to end, at a tiny size: the real
torchrun launcher, 2 gloo processes, three lb_dist.train runs in one process group (LARS + warmup, CLARS
with micro-batch S_k from the DDP hook, CLARS + device-wise GradientMix), the table, results.json and the
figures of lb-dist plot."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from lb_dist.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_all_three_configurations(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "lb_dist.demo", "--epochs", "2", "--batch-size", "256", "--train-size", "1024",
         "--test-size", "256", "--image-size", "16", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"lars+warmup", "clars", "clars+gradientmix"}
    for run, r in results.items():
        assert r["finite"], run
        assert len(r["train_loss_per_epoch"]) == 2
        assert all(math.isfinite(v) for v in r["train_loss_per_epoch"]), run
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["skipped_steps"] == 0
        records = read_metrics(out / "runs" / run / "metrics.jsonl")
        assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 9))
    # CLARS needs no warmup: after 2 epochs its training loss is below chance level (ln 10), and below
    # that of LARS, which spends the run warming up.
    assert results["clars"]["final_train_loss"] < math.log(10)
    assert results["clars"]["final_train_loss"] < results["lars+warmup"]["final_train_loss"]
    # the comparison table and the figures
    table = proc.stdout[proc.stdout.index("loss after epoch 1"):]
    for run in results:
        assert run in table
    for name in ("curves.png", "variance_factor.png", "trust_ratio.png"):
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    # the M_k of the CLARS runs are logged per layer
    steps = [r for r in read_metrics(out / "runs" / "clars" / "metrics.jsonl") if r["kind"] == "step"]
    assert any(r.get("variance_factor") for r in steps)


def test_demo_multi30k_workload(tmp_path):
    """``--workload multi30k`` (the small Transformer, LAMB + warmup vs CLARS vs CLARS + GradientMix)
    on tiny Multi30k-format files: every run finishes with finite losses, a token accuracy and a BLEU
    score, and the table lists them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _data import fake_multi30k

    data = fake_multi30k(tmp_path / "m30k", n=128)
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "lb_dist.demo", "--workload", "multi30k", "--data-dir", str(data), "--epochs", "2",
         "--batch-size", "64", "--train-size", "128", "--test-size", "16", "--bleu-samples", "8", "--out", str(out),
         "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    from lb_dist.demo import TRANSFORMER_RUNS
    assert set(results) == set(TRANSFORMER_RUNS)
    for run, r in results.items():
        assert r["finite"] and r["skipped_steps"] == 0, run
        assert len(r["train_loss_per_epoch"]) == 2 and all(math.isfinite(v) for v in r["train_loss_per_epoch"])
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["test_bleu"] <= 100.0
        flags = r["flags"]
        assert flags[flags.index("--model") + 1] == "transformer_small"
        assert (out / "runs" / run / "tokenizer.json").is_file()
    table = proc.stdout[proc.stdout.index("loss after epoch 1"):]
    assert "BLEU" in table and all(run in table for run in results)
