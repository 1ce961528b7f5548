"""The core seam lb_dist.deepspeed builds on, in one process and without DeepSpeed: a flat tensor
declared as fragments of whole layers (lb_dist.optim.LayerFragments) steps exactly like the layers
themselves, its state_dict holds torch's canonical (elementwise) momentum, and bad layouts are
refused. The distributed behaviour is tested with real DeepSpeed engines in tests/test_deepspeed.py."""
from __future__ import annotations

import pytest
import torch

from lb_dist.optim import CLARS, LAMB, LARS, LayerFragments
from lb_dist.optim.lars import EXACT_MOMENTUM_KEYS

SHAPES = [(13, 7), (5, 13), (3, 5)]
PAD = 3


def _setup(cls, **kw):
    torch.manual_seed(0)
    init = [torch.randn(*s, dtype=torch.float64) for s in SHAPES]
    plain = [w.clone().requires_grad_() for w in init]
    # the layers out of order inside the flat tensor, padding at the end (as a ZeRO partition)
    order = [2, 0, 1]
    flat = torch.cat([init[k].reshape(-1) for k in order] + [torch.zeros(PAD, dtype=torch.float64)])
    flat.requires_grad_()
    starts, offset = {}, 0
    for k in order:
        starts[k] = offset
        offset += init[k].numel()
    frags = LayerFragments(tuple(starts[k] for k in order), tuple(init[k].numel() for k in order),
                           tuple(order), tuple(plain), len(plain))
    opt_plain, opt_flat = cls(plain, **kw), cls([flat], **kw)
    opt_flat.set_layer_fragments(flat, frags)
    return plain, flat, starts, opt_plain, opt_flat, frags


def _set_grads(plain, flat, starts, t):
    g = torch.Generator().manual_seed(100 + t)
    grads = [torch.randn(*s, generator=g, dtype=torch.float64) for s in SHAPES]
    for p, gr in zip(plain, grads):
        p.grad = gr.clone()
    flat.grad = torch.zeros_like(flat)
    for k, gr in enumerate(grads):
        flat.grad.view(-1).narrow(0, starts[k], gr.numel()).copy_(gr.reshape(-1))


def _unflat(flat, starts):
    return [flat.detach().view(-1).narrow(0, starts[k], s[0] * s[1]).view(*s) for k, s in enumerate(SHAPES)]


class _Fixed:
    def __init__(self, values):
        self.values = values

    def second_moments(self):
        return self.values


@pytest.mark.parametrize("cls,kw", [(LARS, dict(lr=0.5, weight_decay=0.01, eta=0.02)),
                                    (LARS, dict(lr=0.5, momentum=0.0)),
                                    (LAMB, dict(lr=0.01, weight_decay=0.01)),
                                    (CLARS, dict(lr=0.5, weight_decay=0.01))])
def test_fragments_step_like_whole_layers(cls, kw):
    if cls is CLARS:
        moments = {}
        kw = {**kw, "moments": _Fixed(moments)}
    plain, flat, starts, opt_plain, opt_flat, _ = _setup(cls, **kw)
    if cls is CLARS:
        moments.update({p: torch.tensor(0.3 + i, dtype=torch.float64) for i, p in enumerate(plain)})
    for t in range(5):
        _set_grads(plain, flat, starts, t)
        opt_plain.step()
        opt_flat.step()
    for got, want in zip(_unflat(flat, starts), plain):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)
    assert torch.equal(flat.detach()[-PAD:], torch.zeros(PAD, dtype=torch.float64))   # padding untouched
    trust_plain, trust_flat = opt_plain.trust_ratios(), opt_flat.trust_ratios()
    assert set(trust_flat) == set(plain)
    for p in plain:
        assert float(trust_flat[p]) == pytest.approx(float(trust_plain[p]), rel=1e-12)


def test_state_dict_holds_canonical_momentum_and_resumes():
    plain, flat, starts, opt_plain, opt_flat, frags = _setup(LARS, lr=0.5, weight_decay=0.01)
    for t in range(3):
        _set_grads(plain, flat, starts, t)
        opt_plain.step()
        opt_flat.step()
    sd = opt_flat.state_dict()
    # elementwise only: torch's buffer and the exact pair (B, c per element) for a bit-exact resume
    assert set(sd["state"][0]) == {"momentum_buffer", *EXACT_MOMENTUM_KEYS}
    assert all(v.shape == flat.shape for v in sd["state"][0].values())
    buf = sd["state"][0]["momentum_buffer"]
    for k, p in enumerate(plain):       # torch's buffer = c * B of the plain optimizer
        st = opt_plain.state[p]
        want = (st["momentum_scale"] * st["momentum_buffer"]).reshape(-1)
        torch.testing.assert_close(buf.narrow(0, starts[k], p.numel()), want, rtol=1e-12, atol=1e-14)
    # a fresh optimizer over a copy of the flat tensor, loaded from it, continues the same run
    flat2 = flat.detach().clone().requires_grad_()
    opt2 = LARS([flat2], lr=0.5, weight_decay=0.01)
    opt2.set_layer_fragments(flat2, frags)
    opt2.load_state_dict(sd)
    for t in range(3, 6):
        _set_grads(plain, flat, starts, t)
        flat2.grad = flat.grad.clone()
        opt_flat.step()
        opt2.step()
    torch.testing.assert_close(flat2.detach(), flat.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [LARS, CLARS])
def test_fragmented_momentum_resumes_bit_exactly_in_float32(cls):
    """float32 (as DeepSpeed's fp32 partitions): a fresh optimizer loaded from the state_dict takes
    the same steps bit for bit as the one that kept running (the canonical c*B alone, loaded with
    scale 1, differs by a rounding from the first step on: issue 16's inexact ZeRO-2 resume)."""
    kw = dict(lr=0.5, weight_decay=0.01, nesterov=cls is CLARS)
    plain, flat, starts, _, opt_flat, frags = _setup(cls, **kw)
    flat = flat.detach().float().requires_grad_()
    moments = _Fixed({p: torch.tensor(0.3 + i) for i, p in enumerate(plain)})
    extra = {"moments": moments} if cls is CLARS else {}

    def build(t):
        opt = cls([t], **kw, **extra)
        opt.set_layer_fragments(t, frags)
        return opt

    def grads(t):
        g = torch.Generator().manual_seed(100 + t)
        return torch.randn(flat.shape, generator=g)

    opt = build(flat)
    for t in range(4):
        flat.grad = grads(t)
        opt.step()
    sd = opt.state_dict()
    flat2 = flat.detach().clone().requires_grad_()
    opt2 = build(flat2)
    opt2.load_state_dict(sd)
    for t in range(4, 8):
        flat.grad, flat2.grad = grads(t), grads(t)
        opt.step()
        opt2.step()
    assert torch.equal(flat2.detach(), flat.detach())
    # torch's canonical buffer is still c * B (one rounding)
    st = opt.state[flat]
    want = torch.cat([st["momentum_buffer"].view(-1).narrow(0, s, n) * st["momentum_scale"][j]
                      for j, (s, n) in enumerate(zip(frags.starts, frags.numels))])
    got = torch.cat([opt.state_dict()["state"][0]["momentum_buffer"].view(-1).narrow(0, s, n)
                     for s, n in zip(frags.starts, frags.numels)])
    assert torch.equal(got, want)


def test_a_process_without_fragments_still_reduces():
    """A process whose partition holds no layer piece (padding only) takes part in the reduction
    with zeros and steps nothing."""
    calls = []

    class Recording(LARS):
        def reduce_step_sq_norms(self, sqs, plans):
            calls.append([None if s is None else s.clone() for s in sqs])
            return sqs

    empty = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = Recording([empty], lr=0.5)
    keys = tuple(torch.zeros(1) for _ in range(3))
    opt.set_layer_fragments(empty, LayerFragments((), (), (), keys, 3))
    empty.grad = torch.zeros_like(empty)
    opt.step()
    assert len(calls) == 1 and calls[0][0].tolist() == [0.0] * 6     # [||w||^2 x 3, ||g||^2 x 3]
    assert torch.equal(empty.detach(), torch.zeros(4, dtype=torch.float64))


def test_bad_layouts_are_refused():
    keys = (torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="overlaps"):
        LayerFragments((0, 3), (5, 5), (0, 1), keys, 2)
    with pytest.raises(ValueError, match="outside"):
        LayerFragments((0,), (5,), (2,), keys, 2)
    with pytest.raises(ValueError, match="more than one fragment"):
        LayerFragments((0, 5), (5, 5), (0, 0), keys, 2)
    with pytest.raises(ValueError, match="layer_keys"):
        LayerFragments((0,), (5,), (0,), keys, 3)
    t = torch.zeros(6, requires_grad=True)
    opt = LARS([t], lr=0.1)
    with pytest.raises(ValueError, match="reach element 10"):
        opt.set_layer_fragments(t, LayerFragments((0, 5), (5, 5), (0, 1), keys, 2))
    other = torch.zeros(3, requires_grad=True)
    opt2 = LARS([t, other], lr=0.1)
    opt2.set_layer_fragments(t, LayerFragments((0,), (6,), (0,), keys[:1], 1))
    t.grad, other.grad = torch.zeros(6), torch.zeros(3)
    with pytest.raises(ValueError, match="mixes tensors"):
        opt2.step()
