"""lb_dist's DeepSpeed config keys: parsing, what DeepSpeed is given, and the errors for bad input
(each names the key), all before any process or engine starts. No DeepSpeed process is launched
here; the training behaviour is tested in tests/test_deepspeed.py."""
from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("deepspeed")

import lb_dist.deepspeed as lbds  # noqa: E402
from lb_dist.deepspeed import ConfigError, parse_config  # noqa: E402
from lb_dist.deepspeed.config import accumulation_steps, check_world  # noqa: E402
from lb_dist.optim import CLARS, LAMB, LARS  # noqa: E402

BASE = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 2}}


def cfg(**sections) -> dict:
    out = copy.deepcopy(BASE)
    out.update(sections)
    return out


CLARS_OPT = {"type": "CLARS", "params": {"lr": 1.0}}


# ----------------------------------------------------------------------------- parsing
def test_config_without_lb_dist_is_untouched():
    plain = cfg(optimizer={"type": "Adam", "params": {"lr": 1e-3}},
                scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}})
    assert parse_config(plain) is None


@pytest.mark.parametrize("name,cls", [("CLARS", CLARS), ("lars", LARS), ("Lamb", LAMB)])
def test_optimizer_types_case_insensitive(name, cls):
    spec = parse_config(cfg(optimizer={"type": name, "params": {"lr": 0.5, "weight_decay": 1e-4}}))
    assert spec.optimizer.cls is cls and spec.optimizer.params["lr"] == 0.5
    ds = spec.deepspeed_config()
    assert "optimizer" not in ds and ds["zero_allow_untested_optimizer"] is True
    assert ds["train_micro_batch_size_per_gpu"] == 4


def test_deepspeed_config_strips_lb_dist_sections_only():
    raw = cfg(optimizer={"type": "Adam", "params": {"lr": 1e-3}},
              gradient_mix={"noise": "rademacher", "std": 0.5, "seed": 7},
              scheduler={"type": "InverseSqrt", "params": {"warmup_num_steps": 100}},
              some_deepspeed_key={"x": 1})
    before = copy.deepcopy(raw)
    spec = parse_config(raw)
    ds = spec.deepspeed_config()
    assert raw == before                                    # the caller's dict is not modified
    assert "gradient_mix" not in ds and "scheduler" not in ds
    assert ds["optimizer"] == raw["optimizer"]              # DeepSpeed's own optimizer stays
    assert "zero_allow_untested_optimizer" not in ds
    assert ds["some_deepspeed_key"] == {"x": 1}
    mix = spec.gradient_mix
    assert (mix.noise, mix.std, mix.granularity, mix.seed) == ("rademacher", 0.5, "device", 7)


def test_clars_second_moments_defaults_and_keys():
    spec = parse_config(cfg(optimizer=CLARS_OPT))
    assert spec.optimizer.second_moments.source == "micro_batch"
    spec = parse_config(cfg(optimizer={**CLARS_OPT, "second_moments": {
        "source": "per_sample", "subset_size": 256, "chunk_size": 32}}))
    sm = spec.optimizer.second_moments
    assert (sm.source, sm.subset_size, sm.chunk_size) == ("per_sample", 256, 32)


def test_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg(optimizer=CLARS_OPT)))
    assert parse_config(str(path)).optimizer.type == "CLARS"


def test_every_shipped_config_parses():
    from pathlib import Path
    files = sorted((Path(__file__).resolve().parent.parent / "deepspeed_configs").glob("*.json"))
    assert len(files) >= 7
    for path in files:
        assert parse_config(str(path)) is not None, path.name


def test_accumulation_steps_as_deepspeed_resolves_them():
    assert accumulation_steps({"gradient_accumulation_steps": 3}, 2) == 3
    assert accumulation_steps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}, 2) == 8
    assert accumulation_steps({"train_batch_size": 64}, 2) == 1
    assert accumulation_steps({"train_micro_batch_size_per_gpu": 4}, 2) == 1


# ----------------------------------------------------------------------------- bad input
BAD = [
    ("unknown optimizer param", cfg(optimizer={"type": "LARS", "params": {"lr": 1, "etaa": 0.1}}),
     "optimizer.params.etaa"),
    ("bad optimizer value", cfg(optimizer={"type": "LARS", "params": {"lr": -1}}), "lr must be >= 0"),
    ("lr missing", cfg(optimizer={"type": "CLARS", "params": {"eta": 0.01}}), "optimizer.params.lr"),
    ("unknown optimizer key", cfg(optimizer={**CLARS_OPT, "moments": {}}), "optimizer.moments"),
    ("bad betas", cfg(optimizer={"type": "LAMB", "params": {"betas": [0.9]}}), "optimizer.params.betas"),
    ("FusedLamb bias_correction", cfg(optimizer={"type": "Lamb", "params": {"lr": 1e-3, "bias_correction": True}}),
     "optimizer.params.bias_correction = true is a key of DeepSpeed's FusedLamb"),
    ("FusedLamb eps_inside_sqrt", cfg(optimizer={"type": "Lamb", "params": {"eps_inside_sqrt": True}}),
     "optimizer.params.eps_inside_sqrt = true"),
    ("FusedLamb amsgrad", cfg(optimizer={"type": "Lamb", "params": {"amsgrad": True}}), "optimizer.params.amsgrad"),
    ("FusedLamb max_grad_norm", cfg(optimizer={"type": "Lamb", "params": {"max_grad_norm": 1.0}}),
     "optimizer.params.max_grad_norm = 1.0"),
    ("trust clamp inverted", cfg(optimizer={"type": "Lamb", "params": {"max_coeff": 0.01, "min_coeff": 0.3}}),
     "min_coeff (0.3) must be <= max_coeff (0.01)"),
    ("trust clamp negative", cfg(optimizer={"type": "LARS", "params": {"lr": 1, "max_coeff": -1}}),
     "max_coeff must be >= 0"),
    ("bad exclusion", cfg(optimizer={"type": "LARS", "params": {"lr": 1, "exclude_from_layer_adaptation": "x"}}),
     "exclude_from_layer_adaptation"),
    ("auto left", cfg(optimizer={"type": "LARS", "params": {"lr": "auto"}}), "optimizer.params.lr is \"auto\""),
    ("moments for LARS", cfg(optimizer={"type": "LARS", "params": {"lr": 1}, "second_moments": {}}),
     "optimizer.second_moments applies to CLARS only"),
    ("moments for Adam", cfg(optimizer={"type": "Adam", "params": {}, "second_moments": {}}),
     "optimizer.second_moments"),
    ("unknown source", cfg(optimizer={**CLARS_OPT, "second_moments": {"source": "exact"}}),
     "optimizer.second_moments.source"),
    ("key of the other source", cfg(optimizer={**CLARS_OPT, "second_moments": {"subset_size": 64}}),
     "optimizer.second_moments.subset_size"),
    ("unknown moments key", cfg(optimizer={**CLARS_OPT, "second_moments": {"emaa": 0.1}}),
     "optimizer.second_moments.emaa"),
    ("bad ema", cfg(optimizer={**CLARS_OPT, "second_moments": {"ema": 1.0}}), "optimizer.second_moments.ema"),
    ("bad subset", cfg(optimizer={**CLARS_OPT, "second_moments": {"source": "per_sample", "subset_size": 0}}),
     "optimizer.second_moments.subset_size"),
    ("unknown mix key", cfg(gradient_mix={"noise": "gaussian", "sigma": 0.3}), "gradient_mix.sigma"),
    ("unknown noise", cfg(gradient_mix={"noise": "uniform"}), "noise must be one of"),
    ("bad std", cfg(gradient_mix={"std": -0.1}), "std must be >= 0"),
    ("unknown granularity", cfg(gradient_mix={"granularity": "layer"}), "granularity must be one of"),
    ("bad enabled", cfg(gradient_mix={"enabled": "yes"}), "gradient_mix.enabled"),
    ("mix section not an object", cfg(gradient_mix=["gaussian"]), "gradient_mix must be a JSON object"),
    ("sample mix without batch size", {"zero_optimization": {"stage": 1}, "gradient_mix": {"granularity": "sample"}},
     "train_micro_batch_size_per_gpu"),
    ("micro-batch source with sample mix", cfg(optimizer=CLARS_OPT, gradient_mix={"granularity": "sample"}),
     "use source \"per_sample\""),
    ("micro-batch source with 0/2 Rademacher", cfg(optimizer=CLARS_OPT, gradient_mix={"noise": "rademacher",
                                                                                       "std": 1.0}),
     "coefficient 0"),
    ("offload", cfg(optimizer=CLARS_OPT, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}),
     "zero_optimization.offload_optimizer.device"),
    ("deprecated cpu_offload", cfg(optimizer=CLARS_OPT, zero_optimization={"stage": 2, "cpu_offload": True}),
     "zero_optimization.cpu_offload"),
    ("elastic checkpoint", cfg(optimizer=CLARS_OPT, zero_optimization={"stage": 2, "elastic_checkpoint": True}),
     "zero_optimization.elastic_checkpoint"),
    ("universal checkpoint", cfg(optimizer=CLARS_OPT, checkpoint={"load_universal": True}),
     "checkpoint.load_universal"),
    ("no global norm", cfg(optimizer=CLARS_OPT, zero_optimization={"stage": 1, "compute_grad_norm": False}),
     "zero_optimization.compute_grad_norm"),
    ("bf16 at stage 0", cfg(optimizer=CLARS_OPT, zero_optimization={"stage": 0}, bf16={"enabled": True}),
     "bf16.enabled"),
    ("unknown scheduler param", cfg(scheduler={"type": "InverseSqrt", "params": {"warmup_steps": 10}}),
     "scheduler.params.warmup_steps"),
    ("scheduler total missing", cfg(scheduler={"type": "PolynomialWarmupDecay", "params": {}}),
     "scheduler.params.total_num_steps"),
    ("scheduler bad value", cfg(scheduler={"type": "PolynomialWarmupDecay",
                                           "params": {"total_num_steps": 10, "warmup_num_steps": 10}}),
     "scheduler.params.warmup_num_steps (10) must be smaller than scheduler.params.total_num_steps (10)"),
    ("scheduler negative warmup", cfg(scheduler={"type": "InverseSqrt", "params": {"warmup_num_steps": -1}}),
     "scheduler.params.warmup_num_steps must be a non-negative integer"),
    ("scheduler negative total", cfg(scheduler={"type": "PolynomialWarmupDecay",
                                                "params": {"total_num_steps": -5}}),
     "scheduler.params.total_num_steps must be a positive integer"),
    ("scheduler fractional warmup", cfg(scheduler={"type": "PolynomialWarmupDecay",
                                                   "params": {"total_num_steps": 10, "warmup_num_steps": 2.5}}),
     "scheduler.params.warmup_num_steps must be a non-negative integer"),
    ("scheduler misspelled", cfg(scheduler={"type": "inversesqrt", "params": {}}), "scheduler.type"),
    # a misspelt lb_dist type used to reach DeepSpeed's generic "does not recognize LR scheduler"
    ("scheduler typo", cfg(scheduler={"type": "PolynomialWarmupDecy", "params": {"total_num_steps": 10}}),
     "scheduler.type 'PolynomialWarmupDecy' is neither DeepSpeed's nor torch's schedule; did you mean "
     "lb_dist's 'PolynomialWarmupDecay'"),
    ("scheduler typo with lb_dist optimizer", cfg(optimizer=CLARS_OPT, scheduler={"type": "InverseSqr"}),
     "did you mean lb_dist's 'InverseSqrt'"),
    ("scheduler unknown", cfg(optimizer=CLARS_OPT, scheduler={"type": "Poly"}),
     "scheduler.type 'Poly' is none of lb_dist's (PolynomialWarmupDecay, InverseSqrt), DeepSpeed's"),
    # ZeRO layouts lb_dist does not map (the layout matrix of docs/backend-deepspeed.md)
    ("ZeRO++ hpZ", cfg(optimizer=CLARS_OPT, zero_optimization={"stage": 3, "zero_hpz_partition_size": 2}),
     "zero_optimization.zero_hpz_partition_size = 2"),
    ("ZeRO++ quantized weights", cfg(optimizer={"type": "LAMB"},
                                     zero_optimization={"stage": 3, "zero_quantized_weights": True}),
     "zero_optimization.zero_quantized_weights = true"),
    ("ZeRO++ quantized frozen weights", cfg(optimizer={"type": "LAMB"}, zero_optimization={
        "stage": 3, "zero_quantized_nontrainable_weights": True}),
     "zero_optimization.zero_quantized_nontrainable_weights"),
    ("ZeRO++ quantized gradients", cfg(optimizer={"type": "LARS", "params": {"lr": 1}},
                                       zero_optimization={"stage": 3, "zero_quantized_gradients": True}),
     "zero_optimization.zero_quantized_gradients = true"),
    ("MiCS", cfg(optimizer=CLARS_OPT, zero_optimization={"stage": 3, "mics_shard_size": 2}),
     "zero_optimization.mics_shard_size = 2"),
    ("offload param", cfg(optimizer=CLARS_OPT, zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}}),
     "zero_optimization.offload_param.device"),
    ("ZeRO stage out of range", cfg(optimizer=CLARS_OPT, zero_optimization={"stage": 4}),
     "zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    ("ZeRO stage a string", cfg(optimizer=CLARS_OPT, zero_optimization={"stage": "2"}),
     "zero_optimization.stage must be 0, 1, 2 or 3, got '2'"),
    ("ZeRO section not an object", cfg(optimizer=CLARS_OPT, zero_optimization=2),
     "zero_optimization must be a JSON object"),
    ("fp16 untested", cfg(optimizer=CLARS_OPT, fp16={"enabled": True}), "fp16.enabled = true with lb_dist's CLARS"),
]


@pytest.mark.parametrize("what,config,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_key(what, config, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(config)
    assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize("kind", ["WarmupLR", "WarmupDecayLR", "OneCycle", "StepLR", "CosineAnnealingLR"])
def test_deepspeed_and_torch_schedulers_are_not_mistaken_for_typos(kind):
    assert parse_config(cfg(scheduler={"type": kind, "params": {}})) is None


@pytest.mark.parametrize("key,value", [("zero_hpz_partition_size", 1), ("zero_quantized_weights", False),
                                       ("zero_quantized_gradients", False), ("mics_shard_size", -1),
                                       ("stage3_param_persistence_threshold", 100), ("sub_group_size", 1)])
def test_zero_layout_defaults_and_exact_entries_are_accepted(key, value):
    """The refused ZeRO keys at their off values, and the exact entries of the layout matrix."""
    assert parse_config(cfg(optimizer=CLARS_OPT, zero_optimization={"stage": 3, key: value})) is not None


def test_fp16_runs_only_when_untested_layouts_are_allowed(monkeypatch):
    monkeypatch.setenv("LB_DIST_DEEPSPEED_UNTESTED", "1")
    with pytest.warns(RuntimeWarning, match="fp16.enabled = true"):
        assert parse_config(cfg(optimizer=CLARS_OPT, fp16={"enabled": True})) is not None


def test_bert_style_fused_lamb_config_switches_to_lb_dist_lamb():
    """DeepSpeed's BERT examples name "Lamb" with max_coeff / min_coeff: lb_dist's LAMB takes them
    (trust ratio clamped to [min_coeff, max_coeff]); FusedLamb's keys at lb_dist's behaviour are
    accepted and dropped; LARS/CLARS take the same clamp."""
    spec = parse_config(cfg(optimizer={"type": "Lamb", "params": {
        "lr": 1e-3, "weight_decay": 0.01, "bias_correction": False, "max_coeff": 0.3, "min_coeff": 0.01,
        "eps_inside_sqrt": False, "amsgrad": False, "max_grad_norm": 0.0}}))
    assert spec.optimizer.cls is LAMB
    assert spec.optimizer.params == {"lr": 1e-3, "weight_decay": 0.01, "bias_correction": False,
                                     "max_coeff": 0.3, "min_coeff": 0.01}
    opt = spec.optimizer.build([{"params": [__import__("torch").zeros(2, 2, requires_grad=True)]}])
    group = opt.param_groups[0]
    assert (group["min_coeff"], group["max_coeff"], group["bias_correction"]) == (0.01, 0.3, False)
    spec = parse_config(cfg(optimizer={"type": "LARS", "params": {"lr": 1.0, "max_coeff": 1.0}}))
    assert spec.optimizer.params["max_coeff"] == 1.0


def test_scheduler_errors_name_config_keys_not_python_arguments():
    """The schedules' own argument names (warmup_steps, total_steps) never reach a config error."""
    import re
    for params in ({"total_num_steps": 10, "warmup_num_steps": 10}, {"total_num_steps": 10, "warmup_num_steps": -1},
                   {"total_num_steps": 0}, {"total_num_steps": "10"}):
        with pytest.raises(ConfigError) as err:
            parse_config(cfg(scheduler={"type": "PolynomialWarmupDecay", "params": params}))
        message = str(err.value)
        assert not re.search(r"\b(warmup_steps|total_steps)\b", message), message
        assert "scheduler.params." in message, message


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{\"optimizer\": ")
    with pytest.raises(ConfigError, match="broken.json"):
        parse_config(str(broken))


def test_world_dependent_checks():
    spec = parse_config({"train_micro_batch_size_per_gpu": 4, "optimizer": CLARS_OPT})
    with pytest.raises(ConfigError, match="optimizer.second_moments.source"):
        check_world(spec, 1)
    check_world(spec, 2)                                  # 2 processes x 1 micro-batch: fine
    check_world(parse_config({**BASE, "optimizer": CLARS_OPT}), 1)   # accumulation 2: fine
    mix = parse_config(cfg(gradient_mix={"noise": "gaussian"}))
    with pytest.raises(ConfigError, match="gradient_mix.granularity"):
        check_world(mix, 1)
    check_world(parse_config(cfg(gradient_mix={"granularity": "sample"})), 1)


def test_per_sample_subset_smaller_than_world_is_refused():
    """A global per-sample subset smaller than the number of processes would fail at the first
    step inside per_sample_second_moments; check_world refuses it naming the key."""
    spec = parse_config(cfg(optimizer={**CLARS_OPT, "second_moments": {"source": "per_sample", "subset_size": 2}}))
    check_world(spec, 2)
    with pytest.raises(ConfigError, match=r"optimizer\.second_moments\.subset_size = 2 .* has 3"):
        check_world(spec, 3)


def test_initialize_refuses_small_subset_before_deepspeed_starts(monkeypatch):
    import torch
    monkeypatch.setenv("WORLD_SIZE", "4")
    called = []
    monkeypatch.setattr(lbds, "_deepspeed_initialize", lambda: fake_deepspeed_initialize(called))
    with pytest.raises(ConfigError, match="optimizer.second_moments.subset_size"):
        lbds.initialize(model=torch.nn.Linear(3, 2), config=cfg(optimizer={
            **CLARS_OPT, "second_moments": {"source": "per_sample", "subset_size": 3}}))
    assert not called


def fake_deepspeed_initialize(record: list):
    """Stands in for deepspeed.initialize (same signature) to see what lb_dist passes on."""
    import inspect

    import deepspeed

    def fake(*args, **kwargs):
        record.append((args, kwargs))
        return "engine", None, None, None

    fake.__signature__ = inspect.signature(deepspeed.initialize)
    return fake


def test_initialize_refuses_before_deepspeed_starts(monkeypatch):
    """The world-size checks run in lb_dist.deepspeed.initialize before DeepSpeed is called."""
    import torch
    monkeypatch.setenv("WORLD_SIZE", "1")
    called = []
    fake = fake_deepspeed_initialize(called)
    monkeypatch.setattr(lbds, "_deepspeed_initialize", lambda: fake)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="optimizer.second_moments.source"):
        lbds.initialize(model=model, config={"train_micro_batch_size_per_gpu": 4, "optimizer": CLARS_OPT})
    with pytest.raises(ConfigError, match="gradient_mix.granularity"):
        lbds.initialize(model=model, config=cfg(gradient_mix={}))
    with pytest.raises(ConfigError, match="also got optimizer=SGD"):
        lbds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        config=cfg(optimizer={"type": "LARS", "params": {"lr": 1.0}}))
    with pytest.raises(ConfigError, match="client CLARS"):
        lbds.initialize(model=model, optimizer=CLARS(model.parameters(), lr=0.1), config=cfg())
    assert not called


CLIENT_REFUSED = [
    ("no global norm", {"zero_optimization": {"stage": 2, "compute_grad_norm": False}},
     "zero_optimization.compute_grad_norm"),
    ("elastic checkpoint", {"zero_optimization": {"stage": 2, "elastic_checkpoint": True}},
     "zero_optimization.elastic_checkpoint"),
    ("universal checkpoint", {"checkpoint": {"load_universal": True}}, "checkpoint.load_universal"),
    ("offload optimizer", {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer"),
    ("offload param", {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
     "zero_optimization.offload_param"),
    ("deprecated cpu_offload", {"zero_optimization": {"stage": 2, "cpu_offload": True}},
     "zero_optimization.cpu_offload"),
    ("bf16 at stage 0", {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "bf16.enabled"),
    ("ZeRO++ hpZ", {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}},
     "zero_optimization.zero_hpz_partition_size"),
    ("ZeRO++ quantized gradients", {"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}},
     "zero_optimization.zero_quantized_gradients"),
]


@pytest.mark.parametrize("with_mix", [False, True], ids=["plain", "gradient_mix"])
@pytest.mark.parametrize("what,sections,needle", CLIENT_REFUSED, ids=[c[0] for c in CLIENT_REFUSED])
@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_client_layerwise_optimizer_gets_the_config_refusals(monkeypatch, cls, what, sections, needle, with_mix):
    """An lb_dist LARS/LAMB passed as optimizer= is refused the same DeepSpeed settings as one the
    config names, naming the key, before DeepSpeed is called (with or without other lb_dist
    sections in the config)."""
    import torch
    monkeypatch.setenv("WORLD_SIZE", "2")
    called = []
    monkeypatch.setattr(lbds, "_deepspeed_initialize", lambda: fake_deepspeed_initialize(called))
    model = torch.nn.Linear(3, 2)
    config = cfg(**copy.deepcopy(sections))
    if with_mix:
        config["gradient_mix"] = {"noise": "gaussian"}
    with pytest.raises(ConfigError) as err:
        lbds.initialize(model=model, optimizer=cls(model.parameters(), lr=0.1), config=config)
    assert needle in str(err.value), str(err.value)
    assert not called


def test_client_layerwise_optimizer_without_refused_settings_reaches_deepspeed(monkeypatch):
    """The client check refuses only those settings: a plain ZeRO-2 config goes on to DeepSpeed,
    with zero_allow_untested_optimizer set for the (then ZeRO-aware) client optimizer."""
    import torch
    monkeypatch.setenv("WORLD_SIZE", "2")
    called = []
    monkeypatch.setattr(lbds, "_deepspeed_initialize", lambda: fake_deepspeed_initialize(called))
    monkeypatch.setattr(lbds, "attach", lambda engine, spec, optimizer: None)
    model = torch.nn.Linear(3, 2)
    opt = LARS(model.parameters(), lr=0.1)
    assert lbds.initialize(model=model, optimizer=opt, config=cfg())[0] == "engine"
    (args, kwargs), = called
    assert kwargs["optimizer"] is opt and kwargs["config"]["zero_allow_untested_optimizer"] is True


def test_config_without_lb_dist_goes_to_deepspeed_unchanged(monkeypatch):
    seen = []
    fake = fake_deepspeed_initialize(seen)
    monkeypatch.setattr(lbds, "_deepspeed_initialize", lambda: fake)
    model = object()
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam", "params": {"lr": 1.0}}}
    assert lbds.initialize(model=model, config=config) == ("engine", None, None, None)
    assert seen == [((), {"model": model, "config": config})]
    assert seen[0][1]["config"] is config


def test_register_is_idempotent_and_reversible():
    import deepspeed
    original = deepspeed.initialize
    assert not lbds.is_registered()
    try:
        lbds.register()
        lbds.register()
        assert lbds.is_registered() and deepspeed.initialize is not original
        assert lbds._deepspeed_initialize() is original
    finally:
        lbds.unregister()
        lbds.unregister()
    assert deepspeed.initialize is original and not lbds.is_registered()


def test_stray_lb_dist_optimizer_over_the_model_is_refused(monkeypatch):
    """Hugging Face's Trainer(optimizers=(lamb, None)) under DeepSpeed hands DeepSpeed AdamW instead
    (tested with the real Trainer in tests/test_deepspeed_hf_zero3.py): an lb_dist optimizer over the
    model that DeepSpeed does not get is refused before DeepSpeed starts; another model's is not."""
    import torch
    monkeypatch.setenv("WORLD_SIZE", "2")
    called = []
    monkeypatch.setattr(lbds, "_deepspeed_initialize", lambda: fake_deepspeed_initialize(called))
    model, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    stray = LAMB(model.parameters(), lr=0.1)
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match=r"an lb_dist LAMB over this model's parameters exists, but DeepSpeed is "
                                          r"being given AdamW.*create_optimizer"):
        lbds.initialize(model=model, optimizer=adamw, config=cfg())
    assert not called
    keep = LARS(other.parameters(), lr=0.1)          # another model's optimizer: no business of this engine
    lbds.initialize(model=torch.nn.Linear(3, 2), optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
                    config=cfg(optimizer={"type": "Adam", "params": {}}))
    assert len(called) == 1 and stray is not None and keep is not None


VERSION_PROBE = """
import sys, warnings
import deepspeed
deepspeed.__version__ = sys.argv[1]          # an untested release, as pip would have installed it
import lb_dist.deepspeed as lbds
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        lbds.initialize(model=None, config={"optimizer": {"type": "LARS", "params": {"lr": 1.0}}})
        result = "ACCEPTED"
    except Exception as exc:
        result = f"REFUSED {type(exc).__name__} {exc}"
for w in caught:
    print("WARNING", w.message)
print(result)
"""


@pytest.mark.parametrize("version,env,want", [
    ("0.14.4", "", "REFUSED RuntimeError lb_dist.deepspeed supports DeepSpeed >=0.19.8,<0.20"),
    ("0.20.0", "", "REFUSED RuntimeError lb_dist.deepspeed supports DeepSpeed >=0.19.8,<0.20"),
    ("0.20.0", "1", "REFUSED ValueError deepspeed.initialize requires a model"),
])
def test_untested_deepspeed_version_is_refused_naming_the_range(version, env, want):
    """A DeepSpeed outside the tested range (its version string faked in a fresh process) is refused
    by lb_dist.deepspeed.initialize before anything starts, naming the range; with
    LB_DIST_DEEPSPEED_UNTESTED=1 (a warning) it goes on (here to the missing-model error), as every
    other DeepSpeed test does with the installed 0.19.8."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    env_vars = {**__import__("os").environ, "DS_ACCELERATOR": "cpu", "LB_DIST_DEEPSPEED_UNTESTED": env,
                "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-c", VERSION_PROBE, version], cwd=str(repo), env=env_vars,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ACCEPTED", "REFUSED"))]
    warned = any(ln.startswith("WARNING lb_dist.deepspeed supports DeepSpeed >=0.19.8,<0.20") and
                 "found deepspeed 0.20.0" in ln for ln in proc.stdout.splitlines())
    assert line and line[-1].startswith(want), proc.stdout[-3000:]
    assert warned is bool(env)                            # the opt-out warns, naming the range
