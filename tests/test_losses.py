import math

import pytest
import torch

from fleetlm.errors import ConfigError
from fleetlm.train.losses import divergence, forward_kl, generalized_jsd, reverse_kl

# Two-token distributions worked by hand: teacher (1/2, 1/2), student (3/4, 1/4).
TEACHER = torch.tensor([[0.0, 0.0]])
STUDENT = torch.tensor([[math.log(3.0), 0.0]])


def test_forward_and_reverse_kl_match_hand_values():
    fkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(teacher || student)
    rkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(student || teacher)
    assert forward_kl(STUDENT, TEACHER).item() == pytest.approx(fkl, rel=1e-5)
    assert reverse_kl(STUDENT, TEACHER).item() == pytest.approx(rkl, rel=1e-5)
    assert fkl != pytest.approx(rkl)  # the two directions really differ on this pair


def test_jsd_matches_hand_value_and_beta_half_is_symmetric():
    m = (0.625, 0.375)  # (teacher + student) / 2
    kl_tm = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    kl_sm = 0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])
    jsd = generalized_jsd(STUDENT, TEACHER, beta=0.5).item()
    assert jsd == pytest.approx(0.5 * kl_tm + 0.5 * kl_sm, rel=1e-5)
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 50, generator=gen) * 3, torch.randn(6, 50, generator=gen) * 3
    torch.testing.assert_close(generalized_jsd(s, t, 0.5), generalized_jsd(t, s, 0.5))
    assert (generalized_jsd(s, t, 0.5) <= math.log(2) + 1e-6).all()  # JSD is bounded by ln 2
    # beta != 0.5 weighs the two sides differently: no longer symmetric
    assert not torch.allclose(generalized_jsd(s, t, 0.1), generalized_jsd(t, s, 0.1))


def test_jsd_tends_to_forward_kl_and_reverse_kl_at_the_ends():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 20, generator=gen), torch.randn(4, 20, generator=gen)
    eps = 1e-4
    torch.testing.assert_close(generalized_jsd(s, t, eps) / eps, forward_kl(s, t), rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(generalized_jsd(s, t, 1 - eps) / eps, reverse_kl(s, t), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("method", ["kl", "rkl", "gkd"])
def test_zero_exactly_for_the_same_distribution(method):
    gen = torch.Generator().manual_seed(2)
    t = torch.randn(5, 40, generator=gen)
    same = divergence(method, t + 7.0, t)  # a constant shift of the logits is the same distribution
    assert same.abs().max().item() < 1e-5
    other = divergence(method, torch.randn(5, 40, generator=gen), t)
    assert (other > 1e-3).all()


@pytest.mark.parametrize("method", ["kl", "rkl", "gkd"])
def test_gradients_flow_only_into_the_student(method):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(3, 10, generator=gen).requires_grad_()
    t = torch.randn(3, 10, generator=gen).requires_grad_()
    divergence(method, s, t, beta=0.3).sum().backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_forward_kl_gradient_is_student_minus_teacher_probs():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(2, 8, generator=gen).requires_grad_()
    t = torch.randn(2, 8, generator=gen)
    forward_kl(s, t).sum().backward()
    torch.testing.assert_close(s.grad, torch.softmax(s.detach(), -1) - torch.softmax(t, -1))


def test_temperature_divides_both_logits():
    gen = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 12, generator=gen), torch.randn(3, 12, generator=gen)
    for method in ("kl", "rkl", "gkd"):
        soft = divergence(method, s, t, temperature=2.0)
        torch.testing.assert_close(soft, divergence(method, s / 2, t / 2))
    # softer distributions are closer
    assert (forward_kl(s, t, temperature=4.0) < forward_kl(s, t)).all()


@pytest.mark.parametrize("call", [
    lambda: divergence("mse", STUDENT, TEACHER),
    lambda: generalized_jsd(STUDENT, TEACHER, beta=0.0),
    lambda: generalized_jsd(STUDENT, TEACHER, beta=1.0),
    lambda: forward_kl(STUDENT, TEACHER, temperature=0.0),
    lambda: forward_kl(STUDENT, torch.zeros(1, 3)),
])
def test_bad_arguments_are_config_errors(call):
    with pytest.raises(ConfigError):
        call()
