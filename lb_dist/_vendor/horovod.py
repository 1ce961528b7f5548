"""Every Horovod internal lb_dist reads or overrides, in one place (tested: Horovod 0.28.1).

``hvd.DistributedOptimizer`` builds its optimizer class at run time from the methods of
``horovod.torch.optimizer._DistributedOptimizer``; lb_dist builds its class the same way
(:func:`optimizer_class`) and wraps Horovod's two private submission methods
(``_allreduce_grad_async`` / ``_grouped_allreduce_grad_async``), which Horovod's gradient hooks and its
``synchronize()`` call, so that lb_dist sees each gradient before Horovod compresses and submits it.
Horovod offers no public hook there: its ``Compression`` objects see a gradient but not its parameter.
The optimizer's bookkeeping of submitted gradients (``_handles``, ``_requires_update``,
``_synchronized``, ``_parameter_names``) and the elastic handler lookup (``_get_handler``) are read
through the accessors below.

:func:`check_horovod_version` refuses a release outside :data:`SUPPORTED_HOROVOD`
(``LB_DIST_HOROVOD_UNTESTED=1``: a warning); ``lb_dist.horovod.DistributedOptimizer`` and
``ElasticState`` call it.
"""
from __future__ import annotations

import horovod
from horovod.torch.elastic.state import _get_handler
from horovod.torch.optimizer import _DistributedOptimizer

from lb_dist._vendor import check_version

__all__ = ["SUPPORTED_HOROVOD", "ENV_HOROVOD_UNTESTED", "check_horovod_version", "horovod_method", "optimizer_class",
           "submit", "pending_handles", "requires_update", "synchronized", "parameter_names",
           "is_horovod_optimizer", "state_handler"]

#: The Horovod releases whose internals lb_dist reads, as a pip specifier; tested: 0.28.1.
SUPPORTED_HOROVOD = ">=0.28.1,<0.29"
ENV_HOROVOD_UNTESTED = "LB_DIST_HOROVOD_UNTESTED"

# Horovod's own methods, called explicitly from lb_dist's overrides (plain functions in the class dict).
_HVD = {k: v for k, v in _DistributedOptimizer.__dict__.items() if k not in ("__dict__", "__weakref__")}


def check_horovod_version(version: str | None = None) -> str:
    """Refuse a Horovod outside :data:`SUPPORTED_HOROVOD` (default: the installed ``horovod.__version__``),
    naming the range; ``LB_DIST_HOROVOD_UNTESTED=1``: a warning. Returns the version."""
    return check_version("lb_dist.horovod", "Horovod", "horovod", version or str(horovod.__version__),
                         SUPPORTED_HOROVOD, ENV_HOROVOD_UNTESTED,
                         "the internals of Horovod's DistributedOptimizer, tested with 0.28.1")


def horovod_method(name: str):
    """Horovod's own ``_DistributedOptimizer`` method ``name`` (a plain function: call it with the
    optimizer as first argument)."""
    return _HVD[name]


def optimizer_class(name: str, qualname: str, doc: str | None, base: type, overrides: dict,
                    before_submit) -> type:
    """The run-time optimizer class ``hvd.DistributedOptimizer`` would build over ``base``, with the
    methods in ``overrides`` over Horovod's and ``before_submit(optimizer, params)`` run before Horovod
    compresses and submits the gradients of ``params`` (one parameter, or a group with ``groups``)."""
    def _allreduce_grad_async(self, p):
        before_submit(self, (p,))
        return _HVD["_allreduce_grad_async"](self, p)

    def _grouped_allreduce_grad_async(self, ps):
        before_submit(self, ps)
        return _HVD["_grouped_allreduce_grad_async"](self, ps)

    body = dict(_HVD)
    body.update(overrides)
    body["_allreduce_grad_async"] = _allreduce_grad_async
    body["_grouped_allreduce_grad_async"] = _grouped_allreduce_grad_async
    # Horovod's broadcast_optimizer_state recognizes its optimizers by this module name and then steps
    # the wrapped class directly (no allreduce) to initialize an empty state.
    body["__module__"] = _DistributedOptimizer.__module__
    body["__doc__"] = doc
    body["__qualname__"] = qualname
    return type(name, (base,), body)


def submit(optimizer, p):
    """Submit ``p``'s gradient now (as Horovod's ``synchronize`` does for late ones); returns the handle."""
    return optimizer._allreduce_grad_async(p)


def pending_handles(optimizer) -> dict:
    """Horovod's ``{parameter or group tuple: (handle, ctx)}`` of the gradients submitted this step (the
    live dict: lb_dist adds the late submissions to it, as Horovod's ``synchronize`` does)."""
    return optimizer._handles


def requires_update(optimizer) -> set:
    """The parameters Horovod registered gradient hooks for."""
    return optimizer._requires_update


def synchronized(optimizer) -> bool:
    """Whether ``synchronize()`` already ran for the current gradients."""
    return optimizer._synchronized


def parameter_names(optimizer) -> dict:
    """Horovod's ``{parameter: name}`` of the optimizer (the names its allreduces carry)."""
    return optimizer._parameter_names


def is_horovod_optimizer(optimizer) -> bool:
    """An ``hvd.DistributedOptimizer`` (or lb_dist's), plain or Adasum."""
    return hasattr(optimizer, "_allreduce_grad_async") or hasattr(optimizer, "_starting_models")


def state_handler(value):
    """``hvd.elastic.TorchState``'s handler for ``value`` (model, optimizer, sampler), or None."""
    return _get_handler(value)
