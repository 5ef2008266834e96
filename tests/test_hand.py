"""A small network worked out by hand (every number below is derived in the comments).

Network (float64), input x = (1, -1, 2):

    layer 1: W1 = [[ 1,  2, 1],      b1 = [1, 1]
                   [-1, -1, 1]]
             h  = W1 x + b1
             h1 =  1*1 + 2*(-1) + 1*2 + 1 = 1 - 2 + 2 + 1 = 2
             h2 = -1*1 - 1*(-1) + 1*2 + 1 = -1 + 1 + 2 + 1 = 3
    ReLU:    a = (2, 3)
    layer 2: W2 = [[1, -1],          b2 = [0, 1]
                   [2,  1]]
             z1 = 1*2 - 1*3 + 0 = -1
             z2 = 2*2 + 1*3 + 1 =  8

Contributions x_j w_jk of layer 1 (used throughout):
    h1: (1*1, -1*2, 2*1)    = ( 1, -2, 2), bias 1
    h2: (1*-1, -1*-1, 2*1)  = (-1,  1, 2), bias 1
Initial relevance is the target logit: target 1 -> R = (0, 8); target 0 -> R = (-1, 0).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpx
from lrpx.composites import Composite
from lrpx.layers import twin
from lrpx.rules import Epsilon, Gamma, ZBox, ZPlus

DT = torch.float64
TINY = 1e-12  # "LRP-0": a stabilizer far below every denominator here


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_net() -> nn.Sequential:
    l1, l2 = nn.Linear(3, 2), nn.Linear(2, 2)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[1.0, 2.0, 1.0], [-1.0, -1.0, 1.0]]))
        l1.bias.copy_(torch.tensor([1.0, 1.0]))
        l2.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
        l2.bias.copy_(torch.tensor([0.0, 1.0]))
    return nn.Sequential(l1, nn.ReLU(), l2).to(DT).eval()


X = torch.tensor([[1.0, -1.0, 2.0]], dtype=DT)


def relevance_by_twins(rule, target):
    """Chain the twins by hand: twin(l1) -> ReLU twin -> twin(l2); R = target logit."""
    net = hand_net()
    x = X.clone().requires_grad_()
    h = twin(net[0], rule)(x)
    a = twin(net[1], lrpx.rules.Pass())(h)
    out = twin(net[2], rule)(a)
    r_out = torch.zeros_like(out)
    r_out[0, target] = out[0, target]
    (r_in,) = torch.autograd.grad(out, x, grad_outputs=r_out)
    return r_in, out.detach()


def relevance_by_convert(rule, target):
    model = lrpx.convert(hand_net(), Composite([(nn.Linear, rule)]))
    res = lrpx.explain(model, X.clone(), torch.tensor([target]))
    return res.relevance, res.output


BOTH = pytest.mark.parametrize("route", [relevance_by_twins, relevance_by_convert], ids=["twins", "convert"])


def check(r_in, out, expected):
    torch.testing.assert_close(out, torch.tensor([[-1.0, 8.0]], dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(r_in, torch.tensor([expected], dtype=DT), rtol=1e-9, atol=1e-9)


@BOTH
def test_epsilon_lrp0_target1(route):
    # Top: z2 = 8, s = R/z = 8/8 = 1; R_a = a * W2[1] * s = (2*2*1, 3*1*1) = (4, 3)
    #      (the bias b2 = 1 keeps 1 of the 8).
    # Layer 1: s1 = 4/h1 = 4/2 = 2 -> ( 1, -2, 2)*2 = ( 2, -4, 4)
    #          s2 = 3/h2 = 3/3 = 1 -> (-1,  1, 2)*1 = (-1,  1, 2)
    # R_in = (1, -3, 6)   (sum 4 = 8 - 1 - (1*2 + 1*1): each bias keeps b*s)
    check(*route(Epsilon(TINY), 1), [1.0, -3.0, 6.0])


@BOTH
def test_epsilon_lrp0_target0(route):
    # Top: z1 = -1 and R = -1, so s = R/z = (-1)/(-1) = 1:
    #      R_a = a * W2[0] * s = (2*1, 3*(-1)) = (2, -3)   (the logit's own contributions)
    # Layer 1: s1 = 2/2 = 1  -> ( 1, -2, 2)
    #          s2 = -3/3 = -1 -> ( 1, -1, -2)
    # R_in = (2, -3, 0)  (sum -1 = z1 - 1*1 - 1*(-1): biases keep 1 and -1)
    check(*route(Epsilon(TINY), 0), [2.0, -3.0, 0.0])


@BOTH
def test_epsilon_one_target1(route):
    # Same as LRP-0 but with e = 1: stab(z) = z + 1 for z >= 0.
    # Top: s = 8 / stab(8) = 8/9; R_a = (2*2*8/9, 3*1*8/9) = (32/9, 24/9)
    # Layer 1: s1 = (32/9) / stab(2) = (32/9)/3 = 32/27 -> ( 1, -2, 2)*32/27
    #          s2 = (24/9) / stab(3) = (24/9)/4 = 2/3   -> (-1,  1, 2)*2/3 = (-18, 18, 36)/27
    # R_in = (32 - 18, -64 + 18, 64 + 36)/27 = (14, -46, 100)/27
    check(*route(Epsilon(1.0), 1), [14 / 27, -46 / 27, 100 / 27])


@BOTH
def test_zplus_target1(route):
    # Top (inputs a = (2, 3) >= 0, row W2[1] = (2, 1) all positive, b+ = 1):
    #      den = 2*2 + 3*1 + 1 = 8, s = 8/8 = 1, R_a = (2*2, 3*1) = (4, 3)
    # Layer 1, signed x: only products x_j w_jk > 0 count (x+ w+ and x- w-), plus b+.
    #   h1: ( 1*1 = 1 yes, -1*2 = -2 no, 2*1 = 2 yes), b+ = 1 -> den = 1 + 2 + 1 = 4
    #       s = 4/4 = 1 -> (1, 0, 2)
    #   h2: ( 1*-1 = -1 no, -1*-1 = 1 yes (x- w-), 2*1 = 2 yes), b+ = 1 -> den = 4
    #       s = 3/4 -> (0, 3/4, 3/2)
    # R_in = (1, 3/4, 7/2)
    check(*route(ZPlus(epsilon=TINY), 1), [1.0, 0.75, 3.5])


@BOTH
def test_zplus_target0(route):
    # Top: row W2[0] = (1, -1), b = 0: positive contributions 2*1 = 2 only -> den = 2
    #      s = R/den = -1/2, R_a = (2*1*(-1/2), 0) = (-1, 0)
    # Layer 1: h1 den = 4 (as above), s = -1/4 -> (1, 0, 2) * (-1/4) = (-1/4, 0, -1/2)
    check(*route(ZPlus(epsilon=TINY), 0), [-0.25, 0.0, -0.5])


@BOTH
def test_gamma_target1(route):
    # gamma = 1/4, P = W + gamma W+, N = W + gamma W-, z > 0 -> positive branch only:
    #   z_p = P x+ + N x- + (b + gamma b+),  R_in = (x+ P + x- N) * R / z_p
    # Top: W2[1] = (2, 1) -> P = (2.5, 1.25); a >= 0; bias 1 + 0.25 = 1.25
    #      z_p = 2*2.5 + 3*1.25 + 1.25 = 10, s = 8/10
    #      R_a = (2*2.5*0.8, 3*1.25*0.8) = (4, 3)
    # h1 (z = 2 > 0): W = (1, 2, 1) -> P = (1.25, 2.5, 1.25), N = W = (1, 2, 1); bias 1.25
    #      z_p = 1.25*1 + 1.25*2 + 2*(-1) + 1.25 = 3, s = 4/3
    #      R = (1*1.25, -1*2, 2*1.25) * 4/3 = (5/3, -8/3, 10/3)
    # h2 (z = 3 > 0): W = (-1, -1, 1) -> P = (-1, -1, 1.25), N = (-1.25, -1.25, 1); bias 1.25
    #      z_p = P x+ = 1*(-1) + 2*1.25 = 1.5; N x- = (-1)*(-1.25) = 1.25; z_p = 1.5 + 1.25 + 1.25 = 4
    #      s = 3/4, R = (1*(-1), (-1)*(-1.25), 2*1.25) * 3/4 = (-3/4, 15/16, 15/8)
    # R_in = (5/3 - 3/4, -8/3 + 15/16, 10/3 + 15/8) = (11/12, -83/48, 125/24)
    check(*route(Gamma(0.25, epsilon=TINY), 1), [11 / 12, -83 / 48, 125 / 24])


@BOTH
def test_gamma_target0_negative_branch(route):
    # Top: z1 = -1 < 0 -> negative branch: z_n = N a+ + (b + gamma b-) + P a-
    #      W2[0] = (1, -1): N = (1, -1.25); a = (2, 3) >= 0; b = 0
    #      z_n = 2*1 + 3*(-1.25) = -1.75, s = R/z_n = -1/-1.75 = 4/7
    #      R_a = (2*1*4/7, 3*(-1.25)*4/7) = (8/7, -15/7)        (sums to -1: conserved)
    # h1 (z = 2 > 0, positive branch as in target 1, z_p = 3):
    #      s = (8/7)/3 = 8/21 -> (1.25, -2, 2.5) * 8/21 = (10/21, -16/21, 20/21)
    # h2 (z = 3 > 0, z_p = 4): s = (-15/7)/4 = -15/28
    #      -> (-1, 1.25, 2.5) * (-15/28) = (15/28, -75/112, -75/56)
    # R_in = (10/21 + 15/28, -16/21 - 75/112, 20/21 - 75/56) = (85/84, -481/336, -65/168)
    check(*route(Gamma(0.25, epsilon=TINY), 0), [85 / 84, -481 / 336, -65 / 168])


def test_stabilizer_sign_of_zero_is_positive():
    # W = [[1, -1]], no bias, x = (1, 1): z = 1 - 1 = 0 exactly.
    # stab(0, e) = 0 + e * sign0(0) = +e (zero counts as positive), e = 0.5, R = 1:
    # s = 1/0.5 = 2, R_in = x * W * s = (2, -2). (sign0(0) = -1 would give (-2, 2).)
    lin = nn.Linear(2, 1, bias=False).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0]]))
    x = torch.tensor([[1.0, 1.0]], dtype=DT, requires_grad=True)
    (r_in,) = torch.autograd.grad(twin(lin, Epsilon(0.5))(x), x, torch.ones(1, 1, dtype=DT))
    torch.testing.assert_close(r_in, torch.tensor([[2.0, -2.0]], dtype=DT), rtol=0, atol=1e-15)


def test_zbox_single_layer():
    # W = [[1, -2]], b = 0.5, x = (0.5, -0.5), low = -1, high = 1.
    # z = 0.5 + 1 + 0.5 = 2.
    # Contributions x w - low w+ - high w-:
    #   j=1 (w = 1):  0.5*1 - (-1)*1 - 1*0     = 1.5
    #   j=2 (w = -2): (-0.5)*(-2) - 0 - 1*(-2)  = 1 + 2 = 3
    # den = 4.5 (the biases cancel), R = z = 2: s = 2/4.5 = 4/9
    # R_in = (1.5*4/9, 3*4/9) = (2/3, 4/3)   (sums to 2: conserved)
    lin = nn.Linear(2, 1).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
        lin.bias.fill_(0.5)
    x = torch.tensor([[0.5, -0.5]], dtype=DT, requires_grad=True)
    out = twin(lin, ZBox(-1.0, 1.0, epsilon=TINY))(x)
    (r_in,) = torch.autograd.grad(out, x, out.detach())
    torch.testing.assert_close(out.detach(), torch.tensor([[2.0]], dtype=DT))
    torch.testing.assert_close(r_in, torch.tensor([[2 / 3, 4 / 3]], dtype=DT), rtol=1e-10, atol=1e-10)
