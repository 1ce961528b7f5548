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
