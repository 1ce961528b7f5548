"""Every torch internal lb_dist reads, in one place (tested: torch 2.13).

* FSDP2's parameter layout (``FSDPModule._get_fsdp_state()._fsdp_param_groups``: the order and padded
  chunk size of a module's gradients in the reduce-scatter input) and its reduce-scatter base class
  (``torch.distributed.fsdp._fully_shard._fsdp_api.ReduceScatter``, the type
  ``FSDPModule.set_custom_reduce_scatter`` expects), behind :func:`check_fsdp_version`
  (``LB_DIST_TORCH_UNTESTED=1``: a warning): FSDP2 is young and its private layout can change;
* long-stable private names with no public equivalent: ``torch._foreach_norm`` (one kernel for many
  norms; ``torch.linalg.vector_norm`` per tensor is the public fallback, many times slower),
  ``torch.nn.modules.batchnorm._BatchNorm`` (the base class of BatchNorm1d/2d/3d and SyncBatchNorm),
  ``Tensor._base`` (the base of a view), ``Tensor._nnz()`` (stored elements of a sparse COO tensor),
  ``_ConvNd._reversed_padding_repeated_twice`` (a convolution's padding in ``F.pad`` order), the
  autograd engine's ``queue_callback`` (run once at the end of the current backward) and the module
  hook dictionaries (:class:`module_hooks_suspended`);
* DTensor's ``_StridedShard`` placement (:data:`StridedShard`: a ``Shard`` that FSDP2 over tensor
  parallelism produces; its local pieces are distinct parts of the tensor like ``Shard``'s) and a
  DTensor's local tensor itself (:func:`dtensor_local`: ``DTensor._local_tensor``).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from lb_dist._vendor import check_version

__all__ = ["foreach_norm", "BatchNormBase", "view_base", "sparse_nnz", "conv_padding", "queue_backward_callback",
           "module_hooks_suspended", "FSDPModule", "ReduceScatterBase", "fsdp_layout", "check_fsdp_version",
           "SUPPORTED_TORCH_FSDP", "ENV_TORCH_UNTESTED", "StridedShard", "dtensor_local"]

#: Per-tensor L2 norms of a list of tensors in one kernel (``torch._foreach_norm``).
foreach_norm = torch._foreach_norm

try:
    from torch.distributed.tensor.placement_types import _StridedShard as StridedShard
except ImportError:  # pragma: no cover - torch without DTensor or an older release
    StridedShard = None
"""DTensor's strided ``Shard`` placement class, or None where this torch has none."""


def dtensor_local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (``t._local_tensor``): what ``t.to_local()`` returns outside autograd,
    except that for a DTensor ``nn.Parameter`` (FSDP2's sharded parameters) ``to_local()`` makes a new
    view at every call (torch 2.13, gh-166156: to mark it a Parameter), which an optimizer step paid
    once per parameter per step. In-place updates of either reach the same storage. Under
    ``torch.compile``: ``to_local()``, which dynamo traces."""
    if torch.compiler.is_compiling():
        return t.to_local()
    return t._local_tensor

#: The base class of every BatchNorm module (``torch.nn.modules.batchnorm._BatchNorm``).
BatchNormBase = _BatchNorm


def view_base(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``t`` is a view of (``t._base``), None when ``t`` is not a view."""
    return t._base


def sparse_nnz(t: torch.Tensor) -> int:
    """Stored elements of a sparse COO tensor (``t._nnz()``)."""
    return t._nnz()


def conv_padding(module) -> tuple:
    """A convolution module's padding in ``F.pad`` order (``module._reversed_padding_repeated_twice``)."""
    return module._reversed_padding_repeated_twice


def queue_backward_callback(callback) -> None:
    """Run ``callback()`` once when the current backward pass ends (the autograd engine's
    ``queue_callback``; only valid inside a backward, e.g. from a tensor hook)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


class module_hooks_suspended:
    """Every module hook of ``model`` (e.g. DeepSpeed's ZeRO-3 fetch/release hooks) set aside for the
    duration of the block; hooks registered inside the block are dropped with it. torch has no public
    way to disable a module's hooks, so the hook dictionaries are swapped for empty ones."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.saved: list = []

    def __enter__(self):
        for module in self.model.modules():
            for name in _HOOK_DICTS:
                if name in module.__dict__:
                    self.saved.append((module, name, module.__dict__[name]))
                    module.__dict__[name] = OrderedDict()
            if "_is_full_backward_hook" in module.__dict__:
                self.saved.append((module, "_is_full_backward_hook", module.__dict__["_is_full_backward_hook"]))
                module.__dict__["_is_full_backward_hook"] = None
        return self

    def __exit__(self, *exc) -> None:
        for module, name, value in self.saved:
            module.__dict__[name] = value
        self.saved = []


# ------------------------------------------------------------------------------ FSDP2
#: The torch releases whose FSDP2 internals :func:`fsdp_layout` reads, as a pip specifier; tested: 2.13.0.
SUPPORTED_TORCH_FSDP = ">=2.13,<2.14"
ENV_TORCH_UNTESTED = "LB_DIST_TORCH_UNTESTED"

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as ReduceScatterBase
except ImportError:  # pragma: no cover - torch without FSDP2
    FSDPModule = None
    ReduceScatterBase = object


def check_fsdp_version(version: str | None = None) -> str:
    """Refuse a torch outside :data:`SUPPORTED_TORCH_FSDP` for ``lb_dist.fsdp`` (default: the installed
    ``torch.__version__``), naming the range; ``LB_DIST_TORCH_UNTESTED=1``: a warning. Returns the version."""
    return check_version("lb_dist.fsdp", "torch", "torch", version or str(torch.__version__), SUPPORTED_TORCH_FSDP,
                         ENV_TORCH_UNTESTED, "FSDP2's private gradient layout, tested with torch 2.13.0")


def fsdp_layout(module) -> list[list[tuple[torch.Tensor, int, bool]]]:
    """For each FSDP parameter group of ``module`` (one per ``fully_shard`` call without
    ``shard_placement_fn`` meshes), its parameters in reduce-scatter order as ``(sharded parameter, numel
    of one padded rank chunk, offloaded)``. FSDP packs a group's gradients as ``[world, sum_i chunk_i]``:
    row r holds, parameter after parameter, rank r's dim-0 chunk of each (zero padding at the end)."""
    try:
        groups = module._get_fsdp_state()._fsdp_param_groups
        return [[(fp.sharded_param, int(fp.padded_sharded_param_size.numel()), bool(fp.offload_to_cpu))
                 for fp in group.fsdp_params] for group in groups]
    except AttributeError as exc:  # pragma: no cover - a torch whose FSDP2 internals moved
        raise RuntimeError(f"lb_dist.fsdp cannot read this torch's FSDP2 parameter layout ({exc}); "
                           f"tested with torch 2.13") from exc
