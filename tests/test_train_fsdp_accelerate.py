"""``lb-dist train`` under ``accelerate launch --use_fsdp --fsdp_version 2`` (Accelerate's FSDP2 plugin,
gloo on CPU): the FSDP backend is picked by ``--backend auto``, follows the plugin's wrap policy, and
trains to the one-process references of tests/_worker_train_reference.py; plugin settings the engine
cannot honour are refused before anything, naming Accelerate's flag. Also the sharding plan itself
(which modules ``fully_shard`` sees) on the models lb_dist ships, without processes.

Accelerate's own ``Accelerator``/HF ``Trainer`` FSDP needs GPUs (Accelerate turns FSDP on only for
GPU distributed types); what Accelerate contributes here is its launcher and plugin configuration."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _train_runs import assert_params_close, final_model
from _worker_launch import REPO, child_env, free_port
from _worker_train_reference import reference_layerwise, reference_sgd
from test_train_distributed import BATCH, CLARS_REF, IMAGE, SGD, STEPS, TRAIN, common

from lb_dist.models import build_model
from lb_dist.train.backend_fsdp import ShardingPlan, shard_blocks, sharding_plan
from lb_dist.train.backends import BackendConfigError, Torchrun
from lb_dist.train.config import parse_args
from lb_dist.train.registry import detect_backend

pytestmark = pytest.mark.filterwarnings("ignore")

accelerate_launch = pytest.importorskip("accelerate.commands.launch")

PLUGIN = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "false",
          "FSDP_ACTIVATION_CHECKPOINTING": "false", "ACCELERATE_MIXED_PRECISION": "no",
          "FSDP_RESHARD_AFTER_FORWARD": "true", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}


def accelerate(args: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), *args]
    return subprocess.run(cmd, env=child_env(), cwd=str(REPO), capture_output=True, text=True, timeout=timeout)


def test_accelerate_fsdp2_plugin_picks_fsdp_and_trains_to_the_references(tmp_path):
    """The documented Accelerate flow: `accelerate launch --use_fsdp --fsdp_version 2
    --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap BasicBlock`
    of a script calling lb_dist.train with --backend auto. CLARS + device-wise GradientMix with
    every ResNet block its own FSDP unit, and SGD + mix with --fsdp-wrap root (the flag over the
    plugin), each equal to its one-process reference."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([
        {"name": "clars_device", "argv": common(tmp_path / "clars_device", *CLARS_REF, "--mix", "device",
                                                "--mix-std", "0.5")},
        {"name": "sgd_root", "argv": common(tmp_path / "sgd_root", *SGD, "--mix", "device", "--mix-std", "0.5",
                                            "--fsdp-wrap", "root")},
    ]))
    proc = accelerate(["--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                       "--fsdp_transformer_layer_cls_to_wrap", "BasicBlock", str(REPO / "tests" / "_worker_train.py"),
                       str(spec), "--backend", "auto"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    out = json.loads((tmp_path / "spec.json.out").read_text())
    assert out["detected"] == "fsdp" and out["backend"] == "fsdp" and out["world_size"] == 2
    text = proc.stdout + proc.stderr
    assert text.count("--backend fsdp: fully_shard on 9 block(s) (BasicBlock, from FSDP_TRANSFORMER_CLS_TO_WRAP) "
                      "and the root, reshard_after_forward=True") == 1
    assert text.count("--backend fsdp: fully_shard on the root only (from --fsdp-wrap)") == 1
    kw = dict(optimizer="clars", steps=STEPS, batch_size=BATCH, world_size=2, weight_decay=5e-4, train_size=TRAIN,
              image_size=IMAGE, mix="device", mix_std=0.5, lr=0.2)
    assert_params_close(final_model(tmp_path / "clars_device"), reference_layerwise(**kw), rtol=1e-4, atol=1e-5)
    want = reference_sgd(steps=STEPS, batch_size=BATCH, world_size=2, accumulation=1, lr=0.05, momentum=0.9,
                         train_size=TRAIN, image_size=IMAGE, mix="device", mix_std=0.5)
    assert_params_close(final_model(tmp_path / "sgd_root"), want)


def test_accelerate_plugin_setting_the_engine_cannot_honour_is_refused_before_anything(tmp_path):
    """CPU offload through Accelerate's plugin: refused once per process, naming Accelerate's flag,
    before the run directory exists."""
    run_dir = tmp_path / "r"
    proc = accelerate(["--fsdp_version", "2", "--fsdp_offload_params", "true", "-m", "lb_dist.train",
                       *common(run_dir, *SGD)], timeout=240)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "accelerate launch --fsdp_offload_params true: not supported" in text
    assert not run_dir.exists()


# ---------------------------------------------------------------- without processes

def test_detect_backend_under_accelerate_fsdp_plugin():
    assert detect_backend(PLUGIN) == "fsdp"
    plain = {k: v for k, v in PLUGIN.items() if not k.startswith(("FSDP", "ACCELERATE"))}
    assert detect_backend(plain) == "torchrun"                       # accelerate launch --multi_gpu / torchrun
    assert detect_backend({**PLUGIN, "ACCELERATE_USE_FSDP": "false"}) == "torchrun"
    assert detect_backend({"ACCELERATE_USE_FSDP": "true"}) == "single"   # no launcher environment


@pytest.mark.parametrize("env, flag, message", [
    ({"FSDP_VERSION": "1"}, None, "accelerate launch --fsdp_version 1: lb-dist train's FSDP engine is FSDP2"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, None, "accelerate launch --fsdp_offload_params true"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, None, "accelerate launch --fsdp_activation_checkpointing true"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, None, "accelerate launch --mixed_precision bf16"),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, None, "--fsdp_auto_wrap_policy SIZE_BASED_WRAP"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "root", "accelerate launch --fsdp_offload_params true"),
])
def test_sharding_plan_refuses_plugin_settings_naming_the_flag(env, flag, message):
    args = parse_args(["--run-dir", "x", "--lr", "0.1", "--backend", "fsdp"] + (["--fsdp-wrap", flag] if flag else []))
    with pytest.raises(BackendConfigError, match=message.replace("(", r"\(")):
        sharding_plan(args, {**PLUGIN, **env})


def test_sharding_plan_follows_flag_then_plugin_then_default():
    none = parse_args(["--run-dir", "x", "--lr", "0.1"])
    assert sharding_plan(none, {}) == ShardingPlan(wrap="blocks")
    assert sharding_plan(parse_args(["--run-dir", "x", "--lr", "0.1", "--fsdp-wrap", "root"]), {}).wrap == "root"
    assert sharding_plan(none, {**PLUGIN, "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}).wrap == "root"
    plan = sharding_plan(none, {**PLUGIN, "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                                "FSDP_TRANSFORMER_CLS_TO_WRAP": "MarianEncoderLayer, MarianDecoderLayer",
                                "FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert plan.block_classes == ("MarianEncoderLayer", "MarianDecoderLayer")
    assert plan.wrap == "blocks" and plan.reshard_after_forward is False
    # the flag wins over the plugin's wrap policy, the plugin's reshard setting stays
    flagged = sharding_plan(parse_args(["--run-dir", "x", "--lr", "0.1", "--fsdp-wrap", "root"]),
                            {**PLUGIN, "FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert flagged.wrap == "root" and flagged.reshard_after_forward is False


def test_fsdp_wrap_flag_refused_for_other_backends():
    args = parse_args(["--run-dir", "x", "--lr", "0.1", "--fsdp-wrap", "root"])
    assert Torchrun().check_args(args) == ("argument --fsdp-wrap: only for --backend fsdp, and this run's backend "
                                           "is torchrun")


def test_ddp_refused_under_the_accelerate_fsdp_plugin(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    message = Torchrun().check_args(parse_args(["--run-dir", "x", "--lr", "0.1"]))
    assert message.startswith("argument --backend: torchrun (DistributedDataParallel) in a job started by "
                              "`accelerate launch --use_fsdp`")


def test_shard_blocks_on_the_shipped_models():
    """The structural rule: children of a Sequential/ModuleList with parameters and submodules,
    outermost only; by class names when the plugin names them; none for root."""
    resnet = build_model("resnet20")
    assert shard_blocks(resnet, ShardingPlan()) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert shard_blocks(resnet, ShardingPlan(wrap="root")) == []
    vgg = build_model("vgg11_bn")          # a Sequential of bare layers: no block, the root only
    assert shard_blocks(vgg, ShardingPlan()) == []
    from lb_dist.models.transformer import build_transformer
    t = build_transformer("small", src_vocab_size=50, tgt_vocab_size=50)
    layers = [f"model.{side}.layers.{i}" for side in ("encoder", "decoder") for i in range(2)]
    assert shard_blocks(t, ShardingPlan()) == layers
    assert shard_blocks(t, ShardingPlan(block_classes=("MarianDecoderLayer",))) == layers[2:]
    with pytest.raises(BackendConfigError, match="FSDP_TRANSFORMER_CLS_TO_WRAP: no module of class BertLayer"):
        shard_blocks(t, ShardingPlan(block_classes=("BertLayer",), source="FSDP_TRANSFORMER_CLS_TO_WRAP"))
