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
