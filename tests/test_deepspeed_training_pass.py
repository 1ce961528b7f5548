"""CLARS' training-pass S_k under DeepSpeed (``optimizer.second_moments.source = "training_pass"``).

One ``deepspeed --num_gpus 2`` job (tests/_worker_deepspeed_training_pass.py) runs ZeRO stages 0-3
with gradient accumulation, clipping (stage 1), sample-wise GradientMix (stage 2) and a model built
under ``deepspeed.zero.Init`` (stage 3), on a sequence model with an embedding and a Linear over
positions. Every S_k and ``||G_k||^2`` the source reports is compared with a plain per-sample
autograd loop written here, over both processes' samples; a 3-step ZeRO-2 run is compared with one
process training CLARS with S_k from that loop. The config's refusals are checked without DeepSpeed
processes.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("deepspeed")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _worker_deepspeed_training_pass as W  # noqa: E402
from _padded import exact_padded  # noqa: E402
from _worker_launch import REPO, TESTS, child_env, free_port  # noqa: E402

from lb_dist.deepspeed import ConfigError, parse_config  # noqa: E402

BIN = Path(sys.executable).parent
TOLERANCE = 1e-5
ADAPTED = W.ADAPTED["seq"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    launcher = BIN / "deepspeed"
    if not launcher.exists():
        pytest.skip(f"the deepspeed launcher is not installed next to {sys.executable}")
    out = tmp_path_factory.mktemp("ds_tp")
    env = child_env()
    env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
                           str(TESTS / "_worker_deepspeed_training_pass.py"), str(out)], cwd=str(REPO), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    data = torch.load(out / "results.pt", weights_only=False)
    assert not data["errors"], "\n".join(f"{k}:\n{v}" for k, v in data["errors"].items())
    return data["results"]


def _model(params: dict, kind: str = "seq"):
    model = W.make_model(kind)
    model.load_state_dict({n: t.float() for n, t in params.items()})
    return model


def exact_step(params: dict, step: int, factors, world: int, accumulation: int, kind: str = "seq"):
    """The exact per-sample loop: sample i of process k, micro-step j has the loss ``l_i`` and the
    factor ``c_i = d loss / d l_i`` of the loss that process backpropagated; DeepSpeed's gradient is
    ``G = 1/(K A) sum_i c_i grad l_i`` and sample i's part of it, scaled to the batch mean, is
    ``grad f_i = N/(K A) c_i grad l_i`` (N samples). Returns ``({name: S_k}, {name: ||G_k||^2},
    {name: G})`` with ``S_k = 1/N sum_i ||grad_k f_i||^2``, by autograd on one sample at a time."""
    model = _model(params, kind)
    names = [n for n, _ in model.named_parameters()]
    n_total = world * accumulation * W.MICRO
    sq = {n: 0.0 for n in names}
    grad = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for k in range(world):
        for j in range(accumulation):
            x, y = W.batch(k, step, j, kind)
            c = factors[k][j]
            for i in range(W.MICRO):
                loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
                gs = torch.autograd.grad(loss, list(model.parameters()))
                for n, g in zip(names, gs):
                    part = g.double() * float(c[i]) / (world * accumulation)
                    grad[n] += part
                    sq[n] += float((part * n_total).square().sum())
    s = {n: sq[n] / n_total for n in names}
    g_sq = {n: float(grad[n].square().sum()) for n in names}
    return s, g_sq, grad


def exact_step_padded(params: dict, step: int, world: int, accumulation: int, per_sequence_mean: bool = False):
    """The padded case's exact loop (tests/_padded.py: ``f_i = b sum_{t in i} l_{i,t} / T_kj``) over
    both processes' micro-batches of the step."""
    batches = [W.batch(k, step, j, "pad") for k in range(world) for j in range(accumulation)]
    return exact_padded(_model(params, "pad"), batches, per_sequence_mean)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.parametrize("name", [c["name"] for c in W.cases()])
def test_s_k_equals_the_exact_per_sample_loop(job, name):
    """Every step's S_k and ||G_k||^2 (before clipping) of the source equal the exact loop over both
    processes' samples and all accumulation micro-steps to 1e-5 relative; so do M_k = S_k / ||G_k||^2
    and the global noise scale B_simple = sum tr(Sigma_k) / sum ||G_k||^2. bf16 (ZeRO-1): the model
    computes in bf16 (activations, output gradients), the loop in fp32 on the same bf16 weights: 3e-2."""
    case = next(c for c in W.cases() if c["name"] == name)
    tol = 3e-2 if case.get("bf16") else TOLERANCE
    kind = case.get("model", "seq")
    adapted = W.ADAPTED[kind]
    res = job[name]
    assert res["names"] == list(adapted)
    assert [rec["skipped"] for rec in res["steps"]] == [case.get("nan_at") == t for t in range(case["steps"])]
    for step, rec in enumerate(res["steps"]):
        if rec["skipped"]:
            # a step CLARS skipped (non-finite gradient): nothing of it may leak into the next one
            assert all(torch.equal(rec["params"][n], res["steps"][step + 1]["params"][n]) for n in rec["params"])
            continue
        if kind == "pad":
            s, g_sq, _ = exact_step_padded(rec["params"], step, res["world"], case["accumulation"])
        else:
            s, g_sq, _ = exact_step(rec["params"], step, rec["factors"], res["world"], case["accumulation"], kind)
        for i, n in enumerate(res["names"]):
            assert _rel(float(rec["s"][i]), s[n]) < tol, (name, step, n, float(rec["s"][i]), s[n])
            assert _rel(float(rec["g"][i]), g_sq[n]) < tol, (name, step, n, float(rec["g"][i]), g_sq[n])
            assert _rel(rec["m"][i], s[n] / g_sq[n]) < tol
            assert rec["m"][i] >= 1.0          # the whole batch: Jensen
        noise = sum(s[n] - g_sq[n] for n in adapted) / sum(g_sq[n] for n in adapted)
        assert _rel(rec["noise"], noise) < tol


@pytest.mark.parametrize("name", ["z0", "z1_clip", "z2_train", "z2_sample_mix", "z2_nan"])
def test_statistics_ride_in_the_optimizers_one_all_reduce(job, name):
    """No collective of the source's own: at stages 0-2 (two param groups, DeepSpeed's global norm
    finite) lb_dist makes ONE all-reduce per optimizer step, the layer norms' and the training-pass
    sums together; the estimator never reduces by itself (a step skipped for a non-finite gradient
    makes none: its statistics are dropped locally)."""
    res = job[name]
    stepped = sum(not rec["skipped"] for rec in res["steps"])
    assert res["all_reduces"] == {"zero": stepped, "estimator": 0}


def test_a_layer_the_source_cannot_measure_is_refused_before_deepspeed_starts():
    """An adapted parameter of a module TrainingPassMoments cannot measure (nn.MultiheadAttention's
    in_proj_weight) stops lb_dist.deepspeed.initialize before DeepSpeed starts, naming the key and
    the parameter; the model keeps no hook."""
    from torch import nn

    import lb_dist.deepspeed as lbds
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1))
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
           "optimizer": {"type": "CLARS", "params": {"lr": 0.1}, "second_moments": {"source": "training_pass"}}}
    with pytest.raises(ConfigError, match=r"optimizer\.second_moments\.source.*in_proj_weight"):
        lbds.initialize(model=model, config=cfg)
    assert not model._forward_pre_hooks and not model[0]._forward_hooks


def test_padded_case_is_ragged_and_its_normalisation_matters(job):
    """The padded case's data: padding in every micro-batch, token counts that differ between the two
    processes, padded inputs exactly where labels are ignored; and S_k of per-sequence token means
    (the wrong unit for a batch-normalized token loss) differs, so the comparison above can fail."""
    res = job["z2_padded"]
    counts = [[int((W.batch(k, 0, j, "pad")[1] != -100).sum()) for j in range(2)] for k in range(res["world"])]
    assert all(c < W.MICRO * (W.SEQ + 2) for row in counts for c in row)
    assert counts[0] != counts[1], counts
    x, y = W.batch(0, 0, 0, "pad")
    assert torch.equal(x == 0, y == -100)
    rec = res["steps"][0]
    s, _, _ = exact_step_padded(rec["params"], 0, res["world"], 2, per_sequence_mean=True)
    assert max(_rel(float(rec["s"][i]), s[n]) for i, n in enumerate(W.ADAPTED["pad"])) > 1e-3


def test_sample_mix_measures_the_weighted_per_sample_gradients(job):
    """Sample-wise GradientMix: the per-sample parts are the weighted ones (they average to the mixed
    gradient DeepSpeed uses); S_k of the unweighted per-sample gradients differs, so the comparison above
    can fail."""
    res = job["z2_sample_mix"]
    rec = res["steps"][0]
    plain = [[torch.full((W.MICRO,), 1.0 / W.MICRO) for _ in f] for f in rec["factors"]]
    s, _, _ = exact_step(rec["params"], 0, plain, res["world"], 2)
    assert max(_rel(float(rec["s"][i]), s[n]) for i, n in enumerate(ADAPTED)) > 1e-3


def test_zero2_training_equals_one_process_with_exact_s_k(job):
    """Acceptance (issue 14): CLARS trained with the training-pass source under DeepSpeed ZeRO-2 (2
    processes, 2 accumulation micro-steps, 3 steps) equals one process training CLARS on the same
    global batches with S_k from the exact per-sample loop."""
    from lb_dist.optim import CLARS, param_groups
    res = job["z2_train"]
    model = W.make_model()

    class Exact:
        values: dict = {}

        def second_moments(self):
            return self.values

    source = Exact()
    opt = CLARS(param_groups(model, W.OPT["weight_decay"]), **W.OPT, moments=source)
    plain = [[torch.full((W.MICRO,), 1.0 / W.MICRO)] * 2 for _ in range(res["world"])]
    byname = dict(model.named_parameters())
    for step in range(len(res["steps"])):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        s, _, grad = exact_step(params, step, plain, res["world"], 2)
        source.values = {byname[n]: torch.tensor(s[n]) for n in ADAPTED}
        for n, p in byname.items():
            p.grad = grad[n].float()
        opt.step()
    for n, p in model.named_parameters():
        got = res["final"][n].float()
        err = float((got - p.detach()).norm() / p.detach().norm())
        assert err < TOLERANCE, (n, err)


# ------------------------------------------------------------------------------ config (no processes)
def _config(**second_moments) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "CLARS", "params": {"lr": 0.1},
                                                              "second_moments": second_moments}}


def test_config_parses_the_training_pass_source():
    spec = parse_config(_config(source="training_pass"))
    sm = spec.optimizer.second_moments
    assert sm.source == "training_pass" and sm.subset_size is None
    assert spec.to_dict()["optimizer"]["second_moments"] == {"source": "training_pass"}
    spec = parse_config(_config(source="training_pass", subset_size=2))
    assert spec.optimizer.second_moments.subset_size == 2
    assert parse_config(spec.to_dict()).optimizer.second_moments == spec.optimizer.second_moments


@pytest.mark.parametrize("section,mix,key", [
    ({"source": "training_pass", "ema": 0.5}, None, "optimizer.second_moments.ema"),
    ({"source": "training_pass", "chunk_size": 4}, None, "optimizer.second_moments.chunk_size"),
    ({"source": "training_pass", "subset_size": 0}, None, "optimizer.second_moments.subset_size"),
    ({"source": "training-pass"}, None, "optimizer.second_moments.source"),
    ({"source": "training_pass"}, {"granularity": "device"}, "gradient_mix.granularity"),
])
def test_config_errors_name_the_key(section, mix, key):
    cfg = _config(**section)
    if mix is not None:
        cfg["gradient_mix"] = mix
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(cfg)


def test_lb_dist_train_maps_the_json_source_to_its_flag(tmp_path, capsys):
    """``lb-dist train --deepspeed-config`` with source "training_pass" is ``--clars-moments
    training-pass`` (and the run's spec is the JSON's); a training-pass ``subset_size``, which no flag
    sets, is refused naming the key."""
    import json

    from lb_dist.train.config import parse_args
    from lb_dist.train.optimizers import optimizer_spec
    cfg = {"train_batch_size": 32, "optimizer": {"type": "CLARS", "params": {"lr": 0.1},
                                                 "second_moments": {"source": "training_pass"}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    args = parse_args(["--run-dir", str(tmp_path / "r"), "--backend", "deepspeed", "--deepspeed-config", str(path)])
    assert args.clars_moments == "training-pass"
    assert optimizer_spec(args).to_dict()["second_moments"] == {"source": "training_pass"}
    cfg["optimizer"]["second_moments"]["subset_size"] = 4
    path.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):
        parse_args(["--run-dir", str(tmp_path / "s"), "--backend", "deepspeed", "--deepspeed-config", str(path)])
    assert "optimizer.second_moments.subset_size" in capsys.readouterr().err
