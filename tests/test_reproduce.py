"""``lb-dist reproduce``: the kit end to end at smoke scale (real ``lb-dist train`` subprocesses on tiny
Multi30k-format files), its resume (finished runs are not redone), and the aggregation against means
and sample standard deviations computed by hand."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _data import fake_multi30k

from lb_dist import reproduce as R

REPO = Path(__file__).resolve().parents[1]


def _epoch(step, epoch, train, val, bleu, time=1.0):
    return {"kind": "epoch", "step": step, "epoch": epoch, "time": time, "train_loss": train, "test_loss": val + 1,
            "val_loss": val, "test_bleu": bleu}


def _write_run(d: Path, records):
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_mean_std_by_hand():
    m = R.mean_std([1.0, 2.0, 4.0])
    # mean 7/3; sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 42/18 = 7/3
    assert m["n"] == 3 and m["mean"] == pytest.approx(2.3333333333) and m["std"] == pytest.approx(1.5275252317)
    assert R.mean_std([5.0]) == {"mean": 5.0, "std": None, "n": 1}
    assert R.mean_std([None, float("nan")]) == {"mean": None, "std": None, "n": 0}


def test_aggregate_against_hand_computed(tmp_path):
    """Three seeds of one configuration with hand-written metrics: every table entry checked against
    numbers worked out here; the unfinished run of a fourth seed is left out; the sweep's selection."""
    scale = R.Scale(common=("--epochs", "2"), loss_threshold=3.0, train_threshold=4.0,
                    configs=(R.Config("a", (), (0.1, 0.2)),))
    c = scale.configs[0]
    steps = lambda losses: [{"kind": "step", "step": i + 1, "epoch": 0, "loss": x} for i, x in enumerate(losses)]
    # seed 0 (rate 0.2): val 3.5 -> 2.5, train 4.0 -> 2.0, BLEU 10; train losses reach a running mean <= 4 at step 2
    _write_run(R.run_dir(tmp_path, c, 0.2, 0), steps([5.0, 3.0, 2.0]) + [_epoch(10, 0, 4.0, 3.5, 5.0),
                                                                         _epoch(20, 1, 2.0, 2.5, 10.0)])
    _write_run(R.run_dir(tmp_path, c, 0.2, 1), steps([6.0, 5.0, 3.0]) + [_epoch(10, 0, 4.5, 2.9, 6.0),
                                                                         _epoch(20, 1, 2.2, 2.8, 12.0)])
    _write_run(R.run_dir(tmp_path, c, 0.2, 2), steps([9.0, 9.0, 9.0]) + [_epoch(10, 0, 5.0, 4.0, 1.0),
                                                                         _epoch(20, 1, 2.4, 3.3, 17.0)])
    _write_run(R.run_dir(tmp_path, c, 0.2, 3), [_epoch(10, 0, 1.0, 1.0, 99.0)])       # unfinished: not counted
    _write_run(R.run_dir(tmp_path, c, 0.1, 0), [_epoch(10, 0, 4.0, 3.6, 1.0), _epoch(20, 1, 3.0, 2.7, 2.0)])
    res = R.aggregate(tmp_path, scale, {"a": 0.2}, [0, 1, 2, 3])
    (entry,) = res["configs"]
    m = entry["metrics"]
    assert entry["seeds"] == [0, 1, 2]
    assert entry["sweep"] == {"0.1": pytest.approx(2.7), "0.2": pytest.approx(2.5)}
    # final val loss 2.5, 2.8, 3.3: mean 8.6/3 = 2.8667, deviations -0.3667, -0.0667, 0.4333:
    # variance (0.13444 + 0.00444 + 0.18778) / 2 = 0.16333, std 0.40415
    assert m["final_val_loss"]["mean"] == pytest.approx(2.8666667) and m["final_val_loss"]["std"] == pytest.approx(0.4041452)
    # BLEU 10, 12, 17: mean 13, variance (9 + 1 + 16) / 2 = 13, std 3.6056
    assert m["final_bleu"]["mean"] == pytest.approx(13.0) and m["final_bleu"]["std"] == pytest.approx(math.sqrt(13))
    # gap val - train: 0.5, 0.6, 0.9: mean 2/3, variance (0.02778 + 0.00444 + 0.05444) / 2 = 0.04333
    assert m["generalization_gap"]["mean"] == pytest.approx(0.6666667)
    assert m["generalization_gap"]["std"] == pytest.approx(math.sqrt(0.0433333), rel=1e-5)
    # val per epoch: epoch 0 (3.5, 2.9, 4.0): mean 3.4667, std 0.55076; epoch 1 as the final loss
    assert m["val_loss_per_epoch"][0]["mean"] == pytest.approx(3.4666667)
    assert m["val_loss_per_epoch"][0]["std"] == pytest.approx(0.5507571)
    # steps to val loss <= 3.0: seed 0 at step 20 (epoch 1), seed 1 at step 10, seed 2 at no epoch end
    assert m["steps_to_threshold"]["reached"] == 2 and m["steps_to_threshold"]["mean"] == pytest.approx(15.0)
    # running mean of the step losses <= 4.0: seed 0: 5, 4 -> step 2; seed 1: 6, 5.5, 4.667 -> never
    assert m["steps_to_train_threshold"]["reached"] == 1 and m["steps_to_train_threshold"]["mean"] == 2
    md = R.results_markdown({**res, "experiment": "x", "scale": "smoke"})
    assert "2.867 ± 0.404" in md and "13.00 ± 3.61" in md and "(2/3 reached)" in md


@pytest.mark.parametrize("experiment,scale", [(e, s) for e, scales in R.EXPERIMENTS.items() for s in scales
                                                if s != "paper"])
def test_declared_runs_are_valid_train_flags(tmp_path, experiment, scale):
    """Every run a CPU or smoke scale declares parses and passes ``lb-dist train``'s checks (a typo in the
    experiment table fails here, not hours into a background run)."""
    from lb_dist.train.config import parse_args
    sc = R.EXPERIMENTS[experiment][scale]
    (tmp_path / sc.dataset).mkdir()
    for config in sc.configs:
        for lr in config.lrs:
            cmd = R.train_command(sc, config, lr, 0, tmp_path / "run", tmp_path, threads=1)
            flags = cmd[cmd.index("lb_dist.train") + 1:]
            args = parse_args(flags, world_size=config.nproc)
            assert args.seed == 0 and (lr is None or args.lr == lr)


def test_paper_scale_refused_without_data(tmp_path):
    """The papers' settings are declared with the deepspeed_configs/ files; missing data is refused
    before any run, naming --data-dir and the dataset."""
    for exp in ("warmup", "warmup-imagenet", "gradientmix", "gradientmix-multi30k"):
        for c in R.EXPERIMENTS[exp]["paper"].configs:
            for i, flag in enumerate(c.flags):
                if flag == "--deepspeed-config":
                    assert Path(c.flags[i + 1]).is_file()
    r = subprocess.run([sys.executable, "-m", "lb_dist.cli", "reproduce", "gradientmix", "--scale", "paper",
                        "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 2
    assert f"--data-dir {tmp_path}: the imagenet dataset is missing" in r.stderr
    assert not (tmp_path / "o" / "runs").exists()


def test_smoke_end_to_end_and_resume(tmp_path):
    """``lb-dist reproduce warmup --scale smoke`` trains its sweep and seeds as lb-dist train runs,
    selects each configuration's rate on the final val loss, aggregates what the runs wrote (checked
    against the runs' own metrics files here), draws the figures; a rerun trains nothing."""
    data = tmp_path / "data"
    fake_multi30k(data / "multi30k", n=64)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lb_dist.cli", "reproduce", "warmup", "--scale", "smoke", "--seeds", "2",
           "--jobs", "2", "--out", str(out), "--data-dir", str(data)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    scale = R.EXPERIMENTS["warmup"]["smoke"]
    assert [c["name"] for c in res["configs"]] == [c.name for c in scale.configs]
    for c, entry in zip(scale.configs, res["configs"]):
        finals = {}
        for lr in c.lrs:
            recs = [json.loads(x) for x in (R.run_dir(out, c, lr, 0) / "metrics.jsonl").read_text().splitlines()]
            finals[lr] = [x for x in recs if x["kind"] == "epoch"][-1]["val_loss"]
        assert entry["selected_lr"] == min(finals, key=finals.get)
        assert entry["seeds"] == [0, 1]
        per_seed = []
        for s in (0, 1):
            recs = [json.loads(x) for x in
                    (R.run_dir(out, c, entry["selected_lr"], s) / "metrics.jsonl").read_text().splitlines()]
            ep = [x for x in recs if x["kind"] == "epoch"]
            assert len(ep) == 2 and ep[-1]["test_bleu"] is not None
            per_seed.append((ep[-1]["val_loss"], ep[-1]["val_loss"] - ep[-1]["train_loss"]))
        (v0, g0), (v1, g1) = per_seed
        # two values: mean (a + b) / 2, sample std |a - b| / sqrt(2)
        assert entry["metrics"]["final_val_loss"]["mean"] == pytest.approx((v0 + v1) / 2)
        assert entry["metrics"]["final_val_loss"]["std"] == pytest.approx(abs(v0 - v1) / math.sqrt(2))
        assert entry["metrics"]["generalization_gap"]["mean"] == pytest.approx((g0 + g1) / 2)
    for name in ("results.md", "val_loss.png", "train_loss.png"):
        assert (out / name).stat().st_size > 0
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/metrics.jsonl")}
    assert len(mtimes) == sum(len(c.lrs) + 1 for c in scale.configs)
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "run:" not in r2.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/metrics.jsonl")} == mtimes
    assert json.loads((out / "results.json").read_text())["configs"] == res["configs"]


def test_val_flag_only_for_multi30k(capsys):
    from lb_dist.train.config import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--run-dir", "x", "--lr", "0.1", "--val"])
    assert e.value.code == 2
    assert "argument --val: only for --dataset multi30k" in capsys.readouterr().err


def test_unknown_configuration_refused(tmp_path, capsys):
    fake_multi30k(tmp_path / "multi30k")
    assert R.main(["warmup", "--scale", "smoke", "--only", "adam-warmup,nope", "--out", str(tmp_path / "o"),
                   "--data-dir", str(tmp_path)]) == 2
    assert "argument --only: no configuration 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "runs").exists()
