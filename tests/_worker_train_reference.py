"""One-process references for the lb_dist.train tests: SGD training written out with plain torch.

The batch layout is lb_dist.train's documented contract (docs/training.md, "Batch layout"): step t of
epoch e takes the global batch ``perm_e[t*B:(t+1)*B]`` of ``lb_dist.data.epoch_permutation``; it is cut
into K*A slots of n = B/(K*A) samples, slot j*K + r being micro-batch j of rank r. Here every slot is a
separate forward in train mode (BatchNorm normalises per slot, as on the ranks), and the step's
gradient is assembled from the slots' losses by the paper's equations:

* no mixing:   g = (1/B) sum_b grad l_b                            (mean over the global batch)
* device-wise: g = sum_k pi_k g_k, g_k = mean-loss gradient of worker k's n*A samples    (eq. 3)
* sample-wise: g = sum_b pi_b grad l_b = (1/B) sum_b w_b grad l_b, w = B pi               (eq. 4)

with the coefficients of GradientMix (a deterministic function of (seed, step), the core's tested
API), then ``torch.optim.SGD`` (momentum, no weight decay) at a constant learning rate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lb_dist.data import SyntheticImages, epoch_permutation
from lb_dist.mixing import GradientMix
from lb_dist.models import build_model


def reference_sgd(*, steps: int, batch_size: int, world_size: int, accumulation: int, lr: float, momentum: float,
                  train_size: int, image_size: int, seed: int = 0, mix: str = "none", mix_std: float = 0.25,
                  mix_noise: str = "gaussian", model: str = "resnet20") -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = build_model(model, num_classes=10)
    net.train()
    ds = SyntheticImages(train_size, num_classes=10, image_shape=(3, image_size, image_size), seed=0, split="train")
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    K, A, B = world_size, accumulation, batch_size
    n = B // (K * A)
    steps_per_epoch = train_size // B
    for t in range(steps):
        epoch, s = divmod(t, steps_per_epoch)
        order = epoch_permutation(train_size, epoch, seed)
        batch = order[s * B:(s + 1) * B]
        if mix == "device":
            pi = GradientMix(noise=mix_noise, std=mix_std, granularity="device", seed=seed,
                             world_size=K).coefficients(step=t)
        elif mix == "sample":
            w = GradientMix(noise=mix_noise, std=mix_std, granularity="sample", seed=seed).sample_weights(
                torch.arange(B), B, step=t).float()
        opt.zero_grad()
        total = 0.0
        for slot in range(K * A):
            rank = slot % K
            pos = torch.arange(slot * n, (slot + 1) * n)
            x, y = ds.get_batch(batch[pos])
            losses = F.cross_entropy(net(x), y, reduction="none")
            if mix == "device":
                # worker k's mean-loss gradient over its n*A samples, weighted by pi_k
                total = total + float(pi[rank]) * losses.sum() / (n * A)
            elif mix == "sample":
                total = total + (w[pos] * losses).sum() / B
            else:
                total = total + losses.sum() / B
        total.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def reference_layerwise(*, optimizer: str, steps: int, batch_size: int, world_size: int, lr: float,
                        train_size: int, image_size: int, momentum: float = 0.9, weight_decay: float = 0.0,
                        eta: float | None = None, seed: int = 0, mix: str = "none", mix_std: float = 0.25,
                        mix_noise: str = "gaussian", estimator: str = "weighted", schedule: str = "poly",
                        model: str = "resnet20") -> dict[str, torch.Tensor]:
    """LARS or CLARS (the core's optimizers, ``lb_dist.optim.param_groups`` split) on the gradient of the
    batch layout above with K = ``world_size`` workers and no accumulation, written out per worker:

    * ``g_k`` = worker k's mean-loss gradient (its n samples, BatchNorm per slot), ``M = sum_k pi_k g_k``
      (``pi_k = 1/K`` without mixing; GradientMix's coefficients of the step with ``mix="device"``);
    * CLARS' micro-batch estimator (``MicroBatchMoments.update``) fed with ``sum_k ||g_k||^2`` per layer,
      n = K micro-batches of b = n samples, and the big-batch value every backend documents
      (docs/moments.md), conditioned on the step's coefficients: with W1 = sum pi, W2 = sum pi^2,
      small = mean_k ||g_k||^2, u = (||M||^2 - W1^2 small) / (W2 - W1^2), big = small - u (1 - 1/K)
      (``||M||^2`` itself without mixing). ``estimator="unweighted"`` is a control that feeds ``||M||^2``
      as if M were the plain mean (the mixing ignored);
    * the schedule: ``poly`` (GradientMix eq. 15, no warmup, decay power 2, over ``steps``) or ``constant``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (--num-threads 1): the same kernels on the same micro-batches
    try:
        return _reference_layerwise(optimizer=optimizer, steps=steps, batch_size=batch_size, world_size=world_size,
                                    lr=lr, train_size=train_size, image_size=image_size, momentum=momentum,
                                    weight_decay=weight_decay, eta=eta, seed=seed, mix=mix, mix_std=mix_std,
                                    mix_noise=mix_noise, estimator=estimator, schedule=schedule, model=model)
    finally:
        torch.set_num_threads(threads)


def _reference_layerwise(*, optimizer, steps, batch_size, world_size, lr, train_size, image_size, momentum,
                         weight_decay, eta, seed, mix, mix_std, mix_noise, estimator, schedule, model):
    from lb_dist.moments import MicroBatchMoments
    from lb_dist.optim import CLARS, LARS, param_groups
    from lb_dist.schedules import PolynomialWarmupDecay

    torch.manual_seed(seed)
    net = build_model(model, num_classes=10)
    net.train()
    ds = SyntheticImages(train_size, num_classes=10, image_shape=(3, image_size, image_size), seed=0, split="train")
    groups = param_groups(net, weight_decay)
    adapted = [p for g in groups if g.get("layer_adaptation", True) for p in g["params"]]
    K, B = world_size, batch_size
    n = B // K
    moments = None
    if optimizer == "lars":
        opt = LARS(groups, lr=lr, momentum=momentum, eta=0.001 if eta is None else eta)
    elif optimizer == "clars":
        moments = MicroBatchMoments(adapted, micro_batch_size=n)
        opt = CLARS(groups, lr=lr, momentum=momentum, eta=0.01 if eta is None else eta, nesterov=momentum > 0,
                    moments=moments)
    else:
        raise ValueError(optimizer)
    sched = PolynomialWarmupDecay(opt, steps, 0, decay_power=2.0) if schedule == "poly" else None
    params = [p for p in net.parameters() if p.requires_grad]
    steps_per_epoch = train_size // B
    for t in range(steps):
        epoch, s = divmod(t, steps_per_epoch)
        batch = epoch_permutation(train_size, epoch, seed)[s * B:(s + 1) * B]
        pi = (GradientMix(noise=mix_noise, std=mix_std, granularity="device", seed=seed, world_size=K)
              .coefficients(step=t).double() if mix == "device" else torch.full((K,), 1.0 / K, dtype=torch.float64))
        per_worker = []
        for rank in range(K):
            pos = torch.arange(rank * n, (rank + 1) * n)
            x, y = ds.get_batch(batch[pos])
            loss = F.cross_entropy(net(x), y)
            per_worker.append(torch.autograd.grad(loss, params))
        for i, p in enumerate(params):
            p.grad = sum(float(pi[k]) * per_worker[k][i] for k in range(K))
        if moments is not None:
            idx = [next(i for i, q in enumerate(params) if q is p) for p in adapted]
            sq = torch.tensor([[float(per_worker[k][i].double().square().sum()) for i in idx] for k in range(K)],
                              dtype=torch.float64)
            total = sq.sum(0)
            big_raw = torch.tensor([float(params[i].grad.double().square().sum()) for i in idx], dtype=torch.float64)
            if estimator == "unweighted":
                big = big_raw
            elif estimator == "weighted":
                w1, w2 = float(pi.sum()), float((pi * pi).sum())
                small = total / K
                u = (big_raw - w1 * w1 * small) / (w2 - w1 * w1)
                big = small - u * (1.0 - 1.0 / K)
            else:
                raise ValueError(estimator)
            moments.update(total, K, big, n)
        opt.step()
        if sched is not None:
            sched.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
