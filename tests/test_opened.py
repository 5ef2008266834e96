"""Layers without a twin of their own: subclasses of torch layers, leaves whose forward code is
traced and rewritten, forwards with optional arguments (traced with the values their callers
pass), and attention written with ``@`` or ``F.scaled_dot_product_attention``; each checked
against an explicit computation of the rules."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpx
from lrpx.rules import Epsilon

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


def stab(z, e):
    return z + e * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def epsilon_linear(x, w, b, R, e):
    """Input relevance of ``x @ w.T + b`` under the epsilon rule."""
    z = x @ w.T + b
    return x * ((R / stab(z, e)) @ w)


def relevance(model, x, R):
    xin = x.clone().requires_grad_()
    out = model(xin)
    return torch.autograd.grad(out, xin, R)[0], out.detach()


class FunctionalLinear(nn.Linear):
    """A subclass with a forward of its own (as timm's Linear)."""

    def forward(self, input):
        return F.linear(input, self.weight, self.bias)


class PlainSubclass(nn.Linear):
    """A subclass that only adds a method: it runs nn.Linear's forward."""

    def describe(self):
        return "linear"


class StandardisedConv(nn.Conv2d):
    """A weight-standardised convolution: the standardised weight is the linear map's weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("cls", [FunctionalLinear, PlainSubclass])
def test_subclasses_of_linear_take_the_epsilon_rule(cls):
    torch.manual_seed(0)
    layer = cls(5, 3).double()
    model = nn.Sequential(layer).eval()
    lrp = lrpx.convert(model, lrpx.Composite(default=Epsilon(0.1)))
    x, R = torch.randn(4, 5, dtype=DT), torch.randn(4, 3, dtype=DT)
    rel, out = relevance(lrp, x, R)
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rel, epsilon_linear(x, layer.weight.detach(), layer.bias.detach(), R, 0.1),
                               rtol=1e-12, atol=1e-14)
    assert type(model[0]) is cls  # the original is untouched


def test_weight_standardised_convolution_is_the_convolution_with_its_standardised_weight():
    torch.manual_seed(0)
    model = nn.Sequential(StandardisedConv(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 16, 2)).double().eval()
    w = model[0].weight.detach()
    w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
    plain = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2)).double()
    plain.load_state_dict({"0.weight": w, "0.bias": model[0].bias, "3.weight": model[3].weight,
                           "3.bias": model[3].bias})
    composite = lrpx.composites.epsilon_plus()
    x, R = torch.randn(2, 2, 4, 4, dtype=DT), torch.randn(2, 2, dtype=DT)
    got, out = relevance(lrpx.convert(model, composite), x, R)
    expected, ref = relevance(lrpx.convert(plain.eval(), composite), x, R)
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor([0.5, -2.0, 3.0], dtype=DT))

    def forward(self, x):
        return x * self.gamma


class Square(nn.Module):
    def forward(self, x):
        return x * x


def test_leaves_without_twins_are_traced_into_layers():
    lrp = lrpx.convert(nn.Sequential(Scale(), Square()).eval())
    x, R = torch.tensor([[1.0, 2.0, -1.0]], dtype=DT), torch.tensor([[0.3, -0.2, 1.5]], dtype=DT)
    rel, out = relevance(lrp, x, R)
    torch.testing.assert_close(out, (x * torch.tensor([0.5, -2.0, 3.0], dtype=DT)) ** 2)
    # a constant factor passes the relevance, the two halves of a square both reach x
    torch.testing.assert_close(rel, R, rtol=1e-14, atol=1e-14)


class Exp(nn.Module):
    def forward(self, x):
        return x.exp() + 1


class Flip(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class ExpIfPositive(nn.Module):
    def forward(self, x):
        return x.exp() if x.sum() > 0 else x


def test_leaves_that_compute_without_a_rule_are_refused_with_the_reason():
    model = nn.Sequential(nn.Linear(3, 3), Exp(), nn.Sequential(Flip()), nn.Linear(3, 1))
    with pytest.raises(lrpx.UnsupportedModuleError) as info:
        lrpx.convert(model)
    assert info.value.modules == [("1", Exp)]
    msg = str(info.value)
    assert "'1': its forward applies exp to values computed from the input, which take no LRP rule" in msg
    assert "twins=" in msg


def test_leaves_that_do_not_trace_take_their_rules_at_run_time():
    """A data-dependent branch does not trace: the leaf's operations get their rules while it
    runs (a negation passes the relevance), and one without a rule is named in a warning."""
    lrp = lrpx.convert(nn.Sequential(nn.Sequential(Flip())).eval())
    assert list(lrp.lrpx_graph.oplevel) == ["0.0"]
    x, R = torch.tensor([[1.0, -4.0, 2.0]], dtype=DT), torch.tensor([[0.3, -0.2, 1.5]], dtype=DT)
    rel, out = relevance(lrp, x, R)
    torch.testing.assert_close(out, -x)
    torch.testing.assert_close(rel, R, rtol=1e-14, atol=1e-14)  # -x: R_x = (-x) R / (-x)

    lrp = lrpx.convert(nn.Sequential(ExpIfPositive()).eval())
    x = torch.tensor([[1.0, 2.0]], dtype=DT, requires_grad=True)
    with pytest.warns(lrpx.oplevel.UnruledOperationWarning, match="ExpIfPositive applies exp"):
        (rel,) = torch.autograd.grad(lrp(x), x, torch.ones(1, 2, dtype=DT))
    torch.testing.assert_close(rel, x.detach().exp())  # the plain gradient, as the warning says


class Block(nn.Module):
    """A residual block whose shortcut is optional (as DLA's): ``None`` means the input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Linear(4, 4)

    def forward(self, x, shortcut=None, scale: bool = False):
        if shortcut is None:
            shortcut = x
        out = self.conv(x) + shortcut
        return out * 2 if scale else out


class Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.third = Block(), Block(), Block()

    def forward(self, x):
        y = self.first(x)  # shortcut left at None
        z = self.second(y, x)  # shortcut given
        return self.third(z, None, True)


def test_optional_arguments_are_traced_with_what_the_callers_pass():
    torch.manual_seed(0)
    model = Tree().double().eval()
    for block in (model.first, model.second, model.third):
        nn.init.zeros_(block.conv.bias)
    lrp = lrpx.convert(model, lrpx.Composite(default=Epsilon(1e-12), sum=lrpx.rules.Norm(1e-12)))
    x = torch.randn(3, 4, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(lrp(x), model(x), rtol=1e-14, atol=1e-14)
    R = torch.rand(3, 4, dtype=DT)
    rel, out = relevance(lrp, x, R)
    # no biases, every sum the Norm rule, every layer epsilon, the factor 2 passes: conserved
    torch.testing.assert_close(rel.sum(), R.sum(), rtol=1e-9, atol=1e-12)
    # a shortcut traced as the tensor it never is would fail here (Tensor + None)
    assert sum(isinstance(m, lrpx.layers.Add) for m in lrp.modules()) == 3
    with pytest.raises(AssertionError, match="scale has been specialized to have value True"):
        lrp.third(x, None, False)


class Attention(nn.Module):
    """Self-attention written as timm and Hugging Face write it (fused or with ``@``), with an
    optional additive mask held by the module."""

    def __init__(self, fused: bool, causal: bool = False, mask: torch.Tensor | None = None):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.fused, self.causal = fused, causal
        self.register_buffer("mask", mask)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)
        else:
            a = (q * 0.5) @ k.transpose(-2, -1)
            if self.mask is not None:
                a = a + self.mask  # a sum with a constant: Norm(0) passes the relevance to a
            o = a.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, 8))


def attention_oracle(model, x, R, e, mask=None, causal=False):
    """Input relevance of ``Attention`` from the AttnLRP rules, step by step."""
    w, bq = model.qkv.weight.detach(), model.qkv.bias.detach()
    b, n, _ = x.shape
    qkv = x @ w.T + bq
    heads = qkv.reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4)
    q, k, v = heads[0] * 0.5, heads[1], heads[2]
    s = q @ k.transpose(-2, -1)
    if causal:
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s + mask
    A = torch.softmax(s, -1)
    o = A @ v
    z = o.transpose(1, 2).reshape(b, n, 8)
    R_z = epsilon_linear(z, model.proj.weight.detach(), model.proj.bias.detach(), R, e)
    R_o = R_z.reshape(b, n, 2, 4).transpose(1, 2)
    S = R_o / stab(2 * o, e)
    R_A, R_v = A * (S @ v.transpose(-2, -1)), v * (A.transpose(-2, -1) @ S)
    R_s = torch.where(torch.isinf(s), 0.0, s * (R_A - A * R_A.sum(-1, keepdim=True)))
    raw = q @ k.transpose(-2, -1)
    if mask is not None:  # a non-zero bias keeps its share of the scores' relevance (Norm rule)
        bias = mask.masked_fill(torch.isinf(mask), 0.0).expand_as(raw)
        R_s = torch.where(bias == 0, R_s, raw * R_s / stab(raw + bias, e))
    S = R_s / stab(2 * raw, e)
    R_q, R_k = q * (S @ k), k * (S.transpose(-2, -1) @ q)
    R_qkv = torch.stack([R_q, R_k, R_v]).permute(1, 3, 0, 2, 4).reshape(b, n, 24)
    return epsilon_linear(x, w, bq, R_qkv, e)


@pytest.mark.parametrize("fused,causal,masked", [(False, False, None), (False, False, "inf"), (True, False, None),
                                                 (True, True, None), (True, False, "inf"), (True, False, "bias")])
def test_attention_in_forward_code_takes_the_attnlrp_rules(fused, causal, masked):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    mask = None
    if masked == "inf":  # positions left out
        mask = torch.zeros(5, 5, dtype=DT).masked_fill(torch.rand(5, 5, generator=g) < 0.3, float("-inf"))
        mask.fill_diagonal_(0)
    elif masked == "bias":  # a relative position bias, some entries 0, one position left out
        mask = torch.randn(5, 5, generator=g, dtype=DT).masked_fill(torch.rand(5, 5, generator=g) < 0.3, 0.0)
        mask[0, 1] = float("-inf")
    attention = Attention(fused, causal, mask).double()
    model = nn.Sequential(attention).eval()
    e = 1e-3  # the fused op scales by 1/sqrt(4) = 0.5 itself, as the written-out form does
    composite = lrpx.Composite(default=Epsilon(e), sum=lrpx.rules.Norm(0.0), kinds={"bilinear": lrpx.rules.Uniform(e)})
    lrp = lrpx.convert(model, composite)
    x, R = torch.randn(2, 5, 8, dtype=DT), torch.randn(2, 5, 8, dtype=DT)
    rel, out = relevance(lrp, x, R)
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rel, attention_oracle(attention, x, R, e, mask, causal), rtol=1e-9, atol=1e-12)
    layers = {type(m).__name__ for m in lrp.modules()}
    assert ("ScaledDotProductAttention" in layers) == fused and ("Matmul" in layers) != fused


def test_scaled_dot_product_attention_refuses_dropout():
    layer = lrpx.layers.ScaledDotProductAttention()
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="dropout_p=0.1: relevance is defined in eval mode"):
        layer(q, q, q, dropout_p=0.1)
    gqa = layer(q, q[:, :1], q[:, :1], enable_gqa=True)
    torch.testing.assert_close(gqa, F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True))


class Branchy(nn.Module):
    """Forward code that branches on the data: fx cannot trace it, so its operations take
    their rules at run time."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 100:
            return self.a(x)
        s = torch.softmax(self.b(x), -1)
        return s * 2.0 + x - 0.5


def test_untraceable_forward_takes_rules_at_run_time():
    torch.manual_seed(0)
    model = nn.Sequential(Branchy()).double().eval()
    e, n = 1e-3, 1e-4
    lrp = lrpx.convert(model, lrpx.Composite(default=Epsilon(e), sum=lrpx.rules.Norm(n)))
    assert list(lrp.lrpx_graph.oplevel) == ["0"] and "control flow" in lrp.lrpx_graph.oplevel["0"]
    x, R = torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(lrp(x), model(x), rtol=0, atol=0)
    rel, out = relevance(lrp, x, R)
    # the rules written out: sum with the constant -0.5, sum of 2s and x, the factor 2 passes,
    # softmax by Taylor, the Linear layer by epsilon
    W, b = model[0].b.weight.detach(), model[0].b.bias.detach()
    z = x @ W.T + b
    s = torch.softmax(z, -1)
    v = 2 * s + x
    R_v = v * R / stab(v - 0.5, n)
    R_u, R_x1 = 2 * s * R_v / stab(v, n), x * R_v / stab(v, n)
    R_z = z * (R_u - s * R_u.sum(-1, keepdim=True))
    torch.testing.assert_close(rel, R_x1 + epsilon_linear(x, W, b, R_z, e), rtol=1e-10, atol=1e-13)
    assert type(model[0]) is Branchy  # the original keeps its class


class Squares(nn.Module):
    def forward(self, x):
        return torch.square(x) + x ** 2


class Position(nn.Module):
    """A position code computed from sizes its caller passes (no relevance reaches it)."""

    def forward(self, h, w):
        return torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w).cos()


class WithPosition(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = Position()

    def forward(self, x):
        return x + self.pos(x.shape[-2], x.shape[-1])


def test_squares_and_position_codes_from_sizes():
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=DT)
    R = torch.tensor([[0.3, 1.0, -0.7]], dtype=DT)
    rel, out = relevance(lrpx.convert(nn.Sequential(Squares()).eval()), x, R)
    torch.testing.assert_close(out, 2 * x ** 2)
    # a sum of two products of two activations: the halves of each square both reach x
    torch.testing.assert_close(rel, R, rtol=1e-5, atol=1e-7)
    x = torch.randn(2, 1, 3, 4, dtype=DT)
    R = torch.randn(2, 1, 3, 4, dtype=DT)
    lrp = lrpx.convert(nn.Sequential(WithPosition()).eval(), lrpx.Composite(sum=lrpx.rules.Norm(0.0)))
    rel, out = relevance(lrp, x, R)
    pos = torch.arange(12, dtype=DT).view(1, 1, 3, 4).cos()
    torch.testing.assert_close(rel, x * R / (x + pos), rtol=1e-12, atol=1e-12)  # the code keeps its share


class Table(nn.Module):
    """A leaf whose forward is rewritten and whose other method its caller uses."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, dtype=DT))
        self.register_buffer("scale", torch.tensor(2.0, dtype=DT))

    def extra(self):
        return self.scale

    def forward(self, x):
        return F.linear(x, self.weight)


class UsesTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = Table()

    def forward(self, x):
        return self.table(x) * self.table.extra()


def test_a_forward_that_cannot_be_rebuilt_takes_rules_at_run_time(monkeypatch):
    import torch.fx as fx

    build = fx.GraphModule

    def fails_for_uses_table(root, graph, class_name="GraphModule"):
        if class_name == "UsesTable":  # as fx fails on an attribute it cannot copy
            raise AttributeError("'Table' object has no attribute 'scale'")
        return build(root, graph, class_name)

    monkeypatch.setattr(lrpx.graph.fx, "GraphModule", fails_for_uses_table)
    torch.manual_seed(0)
    model = nn.Sequential(UsesTable()).eval()
    lrp = lrpx.convert(model, lrpx.Composite(default=Epsilon(1e-9)))
    monkeypatch.undo()
    assert "cannot be rebuilt" in lrp.lrpx_graph.oplevel["0"]
    assert type(lrp[0].table).__name__ == "Table" and hasattr(lrp[0].table, "extra")  # the original, inside
    x, R = torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT)
    rel, out = relevance(lrp, x, R)
    torch.testing.assert_close(out, model(x).detach(), rtol=0, atol=0)
    W = model[0].table.weight.detach()
    # the product with the buffer passes relevance, the rewritten F.linear takes epsilon
    torch.testing.assert_close(rel, epsilon_linear(x, W, torch.zeros(3, dtype=DT), R, 1e-9), rtol=1e-7, atol=1e-9)


class AugmentedBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(3, 3)

    def forward(self, x):
        h = self.b(x)
        if x.sum() > 100:  # untraceable
            return h
        h += x  # x.add_(...) on an output the Linear twin saved
        return F.relu(h, inplace=True)


def test_augmented_assignments_at_run_time_are_computed_out_of_place():
    torch.manual_seed(0)
    model = nn.Sequential(AugmentedBranchy()).double().eval()
    lrp = lrpx.convert(model, lrpx.Composite(default=Epsilon(1e-3), sum=lrpx.rules.Norm(1e-4)))
    assert list(lrp.lrpx_graph.oplevel) == ["0"]
    x, R = torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    rel, out = relevance(lrp, x, R)
    torch.testing.assert_close(out, model(x).detach(), rtol=0, atol=0)
    W, b = model[0].b.weight.detach(), model[0].b.bias.detach()
    z = x @ W.T + b
    # the ReLU passes relevance (Pass), the sum splits it by the Norm rule, the Linear by epsilon
    share = R / stab(z + x, 1e-4)
    torch.testing.assert_close(rel, x * share + epsilon_linear(x, W, b, z * share, 1e-3), rtol=1e-10, atol=1e-13)


class Extend(nn.Module):
    """Appends to the list it is given, as torchvision's extra FPN levels do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, features: list):
        features.extend([F.relu(self.lin(features[-1]))])  # a call whose result nothing reads
        return features


class UsesExtend(nn.Module):
    def __init__(self):
        super().__init__()
        self.extend = Extend()

    def forward(self, x):
        features = self.extend([x])
        return features[0] + features[-1]


def test_calls_that_change_a_list_argument_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(UsesExtend()).double().eval()
    lrp = lrpx.convert(model)
    x = torch.randn(2, 3, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(lrp(x), model(x), rtol=1e-14, atol=1e-14)


class KeywordCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 100:  # untraceable
            return x
        h = F.linear(x, self.lin.weight, bias=self.lin.bias)
        return F.layer_norm(h, normalized_shape=(3,), eps=1e-5)


def test_run_time_rules_bind_keyword_arguments():
    torch.manual_seed(0)
    model = nn.Sequential(KeywordCalls()).double().eval()
    lrp = lrpx.convert(model, lrpx.Composite(default=Epsilon(1e-3), kinds={"normalization": lrpx.rules.Pass()}))
    x, R = torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    rel, out = relevance(lrp, x, R)
    torch.testing.assert_close(out, model(x).detach(), rtol=0, atol=0)  # the bias is not lost
    W, b = model[0].lin.weight.detach(), model[0].lin.bias.detach()
    torch.testing.assert_close(rel, epsilon_linear(x, W, b, R, 1e-3), rtol=1e-10, atol=1e-13)  # norm: Pass


class Contract(nn.Module):
    """Scores of the tokens with the flipped tokens written with ``torch.einsum``; ``branch``
    adds a data-dependent test, so that the forward takes its rules at run time."""

    def __init__(self, branch: bool):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        if self.branch and x.sum() < -1e9:
            x = -x
        return torch.einsum("bid,bjd->bij", x, x.flip(1))


@pytest.mark.parametrize("branch", [False, True], ids=["traced", "run-time"])
def test_einsum_of_two_activations_takes_the_bilinear_rule(branch):
    lrp = lrpx.convert(nn.Sequential(Contract(branch)).eval())
    assert bool(lrp.lrpx_graph.oplevel) is branch
    g = torch.Generator().manual_seed(3)
    x, R = torch.randn(2, 3, 4, generator=g, dtype=DT), torch.randn(2, 3, 3, generator=g, dtype=DT)
    rel, out = relevance(lrp, x, R)
    q, k = x, x.flip(1)
    z = q @ k.transpose(1, 2)
    S = R / stab(2 * z, 1e-6)  # AttnLRP: epsilon on each factor, half the relevance each
    expected = q * (S @ k) + (k * (S.transpose(1, 2) @ q)).flip(1)
    torch.testing.assert_close(out, z)
    torch.testing.assert_close(rel, expected, rtol=1e-12, atol=1e-12)


class SameConv(nn.Conv2d):
    """A convolution that pads its input on the fly to keep the size (as timm's Conv2dSame):
    sizes computed with Python arithmetic from the input do not trace."""

    def forward(self, x):
        pad = max((math.ceil(x.shape[-1] / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0]
                  - x.shape[-1], 0)
        x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ConstantFactors(nn.Module):
    """A factor and a summand computed from parameters alone, in a forward that does not trace."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor([0.2, -0.4, 0.1], dtype=DT))
        self.shift = nn.Parameter(torch.tensor([0.3, 0.5, -0.2], dtype=DT))

    def forward(self, x):
        if x.sum() < -1e9:
            x = -x
        return x * self.log_scale.exp() + 2 * self.shift


def test_values_from_parameters_alone_are_constants_at_run_time():
    lrp = lrpx.convert(nn.Sequential(ConstantFactors()).eval())
    assert list(lrp.lrpx_graph.oplevel) == ["0"]
    x, R = torch.tensor([[1.0, -2.0, 0.5]], dtype=DT), torch.tensor([[0.3, -0.2, 1.5]], dtype=DT)
    rel, out = relevance(lrp, x, R)
    a = x * torch.tensor([0.2, -0.4, 0.1], dtype=DT).exp()
    z = a + 2 * torch.tensor([0.3, 0.5, -0.2], dtype=DT)
    # the scale passes all of the relevance to x (not half to the parameter); the shift takes
    # its share like a bias
    torch.testing.assert_close(rel, a * R / stab(z, 1e-6), rtol=1e-13, atol=1e-13)


def test_convolutions_that_do_not_trace_take_the_weighted_rule_at_run_time():
    torch.manual_seed(0)
    conv = SameConv(2, 3, 3, stride=2).double().eval()
    lrp = lrpx.convert(nn.Sequential(conv))
    assert list(lrp.lrpx_graph.oplevel) == ["0"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 5, 5, generator=g, dtype=DT)
    R = torch.randn(1, 3, 3, 3, generator=g, dtype=DT)
    rel, out = relevance(lrp, x, R)
    xp = F.pad(x, [1, 1, 1, 1])
    z = F.conv2d(xp, conv.weight, conv.bias, 2)
    expected = xp * torch.nn.grad.conv2d_input(xp.shape, conv.weight, R / stab(z, 1e-6), stride=2)
    torch.testing.assert_close(out, z)
    torch.testing.assert_close(rel, expected[..., 1:-1, 1:-1], rtol=1e-12, atol=1e-12)
    # a composite entry that names the class of the module gives its rule
    rule = lrpx.rules.ZPlus()
    lrp = lrpx.convert(nn.Sequential(conv), lrpx.Composite([(nn.Conv2d, rule)]))
    assert lrp[0].lrpx_rules["weighted"] is rule


class Patches(nn.Module):
    """Returns the tokens and the grid's size, as ViT-like patch embeddings do."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class SineCode(nn.Module):
    """A position code computed from sizes alone."""

    def forward(self, h: int, w: int):
        grid = torch.arange(h * w, dtype=torch.float64)
        return torch.stack([grid.sin(), grid.cos()], -1)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.patches, self.position = Patches(), SineCode()

    def forward(self, x):
        x, (h, w) = self.patches(x)
        return x + self.position(h, w)


def test_sizes_a_child_returns_beside_its_output_are_sizes():
    """``h, w`` unpacked from a child's output are sizes, so the code built from them is a
    constant operand that takes its share of the sum like a bias (not an operation on the
    input without a rule)."""
    lrp = lrpx.convert(Tokens().eval())
    g = torch.Generator().manual_seed(2)
    x, R = torch.randn(1, 2, 2, 3, generator=g, dtype=DT), torch.randn(1, 6, 2, generator=g, dtype=DT)
    rel, out = relevance(lrp, x, R)
    tokens = x.flatten(2).transpose(1, 2)
    grid = torch.arange(6, dtype=DT)
    z = tokens + torch.stack([grid.sin(), grid.cos()], -1)
    torch.testing.assert_close(out, z)
    expected = (tokens * R / stab(z, 1e-6)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(rel, expected, rtol=1e-12, atol=1e-12)


class Mix(nn.Module):
    """Tokens mixed by a fixed matrix from the left and projected by a parameter from the
    right; ``branch`` makes the forward take its rules at run time."""

    def __init__(self, branch: bool):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.branch = branch
        self.register_buffer("mix", torch.randn(3, 3, generator=g, dtype=DT))
        self.proj = nn.Parameter(torch.randn(4, 2, generator=g, dtype=DT))

    def forward(self, x):
        if self.branch and x.sum() < -1e9:
            x = -x
        return (self.mix @ x) @ self.proj


@pytest.mark.parametrize("branch", [False, True], ids=["traced", "run-time"])
def test_products_with_a_factor_from_parameters_take_the_weighted_rule(branch):
    model = Mix(branch).eval()
    lrp = lrpx.convert(nn.Sequential(model))
    assert bool(lrp.lrpx_graph.oplevel) is branch
    g = torch.Generator().manual_seed(5)
    x, R = torch.randn(2, 3, 4, generator=g, dtype=DT), torch.randn(2, 3, 2, generator=g, dtype=DT)
    rel, out = relevance(lrp, x, R)
    h = model.mix @ x
    z = h @ model.proj
    R_h = h * ((R / stab(z, 1e-6)) @ model.proj.T)  # epsilon on the linear map h -> h @ proj
    expected = x * (model.mix.T @ (R_h / stab(h, 1e-6)))  # and on x -> mix @ x
    torch.testing.assert_close(out, z)
    torch.testing.assert_close(rel, expected, rtol=1e-12, atol=1e-12)
    assert lrp[0].proj.grad is None
