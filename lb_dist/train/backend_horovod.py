"""``--backend horovod``: the training loop under ``horovodrun`` (Gloo or MPI) or ``mpirun``.

Thin by design: the optimizer is wrapped in :func:`lb_dist.horovod.DistributedOptimizer`
(docs/backend-horovod.md), which does device-wise GradientMix and CLARS' micro-batch statistics
inside Horovod's own allreduce path (CLARS' training-pass sums too), with ``backward_passes_per_step`` = the accumulation steps
(Horovod submits each gradient's allreduce on the last micro-batch's backward). The loop's
collectives (metrics, evaluation, the per-sample estimator through ``lb_dist.distributed``) are
Horovod's.
"""
from __future__ import annotations

import torch

from lb_dist.train.backends import Backend, BackendUnavailable, Engine

__all__ = ["HorovodBackend", "HorovodEngine"]


def _hvd():
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise BackendUnavailable(f"--backend horovod needs Horovod with PyTorch support ({e}); run "
                                 f"`scripts/setup.sh dev,horovod` (scripts/install_horovod.sh builds it)") from e
    return hvd


class HorovodEngine(Engine):
    """``lb_dist.horovod.DistributedOptimizer`` around the run's optimizer: gradients are reduced
    (and mixed, and CLARS' statistics collected) by its hooks and ``synchronize()``."""

    def finish_gradients(self) -> None:
        self.optimizer.synchronize()                  # waits for the allreduces; feeds the moments
        super().finish_gradients()

    def _step(self) -> None:
        with self.optimizer.skip_synchronize():       # synchronized in finish_gradients
            self.optimizer.step()

    def before_evaluation(self) -> None:
        # Horovod does not synchronize buffers: each rank's BatchNorm statistics moved with its own
        # batches. Evaluate (and checkpoint) rank 0's, as under torchrun.
        if self.backend.world_size > 1:
            hvd = _hvd()
            hvd.broadcast_parameters(list(self.model.named_buffers()), root_rank=0)


class HorovodBackend(Backend):
    """Horovod's job (``hvd.init()``): rank, size and local rank from horovodrun / mpirun."""

    name = "horovod"
    training_pass_moments = True

    def start(self) -> None:
        hvd = _hvd()
        self._owns_group = not hvd.is_initialized()
        if self._owns_group:
            hvd.init()
        self.rank, self.world_size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        self.device = self._resolve_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def close(self, failed: bool = False) -> None:
        if self._owns_group and not failed:
            hvd = _hvd()
            hvd.barrier()
            hvd.shutdown()

    def prepare(self, model, optimizer, *, mix=None, moments=None, local_batch_size, accumulation_steps, args=None,
                config=None):
        hvd = _hvd()
        import lb_dist.horovod as lbh

        if self.world_size > 1:
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # identical by seeding; Horovod's idiom
        engine = HorovodEngine(self, model, optimizer, mix=mix, moments=moments)
        hvd_moments = moments
        training_pass = moments is not None and not hasattr(moments, "track_backward")
        if moments is not None and self.world_size == 1:
            # one rank: nothing to compare or reduce in the allreduce; as in a single process
            engine.track_accumulation(moments, local_batch_size, accumulation_steps)
            hvd_moments = None
        elif training_pass:
            # TrainingPassMoments: its own hooks measure; its sums leave with the last gradients in Horovod's
            # allreduce and synchronize() closes its step (lb_dist.horovod)
            moments.grad_scale = 1.0 / accumulation_steps
        device_mix = mix if mix is not None and mix.granularity == "device" else None
        engine.optimizer = lbh.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), backward_passes_per_step=accumulation_steps,
            gradient_mix=device_mix, moments=hvd_moments,
            micro_batch_size=local_batch_size if hvd_moments is not None and not training_pass else None)
        return engine

    def all_reduce_sum(self, tensor):
        if self.world_size > 1:
            hvd = _hvd()
            hvd.allreduce_(tensor, op=hvd.Sum)
        return tensor

    # Horovod names an object collective after type(obj) by default and matches ranks by name: an
    # object that is None on some ranks (a path only rank 0 knows) would hang. Fixed names.
    def all_gather_object(self, obj):
        return _hvd().allgather_object(obj, name="lb_dist.train.all_gather_object")

    def broadcast_object(self, obj):
        return _hvd().broadcast_object(obj, root_rank=0, name="lb_dist.train.broadcast_object")

    def barrier(self) -> None:
        _hvd().barrier()
