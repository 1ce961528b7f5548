"""GradientMix: random mixing coefficients instead of plain gradient averaging.

Device-wise (paper eq. 3), with K data-parallel workers and local mean gradients g_k::

    g = sum_k pi_k g_k,        pi_k = (1 + std * xi_k) / K

Sample-wise (paper eq. 4), over the B samples of the global batch::

    g = sum_b pi_b grad l_b,   pi_b = (1 + std * xi_b) / B      (a loss weighted by w_b = B pi_b)

``xi`` is standard normal (``noise="gaussian"``) or +-1 with probability 1/2 (``"rademacher"``), drawn
afresh every step. Then ``E[pi] = 1/K`` (or ``1/B``) and ``Cov[pi] = kappa^2 I`` with
``kappa = std/K`` (``std/B``): the paper's eq. 12. ``std`` is the *relative* standard deviation
of a coefficient around its mean, so one value means the same amount of mixing at every K.

See docs/gradientmix.md for the equations, the measurement that chose the default ``std`` and the
step rule.
"""
from __future__ import annotations

import hashlib
import math
import warnings
import weakref
from typing import Mapping

import torch

from lb_dist._optimizer_state import link as link_optimizer_state, unlink as unlink_optimizer_state
from lb_dist._validation import check_choice, check_non_negative, check_positive_int
from lb_dist.distributed import get_rank, get_world_size

__all__ = ["GradientMix", "DEFAULT_STD", "NOISES", "GRANULARITIES"]

NOISES = ("gaussian", "rademacher", "none")
GRANULARITIES = ("device", "sample")

#: Default relative standard deviation of a coefficient. Chosen by benchmarks/choose_mix_std.py
#: (table and reasoning in docs/gradientmix.md).
DEFAULT_STD = 0.25

_CACHE_SIZE = 4


def _check_int(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


class GradientMix:
    """GradientMix (paper eq. 3 device-wise, eq. 4 sample-wise, noise of eq. 12).

    Args:
        noise: ``"gaussian"`` (xi ~ N(0, 1)), ``"rademacher"`` (xi = +-1 with probability 1/2) or
            ``"none"`` (every coefficient exactly 1/K: plain averaging, bitwise the same as no mixing).
        std: relative standard deviation of a coefficient, ``pi = (1 + std * xi) / K``. The paper's
            kappa of eq. 12 (``Cov[pi] = kappa^2 I``) is ``std / K`` device-wise and ``std / B``
            sample-wise. Must be >= 0. Coefficients can be negative: with probability
            ``Phi(-1/std)`` per coefficient for Gaussian noise (3e-5 at std=0.25, 2.3% at 0.5,
            16% at 1), always for half of them with Rademacher noise and std > 1 (a warning is
            issued for std > 1). The default was chosen by measurement (docs/gradientmix.md).
        granularity: ``"device"`` (eq. 3: one coefficient per data-parallel worker, applied in the
            all-reduce by the DDP hook ``lb_dist.ddp``) or ``"sample"`` (eq. 4: one weight per
            global sample, applied through :meth:`weighted_loss`).
        seed: the coefficients of step t are a deterministic function of ``(seed, t)`` only, so every
            rank draws the same ones without communication and a resumed run draws the same ones.
        world_size: K. ``None`` (default) follows the current data-parallel world
            (``lb_dist.distributed.get_world_size()`` at the time the coefficients are needed);
            giving it lets one process compute every rank's coefficients.

    Step rule: :attr:`step` starts at 0 and only :meth:`advance` changes it; :meth:`attach` makes an
    optimizer call :meth:`advance` after every ``optimizer.step()`` (the recommended way). Nothing
    else (not the DDP hook, not :meth:`weighted_loss`) advances it.

    Deviation from the paper: the coefficients are drawn independently, so ``sum_k pi_k`` is 1 only
    in expectation (the paper's eq. 12 fixes mean and covariance, not the sum). Consequently the
    noise amount ``gamma_t`` of :meth:`noise_amount` is ``1 + std^2`` in expectation but can be
    below 1 at a single step (it is ``>= (sum_k pi_k)^2``).
    """

    def __init__(self, noise: str = "gaussian", std: float = DEFAULT_STD, granularity: str = "device",
                 seed: int = 0, world_size: int | None = None) -> None:
        check_choice("noise", noise, NOISES)
        check_non_negative("std", std)
        check_choice("granularity", granularity, GRANULARITIES)
        _check_int("seed", seed)
        if world_size is not None:
            check_positive_int("world_size", world_size)
        self.noise = noise
        self.std = float(std)
        self.granularity = granularity
        self.seed = seed
        self.world_size = world_size
        self.step = 0
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self._attached = None  # the step hook's handle
        self._attached_to = None
        self._warn_negative()

    def _warn_negative(self) -> None:
        if self.noise != "none" and self.std > 1:
            share = "half of the coefficients are" if self.noise == "rademacher" else \
                f"each coefficient is with probability {0.5 * math.erfc(1 / (self.std * math.sqrt(2))):.0%}"
            warnings.warn(f"GradientMix(std={self.std}, noise={self.noise!r}): {share} negative "
                          f"(pi = (1 + std*xi)/K < 0), which flips those gradients", stacklevel=3)

    # ------------------------------------------------------------------ draws
    def _num_workers(self) -> int:
        return self.world_size if self.world_size is not None else get_world_size()

    def _resolve_step(self, step: int | None) -> int:
        return self.step if step is None else _check_int("step", step, 0)

    def _generator_seed(self, step: int) -> int:
        digest = hashlib.blake2b(f"lb_dist.GradientMix:{self.seed}:{step}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)

    def _xi(self, step: int, n: int) -> torch.Tensor:
        """The n standard noises of step ``step`` (float64, CPU); cached for the last few steps."""
        key = (step, n)
        xi = self._cache.get(key)
        if xi is None:
            g = torch.Generator(device="cpu").manual_seed(self._generator_seed(step))
            if self.noise == "gaussian":
                xi = torch.randn(n, generator=g, dtype=torch.float64)
            elif self.noise == "rademacher":
                xi = torch.randint(0, 2, (n,), generator=g).to(torch.float64).mul_(2).sub_(1)
            else:
                xi = torch.zeros(n, dtype=torch.float64)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = xi
        return xi

    def weights(self, n: int, step: int | None = None) -> torch.Tensor:
        """The n relative coefficients ``n * pi_i = 1 + std * xi_i`` of ``step`` (default :attr:`step`),
        float64 on the CPU, identical on every rank (exactly 1 for noise ``"none"``), whatever the
        granularity: ``n = K`` gives the device-wise factors ``K pi_k`` of :meth:`scale` for every
        rank at once (what an adapter needs for a step: the factor of its rank and ``W1``, ``W2``),
        ``n = B`` the sample-wise loss weights of :meth:`sample_weights`."""
        check_positive_int("n", n)
        return self._weights(self._resolve_step(step), n)

    @property
    def attached(self) -> bool:
        """Whether :meth:`attach` linked this mix to an optimizer (that advances it)."""
        return self._attached is not None

    def _weights(self, step: int, n: int) -> torch.Tensor:
        """``n * pi = 1 + std * xi`` (exactly 1 for noise ``"none"``)."""
        if self.noise == "none":
            return torch.ones(n, dtype=torch.float64)
        return 1.0 + self.std * self._xi(step, n)

    def _require(self, granularity: str, what: str) -> None:
        if self.granularity != granularity:
            hint = ("sample-wise mixing is applied through the loss: use mix.weighted_loss(...)"
                    if self.granularity == "sample" else
                    "device-wise mixing is applied in the all-reduce: use lb_dist.ddp.register(ddp_model, mix=mix)")
            raise ValueError(f"{what} needs granularity={granularity!r} but this GradientMix has "
                             f"granularity={self.granularity!r}; {hint}")

    # --------------------------------------------------------------- device-wise
    def coefficients(self, step: int | None = None) -> torch.Tensor:
        """The K mixing coefficients ``pi_k = (1 + std*xi_k)/K`` of ``step`` (default: :attr:`step`),
        float64 on the CPU, identical on every rank. Paper eq. 3."""
        self._require("device", "coefficients()")
        k = self._num_workers()
        return self._weights(self._resolve_step(step), k) / k

    def scale(self, rank: int | None = None, step: int | None = None) -> float:
        """``K * pi_rank`` (default rank: this process's), the factor rank k's gradient is scaled by
        before the averaging all-reduce, so that the reduced gradient is ``sum_k pi_k g_k``."""
        self._require("device", "scale()")
        k = self._num_workers()
        rank = get_rank() if rank is None else _check_int("rank", rank, 0)
        if rank >= k:
            raise ValueError(f"rank must be < world_size={k}, got {rank}")
        return float(self._weights(self._resolve_step(step), k)[rank])

    @property
    def kappa(self) -> float:
        """The paper's kappa (eq. 12, ``Cov[pi] = kappa^2 I``) of device-wise mixing: ``std / K``
        (0 for noise ``"none"``). Sample-wise it would be ``std / B``, B the global batch size."""
        self._require("device", "kappa")
        return 0.0 if self.noise == "none" else self.std / self._num_workers()

    # --------------------------------------------------------------- sample-wise
    def sample_weights(self, indices, global_batch_size: int, step: int | None = None) -> torch.Tensor:
        """Loss weights ``w_b = B * pi_b = 1 + std*xi_b`` (float64, CPU) of the global sample indices
        ``indices`` in ``[0, B)``, ``B = global_batch_size``. Paper eq. 4. A weight depends only on
        (seed, step, b, B), not on how the batch is split over ranks."""
        self._require("sample", "sample_weights()")
        check_positive_int("global_batch_size", global_batch_size)
        idx = self._check_indices(indices, global_batch_size)
        return self._weights(self._resolve_step(step), global_batch_size)[idx]

    @staticmethod
    def _check_indices(indices, global_batch_size: int, length: int | None = None) -> torch.Tensor:
        idx = torch.as_tensor(indices)
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.to(device="cpu", dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
        if length is not None and idx.numel() != length:
            raise ValueError(f"indices has {idx.numel()} entries but per_sample_losses has {length}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= global_batch_size):
            raise ValueError(f"indices must lie in [0, global_batch_size={global_batch_size}); "
                             f"got values in [{int(idx.min())}, {int(idx.max())}]")
        return idx

    def weighted_loss(self, per_sample_losses: torch.Tensor, indices=None,
                      global_batch_size: int | None = None, step: int | None = None) -> torch.Tensor:
        """Sample-wise GradientMix loss of this rank: ``K/B * sum_{b local} w_b * l_b``.

        After DDP's averaging over K ranks the gradient is ``(1/B) sum_b w_b grad l_b =
        sum_b pi_b grad l_b`` (paper eq. 4) over the B samples of the global batch, whatever the split.

        Args:
            per_sample_losses: this rank's 1-D per-sample losses (``reduction="none"``).
            indices: the global indices in ``[0, B)`` of these samples. Default: this rank's
                contiguous block ``rank*n + arange(n)`` of an even split, ``B = K*n``.
            global_batch_size: B; required with ``indices``; without them it must equal ``K*n``.
            step: default :attr:`step`.
        """
        self._require("sample", "weighted_loss()")
        if not isinstance(per_sample_losses, torch.Tensor):
            raise TypeError(f"per_sample_losses must be a torch.Tensor, got {type(per_sample_losses).__name__}")
        if per_sample_losses.dim() == 0:
            raise ValueError("per_sample_losses is a 0-dim (already reduced) loss: sample-wise mixing needs "
                             "per-sample losses, e.g. F.cross_entropy(logits, y, reduction='none')")
        if per_sample_losses.dim() != 1:
            raise ValueError(f"per_sample_losses must be 1-D (one loss per sample), got shape "
                             f"{tuple(per_sample_losses.shape)}; reduce other dimensions per sample first")
        n = per_sample_losses.numel()
        k = self._num_workers()
        if indices is None:
            rank = get_rank()
            if rank >= k:
                raise ValueError(f"this process has rank {rank} but world_size={k}; pass indices explicitly")
            if global_batch_size is not None and global_batch_size != k * n:
                raise ValueError(f"global_batch_size={global_batch_size!r} is not world_size*local batch = "
                                 f"{k}*{n}; for an uneven split pass this rank's global indices")
            big_b = k * n
            idx = torch.arange(rank * n, (rank + 1) * n)
        else:
            if global_batch_size is None:
                raise ValueError("global_batch_size is required when indices are given")
            check_positive_int("global_batch_size", global_batch_size)
            big_b = global_batch_size
            idx = self._check_indices(indices, big_b, length=n)
        w = self._weights(self._resolve_step(step), big_b)[idx]
        w = w.to(device=per_sample_losses.device, dtype=per_sample_losses.dtype)
        return (per_sample_losses * w).sum() * (k / big_b)

    # ---------------------------------------------------------------- reports
    def noise_amount(self, step: int | None = None, global_batch_size: int | None = None) -> float:
        """The paper's noise amount ``gamma_t = N sum_i pi_i^2`` (Theorem 1), N = K device-wise or
        B = ``global_batch_size`` sample-wise. 1 for plain averaging; ``E[gamma_t] = 1 + std^2``
        (a single step can be below 1 since the coefficients sum to 1 only in expectation)."""
        s = self._resolve_step(step)
        if self.granularity == "device":
            n = self._num_workers()
        else:
            if global_batch_size is None:
                raise ValueError("global_batch_size is required for the noise amount of sample-wise mixing")
            n = check_positive_int("global_batch_size", global_batch_size)
        w = self._weights(s, n)
        return float((w * w).sum() / n)  # N * sum (w/N)^2

    # ------------------------------------------------------------------- steps
    def advance(self) -> int:
        """Move to the next step (new coefficients); returns the new :attr:`step`."""
        self.step += 1
        return self.step

    def attach(self, optimizer: torch.optim.Optimizer):
        """Advance after every ``optimizer.step()`` (an optimizer step post-hook). One optimizer at a
        time: attaching a second one would advance twice per step. Returns the hook handle.

        The mix's state then travels in the optimizer's own checkpoint: ``optimizer.state_dict()``
        carries :meth:`state_dict` as ``state_dict()["lb_dist"]["gradient_mix"]`` and
        ``optimizer.load_state_dict`` restores it (a checkpoint without it warns, one whose
        ``"lb_dist"`` section lacks it raises ValueError; docs/gradientmix.md)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._attached is not None:
            raise ValueError("this GradientMix is already attached to an optimizer; call detach() first")

        def _post_step(opt, args, kwargs) -> None:
            self.advance()

        handle = optimizer.register_step_post_hook(_post_step)
        link_optimizer_state(optimizer, "gradient_mix", self)
        self._attached = handle
        self._attached_to = weakref.ref(optimizer)
        return handle

    def detach(self) -> None:
        """Undo :meth:`attach` (also takes the mix out of the optimizer's ``state_dict``)."""
        if self._attached is not None:
            self._attached.remove()
            optimizer = self._attached_to()
            if optimizer is not None:
                unlink_optimizer_state(optimizer, "gradient_mix", self)
            self._attached = None
            self._attached_to = None

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """seed, step, noise, std, granularity (not world_size: that belongs to the deployment)."""
        return {"seed": self.seed, "step": self.step, "noise": self.noise, "std": self.std,
                "granularity": self.granularity}

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("seed", "step", "noise", "std", "granularity"):
            if key not in state:
                raise KeyError(f"GradientMix state_dict is missing {key!r}")
        check_choice("noise", state["noise"], NOISES)
        check_non_negative("std", state["std"])
        check_choice("granularity", state["granularity"], GRANULARITIES)
        self.seed = _check_int("seed", state["seed"])
        self.step = _check_int("step", state["step"], 0)
        self.noise, self.std, self.granularity = state["noise"], float(state["std"]), state["granularity"]
        self._cache.clear()
        self._warn_negative()

    def __repr__(self) -> str:
        return (f"GradientMix(noise={self.noise!r}, std={self.std}, granularity={self.granularity!r}, "
                f"seed={self.seed}, world_size={self.world_size}, step={self.step})")


def check_device_mix(name: str, mix, reduction: str) -> None:
    """Validate a backend's device-wise mixing argument: None or ``GradientMix(granularity="device")``.

    ``name`` is the argument's name in the caller's signature, ``reduction`` what the backend mixes
    in ("the all-reduce", "the allreduce"), for the message."""
    if mix is None:
        return
    if not isinstance(mix, GradientMix):
        raise TypeError(f"{name} must be an lb_dist.GradientMix or None, got {type(mix).__name__}")
    if mix.granularity != "device":
        raise ValueError(f"{name} has granularity='sample': sample-wise mixing is applied through the loss "
                         f"(mix.weighted_loss(...), which uses the backend's rank and size), not in {reduction}; "
                         f"pass {name}=None or a GradientMix(granularity='device')")

