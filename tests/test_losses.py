import math

import pytest
import torch
import torch.nn.functional as F

from kdpipe.losses import LOSSES, cross_entropy, hinton_kd, make_loss, soft_kl


def test_soft_kl_matches_a_hand_computed_value():
    # One sample, two classes, T = 2: p = softmax(t/T), q = softmax(s/T), KL = sum p log(p/q), times T².
    s = torch.tensor([[0.0, 2.0]])
    t = torch.tensor([[2.0, 0.0]])
    p = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    q = [p[1], p[0]]
    expected = 4 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert soft_kl(s, t, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_batchmean_not_mean_over_classes():
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    per_sample = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1)
    assert soft_kl(s, t, 1.0).item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    # Repeating the batch must not change a per-sample average.
    assert soft_kl(torch.cat([s, s]), torch.cat([t, t]), 1.0).item() == pytest.approx(per_sample.mean().item(), rel=1e-5)


def test_temperature_squared_keeps_gradient_scale():
    """With T² the soft term's gradient magnitude stays of the same order as T grows (Hinton 2015, sec. 2)."""
    torch.manual_seed(0)
    t = torch.randn(64, 10) * 3
    s0 = torch.randn(64, 10)
    norms = {}
    for temp in (4.0, 16.0):
        s = s0.clone().requires_grad_(True)
        soft_kl(s, t, temp).backward()
        norms[temp] = s.grad.norm().item()
        # Without T² the gradient is T² times smaller.
        s2 = s0.clone().requires_grad_(True)
        (soft_kl(s2, t, temp) / temp**2).backward()
        assert s2.grad.norm().item() == pytest.approx(norms[temp] / temp**2, rel=1e-5)
    # High-temperature limit: gradient ~ (s - t)/(N·C)·..., so norms at T=4 and T=16 agree within 2x.
    assert 0.5 < norms[16.0] / norms[4.0] < 2.0


def test_hinton_kd_combines_ce_and_soft_term():
    torch.manual_seed(1)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    y = torch.randint(0, 10, (5,))
    got = hinton_kd(s, y, t, temperature=3.0, alpha=0.25)
    want = 0.75 * F.cross_entropy(s, y) + 0.25 * soft_kl(s, t, 3.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_alpha_zero_is_plain_cross_entropy_and_needs_no_teacher():
    s = torch.randn(4, 10)
    y = torch.tensor([0, 1, 2, 3])
    assert hinton_kd(s, y, None, temperature=4.0, alpha=0.0).item() == pytest.approx(cross_entropy(s, y).item())
    with pytest.raises(ValueError):
        hinton_kd(s, y, None, temperature=4.0, alpha=0.5)


def test_identical_logits_give_zero_soft_loss():
    s = torch.randn(6, 10)
    assert soft_kl(s, s.clone(), 5.0).item() == pytest.approx(0.0, abs=1e-6)


def test_no_gradient_reaches_the_teacher():
    teacher = torch.nn.Linear(4, 3)
    student = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    with torch.inference_mode():
        t_logits = teacher(x)
    loss = make_loss("kd", temperature=2.0, alpha=0.9)(student(x), torch.zeros(8, dtype=torch.long), t_logits.clone())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_registry_names():
    assert sorted(LOSSES) == ["dkd", "kd", "kd_ls"]


def test_dkd_terms_by_hand_and_the_papers_identity():
    """Zhao et al. 2022, eq. 4: KD = TCKD + (1 - p_t^target)·NCKD, per sample."""
    from kdpipe.losses import decoupled_kd_terms

    s = torch.tensor([[1.0, 0.5, -1.0]])
    t = torch.tensor([[2.0, -0.5, 0.0]])
    y = torch.tensor([0])
    tckd, nckd = decoupled_kd_terms(s, t, y, 1.0)
    ps, pt = F.softmax(s, 1)[0].tolist(), F.softmax(t, 1)[0].tolist()
    b_s, b_t = [ps[0], 1 - ps[0]], [pt[0], 1 - pt[0]]
    want_tckd = sum(bt * math.log(bt / bs) for bt, bs in zip(b_t, b_s))
    qs, qt = [p / (1 - ps[0]) for p in ps[1:]], [p / (1 - pt[0]) for p in pt[1:]]
    want_nckd = sum(a * math.log(a / b) for a, b in zip(qt, qs))
    assert tckd.item() == pytest.approx(want_tckd, rel=1e-5)
    assert nckd.item() == pytest.approx(want_nckd, rel=1e-5)
    kd = soft_kl(s, t, 1.0).item()
    assert kd == pytest.approx(want_tckd + (1 - pt[0]) * want_nckd, rel=1e-5)


def test_dkd_combines_terms_with_alpha_beta_and_t_squared():
    from kdpipe.losses import decoupled_kd, decoupled_kd_terms

    torch.manual_seed(2)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    tckd, nckd = decoupled_kd_terms(s, t, y, 4.0)
    got = decoupled_kd(s, y, t, temperature=4.0, alpha=0.5, beta=8.0)
    assert got.item() == pytest.approx((0.5 * F.cross_entropy(s, y) + 0.5 * 16 * (tckd + 8 * nckd)).item(), rel=1e-5)
    s.requires_grad_(True)
    decoupled_kd(s, y, t, temperature=4.0, alpha=0.5, beta=8.0).backward()
    assert torch.isfinite(s.grad).all()


def test_kd_ls_is_invariant_to_logit_shift_and_scale():
    from kdpipe.losses import kd_logit_standardization, standardize

    torch.manual_seed(3)
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    base = kd_logit_standardization(s, y, t, temperature=2.0, alpha=1.0)
    assert kd_logit_standardization(s, y, 3 * t + 7, temperature=2.0, alpha=1.0).item() == pytest.approx(base.item(), rel=1e-5)
    z = standardize(t)
    assert z.mean(1).abs().max().item() < 1e-6 and (z.std(1) - 1).abs().max().item() < 1e-5
    assert base.item() == pytest.approx(soft_kl(standardize(s), standardize(t), 2.0).item(), rel=1e-6)
