"""Worker for tests/test_horovod.py: one rank of a real Horovod job (horovodrun --gloo / --mpi, mpirun).

Runs every scenario in one launch and saves, per rank, what Horovod + lb_dist.horovod produced
together with the inputs (parameters before each step, this rank's data). It computes no expected
values: the test recomputes them in one process, in float64, from the saved inputs. Bitwise
comparisons with hvd.DistributedOptimizer are made on results both produced here.

    python tests/_worker_horovod.py OUT_DIR [--quick]
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

import horovod.torch as hvd  # noqa: E402
import horovod.torch.optimizer as hvd_optimizer  # noqa: E402

import lb_dist.horovod as lbh  # noqa: E402
from lb_dist.mixing import GradientMix  # noqa: E402
from lb_dist.moments import MicroBatchMoments, TrainingPassMoments, per_sample_second_moments  # noqa: E402
from lb_dist.optim import CLARS, LAMB, LARS, param_groups  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _padded import PadNet, padded_batch, token_loss  # noqa: E402
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

LOCAL = 4       # samples per rank per backward pass
STD = 0.5
STEPS = 3
VOCAB, DIM, TOKENS = 10, 4, 3


class SparseNet(torch.nn.Module):
    """Embedding(sparse=True) -> mean over tokens -> Linear: a sparse gradient for the first layer."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM, sparse=True)
        self.out = torch.nn.Linear(DIM, 3)

    def forward(self, idx):
        return self.out(self.emb(idx).mean(1))


def make_model(kind: str = "mlp") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "sparse":
        return SparseNet()
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3))


def data(kind: str, step: int, rank: int, micro: int = 0):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    x = torch.randint(0, VOCAB, (LOCAL, TOKENS), generator=g) if kind == "sparse" else torch.randn(LOCAL, 6, generator=g)
    return x, torch.randint(0, 3, (LOCAL,), generator=g)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def dense_grads(model):
    return [(p.grad.to_dense() if p.grad.is_sparse else p.grad).detach().clone() for p in model.parameters()]


STATS_PREFIX = "lb_dist.horovod.layer_sq_norms"
# Collectives, by the Python function that submits them: Horovod's optimizer submits gradients through
# the functions it imported into horovod.torch.optimizer; anything else (lb_dist's statistics) goes
# through horovod.torch's public functions, all of which are counted.
GRAD_SUBMITTERS = ("allreduce_async_", "grouped_allreduce_async_", "sparse_allreduce_async")
PUBLIC_COLLECTIVES = tuple(n for n in dir(hvd) if n.split("_")[0] in (
    "allreduce", "grouped", "allgather", "broadcast", "alltoall", "reducescatter", "sparse"))


@contextlib.contextmanager
def count_submissions():
    """Counts, while active, the collectives submitted from Python: ``grad`` (Horovod's gradient
    allreduces), ``stats`` (those named like lb_dist's statistics tensor, by function) and ``other``
    (any other public horovod.torch collective)."""
    counts = {"grad": 0, "stats": 0, "other": 0, "stats_names": []}
    saved = []

    def wrap(module, name, kind):
        fn = getattr(module, name)

        def counted(*args, **kwargs):
            tname = kwargs.get("name")
            if kind == "public" and isinstance(tname, str) and tname.startswith(STATS_PREFIX):
                counts["stats"] += 1
                counts["stats_names"].append(tname)
            else:
                counts["grad" if kind == "grad" else "other"] += 1
            return fn(*args, **kwargs)
        saved.append((module, name, fn))
        setattr(module, name, counted)

    for n in GRAD_SUBMITTERS:
        wrap(hvd_optimizer, n, "grad")
    for n in PUBLIC_COLLECTIVES:
        if callable(getattr(hvd, n)):
            wrap(hvd, n, "public")
    try:
        yield counts
    finally:
        for module, name, fn in reversed(saved):
            setattr(module, name, fn)


# Horovod options under test; each also runs with hvd.DistributedOptimizer for the bitwise comparison.
def configs(quick: bool) -> dict:
    cfg = {
        "default": dict(model="mlp", hvd={}),
        "fp16": dict(model="mlp", hvd=dict(compression=hvd.Compression.fp16)),
        "predivide": dict(model="mlp", hvd=dict(gradient_predivide_factor=2.0)),
        "groups2": dict(model="mlp", hvd=dict(groups=2)),
        "groups_list": dict(model="mlp", hvd=dict(groups="list")),
        "bpps2": dict(model="mlp", hvd=dict(backward_passes_per_step=2), passes=2),
        "sum": dict(model="mlp", hvd=dict(op=hvd.Sum)),
        "sparse": dict(model="sparse", hvd={}),
        "sparse_as_dense": dict(model="sparse", hvd=dict(sparse_as_dense=True)),
    }
    if quick:
        cfg = {k: cfg[k] for k in ("default", "fp16", "bpps2")}
    return cfg


def run_config(name: str, cfg: dict, variant: str, rank: int) -> dict:
    """variant: hvd (hvd.DistributedOptimizer), none (lb, noise 'none'), none_moments, gaussian
    (+ moments), rademacher (+ moments), rademacher_std1 (+ moments; std 1 and seed 2 draw
    pi = (0, 1), (1, 1), (0, 1): steps 0 and 2 have degenerate weights)."""
    kind = cfg["model"]
    passes = cfg.get("passes", 1)
    model = make_model(kind)
    params = list(model.parameters())
    kwargs = dict(cfg["hvd"])
    if kwargs.get("groups") == "list":
        kwargs["groups"] = [[params[0], params[1]], [params[4]]]
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    named = list(model.named_parameters())
    moments = None
    if variant == "hvd":
        opt = hvd.DistributedOptimizer(base, named_parameters=named, **kwargs)
    else:
        if variant == "rademacher_std1":
            mix = GradientMix(noise="rademacher", std=1.0, seed=2)
        else:
            mix = GradientMix(noise="none" if variant.startswith("none") else variant, std=STD, seed=7)
        if variant != "none":
            moments = MicroBatchMoments(params)
        opt = lbh.DistributedOptimizer(base, named_parameters=named, gradient_mix=mix, moments=moments,
                                       micro_batch_size=LOCAL * passes if moments is not None else None, **kwargs)
    rec = {"params": [], "data": [], "grads": [], "final": None, "last_update": [], "grad_sq": [], "trace": [],
           "mix_step": [], "submissions": []}
    for t in range(STEPS):
        opt.zero_grad()
        rec["params"].append(snapshot(model))
        batches = [data(kind, t, rank, m) for m in range(passes)]
        rec["data"].append(batches)
        if variant != "hvd":
            rec["mix_step"].append(opt.lb_dist_state.mix.step)
        with count_submissions() as counts:
            for x, y in batches:
                (F.cross_entropy(model(x), y) / passes).backward()
            opt.synchronize()
            rec["grads"].append(dense_grads(model))
            with opt.skip_synchronize():
                opt.step()
        rec["submissions"].append(counts)
        if moments is not None:
            rec["last_update"].append(dict(opt.lb_dist_state.last_update))
            has = moments.num_updates > 0      # a skipped (degenerate) first step leaves no estimate
            rec["grad_sq"].append(moments.grad_sq_norms_tensor().clone() if has else None)
            rec["trace"].append(moments.trace_sigma_tensor().clone() if has else None)
            rec.setdefault("num_updates", []).append(moments.num_updates)
    rec["final"] = snapshot(model)
    if variant != "hvd":
        rec["final_mix_step"] = opt.lb_dist_state.mix.step
    return rec


def run_clars(rank: int) -> dict:
    """CLARS reading S_k from the estimator fed by the optimizer, with Gaussian mixing, plain step()."""
    model = make_model()
    moments = MicroBatchMoments(list(model.parameters()), micro_batch_size=LOCAL)
    opt = CLARS(param_groups(model, 1e-2), lr=0.5, momentum=0.9, eta=0.01, moments=moments)
    mix = GradientMix(noise="gaussian", std=STD, seed=5)
    opt = lbh.DistributedOptimizer(opt, named_parameters=model.named_parameters(), gradient_mix=mix, moments=moments)
    rec = {"params": [], "data": [], "second_moments": [], "is_clars": isinstance(opt, CLARS)}
    for t in range(STEPS):
        opt.zero_grad()
        rec["params"].append(snapshot(model))
        x, y = data("mlp", t, rank)
        rec["data"].append([(x, y)])
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rec["second_moments"].append(moments.second_moments_tensor().clone())
    rec["final"] = snapshot(model)
    rec["mix_step"] = mix.step
    try:
        hvd.DistributedOptimizer(CLARS(param_groups(make_model(), 1e-2), lr=0.5))
        rec["hvd_wraps_clars"] = None
    except TypeError as e:
        rec["hvd_wraps_clars"] = str(e)
    return rec


def run_training_pass(rank: int, op=None, grad_scale: float = 0.5) -> dict:
    """CLARS with a TrainingPassMoments given to the optimizer (2 backward passes per step, each loss
    times ``grad_scale``; Horovod's ``op``, default Average): per step, the submissions counted (the
    statistics must leave during the last backward, before synchronize) and the S_k / ||G_k||^2, M_k and
    B_simple it reports; the test recomputes them with an exact per-sample loop."""
    model = make_model()
    moments = TrainingPassMoments(model, grad_scale=grad_scale)
    opt = CLARS(param_groups(model, 1e-2), lr=0.5, momentum=0.9, eta=0.01, moments=moments)
    opt = lbh.DistributedOptimizer(opt, named_parameters=model.named_parameters(), backward_passes_per_step=2,
                                   moments=moments, op=hvd.Average if op is None else op)
    rec = {"params": [], "data": [], "second_moments": [], "grad_sq": [], "counts": [], "after_backward": [],
           "variance_factors": [], "noise_scales": [],
           "tracked": [i for i, p in enumerate(model.parameters()) if p in moments.param_index]}
    for t in range(STEPS):
        opt.zero_grad()
        rec["params"].append(snapshot(model))
        batches = [data("mlp", t, rank, micro) for micro in range(2)]
        rec["data"].append(batches)
        with count_submissions() as counts:
            for x, y in batches:
                (F.cross_entropy(model(x), y) * grad_scale).backward()
            rec["after_backward"].append(dict(counts))
            opt.step()
        rec["counts"].append(counts)
        rec["second_moments"].append(moments.second_moments_tensor().clone())
        rec["grad_sq"].append(moments.grad_sq_norms_tensor().clone())
        rec["variance_factors"].append(torch.stack([moments.variance_factors()[p] for p in moments.params]))
        per, overall = moments.noise_scales()
        rec["noise_scales"].append((torch.tensor([per[p] for p in moments.params]), overall))
    rec["final"] = snapshot(model)
    return rec


def padded_data(step: int, rank: int, micro: int):
    """The padded case's micro-batch (tests/_padded.py): ragged lengths that differ between ranks."""
    return padded_batch(torch.Generator().manual_seed(1000 * step + 10 * rank + micro + 7), LOCAL)


def run_training_pass_padded(rank: int) -> dict:
    """run_training_pass on the padded token model (embedding with padding_idx, Linear over the
    sequence, token cross-entropy over the non-padding labels normalized by their count): per step
    the parameters before it, this rank's micro-batches and S_k / ||G_k||^2."""
    torch.manual_seed(0)
    model = PadNet()
    moments = TrainingPassMoments(model, grad_scale=0.5)
    opt = CLARS(param_groups(model, 1e-2), lr=0.5, momentum=0.9, eta=0.01, moments=moments)
    opt = lbh.DistributedOptimizer(opt, named_parameters=model.named_parameters(), backward_passes_per_step=2,
                                   moments=moments)
    rec = {"params": [], "data": [], "second_moments": [], "grad_sq": [],
           "tracked": [n for n, p in model.named_parameters() if p in moments.param_index]}
    for t in range(2):
        opt.zero_grad()
        rec["params"].append({n: p.detach().clone() for n, p in model.named_parameters()})
        rec["data"].append([padded_data(t, rank, micro) for micro in range(2)])
        for x, y in rec["data"][-1]:
            (token_loss(model(x), y)[1] / 2).backward()
        opt.step()
        rec["second_moments"].append(moments.second_moments_tensor().clone())
        rec["grad_sq"].append(moments.grad_sq_norms_tensor().clone())
    return rec


def run_two_optimizers(rank: int) -> dict:
    """An encoder optimizer (first Linear) and a decoder optimizer (the rest), each with its own
    moments and Gaussian mix, both fed by ONE backward: their statistics tensors are in flight
    together, so they need distinct Horovod names."""
    model = make_model()
    named = list(model.named_parameters())
    parts = {"enc": named[:2], "dec": named[2:]}
    seeds = {"enc": 7, "dec": 8}
    opts, moms = {}, {}
    for part, np_ in parts.items():
        moms[part] = MicroBatchMoments([p for _, p in np_])
        opts[part] = lbh.DistributedOptimizer(
            torch.optim.SGD([p for _, p in np_], lr=0.1, momentum=0.9), named_parameters=np_,
            gradient_mix=GradientMix(noise="gaussian", std=STD, seed=seeds[part]), moments=moms[part],
            micro_batch_size=LOCAL)
    rec = {"params": [], "data": [], "submissions": [],
           "stats_names": {part: getattr(opts[part].lb_dist_state, "stats_name", None) for part in parts}}
    for part in parts:
        rec[part] = {"last_update": [], "grad_sq": [], "trace": []}
    for t in range(STEPS):
        for o in opts.values():
            o.zero_grad()
        rec["params"].append(snapshot(model))
        x, y = data("mlp", t, rank)
        rec["data"].append([(x, y)])
        with count_submissions() as counts:
            F.cross_entropy(model(x), y).backward()
            for o in opts.values():
                o.step()
        rec["submissions"].append(counts)
        for part in parts:
            rec[part]["last_update"].append(dict(opts[part].lb_dist_state.last_update))
            rec[part]["grad_sq"].append(moms[part].grad_sq_norms_tensor().clone())
            rec[part]["trace"].append(moms[part].trace_sigma_tensor().clone())
    rec["final"] = snapshot(model)
    return rec


def run_scaled(rank: int) -> dict:
    """Step 0: loss scaled by 8 with grad_scale = 8. Step 1: an overflowing (inf) step is not fed."""
    model = make_model()
    moments = MicroBatchMoments(list(model.parameters()), micro_batch_size=LOCAL)
    opt = lbh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                   named_parameters=model.named_parameters(),
                                   gradient_mix=GradientMix(std=STD, seed=3), moments=moments)
    opt.lb_dist_state.grad_scale = 8.0
    x, y = data("mlp", 0, rank)
    rec = {"params": [snapshot(model)], "data": [[(x, y)]]}
    (8.0 * F.cross_entropy(model(x), y)).backward()
    opt.step()
    rec["last_update"] = [dict(opt.lb_dist_state.last_update)]
    rec["grad_sq"] = [moments.grad_sq_norms_tensor().clone()]
    rec["trace"] = [moments.trace_sigma_tensor().clone()]
    opt.zero_grad()
    (float("inf") * F.cross_entropy(model(x), y)).backward()
    opt.synchronize()
    rec["overflow_update"] = dict(opt.lb_dist_state.last_update)
    rec["num_updates"] = moments.num_updates
    return rec


def run_hooks(rank: int) -> dict:
    """Step hooks run once per step; a mix attached to the plain optimizer before wrapping keeps
    working; a second synchronize() does not mix twice; a scheduler made before wrapping is harmless."""
    out = {}
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = {"pre_wrap": 0, "post_wrap": 0}
    base.register_step_post_hook(lambda *a: calls.__setitem__("pre_wrap", calls["pre_wrap"] + 1))
    mix = GradientMix(std=STD, seed=9)
    mix.attach(base)
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)
    opt = lbh.DistributedOptimizer(base, named_parameters=model.named_parameters(), gradient_mix=mix)
    opt.register_step_post_hook(lambda *a: calls.__setitem__("post_wrap", calls["post_wrap"] + 1))
    grads_once, grads_twice = [], []
    for t in range(2):
        opt.zero_grad()
        x, y = data("mlp", t, rank)
        F.cross_entropy(model(x), y).backward()
        opt.synchronize()
        grads_once.append(dense_grads(model))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.synchronize()            # a redundant second call
        grads_twice.append(dense_grads(model))
        with opt.skip_synchronize():
            opt.step()
        sched.step()
    # load_state_dict (torch's __setstate__ re-patches step functions) must not double the hooks
    opt.load_state_dict(opt.state_dict())
    opt.zero_grad()
    x, y = data("mlp", 2, rank)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    out["calls"] = calls
    out["mix_step"] = mix.step
    out["lr"] = opt.param_groups[0]["lr"]
    out["twice_equal"] = all(torch.equal(a, b) for s, u in zip(grads_once, grads_twice) for a, b in zip(s, u))
    # Horovod's own optimizer, for the record: how often does it run a step post-hook?
    model2 = make_model()
    h = hvd.DistributedOptimizer(torch.optim.SGD(model2.parameters(), lr=0.1), named_parameters=model2.named_parameters())
    hcalls = []
    h.register_step_post_hook(lambda *a: hcalls.append(1))
    x, y = data("mlp", 0, rank)
    F.cross_entropy(model2(x), y).backward()
    h.step()
    out["hvd_post_hook_calls_per_step"] = len(hcalls)
    return out


def run_per_sample(rank: int) -> dict:
    """lb_dist.moments.per_sample_second_moments and sample-wise mixing under Horovod (no torch.distributed)."""
    model = make_model()
    x, y = data("mlp", 5, rank)
    stats = per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=2 * LOCAL, return_stats=True)
    params = list(model.parameters())
    sm = torch.stack([stats.second_moments[p].double() for p in params])
    gs = torch.stack([stats.grad_sq_norms[p].double() for p in params])
    mix = GradientMix(noise="gaussian", std=STD, granularity="sample", seed=4)
    losses = F.cross_entropy(model(x), y, reduction="none")
    return {"params": snapshot(model), "data": (x, y), "second_moments": sm, "grad_sq_norms": gs,
            "num_samples": stats.num_samples, "losses": losses.detach(),
            "weighted_loss": mix.weighted_loss(losses).detach()}


def run_broadcast(rank: int) -> dict:
    """lb_dist.horovod.broadcast_optimizer_state gives every rank rank 0's optimizer, mix and estimator
    state without a dummy step; hvd.broadcast_optimizer_state on a fresh CLARS + estimator fails."""
    model = make_model()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    moments = MicroBatchMoments(list(model.parameters()), micro_batch_size=LOCAL)
    mix = GradientMix(std=STD, seed=1)
    opt = lbh.DistributedOptimizer(CLARS(param_groups(model, 1e-2), lr=0.5, moments=moments),
                                   named_parameters=model.named_parameters(), gradient_mix=mix, moments=moments)
    before = snapshot(model)
    lbh.broadcast_optimizer_state(opt, root_rank=0)          # fresh state: must not move the weights
    out = {"moved_by_fresh_broadcast": any(not torch.equal(a, b) for a, b in zip(before, snapshot(model)))}
    opt.zero_grad()
    x, y = data("mlp", 0, rank)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    if rank == 1:                 # make rank 1's optimizer, mix and estimator state differ from rank 0's
        mix.step += 5
        for st in opt.state.values():
            st["momentum_buffer"].add_(1.0)
        moments.num_updates += 3
    lbh.broadcast_optimizer_state(opt, root_rank=0)
    out["mix_step"] = mix.step
    out["num_updates"] = moments.num_updates
    out["buffers"] = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    out["S"] = moments.second_moments_tensor().clone()
    try:
        fresh = make_model()
        est = MicroBatchMoments(list(fresh.parameters()), micro_batch_size=LOCAL)
        hvd.broadcast_optimizer_state(CLARS(param_groups(fresh, 1e-2), lr=0.5, moments=est), root_rank=0)
        out["hvd_broadcast_fresh_clars"] = None
    except Exception as e:  # noqa: BLE001
        out["hvd_broadcast_fresh_clars"] = f"{type(e).__name__}: {e}"
    return out


def run_elastic_state(rank: int) -> dict:
    """ElasticState commit / restore / sync in a (non-elastic) job: the same objects come back."""
    model = make_model()
    moments = MicroBatchMoments(list(model.parameters()), micro_batch_size=LOCAL)
    mix = GradientMix(std=STD, seed=2)
    sample_mix = GradientMix(std=STD, seed=2, granularity="sample")
    opt = lbh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=model.named_parameters(), gradient_mix=mix, moments=moments)
    state = lbh.ElasticState(model, opt, sample_mix=sample_mix, epoch=0)

    def train(t):
        opt.zero_grad()
        x, y = data("mlp", t, rank)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sample_mix.advance()

    train(0)
    state.epoch = 1
    state.commit()
    committed = {"params": snapshot(model), "mix_step": mix.step, "sample_step": sample_mix.step,
                 "S": moments.second_moments_tensor().clone(),
                 "buf": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]}
    train(1)
    train(2)
    state.epoch = 3
    state.restore()
    restored = {"params": snapshot(model), "mix_step": mix.step, "sample_step": sample_mix.step,
                "S": moments.second_moments_tensor().clone(), "epoch": state.epoch,
                "buf": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()],
                "same_objects": state.optimizer is opt and opt.lb_dist_state.mix is mix
                and opt.lb_dist_state.moments is moments and state.sample_mix is sample_mix}
    train(1)                      # a second restore must still give the committed state
    state.restore()
    second = {"mix_step": mix.step, "buf": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]}
    if rank == 1:
        mix.step += 4
    state.sync()
    return {"committed": committed, "restored": restored, "second": second, "synced_mix_step": mix.step}


# Horovod's documented flow (hvd.broadcast_parameters + hvd.broadcast_optimizer_state) and a plain
# state_dict checkpoint loaded on rank 0 only (as Horovod's examples resume), for LARS, CLARS and LAMB.
HVD_FLOW = {"lars": dict(lr=0.5, wd=1e-2, seed=11), "clars": dict(lr=0.5, wd=1e-2, seed=12),
            "lamb": dict(lr=0.05, wd=1e-2, seed=13), "sgd": dict(lr=0.1, wd=1e-2, seed=15)}


def _flow_optimizer(kind: str, model):
    h = HVD_FLOW[kind]
    moments = None
    if kind == "lars":
        base = LARS(param_groups(model, h["wd"]), lr=h["lr"], momentum=0.9, eta=0.01, nesterov=True)
    elif kind == "clars":
        moments = MicroBatchMoments(list(model.parameters()), micro_batch_size=LOCAL, ema=0.5)
        base = CLARS(param_groups(model, h["wd"]), lr=h["lr"], momentum=0.9, eta=0.01, moments=moments)
    elif kind == "lamb":
        base = LAMB(param_groups(model, h["wd"]), lr=h["lr"], betas=(0.9, 0.99), eps=1e-6)
    else:                      # a torch optimizer: Horovod's initializing step on it is neutralized too
        base = torch.optim.SGD(model.parameters(), lr=h["lr"], momentum=0.9, weight_decay=h["wd"])
    mix = GradientMix(noise="gaussian", std=STD, seed=h["seed"])
    opt = lbh.DistributedOptimizer(base, named_parameters=model.named_parameters(), gradient_mix=mix,
                                   moments=moments)
    return opt, mix, moments


def _flow_model(rank: int):
    model = make_model()
    if rank != 0:              # the ranks start apart: hvd.broadcast_parameters must make them equal
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3)
    return model


def _flow_train(model, opt, t: int, rank: int) -> None:
    opt.zero_grad()
    x, y = data("mlp", t, rank)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def run_hvd_flow(rank: int) -> dict:
    """Per optimizer (LARS, CLARS, LAMB, torch's SGD with momentum and weight decay): (a) Horovod's
    documented order on a fresh optimizer, then STEPS steps;
    (b) 2 steps, ``opt.state_dict()`` through torch.save/torch.load, a new job whose rank 0 alone loads
    the model and the optimizer, Horovod's two broadcasts, then the remaining step."""
    import io
    out = {}
    for kind in HVD_FLOW:
        rec = {}
        model = _flow_model(rank)
        opt, mix, moments = _flow_optimizer(kind, model)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        start = snapshot(model)
        try:
            hvd.broadcast_optimizer_state(opt, root_rank=0)
            rec["broadcast_error"] = None
        except Exception as e:  # noqa: BLE001
            rec["broadcast_error"] = f"{type(e).__name__}: {e}"
            out[kind] = rec
            continue
        rec["start"] = start
        rec["moved_by_broadcast"] = any(not torch.equal(a, b) for a, b in zip(start, snapshot(model)))
        rec["mix_step_after_broadcast"] = mix.step
        for t in range(STEPS):
            _flow_train(model, opt, t, rank)
        rec["final"] = snapshot(model)
        rec["mix_step"] = mix.step
        # (b) checkpoint after 2 steps, resumed by a new "job" in which only rank 0 loads it
        model = _flow_model(rank)
        opt, mix, moments = _flow_optimizer(kind, model)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        for t in range(2):
            _flow_train(model, opt, t, rank)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
        rec["checkpoint_lb_dist"] = opt.state_dict().get("lb_dist")
        model = _flow_model(rank)
        opt, mix, moments = _flow_optimizer(kind, model)
        if rank == 0:
            buf.seek(0)
            ck = torch.load(buf)            # torch's default (weights_only=True) loads it
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        try:
            hvd.broadcast_optimizer_state(opt, root_rank=0)
            rec["resume_error"] = None
        except Exception as e:  # noqa: BLE001
            rec["resume_error"] = f"{type(e).__name__}: {e}"
            out[kind] = rec
            continue
        rec["resumed_mix_step"] = mix.step
        rec["resumed_moments"] = None if moments is None else moments.state_dict()
        rec["group_keys"] = [sorted(g) for g in opt.param_groups]
        _flow_train(model, opt, 2, rank)
        rec["resumed_final"] = snapshot(model)
        rec["resumed_mix_step_end"] = mix.step
        out[kind] = rec
    # sparse_as_dense=True with a layer-wise optimizer: the reduced sparse gradient is used densely
    sp = {}
    for sparse in (True, False):
        torch.manual_seed(0)
        net = SparseNet()
        if not sparse:
            dense = torch.nn.Embedding(VOCAB, DIM, sparse=False)
            dense.weight.data.copy_(net.emb.weight.data)
            net.emb = dense
        opt = lbh.DistributedOptimizer(LARS(param_groups(net, 1e-2), lr=0.5, momentum=0.9),
                                       named_parameters=net.named_parameters(), sparse_as_dense=True,
                                       gradient_mix=GradientMix(noise="gaussian", std=STD, seed=14))
        try:
            for t in range(2):
                opt.zero_grad()
                x, y = data("sparse", t, rank)
                F.cross_entropy(net(x), y).backward()
                opt.step()
            sp[sparse] = snapshot(net)
        except Exception as e:  # noqa: BLE001
            sp[sparse] = f"{type(e).__name__}: {e}"
    out["sparse_as_dense"] = sp
    return out


def run_errors(rank: int) -> dict:
    errors = {}

    def attempt(name, fn):
        try:
            fn()
            errors[name] = None
        except (ValueError, TypeError, RuntimeError) as e:
            errors[name] = f"{type(e).__name__}: {e}"

    def opt_for(model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    m = make_model()
    attempt("mix_world_size", lambda: lbh.DistributedOptimizer(opt_for(m), gradient_mix=GradientMix(world_size=3)))
    attempt("adasum_mix", lambda: lbh.DistributedOptimizer(opt_for(m), op=hvd.Adasum, gradient_mix=GradientMix()))
    attempt("adasum_moments", lambda: lbh.DistributedOptimizer(
        opt_for(m), op=hvd.Adasum, moments=MicroBatchMoments(list(m.parameters()), micro_batch_size=4)))
    attempt("max_mix", lambda: lbh.DistributedOptimizer(opt_for(m), op=hvd.Max, gradient_mix=GradientMix()))
    attempt("sample_mix", lambda: lbh.DistributedOptimizer(opt_for(m), gradient_mix=GradientMix(granularity="sample")))
    attempt("mix_type", lambda: lbh.DistributedOptimizer(opt_for(m), gradient_mix="gaussian"))
    other = make_model()
    attempt("foreign_moments", lambda: lbh.DistributedOptimizer(
        opt_for(m), moments=MicroBatchMoments(list(other.parameters()), micro_batch_size=4)))
    attempt("no_micro_batch_size", lambda: lbh.DistributedOptimizer(opt_for(m), moments=MicroBatchMoments(list(m.parameters()))))
    # A > 1: the estimator's micro_batch_size (documented as the per-pass batch) is not enough
    attempt("bpps_no_micro_batch_size", lambda: lbh.DistributedOptimizer(
        opt_for(m), backward_passes_per_step=2, moments=MicroBatchMoments(list(m.parameters()), micro_batch_size=4)))
    bp = lbh.DistributedOptimizer(opt_for(m), named_parameters=m.named_parameters(),
                                  moments=MicroBatchMoments(list(m.parameters()), micro_batch_size=4))
    attempt("set_bpps_no_micro_batch_size", lambda: bp.set_backward_passes_per_step(2))
    try:
        bp.set_backward_passes_per_step(3, micro_batch_size=12)
        errors["set_bpps_with_micro_batch_size"] = (bp.backward_passes_per_step, bp.lb_dist_state.micro_batch_size)
    except TypeError as e:
        errors["set_bpps_with_micro_batch_size"] = f"TypeError: {e}"
    attempt("named_parameters_mismatch", lambda: lbh.DistributedOptimizer(
        opt_for(m), named_parameters=list(m.named_parameters())[:2], gradient_mix=GradientMix()))
    attempt("named_parameters_dups", lambda: lbh.DistributedOptimizer(
        opt_for(m), named_parameters=[("w", p) for p in m.parameters()], gradient_mix=GradientMix()))
    attempt("double_wrap", lambda: lbh.DistributedOptimizer(hvd.DistributedOptimizer(opt_for(m))))
    attempt("predivide_sum", lambda: lbh.DistributedOptimizer(opt_for(m), op=hvd.Sum, gradient_predivide_factor=2.0))
    # a mix whose world size disagrees only shows at the first backward of a job of another size:
    # here it is built right, then its world_size is changed (e.g. a checkpointed config)
    mm = make_model()
    mix = GradientMix(std=STD)
    opt = lbh.DistributedOptimizer(opt_for(mm), named_parameters=mm.named_parameters(), gradient_mix=mix)
    mix.world_size = 4
    x, y = data("mlp", 0, rank)

    def backward():
        try:
            F.cross_entropy(mm(x), y).backward()
            opt.synchronize()
        finally:
            opt._handles.clear()
    attempt("mix_world_size_at_step", backward)
    # the plain optimizer after wrapping is still usable as an object, and adasum without mix works
    errors["adasum_plain_type"] = type(lbh.DistributedOptimizer(opt_for(make_model()), op=hvd.Adasum)).__mro__[1].__name__
    return errors


def main() -> None:
    out_dir = sys.argv[1]
    quick = "--quick" in sys.argv[2:]
    hvd.init()
    rank = hvd.rank()
    result = {"size": hvd.size(), "rank": rank, "configs": {}, "mpi": hvd.mpi_enabled(), "gloo": hvd.gloo_enabled()}
    for name, cfg in configs(quick).items():
        variants = ("hvd", "none", "none_moments", "gaussian") + (("rademacher", "rademacher_std1")
                                                                  if name == "default" else ())
        result["configs"][name] = {v: run_config(name, cfg, v, rank) for v in variants}
    result["clars"] = run_clars(rank)
    result["training_pass"] = run_training_pass(rank)
    result["training_pass_sum"] = run_training_pass(rank, op=hvd.Sum, grad_scale=1.5)
    result["training_pass_padded"] = run_training_pass_padded(rank)
    result["two_optimizers"] = run_two_optimizers(rank)
    result["errors"] = run_errors(rank)
    result["hvd_flow"] = run_hvd_flow(rank)
    if not quick:
        result["scaled"] = run_scaled(rank)
        result["hooks"] = run_hooks(rank)
        result["per_sample"] = run_per_sample(rank)
        result["broadcast"] = run_broadcast(rank)
        result["elastic_state"] = run_elastic_state(rank)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    hvd.join()
    hvd.shutdown()
    leave()


if __name__ == "__main__":
    main()
