"""Random-init torchvision models with non-zero biases and random BatchNorm statistics,
plus an independent account of the relevance each LRP layer absorbs."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import lrpx
from lrpx.layers import Add


#: builders that take constructor arguments the registry's builder fixes: MaxViT-T's layers with
#: another partition size, so that it runs at a small input
_BUILDERS = {
    "maxvit_t": partial(torchvision.models.maxvit._maxvit, stem_channels=64, block_channels=[64, 128, 256, 512],
                        block_layers=[2, 2, 5, 2], head_dim=32, stochastic_depth_prob=0.2),
}


def build(name: str, **kwargs) -> nn.Module:
    """torchvision's model ``name`` (with the builders above where they differ)."""
    return _BUILDERS.get(name, partial(torchvision.models.get_model, name))(**kwargs)


def randomized(name: str, seed: int = 0, dtype=torch.float64, **kwargs) -> nn.Module:
    """torchvision ``name`` with random weights, non-zero biases and BatchNorm statistics.

    torchvision initialises biases to zero and BatchNorm to the identity, which hides bias
    and folding bugs. Weights are redrawn with a fan-in scale (He et al. 2015) so that
    activations stay near 1 through deep nets (torchvision's small inits for GoogLeNet or
    MobileNet would leave signals below any stabilizer); layer scales and position
    embeddings become random too.
    """
    torch.manual_seed(seed)
    model = build(name, weights=None, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            for pname, p in m.named_parameters(recurse=False):
                if pname in ("layer_scale", "class_token", "pos_embedding"):
                    p.copy_((0.5 if pname == "layer_scale" else 0.1) * torch.randn(p.shape, generator=g))
    return model.eval().to(dtype)


def sign0(z):
    return torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def stab(z, e):
    return z + e * sign0(z)


class _MatmulStandIn(nn.Module):
    """``x @ weight`` (``weight @ x`` with ``weight_first``), for :func:`absorbed`."""

    def __init__(self, weight, weight_first: bool, rule):
        super().__init__()
        self.weight, self.bias, self.weight_first, self.rule = weight.detach(), None, weight_first, rule


def _layer_forward(m: nn.Module, x, w, b):
    if isinstance(m, _MatmulStandIn):
        return (w @ x if m.weight_first else x @ w) + (0 if b is None else b)
    if isinstance(m, nn.Linear):
        return F.linear(x, w, b)
    if isinstance(m, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, w, b, m.stride, m.padding, 0, m.groups, m.dilation)
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * w.view(shape) + (0 if b is None else b.view(shape))
    if isinstance(m, (nn.Conv1d, nn.Conv3d)) or (isinstance(m, nn.Conv2d) and m.padding_mode != "zeros"):
        return next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(m, c))._conv_forward(m, x, w, b)
    return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)


def _bias(m, b, z):
    if b is None:
        return torch.zeros((), dtype=z.dtype)
    if isinstance(m, nn.Linear):
        return b
    return b.view(1, -1, *([1] * (z.dim() - 2))) if z.dim() > 2 else b


def absorbed(m: nn.Module, x: torch.Tensor, z: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Sum of output relevance minus sum of input relevance that layer ``m`` should give,
    computed from the rule's definition in docs/rules.md (not from the library's fast forms)."""
    rule = m.rule
    if isinstance(rule, (lrpx.rules.Pass, lrpx.rules.Uniform)):  # Uniform on a product: R_a + R_b = R
        return torch.zeros((), dtype=R.dtype)
    if isinstance(rule, lrpx.rules.Taylor):  # softmax: R_x = x (R - s sum R)
        return R.sum() - (x * (R - z * R.sum(m.dim, keepdim=True))).sum()
    if isinstance(rule, lrpx.rules.Norm):
        return (R * rule.epsilon * sign0(z) / stab(z, rule.epsilon)).sum()
    w, b = _affine(m)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    bp = None if b is None else b.clamp(min=0)
    bn = None if b is None else b.clamp(max=0)
    if isinstance(rule, lrpx.rules.Epsilon):
        kept = R * (z - _bias(m, b, z)) / stab(z, rule.epsilon)
    elif isinstance(rule, lrpx.rules.Gamma):
        g = rule.gamma
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        P, N = w + g * wp, w + g * wn
        bb_p = _bias(m, b, z) + g * _bias(m, bp, z)
        bb_n = _bias(m, b, z) + g * _bias(m, bn, z)
        z_p = _layer_forward(m, xp, P, None) + _layer_forward(m, xn, N, None) + bb_p
        z_n = _layer_forward(m, xp, N, None) + _layer_forward(m, xn, P, None) + bb_n
        kept = torch.where(z > 0, R, 0.0) * (z_p - bb_p) / stab(z_p, rule.epsilon) + \
            torch.where(z < 0, R, 0.0) * (z_n - bb_n) / stab(z_n, rule.epsilon)
    elif isinstance(rule, lrpx.rules.ZPlus):
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        bb = _bias(m, bp, z)
        z_p = _layer_forward(m, xp, wp, None) + _layer_forward(m, xn, wn, None) + bb
        kept = R * (z_p - bb) / stab(z_p, rule.epsilon)
    elif isinstance(rule, lrpx.rules.Flat):
        ones = _layer_forward(m, torch.ones_like(x), torch.ones_like(w), None)
        kept = R * ones / stab(ones, rule.epsilon)
    elif isinstance(rule, lrpx.rules.ZBox):
        low = torch.full_like(x, rule.low) if not torch.is_tensor(rule.low) else rule.low.expand_as(x)
        high = torch.full_like(x, rule.high) if not torch.is_tensor(rule.high) else rule.high.expand_as(x)
        z_b = _layer_forward(m, x, w, None) - _layer_forward(m, low, wp, None) - _layer_forward(m, high, wn, None)
        kept = R * z_b / stab(z_b, rule.epsilon)
    else:
        raise NotImplementedError(type(rule))
    return R.sum() - kept.sum()


def _affine(m: nn.Module):
    """Weight and bias of the linear map a layer computes (BatchNorm: from its statistics)."""
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
        scale = m.weight / torch.sqrt(m.running_var + m.eps)
        return scale, m.bias - m.running_mean * scale
    return m.weight, m.bias


def _norm_absorbed(m: nn.Module, x, y, R) -> torch.Tensor:
    """LayerNorm/GroupNorm with the AttnLRP rule: the bias takes its share of R at the
    affine step, the stabilizers take theirs at the affine and the centring step."""
    if isinstance(m.rule, lrpx.rules.Pass):
        return torch.zeros((), dtype=R.dtype)
    e = m.rule.epsilon
    if isinstance(m, nn.GroupNorm):
        sets = x.reshape(x.shape[0], m.num_groups, -1)
        c = (sets - sets.mean(-1, keepdim=True)).reshape(x.shape)
        b = 0 if m.bias is None else m.bias.view(1, -1, *([1] * (x.dim() - 2)))
    elif type(m).__name__ == "LRPLayerNorm2d":  # torchvision's LayerNorm2d: over channels
        c = x - x.mean(1, keepdim=True)
        b = 0 if m.bias is None else m.bias.view(1, -1, 1, 1)
    else:
        dims = tuple(range(-len(m.normalized_shape), 0))
        c = x - x.mean(dims, keepdim=True)
        b = 0 if m.bias is None else m.bias
    r_n = (y - b) * R / stab(y, e)
    return R.sum() - (r_n * c / stab(c, e)).sum()


def _attention_absorbed(m: nn.MultiheadAttention, inputs, R) -> torch.Tensor:
    """R_out minus R_in of self-attention, R_in from the numpy oracle of test_attention."""
    import numpy as np
    from test_attention import attention_oracle, numpy_params

    q, k, v = (t.detach() for t in inputs[:3])
    if not m.batch_first:
        q, k, v, R = (t.transpose(0, 1) for t in (q, k, v, R))
    n, length, _ = q.shape
    mask = np.zeros((n, m.num_heads, length, k.shape[1]))
    e = getattr(m.rule, "epsilon", 1e-6)
    _, r_q, r_k, r_v = attention_oracle(q.numpy(), k.numpy(), v.numpy(), numpy_params(m), m.num_heads, mask,
                                        R.detach().numpy(), e)
    return R.sum() - torch.as_tensor(r_q.sum() + r_k.sum() + r_v.sum())


def _matmul_parts(a, b, R, e, equation=None):
    """R_a, R_b of the AttnLRP matmul rule (epsilon on each factor, half each); for
    ``torch.einsum(equation, a, b)`` the two VJPs come from autograd of the plain contraction."""
    if equation is None:
        S = R / stab(2 * (a @ b), e)
        return a * (S @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ S)
    with torch.enable_grad():
        a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
        z = torch.einsum(equation, a_, b_)
        g_a, g_b = torch.autograd.grad(z, (a_, b_), R / stab(2 * z.detach(), e))
    return a * g_a, b * g_b


def _sdpa_absorbed(m, inputs, kwargs, R) -> torch.Tensor:
    return sdpa_absorbed(*inputs[:3], R, kwargs.get("attn_mask"), kwargs.get("is_causal", False),
                         kwargs.get("scale"), m.rule.epsilon)


def sdpa_absorbed(q, k, v, R, mask=None, is_causal=False, scale=None, e=1e-6) -> torch.Tensor:
    """R_out minus R_in of scaled dot-product attention, written out from the rules: scale
    and mask pass, the two products take the matmul rule, the softmax the Taylor rule; a query
    whose keys are all masked has weights 0. Key/value heads fewer than the query heads are
    repeated to them."""
    if k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k, v = (t.repeat_interleave(q.shape[-3] // t.shape[-3], -3) for t in (k, v))
    qs = q * (scale or q.shape[-1] ** -0.5)
    scores = qs @ k.transpose(-2, -1)
    masked = scores
    if is_causal:
        masked = masked.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        masked = masked.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else masked + mask
    dead = (masked == float("-inf")).all(-1, keepdim=True)
    A = torch.softmax(masked, -1).masked_fill(dead, 0.0)
    R_A, R_v = _matmul_parts(A, v, R, e)
    R_s = (masked * (R_A - A * R_A.sum(-1, keepdim=True))).masked_fill(masked == float("-inf"), 0)
    if mask is not None and mask.dtype != torch.bool:  # a non-zero bias on the scores keeps its share
        bias = mask.masked_fill(mask == float("-inf"), 0).expand_as(scores)
        R_s = torch.where(bias == 0, R_s, scores * R_s / stab(scores + bias, e))
    R_q, R_k = _matmul_parts(qs, k.transpose(-2, -1), R_s, e)
    return R.sum() - (R_q.sum() + R_k.sum() + R_v.sum())


def _stand_in(ops, weight: torch.Tensor, bias) -> nn.Module:
    """A torch layer with ``weight`` and ``bias`` that computes what ``ops`` (a linear or
    convolution applied at run time) computes, for :func:`absorbed`."""
    if isinstance(ops, lrpx.ops.LinearOps):
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ops.dim]
        m = conv(weight.shape[1] * ops.groups, weight.shape[0], tuple(weight.shape[2:]), ops.stride, ops.padding,
                 ops.dilation, ops.groups, bias=bias is not None)
    m.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        m.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return m


def _op_absorbed(c: dict, R: torch.Tensor) -> torch.Tensor:
    """R_out minus R_in of an operation that took its rule at run time (``lrpx.oplevel``),
    from the rules' definitions."""
    ops, rule, inputs, z = c["ops"], c["rule"], c["inputs"], c["output"]
    if isinstance(ops, lrpx.ops.MatmulOps):
        r_a, r_b = _matmul_parts(*inputs[:2], R, rule.epsilon, ops.equation)
        return R.sum() - r_a.sum() - r_b.sum()
    if isinstance(rule, (lrpx.rules.Pass, lrpx.rules.Uniform)):  # a product: R_a + R_b = R
        return torch.zeros((), dtype=R.dtype)
    if isinstance(ops, lrpx.ops.WeightMatmulOps):
        return absorbed(_MatmulStandIn(c["weight"], ops.weight_first, rule), inputs[0], z, R)
    if isinstance(ops, (lrpx.ops.LinearOps, lrpx.ops.ConvOps)):
        m = _stand_in(ops, c["weight"], c["bias"])
        m.rule = rule
        return absorbed(m, inputs[0], z, R)
    if isinstance(ops, lrpx.ops.LayerNormOps):
        m = nn.LayerNorm(ops.normalized_shape, ops.eps, elementwise_affine=c["weight"] is not None,
                         bias=c["bias"] is not None, dtype=z.dtype)
        for key in ("weight", "bias"):
            if c[key] is not None:
                setattr(m, key, nn.Parameter(c[key].detach(), requires_grad=False))
        m.rule = rule
        return _norm_absorbed(m, inputs[0], z, R)
    if isinstance(ops, lrpx.ops.SoftmaxOps) or isinstance(rule, lrpx.rules.Taylor):
        x = inputs[0]
        return R.sum() - (x * (R - z * R.sum(ops.dim, keepdim=True))).masked_fill(x == float("-inf"), 0).sum()
    if isinstance(ops, lrpx.ops.SumOps):  # what the operands that pass it on do not get
        share = R / stab(z, rule.epsilon)
        return R.sum() - sum((a * share).sum() for a, p in zip(inputs, c["passed"]) if p)
    if isinstance(rule, lrpx.rules.Norm):  # a mean or sum over dimensions
        return (R * rule.epsilon * sign0(z) / stab(z, rule.epsilon)).sum()
    raise NotImplementedError(f"{type(ops).__name__} with {rule!r}")


class Recorder:
    """Records (module, input, output, output relevance) for every LRP layer call, and
    (operation, rule, inputs, output, output relevance) for every operation that takes its rule
    at run time (``lrpx.oplevel``)."""

    def __init__(self, model: nn.Module):
        self.calls = []
        self._kwargs = {}
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, lrpx.layers.Twin)]
        self.handles += [m.register_forward_pre_hook(self._keep_kwargs, with_kwargs=True) for m in model.modules()
                         if isinstance(m, lrpx.layers.ScaledDotProductAttention)]
        self._patched = {"lrp_apply": lrpx.oplevel.lrp_apply,
                         "ScaledDotProductAttention": lrpx.oplevel.ScaledDotProductAttention}
        lrpx.oplevel.lrp_apply = self._op(lrpx.oplevel.lrp_apply)
        lrpx.oplevel.ScaledDotProductAttention = self._attention

    def _op(self, apply):
        def recorded(ops, rule, input, weight=None, bias=None, *, relu=False):
            out = apply(ops, rule, input, weight, bias, relu=relu)
            inputs = input if isinstance(input, tuple) else (input,)
            self._record_op(ops, rule, inputs, out, weight, bias)
            return out
        return recorded

    def _attention(self, rule):
        m = self._patched["ScaledDotProductAttention"](rule)
        self.handles += [m.register_forward_pre_hook(self._keep_kwargs, with_kwargs=True),
                         m.register_forward_hook(self._hook)]
        return m

    def _record_op(self, ops, rule, inputs, out, weight, bias):
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        entry = {"module": None, "ops": ops, "rule": rule, "output": out.detach(), "relevance": None,
                 "inputs": tuple(t.detach() for t in inputs), "passed": [t.requires_grad for t in inputs],
                 "weight": weight, "bias": bias}
        self.calls.append(entry)
        out.register_hook(lambda grad, e=entry: e.__setitem__("relevance", grad))

    def _keep_kwargs(self, module, args, kwargs):
        self._kwargs[id(module)] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

    def _hook(self, module, args, output):
        if isinstance(output, tuple):  # MultiheadAttention: (output, weights)
            output = output[0]
        # detached: an entry must not hold the tensor its hook hangs on (a FusedReLU returns its
        # input), or the two would form a cycle the garbage collector cannot see through
        kwargs = dict(self._kwargs.pop(id(module), {}))
        if not isinstance(output, torch.Tensor) or not output.requires_grad:  # from constants (a position code)
            return
        inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        passed = [any(t.requires_grad for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor))
                  for a in args]
        entry = {"module": module, "inputs": inputs, "output": output.detach(), "relevance": None,
                 "kwargs": kwargs, "passed": passed}
        self.calls.append(entry)
        output.register_hook(lambda grad, e=entry: e.__setitem__("relevance", grad))

    def total_absorbed(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for c in self.calls:
            m, R = c["module"], c["relevance"]
            if R is None:  # no relevance reached this call (a gate's branch)
                continue
            if not any(c["passed"]):  # inputs computed from constants (a position code from a grid):
                total = total + R.sum()  # the layer passes its relevance to nothing that carries it
                continue
            if m is None:
                total = total + _op_absorbed(c, R)
                continue
            if isinstance(m, nn.MultiheadAttention):
                total = total + _attention_absorbed(m, c["inputs"], R)
            elif isinstance(m, lrpx.layers.ScaledDotProductAttention):
                total = total + _sdpa_absorbed(m, c["inputs"], c["kwargs"], R)
            elif isinstance(m, lrpx.layers.Matmul):
                r_a, r_b = _matmul_parts(*c["inputs"][:2], R, m.rule.epsilon, m.equation)
                total = total + R.sum() - r_a.sum() - r_b.sum()
            elif isinstance(m, lrpx.layers.WeightMatmul):
                x, w = c["inputs"][::-1] if m.weight_first else c["inputs"]
                total = total + absorbed(_MatmulStandIn(w, m.weight_first, m.rule), x, c["output"], R)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                total = total + _norm_absorbed(m, c["inputs"][0].detach(), c["output"], R)
            elif isinstance(m, Add):  # what the operands that pass it on (not constants) do not get
                z = c["output"] if not m.fused_relu else sum(torch.as_tensor(a) for a in c["inputs"])
                share = R / stab(z, m.rule.epsilon)
                kept = sum((a * share).sum() for a, p in zip(c["inputs"], c["passed"]) if p)
                total = total + R.sum() - kept
            else:  # RoIAlign's first input is a dict of feature maps (Norm reads only z)
                x = c["inputs"][0]
                total = total + absorbed(m, x.detach() if isinstance(x, torch.Tensor) else None, c["output"], R)
        return total

    def remove(self):
        for h in self.handles:
            h.remove()
        for name, value in self._patched.items():
            setattr(lrpx.oplevel, name, value)


#: torchvision classification families: ``{name: (input size, constructor kwargs)}``, inputs as
#: small as each architecture allows
FAMILIES: dict[str, tuple[int, dict]] = {
    "alexnet": (64, {}),
    **{f"vgg{d}{bn}": (32, {}) for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    **{f"resnet{d}": (32, {}) for d in (18, 34, 50, 101, 152)},
    "resnext50_32x4d": (32, {}),
    "wide_resnet50_2": (32, {}),
    "densenet121": (32, {}),
    "squeezenet1_0": (64, {}),
    "squeezenet1_1": (64, {}),
    "googlenet": (64, {"aux_logits": True, "init_weights": False}),
    "inception_v3": (80, {"aux_logits": True, "init_weights": False}),
    "mobilenet_v2": (32, {}),
    "mobilenet_v3_small": (32, {}),
    "mobilenet_v3_large": (32, {}),
    "efficientnet_b0": (32, {}),
    "shufflenet_v2_x1_0": (32, {}),
    "mnasnet1_0": (32, {}),
    "regnet_y_400mf": (32, {}),
    "convnext_tiny": (32, {}),
    "vit_b_16": (32, {"image_size": 32}),
    "swin_t": (32, {}),
    "swin_v2_t": (32, {}),
    "maxvit_t": (64, {"input_size": (64, 64), "partition_size": 2}),
}


#: torchvision's segmentation families: ``{name: (input size, constructor kwargs)}`` (no download:
#: ``weights_backbone=None``); explained for one class over the whole map
SEGMENTATION: dict[str, tuple[int, dict]] = {
    "fcn_resnet50": (48, {"aux_loss": True}),
    "deeplabv3_resnet50": (48, {}),
    "deeplabv3_mobilenet_v3_large": (48, {"aux_loss": True}),
    "lraspp_mobilenet_v3_large": (48, {}),
}


#: torchvision's detection families: ``{name: (input (h, w), constructor kwargs)}``: small images,
#: few proposals and no score threshold, so that random weights give detections
_RCNN = {"min_size": 64, "max_size": 96, "rpn_pre_nms_top_n_test": 40, "rpn_post_nms_top_n_test": 16,
         "box_score_thresh": 0.0, "box_detections_per_img": 6}
_ONE_STAGE = {"min_size": 64, "max_size": 96, "score_thresh": 0.0, "detections_per_img": 6, "topk_candidates": 20}
DETECTION: dict[str, tuple[tuple[int, int], dict]] = {
    "fasterrcnn_resnet50_fpn": ((72, 64), _RCNN),
    "fasterrcnn_resnet50_fpn_v2": ((72, 64), _RCNN),
    "fasterrcnn_mobilenet_v3_large_fpn": ((72, 64), _RCNN),
    "maskrcnn_resnet50_fpn": ((72, 64), _RCNN),
    "retinanet_resnet50_fpn": ((72, 64), _ONE_STAGE),
    "fcos_resnet50_fpn": ((72, 64), _ONE_STAGE),
    "ssd300_vgg16": ((100, 90), {"score_thresh": 0.0, "detections_per_img": 6, "topk_candidates": 20}),
    "ssdlite320_mobilenet_v3_large": ((100, 90), {"score_thresh": 0.0, "detections_per_img": 6,
                                                  "topk_candidates": 20}),
}
#: SSD models fix their input size in the constructor: the size each family is resized to here
SSD_SIZES = {"ssd300_vgg16": 268, "ssdlite320_mobilenet_v3_large": 160}


def frozen_batchnorms(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d with the same statistics (in place), as
    the detection builders do with pretrained backbones."""
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(child.weight.dtype)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(m, child_name, frozen)
    return model


def randomized_detector(name: str, seed: int = 0, frozen: bool = False) -> nn.Module:
    """A torchvision detection model (``DETECTION``) from :func:`randomized`, float64, no
    download; ``frozen`` swaps its BatchNorms for FrozenBatchNorm2d."""
    _, kwargs = DETECTION[name]
    model = randomized(name, seed, num_classes=5, weights_backbone=None, **kwargs)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # small box offsets: boxes stay inside the image instead of being clipped away
        for module_name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and ("bbox" in module_name or "regression_head" in module_name):
                m.weight.mul_(0.01)
    # BatchNorm statistics near those of the activations (randomly off by up to 20%), so that
    # they stay of order one through ResNet-50 and the FPN: each BatchNorm takes them from
    # its input on a calibration image just before it normalises it
    def calibrate(m, args):
        x = args[0]
        m.running_mean.copy_(x.mean((0, 2, 3)) * (0.8 + 0.4 * torch.rand(x.shape[1], generator=g)))
        m.running_var.copy_(x.var((0, 2, 3), correction=0) * (0.8 + 0.4 * torch.rand(x.shape[1], generator=g)) + 1e-3)

    handles = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    size = DETECTION[name][0]
    with torch.no_grad():
        model(torch.rand(1, 3, *size, generator=g, dtype=torch.float64))
    for h in handles:
        h.remove()
    if name in SSD_SIZES:
        model.transform.fixed_size = (SSD_SIZES[name],) * 2
        model.transform.min_size = (SSD_SIZES[name],)
        model.transform.max_size = SSD_SIZES[name]
    return (frozen_batchnorms(model) if frozen else model).eval()
