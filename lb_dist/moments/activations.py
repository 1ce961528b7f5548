"""Exact per-layer second moments S_k from the training pass itself (no second forward/backward).

The gradient of a weight is a sum over samples of products of two quantities the ordinary
training pass already computes: the layer's input activations and the gradient at its output.
For an ``nn.Linear`` on inputs ``a_{i,t}`` (sample i, position t) with output gradients ``g_{i,t}``,
sample i's part of the weight gradient is ``C_i = sum_t g_{i,t} a_{i,t}^T``, and its squared norm
is either formed from the materialized ``C_i`` (cost ``O(T d_out d_in)`` per sample) or, without
materializing it, by the "ghost norm" identity

    ||sum_t g_t a_t^T||_F^2 = sum_{s,t} (a_s . a_t) (g_s . g_t)        (cost O(T^2 (d_in + d_out)))

whichever is cheaper for the layer's shapes. ``nn.Conv1d`` / ``nn.Conv2d`` are the same with the
unfolded input patches as ``a`` (one block per group), ``nn.Embedding`` the same with one-hot
inputs (rows summed by index; ``padding_idx`` gets no gradient). A parameter used by several
modules or calls (tied embeddings / output projection) concatenates its contributions along t.

Definition. The backward'ed loss of one backward pass is ``grad_scale * (1/b) sum_i f_i`` over
its b samples (a mean-reduction loss: ``f_i`` is sample i's loss; ``grad_scale`` is e.g.
``1/accumulation_steps``). The per-sample gradient is

    grad_k f_i := (b / grad_scale) * C_{i,k}

where ``C_{i,k}`` is sample i's part of the weight gradient of the backward'ed loss. For a loss
that is a mean of per-sample losses and a network without cross-sample coupling this is the
gradient of sample i's own loss; for a token-level loss normalized by the batch's token count (a
padding mask) it is the sequence's share of the batch loss scaled by b (so ``f_i`` is per
sequence); with training-mode BatchNorm it includes the gradient through the batch statistics
(docs/moments.md, "BatchNorm"). By construction the per-sample gradients average exactly to the
gradient the optimizer uses, ``(1/N) sum_i grad_k f_i = G_k``, so ``M_k = S_k / ||G_k||^2 >= 1``
on the whole batch. See docs/moments.md, section 3.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from lb_dist._validation import check_positive, check_positive_int
from lb_dist._vendor.torch import conv_padding, view_base
from lb_dist.distributed import all_reduce_sum_, is_distributed
from lb_dist.moments.microbatch import MomentsUnavailableError, PerLayerViews

__all__ = ["TrainingPassMoments", "SUPPORTED_MODULES", "ghost_cost", "materialized_cost"]

#: Module types whose parameters :class:`TrainingPassMoments` measures (exact types' forwards:
#: a subclass that overrides ``forward`` is refused, since its output need not be the plain map).
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)

#: Largest intermediate (elements) one chunk of samples may create when norms are computed.
CHUNK_ELEMENTS = 1 << 24


def ghost_cost(tokens: int, p: int, q: int, index: bool = False) -> int:
    """Multiply-adds per sample of the ghost norm: two T x T Gram matrices over the p- and
    q-dimensional factors (an index factor's Gram matrix is a comparison, cost ~T^2)."""
    return tokens * tokens * ((1 if index else p) + q)


def materialized_cost(tokens: int, p: int, q: int, index: bool = False) -> int:
    """Multiply-adds per sample of the materialized per-sample gradient ``sum_t l_t r_t^T`` plus its norm."""
    return tokens * (1 if index else p) * q + p * q


class _Index:
    """A one-hot factor given by indices (an embedding's input): ``L[i, t] = onehot(idx[i, t])``
    of size ``size``, zeroed where ``mask`` is False (``padding_idx``)."""

    __slots__ = ("idx", "mask", "size")

    def __init__(self, idx: torch.Tensor, mask: torch.Tensor | None, size: int) -> None:
        self.idx, self.mask, self.size = idx, mask, size


def _forward_overridden(module: nn.Module) -> bool:
    for base in SUPPORTED_MODULES:
        if isinstance(module, base):
            return type(module).forward is not base.forward
    return True


def _conv_padded(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The input as the convolution sees it after padding (so that unfold needs no padding)."""
    if module.padding_mode != "zeros":
        return F.pad(a, conv_padding(module), mode=module.padding_mode)
    nd = a.dim() - 2
    pads: list[int] = []
    for i in reversed(range(nd)):            # F.pad takes the last dimension first
        if isinstance(module.padding, str):
            if module.padding == "valid":
                left = right = 0
            else:                                # "same": the extra element goes to the right
                total = module.dilation[i] * (module.kernel_size[i] - 1)
                left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[i]
        pads += [left, right]
    return F.pad(a, pads) if any(pads) else a


def _blocks(module: nn.Module, a: torch.Tensor, g: torch.Tensor):
    """Factors of the weight gradient of rows ``a``/``g``: ``(L, R)`` with ``L`` of shape
    ``(n, G, T, p)`` (or an :class:`_Index`) and ``R`` of shape ``(n, G, T, q)``: sample i's
    weight gradient (viewed as G blocks of p x q) is ``sum_t L[i, j, t] R[i, j, t]^T``."""
    n = a.shape[0]
    if isinstance(module, nn.Embedding):
        idx = a.reshape(n, 1, -1)
        mask = None if module.padding_idx is None else idx != module.padding_idx
        return _Index(idx, mask, module.num_embeddings), g.reshape(n, 1, idx.shape[-1], -1)
    if isinstance(module, nn.Linear):
        return g.reshape(n, 1, -1, g.shape[-1]), a.reshape(n, 1, -1, a.shape[-1])
    # Conv1d / Conv2d: unfold the padded input into patches (a Conv1d as a Conv2d of height 1)
    x = _conv_padded(module, a)
    ks, st, dl = module.kernel_size, module.stride, module.dilation
    if x.dim() == 3:
        x, ks, st, dl = x.unsqueeze(2), (1,) + ks, (1,) + st, (1,) + dl
    u = F.unfold(x, kernel_size=ks, dilation=dl, stride=st)           # (n, C_in * prod(ks), T)
    groups = module.groups
    gg = g.reshape(n, groups, g.shape[1] // groups, -1)               # (n, G, C_out/G, T)
    if u.shape[-1] != gg.shape[-1]:
        raise RuntimeError(f"internal: unfolded {u.shape[-1]} positions, output has {gg.shape[-1]}")
    u = u.reshape(n, groups, -1, u.shape[-1])                         # (n, G, C_in/G * prod(ks), T)
    return gg.transpose(2, 3), u.transpose(2, 3)


def _row_sq(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row of a 2-d tensor, as float64 (the norm in the tensor's dtype: no
    float64 copy of the rows)."""
    return torch.linalg.vector_norm(x, dim=1).double().square()


def _sq_conv(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norms of a convolution's weight gradient, materialized by ONE weight-
    gradient convolution in which the samples are extra groups (input ``(1, n C_in, ...)``, output
    gradient ``(1, n C_out, ...)``, ``n * groups`` groups): the weight gradient of that convolution
    is the stack of the n per-sample weight gradients. Same FLOPs as the layer's own weight
    gradient; uses the backend's convolution kernels (``F.unfold`` is an order of magnitude slower
    on CPU)."""
    n = a.shape[0]
    numeric = not isinstance(module.padding, str) and module.padding_mode == "zeros"
    x = a if numeric else _conv_padded(module, a)
    padding = list(module.padding) if numeric else [0] * (a.dim() - 2)
    weight = g.new_empty(1).expand(n * module.out_channels, *module.weight.shape[1:])  # only its shape is read
    _, gw, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, n * g.shape[1], *g.shape[2:]), x.reshape(1, n * x.shape[1], *x.shape[2:]), weight,
        None, list(module.stride), padding, list(module.dilation), False, [0] * (a.dim() - 2),
        n * module.groups, [False, True, False])
    return _row_sq(gw.reshape(n, -1))


#: Chunk sizes (samples per grouped weight-gradient convolution) tried by :func:`_sq_conv_tuned`.
CONV_CHUNK_CANDIDATES = (4, 8, 16, 32, 64, 128)

#: Measured fastest chunk size per convolution shape (see :func:`_sq_conv_tuned`).
_CONV_CHUNKS: dict[tuple, int] = {}


def _sq_conv_chunked(module: nn.Module, a: torch.Tensor, g: torch.Tensor, chunk: int) -> torch.Tensor:
    n = a.shape[0]
    if chunk >= n:
        return _sq_conv(module, a, g)
    return torch.cat([_sq_conv(module, a[s:s + chunk], g[s:s + chunk]) for s in range(0, n, chunk)])


def _sq_conv_tuned(module: nn.Module, a: torch.Tensor, g: torch.Tensor, limit: int) -> torch.Tensor:
    """:func:`_sq_conv` in chunks of samples, the chunk size picked by measurement. The speed of the
    backend's grouped convolution depends on the channel count of a call in no simple way (measured,
    1 CPU thread, 16 channels of 32 x 32: 16 ms per 256 samples in chunks of 32, 31 ms in chunks of 16
    or 64), and differently with more threads, so the first call for a layer shape on a CPU times the
    candidate chunk sizes (:data:`CONV_CHUNK_CANDIDATES`, at most ``limit``: memory) on its own data
    (:func:`_fastest`) and keeps the fastest for that shape and thread count. Other devices use one chunk of
    at most ``limit`` samples (no timing without synchronization)."""
    n = a.shape[0]
    if a.device.type != "cpu":
        return _sq_conv_chunked(module, a, g, limit)
    key = (tuple(module.weight.shape), module.stride, module.padding, module.dilation, module.groups,
           module.padding_mode, tuple(a.shape), a.dtype, torch.get_num_threads())
    chunk = _CONV_CHUNKS.get(key)
    if chunk is not None:
        return _sq_conv_chunked(module, a, g, chunk)
    chunks = sorted({min(c, n, limit) for c in CONV_CHUNK_CANDIDATES})
    best, out = _fastest([lambda c=c: _sq_conv_chunked(module, a, g, c) for c in chunks])
    _CONV_CHUNKS[key] = chunks[best]
    return out


def _fastest(candidates) -> tuple[int, torch.Tensor]:
    """Index of the fastest of ``candidates`` (functions computing the same result) and a result:
    each runs three times, in rotation, and its minimum time counts. With one thread the time is
    the process's CPU time, which other jobs on a busy machine barely disturb; with more threads it
    is wall time (CPU time would add up the threads' work, not measure the latency)."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    best, out = None, None
    for _ in range(3):
        for i, fn in enumerate(candidates):
            t0 = clock()
            out = fn()
            dt = clock() - t0
            if best is None or dt < best[0]:
                best = (dt, i)
    return best[1], out


def _factor_shape(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[int, int, int, int, bool]:
    """``(groups, T, p, q, index)`` of :func:`_blocks`' factors for one sample, without forming them."""
    n = max(a.shape[0], 1)
    if isinstance(module, nn.Embedding):
        return 1, a.numel() // n, module.num_embeddings, module.embedding_dim, True
    if isinstance(module, nn.Linear):
        return 1, a.numel() // (n * module.in_features), module.out_features, module.in_features, False
    w = module.weight
    return module.groups, g[0, 0].numel(), w.shape[0] // module.groups, w[0].numel(), False


def _bias_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Per-sample bias gradient ``(n, out)``: the output gradient summed over positions."""
    n = g.shape[0]
    if isinstance(module, nn.Linear):
        return g.reshape(n, -1, g.shape[-1]).sum(1)
    return g.reshape(n, g.shape[1], -1).sum(2)


def _gram(x, y) -> torch.Tensor:
    """``(n, G, T_x, T_y)`` inner products between the rows of two factors."""
    if isinstance(x, _Index) and isinstance(y, _Index):
        out = (x.idx.unsqueeze(-1) == y.idx.unsqueeze(-2))
        if x.mask is not None:
            out = out & x.mask.unsqueeze(-1)
        if y.mask is not None:
            out = out & y.mask.unsqueeze(-2)
        return out
    if isinstance(x, _Index):
        return _gram(y, x).transpose(-1, -2)
    if isinstance(y, _Index):
        # x[i, j, s] . onehot(idx[i, j, t]) = x[i, j, s, idx[i, j, t]]
        n, groups, ts, _ = x.shape
        out = torch.gather(x, 3, y.idx.unsqueeze(2).expand(n, groups, ts, y.idx.shape[-1]))
        return out if y.mask is None else out * y.mask.unsqueeze(2)
    return torch.matmul(x, y.transpose(-1, -2))


#: Per-sample work (multiply-adds ``T * T * p``) of a dense factor's Gram matrix from which, on CPU,
#: it is formed sample by sample over the rows up to each sample's last nonzero row (see :func:`_self_gram`).
TRIM_MIN_WORK = 1 << 21

#: ... when the trimmed work is at most this fraction of the full one.
TRIM_MAX_FRACTION = 0.75


def _self_gram(x: torch.Tensor) -> torch.Tensor:
    """``x x^T`` per sample and group, ``(n, G, T, T)``, for a dense factor ``x`` of shape ``(n, G, T, p)``.

    Positions after the end of a right-padded sequence get an exactly zero output gradient (their
    loss is masked and no other position attends to them), so their rows of the output-gradient
    factor are zero and so are their rows and columns of its Gram matrix. For a wide factor (the
    output projection's gradient over the vocabulary, ``T * T * p >= TRIM_MIN_WORK``) on CPU, the
    Gram matrix of each sample is formed from its rows up to its last row of nonzero norm only,
    when that saves at least a quarter of the work (``TRIM_MAX_FRACTION``); the rest stays zero. A
    row whose squared norm underflows to 0 while being nonzero is below the result's resolution
    unless the whole sample is that small: a sample whose largest row norm is below
    ``1e10 * sqrt(finfo.tiny)`` (float32: 1.1e-9) keeps all its rows."""
    n, groups, t, p = x.shape
    if x.device.type != "cpu" or n == 0 or t * t * p < TRIM_MIN_WORK:
        return _matmul_gram(x)
    norms = torch.linalg.vector_norm(x, dim=-1).amax(1)                         # (n, T) over groups
    alive = (norms > 0) | (norms.amax(-1, keepdim=True) < 1e10 * math.sqrt(torch.finfo(x.dtype).tiny))
    lengths = (alive * torch.arange(1, t + 1, device=x.device)).amax(-1).tolist()
    if sum(l * l for l in lengths) > TRIM_MAX_FRACTION * n * t * t:
        return _matmul_gram(x)
    out = x.new_zeros(n, groups, t, t)
    for i, l in enumerate(lengths):
        if l:
            # up to a multiple of 8 rows where the factor has them (zero rows: same result; the CPU
            # matmul of 8000-wide rows takes 0.43 ms for 31 rows, 0.20 ms for 32, 1 thread)
            l = min(t, -(-l // 8) * 8)
            xi = x[i, :, :l]
            out[i, :, :l, :l] = torch.matmul(xi, xi.transpose(-1, -2))
    return out


def _cat_left(parts):
    if all(isinstance(x, _Index) for x in parts):
        masks = [x.mask if x.mask is not None else torch.ones_like(x.idx, dtype=torch.bool) for x in parts]
        return _Index(torch.cat([x.idx for x in parts], -1), torch.cat(masks, -1), parts[0].size)
    return None


def _right_gram(rights) -> torch.Tensor:
    return _matmul_gram(rights[0] if len(rights) == 1 else torch.cat(rights, dim=2))


#: Numbers of positions T (mod 8) whose batched Gram matrix is formed on CPU with zero rows appended up to the
#: next multiple of 8 (see :func:`_matmul_gram`).
GRAM_PAD_REMAINDERS = frozenset({5, 6, 7})


def _gram_padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    t = x.shape[-2]
    y = F.pad(x, (0, 0, 0, rows - t))
    return torch.matmul(y, y.transpose(-1, -2))[..., :t, :t]


def _matmul_gram(x: torch.Tensor) -> torch.Tensor:
    """``x x^T`` over the last dimension (batched). The CPU backend's batched matmul of these small
    matrices depends on T in no simple way (1 thread, 128 sequences of 128-wide rows: T = 29 0.67 ms,
    31 0.90 ms, 32 0.43 ms, 33 0.63 ms; padding 29 or 31 to 32 with zero rows, copy included, 0.51 ms;
    measured for T = 9-63: T mod 8 = 7 gains at every size, 5 and 6 mostly, 1, 2 and 4 lose), so on a
    CPU a T with ``T % 8`` in :data:`GRAM_PAD_REMAINDERS` gets zero rows up to the next multiple of 8.
    The choice is a fixed rule of the shape, never a timing: zero rows change the float summation
    order, so a timed choice could differ between the processes of a job or between a run and its
    resumption, and break bit-exact resume (it did: tests/test_train_backends.py's DeepSpeed resume)."""
    t = x.shape[-2]
    if x.device.type != "cpu" or t % 8 not in GRAM_PAD_REMAINDERS or x.numel() == 0:
        return torch.matmul(x, x.transpose(-1, -2))
    return _gram_padded(x, -(-t // 8) * 8)


def _sq_ghost(lefts, rights, gr: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``||sum_c sum_t L_c R_c^T||^2`` by the ghost-norm identity (float64, ``(n,)``);
    ``gr``: the Gram matrix of the right factors if already known (:func:`_right_gram`)."""
    if gr is None:
        gr = _right_gram(rights)
    cat = _cat_left(lefts)
    if cat is not None:
        gl = _gram(cat, cat)
    elif not any(isinstance(x, _Index) for x in lefts):
        gl = _self_gram(lefts[0] if len(lefts) == 1 else torch.cat(lefts, dim=2))
    else:
        gl = torch.cat([torch.cat([(_self_gram(x) if x is y and not isinstance(x, _Index) else _gram(x, y)).to(gr.dtype)
                                   for y in lefts], -1) for x in lefts], -2)
    return (gl.to(gr.dtype) * gr).sum((1, 2, 3), dtype=torch.float64)


def _sq_materialized(lefts, rights) -> torch.Tensor:
    """Per-sample ``||sum_c sum_t L_c R_c^T||^2`` from the materialized per-sample gradient."""
    n, groups, _, q = rights[0].shape
    size = lefts[0].size if isinstance(lefts[0], _Index) else lefts[0].shape[-1]
    grad = None
    for x, r in zip(lefts, rights):
        if isinstance(x, _Index):
            part = torch.zeros(n, groups, size, q, dtype=r.dtype, device=r.device)
            rr = r if x.mask is None else r * x.mask.unsqueeze(-1)
            part.scatter_add_(2, x.idx.unsqueeze(-1).expand_as(rr), rr)
        else:
            part = torch.matmul(x.transpose(-1, -2), r)
        grad = part if grad is None else grad + part
    return _row_sq(grad.reshape(n, -1))


def _sq_embedding(x: _Index, r: torch.Tensor) -> torch.Tensor:
    """One embedding contribution: sum the output gradients of equal indices per sample
    (``index_add``), then take norms: cost O(T d), no Gram matrix and no V x d gradient."""
    n, groups, t, q = r.shape
    idx = x.idx.reshape(n, t)
    rows = r.reshape(n * t, q)
    keys = idx + torch.arange(n, device=idx.device).unsqueeze(1) * x.size
    keys = keys.reshape(-1)
    if x.mask is not None:
        keep = x.mask.reshape(-1)
        keys, rows = keys[keep], rows[keep]
    out = torch.zeros(n, dtype=torch.float64, device=r.device)
    if keys.numel() == 0:
        return out
    uniq, inverse = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(uniq.numel(), q, dtype=rows.dtype, device=rows.device).index_add_(0, inverse, rows)
    return out.index_add_(0, uniq // x.size, _row_sq(sums))


class _Contribution:
    __slots__ = ("module", "a", "g")

    def __init__(self, module, a, g) -> None:
        self.module, self.a, self.g = module, a, g


class _Pass:
    """One forward pass of the root module (one micro-batch): its sample count, its subset rows
    and the contributions of parameters used more than once."""

    def __init__(self) -> None:
        self.batch: int | None = None
        self.rows: torch.Tensor | None = None    # subset rows (None: all)
        self.counted = False
        self.expected: dict[int, int] = {}
        self.pending: dict[int, list[_Contribution]] = {}
        # per input tensor of the pass (weakly held): its detached (subset) rows, shared by the layers
        # that read the same tensor (an attention block's q/k/v projections), and the Gram matrix of
        # those rows once a ghost norm has formed it (computed once instead of once per layer)
        self.inputs = WeakIdKeyDictionary()
        self.grams = WeakIdKeyDictionary()


#: Serializes :meth:`TrainingPassMoments.add_reduced`: DDP's gradient buckets complete their
#: all-reduces asynchronously, and gloo runs the futures' callbacks on its worker threads, so two
#: buckets could otherwise both create the step's parts and one bucket's statistics be lost (seen
#: as "1 of the 4 measured parameters were in no reduced DDP bucket"). Module-level, so the
#: estimator itself stays picklable and deep-copyable.
_ADD_REDUCED_LOCK = threading.Lock()

class TrainingPassMoments(PerLayerViews):
    """Exact ``S_k = mean_i ||grad_k f_i||^2`` from the training step's own forward and backward.

    Module hooks capture each supported layer's input in the forward and the gradient at its
    output in the backward (a pre-hook on the autograd node of the output), and turn them into per-sample squared
    norms of the weight (and bias) gradient, each layer by the cheaper of the ghost-norm identity
    and the materialized per-sample gradient (module docstring; docs/moments.md section 3). No
    second forward or backward runs; nothing is stored beyond what autograd saves anyway.

    Args:
        model: the network (a ``DistributedDataParallel`` wrapper is unwrapped). Its forward
            starts a pass (forward pre-hook); tensors of the first (batch) dimension are samples.
        params: the parameters to measure, weights or biases of ``nn.Linear``, ``nn.Conv1d``,
            ``nn.Conv2d`` and ``nn.Embedding`` modules of ``model``; default: the parameters CLARS
            adapts (``lb_dist.optim.param_groups``: every trainable parameter with ``ndim >= 2``
            outside normalization modules). A parameter of another module type is refused
            (ValueError naming it): exclude it from adaptation or use
            :func:`lb_dist.moments.per_sample_second_moments`.
        grad_scale: factor of the backward'ed loss relative to the micro-batch MEAN loss
            (``1/accumulation_steps`` for ``(loss / steps).backward()``; attribute, may change).
        subset_size: samples per forward pass (per rank, per micro-batch) whose norms enter S_k,
            drawn uniformly without replacement (``torch.randperm(b, generator=generator)``);
            None (default): every sample.
        generator: random source of the subsets.
        group: process group of the reduction in :meth:`finish_step` (default: the world, if
            initialized), unless the statistics came through the DDP hook (``lb_dist.ddp``).

    Per step: zero ``.grad``, run the micro-batches' forward + backward, call
    :meth:`finish_step` (before clipping or the optimizer step), then ``CLARS(..., moments=self)``
    reads :meth:`second_moments`. Assumed: equal micro-batch sizes within a step; not supported:
    activation checkpointing (its recomputed forward would fire the hooks again), inputs without a
    batch dimension, forward functions of subclasses of the supported modules. A ``copy.deepcopy``
    of the model made after construction carries the hooks along (copy first).
    """

    def __init__(self, model: nn.Module, params: Iterable[torch.Tensor] | None = None, *,
                 grad_scale: float = 1.0, subset_size: int | None = None,
                 generator: torch.Generator | None = None, group=None) -> None:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if subset_size is not None:
            check_positive_int("subset_size", subset_size)
        self.grad_scale = grad_scale
        self.subset_size = subset_size
        self.generator = generator
        self.group = group
        self.model = model
        if params is None:
            from lb_dist.optim.groups import param_groups
            groups = param_groups(model, 0.0)
            params = [p for g in groups if g.get("layer_adaptation", True) for p in g["params"]]
        self.params: list[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("params is empty: the model has no parameter to measure")
        self.param_index = {p: i for i, p in enumerate(self.params)}
        if len(self.param_index) != len(self.params):
            raise ValueError("params lists a parameter twice")
        # which (module, role) uses each tracked parameter
        owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for mname, m in model.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if p in self.param_index:
                    owners.setdefault(self.param_index[p], []).append((mname, m, pname))
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        for i, p in enumerate(self.params):
            found = owners.get(i)
            if not found:
                raise ValueError(f"params[{i}] (shape {list(p.shape)}) is not a parameter of model")
            for mname, m, pname in found:
                if not isinstance(m, SUPPORTED_MODULES) or _forward_overridden(m) or pname not in ("weight", "bias"):
                    raise ValueError(
                        f"TrainingPassMoments cannot measure parameter {names.get(id(p), mname + '.' + pname)!r} "
                        f"of a {type(m).__name__} (supported: the weights and biases of nn.Linear, nn.Conv1d, "
                        f"nn.Conv2d and nn.Embedding, with their own forward): leave it out of params (or "
                        f"out of layer adaptation), or use lb_dist.moments.per_sample_second_moments")
                if not p.requires_grad:
                    raise ValueError(f"parameter {names.get(id(p), pname)!r} does not require grad")
        self._modules: list[tuple[nn.Module, list[tuple[str, int]]]] = []
        by_module: dict[int, tuple[nn.Module, list]] = {}
        for i, found in sorted(owners.items()):
            for _, m, pname in found:
                by_module.setdefault(id(m), (m, []))[1].append((pname, i))
        self._modules = list(by_module.values())
        self._uses = {i: len(found) for i, found in owners.items()}
        self._handles = [model.register_forward_pre_hook(self._start_pass)]
        for m, roles in self._modules:
            self._handles.append(m.register_forward_hook(self._make_forward_hook(roles)))
        self._pass: _Pass | None = None
        self._reset_pending()
        self._s = self._g = None
        self._reduced: torch.Tensor | None = None
        self._parts = None
        self.num_updates = 0
        self.enabled = True

    # ------------------------------------------------------------ hooks
    @property
    def grad_scale(self) -> float:
        return self._grad_scale

    @grad_scale.setter
    def grad_scale(self, value) -> None:
        self._grad_scale = float(check_positive("grad_scale", value))

    def _reset_pending(self) -> None:
        dev = self.params[0].device
        self._sq = torch.zeros(len(self.params), dtype=torch.float64, device=dev)
        self._count = 0
        self._passes = 0
        self._seen = torch.zeros(len(self.params), dtype=torch.bool)
        self._open: list[_Pass] = []

    def _start_pass(self, module, args) -> None:
        self._pass = _Pass() if self.enabled and torch.is_grad_enabled() else None

    def _make_forward_hook(self, roles: list[tuple[str, int]]):
        def hook(module: nn.Module, args, output) -> None:
            ps = self._pass
            if ps is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            a = args[0]
            if not isinstance(a, torch.Tensor) or a.dim() < (1 if isinstance(module, nn.Embedding) else 2) \
                    or (not isinstance(module, (nn.Linear, nn.Embedding)) and a.dim() != module.weight.dim()):
                raise ValueError(f"TrainingPassMoments needs batched inputs (first dimension = samples); a "
                                 f"{type(module).__name__} got an input of shape "
                                 f"{list(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
            b = a.shape[0]
            if ps.batch is None:
                ps.batch = b
                if self.subset_size is not None and self.subset_size < b:
                    gen_device = self.generator.device if self.generator is not None else "cpu"
                    perm = torch.randperm(b, generator=self.generator, device=gen_device)
                    ps.rows = perm[:self.subset_size].to(a.device)
            elif ps.batch != b:
                raise ValueError(f"a {type(module).__name__} saw {b} samples in a forward pass whose first "
                                 f"layer saw {ps.batch}: TrainingPassMoments needs the batch in dimension 0 "
                                 f"of every measured layer's input")
            src, a = a, ps.inputs.get(a)
            if a is None:
                a = src.detach()
                if ps.rows is not None:
                    a = a.index_select(0, ps.rows)
                ps.inputs[src] = a
            for _, i in roles:
                if self._uses[i] > 1:
                    ps.expected[i] = ps.expected.get(i, 0) + 1
            # a pre-hook on the autograd node that computed the output (not a tensor hook): it gets
            # the gradient with respect to the output as computed, even if a later in-place op
            # (ReLU(inplace=True)) rebases the tensor onto another node; a Linear over a sequence
            # returns a view of its 2-d matmul result, whose node is the one that survives then
            base = view_base(output)
            base = base if base is not None else output
            if base.numel() != output.numel() or base.grad_fn is None:
                raise ValueError(f"the output of a {type(module).__name__} is a view of a larger tensor: "
                                 f"TrainingPassMoments cannot locate its gradient")
            shape = output.shape
            # the input is held only until the output gradient arrives (autograd frees its own saved
            # copy right after the layer's backward; holding every layer's input to the end of the
            # backward raised the step's peak memory and cost ~9 % of a ResNet-20 step in page faults)
            held = [a]
            base.grad_fn.register_prehook(lambda grads: self._backward(
                module, roles, ps, held, None if grads[0] is None else grads[0].reshape(shape)))
        return hook

    def _backward(self, module, roles, ps: _Pass, held: list, g: torch.Tensor | None) -> None:
        if g is None:
            return None
        if not held:
            raise RuntimeError(f"a second backward through the same forward pass reached a {type(module).__name__} "
                               f"(retain_graph=True): TrainingPassMoments measures one backward per forward")
        a = held.pop()
        if not ps.counted:
            ps.counted = True
            self._count += ps.batch if ps.rows is None else ps.rows.numel()
            self._passes += 1
            self._open.append(ps)
        g = g.detach()
        if ps.rows is not None:
            g = g.index_select(0, ps.rows)
        scale = (ps.batch / self._grad_scale) ** 2
        for role, i in roles:
            self._seen[i] = True
            if self._uses[i] == 1:
                self._sq[i] += self._sample_sq([_Contribution(module, a, g)], role, ps.grams).sum() * scale
                continue
            lst = ps.pending.setdefault(i, [])
            lst.append(_Contribution(module, a, g))
            if len(lst) == ps.expected.get(i, 0):
                self._sq[i] += self._sample_sq(ps.pending.pop(i), role).sum() * scale
        return None

    def _flush(self) -> None:
        """Contributions of parameters used several times whose last use got no gradient."""
        for ps in self._open:
            for i, lst in ps.pending.items():
                role = "bias" if self.params[i].dim() == 1 else "weight"
                self._sq[i] += self._sample_sq(lst, role).sum() * (ps.batch / self._grad_scale) ** 2
            ps.pending = {}
        self._open = []

    # ---------------------------------------------------------- per-sample norms
    @staticmethod
    def _sample_sq(contribs: Sequence[_Contribution], role: str, grams=None) -> torch.Tensor:
        """Per-sample squared norm of the parameter's gradient (float64, one entry per row);
        ``grams``: a mapping input tensor -> Gram matrix of its rows, read and filled for a
        single Linear contribution by the ghost norm (whose right factor is the input)."""
        n = contribs[0].a.shape[0]
        if role == "bias":
            rows = sum(_bias_rows(c.module, c.g) for c in contribs)
            return _row_sq(rows)
        # shapes per sample, for the cost model and the chunk size (no unfold: F.unfold of even one
        # sample costs milliseconds on CPU)
        shapes = [_factor_shape(c.module, c.a, c.g) for c in contribs]
        groups, _, p, q, _ = shapes[0]
        if any((s[0], s[2], s[3]) != (groups, p, q) for s in shapes):
            raise ValueError("a parameter used by several modules with different group layouts")
        tokens = sum(s[1] for s in shapes)
        index = any(s[4] for s in shapes)
        if len(contribs) == 1 and index:
            method, per_row = "embedding", tokens * q * 3
        elif len(contribs) == 1 and isinstance(contribs[0].module, (nn.Conv1d, nn.Conv2d)) \
                and materialized_cost(tokens, p, q) <= ghost_cost(tokens, p, q):
            method, per_row = "conv", groups * p * q + contribs[0].a[0].numel() + contribs[0].g[0].numel()
        elif ghost_cost(tokens, p, q, index) < materialized_cost(tokens, p, q, index):
            method, per_row = "ghost", groups * tokens * (tokens * 2 + q + p)
        else:
            method, per_row = "materialized", groups * (p * q + tokens * (p + q))
        chunk = max(1, CHUNK_ELEMENTS // max(per_row, 1))
        if method == "conv":
            return _sq_conv_tuned(contribs[0].module, contribs[0].a, contribs[0].g, chunk)
        out = []
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            parts = [_blocks(c.module, c.a[sl], c.g[sl]) for c in contribs]
            lefts, rights = [x for x, _ in parts], [r for _, r in parts]
            if method == "embedding":
                out.append(_sq_embedding(lefts[0], rights[0]))
            elif method == "ghost":
                a = contribs[0].a
                key = grams is not None and len(contribs) == 1 and chunk >= n \
                    and isinstance(contribs[0].module, nn.Linear)
                gr = grams.get(a) if key else None
                if gr is None:
                    gr = _right_gram(rights)
                    if key:
                        grams[a] = gr
                out.append(_sq_ghost(lefts, rights, gr))
            else:
                out.append(_sq_materialized(lefts, rights))
        return torch.cat(out)

    # ------------------------------------------------------------ steps
    @property
    def num_tracked_micro_batches(self) -> int:
        """Backward passes seen since the last :meth:`finish_step`."""
        return self._passes

    def local_statistics(self) -> torch.Tensor:
        """This rank's ``[sum_i ||grad_k f_i||^2 per parameter | sample count]`` (float64) of the
        step so far: the vector the DDP hook appends to its all-reduce."""
        self._flush()
        return torch.cat([self._sq, self._sq.new_tensor([float(self._count)])])

    def bucket_statistics(self, indices: torch.Tensor) -> torch.Tensor:
        """``[sum_i ||grad_k f_i||^2 for k in indices | sample count]`` of this rank so far (float64),
        for a gradient bucket whose parameters' norms are complete (their output gradients came
        before their weight gradients). Used by the DDP hook (``lb_dist.ddp``)."""
        return torch.cat([self._sq[indices.to(self._sq.device)], self._sq.new_tensor([float(self._count)])])

    def add_reduced(self, indices: torch.Tensor, statistics: torch.Tensor) -> None:
        """Receive the all-reduced :meth:`bucket_statistics` of one bucket; once every parameter
        has its reduced value, :meth:`finish_step` uses them and makes no collective of its own."""
        statistics = statistics.to(device=self._sq.device, dtype=torch.float64)
        idx = indices.to(self._sq.device)
        with _ADD_REDUCED_LOCK:     # the buckets' all-reduce callbacks can run on several threads at once
            if self._parts is None:
                self._parts = (torch.zeros(len(self.params) + 1, dtype=torch.float64, device=self._sq.device),
                               torch.zeros(len(self.params), dtype=torch.bool, device=self._sq.device))
            values, filled = self._parts
            values[idx] = statistics[:-1]
            values[-1] = statistics[-1]
            filled[idx] = True
            if bool(filled.all()):
                self._reduced, self._parts = values, None

    def set_reduced(self, statistics: torch.Tensor) -> None:
        """Give the step's statistics summed over ranks (layout of :meth:`local_statistics`);
        :meth:`finish_step` then uses them instead of reducing itself (``lb_dist.ddp`` does this)."""
        statistics = torch.as_tensor(statistics, dtype=torch.float64).reshape(-1)
        if statistics.numel() != len(self.params) + 1:
            raise ValueError(f"statistics holds {statistics.numel()} entries, expected {len(self.params) + 1}")
        self._reduced = statistics.to(self._sq.device)

    def discard_step(self) -> None:
        """Drop the pending step's statistics (a step the optimizer skipped, e.g. an AMP overflow)
        without a collective: ``S_k``, ``||G_k||^2`` and :attr:`num_updates` stay those of the last
        finished step."""
        self._reset_pending()
        self._reduced = self._parts = None

    def finish_step(self, mean_grads: Sequence[torch.Tensor] | None = None, *,
                    mean_grad_sq: torch.Tensor | None = None) -> None:
        """Close the step: ``S_k = sum_i ||grad_k f_i||^2 / count`` over the step's (subset)
        samples of every rank (one all-reduce of ``[per-layer sums | count]`` when distributed,
        none if the DDP hook already reduced them) and ``||G_k||^2`` from ``mean_grads``, from
        ``mean_grad_sq`` (the per-layer squared norms of the mean gradient directly, ``params``
        order; for engines that already reduced them, e.g. over shards) or from
        ``.grad / (n * grad_scale)`` (n backward passes; ``.grad`` zeroed before the step's first
        micro-batch, not yet clipped). Non-finite values are a ``ValueError`` (skip the optimizer
        step). Resets the step's statistics, also on error."""
        if mean_grads is not None and mean_grad_sq is not None:
            self.discard_step()
            raise ValueError("pass at most one of mean_grads and mean_grad_sq")
        if mean_grad_sq is not None:
            if not isinstance(mean_grad_sq, torch.Tensor) or mean_grad_sq.shape != (len(self.params),):
                self.discard_step()
                got = tuple(mean_grad_sq.shape) if isinstance(mean_grad_sq, torch.Tensor) \
                    else type(mean_grad_sq).__name__
                raise ValueError(f"mean_grad_sq must be a tensor of shape ({len(self.params)},) (one squared "
                                 f"norm per tracked parameter), got {got}")
            if bool((mean_grad_sq < 0).any()):
                self.discard_step()
                raise ValueError("mean_grad_sq holds a negative squared norm")
        try:
            if self._passes == 0:
                raise MomentsUnavailableError(
                    "finish_step() found no backward pass through a measured layer since the last step: "
                    "run the model's forward (with grad enabled) and backward first")
            if self._parts is not None:
                missing = int((~self._parts[1]).sum())
                raise RuntimeError(f"{missing} of the {len(self.params)} measured parameters were in no reduced "
                                   f"DDP bucket: measure only the DDP module's own parameters that receive gradients")
            if self._reduced is not None:
                stats = self._reduced
            else:
                stats = self.local_statistics()
                if is_distributed(self.group):
                    all_reduce_sum_(stats, self.group)
            count = float(stats[-1])
            if count <= 0:
                raise MomentsUnavailableError("no sample entered the statistics of this step")
            s = stats[:-1] / count
            if mean_grad_sq is not None:
                g = mean_grad_sq.detach().to(device=self._sq.device, dtype=torch.float64).clone()
            elif mean_grads is None:
                g = self.mean_grad_sq_of(self._sq_norms([p.grad for p in self.params]))
            else:
                grads = list(mean_grads)
                if len(grads) != len(self.params) or any(
                        not isinstance(t, torch.Tensor) or t.shape != p.shape for t, p in zip(grads, self.params)):
                    raise ValueError(f"mean_grads must hold one tensor per tracked parameter "
                                     f"({len(self.params)}), each of the parameter's shape")
                g = self._sq_norms(grads)
            unseen = [i for i in range(len(self.params)) if not self._seen[i] and float(g[i]) > 0]
            if unseen and self._reduced is None:
                raise RuntimeError(f"params {unseen} have gradients but no backward hook saw them (a module "
                                   f"called outside the model's forward, or an unsupported autograd graph)")
            if not bool(torch.isfinite(s).all() & torch.isfinite(g).all()):
                raise ValueError("non-finite statistics in this step (e.g. an AMP step with overflowing "
                                 "gradients): skip its optimizer step")
            self._s, self._g = s, g
            self.num_updates += 1
        finally:
            self.discard_step()

    def mean_grad_sq_of(self, grad_sq: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        """The step's mean gradient's per-layer squared norms ``||G_k||^2`` from those of the tensors
        that hold the step's accumulated gradient (``.grad`` after the step's backward passes, as an
        engine reduced it, before clipping): they hold ``factor x passes x grad_scale`` times ``G``
        (``passes``: the backward passes this source saw since the last step; ``factor``: what the
        engine's reduction multiplies the mean by, e.g. K for a SUM over K ranks). The one place
        this rule is written: the default :meth:`finish_step`, FSDP2's and Horovod's sources use it."""
        return grad_sq / float(factor * self._passes * self._grad_scale) ** 2

    def _sq_norms(self, tensors) -> torch.Tensor:
        out = torch.zeros(len(tensors), dtype=torch.float64, device=self._sq.device)
        for i, t in enumerate(tensors):
            if t is not None:
                out[i] = torch.linalg.vector_norm(t.detach(), dtype=torch.float64).square().to(out.device)
        return out

    def remove_hooks(self) -> None:
        """Remove every hook this object registered."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pass = None

    # ------------------------------------------------------------ results
    def _require(self) -> None:
        if self._s is None:
            raise MomentsUnavailableError("TrainingPassMoments has no estimate yet: run a step's forward and "
                                          "backward, then finish_step()")

    def second_moments_tensor(self) -> torch.Tensor:
        """Per-layer ``S_k`` (float64, ``params`` order)."""
        self._require()
        return self._s

    def grad_sq_norms_tensor(self) -> torch.Tensor:
        """Per-layer ``||G_k||^2`` of the step's mean gradient (float64)."""
        self._require()
        return self._g

    def trace_sigma_tensor(self) -> torch.Tensor:
        """Per-layer ``tr(Sigma_k) = S_k - ||G_k||^2`` (per-sample covariance, 1/N normalization;
        >= 0 on the whole batch up to round-off, clamped at 0)."""
        return (self.second_moments_tensor() - self.grad_sq_norms_tensor()).clamp_min(0.0)

    def noise_scales(self) -> tuple[dict[torch.Tensor, float], float]:
        """Gradient noise scale ``B_simple = tr(Sigma) / ||G||^2`` (McCandlish et al. 2018, eq. 2.8),
        per layer and over all measured layers together (``sum_k tr(Sigma_k) / sum_k ||G_k||^2``);
        inf where ``||G||^2 = 0``. On the whole batch ``B_simple,k = M_k - 1``."""
        return noise_scales(self.trace_sigma_tensor(), self.grad_sq_norms_tensor(), self.params)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates,
                "second_moments": None if self._s is None else self._s.clone(),
                "grad_sq": None if self._g is None else self._g.clone()}

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("num_updates", "second_moments", "grad_sq"):
            if key not in state:
                raise KeyError(f"TrainingPassMoments state_dict is missing {key!r}")
        s, g = state["second_moments"], state["grad_sq"]
        for name, t in (("second_moments", s), ("grad_sq", g)):
            if t is not None and t.numel() != len(self.params):
                raise ValueError(f"state_dict[{name!r}] holds {t.numel()} layers, this object measures "
                                 f"{len(self.params)}")
        self.num_updates = int(state["num_updates"])
        self._s = None if s is None else s.clone().double().to(self._sq.device)
        self._g = None if g is None else g.clone().double().to(self._sq.device)


def noise_scales(trace_sigma: torch.Tensor, grad_sq: torch.Tensor, params=None):
    """``B_simple = tr(Sigma) / ||G||^2`` (McCandlish et al. 2018) per entry and over all entries
    (``sum tr(Sigma) / sum ||G||^2``); inf where the denominator is 0. With ``params``:
    ``({param: float}, float)``, else ``(tensor, float)``."""
    per = torch.where(grad_sq > 0, trace_sigma / grad_sq.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.full_like(trace_sigma, math.inf))
    total_g = float(grad_sq.sum())
    overall = float(trace_sigma.sum()) / total_g if total_g > 0 else math.inf
    if params is None:
        return per, overall
    return {p: float(per[i]) for i, p in enumerate(params)}, overall
