"""State for ``hvd.elastic`` and rank-0 broadcasts that cover the optimizer, the mix and the estimator.

``hvd.elastic.TorchState`` handles models and optimizers through handlers; any other keyword becomes a
plain attribute that ``sync()`` REPLACES with rank 0's unpickled copy, which would silently detach a
``GradientMix`` or ``MicroBatchMoments`` from the optimizer that uses it. Its optimizer handler syncs
through ``hvd.broadcast_optimizer_state``, which initializes an empty state by a dummy ``step()`` on
zero gradients (a weight-decay step on the weights for LARS/CLARS; a ``MomentsUnavailableError`` for
CLARS reading an estimator that has no estimate yet).

:class:`ElasticState` is a ``TorchState`` whose optimizers, ``GradientMix`` and ``MicroBatchMoments``
are saved, restored and synced IN PLACE through their ``state_dict``s (rank 0's state broadcast as one
object, no dummy step). An ``lb_dist.horovod.DistributedOptimizer``'s mix and estimator travel with it.
"""
from __future__ import annotations

import copy

import torch
from horovod.common.elastic import ObjectState
from horovod.torch.elastic.state import StateHandler, TorchState
from horovod.torch.functions import broadcast_object
from horovod.torch.mpi_ops import global_process_set, rank

from lb_dist._vendor.horovod import check_horovod_version, state_handler
from lb_dist.mixing import GradientMix
from lb_dist.moments.microbatch import MicroBatchMoments

__all__ = ["ElasticState", "broadcast_optimizer_state", "optimizer_state", "load_optimizer_state"]


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``{"optimizer": optimizer.state_dict(), "lb_dist": mix/estimator state or None}``: everything an
    ``lb_dist.horovod.DistributedOptimizer`` changes while training (usable in checkpoints)."""
    lb = getattr(optimizer, "lb_dist_state", None)
    return {"optimizer": optimizer.state_dict(), "lb_dist": None if lb is None else lb.state_dict()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`optimizer_state` (in place)."""
    for key in ("optimizer", "lb_dist"):
        if key not in state:
            raise KeyError(f"optimizer state is missing {key!r} (expected the output of "
                           f"lb_dist.horovod.optimizer_state)")
    lb = getattr(optimizer, "lb_dist_state", None)
    if (state["lb_dist"] is None) != (lb is None):
        raise ValueError("optimizer state and optimizer disagree on lb_dist: one comes from an "
                         "lb_dist.horovod.DistributedOptimizer and the other does not")
    optimizer.load_state_dict(state["optimizer"])
    if lb is not None:
        lb.load_state_dict(state["lb_dist"])


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0,
                              process_set=global_process_set) -> None:
    """Give every rank ``root_rank``'s optimizer state (and, for an ``lb_dist.horovod``
    optimizer, its GradientMix step and estimator), broadcast as one object.

    Replaces ``hvd.broadcast_optimizer_state`` for lb_dist optimizers: no dummy step on zero
    gradients (which would move LARS/CLARS weights by weight decay, advance an attached mix, and
    fail for CLARS whose estimator has no estimate yet). Every rank of ``process_set`` must call it.
    """
    payload = optimizer_state(optimizer) if rank() == root_rank else None
    payload = broadcast_object(payload, root_rank=root_rank, name="lb_dist.horovod.optimizer_state",
                               process_set=process_set)
    if rank() != root_rank:
        load_optimizer_state(optimizer, payload)


class _OptimizerHandler(StateHandler):
    """Optimizer (+ lb_dist mix and estimator) saved, restored and synced through state_dicts."""

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self.save()

    def save(self):
        self._saved = copy.deepcopy(optimizer_state(self.value))

    def restore(self):
        # a deep copy: torch's load_state_dict keeps the tensors it is given, which the next steps
        # update in place; the saved state must survive for a second restore
        load_optimizer_state(self.value, copy.deepcopy(self._saved))

    def sync(self):
        broadcast_optimizer_state(self.value, root_rank=0)


class _StateDictHandler(StateHandler):
    """A GradientMix or MicroBatchMoments, kept in place (the optimizer holds a reference to it)."""

    def __init__(self, value, name):
        super().__init__(value)
        self._name = name
        self.save()

    def save(self):
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self):
        self.value.load_state_dict(copy.deepcopy(self._saved))

    def sync(self):
        state = self.value.state_dict() if rank() == 0 else None
        state = broadcast_object(state, root_rank=0, name=f"lb_dist.horovod.state.{self._name}")
        if rank() != 0:
            self.value.load_state_dict(state)


class ElasticState(TorchState):
    """``hvd.elastic.TorchState`` for lb_dist training (use it with ``@hvd.elastic.run``).

    Args:
        model: the model (Horovod's handler: ``state_dict`` saved, ``broadcast_parameters`` on sync).
        optimizer: any optimizer; an ``lb_dist.horovod.DistributedOptimizer`` carries its
            GradientMix and MicroBatchMoments along.
        **kwargs: more models/optimizers/ElasticSamplers (Horovod's handlers), ``GradientMix`` and
            ``MicroBatchMoments`` objects not held by the optimizer (e.g. a sample-wise mix), kept in
            place, and plain values (``epoch=0, batch=0``), exposed as attributes like TorchState's.

    ``commit()`` saves everything (and checks for host changes), ``restore()`` (after a failure)
    loads the last commit into the same objects, ``sync()`` (after a reset) gives every worker
    rank 0's state. K is not part of the state: the optimizer reads Horovod's size at every step.
    """

    def __init__(self, model=None, optimizer=None, **kwargs):
        check_horovod_version()
        kwargs.update(dict(model=model, optimizer=optimizer))
        handlers, plain = {}, {}
        for name, value in kwargs.items():
            if isinstance(value, torch.optim.Optimizer):
                handlers[name] = _OptimizerHandler(value)
            elif isinstance(value, (GradientMix, MicroBatchMoments)):
                handlers[name] = _StateDictHandler(value, name)
            else:
                handler = state_handler(value)
                if handler is not None:
                    handlers[name] = handler
                else:
                    plain[name] = value
        self._handlers = handlers
        for name, handler in handlers.items():
            setattr(self, name, handler.value)
        ObjectState.__init__(self, bcast_object=broadcast_object, get_rank=rank, **plain)
