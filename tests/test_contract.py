"""The rule contract: kinds of layer, user-defined rules, composites that refuse rules that
cannot apply, and the registry a user extends."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lrpx
from lrpx.composites import Composite, First
from lrpx.layers import Twin, kind_of, twin
from lrpx.rules import KINDS, Epsilon, Gamma, Norm, Pass, Rule, Taylor, Uniform, ZPlus


class Gradient(Rule):
    """A user-defined rule: the plain input gradient of a weighted layer."""

    saves = ("input", "weight")

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def relevance(self, layer, relevance, input, weight, bias, output):
        return layer.vjp(relevance, weight, input) * self.scale


def test_every_rule_declares_known_kinds():
    for rule in (Epsilon(), ZPlus(), Gamma(), Pass(), Norm(), Taylor(), Uniform(), Gradient()):
        assert rule.kinds and set(rule.kinds) <= set(KINDS)
    assert Pass().fits("normalization") and Pass().fits("elementwise") and not Pass().fits("sum")
    assert Norm().fits("sum") and Norm().fits("normalization") and not Norm().fits("weighted")


def test_user_rule_is_frozen_without_a_private_call_and_works_in_convert():
    rule = Gradient(2.0)
    with pytest.raises(AttributeError, match="immutable"):
        rule.scale = 3.0
    with pytest.raises(AttributeError, match="immutable"):
        del rule.scale
    assert rule == Gradient(2.0) and rule != Gradient(1.0) and repr(rule) == "Gradient(scale=2.0)"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    lrp = lrpx.convert(model, Composite([(nn.Linear, rule)]))
    x = torch.randn(2, 4, dtype=torch.float64)
    r_out = torch.randn(2, 3, dtype=torch.float64)
    xin = x.clone().requires_grad_()
    (relevance,) = torch.autograd.grad(lrp(xin), xin, r_out)
    # reference: twice the gradient through each Linear, the ReLU passes relevance unchanged
    w1, w2 = (m.weight.detach().numpy() for m in model if isinstance(m, nn.Linear))
    expected = 4.0 * r_out.numpy() @ w2 @ w1
    np.testing.assert_allclose(relevance.numpy(), expected, rtol=1e-12)


def test_subclass_of_a_rule_freezes_after_the_whole_init():
    class Scaled(Epsilon):
        def __init__(self, epsilon: float, factor: float) -> None:
            super().__init__(epsilon)  # the parent's __init__ must not freeze the rule yet
            self.factor = factor

    rule = Scaled(0.1, 2.0)
    assert (rule.epsilon, rule.factor) == (0.1, 2.0)
    with pytest.raises(AttributeError):
        rule.factor = 1.0


def test_rules_without_relevance_or_with_unknown_kinds_are_refused():
    class NoRelevance(Rule):
        pass

    with pytest.raises(TypeError, match="does not implement relevance"):
        NoRelevance()
    with pytest.raises(TypeError, match="unknown layer kinds"):
        class Wrong(Rule):
            kinds = frozenset({"convolution"})

            def relevance(self, layer, relevance, input, weight, bias, output):
                return relevance


def layer_norm_model():
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 2)).double().eval()


@pytest.mark.parametrize("matcher", [nn.LayerNorm, (nn.LayerNorm, nn.Linear), "1"])
def test_composite_refuses_a_rule_on_a_layer_it_names_but_cannot_apply_to(matcher):
    with pytest.raises(ValueError, match=r"names layer '1' \(LayerNorm, normalization\), but Epsilon fits "
                                         r"weighted layers; rules for normalization layers: Pass, Norm"):
        lrpx.convert(layer_norm_model(), Composite([(matcher, Epsilon(0.1))]))


def test_broad_matchers_apply_only_where_their_rule_fits():
    table = Composite([("*", Gamma(0.5)), (lambda name, m: True, Epsilon(0.3))]).assign(layer_norm_model())
    assert table == {"0": Gamma(0.5), "1": Norm(), "2": Pass(), "3": Gamma(0.5)}


@pytest.mark.parametrize("kwargs, where", [
    ({"sum": Pass()}, r"Composite\(sum=Pass\(\)\): that rule is for sum layers, but Pass fits elementwise, "
                      r"normalization layers; rules for sum layers: Norm"),
    ({"elementwise": Epsilon()}, r"Composite\(elementwise=Epsilon"),
    ({"default": Norm()}, r"Composite\(default=Norm"),
    ({"kinds": {"softmax": Epsilon()}}, r"Composite\(kinds=\{'softmax': Epsilon"),
])
def test_fallback_rules_that_do_not_fit_their_kind_are_refused_when_built(kwargs, where):
    with pytest.raises(ValueError, match=where):
        Composite(**kwargs)
    with pytest.raises(ValueError, match="unknown kinds"):
        Composite(kinds={"attention": Taylor()})


def test_fallbacks_per_kind():
    model = layer_norm_model()
    assert Composite(sum=Norm(0.5)).assign(model)["1"] == Norm(0.5)  # the sum rule serves normalisations
    assert Composite(sum=Norm(0.5), kinds={"normalization": Pass()}).assign(model)["1"] == Pass()
    lrp = lrpx.convert(model, Composite(kinds={"normalization": Pass()}))
    assert isinstance(lrp[1].rule, Pass)


def test_twins_check_the_kind_of_their_rule():
    with pytest.raises(TypeError, match=r"LRPLinear: Norm\(epsilon=1e-06\) does not fit weighted layers \(Norm "
                                        r"fits normalization, sum layers\); rules for weighted layers: .*Epsilon"):
        twin(nn.Linear(2, 2), Norm())
    with pytest.raises(TypeError, match=r"LRPReLU: Gamma.* does not fit elementwise layers .* rules for elementwise "
                                        r"layers: Pass$"):
        twin(nn.ReLU(), Gamma())
    assert kind_of(nn.Softmax(-1)) == "softmax" and kind_of(lrpx.layers.Product(None)) == "product"
    assert kind_of(nn.MaxPool2d(2)) is None and kind_of(nn.Module()) is None


class Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.weight


def test_registry_refuses_a_twin_without_a_kind_or_not_a_twin():
    class NoKind(Twin, Scale):
        def forward(self, x):
            return x * self.weight

    model = nn.Sequential(nn.Linear(3, 3), Scale(3)).eval()
    with pytest.raises(TypeError, match="must declare lrp_kind"):
        lrpx.convert(model, twins={Scale: NoKind})
    with pytest.raises(TypeError, match="subclass of lrpx.layers.Twin"):
        lrpx.convert(model, twins={Scale: nn.Linear})
    with pytest.raises(TypeError, match="valid kinds"):
        class BadKind(Twin, Scale):
            lrp_kind = "scale"


def test_twin_from_module_copies_hook_dictionaries():
    linear = nn.Linear(2, 2)
    seen = []
    linear.register_forward_hook(lambda m, args, out: seen.append("original"))
    t = twin(linear, Epsilon())
    t.register_forward_hook(lambda m, args, out: seen.append("twin"))
    linear(torch.ones(1, 2))
    assert seen == ["original"]
    seen.clear()
    t(torch.ones(1, 2))
    assert seen == ["original", "twin"]  # the twin keeps the hooks the layer had
    assert t.weight is linear.weight and t._parameters is not linear._parameters


def test_a_shared_layer_is_converted_under_each_name_and_not_fused():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared).double().eval()
    lrp = lrpx.convert(model, Composite([(nn.Linear, Epsilon(0.01))]))
    assert lrp[0] is lrp[2] and isinstance(lrp[0], Twin) and not lrp[0].fused_relu
    x = torch.randn(2, 3, dtype=torch.float64)
    rel, out = lrpx.explain(lrp, x, 1)
    # reference: explicit LRP-epsilon through both calls of the layer
    w, b = shared.weight.detach().numpy(), shared.bias.detach().numpy()
    xn = x.numpy()
    z1 = xn @ w.T + b
    a1 = np.maximum(z1, 0)
    z2 = a1 @ w.T + b
    r2 = np.zeros_like(z2)
    r2[:, 1] = z2[:, 1]

    def stab(z):
        return z + 0.01 * np.where(z >= 0, 1.0, -1.0)

    r1 = a1 * ((r2 / stab(z2)) @ w)
    expected = xn * ((r1 / stab(z1)) @ w)
    np.testing.assert_allclose(rel.numpy(), expected, rtol=1e-10)


def test_unsupported_module_error_carries_the_modules():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.erf(x)  # no rule for erf

    model = nn.Sequential(nn.Linear(2, 2), Odd(), nn.Sequential(Odd()))
    with pytest.raises(lrpx.UnsupportedModuleError) as info:
        lrpx.convert(model)
    assert info.value.modules == [("1", Odd), ("2.0", Odd)]
    assert info.value.reasons == [f"'{n}': its forward applies erf to values computed from the input, which take "
                                  "no LRP rule" for n in ("1", "2.0")]
    assert "'2.0'" in str(info.value)


def test_softmax_twin_takes_its_rule_from_the_composite():
    model = nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1)).double().eval()
    assert lrpx.rule_table(lrpx.convert(model))["1"] == Taylor()
    with pytest.raises(ValueError, match=r"\(Softmax, softmax\), but Norm fits .* rules for softmax layers: Taylor"):
        lrpx.convert(model, Composite([(nn.Softmax, Norm())]))


def test_composite_fits_first_layer_position_only_to_weighted_layers():
    model = nn.Sequential(nn.ReLU(), nn.Linear(3, 3)).eval()
    assert Composite([(First(), Gamma(0.1))]).assign(model) == {"0": Pass(), "1": Gamma(0.1)}
