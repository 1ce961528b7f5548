"""Horovod backend: GradientMix and CLARS statistics inside ``hvd.DistributedOptimizer``.

Run with ``horovodrun -np N -H host1:n1,... [--gloo|--mpi] python train.py`` or ``mpirun``::

    import horovod.torch as hvd
    import lb_dist.horovod
    from lb_dist import GradientMix
    from lb_dist.moments import MicroBatchMoments
    from lb_dist.optim import CLARS, param_groups

    hvd.init()
    moments = MicroBatchMoments(list(model.parameters()), micro_batch_size=local_batch)
    opt = CLARS(param_groups(model, 5e-4), lr=gamma_scale, moments=moments)
    opt = lb_dist.horovod.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(),
        gradient_mix=GradientMix(noise="gaussian", seed=0), moments=moments)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    lb_dist.horovod.broadcast_optimizer_state(opt, root_rank=0)

Public API: :func:`DistributedOptimizer`, :class:`GradientMixState`, :class:`ElasticState`,
:func:`broadcast_optimizer_state`, :func:`optimizer_state`, :func:`load_optimizer_state`.
See docs/backend-horovod.md.
"""
from lb_dist.horovod.elastic import ElasticState, broadcast_optimizer_state, load_optimizer_state, optimizer_state
from lb_dist.horovod.optimizer import DistributedOptimizer, GradientMixState

__all__ = ["DistributedOptimizer", "GradientMixState", "ElasticState", "broadcast_optimizer_state",
           "optimizer_state", "load_optimizer_state"]
