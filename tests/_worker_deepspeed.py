"""DeepSpeed worker of tests/test_deepspeed.py: one launched job runs many configurations.

    deepspeed --num_gpus N tests/_worker_deepspeed.py OUT_DIR [--only c00,c01]
    mpirun -np 2 python tests/_worker_deepspeed.py OUT_DIR --deepspeed_mpi --port P [--only ...]

For every case of tests/_ds_common.cases(N) it builds a real DeepSpeed engine (gloo, CPU) with
lb_dist.deepspeed.initialize (or, for the "naive" negative controls, DeepSpeed's own initialize
with a plain lb_dist optimizer and zero_allow_untested_optimizer), trains STEPS optimizer steps on
the deterministic data of _ds_common.batch, and rank 0 writes the final parameters (gathered under
ZeRO-3) to OUT_DIR/results_N.pt. The test recomputes every case in one process without DeepSpeed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deepspeed  # noqa: E402
import _ds_common as C  # noqa: E402
import lb_dist.deepspeed as lbds  # noqa: E402
import lb_dist.optim._base as lb_base  # noqa: E402
from lb_dist.optim import LAMB, LARS, param_groups  # noqa: E402
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)


#: lb_dist's all-reduces inside the ZeRO-aware optimizers (the optimizers' one reduction,
#: lb_dist.optim._base.sum_over), counted per case
ALL_REDUCES = [0]
_sum_over = lb_base.sum_over


def _counted_sum_over(tensor, group):
    ALL_REDUCES[0] += 1
    return _sum_over(tensor, group)


lb_base.sum_over = _counted_sum_over


def final_params(engine) -> dict[str, torch.Tensor]:
    model = engine.module
    params = list(model.parameters())
    if engine.zero_optimization_partition_weights():
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def build(case: dict):
    cfg = C.ds_config(case)
    if case.get("zero_init"):
        # Hugging Face's ZeRO-3 order: the model is built inside zero.Init with the whole config
        # (lb_dist's sections included), so its parameters are partitioned before lb_dist sees them
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = C.make_model(case)
        assert all(p.shape == (0,) for p in model.parameters()), "zero.Init did not partition the model"
    else:
        model = C.make_model(case)
    if case.get("naive"):
        kwargs = dict(C.OPT_PARAMS[case["opt"]])
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        cls = {"LARS": LARS, "LAMB": LAMB}[case["opt"]]
        opt = cls(param_groups(model, kwargs["weight_decay"]), **kwargs)
        cfg.pop("optimizer")
        cfg["zero_allow_untested_optimizer"] = True
        engine, *_ = lbds._deepspeed_initialize()(model=model, optimizer=opt, config=cfg)
        return engine, None
    if case.get("client"):
        kwargs = dict(C.OPT_PARAMS[case["opt"]])
        opt = {"LARS": LARS, "LAMB": LAMB}[case["opt"]](param_groups(model, kwargs["weight_decay"]), **kwargs)
        cfg.pop("optimizer")
        engine, *_ = lbds.initialize(model=model, optimizer=opt, config=cfg)
        assert engine.basic_optimizer is opt and type(opt).__name__ == f"ZeRO{case['opt']}"
        return engine, lbds.get_runtime(engine)
    kwargs = {"model_parameters": C.groups_of(model, case)} if case.get("groups") else {}
    engine, *_ = lbds.initialize(model=model, config=cfg, **kwargs)
    return engine, lbds.get_runtime(engine)


def train(engine, runtime, case: dict, rank: int, start: int = 0, stop: int | None = None) -> None:
    acc = case.get("accumulation", 1)
    stop = case.get("steps", C.STEPS) if stop is None else stop
    world = torch.distributed.get_world_size()
    for step in range(start, stop):
        handle = None
        if case.get("nan_at") == step and rank == world - 1:
            param = dict(engine.module.named_parameters())[C.NAN_PARAM]

            def poison(grad):
                grad = grad.clone()
                grad.view(-1)[0] = float("nan")
                return grad
            handle = param.register_hook(poison)
        for micro in range(acc):
            x, y = C.batch(rank, step, micro)
            if case.get("bf16"):
                x = x.bfloat16()
            if case.get("source") == "per_sample" and micro == 0:
                runtime.update_second_moments(F.cross_entropy, x, y)
            out = engine(x)
            if case.get("mix") == "sample":
                loss = runtime.weighted_loss(F.cross_entropy(out.float(), y, reduction="none"))
            else:
                loss = F.cross_entropy(out.float(), y)
            engine.backward(loss)
            engine.step()
            if handle is not None:
                handle.remove()
                handle = None


def run_case(case: dict, rank: int, out_dir: str) -> dict:
    engine, runtime = build(case)
    if case.get("resume"):
        half = case["resume"]
        train(engine, runtime, case, rank, stop=half)
        ckpt = os.path.join(out_dir, f"ckpt_{case['name']}")
        engine.save_checkpoint(ckpt, tag=f"step{half}")
        if hasattr(engine, "destroy"):
            engine.destroy()
        engine, runtime = build(case)                  # a fresh engine, as after a restart
        path, _ = engine.load_checkpoint(ckpt, tag=f"step{half}")
        assert path is not None, "DeepSpeed found no checkpoint"
        train(engine, runtime, case, rank, start=half)
    else:
        ALL_REDUCES[0] = 0
        train(engine, runtime, case, rank)
    result = {"params": final_params(engine), "lb_all_reduces": ALL_REDUCES[0], "global_steps": engine.global_steps}
    if engine.zero_optimization_partition_weights():
        result["sub_groups"] = len(engine.optimizer.fp16_groups)
    skipped = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(skipped, (getattr(engine.basic_optimizer, "skipped_steps", None),
                                                  engine.skipped_steps))
    result["skipped"] = skipped          # per process: (lb_dist optimizer's, DeepSpeed engine's)
    if runtime is not None and runtime.mix is not None:
        result["mix_step"] = runtime.mix.step
    if hasattr(engine, "destroy"):
        engine.destroy()
    return result


def check_registration(rank: int) -> dict:
    """deepspeed.initialize after lb_dist.deepspeed.register(): lb_dist configs get lb_dist's
    engine, other configs DeepSpeed's untouched; register is idempotent, unregister restores."""
    original = deepspeed.initialize
    out = {"was_registered": lbds.is_registered()}
    lbds.register()
    lbds.register()
    out["patched"] = deepspeed.initialize is not original
    case = {"stage": 2, "opt": "CLARS", "mix": "device", "world": torch.distributed.get_world_size()}
    engine, optimizer, _, _ = deepspeed.initialize(model=C.make_model(), config=C.ds_config(case))
    train(engine, lbds.get_runtime(engine), {**case, "steps": 2}, rank)
    out["lb_engine"] = type(engine).__name__
    out["lb_inner"] = type(engine.basic_optimizer).__name__
    out["lb_mix_step"] = lbds.get_runtime(engine).mix.step
    # issue 16: a second engine.backward in one micro-step (gradient_accumulation_steps = 1) is refused
    x, y = C.batch(rank, 2, 0)
    for _ in range(2):
        engine.backward(F.cross_entropy(engine(x).float(), y))
    try:
        engine.step()
        out["extra_backward"] = None
    except RuntimeError as e:
        out["extra_backward"] = str(e)
    plain_model = C.make_model()
    plain_cfg = {"train_micro_batch_size_per_gpu": C.MICRO, "gradient_clipping": 0.0,
                 "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9}
    sgd = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    plain_cfg["zero_allow_untested_optimizer"] = True
    engine2, *_ = deepspeed.initialize(model=plain_model, optimizer=sgd, config=plain_cfg)
    out["plain_engine"] = type(engine2).__name__
    out["plain_has_runtime"] = hasattr(engine2, "lb_dist")
    out["plain_inner"] = type(engine2.basic_optimizer).__name__
    lbds.unregister()
    lbds.unregister()
    out["restored"] = deepspeed.initialize is original
    return out


def check_configs(paths: list[str], rank: int) -> dict:
    """Every file of deepspeed_configs/: parsed and initialized on the tiny model (batch sizes
    shrunk to it), then one optimizer step."""
    import json
    out = {}
    for path in paths:
        name = os.path.basename(path)
        try:
            with open(path) as f:
                cfg = json.load(f)
            cfg.pop("train_batch_size", None)
            cfg["train_micro_batch_size_per_gpu"] = C.MICRO
            model = C.make_model()
            kwargs = {}
            if cfg["optimizer"]["type"] == "SGD":    # weight decay on weights only (Table 3)
                kwargs["model_parameters"] = param_groups(model, cfg["optimizer"]["params"]["weight_decay"])
            engine, optimizer, _, scheduler = lbds.initialize(model=model, config=cfg, **kwargs)
            runtime = lbds.get_runtime(engine)
            bf16 = (cfg.get("bf16") or {}).get("enabled", False)
            lr0 = [g["lr"] for g in engine.optimizer.param_groups]
            for micro in range(engine.gradient_accumulation_steps()):
                x, y = C.batch(rank, 0, micro)
                if bf16:
                    x = x.bfloat16()
                if runtime.per_sample is not None and micro == 0:
                    runtime.update_second_moments(F.cross_entropy, x, y)
                engine.backward(F.cross_entropy(engine(x).float(), y))
                engine.step()
            out[name] = {"ok": True, "optimizer": type(engine.basic_optimizer).__name__,
                         "scheduler": type(scheduler).__name__, "lr0": lr0,
                         "lr1": [g["lr"] for g in engine.optimizer.param_groups],
                         "mix_step": None if runtime.mix is None else runtime.mix.step,
                         "global_steps": engine.global_steps,
                         "finite": all(bool(torch.isfinite(p).all()) for p in final_params(engine).values())}
            if hasattr(engine, "destroy"):
                engine.destroy()
        except Exception:
            out[name] = {"ok": False, "error": traceback.format_exc()}
    return out


def check_foreign_checkpoint(path: str, rank: int, template: dict = C.FOREIGN_CHECKPOINT_CASE) -> dict:
    """Resume a checkpoint written by another number of processes: must be refused clearly."""
    case = {**template, "world": torch.distributed.get_world_size(), "name": "foreign"}
    engine, runtime = build(case)
    try:
        engine.load_checkpoint(path, tag=f"step{case['resume']}")
    except Exception as exc:
        return {"refused": True, "type": type(exc).__name__, "message": str(exc)}
    return {"refused": False}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--only", default="")
    parser.add_argument("--deepspeed_mpi", action="store_true")
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--checks", action="store_true", help="registration and deepspeed_configs checks")
    parser.add_argument("--configs", default="", help="comma-separated deepspeed_configs/*.json")
    parser.add_argument("--foreign", default="", help="a checkpoint directory of another world size")
    parser.add_argument("--foreign0", default="", help="the same, of the stage-0 case")
    args = parser.parse_args()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    lbds.skip_shm_comm_op()     # as lb_dist.deepspeed.initialize does, before DeepSpeed's comm set-up
    deepspeed.init_distributed(dist_backend="gloo", distributed_port=args.port,
                               auto_mpi_discovery=args.deepspeed_mpi, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    import gc
    gc.freeze()   # DeepSpeed's ZeRO-3 set-up calls gc.collect(); keep it from rescanning the imports
    only = set(filter(None, args.only.split(",")))
    results, errors = {}, {}
    start = time.perf_counter()
    for case in C.cases(world):
        if only and case["name"] not in only or args.only == "none":
            continue
        try:
            t0 = time.perf_counter()
            results[case["name"]] = {"case": case, **run_case(case, rank, args.out_dir)}
            results[case["name"]]["seconds"] = time.perf_counter() - t0
        except Exception:                                    # reported by the test, per case
            errors[case["name"]] = traceback.format_exc()
            print(f"rank {rank} case {case}:\n{errors[case['name']]}", flush=True)
            break
    checks = {}
    if args.checks and not errors:
        checks["registration"] = check_registration(rank)
    if args.configs and not errors:
        checks["configs"] = check_configs(args.configs.split(","), rank)
    if args.foreign and not errors:
        checks["foreign"] = check_foreign_checkpoint(args.foreign, rank)
    if args.foreign0 and not errors:
        checks["foreign_stage0"] = check_foreign_checkpoint(args.foreign0, rank, C.FOREIGN_CHECKPOINT_CASE_STAGE0)
    took = time.perf_counter() - start
    if rank == 0:
        torch.save({"results": results, "errors": errors, "world": world, "seconds": took,
                    "checks": checks, "launcher": "mpirun" if args.deepspeed_mpi else "deepspeed",
                    "shm_comm_op_loaded": deepspeed.comm.comm.cdb.shm_comm_op is not None},
                   os.path.join(args.out_dir, f"results_{world}.pt"))
    print(f"rank {rank}/{world}: {len(results)} cases in {took:.1f} s", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if args.deepspeed_mpi:
        from mpi4py import MPI
        MPI.Finalize()                  # mpirun reports a rank that exits without it as failed
    leave()


if __name__ == "__main__":
    main()
