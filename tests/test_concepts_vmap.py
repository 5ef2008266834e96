"""Conditional relevance from one forward pass: the conditions as the rows of a batched backward
pass (``torch.func.vmap``, ``is_grads_batched``) against the same rows one at a time, and
against the input repeated once per condition."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lrpx
from lrpx import concepts
from lrpx.rules import Epsilon, Gamma

from zoo import randomized

pytestmark = pytest.mark.usefixtures("one_thread")


class Counter(nn.Module):
    """Identity that counts its calls (kept as it is by ``convert``: ``twins={Counter: None}``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def vgg_like() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Counter(), nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10), nn.ReLU(),
                         nn.Linear(10, 4)).double().eval()


def resnet_like() -> nn.Module:
    model = randomized("resnet18", num_classes=5)
    return nn.Sequential(Counter(), model).double().eval()


CASES = {
    "vgg": (vgg_like, (2, 3, 8, 8), [{}, {"1": [0, 3]}, {"3": [5], "6": [1, 2]}, {"6": [4]}, {"3": [7]}],
            ["1", "6"]),
    "resnet": (resnet_like, (2, 3, 32, 32),
               [{}, {"1.layer1.0.conv1": [3]}, {"1.layer2": [0, 9], "1.layer1": [2]}, {"1.layer3.1": [4]},
                {"1.layer4.0.conv2": [1, 2, 3]}], ["1.layer1", "1.layer3.1.conv1"]),
}


def _converted(case: str, composite=None):
    build, shape, conditions, record = CASES[case]
    lrp = lrpx.convert(build(), composite or lrpx.composites.epsilon_plus(), twins={Counter: None})
    torch.manual_seed(1)
    return lrp, torch.randn(shape, dtype=torch.float64), conditions, record


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_forward_equals_the_repeated_input(case):
    lrp, x, conditions, record = _converted(case)
    counter = lrp[0]
    counter.calls = 0
    one = concepts.attribute(lrp, x, [1, 3], conditions=conditions, record=record, batch_size=4)
    assert counter.calls == 1  # one forward; the 5 conditions of 2 inputs take 3 backward passes
    counter.calls = 0
    normalized = tuple({name: tuple(channels) for name, channels in c.items()} for c in conditions)
    repeated = concepts._repeated(lrp, x, [1, 3], normalized, record, 1, "logit", 4)
    assert counter.calls == 3  # the input repeated: a forward per pass of 4 rows (2 conditions x 2 inputs)
    assert one.relevance.shape == (2, len(conditions)) + x.shape[1:]
    scale = repeated.relevance.abs().max()
    torch.testing.assert_close(one.relevance, repeated.relevance, rtol=1e-12, atol=1e-14 * scale)
    for name in record:
        torch.testing.assert_close(one.recorded[name], repeated.recorded[name], rtol=1e-12, atol=1e-14 * scale)
    # the forwards of 2 and of 4 rows may take different convolution kernels: float64 rounding apart
    torch.testing.assert_close(one.output, repeated.output, rtol=1e-13, atol=0)
    assert one.target.tolist() == [1, 3] and one.conditions == normalized
    # every pass size gives the same rows in the same order
    for rows in (1, 3, 100):
        split = concepts.attribute(lrp, x, [1, 3], conditions=conditions, record=record, batch_size=rows)
        torch.testing.assert_close(split.relevance, one.relevance, rtol=1e-12, atol=1e-14 * scale)


def test_conditions_on_every_channel_of_a_layer_sum_to_the_plain_explanation():
    lrp, x, _, _ = _converted("resnet")
    x = x[:1]
    with pytest.warns(UserWarning, match="keep channels that receive no relevance"):  # channels dead after a ReLU
        every = concepts.attribute(lrp, x, conditions=[{"1.layer2": [c]} for c in range(128)], batch_size=64)
    plain = lrpx.explain(lrp, x).relevance
    # no skip connection passes around the output of layer2: the sum is the whole heatmap
    torch.testing.assert_close(every.relevance.sum(1), plain, rtol=1e-10, atol=1e-13 * plain.abs().max())


class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, relevance):
        return relevance.clone()  # a relevance-passing backward of the user's own


class Doubler(nn.Module):
    def forward(self, x):
        return Double.apply(x)


def test_a_foreign_autograd_function_takes_the_repeated_input_with_a_reason():
    torch.manual_seed(0)
    model = nn.Sequential(Counter(), nn.Conv2d(3, 4, 3), Doubler(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double().eval()
    lrp = lrpx.convert(model, lrpx.composites.epsilon_plus(), twins={Counter: None, Doubler: None})
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"repeats the input once per condition: .*autograd Function "
                                         r".*test_concepts_vmap\.Double\b"):
        result = concepts.attribute(lrp, x, 0, conditions=[{"1": [c]} for c in range(4)], batch_size=4)
    assert lrp[0].calls == 3  # the forward that met the Function, then 8 rows in passes of 4
    plain = lrpx.explain(lrp, x, 0).relevance
    torch.testing.assert_close(result.relevance.sum(1), plain, rtol=1e-10, atol=1e-14)


# ------------------------------------------------- every rule with a batched backward pass


def signed_cnn() -> nn.Sequential:
    """Convolutions on signed inputs (no ReLU between the first two), fused ReLUs, pooling,
    BatchNorm, Linear layers."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(),
                         nn.Linear(6, 4)).double().eval()


class FloatMaskAttention(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention`` with a float mask (a bias on the
    scores), LayerNorm and GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.norm, self.head = nn.Linear(8, 24), nn.LayerNorm(8), nn.Linear(8, 3)
        self.register_buffer("mask", 0.3 * torch.randn(5, 5))

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask).transpose(1, 2).flatten(2)
        return self.head(F.gelu(self.norm(x + y)).mean(1))


def _models():
    box = lrpx.composites.epsilon_gamma_box(-3.0, 3.0)
    yield "zbox-gamma", signed_cnn(), box, (2, 3, 6, 6)
    yield "gamma-eps0", signed_cnn(), lrpx.Composite(rules=[(nn.Conv2d, Gamma(0.5, epsilon=0.0))]), (2, 3, 6, 6)
    yield "relative-epsilon", signed_cnn(), lrpx.Composite(rules=[(nn.Conv2d, Epsilon(0.1, relative=True))]), (
        2, 3, 6, 6)
    for name in ("epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat"):
        yield name, signed_cnn(), lrpx.composites.get_preset(name), (2, 3, 6, 6)
    torch.manual_seed(0)
    yield "attention", FloatMaskAttention().double().eval(), lrpx.Composite(), (2, 5, 8)
    vit = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8,
                                               mlp_dim=16, num_classes=3)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero
    yield "vit", vit.double().eval(), lrpx.Composite(), (2, 3, 8, 8)


MODELS = {name: (model, composite, shape) for name, model, composite, shape in _models()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_backward_rows_equal_rows_one_by_one(name):
    model, composite, shape = MODELS[name]
    lrp = lrpx.convert(model, composite)
    torch.manual_seed(2)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = lrp(x)
    rows = torch.randn((3,) + out.shape, dtype=torch.float64)
    one_by_one = torch.stack([torch.autograd.grad(out, x, r, retain_graph=True)[0] for r in rows])
    assert one_by_one.abs().sum() > 0 and torch.isfinite(one_by_one).all()
    (legacy,) = torch.autograd.grad(out, x, rows, retain_graph=True, is_grads_batched=True)
    functional = torch.func.vmap(lambda r: torch.autograd.grad(out, x, r, retain_graph=True)[0])(rows)
    scale = one_by_one.abs().max()
    torch.testing.assert_close(legacy, one_by_one, rtol=1e-12, atol=1e-14 * scale)
    torch.testing.assert_close(functional, one_by_one, rtol=1e-12, atol=1e-14 * scale)
    # nothing the rules saved was changed by the batched passes
    torch.testing.assert_close(torch.autograd.grad(out, x, rows[0])[0], one_by_one[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_vmap_over_samples_of_the_forward_and_its_relevance(name):
    """``torch.func.vmap`` of ``torch.func.grad`` over the samples: each row the forward and the
    relevance of one sample (the Functions' generated vmap rules), equal to the batch's."""
    model, composite, shape = MODELS[name]
    lrp = lrpx.convert(model, composite)
    torch.manual_seed(2)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = lrp(x)
    (batch,) = torch.autograd.grad(out[:, 1].sum(), x)
    per_sample = torch.func.vmap(torch.func.grad(lambda sample: lrp(sample[None])[0, 1]))(x.detach())
    torch.testing.assert_close(per_sample, batch, rtol=1e-10, atol=1e-13 * batch.abs().max())


class HostGradient(lrpx.rules.Rule):
    """The gradient through a Linear layer, after a look at the relevance on the host (which
    the rows of a batched pass cannot give)."""

    saves = ("input", "weight")

    def relevance(self, layer, relevance, input, weight, bias, output):
        if bool((relevance == 0).all()):
            return torch.zeros_like(input)
        return layer.vjp(relevance, weight, input)


def test_a_rule_that_reads_the_relevance_on_the_host_takes_the_repeated_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    lrp = lrpx.convert(model, lrpx.Composite(rules=[(nn.Linear, HostGradient())]))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="repeats the input once per condition: a batched backward pass over the "
                                         "conditions failed"):
        result = concepts.attribute(lrp, x, 2, conditions=[{"0": [c]} for c in range(4)])
    plain = lrpx.explain(lrp, x, 2).relevance
    torch.testing.assert_close(result.relevance.sum(1), plain, rtol=1e-10, atol=1e-14)


class Float32Norm(nn.Module):
    """RMSNorm computed in float32 inside a float64 model (a precision round trip)."""

    def forward(self, x):
        h = x.to(torch.float32)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def test_lrpx_own_functions_keep_the_one_forward_path():
    """Fused attention (``_Attention``) and a precision round trip (``_RelevanceTo``) are lrpx's
    own Functions: ``attribute`` takes one forward, without the repeated input's warning."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(Counter(), nn.Linear(8, 8), Float32Norm(), FloatMaskAttention()).double().eval()
    lrp = lrpx.convert(model, lrpx.Composite(), twins={Counter: None})
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out = lrp[1:](x.clone().requires_grad_())
    names = set()
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    assert {"_AttentionBackward", "_RelevanceToBackward"} <= names
    lrp[0].calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = concepts.attribute(lrp, x, 1, conditions=[{"1": [c]} for c in range(5)], batch_size=5)
    assert lrp[0].calls == 1
    plain = lrpx.explain(lrp, x, 1).relevance
    torch.testing.assert_close(result.relevance.sum(1), plain, rtol=1e-9, atol=1e-12)
