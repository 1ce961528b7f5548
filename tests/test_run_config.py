"""One run configuration from every front door (issue 13): ``lb-dist train`` flags, the same settings in
a ``--deepspeed-config`` file, and a DeepSpeed config given to ``lb_dist.deepspeed.initialize`` end in the
same typed specs (``lb_dist.deepspeed.config.OptimizerSpec`` / ``MixSpec``) and build the same optimizer
and GradientMix; errors name the flag or the key. The loop's typed sections
(``lb_dist.train.run_config.RunConfig``: data, checkpoint, backend, logging) hold the flags' values,
are frozen, and leave the namespace (the run's record) as it was. Nothing is launched: parsing only, plus the built
objects' hyperparameters (an optimizer over one tensor)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from lb_dist.deepspeed.config import ConfigError, LbDistConfig, parse_config
from lb_dist.train.config import parse_args, to_dict
from lb_dist.train.optimizers import build_optimizer, mix_spec, optimizer_spec

ETA, STD, LR, MOMENTUM, WD, SUBSET, SEED = 0.02, 0.5, 0.5, 0.8, 1e-4, 16, 3

#: The settings, as a DeepSpeed JSON config (the paper's names, lb_dist's keys).
JSON = {
    "train_batch_size": 32,
    "zero_optimization": {"stage": 1},
    "optimizer": {"type": "CLARS", "params": {"lr": LR, "eta": ETA, "momentum": MOMENTUM, "weight_decay": WD},
                  "second_moments": {"source": "per_sample", "subset_size": SUBSET}},
    "gradient_mix": {"std": STD, "seed": SEED, "granularity": "device"},
}
#: The same settings, as flags.
FLAGS = ["--optimizer", "clars", "--lr", str(LR), "--eta", str(ETA), "--momentum", str(MOMENTUM),
         "--weight-decay", str(WD), "--clars-moments", "per-sample", "--per-sample-subset", str(SUBSET),
         "--mix", "device", "--mix-std", str(STD), "--mix-seed", str(SEED), "--zero-stage", "1",
         "--batch-size", "32", "--schedule", "constant"]


def _hyperparameters(optimizer) -> dict:
    d = optimizer.defaults
    return {k: d[k] for k in ("lr", "eta", "momentum", "weight_decay", "nesterov")}


def _doors(tmp_path):
    """(name, OptimizerSpec, MixSpec) of each front door."""
    flags = parse_args(["--run-dir", str(tmp_path / "a"), "--backend", "deepspeed", *FLAGS])
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(JSON))
    from_file = parse_args(["--run-dir", str(tmp_path / "b"), "--backend", "deepspeed", "--deepspeed-config",
                            str(path)])
    spec = parse_config(JSON)
    return [("flags", optimizer_spec(flags), mix_spec(flags)),
            ("--deepspeed-config", optimizer_spec(from_file), mix_spec(from_file)),
            ("lb_dist.deepspeed JSON", spec.optimizer, spec.gradient_mix)], flags


def test_every_front_door_gives_the_same_optimizer_and_mix(tmp_path):
    doors, flags = _doors(tmp_path)
    # the reference: the paper's settings written out here, not read from any of the doors
    want_opt = {"lr": LR, "eta": ETA, "momentum": MOMENTUM, "weight_decay": WD, "nesterov": True}
    for name, opt, mix in doors:
        assert opt.type == "CLARS", name
        assert (opt.second_moments.source, opt.second_moments.subset_size) == ("per_sample", SUBSET), name
        built = opt.build([torch.zeros(3, requires_grad=True)])
        assert _hyperparameters(built) == pytest.approx(want_opt), name
        assert (mix.noise, mix.std, mix.granularity, mix.seed, mix.enabled) == ("gaussian", STD, "device", SEED, True)
        g = mix.build(world_size=4)
        assert (g.std, g.seed, g.granularity) == (STD, SEED, "device"), name
    # the loop's own optimizer (non-DeepSpeed backends) has the same hyperparameters
    model = torch.nn.Linear(3, 2)
    loop_opt, _ = build_optimizer(flags, model, LR, local_batch_size=16)
    got = {**_hyperparameters(loop_opt), "weight_decay": loop_opt.param_groups[0]["weight_decay"]}  # per group
    assert got == pytest.approx(want_opt)


def test_defaults_are_the_same_at_every_door(tmp_path):
    """Unset eta / std / subset / chunk: every door takes the one default (CLARS' eta 0.01 of section 4.4,
    DEFAULT_STD, |J| = 512, chunk 64) from the one place it is written."""
    from lb_dist.mixing import DEFAULT_STD
    from lb_dist.moments.per_sample import DEFAULT_CHUNK_SIZE, DEFAULT_SUBSET_SIZE
    assert (DEFAULT_STD, DEFAULT_SUBSET_SIZE, DEFAULT_CHUNK_SIZE) == (0.25, 512, 64)   # the documented values
    flags = parse_args(["--run-dir", str(tmp_path / "a"), "--backend", "deepspeed", "--optimizer", "clars",
                        "--lr", "1", "--clars-moments", "per-sample", "--mix", "device"])
    spec = parse_config({"train_batch_size": 8, "optimizer": {"type": "CLARS", "params": {"lr": 1.0},
                                                              "second_moments": {"source": "per_sample"}},
                         "gradient_mix": {}})
    for opt, mix in ((optimizer_spec(flags), mix_spec(flags)), (spec.optimizer, spec.gradient_mix)):
        assert opt.build([torch.zeros(1, requires_grad=True)]).defaults["eta"] == 0.01
        assert (opt.second_moments.subset_size, opt.second_moments.chunk_size) == (512, 64)
        assert mix.std == 0.25


def test_typed_config_goes_to_deepspeed_without_json_and_is_checked_once(tmp_path):
    """The DeepSpeed backend's typed config: parse_config takes it as it is (same object), checks its
    combination with DeepSpeed's keys (naming the key), and its JSON record parses back to the same specs."""
    from lb_dist.train.backend_deepspeed import lb_dist_config
    doors, flags = _doors(tmp_path)
    spec = lb_dist_config(flags, world_size=2)
    assert isinstance(spec, LbDistConfig) and parse_config(spec) is spec
    again = parse_config(json.loads(json.dumps(spec.to_dict())))
    assert again.optimizer.to_dict() == spec.optimizer.to_dict()
    assert again.gradient_mix == spec.gradient_mix
    assert spec.deepspeed_config()["zero_optimization"]["stage"] == 1 and "optimizer" not in spec.deepspeed_config()
    bad = parse_args(["--run-dir", str(tmp_path / "c"), "--backend", "deepspeed", "--optimizer", "clars", "--lr", "1",
                      "--zero-stage", "0", "--bf16"])
    with pytest.raises(ConfigError, match=r"bf16\.enabled = true with zero_optimization\.stage 0"):
        parse_config(lb_dist_config(bad, world_size=2))


@pytest.mark.parametrize("argv,match", [
    (["--eta", "-1"], "argument --eta"),
    (["--mix-std", "0.3"], "argument --mix-std"),
    (["--per-sample-subset", "0"], "argument --per-sample-subset"),
])
def test_flag_errors_name_the_flag(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        parse_args(["--run-dir", str(tmp_path), "--lr", "1", *argv])
    assert e.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.parametrize("change,match", [
    (lambda c: c["optimizer"]["params"].update(eta=-1), "optimizer.params"),
    (lambda c: c["gradient_mix"].update(std=-0.5), "gradient_mix"),
    (lambda c: c["optimizer"]["second_moments"].update(subset_size=0), "optimizer.second_moments.subset_size"),
    (lambda c: c.update(scheduler={"type": "InverseSqrt", "params": {"warmup_num_steps": -1}}),
     "scheduler.params.warmup_num_steps"),
])
def test_json_errors_name_the_key_at_both_json_doors(tmp_path, capsys, change, match):
    cfg = json.loads(json.dumps(JSON))
    change(cfg)
    with pytest.raises(ConfigError, match=match):
        parse_config(cfg)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):
        parse_args(["--run-dir", str(tmp_path / "r"), "--backend", "deepspeed", "--deepspeed-config", str(path)])
    err = capsys.readouterr().err
    assert "argument --deepspeed-config" in err and match in err


def test_attachments_are_not_flags(tmp_path):
    """parse_args attaches the parser and the --deepspeed-config file (public, typed); neither is saved."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**JSON, "scheduler": {"type": "InverseSqrt", "params": {"warmup_num_steps": 4}}}))
    args = parse_args(["--run-dir", str(tmp_path / "r"), "--backend", "deepspeed", "--deepspeed-config", str(path),
                       "--batch-size", "64"])
    assert args.deepspeed_file.raw == json.loads(path.read_text())
    assert any("overridden by --batch-size 64" in n for n in args.deepspeed_file.notes)
    saved = to_dict(args)
    assert "deepspeed_file" not in saved and "parser" not in saved
    json.dumps(saved)


def test_backend_registry_and_capabilities():
    """The backends are looked up by name; what a backend cannot run is refused by its check_args
    (the loop tests no backend name); the old import path still works, with a DeprecationWarning."""
    import lb_dist.train.backends as backends
    from lb_dist.train.registry import BACKEND_NAMES, backend_class, select_backend
    assert set(BACKEND_NAMES) == {"auto", "single", "torchrun", "deepspeed", "horovod", "fsdp"}
    assert isinstance(select_backend("single"), backends.SingleProcess)
    from argparse import Namespace
    args = Namespace(optimizer="clars", clars_moments="training-pass", zero_stage=None, bf16=None,
                     deepspeed_config=None)
    for name, refused in (("single", False), ("torchrun", False), ("horovod", False), ("fsdp", False),
                          ("deepspeed", False)):
        b = backend_class(name)()
        b.world_size = 2
        message = b.check_args(args)
        assert (message is not None and "argument --clars-moments" in message) == refused, name

    class NoHooks(backends.Torchrun):          # a registered backend without the capability
        name = "nohooks"
        training_pass_moments = False
    b = NoHooks()
    b.world_size = 2
    assert b.check_args(args).startswith("argument --clars-moments: training-pass is implemented for --backend "
                                         "single, torchrun, horovod, deepspeed and fsdp")
    args = Namespace(optimizer="sgd", clars_moments="micro-batch", zero_stage=2, bf16=None, deepspeed_config=None)
    assert "argument --zero-stage: only for --backend deepspeed" in backends.Torchrun().check_args(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.select_backend is select_backend
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


def test_schedule_is_the_same_from_flags_and_from_the_config_file(tmp_path):
    """--deepspeed-config's scheduler section and the same flags give one SchedulerSpec (the run's length
    replaces total_num_steps) and the same rate at every step."""
    from lb_dist.train.optimizers import schedule_spec
    total, warmup = 12, 3
    section = {"type": "PolynomialWarmupDecay",
               "params": {"total_num_steps": total, "warmup_num_steps": warmup, "init_factor": 0.1,
                          "final_factor": 0.05, "warmup_power": 2.0, "decay_power": 1.5}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, **{k: v for k, v in JSON.items() if k != "train_batch_size"},
                                "scheduler": section}))
    from_file = parse_args(["--run-dir", str(tmp_path / "a"), "--backend", "deepspeed", "--deepspeed-config", str(path)])
    flags = parse_args(["--run-dir", str(tmp_path / "b"), "--backend", "deepspeed", *FLAGS[:-2], "--schedule", "poly",
                        "--warmup-steps", "3", "--lr-init-factor", "0.1", "--lr-final-factor", "0.05",
                        "--warmup-power", "2", "--decay-power", "1.5"])
    specs = [schedule_spec(a, total, warmup) for a in (from_file, flags)] + [parse_config(
        {"optimizer": JSON["optimizer"], "scheduler": section}).scheduler]
    assert specs[0].to_dict() == specs[1].to_dict() == specs[2].to_dict() == section
    rates = []
    for spec in specs:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
        sched, seq = spec.build(opt), []
        for _ in range(total):
            seq.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        rates.append(seq)
    assert rates[0] == rates[1] == rates[2]
    assert rates[0][0] == pytest.approx(LR * 0.1) and max(rates[0]) == pytest.approx(LR)   # eq. 15's ends


# ----------------------------------------------------------------------------- RunConfig (the loop's sections)
RUN_FLAGS = ["--lr", "0.3", "--optimizer", "clars", "--clars-moments", "per-sample", "--per-sample-subset", "24",
             "--per-sample-chunk", "8", "--mix", "sample", "--mix-std", "0.25", "--batch-size", "48",
             "--accumulation-steps", "3", "--eval-batch-size", "40", "--workers", "2", "--epochs", "5", "--seed", "11",
             "--train-size", "960", "--test-size", "120", "--checkpoint-every-steps", "7",
             "--keep-checkpoints", "4", "--stop-after-steps", "9", "--log-every", "6", "--layer-stats-every", "0",
             "--no-progress", "--tensorboard", "off", "--backend", "single", "--device", "cpu", "--num-threads", "2"]


def test_run_config_sections_hold_the_flags(tmp_path):
    from lb_dist.train.run_config import (BackendConfig, CheckpointConfig, DataConfig, LoggingConfig, RunConfig)
    args = parse_args(["--run-dir", str(tmp_path / "r"), *RUN_FLAGS])
    config = RunConfig.from_args(args)
    assert config.data == DataConfig(dataset="synthetic", data_dir=None, train_size=960, test_size=120, batch_size=48,
                                     accumulation_steps=3, eval_batch_size=40, workers=2, epochs=5, seed=11)
    assert config.checkpoint == CheckpointConfig(run_dir=tmp_path / "r", resume="auto", every_steps=7, keep=4,
                                                 stop_after_steps=9)
    assert config.backend == BackendConfig(name="single", device="cpu", dist_backend="auto", num_threads=2,
                                           zero_stage=None, bf16=None, deepspeed_config=None)
    assert config.logging == LoggingConfig(log_every=6, layer_stats_every=0, progress=False, tensorboard="off")
    assert (config.optimizer_name, config.optimizer.type, config.optimizer.params["lr"]) == ("clars", "CLARS", 0.3)
    assert (config.per_sample_moments.subset_size, config.per_sample_moments.chunk_size) == (24, 8)
    assert (config.mix.granularity, config.mix.std, config.mix.seed) == ("sample", 0.25, 11)
    # S_k from the training pass or micro-batches: no per-sample step in the loop; no lb_dist optimizer, no mix
    for source in ("training-pass", "micro-batch"):
        other = parse_args(["--run-dir", str(tmp_path / "s"), *RUN_FLAGS, "--clars-moments", source,
                            "--accumulation-steps", "3"])
        assert RunConfig.from_args(other).per_sample_moments is None, source
    plain = RunConfig.from_args(parse_args(["--run-dir", str(tmp_path / "t"), "--lr", "0.1", "--optimizer", "sgd"]))
    assert (plain.optimizer, plain.mix, plain.per_sample_moments) == (None, None, None)


def test_run_config_from_a_deepspeed_config_file(tmp_path):
    """--deepspeed-config fills the flags first; the sections read the filled values."""
    from lb_dist.train.run_config import RunConfig
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(JSON))
    config = RunConfig.from_args(parse_args(["--run-dir", str(tmp_path / "r"), "--backend", "deepspeed",
                                             "--deepspeed-config", str(path)]))
    assert (config.data.batch_size, config.backend.name, config.backend.zero_stage) == (32, "deepspeed", 1)
    assert config.backend.deepspeed_config == str(path)
    assert config.per_sample_moments.subset_size == SUBSET and config.mix.std == STD


def test_run_config_sections_are_frozen(tmp_path):
    import dataclasses

    from lb_dist.train.run_config import RunConfig
    config = RunConfig.from_args(parse_args(["--run-dir", str(tmp_path / "r"), *RUN_FLAGS]))
    for obj, field in ((config, "data"), (config.data, "batch_size"), (config.checkpoint, "keep"),
                       (config.backend, "num_threads"), (config.logging, "log_every")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, None)


def test_run_config_leaves_the_record_unchanged(tmp_path):
    """from_args reads the namespace, never writes it: config.json / the checkpoints' ``config`` are the
    flags as before; the record read back (a resume) gives the same sections."""
    import argparse

    from lb_dist.train.run_config import RunConfig
    args = parse_args(["--run-dir", str(tmp_path / "r"), *RUN_FLAGS])
    before = dict(vars(args))
    record = to_dict(args)
    config = RunConfig.from_args(args)
    assert vars(args) == before and to_dict(args) == record
    assert "config" not in record and "run_config" not in record and record["batch_size"] == 48
    saved = json.loads(json.dumps(record))
    assert saved == record
    assert RunConfig.from_args(argparse.Namespace(**saved)) == config
