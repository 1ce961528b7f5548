"""Hugging Face's ZeRO-3 flows with lb_dist, in Hugging Face's construction order, under the
deepspeed launcher with 2 and 3 processes (tests/_worker_deepspeed_hf_zero3.py): TrainingArguments
with a stage-3 config before the model, the model built by ``from_config`` inside
``deepspeed.zero.Init``, ``Seq2SeqTrainer`` on a tiny BART with tied embeddings.

Every trained run is recomputed here in one process without DeepSpeed: a float64 BART from the
run's gathered initial weights, the plain lb_dist optimizer over ``lb_dist.optim.param_groups``, fed
at step t the mean over processes of the mean-loss gradients of the batches each process recorded
(CLARS: S_k from the two-batch solve over the K micro-batch gradients, written out below)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _worker_launch import REPO, TESTS, child_env, free_port  # noqa: E402

import _worker_deepspeed_hf_zero3 as W  # noqa: E402

TOLERANCE = 1e-5


def _job(nproc: int, out: Path) -> dict:
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        pytest.skip("the deepspeed launcher is not installed")
    env = {**child_env(), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions")}
    proc = subprocess.run([str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                           str(TESTS / "_worker_deepspeed_hf_zero3.py"), str(out)], cwd=str(REPO), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    data = torch.load(out / f"hf3_{nproc}.pt", weights_only=False)
    data["ext_dir"] = out / "torch_extensions"
    return data


@pytest.fixture(scope="module")
def hf2(tmp_path_factory):
    return _job(2, tmp_path_factory.mktemp("hf3_2"))


@pytest.fixture(scope="module")
def hf3(tmp_path_factory):
    return _job(3, tmp_path_factory.mktemp("hf3_3"))


def _optimizer(kind: str, net):
    from lb_dist.optim import CLARS, LAMB, LARS, param_groups
    groups = param_groups(net, W.WEIGHT_DECAY)
    if kind in ("LARS", "CLARS"):
        cls = LARS if kind == "LARS" else CLARS
        return cls(groups, lr=W.OPT[kind][1]["learning_rate"], eta=0.02, momentum=0.9, weight_decay=W.WEIGHT_DECAY)
    return LAMB(groups, lr=W.OPT["LAMB"][1]["learning_rate"], betas=(0.9, 0.999), eps=1e-6,
                weight_decay=W.WEIGHT_DECAY)


def reference(run: dict, kind: str) -> dict:
    """The run's final parameters computed in one process (float64)."""
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    net = BartForConditionalGeneration(BartConfig(**W.BART)).double().train()
    net.load_state_dict(run["initial"], strict=False)
    W.freeze(net)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = _optimizer(kind, net)
    per_rank = run["batches"]
    k = len(per_rank)
    for t in range(W.STEPS):
        grads = []
        for rank in range(k):
            batch = per_rank[rank][t]
            loss = net(**batch).loss
            grads.append(torch.autograd.grad(loss, params))
        mean = [sum(g[i] for g in grads) / k for i in range(len(params))]
        if kind == "CLARS":           # two-batch solve, n = K micro-batches of b = MICRO samples, no mix
            n, b = k, W.MICRO
            small = sum(torch.stack([x.square().sum() for x in g]) for g in grads) / n
            big = torch.minimum(torch.stack([x.square().sum() for x in mean]).clamp_min(0), small)
            grad_sq = (n * big - small) / (n - 1)
            trace = (small - big) / (1 / b - 1 / (n * b))
            opt.set_second_moments(dict(zip(params, (grad_sq + trace).clamp_min(0))))
        for p, g in zip(params, mean):
            p.grad = g.clone()
        opt.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def relative_error(got: dict, want: dict) -> float:
    """max over tensors of ||got - want|| / ||want|| (0 for equal tensors: the frozen zero biases)."""
    assert set(got) == set(want)
    return max(0.0 if torch.equal(got[n].double(), want[n]) else
               float((got[n].double() - want[n]).norm() / want[n].norm()) for n in want)


@pytest.mark.parametrize("world", [2, 3])
def test_config_named_optimizer_under_zero_init_matches_single_process(world, request):
    """(a) LARS, CLARS, LAMB named in the config, the model built by from_config inside zero.Init
    (every parameter partitioned, shape (0,)), 20 steps with 2 and 3 processes: equal to the
    one-process reference to 1e-5. Before lb_dist.optim.logical_shape every layer went to the
    unadapted group here (LAMB became Adam without weight decay)."""
    job = request.getfixturevalue(f"hf{world}")
    for kind in ("LARS", "CLARS", "LAMB"):
        run = job["results"][kind]
        assert "error" not in run, run.get("traceback", run.get("error"))
        assert run["partitioned"] and run["optimizer"] == f"ZeRO{kind}" and run["global_step"] == W.STEPS
        assert len(run["batches"]) == world and all(len(b) == W.STEPS for b in run["batches"])
        err = relative_error(run["final"], reference(run, kind))
        assert err <= TOLERANCE, f"{kind}, {world} processes: relative error {err:.2e}"


def test_client_optimizer_through_create_optimizer(hf2):
    """(b) an lb_dist LAMB returned by an overridden Trainer.create_optimizer (config without an
    optimizer section) reaches DeepSpeed, is made ZeRO-exact, and equals the reference."""
    run = hf2["results"]["client"]
    assert "error" not in run, run.get("traceback", run.get("error"))
    assert run["partitioned"] and run["optimizer"] == "ZeROLAMB"
    err = relative_error(run["final"], reference(run, "LAMB"))
    assert err <= TOLERANCE, f"relative error {err:.2e}"


def test_trainer_optimizers_argument_discarded_by_transformers_is_refused(hf2):
    """(b) Trainer(optimizers=(lamb, None)) with DeepSpeed: transformers drops it and builds AdamW;
    lb_dist refuses that engine before it exists, naming both routes that work."""
    run = hf2["results"]["discarded"]
    message = run.get("error", "")
    assert message.startswith("ConfigError"), run
    assert "Trainer(optimizers=" in message and "AdamW" in message and "create_optimizer" in message
    assert "\"type\": \"LAMB\"" in message


def test_resume_from_checkpoint_equals_uninterrupted_run(hf2):
    """(c) the Trainer saves at step 10 (DeepSpeed checkpoint, ZeRO-3); a fresh script's trainer
    resumes with train(resume_from_checkpoint=...) and ends at the one-process reference of the
    uninterrupted 20 steps; the resumed run saw the same batches for steps 10-19."""
    first, resumed = hf2["results"]["resume"], hf2["results"]["resumed"]
    for run in (first, resumed):
        assert "error" not in run, run.get("traceback", run.get("error"))
    half = W.STEPS // 2
    for rank in range(2):
        assert len(resumed["batches"][rank]) == half
        for a, b in zip(first["batches"][rank][half:], resumed["batches"][rank]):
            assert all(torch.equal(a[key], b[key]) for key in a)
    want = reference(first, "LAMB")
    assert relative_error(first["final"], want) <= TOLERANCE
    err = relative_error(resumed["final"], want)
    assert err <= TOLERANCE, f"resumed: relative error {err:.2e}"
    assert resumed["global_step"] == W.STEPS


def test_import_alone_keeps_the_cpu_comm_op_unbuilt_in_hugging_faces_order(hf2, hf3):
    """register() comes after the arguments are parsed (TrainingArguments already set up DeepSpeed's
    communication there); the import of lb_dist.deepspeed at the top of the script is what kept
    DeepSpeed from building its CPU shared-memory op (private, empty TORCH_EXTENSIONS_DIR)."""
    for job in (hf2, hf3):
        assert job["shm_comm_op_loaded"] is False
        built = sorted(p.name for p in job["ext_dir"].rglob("*")) if job["ext_dir"].exists() else []
        assert built == []
