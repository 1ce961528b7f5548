"""``--backend fsdp``: FSDP2 (``fully_shard``) under torchrun, with ``lb_dist.fsdp`` for device-wise
GradientMix and CLARS' micro-batch statistics, and checkpoints in torch's distributed checkpoint
format (DCP) that reshard: a run saved with K processes resumes with any other number.

CLARS' S_k: ``--clars-moments micro-batch`` (lb_dist.fsdp's statistics from FSDP's reduce-scatter) or
``training-pass`` (exact, from the training pass's own hooks; ``lb_dist.fsdp.TrainingPassSource``);
either rides in the optimizer's one all-reduce.

The model is ``fully_shard``-ed over a 1-D mesh of all processes the way FSDP2 documents it: each of
its repeated blocks first (:func:`shard_blocks`: ``--fsdp-wrap blocks``, the default; the modules of
an ``nn.Sequential``/``nn.ModuleList`` that have parameters and submodules: ResNet blocks,
Transformer layers), then the root (``--fsdp-wrap root``: the root only, one unit). Its parameters
become DTensors; the optimizer and CLARS' estimator built by the loop on the plain model are
re-pointed at them, by parameter name, before any step. Under ``accelerate launch --use_fsdp
--fsdp_version 2`` the backend is auto-detected and follows the plugin's settings
(:func:`sharding_plan`); plugin settings it cannot honour are refused, naming Accelerate's flag.
Evaluation runs on a plain copy loaded with the full weights (one all-gather per evaluation; BatchNorm buffers are rank 0's). A checkpoint is
DCP's files of the sharded model and optimizer state (``get_state_dict``) in
``checkpoints/fsdp/step-N/``, then the loop's file ``step-N.pt`` with the full model weights, then
the manifest (the commit, lb_dist.train.checkpoint)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lb_dist.moments import TrainingPassMoments
from lb_dist.train.backends import BackendConfigError, Engine, Torchrun
from lb_dist.train.checkpoint import CheckpointError, atomic_save, engine_checkpoint_dir

__all__ = ["FSDPBackend", "FSDPEngine", "ShardingPlan", "sharding_plan", "shard_blocks", "WRAP_POLICIES"]

CHECKPOINT_SUBDIR = "fsdp"
#: ``--fsdp-wrap`` values: ``blocks`` (each repeated block, then the root) and ``root`` (one unit).
WRAP_POLICIES = ("blocks", "root")


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """How :class:`FSDPBackend` calls ``fully_shard``: ``wrap`` (``blocks`` or ``root``),
    ``block_classes`` (class names of the blocks; empty: :func:`shard_blocks`' structural rule),
    ``reshard_after_forward`` (FSDP2's argument) and ``source`` (the flag or Accelerate setting the
    plan came from, for error messages)."""

    wrap: str = "blocks"
    block_classes: tuple[str, ...] = ()
    reshard_after_forward: bool = True
    source: str = "--fsdp-wrap"


def _env_flag(env, key: str, default: str) -> bool:
    return env.get(key, default).strip().lower() in ("1", "true", "yes")


def sharding_plan(args=None, environ=None) -> ShardingPlan:
    """The run's :class:`ShardingPlan`: ``--fsdp-wrap`` when given, else Accelerate's FSDP plugin
    settings when ``accelerate launch --use_fsdp`` started the job, else ``blocks``.

    Accelerate's settings read (environment of ``accelerate launch``): ``FSDP_VERSION`` (must be 2:
    this backend is FSDP2), ``FSDP_AUTO_WRAP_POLICY`` (``TRANSFORMER_BASED_WRAP`` -> blocks, of the
    classes in ``FSDP_TRANSFORMER_CLS_TO_WRAP`` when given; ``NO_WRAP`` -> root; ``SIZE_BASED_WRAP``
    refused), ``FSDP_RESHARD_AFTER_FORWARD``; refused because lb_dist's FSDP engine does not do them:
    ``FSDP_OFFLOAD_PARAMS``, ``FSDP_ACTIVATION_CHECKPOINTING``, ``ACCELERATE_MIXED_PRECISION`` other
    than ``no``. Raises :class:`BackendConfigError` naming the flag."""
    from lb_dist.train.registry import accelerate_fsdp

    env = os.environ if environ is None else environ
    flag = getattr(args, "fsdp_wrap", None) if args is not None else None
    if flag is not None and flag not in WRAP_POLICIES:
        raise BackendConfigError(f"argument --fsdp-wrap: {flag!r} is not one of {', '.join(WRAP_POLICIES)}")
    if not accelerate_fsdp(env):
        return ShardingPlan(wrap=flag or "blocks")
    version = env.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise BackendConfigError(f"accelerate launch --fsdp_version {version}: lb-dist train's FSDP engine is FSDP2 "
                                 f"(fully_shard); launch with --fsdp_version 2")
    for key, accel_flag in (("FSDP_OFFLOAD_PARAMS", "--fsdp_offload_params"),
                            ("FSDP_ACTIVATION_CHECKPOINTING", "--fsdp_activation_checkpointing")):
        if _env_flag(env, key, "false"):
            raise BackendConfigError(f"accelerate launch {accel_flag} true: not supported by lb-dist train's FSDP "
                                     f"engine; launch with {accel_flag} false")
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if precision not in ("no", ""):
        raise BackendConfigError(f"accelerate launch --mixed_precision {precision}: lb-dist train's FSDP engine "
                                 f"trains in fp32 (lb_dist.fsdp itself supports a MixedPrecisionPolicy: "
                                 f"docs/backend-fsdp.md); launch with --mixed_precision no")
    reshard = _env_flag(env, "FSDP_RESHARD_AFTER_FORWARD", "true")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "").strip().upper()
    if flag is not None:
        return ShardingPlan(wrap=flag, reshard_after_forward=reshard)
    if policy == "SIZE_BASED_WRAP":
        raise BackendConfigError("accelerate launch --fsdp_auto_wrap_policy SIZE_BASED_WRAP: lb-dist train shards "
                                 "by blocks (TRANSFORMER_BASED_WRAP) or the root only (NO_WRAP); choose one of "
                                 "those or give --fsdp-wrap")
    if policy == "NO_WRAP":
        return ShardingPlan(wrap="root", reshard_after_forward=reshard, source="FSDP_AUTO_WRAP_POLICY")
    classes = tuple(c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return ShardingPlan(wrap="blocks", block_classes=classes, reshard_after_forward=reshard,
                        source="FSDP_TRANSFORMER_CLS_TO_WRAP" if classes else "FSDP_AUTO_WRAP_POLICY")


def shard_blocks(model: torch.nn.Module, plan: ShardingPlan) -> list[str]:
    """Names of the submodules to ``fully_shard`` before the root, outermost first (none for ``root``).

    With ``plan.block_classes``: every module of one of those class names (outermost only); each
    name must occur in ``model`` (else :class:`BackendConfigError` naming ``plan.source``). Else the
    structural rule: the children of an ``nn.Sequential`` or ``nn.ModuleList`` that have parameters
    and submodules of their own (a residual block, a Transformer layer; a bare convolution or
    BatchNorm in a ``Sequential`` is not a block), outermost only."""
    if plan.wrap == "root":
        return []
    chosen: list[str] = []

    def inside(name: str) -> bool:
        return any(name.startswith(c + ".") for c in chosen)

    if plan.block_classes:
        present = {type(m).__name__ for m in model.modules()}
        missing = [c for c in plan.block_classes if c not in present]
        if missing:
            raise BackendConfigError(f"{plan.source}: no module of class {', '.join(missing)} in the model "
                                     f"({type(model).__name__}); its classes include "
                                     f"{', '.join(sorted(present)[:12])}")
        for name, module in model.named_modules():
            if name and type(module).__name__ in plan.block_classes and not inside(name):
                chosen.append(name)
        return chosen
    for name, parent in model.named_modules():
        if not isinstance(parent, (torch.nn.Sequential, torch.nn.ModuleList)):
            continue
        for child_name, child in parent.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if inside(full) or full in chosen:
                continue
            if next(child.children(), None) is not None and next(child.parameters(), None) is not None:
                chosen.append(full)
    return chosen


class FSDPEngine(Engine):
    """A ``fully_shard``-ed model: ``set_requires_gradient_sync`` for accumulation, lb_dist.fsdp's
    reduce-scatter for mixing and statistics, DCP checkpoints."""

    mix_state = None

    def __init__(self, backend, model, optimizer, plain, *, mix=None, moments=None) -> None:
        super().__init__(backend, model, optimizer, mix=mix, moments=moments)
        self.plain = plain                    # an unsharded copy for evaluation

    def accumulate(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def optimizer_step(self) -> bool:
        opt = self.optimizer
        if hasattr(opt, "last_step_skipped"):
            return super().optimizer_step()
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for p in self._trainable if p.grad is not None]
        bad = torch.zeros(1, dtype=torch.float64, device=self.backend.device)
        if grads:
            bad += (~torch.isfinite(torch.stack([g.double().sum() for g in grads]))).sum()
        self.backend.all_reduce_sum(bad)      # every rank skips together (shards differ)
        if bool(bad.item()):
            if self.mix is not None:
                self.mix.advance()
            return True
        self._step()
        return False

    def _sync_buffers(self) -> None:
        for buf in self.model.buffers():
            dist.broadcast(buf, src=0)

    def _full_state(self, cpu_offload: bool) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        self._sync_buffers()
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))

    @contextlib.contextmanager
    def evaluation(self):
        self.plain.load_state_dict(self._full_state(cpu_offload=False))
        yield self.plain

    def per_sample_second_moments(self, *args, **kwargs):  # pragma: no cover - refused in prepare
        raise BackendConfigError("--clars-moments per-sample is not available with --backend fsdp")

    def _init_optimizer_state(self) -> None:
        """Create the optimizer state before DCP loads into it (DCP's own initialization would run a
        step: a CLARS would ask its estimator, an attached mix would advance)."""
        opt = self.optimizer
        if any(opt.state.values()) or not hasattr(opt, "init_state"):
            return
        for p in self._trainable:
            p.grad = torch.zeros_like(p)
        opt.init_state()
        for p in self._trainable:
            p.grad = None

    def save_checkpoint(self, path: Path, state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = Path(path)
        root, tag = engine_checkpoint_dir(self.backend, path, CHECKPOINT_SUBDIR)
        self._sync_buffers()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(root / tag))
        full = self._full_state(cpu_offload=True)    # rank 0 only
        if self.backend.is_main:
            atomic_save({**state, "model": full, "fsdp": {"dir": f"{CHECKPOINT_SUBDIR}/{tag}",
                                                          "world_size": self.backend.world_size}}, path)
        # no barrier: the loop agrees on every rank's outcome of the save

    def restore(self, state: dict, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(path)
        info = state.get("fsdp")
        if info is None:
            other = state.get("backend", "?")
            raise CheckpointError(f"checkpoint {path} was written by the {other} backend; --backend fsdp resumes its "
                                  f"own (DCP) checkpoints; resume with --backend {other} or use a new --run-dir")
        where = path.parent / info["dir"]
        if not (where / ".metadata").is_file():
            raise CheckpointError(f"checkpoint {path}: its DCP files {where} are missing; delete {path} to resume "
                                  f"from the previous checkpoint")
        self._init_optimizer_state()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        try:
            dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(where))
            set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} ({where}) does not fit this model/optimizer: {e}") from e


class FSDPBackend(Torchrun):
    """torch.distributed (``env://``) with FSDP2; see the module docstring."""

    name = "fsdp"

    #: ``--clars-moments training-pass``: the hooks measure activations and output gradients, never the
    #: sharded weights; the per-layer sums ride in the optimizer's all-reduce (lb_dist.fsdp.TrainingPassSource)
    training_pass_moments = True
    fsdp_settings = True

    def check_args(self, args) -> str | None:
        message = super().check_args(args)
        if message:
            return message
        if self.world_size < 2:
            return ("argument --backend: fsdp needs >= 2 processes (torchrun --nproc_per_node N, N >= 2); one "
                    "process: --backend single")
        try:
            sharding_plan(args)
        except BackendConfigError as e:
            return str(e)
        if args is not None and getattr(args, "optimizer", None) == "clars" and \
                getattr(args, "clars_moments", None) == "per-sample":
            return ("argument --clars-moments: per-sample is not available with --backend fsdp (the per-sample "
                    "pass needs the unsharded model); use micro-batch")
        return None

    def prepare(self, model, optimizer, *, mix=None, moments=None, local_batch_size, accumulation_steps, args=None,
                config=None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        import lb_dist.fsdp

        message = self.check_args(args)
        if message:
            raise BackendConfigError(message)
        if any(optimizer.state.values()):
            raise BackendConfigError("the optimizer already has state; --backend fsdp re-points a fresh optimizer "
                                     "at the sharded parameters")
        names = {id(p): n for n, p in model.named_parameters()}
        plain = copy.deepcopy(model)
        plan = sharding_plan(args)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        modules = dict(model.named_modules())
        blocks = shard_blocks(model, plan)
        kinds = sorted({type(modules[b]).__name__ for b in blocks})      # before fully_shard renames the classes
        for block in blocks:
            fully_shard(modules[block], mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
        if self.is_main:
            units = (f"{len(blocks)} block(s) ({', '.join(kinds)}, from {plan.source}) and the root" if blocks
                     else f"the root only (from {plan.source})")
            print(f"[lb-dist train] --backend fsdp: fully_shard on {units}, reshard_after_forward="
                  f"{plan.reshard_after_forward}", file=sys.stderr, flush=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
        self.sharding = plan
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        if moments is not None:
            moments.params = [sharded[names[id(p)]] for p in moments.params]
            moments.param_index = {p: i for i, p in enumerate(moments.params)}
            if isinstance(moments, TrainingPassMoments):
                # each micro-batch backwards its loss / A; the step is closed inside the optimizer step
                # (lb_dist.fsdp.TrainingPassSource), not by finish_gradients
                moments.grad_scale = 1.0 / accumulation_steps
        engine = FSDPEngine(self, model, optimizer, plain, mix=mix, moments=moments)
        device_mix = mix if mix is not None and mix.granularity == "device" else None
        engine.mix_state = lb_dist.fsdp.register(model, mix=device_mix, moments=moments, optimizer=optimizer,
                                                 micro_batch_size=local_batch_size)
        return engine
