"""Build (or load from the cache) DeepSpeed's CPU shared-memory comm op once, ahead of time, for
users who keep it (``LB_DIST_DEEPSPEED_SHM_COMM=1``, see :mod:`lb_dist.deepspeed.cpu_comm`).

    LB_DIST_DEEPSPEED_SHM_COMM=1 python -m lb_dist.deepspeed.prebuild

lb_dist skips this op by default (training never uses it), and then nothing needs building. With the
op kept, ``deepspeed.comm``'s torch backend loads ``deepspeed_shm_comm``
(``deepspeed.ops.op_builder.cpu.ShareMemCommBuilder``) in every process that initializes
DeepSpeed's communication; the first load compiles it with ninja (minutes on two cores) into torch's
extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Running this
module once pays that cost in one process, outside a multi-rank job (whose ranks would otherwise
serialise on torch's build lock). It is idempotent: with the op cached it only loads it. Where
DeepSpeed reports the op as incompatible (no compiler, not Linux) nothing is built.

On a CUDA machine DeepSpeed does not use this op; nothing is built (exit status 0).
Exit status 1 only when DeepSpeed is not installed or the build fails.
"""
from __future__ import annotations

import sys
import time


def prebuild(verbose: bool = False) -> list[str]:
    """Build/load the JIT ops DeepSpeed would build at ``deepspeed.init_distributed`` here.
    Returns the names of the ops that are now loadable."""
    import deepspeed  # noqa: F401  (sets up the accelerator)
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    built = []
    accel = get_accelerator()
    builder = accel.create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return built
    if not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return built
    builder.load(verbose=verbose)
    built.append(builder.NAME)
    return built


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    start = time.perf_counter()
    try:
        built = prebuild(verbose=verbose)
    except ImportError as exc:
        print(f"lb_dist.deepspeed.prebuild: DeepSpeed is not installed ({exc}); "
              f"install the extra: pip install -e '.[deepspeed]'", file=sys.stderr)
        return 1
    except Exception as exc:  # a compiler error: say so, with DeepSpeed's message
        print(f"lb_dist.deepspeed.prebuild: building DeepSpeed's JIT ops failed: {exc}", file=sys.stderr)
        return 1
    took = time.perf_counter() - start
    what = ", ".join(built) if built else "nothing (no JIT op is used on this machine)"
    print(f"lb_dist.deepspeed.prebuild: {what} ready ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
