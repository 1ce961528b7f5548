"""lb_dist.schedules against the papers' formulas written out here."""
import math

import pytest
import torch

from lb_dist.schedules import (InverseSqrt, PolynomialWarmupDecay, inverse_sqrt, linear_scaling,
                               polynomial_warmup_decay, scaled_warmup_steps)

# GradientMix Table 3, LARS column: T = 2512, t_warmup = 706, p_warmup = 1, p_decay = 2,
# eta_peak = 29, eta_final = 1e-4 (eta_init is not given: 0).
T, TW, PEAK, FINAL = 2512, 706, 29.0, 1e-4


def eq15(t, init, peak, final, tw, total, pw, pd):
    """GradientMix appendix A, eq. (15)."""
    if t <= tw:
        return init + (peak - init) * (t / tw) ** pw
    return final + (peak - final) * ((total - t) / (total - tw)) ** pd


@pytest.mark.parametrize("pw", [1.0, 2.0])
def test_polynomial_matches_eq15(pw):
    for t in [0, 1, 100, TW - 1, TW, TW + 1, 1500, T - 1, T]:
        got = polynomial_warmup_decay(t, peak=PEAK, total_steps=T, warmup_steps=TW, final=FINAL,
                                      warmup_power=pw, decay_power=2.0)
        assert got == pytest.approx(eq15(t, 0.0, PEAK, FINAL, TW, T, pw, 2.0), rel=1e-12, abs=1e-15)
    # continuity at the peak, the end value, and past the end
    assert polynomial_warmup_decay(TW, peak=PEAK, total_steps=T, warmup_steps=TW) == PEAK
    assert polynomial_warmup_decay(T + 50, peak=PEAK, total_steps=T, warmup_steps=TW, final=FINAL) == FINAL


def test_polynomial_without_warmup_starts_at_peak():
    assert polynomial_warmup_decay(0, peak=6.4, total_steps=100, warmup_steps=0) == 6.4
    assert polynomial_warmup_decay(50, peak=6.4, total_steps=100, warmup_steps=0, decay_power=1.0) == \
        pytest.approx(3.2)


def test_inverse_sqrt_is_vaswani_normalised():
    d, w = 512, 4000
    vaswani = [d ** -0.5 * min(n ** -0.5, n * w ** -1.5) for n in range(1, 20001, 7)]
    peak = d ** -0.5 * w ** -0.5
    ours = [inverse_sqrt(n - 1, peak=peak, warmup_steps=w) for n in range(1, 20001, 7)]
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64),
                               torch.tensor(vaswani, dtype=torch.float64), rtol=1e-12, atol=0)
    assert max(inverse_sqrt(s, peak=1.0, warmup_steps=w) for s in range(10000)) == pytest.approx(1.0)


def test_scaling_rules():
    assert linear_scaling(0.1, 128, 8192) == pytest.approx(6.4)        # CLARS CIFAR
    assert linear_scaling(0.1, 200, 200) == pytest.approx(0.1)
    assert scaled_warmup_steps(4000, 64, 64) == 4000
    assert scaled_warmup_steps(4000, 64, 1024) == 250
    assert scaled_warmup_steps(4000, 64, 10 ** 7) == 1
    assert scaled_warmup_steps(0, 64, 1024) == 0


def _lrs(sched_factory, steps, lrs=(2.0, 0.5)):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])
    sched = sched_factory(opt)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out, opt, sched


def test_polynomial_scheduler_follows_eq15_per_group_and_resumes():
    total, warm = 30, 7
    make = lambda opt: PolynomialWarmupDecay(opt, total, warm, init_factor=0.1, final_factor=0.01,
                                             warmup_power=2.0, decay_power=2.0)
    got, _, _ = _lrs(make, total)
    for t, (a, b) in enumerate(got):
        assert a == pytest.approx(eq15(t, 0.2, 2.0, 0.02, warm, total, 2.0, 2.0))
        assert b == pytest.approx(eq15(t, 0.05, 0.5, 0.005, warm, total, 2.0, 2.0))
    # resume at step 12 from a state_dict gives the same rates afterwards
    _, opt, sched = _lrs(make, 12)
    state = sched.state_dict()
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt2 = torch.optim.SGD([{"params": [p], "lr": lr, "initial_lr": lr} for p, lr in zip(params, (2.0, 0.5))])
    sched2 = PolynomialWarmupDecay(opt2, total, warm, init_factor=0.1, final_factor=0.01,
                                   warmup_power=2.0, decay_power=2.0, last_epoch=11)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(got[13])


def test_inverse_sqrt_scheduler():
    got, _, _ = _lrs(lambda opt: InverseSqrt(opt, 5), 20, lrs=(1.0,))
    for t, (a,) in enumerate(got):
        assert a == pytest.approx(min((t + 1) / 5, math.sqrt(5 / (t + 1))))


@pytest.mark.parametrize("kwargs, word", [
    (dict(peak=1.0, total_steps=10, warmup_steps=10), "warmup_steps"),
    (dict(peak=1.0, total_steps=0, warmup_steps=0), "total_steps"),
    (dict(peak=-1.0, total_steps=10, warmup_steps=1), "peak"),
    (dict(peak=1.0, total_steps=10, warmup_steps=1, decay_power=0.0), "decay_power"),
    (dict(peak=1.0, total_steps=10, warmup_steps=1.5), "warmup_steps"),
])
def test_bad_arguments_name_themselves(kwargs, word):
    with pytest.raises(ValueError, match=word):
        polynomial_warmup_decay(0, **kwargs)
    with pytest.raises(ValueError, match="step"):
        polynomial_warmup_decay(-1, peak=1.0, total_steps=10, warmup_steps=1)
