"""The layer-wise optimizers' one reduction mechanism (docs/optimizers.md, "Sharded parameters"):
:class:`lb_dist.optim.LayerFragments` partitions declared with their process group are reduced by
the core, packed with the step's statistics (``CLARS.set_step_moments``) and LAMB's non-finite
information, in ONE all-reduce per step, 2 real processes (tests/_worker_optim_seam.py), against the
one-process optimizer on whole tensors."""
from __future__ import annotations

import json

import pytest
import torch

from _worker_launch import launch
from lb_dist.optim import CLARS, LARS

pytestmark = pytest.mark.filterwarnings("ignore")


def test_fragments_statistics_and_lamb_flag_ride_in_one_all_reduce(tmp_path):
    out = tmp_path / "seam.json"
    launch("_worker_optim_seam.py", [str(out)], nproc=2, timeout=240)
    results = [json.loads((tmp_path / f"seam.json.{r}").read_text()) for r in (0, 1)]
    for res in results:
        for row in res["rows"]:
            where = row["opt"]
            assert row["max_err"] <= 1e-12, where              # whole-layer norms, reduced statistics
            assert 1e-3 < row["moved"] < 10, where
            assert row["calls"] == [1] * 6, where               # ONE all-reduce per step, both groups
            # LAMB: a NaN in rank 1's piece of a bias at step 3: skipped by BOTH ranks, no flag collective
            assert row["skipped"] == (1 if row["opt"] == "lamb" else 0), where
            assert row["copy_groups"] == [True, True], where     # deepcopy shares the process group
            assert "LayerFragments with a process_group cannot be pickled" in row["pickle"], where


def test_step_source_is_checked_and_detachable():
    w = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    opt = CLARS([w], lr=0.1)
    with pytest.raises(TypeError, match="no second_moments"):
        opt.set_step_moments(type("Half", (), {"local_statistics": lambda self, k: None})())
    assert not hasattr(LARS([w], lr=0.1), "set_step_moments")

    class Source:
        def local_statistics(self, keys):
            return torch.tensor([2.0], dtype=torch.float64)

        def second_moments(self, keys, reduced, g_sq, clip):
            return reduced * 2                    # one process: the statistics come back unreduced

    opt.set_step_moments(Source())
    w.grad = torch.ones(3, 2, dtype=torch.float64)
    opt.step()
    # S = 4: trust = eta ||w|| / sqrt(S) = 0.01 sqrt(6) / 2; first Nesterov step: 1.9 trust g
    trust = 0.01 * 6 ** 0.5 / 2
    assert torch.allclose(w.detach(), torch.full((3, 2), 1 - 0.1 * 1.9 * trust, dtype=torch.float64))
    opt.set_step_moments(None)
    with pytest.raises(RuntimeError, match="needs S_k"):
        opt.step()
