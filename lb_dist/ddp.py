"""torch.distributed backend: a DDP communication hook for GradientMix and micro-batch statistics.

PyTorch's own extension point (``torch.distributed.algorithms.ddp_comm_hooks``): a state object and
``hook(state, bucket) -> Future[Tensor]``, registered with ``DistributedDataParallel.register_comm_hook``.
Per bucket, :func:`gradient_mix_hook` runs ONE asynchronous all-reduce that

* mixes (device-wise GradientMix, paper eq. 3): rank k multiplies its bucket by ``pi_k`` before the
  SUM all-reduce, so the reduced gradient is ``M = sum_k pi_k g_k`` (plain averaging, ``1/K``, when
  there is no mix or its noise is ``"none"``: bitwise DDP's default);
* and, with ``moments``, carries the per-parameter squared norms ``||g_k||^2`` of this rank's
  unmixed local gradient appended to the bucket (SUM over ranks) so that, after the last bucket,
  ``moments.update_weighted(sum_k ||g_k||^2, K, ||M||^2, weight_sum=W1, weight_sq_sum=W2,
  micro_batch_size=b)`` feeds the micro-batch estimator of ``S_k`` without any extra communication
  round.

Each rank's gradient is one micro-batch with weight ``pi_k`` (``1/K`` without mixing), so ``W1 =
sum_k pi_k`` and ``W2 = sum_k pi_k^2``, known on every rank; the core solves for the unmixed
big-batch value conditioned on these weights (``lb_dist.moments.weighted_big_batch_sq``, exactly
``||M||^2`` without mixing), the same rule as ``lb_dist.horovod`` and ``lb_dist.deepspeed``.
With a :class:`lb_dist.moments.TrainingPassMoments` as ``moments`` instead, each bucket's all-reduce
carries that estimator's per-sample sums of the bucket's parameters and the sample count
(``_training_pass_bucket``), so its exact S_k needs no collective of its own.
Equations in docs/moments.md; usage (torchrun, gradient accumulation) in docs/backend-ddp.md.
"""
# No ``from __future__ import annotations`` here: DDP checks the hook's annotations at run time
# (``bucket: dist.GradBucket``, ``-> torch.futures.Future[torch.Tensor]``).
import threading

import torch
import torch.distributed as dist

from lb_dist._validation import check_positive_int
from lb_dist._vendor.torch import foreach_norm
from lb_dist.mixing import GradientMix, check_device_mix
from lb_dist.moments.activations import TrainingPassMoments
from lb_dist.moments.microbatch import MicroBatchMoments, MomentsUnavailableError, check_micro_batch_moments
from lb_dist.step_state import StepState

__all__ = ["GradientMixHookState", "gradient_mix_hook", "register"]


class _BucketPlan:
    """Per-bucket layout for the statistics path, built once per bucket (DDP rebuilds its buckets
    after the first iteration, which gives new plans): a persistent send buffer
    ``[bucket | one squared norm per parameter]`` and the index maps into ``moments.params``."""

    def __init__(self, bucket, buf: torch.Tensor, param_index: dict) -> None:
        params = bucket.parameters()
        grads = bucket.gradients()
        n, m = buf.numel(), len(params)
        self.packed = torch.empty(n + m, dtype=buf.dtype, device=buf.device)
        self.head, self.tail = self.packed[:n], self.packed[n:]
        elt, base = buf.element_size(), buf.data_ptr()
        offsets = [(g.data_ptr() - base) // elt for g in grads]  # grads are views into the bucket
        self.reduced_views = [self.head.narrow(0, off, g.numel()) for off, g in zip(offsets, grads)]
        found = [(j, param_index[p]) for j, p in enumerate(params) if p in param_index]
        self.rows = torch.tensor([j for j, _ in found], dtype=torch.long)   # position in the bucket
        self.slots = torch.tensor([i for _, i in found], dtype=torch.long)  # position in moments.params


class GradientMixHookState(StepState):
    """State of :func:`gradient_mix_hook` (a :class:`lb_dist.step_state.StepState`).

    Args:
        mix: a device-wise :class:`lb_dist.GradientMix` (``None``: plain averaging). The hook reads
            ``mix.step`` and never advances it (use ``mix.attach(optimizer)``).
        moments: a :class:`lb_dist.moments.MicroBatchMoments` over (a subset of) the DDP module's
            parameters, the same Parameter objects; updated once per synchronizing backward.
        process_group: the data-parallel group (default: the world).
        micro_batch_size: samples behind one rank's gradient of one step (local batch times
            accumulation steps); defaults to ``moments.micro_batch_size``.

    ``grad_scale`` (attribute, default 1.0): the factor the backward'ed loss carries relative to the
    mean loss (e.g. ``scaler.get_scale()`` with AMP loss scaling); the statistics are divided by its
    square.

    After each synchronizing backward with ``moments``, :attr:`last_update` holds, for logging (the
    same keys as ``lb_dist.horovod`` and ``lb_dist.deepspeed``): ``micro_sq_sum`` (``sum_k
    ||g_k||^2``), ``num_micro_batches`` (K), ``micro_batch_size``, ``weighted_mean_sq`` (``||M||^2``),
    ``weights`` (``(W1, W2)``), ``mean_sq`` (the big-batch value passed to ``moments.update``, None
    when skipped) and ``skipped``; a skipped step also has a ``reason``: ``"non-finite statistics"``
    (an overflowing AMP step) or ``"degenerate weights"`` (``W2 = W1^2``, e.g. one non-zero
    coefficient: nothing to compare). A skipped step leaves ``moments`` unchanged.
    """

    def __init__(self, mix: GradientMix | None = None, moments: MicroBatchMoments | None = None,
                 process_group=None, micro_batch_size: int | None = None) -> None:
        check_device_mix("mix", mix, "the all-reduce")
        if isinstance(moments, TrainingPassMoments):
            if mix is not None and mix.noise != "none":
                raise ValueError("moments=TrainingPassMoments with a device-wise mix: its per-sample "
                                 "gradients average to the unmixed gradient; use plain averaging (mix=None)")
        else:
            check_micro_batch_moments("moments", moments)
        if micro_batch_size is not None:
            check_positive_int("micro_batch_size", micro_batch_size)
        elif moments is not None and not isinstance(moments, TrainingPassMoments) and moments.micro_batch_size is None:
            raise ValueError("micro_batch_size is required with moments (samples per rank per step, "
                             "including accumulation), unless the MicroBatchMoments was given one")
        super().__init__(mix, moments, micro_batch_size)
        self.process_group = process_group
        self._lock = threading.Lock()
        self._synced = False          # a synchronizing backward completed and its gradient is still in .grad
        self._sentinel = None
        self._sentinel_handle = None
        n = len(moments.params) if moments is not None else 0
        self._local_sq = torch.zeros(n, dtype=torch.float64)
        self._reduced_sq = torch.zeros(n, dtype=torch.float64)
        self._filled = torch.zeros(n, dtype=torch.bool)
        self._plans: dict = {}
        self._reset()

    # ------------------------------------------------------------------ one reduction per step
    def watch(self, param: torch.Tensor) -> None:
        """Refuse a reduction of already-reduced gradients (:func:`register` calls it with the
        module's smallest trainable parameter). DDP all-reduces ``.grad`` at every backward outside
        ``no_sync()``; a backward that starts while ``param.grad`` still holds the previous
        synchronizing backward's reduced (and mixed) gradient, non-zero, would have that gradient
        reduced, mixed and counted by the statistics a second time: gradient accumulation without
        ``no_sync()``. A tensor hook on ``param`` checks this at every backward that reaches it
        (one small host read) and raises a ``RuntimeError`` naming the pattern and the fix."""
        if self._sentinel_handle is not None:
            self._sentinel_handle.remove()
        self._sentinel = param
        self._synced = False
        self._sentinel_handle = param.register_hook(self._check_fresh_gradient)

    def _check_fresh_gradient(self, grad):
        if self._synced:
            held = self._sentinel.grad
            if held is not None and bool(held.detach().ne(0).any()):
                self._synced = False                  # report once; the caller fixes the loop
                raise RuntimeError(
                    "lb_dist.ddp: a backward outside no_sync() while .grad still holds the gradient DDP "
                    "reduced in the previous synchronizing backward (gradient accumulation without "
                    "no_sync(), or no zero_grad() after the optimizer step): DDP would all-reduce the "
                    "already-reduced gradient again, and GradientMix would mix it and the micro-batch "
                    "statistics count it a second time. Accumulate under `with ddp_model.no_sync():` "
                    "for all but the last micro-batch of the step, and call optimizer.zero_grad() after "
                    "optimizer.step()")
            self._synced = False
        return None

    # ------------------------------------------------------------------ per bucket (the hook's calls)
    def start_bucket(self, bucket) -> tuple[int, float, float | None]:
        """At a bucket's hook: ``(K, factor, coefficient)`` of the step, ``factor`` the bucket's
        multiplier before the SUM all-reduce (``pi_rank``, or ``1/K``: DDP's default, bitwise) and
        ``coefficient`` ``pi_rank`` or None for plain averaging. The last bucket marks the backward
        as synchronizing (:meth:`watch`)."""
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        k = dist.get_world_size(group)
        draw = self.step_draw(k, dist.get_rank(group))
        if bucket.is_last():
            self._synced = True   # after this backward .grad holds reduced gradients (watch)
        return k, draw.coefficient, (draw.coefficient if draw.mixed else None)

    def bucket_plan(self, bucket, buf: torch.Tensor) -> _BucketPlan:
        """The bucket's plan, rebuilt (and the old one dropped) when DDP rebuilds its buckets."""
        key = (buf.data_ptr(), buf.numel(), tuple(map(id, bucket.parameters())))
        entry = self._plans.get(bucket.index())
        if entry is None or entry[0] != key:
            entry = self._plans[bucket.index()] = (key, _BucketPlan(bucket, buf, self.moments.param_index))
        return entry[1]

    def bucket_submitted(self, k: int, is_last: bool) -> None:
        """A bucket with statistics left: the step's K and (W1, W2) are fixed at its first bucket."""
        with self._lock:
            if self._pending == 0 and not self._saw_last:
                self._weights = self._draw.weight_sums
                self._k = k
            self._pending += 1
            self._saw_last = self._saw_last or is_last

    def bucket_reduced(self, plan: _BucketPlan, sq_sum: torch.Tensor, red_sq: torch.Tensor) -> None:
        """A bucket's all-reduce finished: record its ``sum_k ||g_k||^2`` and ``||M||^2``; after the
        step's last bucket, feed ``moments`` (:meth:`StepState.feed`) and start the next step."""
        with self._lock:
            try:
                self._local_sq[plan.slots] = sq_sum[plan.rows]
                self._reduced_sq[plan.slots] = red_sq[plan.rows]
                self._filled[plan.slots] = True
                self._pending -= 1
                if self._saw_last and self._pending == 0:
                    self._finish_step()
            finally:
                if self._saw_last and self._pending == 0:
                    self._reset()

    def _reset(self) -> None:
        self._local_sq.zero_()
        self._reduced_sq.zero_()
        self._filled.zero_()
        self._pending = 0
        self._saw_last = False
        self._weights = (1.0, 1.0)   # (W1, W2) of the step, fixed with K at its first bucket
        self._k = 1

    def _finish_step(self) -> None:
        moments = self.moments
        if not bool(self._filled.all()):
            missing = int((~self._filled).sum())
            raise RuntimeError(f"{missing} of the {len(moments.params)} parameters tracked by moments were in "
                               f"no DDP bucket: moments must track the DDP module's own parameters "
                               f"(and only ones that receive gradients)")
        # ||M||^2 with M = sum_k pi_k g_k; non-finite statistics (an AMP step whose gradients overflowed:
        # GradScaler skips that optimizer step) and degenerate weights skip the update
        self.feed(self._local_sq, self._k, self._reduced_sq, self._weights)


def gradient_mix_hook(state: GradientMixHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: GradientMix scaling + averaging all-reduce (+ moments statistics),
    one asynchronous all-reduce per bucket. See the module docstring."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    k, factor, coeff = state.start_bucket(bucket)

    if isinstance(state.moments, TrainingPassMoments):
        return _training_pass_bucket(state, bucket, buf, factor, group)
    if state.moments is None:
        buf.mul_(factor)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    # ---- with statistics: append this rank's per-parameter ||g_k||^2 to the reduced buffer
    if k == 1:
        raise MomentsUnavailableError(
            "the DDP hook's micro-batch statistics compare the K ranks' gradients and this process group "
            "has a single rank; in one process use MicroBatchMoments.track_backward() with gradient "
            "accumulation, or lb_dist.moments.per_sample_second_moments")
    plan = state.bucket_plan(bucket, buf)
    grads = bucket.gradients()
    # this rank's unmixed per-parameter ||g_k||^2 (taken before any scaling) after the bucket
    torch.stack(foreach_norm(grads), out=plan.tail)
    plan.tail.square_()
    torch.mul(buf, factor, out=plan.head)
    state.bucket_submitted(k, bucket.is_last())
    fut = dist.all_reduce(plan.packed, group=group, async_op=True).get_future()

    def _done(f) -> torch.Tensor:
        sq_sum = plan.tail.to(torch.float64)                  # sum_k ||g_k||^2
        red_sq = torch.stack(foreach_norm(plan.reduced_views)).to(torch.float64).square_()  # ||M||^2
        state.bucket_reduced(plan, sq_sum, red_sq)
        return plan.head

    return fut.then(_done)


def _training_pass_bucket(state: GradientMixHookState, bucket, buf: torch.Tensor, factor: float, group):
    """The averaging all-reduce of one bucket carrying, appended, the per-sample statistics of the
    bucket's parameters from a :class:`lb_dist.moments.TrainingPassMoments` (its output-gradient
    hooks ran before these weight gradients existed): ``[sum_i ||grad_k f_i||^2 | sample count]``."""
    moments = state.moments
    found = [(j, moments.param_index[p]) for j, p in enumerate(bucket.parameters()) if p in moments.param_index]
    slots = torch.tensor([i for _, i in found], dtype=torch.long)
    stats = moments.bucket_statistics(slots).to(device=buf.device, dtype=buf.dtype)
    packed = torch.cat([buf * factor, stats])
    fut = dist.all_reduce(packed, group=group, async_op=True).get_future()
    n = buf.numel()

    def _done(f) -> torch.Tensor:
        moments.add_reduced(slots, packed[n:])
        return packed[:n]

    return fut.then(_done)


def register(ddp_model: torch.nn.parallel.DistributedDataParallel, mix: GradientMix | None = None,
             moments: MicroBatchMoments | None = None, process_group=None,
             micro_batch_size: int | None = None) -> GradientMixHookState:
    """Build a :class:`GradientMixHookState` and register :func:`gradient_mix_hook` on ``ddp_model``.
    Returns the state (its ``last_update`` reports the statistics of the last step).

    Refused here, before any step: ``moments`` tracking parameters of another module or frozen ones
    (``requires_grad=False``). Refused at the backward that would do it: a synchronizing backward
    while ``.grad`` still holds the previous one's reduced gradient (gradient accumulation without
    ``no_sync()``; :meth:`GradientMixHookState.watch`)."""
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, "
                        f"got {type(ddp_model).__name__}")
    if moments is not None:
        own = {id(p) for p in ddp_model.module.parameters()}
        foreign = sum(id(p) not in own for p in getattr(moments, "params", ()))
        if foreign:
            raise ValueError(f"moments tracks {foreign} parameter(s) that are not ddp_model's: build "
                             f"MicroBatchMoments from ddp_model.module.parameters()")
        tracked = {id(p) for p in getattr(moments, "params", ())}
        frozen = [n for n, p in ddp_model.module.named_parameters() if id(p) in tracked and not p.requires_grad]
        if frozen:
            raise ValueError(f"moments tracks {len(frozen)} parameter(s) that do not require grad (frozen: "
                             f"{', '.join(frozen[:5])}{', ...' if len(frozen) > 5 else ''}): DDP reduces no "
                             f"gradient for them, so every step would fail. Build MicroBatchMoments from the "
                             f"trainable ones: [p for p in ddp_model.module.parameters() if p.requires_grad]")
    state = GradientMixHookState(mix=mix, moments=moments, process_group=process_group,
                                 micro_batch_size=micro_batch_size)
    trainable = [p for p in ddp_model.module.parameters() if p.requires_grad]
    if trainable:
        state.watch(min(trainable, key=lambda p: p.numel()))
    ddp_model.register_comm_hook(state, gradient_mix_hook)
    return state
