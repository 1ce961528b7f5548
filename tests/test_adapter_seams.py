"""The seams between the engine adapters and the core (issue 13): the shared per-step state
(``lb_dist.step_state.StepState``), GradientMix's public per-step coefficients, the version guards of
the vendor modules, and the fence itself (no private names across lb_dist modules, engine internals
only in ``lb_dist/_vendor``).

References are written here: the coefficients from the paper's ``pi_k = (1 + std xi_k) / K`` through
GradientMix's public ``coefficients``/``scale``, the weight sums as ``(sum pi, sum pi^2)``, the fed
estimator against one fed directly with the unscaled statistics.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from lb_dist import GradientMix
from lb_dist._vendor import check_version
from lb_dist.moments import MicroBatchMoments
from lb_dist.step_state import StepState

ROOT = Path(__file__).resolve().parent.parent / "lb_dist"


# --------------------------------------------------------------------- the shared per-step state
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_step_draw_is_the_mixs_coefficient_of_the_rank_and_the_steps_weight_sums(noise):
    k = 4
    mix = GradientMix(noise=noise, std=0.5, seed=7, world_size=k)
    state = StepState(mix)
    for step in range(3):
        pi = mix.coefficients()
        for rank in range(k):
            draw = state.step_draw(k, rank)
            assert draw.mixed
            assert draw.coefficient == pytest.approx(float(pi[rank]), rel=1e-15)
            assert draw.scale == pytest.approx(float(mix.scale(rank)), rel=1e-15)
            assert draw.weight_sums[0] == pytest.approx(float(pi.sum()), rel=1e-14)
            assert draw.weight_sums[1] == pytest.approx(float((pi * pi).sum()), rel=1e-14)
        mix.advance()          # a new step: the cached draw must follow (the next round compares it)


@pytest.mark.parametrize("mix", [None, GradientMix(noise="none")])
def test_step_draw_without_noise_is_plain_averaging_exactly(mix):
    draw = StepState(mix).step_draw(3, 1)
    assert (draw.mixed, draw.coefficient, draw.scale, draw.weight_sums) == (False, 1.0 / 3, 1.0, (1.0, 1.0 / 3))


def test_step_draw_refuses_a_mix_for_another_world_size_naming_the_argument():
    class Adapter(StepState):
        mix_argument = "gradient_mix"
        group_name = "the test's group"

    with pytest.raises(ValueError, match=r"gradient_mix.world_size=2 but the test's group has 3 ranks"):
        Adapter(GradientMix(world_size=2)).step_draw(3, 0)


def test_feed_divides_the_statistics_by_the_squared_grad_scale():
    """Statistics of a loss scaled by 4 (grad_scale 4: squared norms x 16) feed the same estimate as
    the unscaled ones fed to the core directly."""
    torch.manual_seed(0)
    params = [torch.zeros(3), torch.zeros(2)]
    micro = torch.tensor([5.0, 3.0], dtype=torch.float64)
    mixed = torch.tensor([1.5, 0.4], dtype=torch.float64)
    weights = (1.05, 0.30)
    want = MicroBatchMoments(params, micro_batch_size=8)
    want.feed_weighted(micro, 4, mixed, weights=weights)
    state = StepState(moments=MicroBatchMoments(params, micro_batch_size=8))
    state.grad_scale = 4.0
    record = state.feed(micro * 16, 4, mixed * 16, weights)
    assert record is state.last_update and not record["skipped"]
    torch.testing.assert_close(state.moments.second_moments_tensor(), want.second_moments_tensor())
    torch.testing.assert_close(record["weighted_mean_sq"], mixed)
    for bad in (0.0, float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="grad_scale"):
            state.grad_scale = bad


def test_gradient_mix_public_weights_and_attached():
    mix = GradientMix(std=0.3, seed=1, world_size=5)
    torch.testing.assert_close(mix.weights(5), mix.coefficients() * 5, rtol=1e-15, atol=0)
    torch.testing.assert_close(mix.weights(5, step=2), mix.coefficients(step=2) * 5, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        mix.weights(0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    assert not mix.attached
    mix.attach(opt)
    assert mix.attached
    mix.detach()
    assert not mix.attached


# --------------------------------------------------------------------- version guards
def test_check_version_refuses_outside_the_range_and_the_env_var_makes_it_a_warning(monkeypatch):
    monkeypatch.delenv("LB_DIST_TEST_UNTESTED", raising=False)
    args = ("lb_dist.x", "Thing", "thing")
    assert check_version(*args, "1.2.3+cpu", ">=1.2,<1.3", "LB_DIST_TEST_UNTESTED", "its internals") == "1.2.3+cpu"
    with pytest.raises(RuntimeError, match=r"lb_dist.x supports Thing >=1.2,<1.3 .*found thing 1.3.0.*"
                                           r"LB_DIST_TEST_UNTESTED=1"):
        check_version(*args, "1.3.0", ">=1.2,<1.3", "LB_DIST_TEST_UNTESTED", "its internals")
    monkeypatch.setenv("LB_DIST_TEST_UNTESTED", "1")
    with pytest.warns(RuntimeWarning, match="found thing 1.3.0"):
        check_version(*args, "1.3.0", ">=1.2,<1.3", "LB_DIST_TEST_UNTESTED", "its internals")


def test_fsdp_refuses_an_untested_torch_naming_the_range(monkeypatch):
    from lb_dist._vendor.torch import check_fsdp_version
    monkeypatch.delenv("LB_DIST_TORCH_UNTESTED", raising=False)
    assert check_fsdp_version()                      # the installed torch is the tested one
    with pytest.raises(RuntimeError, match=r"lb_dist.fsdp supports torch >=2.13,<2.14 .*found torch 2.14.0"):
        check_fsdp_version("2.14.0")


def test_horovod_refuses_an_untested_release_naming_the_range(monkeypatch):
    pytest.importorskip("horovod.torch")
    from lb_dist._vendor.horovod import check_horovod_version
    monkeypatch.delenv("LB_DIST_HOROVOD_UNTESTED", raising=False)
    assert check_horovod_version()
    with pytest.raises(RuntimeError, match=r"lb_dist.horovod supports Horovod >=0.28.1,<0.29 .*found horovod 0.29.0"):
        check_horovod_version("0.29.0")
    monkeypatch.setenv("LB_DIST_HOROVOD_UNTESTED", "yes")
    with pytest.warns(RuntimeWarning, match="LB_DIST_HOROVOD_UNTESTED"):
        check_horovod_version("0.29.0")


# --------------------------------------------------------------------- the fence
#: the adapters and the core they use (issue 13's area of this test; the coordinator's rule covers all)
ADAPTER_FILES = ["ddp.py", "fsdp.py", "mixing.py", "step_state.py", "distributed.py", "_optimizer_state.py",
                 "horovod", "deepspeed/__init__.py", "deepspeed/engine.py", "deepspeed/zero.py",
                 "deepspeed/layout.py", "deepspeed/sources.py", "deepspeed/cpu_comm.py", "deepspeed/prebuild.py",
                 "moments"]


def _private_uses(path: Path) -> list[str]:
    """``from m import _x`` and ``x._y`` with x not self/cls/super() (dunders aside)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("__"):
            v = node.value
            if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                continue
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                continue
            found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return found


def test_adapters_use_no_private_name_of_lb_dist_or_of_an_engine_outside_vendor():
    files = []
    for name in ADAPTER_FILES:
        p = ROOT / name
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    assert len(files) > 15
    found = [use for f in files for use in _private_uses(f)]
    assert not found, found
