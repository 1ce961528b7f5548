"""lb_dist.deepspeed's checkpoint state and refusals in one process, without launching DeepSpeed:
LbDistRuntime.load_state_dict (another world size, gradient_mix / second-moment settings changed
since the checkpoint), the ZeRO-aware optimizer's partition-layout check, and the messages of the
ZeRO-Offload refusal. The launched counterparts are in tests/test_deepspeed.py."""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("deepspeed")

from lb_dist.deepspeed import parse_config  # noqa: E402
from lb_dist.deepspeed import zero  # noqa: E402
from lb_dist.deepspeed.engine import LbDistRuntime  # noqa: E402
from lb_dist.deepspeed.zero import MicroBatchStepMoments, ShardedTensor, make_sharded, refuse_unsupported  # noqa: E402
from lb_dist.mixing import GradientMix  # noqa: E402
from lb_dist.optim import LAMB, LARS, LayerFragments  # noqa: E402

MIX = {"noise": "gaussian", "std": 0.5, "granularity": "device", "seed": 3}


def _runtime(world: int, mix: dict | None = MIX, ema: float | None = None, params=None) -> LbDistRuntime:
    """An LbDistRuntime as attach() builds it, without an engine: what load_state_dict uses."""
    raw = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
           "zero_optimization": {"stage": 0}}
    if mix is not None:
        raw["gradient_mix"] = dict(mix)
    if ema is not None:
        raw["optimizer"] = {"type": "CLARS", "params": {"lr": 1.0}, "second_moments": {"ema": ema}}
    rt = LbDistRuntime.__new__(LbDistRuntime)
    rt.config = parse_config(raw)
    rt.world_size, rt.rank, rt.steps = world, 0, 0
    rt.mix = None
    if mix is not None:
        spec = rt.config.gradient_mix
        rt.mix = GradientMix(noise=spec.noise, std=spec.std, granularity=spec.granularity, seed=spec.seed,
                             world_size=world)
    rt.step_moments, rt.per_sample = None, None
    if ema is not None:
        params = params or [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
        rt.step_moments = MicroBatchStepMoments([params], {p: f"p{i}" for i, p in enumerate(params)}, 4, world,
                                                ema=ema)
    return rt


def test_runtime_state_round_trips():
    saved = _runtime(2)
    saved.mix.advance()
    saved.steps = 1
    loaded = _runtime(2)
    loaded.load_state_dict(saved.state_dict(), source="/ckpt/step1")
    assert loaded.mix.step == 1 and loaded.steps == 1


@pytest.mark.parametrize("mix", [MIX, None], ids=["gradient_mix", "no_mix"])
def test_resume_on_another_world_size_is_refused_at_every_stage(mix):
    """The runtime's state records the data-parallel size; loading it into another one is refused
    naming both sizes and the checkpoint (DeepSpeed checks the size of ZeRO checkpoints only, so at
    stage 0 this is the only refusal). Nothing is loaded."""
    saved = _runtime(2, mix=mix)
    if saved.mix is not None:
        saved.mix.advance()
    state = saved.state_dict()
    assert state["world_size"] == 2
    loaded = _runtime(3, mix=mix)
    with pytest.raises(RuntimeError) as err:
        loaded.load_state_dict(state, source="/ckpt/step10")
    message = str(err.value)
    assert "2 data-parallel processes" in message and "has 3" in message and "/ckpt/step10" in message, message
    if loaded.mix is not None:
        assert loaded.mix.step == 0


def test_state_without_world_size_still_loads():
    """State written before the world size was checked (no "world_size" key) loads as before."""
    state = _runtime(2).state_dict()
    del state["world_size"]
    _runtime(3).load_state_dict(state)


@pytest.mark.parametrize("key,value,shown", [
    ("std", 0.25, "gradient_mix.std: 0.5 in the config, 0.25 in the checkpoint"),
    ("noise", "rademacher", "gradient_mix.noise: 'gaussian' in the config, 'rademacher' in the checkpoint"),
    ("seed", 7, "gradient_mix.seed: 3 in the config, 7 in the checkpoint"),
    ("granularity", "sample", "gradient_mix.granularity: 'device' in the config, 'sample' in the checkpoint"),
])
def test_changed_gradient_mix_settings_are_refused(key, value, shown):
    """A config whose gradient_mix section differs from the checkpoint's is refused naming the
    key and both values (GradientMix.load_state_dict alone would take the checkpoint's silently)."""
    old = _runtime(2, mix={**MIX, key: value})
    old.mix.advance()
    new = _runtime(2)
    with pytest.raises(ValueError) as err:
        new.load_state_dict(old.state_dict(), source="/ckpt/step10")
    assert shown in str(err.value) and "/ckpt/step10" in str(err.value), str(err.value)
    assert new.mix.std == 0.5 and new.mix.step == 0           # nothing taken from the checkpoint


def test_changed_second_moment_ema_is_refused():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    old = _runtime(2, ema=0.5, params=params)
    new = _runtime(2, ema=0.0, params=params)
    try:
        with pytest.raises(ValueError, match=r"optimizer\.second_moments\.ema: 0\.0 in the config, 0\.5 in the "
                                             r"checkpoint"):
            new.load_state_dict(old.state_dict())
        same = _runtime(2, ema=0.5, params=params)
        same.load_state_dict(old.state_dict())
        same.step_moments.remove_hooks()
    finally:
        old.step_moments.remove_hooks()
        new.step_moments.remove_hooks()


# ----------------------------------------------------------------------------- partition layout
class _FakeDist:
    """torch.distributed as lb_dist.deepspeed.zero sees it, for a process group of ``world`` processes."""

    def __init__(self, world: int, rank: int = 0) -> None:
        self.world, self.rank = world, rank

    def get_world_size(self, group=None):
        return self.world

    def get_rank(self, group=None):
        return self.rank


def _sharded(cls, starts, numels, layers, **kw):
    torch.manual_seed(0)
    keys = tuple(torch.zeros(n) for n in (6, 4))
    flat = torch.randn(12, dtype=torch.float64, requires_grad=True)
    opt = cls([flat], **kw)
    frags = LayerFragments(tuple(starts), tuple(numels), tuple(layers), keys, len(keys))
    make_sharded(opt, [ShardedTensor(flat, frags, 0, object())], object(), None)
    flat.grad = torch.zeros_like(flat)
    return opt


@pytest.mark.parametrize("cls,kw", [(LARS, {"lr": 0.1}), (LAMB, {"lr": 0.01})])
def test_sharded_optimizer_refuses_another_partition_layout(monkeypatch, cls, kw):
    """The ZeRO-aware optimizer's state_dict carries its partition layout: loading it at another
    world size, or with other fragments (another model, param-group split or ZeRO settings), is
    refused; the same layout loads."""
    monkeypatch.setattr(zero, "dist", _FakeDist(2))
    saved = _sharded(cls, (0, 6), (6, 4), (0, 1), **kw).state_dict()
    assert saved["lb_dist_layout"]["world_size"] == 2
    _sharded(cls, (0, 6), (6, 4), (0, 1), **kw).load_state_dict(saved)
    with pytest.raises(RuntimeError, match="another ZeRO partitioning"):
        _sharded(cls, (0, 8), (6, 4), (0, 1), **kw).load_state_dict(saved)
    monkeypatch.setattr(zero, "dist", _FakeDist(3))
    with pytest.raises(RuntimeError, match=r"saved by 2 data-parallel processes and this run has 3"):
        _sharded(cls, (0, 6), (6, 4), (0, 1), **kw).load_state_dict(saved)


# ----------------------------------------------------------------------------- offload
def _engine_with(optimizer):
    return types.SimpleNamespace(optimizer=optimizer, basic_optimizer=object(), has_moe_layers=False,
                                 zenflow=False, mpu=None)


@pytest.mark.parametrize("stage,attr,key", [(2, "cpu_offload", "zero_optimization.offload_optimizer"),
                                            (3, "offload_optimizer", "zero_optimization.offload_optimizer"),
                                            (3, "offload_param", "zero_optimization.offload_param")])
def test_offload_refusal_after_the_engine_names_the_config_key(stage, attr, key):
    """The engine-side offload refusal (reached only if the config check missed it) names the key."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    cls = DeepSpeedZeroOptimizer_Stage3 if stage == 3 else DeepSpeedZeroOptimizer
    opt = object.__new__(cls)
    opt.__dict__[attr] = True
    with pytest.raises(RuntimeError) as err:
        refuse_unsupported(_engine_with(opt))
    assert key in str(err.value), str(err.value)
