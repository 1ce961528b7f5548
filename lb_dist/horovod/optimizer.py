"""GradientMix and micro-batch statistics inside Horovod's own DistributedOptimizer machinery.

``hvd.DistributedOptimizer`` builds, at run time, a subclass of the user's optimizer class whose
methods come from ``horovod.torch.optimizer._DistributedOptimizer``: a per-parameter hook starts an
asynchronous allreduce (``_allreduce_grad_async``, or ``_grouped_allreduce_grad_async`` with
``groups``) when a gradient is ready, ``synchronize()`` waits for them and writes the reduced
gradients back, ``step()`` synchronizes and then runs the user's update. Tensor fusion, compression,
``gradient_predivide_factor`` and sparse handling all live in those two methods and in Horovod's C++.

:func:`DistributedOptimizer` builds the same kind of class from the same methods
(``lb_dist._vendor.horovod.optimizer_class``, the one module that reads Horovod's internals, behind a
check of the installed Horovod against the tested range, ``LB_DIST_HOROVOD_UNTESTED=1`` to override)
and overrides three of them, each calling Horovod's original:

* ``_allreduce_grad_async(p)`` / ``_grouped_allreduce_grad_async(ps)``: before Horovod compresses
  and submits the gradient, record ``||g_k||^2`` of this rank's local (unmixed) gradient of every
  parameter tracked by ``moments``, then scale ``p.grad`` in place by ``K*pi_k``
  (``GradientMix.scale``). Horovod's averaging allreduce then yields ``sum_k pi_k g_k`` (paper eq. 3).
  With no mix or noise ``"none"`` nothing is touched (bitwise ``hvd.DistributedOptimizer``).
* with ``moments``, the step's per-layer ``||g_k||^2`` leave as ONE small tensor when the last tracked
  gradient is submitted, with the gradients' dtype and op, so Horovod fuses it into the same allreduce
  as the last gradients;
* ``synchronize()``: submit what Horovod would submit late (parameters whose hook did not fire), run
  Horovod's synchronize, then feed ``moments.update_weighted`` with ``sum_k ||g_k||^2``, ``K``,
  ``||M||^2`` and the step's ``W1 = sum_k pi_k``, ``W2 = sum_k pi_k^2`` (the core's solve
  conditioned on the coefficients, the same rule as ``lb_dist.ddp`` and ``lb_dist.deepspeed``).

With a :class:`lb_dist.moments.TrainingPassMoments` as ``moments`` instead, the small tensor is that
estimator's ``[sum_i ||grad_k f_i||^2 per layer | sample count]`` (its module hooks measured every
sample before the weight gradients existed), submitted the same way with the step's last gradients;
``synchronize()`` hands the reduced sums to the estimator (``set_reduced``) and closes its step
(``finish_step``, no collective of its own), so CLARS reads the exact S_k in ``step()``.

Horovod's own ``hvd.broadcast_optimizer_state`` works on the result: its initializing ``step()`` on
zero gradients is recognized and only creates the state a first step would find (no update, no mix
draw, no estimator read); ``state_dict()`` carries the mix's and the estimator's state (also as an
option of the first param group, so Horovod's broadcast carries it to every rank); with
``sparse_as_dense=True`` a layer-wise optimizer gets the dense reduced gradient.

Details, equations and what is refused: docs/backend-horovod.md.
"""
from __future__ import annotations

import os
import warnings

import torch

try:
    import horovod.torch as hvd
except ImportError as exc:  # pragma: no cover - exercised only without Horovod
    raise ImportError("lb_dist.horovod needs Horovod with PyTorch support (horovod 0.28.1 built against "
                      "this torch): run `scripts/setup.sh dev,horovod` (it builds and caches a patched "
                      "wheel, see scripts/install_horovod.sh)") from exc

from lb_dist._optimizer_state import KEY as LB_DIST_KEY, load_section
from lb_dist._validation import check_positive_int
from lb_dist._vendor.horovod import (check_horovod_version, horovod_method, is_horovod_optimizer, optimizer_class,
                                     parameter_names, pending_handles, requires_update, submit, synchronized)
from lb_dist._vendor.torch import foreach_norm, sparse_nnz
from lb_dist.mixing import GradientMix, check_device_mix
from lb_dist.moments.activations import TrainingPassMoments
from lb_dist.moments.microbatch import MicroBatchMoments, MomentsUnavailableError, check_micro_batch_moments
from lb_dist.step_state import StepState

__all__ = ["DistributedOptimizer", "GradientMixState"]

# Prefix of the statistics tensor's Horovod name; each optimizer appends the Horovod name of its first
# tracked parameter (``_stats_name``), so that two optimizers fed by one backward (e.g. an encoder's
# and a decoder's) submit differently named tensors: Horovod refuses a second tensor whose name is
# still being processed.
_STATS_NAME = "lb_dist.horovod.layer_sq_norms"


def _stats_name(parameter_names: dict, moments: MicroBatchMoments) -> str:
    """The statistics tensor's name for an optimizer: identical on every rank (Horovod requires the
    parameter names to match across ranks) and distinct between optimizers over distinct parameters."""
    first = parameter_names.get(moments.params[0])
    return _STATS_NAME if first is None else f"{_STATS_NAME}.{first}"


def _op_name(op) -> str:
    for name in ("Average", "Sum", "Adasum", "Min", "Max", "Product"):
        if getattr(hvd, name, object()) == op:
            return f"hvd.{name}"
    return repr(op)


def _norm(g: torch.Tensor) -> torch.Tensor:
    """||g|| as a 0-dim tensor (g dense or sparse COO; half precision accumulated in float32)."""
    if g.is_sparse:
        g = g.coalesce().values()
    dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(g, dtype=dtype)


def _sq_norm(g: torch.Tensor) -> torch.Tensor:
    """||g||^2 as a 0-dim float64 tensor."""
    return _norm(g).double().square()


def _sq_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor ||g||^2 (float64, 1-D): one ``foreach_norm`` over the dense float32/64 ones."""
    out = [None] * len(grads)
    dense = [i for i, g in enumerate(grads) if not g.is_sparse and g.dtype in (torch.float32, torch.float64)]
    if dense:
        for i, n in zip(dense, foreach_norm([grads[i] for i in dense])):
            out[i] = n.double().square()
    for i, g in enumerate(grads):
        if out[i] is None:
            out[i] = _sq_norm(g)
    return torch.stack(out)


class GradientMixState(StepState):
    """What :func:`DistributedOptimizer` adds to Horovod's optimizer (``optimizer.lb_dist_state``), a
    :class:`lb_dist.step_state.StepState`.

    Attributes:
        mix: the device-wise :class:`lb_dist.GradientMix` or None (read, never advanced, here).
        moments: the :class:`lb_dist.moments.MicroBatchMoments` fed once per step, or None.
        micro_batch_size: samples behind one rank's gradient of a step (local batch times
            ``backward_passes_per_step``); None = ``moments.micro_batch_size`` (only allowed with
            ``backward_passes_per_step == 1``).
        grad_scale: factor the backward'ed loss carries relative to the mean loss (AMP loss
            scaling); the statistics are divided by its square. Default 1.0; setting anything but a
            finite number > 0 raises ValueError.
        stats_name: the Horovod name of this optimizer's statistics tensor
            (``"lb_dist.horovod.layer_sq_norms.<name of the first tracked parameter>"``).
        last_update: after each step with ``moments``, for logging (the same keys as ``lb_dist.ddp``
            and ``lb_dist.deepspeed``): ``micro_sq_sum`` (``sum_k ||g_k||^2``), ``num_micro_batches``
            (K), ``micro_batch_size``, ``weighted_mean_sq`` (``||M||^2`` of the averaged mixed
            gradient), ``weights`` (``(W1, W2)``), ``mean_sq`` (the big-batch value passed to
            ``moments.update``, None when skipped) and ``skipped`` (True, with a ``reason``, when the
            step was not fed: ``"non-finite statistics"``, ``"single rank"`` or ``"degenerate
            weights"``).
    """

    mix_argument = "gradient_mix"
    group_name = "Horovod's process set"

    def __init__(self, mix: GradientMix | None, moments: MicroBatchMoments | TrainingPassMoments | None,
                 micro_batch_size: int | None) -> None:
        super().__init__(mix, moments, micro_batch_size)
        #: the moments are a TrainingPassMoments (per-sample sums from its hooks) rather than micro-batch norms
        self.training_pass = isinstance(moments, TrainingPassMoments)
        self.stats_name = _STATS_NAME
        self._warned_single_rank = False
        self.reset()

    @property
    def collects(self) -> bool:
        return self.moments is not None

    def reset(self) -> None:
        """Drop a half-collected step (Horovod's load_state_dict / elastic restore call this)."""
        n = len(self.moments.params) if self.moments is not None else 0
        self._local_norm: list[torch.Tensor | None] = [None] * n
        self._num_norms = 0
        #: the handle of this step's statistics allreduce, once submitted (None before)
        self.stats_handle = None
        self._step_k: int | None = None      # K, (W1, W2) and K*pi_rank, fixed at the step's first submission
        self._step_weights = (1.0, 1.0)
        self._step_scale: float | None = None

    # --------------------------------------------------------------- per step

    def before_reduce(self, opt, params) -> None:
        """Called for the parameters whose gradients are about to be submitted by Horovod."""
        _adopt_broadcast_section(opt)
        mixing = self.mixing()
        if not mixing and self.moments is None:
            return
        for p in params:
            if p.grad is None:  # as Horovod does: a zero gradient is still reduced
                p.grad = p.data.new(p.size()).zero_()
        if self._step_k is None:
            ps = opt.process_set
            k = ps.size()
            draw = self.step_draw(k, ps.rank())
            self._step_scale = draw.scale if mixing else None
            self._step_weights = draw.weight_sums
            self._step_k = k
        if self.moments is not None:
            index = self.moments.param_index
            for p in params:
                slot = index.get(p)
                if slot is not None:
                    if self._local_norm[slot] is None:
                        self._num_norms += 1
                    # training pass: only which parameters were submitted (and their dtype) matters
                    self._local_norm[slot] = p.grad.new_zeros(()) if self.training_pass else _norm(p.grad)
            if self._num_norms == len(self._local_norm) and self.stats_handle is None:
                # the last tracked gradient of the step: its statistics leave with the last gradients
                # (same negotiation cycle) instead of after them
                self.stats_handle = self.launch_stats(opt)
        if mixing:
            scale = self._step_scale
            for p in params:
                p.grad.mul_(scale)

    def launch_stats(self, opt):
        """Start the one asynchronous SUM allreduce of this step's per-layer local ||g_k||^2 (as soon as
        the last tracked gradient is submitted, or from synchronize() for the late ones)."""
        missing = [i for i, t in enumerate(self._local_norm) if t is None]
        if missing:
            raise RuntimeError(f"{len(missing)} of the {len(self._local_norm)} parameters tracked by moments were "
                               f"not reduced by this optimizer this step (e.g. moments.params[{missing[0]}]); "
                               f"moments must track parameters of this optimizer that receive gradients")
        norms = self._local_norm
        if len({t.dtype for t in norms}) > 1:
            norms = [t.double() for t in norms]
        if self.training_pass:
            # [per-layer sums | count] in the gradients' dtype and with their op (fused likewise); float32
            # holds the count exactly and the sums to 6e-8 relative
            local = self.moments.local_statistics().to(device=norms[0].device, dtype=norms[0].dtype)
            return hvd.allreduce_async(local, name=self.stats_name, op=opt.op, process_set=opt.process_set)
        # In the gradients' dtype (float32 for float32/half gradients) and with their op and factors
        # (Average or Sum, 1.0/1.0 without gradient_predivide_factor), so that Horovod fuses this small
        # tensor with the step's last gradients into the same allreduce instead of running another one.
        local = torch.stack(norms).square_()
        return hvd.allreduce_async(local, name=self.stats_name, op=opt.op, process_set=opt.process_set)

    def finish_step(self, opt, handle) -> None:
        moments = self.moments
        k, (w1, w2) = self._step_k, self._step_weights
        self.reset()
        if self.training_pass:
            k = opt.process_set.size()
            stats = hvd.synchronize(handle).double()                     # [sum over ranks | count]
            if opt.op == hvd.Average:
                stats = stats * k
            moments.set_reduced(stats)
            if opt.op == hvd.Average:
                moments.finish_step()      # ||G_k||^2 from .grad = passes x grad_scale x the mean gradient
            else:
                # op Sum: .grad is K x passes x grad_scale times the step's mean gradient G; its squared
                # norms divided by the square of that factor are ||G_k||^2 (no copy of any gradient)
                moments.finish_step(mean_grad_sq=moments.mean_grad_sq_of(
                    _sq_norms([p.grad for p in moments.params]), factor=k))
            self.last_update = {"count": float(stats[-1]), "skipped": False}
            return
        sq_sum = hvd.synchronize(handle).double()                        # sum_k ||g_k||^2
        if opt.op == hvd.Average:
            sq_sum = sq_sum * k
        reduced = _sq_norms([p.grad for p in moments.params]).to(sq_sum.device)  # ||reduced||^2
        if opt.op == hvd.Sum:  # the Sum allreduce returns K * M
            reduced = reduced / float(k * k)
        if k == 1:
            # only reachable in an elastic job that shrank to one worker (refused at construction otherwise)
            if not self._warned_single_rank:
                warnings.warn("lb_dist.horovod: the job runs on a single rank; the micro-batch statistics "
                              "need >= 2 ranks, so moments keeps its last estimate until the job grows",
                              RuntimeWarning, stacklevel=3)
                self._warned_single_rank = True
            b = self.micro_batch_size if self.micro_batch_size is not None else moments.micro_batch_size
            inv = 1.0 / (self.grad_scale * self.grad_scale)
            self.last_update = {"micro_sq_sum": sq_sum * inv, "num_micro_batches": k, "micro_batch_size": b,
                                "weighted_mean_sq": reduced * inv, "weights": (w1, w2), "mean_sq": None,
                                "skipped": True, "reason": "single rank"}
            return
        # ||M||^2 with M = sum_k pi_k g_k; non-finite statistics (an AMP step whose gradients overflowed)
        # and degenerate weights skip the update
        self.feed(sq_sum, k, reduced, (w1, w2))

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The mix's and the estimator's state (for checkpoints and elastic sync)."""
        return {"gradient_mix": None if self.mix is None else self.mix.state_dict(),
                "moments": None if self.moments is None else self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("gradient_mix", "moments"):
            if key not in state:
                raise KeyError(f"lb_dist.horovod state is missing {key!r}")
        for key, obj in (("gradient_mix", self.mix), ("moments", self.moments)):
            if (state[key] is None) != (obj is None):
                raise ValueError(f"lb_dist.horovod state has {key}={'None' if state[key] is None else 'a state'} "
                                 f"but this optimizer has {key}={'None' if obj is None else 'one'}")
            if obj is not None:
                obj.load_state_dict(state[key])
        self.reset()


def _before_submit(optimizer, params) -> None:
    """Horovod is about to compress and submit the gradients of ``params`` (see the module docstring)."""
    optimizer.lb_dist_state.before_reduce(optimizer, params)


class _Overrides:
    """Methods merged over Horovod's ``_DistributedOptimizer`` methods in the run-time class."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                 gradient_predivide_factor, groups, sparse_as_dense, process_set, lb_dist_state):
        horovod_method("__init__")(self, params, named_parameters, compression, backward_passes_per_step, op,
                         gradient_predivide_factor, groups, sparse_as_dense, process_set)
        self.lb_dist_state = lb_dist_state
        self._lb_dist_in_step = False
        self._lb_dist_initialized = False
        # The param-group keys a load_state_dict adds (torch's __setstate__: "differentiable" and the
        # class defaults) are added now, so that a rank that loaded a checkpoint and a fresh one have
        # the same keys: hvd.broadcast_optimizer_state broadcasts the options key by key.
        # (exactly what torch's load_state_dict runs; not __getstate__, which drops what a copy must
        # not share, such as CLARS' estimator)
        self.__setstate__({"state": self.state, "param_groups": self.param_groups})
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def synchronize(self):
        _adopt_broadcast_section(self)
        self._lb_dist_synchronize()
        if self.sparse_as_dense and _refuses_sparse(self):
            # Horovod reduces sparse gradients densely and then makes them sparse again, which the
            # layer-wise optimizers refuse: they get the dense reduced gradient (same values).
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and p.grad.is_sparse:
                        p.grad = p.grad.to_dense()

    def _lb_dist_synchronize(self):
        st = self.lb_dist_state
        if not self.process_set.included() or not (st.collects or st.mixing()):
            return horovod_method("synchronize")(self)
        handles = pending_handles(self)
        if synchronized(self) and not handles:
            # A second synchronize() before step(): Horovod would reduce the reduced gradients again,
            # which would mix them twice. They are already final.
            return None
        if not requires_update(self) and not handles and st.mixing():
            # One non-elastic rank: Horovod registered no gradient hooks and reduces nothing. The mix
            # still applies its coefficient pi_0 (K = 1: 1 + std xi_0) to the rank's gradient, as under
            # DDP, DeepSpeed and an elastic job that shrank to one rank, so one configuration trains
            # the same way on every backend.
            st.before_reduce(self, [p for group in self.param_groups for p in group["params"]
                                    if p.requires_grad])
        # What Horovod's synchronize submits first (parameters whose hook did not fire, or fired
        # fewer than backward_passes_per_step times), submitted here so that every local norm is
        # known before the statistics' allreduce starts.
        completed = set()
        for x in handles.keys():
            completed.update(x) if isinstance(x, tuple) else completed.add(x)
        for p in requires_update(self) - completed:
            handles[p] = submit(self, p)
        for p, (handle, _ctx) in list(handles.items()):
            if handle is None:
                handles[p] = submit(self, p)
        stats = None
        if st.collects:
            stats = st.stats_handle if st.stats_handle is not None else st.launch_stats(self)
        try:
            horovod_method("synchronize")(self)
        except BaseException:
            st.reset()
            raise
        if stats is not None:
            st.finish_step(self, stats)   # resets the step
        else:
            st.reset()
        return None

    def step(self, closure=None):
        _adopt_broadcast_section(self)
        self._lb_dist_in_step = True     # tells the class step (_init_step_shim) that this is a real step
        try:
            return horovod_method("step")(self, closure)
        finally:
            self._lb_dist_in_step = False

    # torch's Optimizer._patch_step_function (run by Optimizer.__init__ and by __setstate__, i.e. by
    # every load_state_dict) wraps a class's step, unless marked hooked, in a function that runs the
    # step pre/post hooks. The user's class step, which this one calls, already does: marking it
    # keeps the hooks (GradientMix.attach) at once per step. hvd.DistributedOptimizer runs them twice.
    step.hooked = True

    def set_backward_passes_per_step(self, passes, micro_batch_size=None):
        """Horovod's, plus: with ``moments`` a changed number of passes needs the new
        ``micro_batch_size`` (local batch per pass x passes), or the statistics' b would be stale."""
        st = self.lb_dist_state
        if st.moments is not None and not st.training_pass and passes != self.backward_passes_per_step:
            if micro_batch_size is None:
                raise ValueError(f"micro_batch_size is required when changing backward_passes_per_step from "
                                 f"{self.backward_passes_per_step} to {passes} with moments: pass "
                                 f"set_backward_passes_per_step({passes}, micro_batch_size=local batch per pass "
                                 f"x {passes})")
        if micro_batch_size is not None:
            if st.moments is None:
                raise ValueError("micro_batch_size is only used with moments")
            check_positive_int("micro_batch_size", micro_batch_size)
        horovod_method("set_backward_passes_per_step")(self, passes)
        if micro_batch_size is not None:
            st.micro_batch_size = micro_batch_size

    def state_dict(self):
        """torch's ``state_dict`` (with ``["lb_dist"]``: the mix's and the estimator's state), whose
        ``"lb_dist"`` section is also an option of the first param group: ``hvd.broadcast_optimizer_state``
        broadcasts param-group options, so the mix step and the estimator reach every rank with it."""
        _adopt_broadcast_section(self)
        sd = super(self.__class__, self).state_dict()
        section = sd.get(LB_DIST_KEY)
        if section is not None and sd["param_groups"]:
            sd["param_groups"][0] = {**sd["param_groups"][0], LB_DIST_KEY: section}
            if not sd["state"] and self._lb_dist_initialized and self.param_groups[0]["params"]:
                # a stateless optimizer after Horovod's initializing step: one empty entry, so that
                # hvd.broadcast_optimizer_state does not stop before broadcasting the options
                sd["state"] = {0: {}}
        return sd

    def load_state_dict(self, state_dict, *args, **kwargs):
        self.lb_dist_state.reset()
        return horovod_method("load_state_dict")(self, _without_group_section(state_dict), *args, **kwargs)

    def zero_grad(self, set_to_none: bool = True):
        if pending_handles(self):
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() "
                                 "but before optimizer.step() or optimizer.synchronize(). "
                                 "This is prohibited as it can cause a race condition.")
        return super(self.__class__, self).zero_grad(set_to_none)


def _refuses_sparse(optimizer) -> bool:
    from lb_dist.optim import LayerwiseOptimizer
    return isinstance(optimizer, LayerwiseOptimizer)


def _without_group_section(state_dict):
    """``state_dict`` with the "lb_dist" param-group option (see ``state_dict``) taken out of its groups
    (kept, or moved to, the top-level ``"lb_dist"`` key that the optimizer's load hooks read)."""
    key = LB_DIST_KEY
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not groups or not any(isinstance(g, dict) and key in g for g in groups):
        return state_dict
    sd = dict(state_dict)
    section = next(g[key] for g in groups if isinstance(g, dict) and key in g)
    sd["param_groups"] = [{k: v for k, v in g.items() if k != key} for g in groups]
    sd.setdefault(key, section)
    return sd


def _adopt_broadcast_section(optimizer) -> None:
    """After ``hvd.broadcast_optimizer_state`` every rank's first param group holds root's "lb_dist"
    option (the mix's and the estimator's state): load it into the linked objects and take it out."""
    groups = optimizer.param_groups
    if groups and LB_DIST_KEY in groups[0]:
        load_section(optimizer, groups[0].pop(LB_DIST_KEY), "hvd.broadcast_optimizer_state")
        optimizer.lb_dist_state.reset()


def _zero_grads(optimizer) -> bool:
    """Every trainable parameter has an all-zero gradient (what hvd.broadcast_optimizer_state sets)."""
    seen = False
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            if p.grad is None or (p.grad.is_sparse and sparse_nnz(p.grad) and bool(p.grad.coalesce().values().any())) \
                    or (not p.grad.is_sparse and bool(p.grad.any())):
                return False
            seen = True
    return seen


def _init_step_shim(user_cls):
    """The class ``step`` between the user's optimizer class and Horovod's methods. Horovod's
    ``broadcast_optimizer_state`` calls it directly (``super(type(opt), opt).step()``) on zero
    gradients to create the state of an optimizer that has none; lb_dist's own ``step`` calls it with
    ``_lb_dist_in_step`` set. That initializing step is recognized and only creates the state a first
    step would find: lb_dist's optimizers run their ``init_state()``; any other optimizer runs its
    step without step hooks (no GradientMix draw) and without weight decay, its parameters put back
    and step counts reset to 0 (zero buffers: a next step equal to a first one for SGD without
    dampening, Adam/AdamW, Adagrad, RMSprop). The mix, the estimator and the weights are untouched
    (a CLARS estimator is not even read)."""
    def step(self, closure=None):
        if closure is not None or self.__dict__.get("_lb_dist_in_step") or any(self.state.values()) \
                or not _zero_grads(self):
            return user_cls.step(self, closure)
        init = getattr(self, "init_state", None)
        if callable(init):
            init()
        else:
            raw = user_cls.step
            if getattr(raw, "hooked", False) and hasattr(raw, "__wrapped__"):
                raw = raw.__wrapped__       # torch's wrapper that runs the step hooks
            params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
            saved = [p.detach().clone() for p in params]
            decays = [group.get("weight_decay") for group in self.param_groups]
            for group in self.param_groups:      # zero gradients, no decay: zero moment buffers
                if "weight_decay" in group:
                    group["weight_decay"] = 0.0
            try:
                raw(self)
            finally:
                for group, wd in zip(self.param_groups, decays):
                    if wd is not None:
                        group["weight_decay"] = wd
                with torch.no_grad():
                    for p, w in zip(params, saved):
                        p.copy_(w)
            for st in self.state.values():
                if "step" in st:
                    st["step"] = st["step"].zero_() if torch.is_tensor(st["step"]) else 0
        self._lb_dist_initialized = True
        return None
    step.hooked = True
    return step


def _passes_above_one(passes) -> bool:
    try:
        return passes > 1
    except TypeError:   # Horovod's own check reports a wrong type
        return False


def _check_lb_args(optimizer, op, process_set, gradient_mix, moments, micro_batch_size,
                   backward_passes_per_step=1) -> None:
    check_device_mix("gradient_mix", gradient_mix, "the allreduce")
    training_pass = isinstance(moments, TrainingPassMoments)
    if training_pass:
        if gradient_mix is not None and gradient_mix.noise != "none":
            raise ValueError("moments=TrainingPassMoments with gradient_mix: its per-sample gradients average "
                             "to the unmixed gradient, not to the mixed one the optimizer uses (the rule of "
                             "lb_dist.ddp); use plain averaging (gradient_mix=None)")
        if micro_batch_size is not None:
            raise ValueError("micro_batch_size is not used with moments=TrainingPassMoments (it counts the "
                             "samples of its forward passes itself)")
    else:
        check_micro_batch_moments("moments", moments)
    if moments is not None:
        own = {id(p): p for g in optimizer.param_groups for p in g["params"]}
        for i, p in enumerate(moments.params):
            if id(p) not in own:
                raise ValueError(f"moments.params[{i}] is not a parameter of optimizer: build the "
                                 f"MicroBatchMoments from the parameters the optimizer updates")
            if not p.requires_grad:
                raise ValueError(f"moments.params[{i}] does not require grad: Horovod never reduces its "
                                 f"gradient, so the estimator could not be fed")
        if not training_pass and micro_batch_size is None and moments.micro_batch_size is None:
            raise ValueError("micro_batch_size is required with moments (samples behind one rank's gradient "
                             "of a step: local batch x backward_passes_per_step), unless the "
                             "MicroBatchMoments was given one")
        if not training_pass and micro_batch_size is None and _passes_above_one(backward_passes_per_step):
            raise ValueError(f"micro_batch_size is required with moments and backward_passes_per_step="
                             f"{backward_passes_per_step}: one rank's gradient of a step accumulates "
                             f"{backward_passes_per_step} passes, so pass micro_batch_size=local batch per pass "
                             f"x backward_passes_per_step (moments.micro_batch_size="
                             f"{moments.micro_batch_size} is not used, it usually is the per-pass batch)")
    if micro_batch_size is not None:
        if moments is None:
            raise ValueError("micro_batch_size is only used with moments; pass moments=MicroBatchMoments(...)")
        check_positive_int("micro_batch_size", micro_batch_size)
    if gradient_mix is None and moments is None:
        return
    what = " and ".join(n for n, v in (("gradient_mix", gradient_mix), ("moments", moments)) if v is not None)
    if op == hvd.Adasum:
        raise ValueError(f"op=hvd.Adasum cannot be combined with {what}: Adasum reduces each rank's parameter "
                         f"update (a scale-invariant pairwise combination), not an average of gradients, so "
                         f"neither sum_k pi_k g_k nor the micro-batch statistics are defined for it; use "
                         f"op=hvd.Average (or hvd.Sum)")
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError(f"op={_op_name(op)} cannot be combined with {what}: mixing and the statistics are "
                         f"defined for op=hvd.Average (reduced gradient sum_k pi_k g_k) and op=hvd.Sum "
                         f"(K sum_k pi_k g_k)")
    k = process_set.size() if process_set.included() else None
    if gradient_mix is not None and gradient_mix.world_size is not None and k is not None \
            and gradient_mix.world_size != k:
        raise ValueError(f"gradient_mix.world_size={gradient_mix.world_size} but Horovod's process set has {k} "
                         f"ranks; use GradientMix(world_size=None) to follow the job's size")
    if moments is not None and training_pass and k == 1 and os.environ.get("HOROVOD_ELASTIC") != "1":
        raise ValueError("moments=TrainingPassMoments on a single-rank Horovod job: Horovod reduces nothing "
                         "there; give moments=None and call moments.finish_step() after the backward passes, "
                         "as in one process")
    if moments is not None and not training_pass and k == 1 and os.environ.get("HOROVOD_ELASTIC") != "1":
        raise MomentsUnavailableError(
            "moments: the micro-batch statistics compare the K ranks' gradients and this Horovod job has a "
            "single rank; in one process use MicroBatchMoments.track_backward() with gradient accumulation, "
            "or lb_dist.moments.per_sample_second_moments")


def DistributedOptimizer(optimizer, named_parameters=None,
                         compression=hvd.Compression.none,
                         backward_passes_per_step=1,
                         op=hvd.Average,
                         gradient_predivide_factor=1.0,
                         num_groups=0, groups=None,
                         sparse_as_dense=False,
                         process_set=hvd.global_process_set,
                         *, gradient_mix: GradientMix | None = None,
                         moments: MicroBatchMoments | TrainingPassMoments | None = None,
                         micro_batch_size: int | None = None):
    """``hvd.DistributedOptimizer`` with device-wise GradientMix and micro-batch statistics.

    The positional arguments are exactly ``horovod.torch.DistributedOptimizer``'s (0.28.1), with the
    same meaning and defaults; Horovod's own argument checks run unchanged. Additional keywords:

    Args:
        gradient_mix: a device-wise :class:`lb_dist.GradientMix`: rank k's gradient is scaled by
            ``K*pi_k`` before Horovod's allreduce, so ``op=hvd.Average`` yields ``sum_k pi_k g_k``
            (paper eq. 3) and ``op=hvd.Sum`` yields ``K sum_k pi_k g_k``. Noise ``"none"``: bitwise
            ``hvd.DistributedOptimizer``. If the mix is not attached to an optimizer yet, it is
            attached to the returned one (``mix.attach``: one new draw per ``step()``).
        moments: a :class:`lb_dist.moments.MicroBatchMoments` over parameters of ``optimizer``, fed
            once per step from the ranks' local gradients (one extra small allreduce submission per
            step, named ``"lb_dist.horovod.layer_sq_norms.<first tracked parameter's name>"`` so that
            several such optimizers can share one backward). Or a
            :class:`lb_dist.moments.TrainingPassMoments` over parameters of ``optimizer``: its
            ``[per-sample sums | count]`` leave in that same submission, and ``synchronize()`` (run by
            ``step()``) closes its step (``finish_step``: exact S_k, no collective of its own); set its
            ``grad_scale`` (``1/backward_passes_per_step`` for the mean over the passes); refused with
            a mixing ``gradient_mix`` and with ``micro_batch_size``.
        micro_batch_size: samples behind one rank's gradient of one step (local batch per pass times
            ``backward_passes_per_step``). Defaults to ``moments.micro_batch_size`` only when
            ``backward_passes_per_step == 1``; required with ``moments`` when it is larger.

    Returns:
        an instance of a run-time subclass of ``type(optimizer)`` (``isinstance(result,
        type(optimizer))``), built like Horovod's from Horovod's methods. Unlike Horovod's, it takes
        over ``optimizer``'s attributes (constructor arguments such as ``CLARS(lr=..., moments=...)``,
        state, step hooks) instead of re-running the constructor with defaults, and runs optimizer
        step hooks once per ``step()`` (Horovod's runs them twice under torch >= 2.0). Use the
        returned object from then on, not ``optimizer``. ``result.lb_dist_state`` is the
        :class:`GradientMixState` (``last_update``, ``grad_scale``).

    ``op=hvd.Adasum`` without mix and moments returns Horovod's own Adasum optimizer; with either
    it is refused, as are ``hvd.Min``, ``hvd.Max`` and ``hvd.Product``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    check_horovod_version()         # before Horovod's internals are read (lb_dist._vendor.horovod)
    if is_horovod_optimizer(optimizer):
        raise ValueError("optimizer is already a Horovod DistributedOptimizer (hvd.DistributedOptimizer or "
                         "lb_dist.horovod.DistributedOptimizer); wrap the plain optimizer once")
    _check_lb_args(optimizer, op, process_set, gradient_mix, moments, micro_batch_size, backward_passes_per_step)
    if op == hvd.Adasum and hvd.size() > 1:
        return hvd.DistributedOptimizer(optimizer, named_parameters, compression, backward_passes_per_step, op,
                                        gradient_predivide_factor, num_groups, groups, sparse_as_dense,
                                        process_set)
    # Horovod's own preamble (horovod/torch/optimizer.py, DistributedOptimizer)
    if gradient_predivide_factor != 1.0:
        if hvd.rocm_built():
            raise ValueError('gradient_predivide_factor not supported yet with ROCm')
        if op != hvd.Average:
            raise ValueError('gradient_predivide_factor not supported with op != Average')
    if num_groups != 0:
        warnings.warn('Parameter `num_groups` has been replaced by `groups` '
                      'and will be removed in v0.23.0.', DeprecationWarning, stacklevel=2)
        if groups is None:
            groups = num_groups
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")

    user_cls = optimizer.__class__

    def adopt(self, params):
        # Stands in for user_cls.__init__ in Horovod's constructor (which would call it with the param
        # groups only): take over the configured optimizer's attributes. Instance attributes that
        # shadow methods (e.g. an lr_scheduler's wrapper of optimizer.step, bound to `optimizer`)
        # are left out.
        for key, value in optimizer.__dict__.items():
            if callable(value) and hasattr(user_cls, key):
                continue
            self.__dict__[key] = value

    shim = type(user_cls.__name__, (user_cls,), {"__init__": adopt, "step": _init_step_shim(user_cls),
                                                 "__module__": __name__, "__qualname__": user_cls.__qualname__})
    overrides = {k: v for k, v in _Overrides.__dict__.items() if k not in ("__dict__", "__weakref__", "__doc__")}
    cls = optimizer_class(user_cls.__name__, user_cls.__name__, user_cls.__doc__, shim, overrides, _before_submit)
    state = GradientMixState(gradient_mix, moments, micro_batch_size)
    result = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
                 gradient_predivide_factor, groups, sparse_as_dense, process_set, state)
    if moments is not None:
        state.stats_name = _stats_name(parameter_names(result), moments)
    if gradient_mix is not None and not gradient_mix.attached:
        gradient_mix.attach(result)
    if moments is not None and hasattr(moments, "link_optimizer_state"):
        moments.link_optimizer_state(result)
    return result
