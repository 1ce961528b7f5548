"""DeepSpeed's CPU shared-memory all-reduce op, which training does not use: lb_dist keeps
``deepspeed.init_distributed`` from JIT-compiling it.

On DeepSpeed's CPU accelerator, ``deepspeed.comm``'s torch backend loads the op
``deepspeed_shm_comm`` in every process that initializes DeepSpeed's communication; the first load
compiles it with ninja (minutes on two cores) into torch's extension cache. DeepSpeed calls it only
from ``inference_all_reduce``, i.e. from its tensor-parallel layers (``deepspeed.module_inject``:
DeepSpeed-Inference and AutoTP, which lb_dist refuses); a data-parallel engine's reductions are
torch.distributed's. Building it is minutes of compile for nothing, and it was this
project's one source of hangs: inside a 2-rank job one rank recompiled the op while its peer waited on
torch's build lock until the job's time ran out, a killed build leaves a lock file that stalls every
later job, and a CI run stalled in the build itself.

:func:`skip_shm_comm_op` marks the op incompatible in DeepSpeed's own table of compatible ops
(``deepspeed.ops.__compatible_ops__``, the table ``deepspeed.comm.torch.build_shm_op`` consults), so
DeepSpeed falls back to torch.distributed's all-reduce there, exactly as on a machine without a
compiler. lb_dist calls it in :func:`lb_dist.deepspeed.initialize`, :func:`lb_dist.deepspeed.register`
and ``lb-dist train --backend deepspeed``, before DeepSpeed initializes its communication. It changes
nothing on CUDA (DeepSpeed does not use the op there) and nothing once the backend exists.

Set ``LB_DIST_DEEPSPEED_SHM_COMM=1`` to keep DeepSpeed's default (for DeepSpeed-Inference or AutoTP
on CPU in the same process); ``python -m lb_dist.deepspeed.prebuild`` then builds the op once ahead of time.
"""
from __future__ import annotations

import os

ENV_KEEP = "LB_DIST_DEEPSPEED_SHM_COMM"
OP_NAME = "deepspeed_shm_comm"


def keep_requested() -> bool:
    """True when ``LB_DIST_DEEPSPEED_SHM_COMM`` asks for DeepSpeed's default (``1``/``true``/``yes``).
    Any other non-empty value than ``0``/``false``/``no`` is an error naming the variable."""
    value = os.environ.get(ENV_KEEP, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"{ENV_KEEP}={os.environ[ENV_KEEP]!r}: expected 1 (keep DeepSpeed's CPU shared-memory "
                     f"comm op) or 0 (skip it, lb_dist's default)")


def skip_shm_comm_op() -> bool:
    """Keep DeepSpeed from building/loading ``deepspeed_shm_comm`` at its next communication set-up.
    Returns True when the op was marked incompatible (DeepSpeed's CPU accelerator, not opted out),
    False when nothing was changed. Idempotent."""
    if keep_requested():
        return False
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return False
    from lb_dist._vendor.deepspeed import mark_op_incompatible
    mark_op_incompatible(OP_NAME)
    return True
