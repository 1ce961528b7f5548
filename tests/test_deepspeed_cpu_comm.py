"""lb_dist keeps DeepSpeed from JIT-compiling its CPU shared-memory comm op (lb_dist.deepspeed.cpu_comm).

Each check runs in a fresh process (DeepSpeed keeps its table of compatible ops and its comm backend
per process) with a private, empty TORCH_EXTENSIONS_DIR, so "nothing was built" is observable.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _worker_launch import REPO, child_env, free_port  # noqa: E402

from lb_dist.deepspeed import cpu_comm  # noqa: E402

BASE = """
import json, os, sys
import torch
import deepspeed, deepspeed.comm
def report(**kw):
    print("RESULT " + json.dumps(kw), flush=True)
"""
PRELUDE = BASE + "import lb_dist.deepspeed as lbds\n"


def _python(code: str, ext_dir: Path, prelude: str = PRELUDE, **env_extra: str) -> dict:
    env = child_env()
    env.pop(cpu_comm.ENV_KEEP, None)
    env.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ext_dir), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **env_extra)
    proc = subprocess.run([sys.executable, "-c", prelude + code], cwd=str(REPO), env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-4000:]
    return json.loads(line[-1][len("RESULT "):])


def _built(ext_dir: Path) -> list[str]:
    return sorted(p.name for p in ext_dir.rglob("*")) if ext_dir.exists() else []


@pytest.fixture(scope="module")
def deepspeed_would_build_it(tmp_path_factory):
    """The control: without lb_dist, DeepSpeed on this machine counts the op as compatible, i.e. its
    init_distributed would compile it (otherwise the checks below could not fail)."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: DeepSpeed itself skips the op here")
    out = _python("report(compatible=deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'])",
                  tmp_path_factory.mktemp("ext"), prelude=BASE)
    assert out["compatible"] is True


def test_importing_lb_dist_deepspeed_is_enough_in_hugging_faces_order(deepspeed_would_build_it, tmp_path):
    """A Hugging Face script imports lb_dist.deepspeed at the top, parses its arguments, sets up
    DeepSpeed's communication (TrainingArguments does it itself in a multi-process job, tested under
    the launcher in tests/test_deepspeed_hf_zero3.py; a CPU script calls init_distributed for
    zero.Init) and only then calls register(): the import alone kept DeepSpeed from building the op."""
    pytest.importorskip("transformers")
    code = """
import lb_dist.deepspeed as lbds
from transformers import TrainingArguments
args = TrainingArguments(output_dir=os.environ["TORCH_EXTENSIONS_DIR"] + "_out", use_cpu=True, report_to=[],
                         deepspeed={"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3}})
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
comm_before_register = deepspeed.comm.is_initialized()
lbds.register()
report(comm_before_register=comm_before_register, loaded=deepspeed.comm.comm.cdb.shm_comm_op is not None)
"""
    assert _python(code, tmp_path / "ext", prelude=BASE) == {"comm_before_register": True, "loaded": False}
    assert _built(tmp_path / "ext") == []


def test_initialize_skips_the_op_before_deepspeed_sets_up_comm(deepspeed_would_build_it, tmp_path):
    # lb_dist.deepspeed.initialize on a config without lb_dist keys: DeepSpeed's own initialize,
    # which calls init_distributed itself; lb_dist marked the op incompatible first
    code = """
model = torch.nn.Linear(4, 2)
cfg = {"train_batch_size": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
engine, *_ = lbds.initialize(model=model, config=cfg)
report(loaded=deepspeed.comm.comm.cdb.shm_comm_op is not None,
       compatible=deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'])
"""
    out = _python(code, tmp_path / "ext")
    assert out == {"loaded": False, "compatible": False}
    assert _built(tmp_path / "ext") == []


def test_register_skips_the_op_for_code_that_initializes_deepspeed_itself(deepspeed_would_build_it, tmp_path):
    code = """
lbds.register()
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
report(loaded=deepspeed.comm.comm.cdb.shm_comm_op is not None)
"""
    assert _python(code, tmp_path / "ext") == {"loaded": False}
    assert _built(tmp_path / "ext") == []


def test_train_backend_skips_the_op(deepspeed_would_build_it, tmp_path):
    code = """
from lb_dist.train.backend_deepspeed import DeepSpeedBackend
backend = DeepSpeedBackend(device="cpu")
backend.start()
report(loaded=deepspeed.comm.comm.cdb.shm_comm_op is not None, world=backend.world_size)
backend.close()
"""
    assert _python(code, tmp_path / "ext") == {"loaded": False, "world": 1}
    assert _built(tmp_path / "ext") == []


def test_opt_out_keeps_deepspeeds_default(deepspeed_would_build_it, tmp_path):
    code = """
report(changed=lbds.skip_shm_comm_op(), compatible=deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'])
"""
    out = _python(code, tmp_path / "ext", **{cpu_comm.ENV_KEEP: "1"})
    assert out == {"changed": False, "compatible": True}


@pytest.mark.parametrize("value,keep", [("", False), ("0", False), ("no", False), ("1", True), ("TRUE", True)])
def test_opt_out_values(monkeypatch, value, keep):
    monkeypatch.setenv(cpu_comm.ENV_KEEP, value)
    assert cpu_comm.keep_requested() is keep


def test_a_bad_opt_out_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_comm.ENV_KEEP, "maybe")
    with pytest.raises(ValueError, match="LB_DIST_DEEPSPEED_SHM_COMM='maybe'"):
        cpu_comm.keep_requested()
