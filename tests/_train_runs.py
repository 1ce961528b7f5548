"""Reading the results of lb_dist.train runs in tests: final checkpoints and parameter comparisons."""
from __future__ import annotations

from pathlib import Path

import torch

from lb_dist.train.checkpoint import latest_checkpoint, load_checkpoint

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def final_model(run_dir) -> dict:
    """The model state of the run's latest checkpoint."""
    path = latest_checkpoint(Path(run_dir) / "checkpoints")
    assert path is not None, f"no checkpoint in {run_dir}"
    return load_checkpoint(path)["model"]


def params_of(state: dict) -> dict:
    """A model state without the BatchNorm buffers."""
    return {k: v for k, v in state.items() if not k.endswith(_BUFFERS)}


def assert_params_close(got: dict, want: dict, rtol=1e-5, atol=1e-6):
    params = list(params_of(want))
    assert params
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the weights (what a control run must change)."""
    return max((a[k] - b[k]).abs().max().item() for k in b if k.endswith("weight"))


def resumed(entry: dict, stop_after: int = 1) -> dict:
    """The spec entry (tests/_worker_train.py) of the same training stopped by ``--stop-after-steps
    stop_after`` (mid-epoch) and resumed until done, in the run directory ``<run-dir>_resumed``."""
    argv = list(entry["argv"])
    i = argv.index("--run-dir")
    argv[i + 1] = argv[i + 1] + "_resumed"
    return {"name": entry["name"] + "_resumed", "repeat_until_done": True,
            "argv": [*argv, "--stop-after-steps", str(stop_after)]}


def with_resumed(spec: list[dict], names: tuple[str, ...], stop_after: int = 1) -> list[dict]:
    """``spec`` plus :func:`resumed` of its entries named in ``names``."""
    return spec + [resumed(e, stop_after) for e in spec if e["name"] in names]


#: The per-step and per-epoch values a resumed run must reproduce exactly.
RESUME_KEYS = ("step", "kind", "loss", "lr", "skipped", "mix_noise_amount", "trust_ratio", "second_moment",
               "variance_factor", "train_loss", "test_loss", "test_top1", "test_token_accuracy", "test_bleu")


def assert_resume_exact(run_dir, resumed_dir, calls=None):
    """The resumed run equals the uninterrupted one bit for bit: final parameters and buffers, and
    every metric record (no record lost or duplicated); ``calls``: the steps done per invocation."""
    from lb_dist.train.metrics import read_metrics

    want, got = final_model(run_dir), final_model(resumed_dir)
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k}: max difference {(got[k].double() - want[k].double()).abs().max()}"
    a = read_metrics(Path(run_dir) / "metrics.jsonl")
    b = read_metrics(Path(resumed_dir) / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for key in RESUME_KEYS:
            assert ra.get(key) == rb.get(key), f"{key} of {ra['kind']} record {ra['step']}: {ra.get(key)} != {rb.get(key)}"
    if calls is not None:
        assert len(calls) > 1 and calls[-1] == a[-1]["step"], calls
