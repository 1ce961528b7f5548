"""Exact per-layer second moments S_k from per-sample gradients on a random subset of the batch.

CLARS (eq. 5, Algorithm 1 line 4) divides layer k's rate by ``sqrt(S_k)`` with

    S_k = (1/|J|) sum_{i in J} ||grad_k f_i(w)||^2

and section 4.4 computes it on a random subset J of the mini-batch (|J| = 512). This module
computes exactly that, with per-sample gradients from ``torch.func`` (``functional_call`` +
``vmap(grad)``), ``chunk_size`` samples per ``vmap`` call to bound memory.

BatchNorm. With BatchNorm in training mode a sample's gradient depends on the rest of the batch,
so "per-sample gradient" needs a definition. Here it is: *the per-sample gradient of sample i is
the gradient of sample i's loss with every BatchNorm normalizing by the statistics of the subset's
batch (training-mode batch mean and biased variance), held fixed (treated as constants)*. It is
computed in two passes: a no-grad forward of the subset in which each training-mode BatchNorm
records the batch mean / biased variance of its input and normalizes with them (so every layer
sees exactly the training-mode forward), then the ``vmap``'ed per-sample pass in which those
BatchNorms run in eval mode with the recorded statistics in place of the running buffers. The
model's own buffers are never written (the statistics are passed through ``functional_call``), so
running statistics and ``num_batches_tracked`` are unchanged; every module's train/eval mode is
restored. Other modules whose output depends on the batch are out of scope. Dropout stays active
with an independent mask per sample (``vmap(randomness="different")``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad, vmap

from lb_dist._validation import check_positive_int
from lb_dist._vendor.torch import BatchNormBase, foreach_norm
from lb_dist.distributed import all_reduce_sum_, get_rank, get_world_size
from lb_dist.moments.equations import variance_factors

__all__ = ["PerSampleMoments", "per_sample_second_moments", "local_subset_size", "DEFAULT_SUBSET_SIZE", "DEFAULT_CHUNK_SIZE"]


@dataclass
class PerSampleMoments:
    """Result of ``per_sample_second_moments(..., return_stats=True)``.

    Attributes:
        second_moments: ``{param: S_k}``, S_k = mean over the (global) subset of ||grad_k f_i||^2,
            0-dim tensors in each parameter's dtype and on its device.
        grad_sq_norms: ``{param: ||(1/|J|) sum_i grad_k f_i||^2}`` (float64, 0-dim).
        variance_factors: ``{param: M_k = S_k / ||G_k||^2}`` (float64, 0-dim; inf where the mean
            gradient is zero), the CLARS paper's gradient-variance factor (section 4.3, Fig. 3).
        num_samples: |J|, the number of samples in the subset summed over all ranks.
    """

    second_moments: dict[torch.Tensor, torch.Tensor]
    grad_sq_norms: dict[torch.Tensor, torch.Tensor]
    variance_factors: dict[torch.Tensor, torch.Tensor]
    num_samples: int


#: |J|, the global subset of CLARS' per-sample second moments (paper section 4.4: 512).
DEFAULT_SUBSET_SIZE = 512
#: Samples per ``vmap`` call of the per-sample pass (memory, not the result).
DEFAULT_CHUNK_SIZE = 64


def local_subset_size(subset_size: int, local_batch: int, world_size: int, rank: int) -> int:
    """This rank's share of a global subset: ``subset_size // world_size``, plus one for the first
    ``subset_size % world_size`` ranks, capped at the local batch size."""
    share = subset_size // world_size + (1 if rank < subset_size % world_size else 0)
    return min(share, local_batch)


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel: the per-sample pass must not run the wrapper's forward
    # (it would sync buffers and prepare a gradient reduction).
    inner = getattr(model, "module", None)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) and isinstance(inner, nn.Module):
        return inner
    return model


def _select_params(model: nn.Module, params) -> tuple[list[str], list[torch.Tensor]]:
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("model has no parameter that requires grad: pass params=... explicitly")
    else:
        by_id = {id(p): n for n, p in named}
        chosen, seen = [], set()
        for p in params:
            if not isinstance(p, torch.Tensor) or id(p) not in by_id:
                raise ValueError("params must contain only parameters of model "
                                 f"(got a {type(p).__name__} that is not one of model.parameters())")
            if id(p) in seen:
                raise ValueError(f"params lists parameter {by_id[id(p)]!r} twice")
            seen.add(id(p))
            chosen.append((by_id[id(p)], p))
        if not chosen:
            raise ValueError("params is empty")
    return [n for n, _ in chosen], [p for _, p in chosen]


def _batch_mean_var(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance, as BatchNorm computes them in training mode."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.device.type == "cpu":
        # BatchNorm's own CPU statistics kernel (4-5x faster than var_mean over dims (0, 2, 3));
        # with no running buffers it only returns (mean, biased variance). Checked on CPU only.
        try:
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
            if mean.shape == var.shape == (x.shape[1],):
                return mean, var
        except (RuntimeError, NotImplementedError, AttributeError):
            pass
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


def _batch_stats_pre_hook(store: tuple[torch.Tensor, torch.Tensor], name: str):
    """Forward pre-hook for a BatchNorm: write the batch mean / biased variance of its input into
    ``store`` (the tensors given to functional_call as its running buffers), so that the module, in
    eval mode, normalizes exactly as it would in training mode. SyncBatchNorm statistics are
    reduced over the module's process group."""
    mean_buf, var_buf = store
    calls = [0]

    def hook(module: BatchNormBase, args):
        calls[0] += 1
        if calls[0] > 1:
            raise ValueError(f"BatchNorm {name!r} is called more than once per forward; per-sample "
                             f"gradients with a shared BatchNorm module are not supported")
        x = args[0]
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // max(x.shape[1], 1)
        if isinstance(module, nn.SyncBatchNorm) and get_world_size(module.process_group) > 1:
            xd = x.detach().double()
            packed = torch.cat([xd.new_tensor([float(count)]), xd.sum(dims), xd.square().sum(dims)])
            all_reduce_sum_(packed, module.process_group)
            c = x.shape[1]
            total = packed[0]
            mean = packed[1:1 + c] / total
            var = (packed[1 + c:] / total - mean.square()).clamp_min(0.0)
            count = int(total.item())
        else:
            mean, var = _batch_mean_var(x.detach(), dims)
        if count <= 1:
            raise ValueError(f"BatchNorm {name!r} sees {count} value per channel in the subset: its "
                             f"batch statistics are undefined; increase subset_size (or the batch)")
        mean_buf.copy_(mean)
        var_buf.copy_(var)

    return hook


def per_sample_second_moments(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    subset_size: int = DEFAULT_SUBSET_SIZE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    params: Iterable[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    group: "dist.ProcessGroup | None" = None,
    return_stats: bool = False,
) -> dict[torch.Tensor, torch.Tensor] | PerSampleMoments:
    """Per-layer second moments ``S_k = mean_{i in J} ||grad_k f_i(w)||^2`` (CLARS eq. 5, section 4.4).

    Args:
        model: the network; not modified (parameters, ``.grad``, buffers and train/eval modes are
            as before the call). A ``DistributedDataParallel`` wrapper is unwrapped.
        loss_fn: ``loss_fn(outputs, targets)``, a mean-reduction loss such as
            ``nn.functional.cross_entropy``; per sample it is applied to a batch of one, so
            ``f_i = loss_fn(model(x_i[None]), y_i[None])``.
        inputs, targets: this rank's batch (first dimension = samples).
        subset_size: |J|, the GLOBAL subset size (paper: 512). In a distributed run each rank takes
            ``subset_size // world_size`` samples (+1 on the first ``subset_size % world_size``
            ranks), or its whole local batch if that is smaller.
        chunk_size: samples per ``vmap`` call; memory grows with ``chunk_size x`` parameter count.
        params: the parameters to compute S_k for (default: every parameter that requires grad).
        generator: random source of the subset, which is ``torch.randperm(local_batch,
            generator=generator)[:local_subset]``; with the whole local batch no draw is made.
        group: process group for the reduction (default: the world, if initialized): a torch
            ProcessGroup, or a Horovod ``ProcessSet``; in a Horovod job without torch.distributed
            (``hvd.init()`` only) the default is Horovod's world (see ``lb_dist.distributed``).
        return_stats: return a :class:`PerSampleMoments` instead of the plain dict.

    Returns:
        ``{param: S_k}`` (0-dim tensors, param dtype and device), in ``params`` order.

    Distributed: every rank must call this (it is a collective). The per-layer sums of squared
    norms, the sample count and (with ``return_stats``) the per-layer sums of the per-sample
    gradients are packed into one float64 tensor and reduced with a single ``all_reduce``, then
    divided by the global count. BatchNorm statistics are those of each rank's local subset (what
    DDP training with plain BatchNorm normalizes by); SyncBatchNorm statistics are those of the
    global subset (one extra small all-reduce per SyncBatchNorm layer).
    """
    _check_arguments(loss_fn, inputs, targets, subset_size, chunk_size)
    model = _unwrap(model)
    names, plist = _select_params(model, params)
    world, rank = get_world_size(group), get_rank(group)
    if subset_size < world:
        raise ValueError(f"subset_size ({subset_size}) must be at least the number of ranks ({world})")
    n_local = local_subset_size(subset_size, inputs.shape[0], world, rank)
    xs, ys = _draw_subset(inputs, targets, n_local, generator)
    try:
        with _batch_statistics_of(model, xs, plist[0]) as bn_stats:
            sq_sum, grad_sum = _per_sample_sums(model, loss_fn, names, plist, bn_stats, xs, ys, chunk_size,
                                                with_grad_sum=return_stats)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        # torch's shape/dtype errors name nothing of this call: say which inputs they came from
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"per_sample_second_moments: model(inputs) and loss_fn(outputs, targets) failed on this "
                         f"rank's batch: inputs of shape {list(inputs.shape)} ({inputs.dtype}), targets of shape "
                         f"{list(targets.shape)} ({targets.dtype}); check that they fit the model and loss_fn (e.g. "
                         f"class-index targets are integers): {type(e).__name__}: {detail}") from e
    return _reduce(sq_sum, grad_sum, n_local, plist, group)


def _check_arguments(loss_fn, inputs, targets, subset_size, chunk_size) -> None:
    """Refuse bad arguments of :func:`per_sample_second_moments`, naming them, before any work."""
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
        raise ValueError("inputs must be a tensor whose first dimension indexes the samples")
    if not isinstance(targets, torch.Tensor) or targets.dim() < 1:
        raise ValueError("targets must be a tensor whose first dimension indexes the samples")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets must hold the same number of samples, "
                         f"got {inputs.shape[0]} and {targets.shape[0]}")
    if inputs.shape[0] == 0:
        raise ValueError("inputs is an empty batch")
    check_positive_int("subset_size", subset_size)
    check_positive_int("chunk_size", chunk_size)


def _draw_subset(inputs: torch.Tensor, targets: torch.Tensor, n_local: int, generator):
    """This rank's random subset J_rank of ``n_local`` samples (the whole batch, undrawn, if it is small)."""
    local_batch = inputs.shape[0]
    if n_local >= local_batch:
        return inputs, targets
    gen_device = generator.device if generator is not None else "cpu"
    idx = torch.randperm(local_batch, generator=generator, device=gen_device)[:n_local]
    return inputs[idx.to(inputs.device)], targets[idx.to(targets.device)]


@contextlib.contextmanager
def _batch_statistics_of(model: nn.Module, xs: torch.Tensor, fallback: torch.Tensor):
    """Training-mode BatchNorms normalize by the batch's statistics: record those of the subset ``xs``
    (one forward without gradients) and yield them as ``{buffer name: tensor}`` running statistics
    for BatchNorms switched to eval mode for the block (modes restored after it). An eval-mode
    BatchNorm without running buffers (track_running_stats=False) also normalizes by the batch
    statistics, so it is handled the same way. ``fallback``: a parameter giving device and dtype for a
    BatchNorm without affine weight."""
    bns = [(n, m, m.training) for n, m in model.named_modules() if isinstance(m, BatchNormBase)
           and (m.training or (m.running_mean is None and m.running_var is None))]
    bn_stats: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for n, m, _ in bns:
            ref = m.weight if m.weight is not None else fallback
            mean_buf = torch.zeros(m.num_features, device=ref.device, dtype=ref.dtype)
            var_buf = torch.ones(m.num_features, device=ref.device, dtype=ref.dtype)
            prefix = f"{n}." if n else ""
            bn_stats[prefix + "running_mean"] = mean_buf
            bn_stats[prefix + "running_var"] = var_buf
            handles.append(m.register_forward_pre_hook(_batch_stats_pre_hook((mean_buf, var_buf), n or "<root>")))
            m.train(False)
        if bns:
            with torch.no_grad():
                functional_call(model, bn_stats, (xs,))
        for h in handles:
            h.remove()
        handles = []
        yield bn_stats
    finally:
        for h in handles:
            h.remove()
        for _, m, mode in bns:
            m.train(mode)


def _per_sample_sums(model, loss_fn, names, plist, bn_stats, xs, ys, chunk_size: int, with_grad_sum: bool):
    """``sum_{i in J_rank} ||grad_k f_i||^2`` per layer (float64) and, ``with_grad_sum``, the per-layer
    sums of the per-sample gradients, ``chunk_size`` samples per ``vmap`` call."""
    device = plist[0].device
    sel_ids = {id(p) for p in plist}
    others = {n: p.detach() for n, p in model.named_parameters() if id(p) not in sel_ids}

    def sample_loss(p_sel, x, y):
        out = functional_call(model, (p_sel, others, bn_stats), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    sq_sum = torch.zeros(len(plist), dtype=torch.float64, device=device)
    grad_sum = [torch.zeros(p.shape, dtype=torch.float64, device=device) for p in plist] if with_grad_sum else None
    detached = {n: p.detach() for n, p in zip(names, plist)}
    for start in range(0, xs.shape[0], chunk_size):
        g = per_sample_grads(detached, xs[start:start + chunk_size], ys[start:start + chunk_size])
        gl = [g[n] for n in names]
        # the norm of the stacked [chunk, *shape] tensor is sqrt(sum_i ||g_i||^2)
        norms = foreach_norm(gl)
        sq_sum += torch.stack([t.to(device=device, dtype=torch.float64) for t in norms]).square()
        if grad_sum is not None:
            for acc, gi in zip(grad_sum, gl):
                acc += gi.sum(0).to(device=device, dtype=torch.float64)
    return sq_sum, grad_sum


def _reduce(sq_sum: torch.Tensor, grad_sum, n_local: int, plist, group):
    """One all-reduce of ``[per-layer sq sums | count | flattened per-layer grad sums]``, then the
    global means: ``{param: S_k}``, or a :class:`PerSampleMoments` when ``grad_sum`` is given."""
    parts = [sq_sum, sq_sum.new_tensor([float(n_local)])]
    if grad_sum is not None:
        parts += [g.reshape(-1) for g in grad_sum]
    packed = torch.cat(parts)
    all_reduce_sum_(packed, group)
    n_layers = len(plist)
    count = packed[n_layers]
    s = packed[:n_layers] / count
    moments = {p: s[i].to(device=p.device, dtype=p.dtype) for i, p in enumerate(plist)}
    if grad_sum is None:
        return moments

    flat = packed[n_layers + 1:]
    offsets = torch.tensor([0] + [p.numel() for p in plist], device=flat.device).cumsum(0).tolist()
    g_sq = torch.stack([(flat[offsets[i]:offsets[i + 1]] / count).square().sum() for i in range(n_layers)])
    m = variance_factors(s, g_sq)
    return PerSampleMoments(
        second_moments=moments,
        grad_sq_norms={p: g_sq[i] for i, p in enumerate(plist)},
        variance_factors={p: m[i] for i, p in enumerate(plist)},
        num_samples=int(count.item()),
    )
